//! `phalanx`: the operator and training CLI. The only crate that knows clap.
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod agent;
mod bench;
mod ctl;
mod demo;
mod fault;
mod model;
mod scenario;
mod train;

#[derive(Parser, Debug)]
#[command(
    name = "phalanx",
    version,
    about = "Fault-tolerant, deterministic GPT training across (emulated) GPUs"
)]
#[command(propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "warn,phalanx=info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a GPT with N local worker processes (emulated GPUs), deterministically.
    Train(train::TrainCmd),
    /// Run or manage one worker (one GPU).
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Generate text with a trained model (a safetensors file from `train --save` or
    /// `job export`).
    Sample(model::SampleCmd),
    /// List the GPU models that can be emulated and the CUDA devices present.
    Devices(train::DevicesCmd),
    /// The demo of `just run`: a local cluster trains through injected faults.
    Demo(demo::DemoCmd),
    /// Fault injection into a local cluster (chaos testing).
    #[command(subcommand)]
    Fault(fault::FaultCmd),
    /// Benchmarks (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Run or manage a controller node (raft-replicated cluster state).
    #[command(subcommand)]
    Controller(ctl::ControllerCmd),
    /// Start or stop a local cluster: controllers and, optionally, worker agents.
    #[command(subcommand)]
    Cluster(ctl::ClusterCmd),
    /// Show the controllers, the leader, the workers and the job.
    Status(ctl::StatusCmd),
    /// Write, submit, inspect or cancel a training job.
    #[command(subcommand)]
    Job(ctl::JobCmd),
    /// The checkpoint catalog.
    #[command(subcommand)]
    Checkpoint(ctl::CheckpointCmd),
    /// The controller's decisions and their reasons.
    Events(ctl::EventsCmd),
    /// Chaos scenario files: run, validate, list (see docs/scenarios.md).
    #[command(subcommand)]
    Scenario(scenario::ScenarioCmd),
    /// Print the summary of a scenario run's report directory again.
    Report(scenario::ReportCmd),
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// Run one data-parallel worker: rank R of a world of N, with explicit peers or the
    /// stdio rendezvous used by `phalanx train`.
    Run(train::WorkerRunCmd),
    /// Start a worker agent that registers with the controllers, heartbeats and trains
    /// whatever rank its plan epoch gives it.
    Start(agent::WorkerStartCmd),
    /// Drain a worker: it leaves the plan gracefully (replicated through the controller).
    Drain(ctl::DrainCmd),
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log);
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    let res = match cli.command {
        Command::Train(c) => train::train(c, json_logs),
        Command::Worker(WorkerCmd::Run(c)) => train::worker_run(c),
        Command::Worker(WorkerCmd::Start(c)) => agent::start(c),
        Command::Devices(c) => train::devices(c),
        Command::Sample(c) => model::sample(c),
        Command::Bench(c) => bench::run(c),
        Command::Fault(c) => fault::run(c),
        Command::Demo(c) => demo::run(c),
        Command::Worker(WorkerCmd::Drain(c)) => ctl::drain(c),
        Command::Controller(c) => ctl::controller(c),
        Command::Cluster(c) => ctl::cluster(c),
        Command::Status(c) => ctl::status(c),
        Command::Job(c) => ctl::job(c),
        Command::Checkpoint(c) => ctl::checkpoint(c),
        Command::Events(c) => ctl::events(c),
        Command::Scenario(c) => scenario::run(c),
        Command::Report(c) => scenario::report(c),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
