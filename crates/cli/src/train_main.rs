//! `phalanx-train`: the verbs of `phalanx` that train or touch tensors. It links
//! libtorch; `phalanx` does not, and replaces itself with this binary (same arguments,
//! same pid) for `train`, `worker start|run`, `sample`, `devices`, `bench` and
//! `job export`. Run it as `phalanx VERB ...`; calling it directly works too.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod bench;
mod bench_stats;
#[path = "ctl/export.rs"]
mod export;
mod model;
mod otlp_sink;
mod train;

/// What `agent.rs` and `export.rs` use of the control plane.
mod ctl {
    pub use phalanx_cli::ctl::Endpoint as Target;
}
use phalanx_cli::ctl::output::print_json;
use phalanx_cli::ctl::Target;
use phalanx_cli::outcome;

#[derive(Parser, Debug)]
#[command(
    name = "phalanx",
    bin_name = "phalanx",
    version,
    about = "Fault-tolerant, deterministic GPT training across (emulated) GPUs (the training verbs, run by phalanx-train)"
)]
#[command(propagate_version = true)]
struct Cli {
    #[command(flatten)]
    logs: phalanx_cli::util::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a GPT with N local worker processes (emulated GPUs), deterministically.
    Train(train::TrainCmd),
    /// Run one worker (one GPU).
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Generate text with a trained model (a safetensors file from `train --save` or
    /// `job export`).
    Sample(model::SampleCmd),
    /// List the GPU models that can be emulated and the CUDA devices present.
    Devices(train::DevicesCmd),
    /// Benchmarks (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// A job's checkpoints as a model file.
    #[command(subcommand)]
    Job(JobCmd),
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// Run one data-parallel worker: rank R of a world of N, with explicit peers or the
    /// stdio rendezvous used by `phalanx train`.
    Run(train::WorkerRunCmd),
    /// Start a worker agent that registers with the controllers, heartbeats and trains
    /// whatever rank its plan epoch gives it.
    Start(agent::WorkerStartCmd),
}

#[derive(Subcommand, Debug)]
enum JobCmd {
    /// Write the job's newest durable checkpoint (or --step) as a safetensors file, for
    /// `phalanx sample`.
    Export {
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Export this checkpoint step instead of the newest durable one.
        #[arg(long)]
        step: Option<u64>,
        /// The cluster's checkpoint root (default: DIR/checkpoints with --dir).
        #[arg(long)]
        checkpoint_dir: Option<std::path::PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service = match &cli.command {
        Command::Worker(_) => "phalanx-worker",
        _ => "phalanx-train",
    };
    let traces = cli.logs.init_tracing(service);
    let json_logs = cli.logs.log_format == phalanx_cli::util::LogFormat::Json;
    if let Command::Worker(_) = cli.command {
        if !phalanx_worker::memory::keep_freed_memory() {
            tracing::debug!("the C library keeps its default heap trimming");
        }
    }
    let res = match cli.command {
        Command::Train(c) => train::train(c, json_logs),
        Command::Worker(WorkerCmd::Run(c)) => train::worker_run(c),
        Command::Worker(WorkerCmd::Start(c)) => agent::start(c),
        Command::Devices(c) => train::devices(c),
        Command::Sample(c) => model::sample(c),
        Command::Bench(c) => bench::run(c),
        Command::Job(JobCmd::Export {
            out,
            step,
            checkpoint_dir,
            target,
        }) => {
            outcome::quiet_broken_pipe();
            export::export(&out, step, checkpoint_dir, &target)
        }
    };
    if let Some(t) = traces {
        t.shutdown(phalanx_cli::util::TRACES_SHUTDOWN_BOUND);
    }
    outcome::exit(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every training verb has a help line.
    #[test]
    fn every_flag_of_every_training_verb_has_a_description() {
        let missing = phalanx_cli::util::undocumented_args(&Cli::command());
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }
}
