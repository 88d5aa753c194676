//! `phalanx`: the operator and training CLI. The only crates that know clap are this
//! package's.
//!
//! This binary links no libtorch (see `lib.rs`): the operator verbs, the controller,
//! `cluster up|down`, the demo and the scenario runner start in milliseconds. The verbs
//! that train or touch tensors (`train`, `worker start|run`, `sample`, `devices`,
//! `bench`, `job export`) replace this process with `phalanx-train`, which sits next to
//! it, with the same arguments.
use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use phalanx_cli::{ctl, demo, fault, forward, outcome, scenario};

#[derive(Parser, Debug)]
#[command(
    name = "phalanx",
    version,
    about = "Fault-tolerant, deterministic GPT training across (emulated) GPUs",
    after_help = "Exit codes: 0 done, 1 rejected or failed, 2 bad usage, 3 cluster unreachable (docs/cli.md)."
)]
#[command(propagate_version = true)]
struct Cli {
    #[command(flatten)]
    logs: phalanx_cli::util::LogArgs,
    #[command(subcommand)]
    command: Command,
}

/// The arguments of a verb that `phalanx-train` runs; `phalanx VERB --help` shows them.
#[derive(Args, Debug)]
struct Forwarded {
    /// Arguments of the verb (run by `phalanx-train`; `--help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a GPT with N local worker processes (emulated GPUs), deterministically.
    #[command(disable_help_flag = true)]
    Train(Forwarded),
    /// Run or manage one worker (one GPU).
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Generate text with a trained model (a safetensors file from `train --save` or
    /// `job export`).
    #[command(disable_help_flag = true)]
    Sample(Forwarded),
    /// List the GPU models that can be emulated and the CUDA devices present.
    #[command(disable_help_flag = true)]
    Devices(Forwarded),
    /// The demo of `just run`: a local cluster trains through injected faults.
    Demo(demo::DemoCmd),
    /// Fault injection into a local cluster (chaos testing), and its undo.
    #[command(subcommand)]
    Fault(fault::FaultCmd),
    /// Benchmarks of training, numerics and checkpoints (see docs/benchmarks.md).
    #[command(disable_help_flag = true)]
    Bench(Forwarded),
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
    /// Print the address of the leader's live dashboard (with the token); opens nothing.
    Dashboard(ctl::dashboard::DashboardCmd),
    /// Chaos scenario files: run, validate, list (see docs/scenarios.md).
    #[command(subcommand)]
    Scenario(scenario::ScenarioCmd),
    /// Print the summary of a scenario run's report directory again.
    Report(scenario::ReportCmd),
    /// The cluster simulator: 16k-131k GPUs in virtual time (see docs/simulator.md).
    Sim(phalanx_sim::cli::SimCommand),
    /// Print a shell completion script: `phalanx completions bash > /etc/bash_completion.d/phalanx`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per verb into --out-dir.
    Man {
        /// Write phalanx.1 and a page per verb (phalanx-job-submit.1, ...) here.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// Run one data-parallel worker: rank R of a world of N, with explicit peers or the
    /// stdio rendezvous used by `phalanx train`.
    #[command(disable_help_flag = true)]
    Run(Forwarded),
    /// Start a worker agent that registers with the controllers, heartbeats and trains
    /// whatever rank its plan epoch gives it.
    #[command(disable_help_flag = true)]
    Start(Forwarded),
    #[command(flatten)]
    Op(ctl::WorkerOpCmd),
}

fn man(out_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match out_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            clap_mangen::generate_to(cmd, &d)?;
            println!("man pages written to {}", d.display());
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The verb and its sub-verb ("job submit"): the name of a short command's root span.
    let verb = {
        let mut v = Vec::new();
        let mut m = &matches;
        while let Some((name, sub)) = m.subcommand() {
            v.push(name);
            m = sub;
        }
        v.join(" ")
    };
    // Short verbs end quietly when their reader goes away (`| head -1`); the long-running
    // ones (controller, cluster up, demo, scenarios) keep Rust's default.
    let short = matches!(
        cli.command,
        Command::Status(_)
            | Command::Job(_)
            | Command::Checkpoint(_)
            | Command::Events(_)
            | Command::Dashboard(_)
            | Command::Worker(WorkerCmd::Op(_))
            | Command::Fault(_)
            | Command::Report(_)
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::Controller(ctl::ControllerCmd::Add { .. })
            | Command::Controller(ctl::ControllerCmd::Remove { .. })
            | Command::Cluster(ctl::ClusterCmd::Down { .. })
    );
    if short {
        outcome::quiet_broken_pipe();
    }
    let service = match &cli.command {
        Command::Controller(ctl::ControllerCmd::Start(_)) => "phalanx-controller",
        _ => "phalanx",
    };
    let traces = cli.logs.init_tracing(service);
    // A short command is one trace: its API calls are children of this span. The
    // long-running ones (a controller, `cluster up`) get none, or every call they make for
    // hours would hang under one root.
    let root = if short {
        tracing::info_span!("cli.command", otel.kind = "client", command = verb.as_str())
    } else {
        tracing::Span::none()
    };
    let entered = root.enter();
    let res = match cli.command {
        Command::Train(_)
        | Command::Worker(WorkerCmd::Run(_) | WorkerCmd::Start(_))
        | Command::Devices(_)
        | Command::Sample(_)
        | Command::Bench(_) => forward::exec_training_binary(),
        Command::Fault(c) => fault::run(c),
        Command::Demo(c) => demo::run(c),
        Command::Worker(WorkerCmd::Op(c)) => ctl::ops::worker_op(c),
        Command::Controller(c) => ctl::controller::controller(c),
        Command::Cluster(c) => ctl::cluster::cluster(c),
        Command::Status(c) => ctl::ops::status(c),
        Command::Job(c) => ctl::ops::job(c),
        Command::Checkpoint(c) => ctl::ops::checkpoint(c),
        Command::Events(c) => ctl::ops::events(c),
        Command::Dashboard(c) => ctl::dashboard::dashboard(c),
        Command::Scenario(c) => scenario::run(c),
        Command::Report(c) => scenario::report(c),
        Command::Sim(c) => phalanx_sim::cli::run(c),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "phalanx",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out_dir } => man(out_dir),
    };
    drop(entered);
    drop(root);
    if let Some(t) = traces {
        t.shutdown(phalanx_cli::util::TRACES_SHUTDOWN_BOUND);
    }
    outcome::exit(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of every verb has a help line (`phalanx VERB --help`).
    #[test]
    fn every_flag_of_every_verb_has_a_description() {
        let missing = phalanx_cli::util::undocumented_args(&Cli::command());
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
