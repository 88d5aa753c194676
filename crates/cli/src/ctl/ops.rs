//! The everyday operator verbs: `status`, `job`, `events`, `checkpoint list` and
//! `worker drain|undrain|restore`.
use phalanx_proto::RaftRole;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use phalanx_proto::{
    CheckpointInfo, ClusterStatus, Command, Event, JobInfo, NodeView, StatusResponse,
};

use super::output::{print_json, report, table};
use super::Target;
use crate::outcome::Failure;

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Print a complete, commented job file.
    Init {
        /// Model preset: tiny, small, base or gpt2-124m.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Optimizer steps to train.
        #[arg(long, default_value_t = 60)]
        steps: u64,
    },
    /// Validate and submit a job file (TOML).
    Submit {
        /// The job file (TOML), e.g. from `phalanx job init > job.toml`.
        file: PathBuf,
        /// Do not check here that the corpus exists. By default a corpus path (file,
        /// directory or glob) that this machine cannot read is refused, because the
        /// workers of a local cluster read the same filesystem; with workers on other
        /// machines pass this, and a corpus they cannot read fails the job with their
        /// reason after a few start attempts (`phalanx job status`).
        #[arg(long)]
        no_corpus_check: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show the job, its plan and progress.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Cancel the running job.
    Cancel {
        /// Why (recorded in the event log).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write the job's newest durable checkpoint (or --step) as a safetensors file, for
    /// `phalanx sample` (runs `phalanx-train job export`; `phalanx job export --help`).
    #[command(disable_help_flag = true)]
    Export {
        /// The arguments of `phalanx-train job export` (--out FILE, --step N, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `worker drain|undrain|restore`: the operator's reversible worker verbs.
#[derive(Subcommand, Debug)]
pub enum WorkerOpCmd {
    /// Drain a worker: it leaves the plan gracefully (`worker undrain` takes it back).
    Drain(WorkerOp<DrainReason>),
    /// Take a drain back: the worker may be placed again.
    Undrain(WorkerOp<UndrainReason>),
    /// Bring a quarantined worker back (after its fault was repaired); the reason lands
    /// in the event log.
    Restore(WorkerOp<RestoreReason>),
}

#[derive(Args, Debug)]
pub struct WorkerOp<R: clap::Args> {
    /// Worker id (as `phalanx status` lists it).
    pub id: String,
    #[command(flatten)]
    pub reason: R,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args, Debug)]
pub struct DrainReason {
    /// Why (recorded in the event log).
    #[arg(long, default_value = "requested by the operator")]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct UndrainReason {
    /// Why (recorded in the event log).
    #[arg(long, default_value = "requested by the operator")]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct RestoreReason {
    /// What was repaired (required; recorded in the event log).
    #[arg(long)]
    pub reason: String,
}

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// List the checkpoint catalog.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub struct StatusCmd {
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
pub struct EventsCmd {
    /// Show the last N events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    #[command(flatten)]
    target: Target,
}

pub fn status(cmd: StatusCmd) -> Result<()> {
    let client = cmd.target.client()?;
    // Each node is asked once per round; rounds go on until one answers or --wait ends.
    let start = std::time::Instant::now();
    let all = loop {
        let all = client.status_all();
        let next_round_ends = start.elapsed() + std::time::Duration::from_millis(100);
        if all.iter().any(|(_, r)| r.is_ok()) || next_round_ends >= cmd.target.wait {
            break all;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let ok: Vec<&StatusResponse> = all.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    if ok.is_empty() {
        let errs: Vec<String> = all
            .iter()
            .map(|(a, r)| format!("{a}: {}", r.as_ref().err().cloned().unwrap_or_default()))
            .collect();
        if errs.iter().any(|e| e.contains("401")) {
            bail!(
                "unauthorized (401): wrong cluster token ({})",
                errs.join("; ")
            );
        }
        return Err(
            Failure::Unreachable(format!("no controller answered: {}", errs.join("; "))).into(),
        );
    }
    // The view of the leader with the highest term, else of the most advanced node.
    let best = ok
        .iter()
        .filter(|s| s.role == RaftRole::Leader)
        .max_by_key(|s| s.term)
        .or_else(|| ok.iter().max_by_key(|s| (s.term, s.commit_index)))
        .copied()
        .ok_or_else(|| anyhow!("no status"))?;
    let nodes: Vec<NodeView> = all
        .iter()
        .map(|(a, r)| match r {
            Ok(s) => NodeView {
                address: a.clone(),
                reachable: true,
                node_id: Some(s.node_id),
                role: Some(s.role),
                term: Some(s.term),
                commit_index: Some(s.commit_index),
                applied_index: Some(s.applied_index),
                error: None,
            },
            Err(e) => NodeView {
                address: a.clone(),
                reachable: false,
                node_id: None,
                role: None,
                term: None,
                commit_index: None,
                applied_index: None,
                error: Some(e.clone()),
            },
        })
        .collect();
    let view = ClusterStatus {
        leader_id: if best.role == RaftRole::Leader {
            best.node_id
        } else {
            best.leader_id
        },
        term: best.term,
        members: best.members.clone(),
        commit_index: best.commit_index,
        workers: best.workers.clone(),
        job: best.job.clone(),
        nodes,
    };
    if cmd.target.json() {
        return print_json(&view);
    }
    let leader = if view.leader_id == 0 {
        "none".to_string()
    } else {
        view.leader_id.to_string()
    };
    println!(
        "leader: {leader}   term: {}   commit index: {}   members: {}",
        view.term,
        view.commit_index,
        view.members.len()
    );
    println!();
    println!(
        "{}",
        table(
            &["NODE", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED"],
            &view
                .nodes
                .iter()
                .map(|n| vec![
                    n.node_id.map(|i| i.to_string()).unwrap_or("?".into()),
                    n.address.clone(),
                    n.role.map(|r| r.to_string()).unwrap_or_else(|| format!(
                        "unreachable ({})",
                        n.error.clone().unwrap_or_default()
                    )),
                    n.term.map(|t| t.to_string()).unwrap_or_default(),
                    n.commit_index.map(|t| t.to_string()).unwrap_or_default(),
                    n.applied_index.map(|t| t.to_string()).unwrap_or_default(),
                ])
                .collect::<Vec<_>>(),
        )
    );
    println!();
    if view.workers.is_empty() {
        println!("workers: none registered");
    } else {
        println!(
            "{}",
            table(
                &["WORKER", "ADDRESS", "DEVICE", "HEALTH", "REASON"],
                &view
                    .workers
                    .iter()
                    .map(|w| vec![
                        w.id.clone(),
                        w.address.clone(),
                        w.device.display(),
                        w.health.as_str().into(),
                        w.health_reason.clone()
                    ])
                    .collect::<Vec<_>>(),
            )
        );
    }
    println!();
    print_job(view.job.as_ref(), &view.workers);
    Ok(())
}

fn print_job(job: Option<&JobInfo>, workers: &[phalanx_proto::WorkerInfo]) {
    match job {
        None => println!("job: none"),
        Some(j) => {
            let precision = match j.spec.precision {
                phalanx_proto::Precision::Fp32 => String::new(),
                p => format!(" ({p})"),
            };
            println!(
                "job: {}  state: {}  model: {}{precision}  progress: {}/{} steps  epoch: {}",
                j.spec.name,
                j.state.as_str(),
                j.spec.model,
                j.progress_step,
                j.spec.steps,
                j.plan
                    .as_ref()
                    .map(|p| p.epoch.to_string())
                    .unwrap_or("-".into())
            );
            if j.state == phalanx_proto::JobState::Waiting {
                println!("waiting: {}", waiting_reason(j, workers));
            }
            if let Some(f) = &j.failure {
                println!("failed: {f}");
            } else if j.start_failures > 0 {
                println!(
                    "start failures: {} of {} (see `phalanx events`)",
                    j.start_failures,
                    phalanx_core::START_ATTEMPTS_MAX
                );
            }
            if let Some(p) = &j.plan {
                let rows: Vec<Vec<String>> = p
                    .ranks
                    .iter()
                    .enumerate()
                    .map(|(r, w)| {
                        vec![
                            r.to_string(),
                            w.clone(),
                            j.rank_steps
                                .get(r)
                                .map(|s| s.to_string())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                println!("{}", table(&["RANK", "WORKER", "STEP"], &rows));
            }
            if let Some(t) = &j.throughput {
                println!("{}", throughput_line(t));
            }
            if let Some(sha) = &j.params_sha256 {
                println!("params_sha256: {sha}");
            }
            if !j.recoveries.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = j
                    .recoveries
                    .iter()
                    .map(|r| {
                        vec![
                            r.epoch.to_string(),
                            r.resumed_at_step.to_string(),
                            r.steps_redone.to_string(),
                            r.mttr_ms
                                .map(|m| format!("{:.2}", m as f64 / 1e3))
                                .unwrap_or("-".into()),
                            r.source.clone(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["EPOCH", "RESUMED AT", "REDONE", "MTTR s", "STATE FROM"],
                        &rows
                    )
                );
            }
            if let Some(e) = phalanx_core::effective_training_time(j) {
                println!("effective training time: {:.1}% (training wall time minus the recovery windows)", e * 100.0);
            }
            if !j.checkpoint_stall_us.is_empty() {
                let mut v = j.checkpoint_stall_us.clone();
                v.sort_unstable();
                println!(
                    "checkpoint stall: median {:.2} ms, max {:.2} ms over the last {} checkpoints",
                    v[v.len() / 2] as f64 / 1e3,
                    v[v.len() - 1] as f64 / 1e3,
                    v.len()
                );
            }
        }
    }
}

/// `job status`'s throughput line: tokens/s, model TFLOP/s and MFU, as rank 0 measured
/// them over its recent steps.
fn throughput_line(t: &phalanx_proto::Throughput) -> String {
    let mfu = if t.peak_mflops_per_device == 0 {
        "MFU unknown (no peak for the device)".to_string()
    } else {
        format!(
            "MFU {:.1}% of {} × {:.4} TFLOP/s ({})",
            t.mfu() * 100.0,
            t.devices,
            t.peak_mflops_per_device as f64 / 1e6,
            t.peak_source
        )
    };
    format!(
        "throughput: {} tokens/s, {:.4} TFLOP/s at {:.3e} FLOPs/token (steps {}-{}); {mfu}",
        t.tokens_per_s,
        t.achieved_mflops as f64 / 1e6,
        t.flops_per_token as f64,
        t.step.saturating_sub(u64::from(t.steps)) + 1,
        t.step,
    )
}

pub fn job(cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::Init { model, steps } => {
            let t = phalanx_core::job_template(&model, steps).map_err(|e| anyhow!("{e}"))?;
            print!("{t}");
            Ok(())
        }
        JobCmd::Submit {
            file,
            no_corpus_check,
            target,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading job file {}", file.display()))?;
            let spec = phalanx_core::parse_job_toml(&text)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            if !no_corpus_check {
                check_corpus(&spec.corpus).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            }
            let c = target.client()?;
            report(&c.command(Command::SubmitJob { spec })?, target.json())
        }
        JobCmd::Status { target } => {
            let c = target.client()?;
            let job: Option<JobInfo> = c.get("/v1/job")?;
            if target.json() {
                print_json(&job)
            } else {
                // The workers, for the waiting reason.
                let workers = match &job {
                    Some(j) if j.state == phalanx_proto::JobState::Waiting => c
                        .get::<StatusResponse>("/v1/status")
                        .map(|s| s.workers)
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                print_job(job.as_ref(), &workers);
                Ok(())
            }
        }
        JobCmd::Cancel { reason, target } => {
            let c = target.client()?;
            report(&c.command(Command::CancelJob { reason })?, target.json())
        }
        JobCmd::Export { .. } => crate::forward::exec_training_binary(),
    }
}

pub fn worker_op(cmd: WorkerOpCmd) -> Result<()> {
    let (command, target) = match cmd {
        WorkerOpCmd::Drain(o) => (
            Command::DrainWorker {
                id: o.id,
                reason: o.reason.reason,
            },
            o.target,
        ),
        WorkerOpCmd::Undrain(o) => (
            Command::UndrainWorker {
                id: o.id,
                reason: o.reason.reason,
            },
            o.target,
        ),
        WorkerOpCmd::Restore(o) => (
            Command::RestoreWorker {
                id: o.id,
                reason: o.reason.reason,
            },
            o.target,
        ),
    };
    let c = target.client()?;
    report(&c.command(command)?, target.json())
}

/// A corpus that the workers of a local cluster could not read is refused at submission:
/// `default`, or a file, a directory or a glob with at least one match on this machine.
/// (Whether the files are readable and non-empty is the workers' check at start.)
fn check_corpus(corpus: &str) -> Result<()> {
    let c = corpus.trim();
    if matches!(c, "" | "default" | "builtin:default") {
        return Ok(());
    }
    let p = std::path::Path::new(c);
    if p.exists() {
        return Ok(());
    }
    if c.contains(['*', '?', '[']) {
        let matches = glob::glob(c)
            .map_err(|e| anyhow!("corpus `{c}` is not a valid glob: {e}"))?
            .filter_map(|m| m.ok())
            .count();
        if matches > 0 {
            return Ok(());
        }
        bail!("corpus `{c}`: no file matches on this machine (the workers of a local cluster read the same paths; pass --no-corpus-check when the workers see another filesystem)");
    }
    bail!("corpus `{c}`: no such file or directory on this machine (the workers of a local cluster read the same paths; pass --no-corpus-check when the workers see another filesystem)")
}

/// Why a waiting job waits, in the placement policy's words (the same function the
/// leader runs), e.g. "0 placeable workers, job needs at least 1".
fn waiting_reason(j: &JobInfo, workers: &[phalanx_proto::WorkerInfo]) -> String {
    let map = workers.iter().map(|w| (w.id.clone(), w.clone())).collect();
    let (decision, reason) = phalanx_core::policy::place(&j.spec, j.plan.as_ref(), true, &map);
    match decision {
        phalanx_core::PlacementDecision::Wait => reason,
        _ => "enough workers now; the next plan places the job".into(),
    }
}

pub fn checkpoint(cmd: CheckpointCmd) -> Result<()> {
    let CheckpointCmd::List { target } = cmd;
    let c = target.client()?;
    let cps: Vec<CheckpointInfo> = c.get("/v1/checkpoints")?;
    if target.json() {
        return print_json(&cps);
    }
    if cps.is_empty() {
        println!("no checkpoints");
        return Ok(());
    }
    println!(
        "{}",
        table(
            &["JOB", "STEP", "EPOCH", "SHARDS", "BYTES", "DURABLE"],
            &cps.iter()
                .map(|c| vec![
                    c.job.clone(),
                    c.step.to_string(),
                    c.epoch.to_string(),
                    c.shards.len().to_string(),
                    c.shards.iter().map(|s| s.bytes).sum::<u64>().to_string(),
                    if c.durable { "yes".into() } else { "no".into() }
                ])
                .collect::<Vec<_>>(),
        )
    );
    Ok(())
}

pub fn events(cmd: EventsCmd) -> Result<()> {
    let c = cmd.target.client()?;
    let evs: Vec<Event> = c.get(&format!("/v1/events?limit={}", cmd.limit))?;
    if cmd.target.json() {
        return print_json(&evs);
    }
    if evs.is_empty() {
        println!("no events");
        return Ok(());
    }
    println!(
        "{}",
        table(
            &["SEQ", "INDEX", "KIND", "SUBJECT", "REASON"],
            &evs.iter()
                .map(|e| vec![
                    e.seq.to_string(),
                    e.index.to_string(),
                    e.kind.to_string(),
                    e.subject.clone(),
                    e.reason.clone()
                ])
                .collect::<Vec<_>>(),
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throughput_line_shows_tokens_flops_and_mfu_or_says_it_is_unknown() {
        let mut t = phalanx_proto::Throughput {
            step: 60,
            steps: 9,
            tokens_per_s: 10_240,
            flops_per_token: 5_410_816,
            achieved_mflops: 55_407,
            devices: 2,
            peak_mflops_per_device: 100_700,
            peak_source: "measured matmul peak of this CPU".into(),
            mfu_ppm: 275_109,
        };
        assert_eq!(
            throughput_line(&t),
            "throughput: 10240 tokens/s, 0.0554 TFLOP/s at 5.411e6 FLOPs/token (steps 52-60); \
             MFU 27.5% of 2 × 0.1007 TFLOP/s (measured matmul peak of this CPU)"
        );
        t.peak_mflops_per_device = 0;
        assert!(throughput_line(&t).ends_with("; MFU unknown (no peak for the device)"));
    }
}
