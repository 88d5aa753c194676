//! The worker's background threads and what they share with the training loop: the
//! heartbeat (which also reads the fault inbox and watches the assignment) and the
//! progress reports.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use phalanx_checkpoint as ckpt;
use phalanx_controller::client::{new_request_id, Client};
use phalanx_proto::{Assignment, Command, HeartbeatRequest, SilentPeer, TraceParent};
use tracing::{info, warn};

use super::AgentConfig;
use crate::fault::{Fault, FaultInbox, FaultKind};
use crate::recovery_trace::{quiet, SilenceTrace};
use crate::silence::StepTimes;

/// What the background threads share with the training loop.
#[derive(Default)]
pub(super) struct Shared {
    /// Newest plan epoch seen.
    pub(super) epoch: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Injected faults not yet acted on by the training loop.
    pub(super) faults: std::sync::Mutex<Vec<Fault>>,
    /// An injected slowdown: (factor, until).
    pub(super) slow: std::sync::Mutex<Option<(f64, Instant)>>,
    /// Recent compute times per micro-batch; their median is sent with heartbeats.
    pub(super) compute: std::sync::Mutex<crate::dp::ComputeWindow>,
    pub(super) disk: ckpt::FaultInjector,
    /// An injected network partition lasts until this instant.
    pub(super) partitioned_until: std::sync::Mutex<Option<Instant>>,
    /// The newest completed step plus one (0: none yet): the heartbeat's progress counter.
    pub(super) step: AtomicU64,
    /// The group's recent step times (they set the silence threshold; kept across epochs).
    pub(super) step_times: std::sync::Mutex<StepTimes>,
    /// A peer this worker waits on and hears nothing from, and since when it is known.
    pub(super) silent: std::sync::Mutex<Option<(SilentPeer, Instant)>>,
    /// The silence reported in the current epoch, as its trace knows it (see
    /// [`crate::recovery_trace`]).
    pub(super) silence_trace: std::sync::Mutex<Option<SilenceTrace>>,
    /// When this worker last completed a step (where a detection's span starts).
    pub(super) last_step_at: std::sync::Mutex<Option<Instant>>,
    /// A silence report is being sent (and the assignment watched closely).
    pub(super) reporting: AtomicBool,
}

impl Shared {
    /// The heartbeat: progress counter, compute time and any silent peer (a report stays
    /// in the heartbeats for a second after it was made).
    pub(super) fn heartbeat(&self, id: &str) -> HeartbeatRequest {
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
            .as_ref()
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(1))
            .map(|(sp, _)| sp.clone());
        HeartbeatRequest {
            worker: id.to_string(),
            compute_ms,
            step,
            silent_peer,
        }
    }

    /// A step completed at `at`: no peer stands silent any more (a silence reported in
    /// this epoch was a slow peer, not a fault).
    pub(super) fn stepped(&self, at: Instant) {
        *self.last_step_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        *self.silent.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.silence_trace.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The silence reported in `epoch`, which has ended (taken).
    pub(super) fn take_silence(&self, epoch: u64) -> Option<SilenceTrace> {
        self.silence_trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|s| s.epoch == epoch)
    }

    /// The reports of `epoch`'s failure go under `detection`: a silence reported among
    /// them joins it instead of starting a trace of its own.
    pub(super) fn reporting_in(&self, epoch: u64, detection: Option<TraceParent>) {
        *self.silence_trace.lock().unwrap_or_else(|p| p.into_inner()) = Some(SilenceTrace {
            epoch,
            detection,
            reported_at: None,
        });
    }

    pub(super) fn partitioned(&self) -> bool {
        self.partitioned_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }
}

/// How long a lasting fault injected without a duration lasts: until healed, in practice.
pub(super) const UNTIL_HEALED: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) fn spawn_heartbeat(
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

/// The silence threshold for the group's recent step times.
pub(super) fn silence_after(cfg: &AgentConfig, shared: &Shared) -> Duration {
    cfg.silence.threshold(
        &shared.step_times.lock().unwrap_or_else(|p| p.into_inner()),
        cfg.op_timeout,
    )
}

/// A progress report: the epoch, the number of steps done and, after a step, its loss
/// and this rank's compute time per micro-batch (both for the dashboard's history); on
/// rank 0, now and then, the job's throughput and MFU.
#[derive(Clone)]
pub(super) struct Progress {
    pub(super) epoch: u64,
    pub(super) step: u64,
    pub(super) loss_millionths: Option<u64>,
    pub(super) compute_us: Option<u64>,
    pub(super) throughput: Option<phalanx_proto::Throughput>,
}

impl Progress {
    pub(super) fn at(epoch: u64, step: u64) -> Self {
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
pub(super) fn spawn_progress(client: Arc<Client>, id: String) -> mpsc::Sender<Progress> {
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
