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
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use phalanx_checkpoint as ckpt;
use phalanx_collective::{BlockingGroup, Cancel, GroupConfig, PeerSilent, SilenceWatch};
use phalanx_controller::client::{new_request_id, Client};
use phalanx_proto::{
    Assignment, Command, DeviceSpec, HeartbeatRequest, JobSpec, JobState, SilentPeer,
};
use phalanx_train::data::{default_corpus_spec, Corpus};
use phalanx_train::engine::{Engine, TrainSpec, DEFAULT_MICRO_BATCH};
use phalanx_train::ModelConfig;
use tracing::{info, warn};

use crate::dp::{check_replicas, validation_loss, Stepper};
use crate::fault::{Fault, FaultInbox, FaultKind};
use crate::job_checkpoints::{
    job_catalog, job_checkpoint_dir, report_refused, CheckpointSource, Checkpointing, Expected,
};
use crate::recovery_trace::{quiet, RecoveryTrace};
use crate::silence::{SilenceConfig, StepTimes};
use crate::state_sync::sync_state;
use crate::WorkerError;

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
    let model = ModelConfig::named(&job.model)?;
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

/// What the background threads share with the training loop.
#[derive(Default)]
struct Shared {
    /// Newest plan epoch seen.
    epoch: AtomicU64,
    stop: AtomicBool,
    /// Injected faults not yet acted on by the training loop.
    faults: std::sync::Mutex<Vec<Fault>>,
    /// An injected slowdown: (factor, until).
    slow: std::sync::Mutex<Option<(f64, Instant)>>,
    /// Recent compute times per micro-batch; their median is sent with heartbeats.
    compute: std::sync::Mutex<crate::dp::ComputeWindow>,
    disk: ckpt::FaultInjector,
    /// An injected network partition lasts until this instant.
    partitioned_until: std::sync::Mutex<Option<Instant>>,
    /// The newest completed step plus one (0: none yet): the heartbeat's progress counter.
    step: AtomicU64,
    /// The group's recent step times (they set the silence threshold; kept across epochs).
    step_times: std::sync::Mutex<StepTimes>,
    /// A peer this worker waits on and hears nothing from, and since when it is known.
    silent: std::sync::Mutex<Option<(SilentPeer, Instant)>>,
    /// A silence report is being sent (and the assignment watched closely).
    reporting: AtomicBool,
}

impl Shared {
    /// The heartbeat: progress counter, compute time and any silent peer (a report stays
    /// in the heartbeats for a second after it was made).
    fn heartbeat(&self, id: &str) -> HeartbeatRequest {
        let compute_ms = self
            .compute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .median();
        let step = self.step.load(Ordering::SeqCst).checked_sub(1);
        let silent_peer = self
            .silent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(1))
            .map(|(sp, _)| sp);
        HeartbeatRequest {
            worker: id.to_string(),
            compute_ms,
            step,
            silent_peer,
        }
    }

    fn partitioned(&self) -> bool {
        self.partitioned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
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
    let device = match &cfg.device {
        phalanx_train::device::DeviceRequest::Emulated { spec, memory_bytes } => DeviceSpec {
            kind: "cpu-emulated".into(),
            index: 0,
            memory_bytes: *memory_bytes,
            numerics: cfg.numerics,
            model: spec.name.to_string(),
        },
        phalanx_train::device::DeviceRequest::Cuda(n) => DeviceSpec {
            kind: "cuda".into(),
            index: *n as u32,
            memory_bytes: 0,
            numerics: cfg.numerics,
            model: String::new(),
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
            Ok(()) => backoff = Duration::from_millis(100),
            Err(WorkerError::Superseded { .. }) => {
                recovery.ended();
                backoff = Duration::from_millis(100)
            }
            Err(e) => {
                // The detection (a root span) and the reports under it: the controller's
                // decision and the plan it makes join this trace.
                let report =
                    recovery.detected(&cfg.id, a.epoch, &e.to_string(), last_step.map(|(t, _)| t));
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
                recovery.ended();
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

/// Failed attempts of one epoch in a row with no step committed; after
/// [`STUCK_ATTEMPTS`] of them the worker asks the controller for a new epoch.
pub const STUCK_ATTEMPTS: u32 = 3;

#[derive(Default)]
struct StuckEpoch {
    epoch: u64,
    attempts: u32,
}

/// What a worker tells the controller about an epoch that does not converge.
struct StuckReport {
    epoch: u64,
    attempts: u32,
    blamed_rank: Option<u32>,
    reason: String,
}

impl StuckEpoch {
    /// Counts a failed attempt of `epoch`; returns the report to send once the epoch has
    /// failed [`STUCK_ATTEMPTS`] times in a row without a step (then counts afresh).
    fn failed(
        &mut self,
        epoch: u64,
        progressed: bool,
        my_rank: usize,
        e: &WorkerError,
    ) -> Option<StuckReport> {
        if epoch != self.epoch || progressed {
            *self = StuckEpoch { epoch, attempts: 0 };
        }
        self.attempts += 1;
        if self.attempts < STUCK_ATTEMPTS {
            return None;
        }
        let attempts = std::mem::take(&mut self.attempts);
        let blamed_rank = match e {
            WorkerError::Collective(c) => c.peer_rank().filter(|r| *r != my_rank),
            _ => None,
        }
        .map(|r| r as u32);
        let mut reason = e.to_string();
        if reason.len() > 400 {
            let mut cut = 400;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Some(StuckReport {
            epoch,
            attempts,
            blamed_rank,
            reason,
        })
    }
}

fn escalate_stuck_epoch(client: &Client, me: &str, job: &JobSpec, r: StuckReport) {
    warn!(epoch = r.epoch, attempts = r.attempts, reason = %r.reason, "epoch does not converge; asking for a new one");
    let cmd = Command::ReportEpochStuck {
        worker: me.to_string(),
        epoch: r.epoch,
        attempts: r.attempts,
        blamed_rank: r.blamed_rank,
        reason: r.reason,
    };
    let id = new_request_id(&format!("stuck-{}-{}-{me}", job.name, r.epoch));
    match client.command_with_id(id, cmd) {
        Ok(out) if !out.outcome.is_applied() => {
            info!(outcome = %out.outcome.message(), "stuck-epoch report not applied")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "reporting the stuck epoch failed"),
    }
}

/// Silent data corruption found by the replica check: quarantine the odd one out. The
/// lowest rank that is not the odd one reports, so the report is made once.
fn report_corrupt_replica(client: &Client, me: &str, a: &Assignment, odd: usize, reason: String) {
    let Ok(Some(job)) = client.get::<Option<phalanx_proto::JobInfo>>("/v1/job") else {
        return;
    };
    let Some(plan) = job.plan.filter(|p| p.epoch == a.epoch) else {
        return;
    };
    let reporter = if odd == 0 { 1 } else { 0 };
    if plan.ranks.get(reporter).map(String::as_str) != Some(me) {
        return;
    }
    let Some(id) = plan.ranks.get(odd) else {
        return;
    };
    warn!(worker = %id, %reason, "quarantining a corrupt replica");
    let addr = a.peers.get(odd).cloned();
    let cmd = Command::SetWorkerHealth {
        id: id.clone(),
        health: phalanx_proto::WorkerHealth::Quarantined,
        reason,
        address: addr,
    };
    let _ = client.command_with_id(new_request_id(&format!("sdc-{id}-{}", a.epoch)), cmd);
}

/// After a collective failed, tells the controller which peers are certainly dead: their
/// listener refuses connections (the process is gone). A stopped (hung) process still has
/// its socket open; the leader's lease catches that case.
/// Returns the ranks found dead.
fn report_dead_peers(client: &Client, me: &str, a: &Assignment, my_rank: usize) -> Vec<usize> {
    let mut dead = Vec::new();
    let Ok(Some(job)) = client.get::<Option<phalanx_proto::JobInfo>>("/v1/job") else {
        return dead;
    };
    let Some(plan) = job.plan.filter(|p| p.epoch == a.epoch) else {
        return dead;
    };
    for (rank, addr) in a.peers.iter().enumerate() {
        if rank == my_rank {
            continue;
        }
        let Ok(sa) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let refused = matches!(
            std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
        if !refused {
            continue;
        }
        dead.push(rank);
        let Some(id) = plan.ranks.get(rank) else {
            continue;
        };
        let reason = format!(
            "rank {rank} lost in epoch {}: connection refused at {addr} (reported by {me})",
            a.epoch
        );
        warn!(worker = %id, %reason, "reporting a dead peer");
        let cmd = Command::SetWorkerHealth {
            id: id.clone(),
            health: phalanx_proto::WorkerHealth::Failed,
            reason,
            address: Some(addr.clone()),
        };
        let _ = client.command_with_id(new_request_id(&format!("dead-{id}-{}", a.epoch)), cmd);
    }
    dead
}

fn ctl(e: phalanx_controller::client::ClientError) -> WorkerError {
    WorkerError::Controller(e.to_string())
}

/// Tells the controller that this worker could not start its rank of `job_id`.
fn report_start_failure(cfg: &AgentConfig, job_id: &str, epoch: u64, e: &WorkerError) {
    let cmd = Command::ReportStartFailure {
        worker: cfg.id.clone(),
        job: job_id.to_string(),
        epoch,
        reason: e.to_string(),
    };
    warn!(job = job_id, epoch, error = %e, "the job cannot start on this worker");
    if let Err(e) = cfg.client.command(cmd) {
        warn!(error = %e, "reporting the start failure failed");
    }
}

/// How long a lasting fault injected without a duration lasts: until healed, in practice.
const UNTIL_HEALED: Duration = Duration::from_secs(365 * 24 * 3600);

fn spawn_heartbeat(
    client: Arc<Client>,
    id: String,
    shared: Arc<Shared>,
    every: Duration,
    mut inbox: Option<FaultInbox>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !shared.stop.load(Ordering::SeqCst) {
            // The inbox is read even while cut off: a `heal` ends a partition early.
            if let Some(inbox) = inbox.as_mut() {
                for f in inbox.poll() {
                    warn!(worker = %id, fault = %f.kind, "fault injected");
                    // A lasting fault with no duration lasts until `phalanx fault heal`.
                    let lasts = if f.for_ms == 0 {
                        UNTIL_HEALED
                    } else {
                        f.duration()
                    };
                    match f.kind {
                        // Acted on at once, off the training thread.
                        FaultKind::DiskFull => shared.disk.disk_full_for(lasts),
                        FaultKind::Partition => {
                            *shared
                                .partitioned_until
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + lasts)
                        }
                        FaultKind::Slow => {
                            *shared.slow.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((f.factor.max(1.0), Instant::now() + lasts))
                        }
                        FaultKind::Heal => {
                            shared.disk.clear();
                            *shared
                                .partitioned_until
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) = None;
                            *shared.slow.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            info!(worker = %id, "healed: slow, disk-full and partition lifted");
                        }
                        _ => shared
                            .faults
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(f),
                    }
                }
            }
            if shared.partitioned() {
                // Cut off: nothing reaches the controllers.
                std::thread::sleep(every);
                continue;
            }
            let tick = Instant::now();
            let body = shared.heartbeat(&id);
            let polled = quiet("heartbeat").in_scope(|| {
                if let Err(e) = client.post::<serde_json::Value>("/v1/heartbeat", &body) {
                    warn!(error = %e, "heartbeat failed");
                }
                client.get::<Assignment>(&format!("/v1/assignment/{id}"))
            });
            if let Ok(a) = polled {
                shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
            }
            // One heartbeat per interval, however long the requests took (on a loaded
            // host a late heartbeat raises the leader's bar for calling this one silent).
            std::thread::sleep(every.saturating_sub(tick.elapsed()));
        }
    })
}

/// A peer of `epoch` is silent: remember it for the heartbeats, send one at once, and
/// watch the assignment every 50 ms for 3 s so that the controller's new plan (if it
/// confirms the report) cancels the blocked operation at once.
fn report_silence(
    client: &Arc<Client>,
    id: &str,
    shared: &Arc<Shared>,
    epoch: u64,
    p: &PeerSilent,
) {
    let sp = SilentPeer {
        epoch,
        rank: p.peer_rank as u32,
        silent_ms: p.silent_ms,
    };
    warn!(epoch, peer_rank = p.peer_rank, peer = %p.peer_addr, silent_ms = p.silent_ms, inbound = p.inbound, "peer silent; reporting it");
    *shared.silent.lock().unwrap_or_else(|e| e.into_inner()) = Some((sp, Instant::now()));
    if shared.reporting.swap(true, Ordering::SeqCst) {
        return;
    }
    let (client, id, shared) = (client.clone(), id.to_string(), shared.clone());
    std::thread::spawn(move || {
        if let Err(e) = client.post::<serde_json::Value>("/v1/heartbeat", &shared.heartbeat(&id)) {
            warn!(error = %e, "sending the silence report failed");
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && shared.epoch.load(Ordering::SeqCst) <= epoch {
            let polled = quiet("assignment")
                .in_scope(|| client.get::<Assignment>(&format!("/v1/assignment/{id}")));
            if let Ok(a) = polled {
                shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        shared.reporting.store(false, Ordering::SeqCst);
    });
}

/// The pause after an epoch failed: `backoff`, or less when the controller has already
/// made a newer plan (the reports just sent usually make it at once): the assignment is
/// polled every 20 ms meanwhile, and a newer epoch, seen there or by the heartbeats, ends
/// the wait. Without a newer plan the full back-off keeps a failing epoch from being
/// retried in a tight loop.
fn wait_for_newer_epoch(client: &Client, id: &str, shared: &Shared, epoch: u64, backoff: Duration) {
    let until = Instant::now() + backoff;
    loop {
        if shared.epoch.load(Ordering::SeqCst) > epoch {
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
        let polled = quiet("assignment")
            .in_scope(|| client.get::<Assignment>(&format!("/v1/assignment/{id}")));
        if let Ok(a) = polled {
            shared.epoch.fetch_max(a.epoch, Ordering::SeqCst);
        }
    }
}

/// The silence threshold for the group's recent step times.
fn silence_after(cfg: &AgentConfig, shared: &Shared) -> Duration {
    cfg.silence.threshold(
        &shared.step_times.lock().unwrap_or_else(|p| p.into_inner()),
        cfg.op_timeout,
    )
}

/// A progress report: the epoch, the number of steps done and, after a step, its loss
/// and this rank's compute time per micro-batch (both for the dashboard's history); on
/// rank 0, now and then, the job's throughput and MFU.
#[derive(Clone)]
struct Progress {
    epoch: u64,
    step: u64,
    loss_millionths: Option<u64>,
    compute_us: Option<u64>,
    throughput: Option<phalanx_proto::Throughput>,
}

impl Progress {
    fn at(epoch: u64, step: u64) -> Self {
        Progress {
            epoch,
            step,
            loss_millionths: None,
            compute_us: None,
            throughput: None,
        }
    }
}

/// Reports progress off the training thread; only the newest step per epoch is sent.
fn spawn_progress(client: Arc<Client>, id: String) -> mpsc::Sender<Progress> {
    let (tx, rx) = mpsc::channel::<Progress>();
    std::thread::spawn(move || {
        while let Ok(mut latest) = rx.recv() {
            while let Ok(newer) = rx.try_recv() {
                // A throughput report rides on the newest progress of its epoch.
                let older = std::mem::replace(&mut latest, newer);
                if latest.throughput.is_none() && latest.epoch == older.epoch {
                    latest.throughput = older.throughput;
                }
            }
            let Progress {
                epoch,
                step,
                loss_millionths,
                compute_us,
                throughput,
            } = latest;
            let cmd = Command::ReportProgress {
                worker: id.clone(),
                epoch,
                step,
                loss_millionths,
                compute_us,
                throughput,
            };
            let sent = quiet("progress").in_scope(|| {
                client.command_with_id(
                    new_request_id(&format!("progress-{id}-{epoch}-{step}")),
                    cmd,
                )
            });
            if let Err(e) = sent {
                warn!(error = %e, epoch, step, "progress report failed");
            }
        }
    });
    tx
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

#[allow(clippy::too_many_arguments)]
fn run_epoch(
    cfg: &AgentConfig,
    ring: Option<&Arc<phalanx_collective::RingCredentials>>,
    a: &Assignment,
    rank: usize,
    job: &JobSpec,
    engine_slot: &mut Option<Slot>,
    shared: &Arc<Shared>,
    progress: &mpsc::Sender<Progress>,
    last_step: &mut Option<(Instant, u64)>,
    recovery: &mut RecoveryTrace,
) -> Result<(), WorkerError> {
    let mut phases = recovery.epoch(a.trace.as_ref(), a.epoch, rank);
    let world = a.world_size as usize;
    let peers: Vec<SocketAddr> = a
        .peers
        .iter()
        .map(|p| {
            p.parse()
                .map_err(|e| WorkerError::Protocol(format!("peer address `{p}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    crate::rendezvous::validate_peers(&peers, rank, world, None)?;
    let job_id = a
        .job_id
        .clone()
        .ok_or_else(|| WorkerError::Protocol("the assignment names no job id".into()))?;
    let job_dir = job_checkpoint_dir(&cfg.checkpoint_root, &job_id)?;

    // A new job (or none yet): build its engine. Its state counts as "none" until trained.
    if engine_slot
        .as_ref()
        .map(|sl| sl.job_id != job_id || sl.job != *job)
        .unwrap_or(true)
    {
        let built = (|| -> Result<Engine, WorkerError> {
            let spec = train_spec(job)?;
            let corpus = Corpus::load(&corpus_spec(job))?;
            let (train, val) = corpus.split(spec.val_fraction, spec.model.ctx_len)?;
            Ok(Engine::new(spec, train, val, cfg.torch_device)?)
        })();
        let engine = match built {
            Ok(e) => e,
            Err(e) => {
                // The job cannot start here: the controller hears why (an event; the job
                // fails after a bounded number of such reports), not just this log.
                report_start_failure(cfg, &job_id, a.epoch, &e);
                return Err(e);
            }
        };
        *engine_slot = Some(Slot {
            job_id: job_id.clone(),
            job: job.clone(),
            engine,
            agreed: false,
            peak: None,
        });
    }
    let slot = engine_slot.as_mut().expect("engine built above");
    if rank == 0 && slot.peak.is_none() {
        // Before the rendezvous: on a machine that has not cached it, the CPU's peak is a
        // short microbenchmark on this thread.
        let precision = slot.engine.spec.precision;
        slot.peak = Some(
            phalanx_train::mfu::device_peak(&cfg.device, precision)
                .map_err(|e| warn!(error = %e, "no MFU: the device's peak is unknown"))
                .ok(),
        );
    }
    let peak = slot.peak.clone().flatten();
    let engine = &mut slot.engine;
    let listener = cfg
        .listener
        .try_clone()
        .map_err(|e| WorkerError::Rendezvous(format!("listener: {e}")))?;
    let mut gc = GroupConfig::new(rank, peers);
    gc.group_id = group_id(job, &job_id, a.epoch);
    gc.rendezvous_timeout = cfg.rendezvous_timeout;
    gc.op_timeout = cfg.op_timeout;
    gc.security = Some(crate::rendezvous::epoch_security(a, ring)?);
    // A rank waiting on a dead or hung peer leaves as soon as the controller has moved on.
    let cancel = {
        let (shared, epoch) = (shared.clone(), a.epoch);
        Cancel::new(move || {
            let newest = shared.epoch.load(Ordering::SeqCst);
            if newest > epoch {
                Some(format!("epoch {epoch} superseded by epoch {newest}"))
            } else if shared.partitioned() {
                Some("cut off by a network partition".into())
            } else {
                None
            }
        })
    };
    // A peer that makes no progress is reported at once (see crate::silence): in the
    // rendezvous and in training steps at the step-based threshold; in the state agreement
    // and the final flush, whose legitimate work (reading or writing a checkpoint) is not
    // measured by steps, only at the operation timeout.
    let silence = {
        let (client, id, sh, epoch) = (cfg.client.clone(), cfg.id.clone(), shared.clone(), a.epoch);
        SilenceWatch::new(silence_after(cfg, shared), move |p| {
            report_silence(&client, &id, &sh, epoch, p)
        })
    };
    phases.plan_received();
    let connected = BlockingGroup::connect_with(gc, listener, Some(cancel), Some(silence));
    phases.rendezvous_done(connected.is_ok());
    let mut group = connected?;
    group.set_silence_after(cfg.op_timeout);
    info!(epoch = a.epoch, rank, world, "group formed");
    crate::metrics::plan_epoch(a.epoch);

    // Only a state this worker agreed on with a group (and trained or loaded since) counts;
    // an engine that was merely built holds the seed's initial state, which counts as none,
    // so that if nobody holds state the newest checkpoint wins over step 0.
    let source = sync_state(
        engine,
        &mut group,
        slot.agreed,
        &CheckpointSource {
            dir: job_dir.clone(),
            expect: Expected {
                job_id: job_id.clone(),
                model: job.model.clone(),
                seed: job.seed,
                numerics: job.numerics.to_string(),
            },
            catalog: &|| job_catalog(&cfg.client, &job_id),
            refused: &|step, reason| report_refused(&cfg.client, &cfg.id, &job_id, step, reason),
        },
        cfg.op_timeout,
    );
    phases.state_agreed(source.as_deref().map_err(|e| e.to_string()));
    let source = source?;
    slot.agreed = true;
    let resume_step = engine.step();
    // Where the epoch resumed is reported after its first step, by every rank that trained
    // before (it can time the interruption) or by rank 0; the first report is kept.
    let mut resume_report = (last_step.is_some() || rank == 0).then_some(source);
    let interrupted_at = *last_step;
    let epoch_began_ms = unix_ms();
    // Training from here: a peer silent for the step-based threshold is reported.
    group.set_silence_after(silence_after(cfg, shared));
    let mut stepper = Stepper::new(engine, &group, &a.micro_shares, cfg.op_timeout)?;
    stepper.grad_check_every = cfg.grad_check_interval;
    let mut writer = Checkpointing::new(job, &job_id, job_dir, world, rank, &shared.disk)?;
    // The step of the last snapshot this epoch took.
    let mut snapped: Option<u64> = None;
    let _ = progress.send(Progress::at(a.epoch, engine.step()));
    // Rank 0 reports the job's throughput and MFU with its progress.
    let mut rate = phalanx_train::mfu::StepRate::new(Duration::from_secs(1));

    while engine.step() < engine.spec.steps {
        if shared.epoch.load(Ordering::SeqCst) > a.epoch {
            return Err(WorkerError::Superseded { epoch: a.epoch });
        }
        if shared.partitioned() {
            return Err(WorkerError::Rendezvous(
                "cut off by a network partition".into(),
            ));
        }
        let pending: Vec<Fault> =
            std::mem::take(&mut *shared.faults.lock().unwrap_or_else(|p| p.into_inner()));
        for f in pending {
            if f.kind == FaultKind::SdcGrad {
                stepper.corrupt_next_checked_grad = true;
            } else {
                inject(cfg, engine, &f)?;
            }
        }
        if cfg.sdc_check_interval > 0 && engine.step() % cfg.sdc_check_interval == 0 {
            check_replicas(engine, &mut group, cfg.op_timeout)?;
        }
        let slow = *shared.slow.lock().unwrap_or_else(|p| p.into_inner());
        stepper.slow_factor = match slow {
            Some((factor, until)) if Instant::now() < until => factor,
            _ => 1.0,
        };
        let report = match stepper.step_with(engine, &mut group, &mut || writer.snaps.release()) {
            Ok(r) => r,
            Err(WorkerError::GradientMismatch {
                step,
                micro,
                owner,
                verifier,
            }) => {
                // Nothing was applied; every rank saw the same check and redoes the step.
                warn!(
                    step,
                    micro, owner, verifier, "gradient check failed; redoing the step"
                );
                let cmd = Command::ReportGradientMismatch {
                    worker: cfg.id.clone(),
                    epoch: a.epoch,
                    step,
                    micro: micro as u64,
                    owner_rank: owner as u32,
                    verifier_rank: verifier as u32,
                };
                let id = format!("gradcheck-{}-{}-{step}", job.name, a.epoch);
                if let Err(e) = cfg.client.command_with_id(id, cmd) {
                    warn!(error = %e, "reporting the gradient mismatch failed");
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        // The resume point first: its steps redone are counted against the watermark
        // before this epoch's own progress moves it.
        let resume_span = phases.first_step(report.step + 1);
        if let Some(source) = resume_report.take() {
            let _in_trace = resume_span.as_ref().map(|s| s.enter());
            let cmd = Command::ReportResume {
                worker: cfg.id.clone(),
                epoch: a.epoch,
                step: resume_step,
                source,
                steps_redone: interrupted_at
                    .map(|(_, s)| s.saturating_sub(resume_step))
                    .unwrap_or(0),
                mttr_ms: interrupted_at.map(|(t, _)| t.elapsed().as_millis() as u64),
                at_ms: Some(epoch_began_ms),
            };
            if let Err(e) = cfg
                .client
                .command_with_id(format!("resume-{}-{}-{}", job.name, a.epoch, cfg.id), cmd)
            {
                warn!(error = %e, "reporting the resume point failed");
            }
        }
        let throughput = (rank == 0)
            .then(|| {
                let (model, tokens) = (&engine.spec.model, engine.spec.tokens_per_step());
                rate.on_step(
                    Instant::now(),
                    report.step + 1,
                    model,
                    tokens,
                    world,
                    peak.as_ref(),
                )
            })
            .flatten();
        let _ = progress.send(Progress {
            throughput,
            loss_millionths: phalanx_core::history::loss_millionths(report.loss),
            // The window's median, as the heartbeats (and the straggler policy) see it.
            compute_us: shared
                .compute
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .median()
                .map(|ms| (ms * 1e3).round() as u64),
            ..Progress::at(a.epoch, report.step + 1)
        });
        crate::metrics::step(&report, engine.spec.tokens_per_step());
        *last_step = Some((Instant::now(), report.step + 1));
        shared.step.store(report.step + 2, Ordering::SeqCst);
        *shared.silent.lock().unwrap_or_else(|p| p.into_inner()) = None;
        shared
            .step_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(report.step_ms);
        group.set_silence_after(silence_after(cfg, shared));
        shared
            .compute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(report.compute_ms);
        if rank == 0 {
            info!(
                epoch = a.epoch,
                step = report.step + 1,
                loss = report.loss,
                ms = report.step_ms,
                "step"
            );
        }
        if job.checkpoint_interval_steps > 0 && engine.step() % job.checkpoint_interval_steps == 0 {
            writer.snapshot(engine);
            snapped = Some(engine.step());
        }
        writer.commit_ready(engine, &mut group, a.epoch, cfg)?;
    }
    // The trained model is never lost: the final step is always checkpointed, and the
    // result (which completes the job) waits until the controller has committed it. The
    // assignment's resume step is the job's newest committed checkpoint.
    let last = engine.spec.steps;
    let final_step = (a.resume_step < last).then_some(last);
    if final_step.is_some() && snapped != Some(last) {
        writer.take_final(engine);
    }
    group.set_silence_after(cfg.op_timeout);
    writer.flush(engine, &mut group, a.epoch, cfg, final_step)?;
    let val = validation_loss(engine, &mut group, cfg.op_timeout)?;
    let sha = check_replicas(engine, &mut group, cfg.op_timeout)?;
    info!(epoch = a.epoch, rank, val_loss = val, params_sha256 = %sha, "job finished");
    if rank == 0 {
        let cmd = Command::ReportResult {
            worker: cfg.id.clone(),
            epoch: a.epoch,
            params_sha256: sha.clone(),
            finished_at_ms: Some(unix_ms()),
        };
        if let Err(e) = cfg.client.command(cmd) {
            warn!(error = %e, "reporting the result failed");
        }
    }
    let _ = progress.send(Progress::at(a.epoch, engine.step()));
    // Wait for the controller to see the end, so that we do not retrain a finished job.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let polled = quiet("assignment").in_scope(|| {
            cfg.client
                .get::<Assignment>(&format!("/v1/assignment/{}", cfg.id))
        });
        match polled {
            Ok(now) if now.job_state != Some(JobState::Running) || now.epoch != a.epoch => {
                return Ok(())
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_and_the_data_plane_agree_on_models_and_micro_batch() {
        assert_eq!(
            phalanx_core::jobfile::MODELS,
            phalanx_train::config::MODEL_NAMES
        );
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
