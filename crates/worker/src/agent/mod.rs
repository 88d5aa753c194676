//! The worker agent: a long-lived process that joins the cluster through the controller.
//!
//! It registers with its device and listen address, heartbeats (leader-local leases), and
//! polls its assignment. For each plan epoch in which it holds a rank it forms a
//! collective group fenced by a group id derived from `(job, epoch)` — a worker still in
//! an older epoch cannot connect to the new group — agrees on the state with its peers,
//! and trains until the job ends or a newer epoch supersedes this one.
//!
//! State agreement at the start of an epoch ([`crate::state_sync`]): every rank tells the others
//! whether it holds training state, at which step and with which parameter hash. Every
//! rank at the highest step contributes the parameters and optimizer moments of the
//! slices it holds (its own ZeRO-1 shard and its buddy replica), and each rank takes its
//! new slices from them. Only when those do not cover the model, or no rank holds state
//! (every worker is new, or all were restarted), is a checkpoint read from disk: the
//! newest one of this job that the controller's catalog lists and that verifies
//! ([`crate::job_checkpoints`]); a corrupt newest checkpoint falls back to the previous
//! one. Since training is
//! deterministic, a step that was in flight when a peer died is simply redone, and the
//! final parameters are the same bits as a run without faults.
mod background;
mod epoch;
mod reports;

use phalanx_proto::DeviceKind;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_collective::PeerSilent;
use phalanx_controller::client::{new_request_id, Client};
use phalanx_proto::{Assignment, Command, DeviceSpec, JobSpec, JobState};
use phalanx_train::data::default_corpus_spec;
use phalanx_train::engine::{Engine, TrainSpec, DEFAULT_MICRO_BATCH};
use phalanx_train::ModelConfig;
use tracing::{info, warn};

use crate::fault::{Fault, FaultInbox, FaultKind};
use crate::recovery_trace::{quiet, RecoveryTrace};
use crate::silence::SilenceConfig;
use crate::WorkerError;
use background::{silence_after, spawn_heartbeat, spawn_progress, Progress, Shared};
use epoch::run_epoch;
use reports::{
    escalate_stuck_epoch, report_corrupt_replica, report_dead_peers, report_silence,
    report_start_failure, wait_for_newer_epoch, StuckEpoch,
};

pub struct AgentConfig {
    pub id: String,
    pub client: Arc<Client>,
    pub device: phalanx_train::device::DeviceRequest,
    pub torch_device: tch::Device,
    pub listener: TcpListener,
    /// Where the job's checkpoints live (shared by every worker of a local cluster).
    pub checkpoint_root: PathBuf,
    /// Keep this many committed checkpoints.
    pub checkpoint_retain: usize,
    pub heartbeat_interval: Duration,
    pub op_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// Compare parameter hashes across replicas every this many steps (0: never).
    pub sdc_check_interval: u64,
    /// Spot-check gradients by recomputation every this many steps (0: never).
    pub grad_check_interval: u64,
    /// Exit once the job is completed or cancelled.
    pub exit_when_done: bool,
    /// Bound on the agent's whole life (0: unbounded).
    pub lifetime_max: Duration,
    /// Chaos hooks: a JSON-lines file of faults to inject (see [`crate::fault`]). `None` in
    /// production: such a worker has no hook and ignores nothing because it reads nothing.
    pub fault_inbox: Option<PathBuf>,
    /// When a peer counts as silent (see [`crate::silence`]).
    pub silence: SilenceConfig,
    /// The numerics profile this process applied before libtorch started (reported at
    /// registration; placement gives it only jobs of that profile).
    pub numerics: phalanx_proto::NumericsProfile,
    /// The cluster's credentials directory: with it, ring links are mutual TLS with this
    /// worker's certificate (`None`: the epoch secret alone guards them).
    pub tls: Option<phalanx_pki::TlsDir>,
}

/// The training math of a controller-run job: the same defaults as `phalanx train`.
pub fn train_spec(job: &JobSpec) -> Result<TrainSpec, WorkerError> {
    let model = ModelConfig::of(job.model);
    let spec = TrainSpec {
        precision: job.precision,
        ..TrainSpec::with_defaults(
            model,
            job.seed,
            job.steps,
            job.global_batch as usize,
            DEFAULT_MICRO_BATCH,
        )
    };
    spec.validate()?;
    Ok(spec)
}

/// The corpus a job names: `default` (or `builtin:default`) is the default corpus.
pub fn corpus_spec(job: &JobSpec) -> String {
    match job.corpus.trim() {
        "" | "default" | "builtin:default" => default_corpus_spec(),
        other => other.to_string(),
    }
}

pub fn run(cfg: AgentConfig) -> Result<(), WorkerError> {
    let started = Instant::now();
    let client = cfg.client.clone();
    let addr = cfg
        .listener
        .local_addr()
        .map_err(|e| WorkerError::Rendezvous(format!("listener: {e}")))?;
    let ring = crate::rendezvous::ring_credentials(cfg.tls.as_ref(), &cfg.id)?;
    let cpu_vendor = phalanx_train::mfu::cpu_vendor().unwrap_or_default();
    let device = match &cfg.device {
        phalanx_train::device::DeviceRequest::Emulated { spec, memory_bytes } => DeviceSpec {
            kind: DeviceKind::CpuEmulated,
            index: 0,
            memory_bytes: *memory_bytes,
            numerics: cfg.numerics,
            model: spec.name.to_string(),
            cpu_vendor: cpu_vendor.clone(),
        },
        phalanx_train::device::DeviceRequest::Cuda(n) => DeviceSpec {
            kind: DeviceKind::Cuda,
            index: *n as u32,
            memory_bytes: 0,
            numerics: cfg.numerics,
            model: String::new(),
            cpu_vendor,
        },
    };
    let reg = Command::RegisterWorker {
        id: cfg.id.clone(),
        address: addr.to_string(),
        device: device.clone(),
    };
    client
        .command_with_id(new_request_id(&format!("register-{}", cfg.id)), reg)
        .map_err(ctl)?;
    info!(worker = %cfg.id, %addr, "registered");

    let shared = Arc::new(Shared::default());
    let inbox = cfg.fault_inbox.as_ref().map(|p| FaultInbox::new(p.clone()));
    let hb = spawn_heartbeat(
        client.clone(),
        cfg.id.clone(),
        shared.clone(),
        cfg.heartbeat_interval,
        inbox,
    );
    let progress = spawn_progress(client.clone(), cfg.id.clone());

    let mut engine: Option<Slot> = None;
    // When and at which step this worker last completed a step (for the MTTR it reports).
    let mut last_step: Option<(Instant, u64)> = None;
    let mut backoff = Duration::from_millis(100);
    let mut was_partitioned = false;
    let mut stuck = StuckEpoch::default();
    let mut recovery = RecoveryTrace::default();
    let result = loop {
        if cfg.lifetime_max > Duration::ZERO && started.elapsed() > cfg.lifetime_max {
            break Err(WorkerError::Protocol(format!(
                "lifetime bound of {} s reached",
                cfg.lifetime_max.as_secs()
            )));
        }
        if shared.partitioned() {
            std::thread::sleep(cfg.heartbeat_interval);
            was_partitioned = true;
            continue;
        }
        if std::mem::take(&mut was_partitioned) {
            // The partition healed: the leader has failed us meanwhile; join again.
            let reg = Command::RegisterWorker {
                id: cfg.id.clone(),
                address: addr.to_string(),
                device: device.clone(),
            };
            if let Err(e) =
                client.command_with_id(new_request_id(&format!("reregister-{}", cfg.id)), reg)
            {
                warn!(error = %e, "re-registering after the partition failed");
                was_partitioned = true;
                continue;
            }
            info!(worker = %cfg.id, "partition healed; registered again");
        }
        let polled = quiet("assignment")
            .in_scope(|| client.get::<Assignment>(&format!("/v1/assignment/{}", cfg.id)));
        let a: Assignment = match polled {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "assignment poll failed");
                std::thread::sleep(backoff);
                continue;
            }
        };
        shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
        match a.job_state {
            Some(JobState::Completed | JobState::Cancelled | JobState::Failed)
                if cfg.exit_when_done =>
            {
                break Ok(())
            }
            _ => {}
        }
        let (Some(rank), Some(job), Some(JobState::Running)) = (a.rank, a.job.clone(), a.job_state)
        else {
            std::thread::sleep(cfg.heartbeat_interval);
            continue;
        };
        let step_before = last_step.map(|(_, s)| s);
        let outcome = run_epoch(
            &cfg,
            ring.as_ref(),
            &a,
            rank as usize,
            &job,
            &mut engine,
            &shared,
            &progress,
            &mut last_step,
            &mut recovery,
        );
        // Whatever broke while a newer plan existed was that plan's doing: not a fault to
        // report, nor an attempt of this epoch that failed.
        let outcome = match outcome {
            Err(e)
                if !matches!(e, WorkerError::Superseded { .. })
                    && shared.epoch.load(Ordering::SeqCst) > a.epoch =>
            {
                info!(epoch = a.epoch, error = %e, "epoch superseded while it ran");
                Err(WorkerError::Superseded { epoch: a.epoch })
            }
            other => other,
        };
        match outcome {
            Ok(()) => {
                shared.take_silence(a.epoch);
                backoff = Duration::from_millis(100)
            }
            Err(WorkerError::Superseded { .. }) => {
                recovery.ended(shared.take_silence(a.epoch));
                backoff = Duration::from_millis(100)
            }
            Err(e) => {
                // The detection (a root span, unless this worker reported a silent peer of
                // the epoch already) and the reports under it: the controller's decision
                // and the plan it makes join this trace, and so does a silence reported
                // below.
                let (detection, report) = recovery.detected(
                    &cfg.id,
                    a.epoch,
                    &e.to_string(),
                    last_step.map(|(t, _)| t),
                    shared.take_silence(a.epoch),
                );
                shared.reporting_in(a.epoch, detection);
                let reporting = report.enter();
                let progressed = last_step.map(|(_, s)| s) != step_before;
                if let Some(report) = stuck.failed(a.epoch, progressed, rank as usize, &e) {
                    escalate_stuck_epoch(&client, &cfg.id, &job, report);
                }
                warn!(epoch = a.epoch, error = %e, "epoch ended with an error; waiting for the next plan");
                match &e {
                    WorkerError::Quarantined(_) => {}
                    // Nobody can tell which replica is right: every rank drops its state, so
                    // the group restarts from the newest valid checkpoint and redoes the steps.
                    WorkerError::NoMajority { .. } => engine = None,
                    WorkerError::Diverged {
                        rank: odd,
                        ours,
                        theirs,
                    } => {
                        let reason = format!(
                            "silent data corruption: rank {odd}'s parameters hash to {}…, the other replicas to {}…",
                            &theirs[..theirs.len().min(12)],
                            &ours[..ours.len().min(12)]
                        );
                        report_corrupt_replica(&client, &cfg.id, &a, *odd, reason);
                    }
                    WorkerError::GradientCorrupt {
                        rank: odd,
                        micro,
                        step,
                    } => {
                        let reason = format!(
                            "silent data corruption: rank {odd}'s gradient of micro-batch {micro} at step {step} disagrees with two recomputations by other ranks"
                        );
                        report_corrupt_replica(&client, &cfg.id, &a, *odd, reason);
                    }
                    _ if shared.partitioned() => {}
                    _ => {
                        let refused = report_dead_peers(&client, &cfg.id, &a, rank as usize);
                        // The peer the error blames is alive enough to hold its port open
                        // (hung, cut off, or just slow): a silence report, which the
                        // controller confirms against that peer's heartbeats.
                        let blamed = match &e {
                            WorkerError::Collective(c) => c.peer_rank(),
                            _ => None,
                        };
                        if let Some(peer) =
                            blamed.filter(|p| *p != rank as usize && !refused.contains(p))
                        {
                            if let Some(addr) = a.peers.get(peer).and_then(|p| p.parse().ok()) {
                                let p = PeerSilent {
                                    peer_rank: peer,
                                    peer_addr: addr,
                                    silent_ms: 0,
                                    inbound: true,
                                };
                                report_silence(&client, &cfg.id, &shared, a.epoch, &p);
                            }
                        }
                    }
                }
                drop(reporting);
                drop(report);
                shared.take_silence(a.epoch);
                recovery.ended(None);
                wait_for_newer_epoch(&client, &cfg.id, &shared, a.epoch, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    shared.stop.store(true, Ordering::SeqCst);
    drop(progress);
    let _ = hb.join();
    result
}

/// Acts on an injected fault at a step boundary.
fn inject(cfg: &AgentConfig, engine: &mut Engine, f: &Fault) -> Result<(), WorkerError> {
    match f.kind {
        FaultKind::Crash => {
            // A software bug: the process dies with a non-zero status.
            eprintln!("injected fault: crash at step {}", engine.step());
            std::process::exit(3);
        }
        FaultKind::Ecc => {
            let reason = format!(
                "uncorrectable memory (ECC) error reported by the device at step {}",
                engine.step()
            );
            let cmd = Command::SetWorkerHealth {
                id: cfg.id.clone(),
                health: phalanx_proto::WorkerHealth::Quarantined,
                reason: reason.clone(),
                address: None,
            };
            cfg.client
                .command_with_id(new_request_id(&format!("ecc-{}", cfg.id)), cmd)
                .map_err(ctl)?;
            Err(WorkerError::Quarantined(reason))
        }
        FaultKind::Sdc => {
            // Silent data corruption: one bit of one parameter flips on this replica only.
            let i = (f.seq as usize).wrapping_mul(7919) % engine.params.len();
            let p = engine.params_mut();
            p[i] = f32::from_bits(p[i].to_bits() ^ (1 << 22));
            engine.sync_model()?;
            Ok(())
        }
        // Acted on elsewhere: by the heartbeat thread, or by the step loop (SdcGrad).
        FaultKind::Slow
        | FaultKind::DiskFull
        | FaultKind::Partition
        | FaultKind::SdcGrad
        | FaultKind::Heal => Ok(()),
    }
}

fn ctl(e: phalanx_controller::client::ClientError) -> WorkerError {
    WorkerError::Controller(e.to_string())
}

/// Wall clock in ms since the Unix epoch (for reports only; never for training math).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The worker's training state for one job.
struct Slot {
    /// The job's id: two jobs with the same spec in a row are still two jobs.
    job_id: String,
    job: JobSpec,
    engine: Engine,
    /// The engine holds a state agreed with a group (not just the freshly built one).
    agreed: bool,
    /// One device's peak for the job's MFU, found the first time this worker is rank 0
    /// (`Some(None)`: unknown).
    peak: Option<Option<phalanx_train::mfu::Peak>>,
}

/// The group of `(job id, epoch)`: two jobs of the same name (whose epochs both count
/// from 1) never share one.
fn group_id(job: &JobSpec, job_id: &str, epoch: u64) -> u64 {
    phalanx_train::sampler::hash4(
        job.seed,
        epoch,
        job.steps,
        job_id
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_and_the_data_plane_agree_on_models_and_micro_batch() {
        assert_eq!(
            phalanx_core::jobfile::MICRO_BATCH as usize,
            DEFAULT_MICRO_BATCH
        );
        // The template `phalanx job init` writes is a job the workers can run.
        let spec =
            phalanx_core::parse_job_toml(&phalanx_core::job_template("tiny", 60).unwrap()).unwrap();
        train_spec(&spec).unwrap();
        assert_eq!(
            corpus_spec(&spec),
            phalanx_train::data::default_corpus_spec()
        );
    }
}
