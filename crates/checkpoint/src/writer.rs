//! The asynchronous checkpointer: a background thread that writes shards (and, for a
//! single-rank run, commits the manifest and applies retention), reporting through events.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CheckpointError, Result};
use crate::fault::FaultInjector;
use crate::format::{LayoutEntry, ManifestSpec, ShardRecord};
use crate::retention::apply_retention;
use crate::store::{
    commit_manifest, validate_rank_state, write_shard_parts, RankState, ShardParts, WriteTimes,
};

/// Configuration of an [`AsyncCheckpointer`]. Build with [`CheckpointerConfig::new`] and
/// adjust fields.
#[derive(Clone, Debug)]
pub struct CheckpointerConfig {
    pub root: PathBuf,
    pub world: usize,
    pub rank: usize,
    /// Snapshots accepted but not yet durable; a snapshot beyond this is refused with
    /// [`SnapshotError::Busy`] instead of blocking training. Also the staging pool size.
    pub max_in_flight: usize,
    /// Write attempts per snapshot before it is given up ([`CheckpointEvent::GaveUp`]).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each retry up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Commit the manifest right after the shard is durable. Only for `world == 1`; in a
    /// distributed run the controller calls [`commit_manifest`] once all ranks reported.
    pub auto_commit: bool,
    /// Layout recorded in auto-committed manifests.
    pub layout: Vec<LayoutEntry>,
    /// With `auto_commit`, keep this many committed checkpoints (0: keep all).
    pub retain_count: usize,
    /// How long dropping the checkpointer waits for queued writes to finish.
    pub shutdown_timeout_ms: u64,
    /// Threads that share the staging memcpy in [`AsyncCheckpointer::snapshot`] (the
    /// training thread is one of them). Only sections above 1 Mi elements are split.
    pub staging_copy_threads: usize,
    /// Chaos hook: makes writes fail with a disk-full error.
    pub fault: Option<FaultInjector>,
}

impl CheckpointerConfig {
    pub fn new(root: impl Into<PathBuf>, world: usize, rank: usize) -> Self {
        Self {
            root: root.into(),
            world,
            rank,
            max_in_flight: 2,
            max_attempts: 8,
            initial_backoff_ms: 20,
            max_backoff_ms: 2_000,
            auto_commit: false,
            layout: Vec::new(),
            retain_count: 0,
            shutdown_timeout_ms: 30_000,
            staging_copy_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get().min(4)),
            fault: None,
        }
    }
}

/// Progress and failures of the background writer, in order of occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointEvent {
    /// This rank's shard of `step` is durable (fsynced and renamed, directory fsynced);
    /// with `auto_commit` the manifest is committed too. `write_ms` counts all attempts;
    /// `times` are the phases of the attempt that succeeded.
    Durable {
        step: u64,
        shard: ShardRecord,
        bytes: u64,
        write_ms: u64,
        times: WriteTimes,
    },
    /// Attempt `attempt` (1-based) failed.
    Failed {
        step: u64,
        error: String,
        attempt: u32,
        disk_full: bool,
    },
    /// Attempt `next_attempt` starts after `backoff_ms`.
    Retrying {
        step: u64,
        next_attempt: u32,
        backoff_ms: u64,
    },
    /// Every attempt failed (or the writer was shutting down); the snapshot is dropped.
    GaveUp {
        step: u64,
        attempts: u32,
        error: String,
    },
    /// `auto_commit` wrote the manifest.
    Committed { step: u64, manifest_path: PathBuf },
    /// `auto_commit` retention deleted these older checkpoints.
    RetentionApplied { deleted_steps: Vec<u64> },
    /// Retention failed; the checkpoint itself is fine.
    RetentionFailed { error: String },
}

/// Why a snapshot was not accepted. Never blocks; training goes on either way.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("checkpoint step {step} refused: {in_flight} snapshots still being written")]
    Busy { step: u64, in_flight: usize },
    #[error("checkpoint step {step} already pending")]
    DuplicateStep { step: u64 },
    #[error("checkpoint step {step} refused: the writer is shut down")]
    Closed { step: u64 },
    #[error(transparent)]
    Invalid(#[from] CheckpointError),
}

/// Why a wait ended without a durable shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("checkpoint step {step} not durable after {waited_ms} ms")]
    Timeout { step: u64, waited_ms: u64 },
    #[error("checkpoint step {step} given up: {error}")]
    GaveUp { step: u64, error: String },
    #[error("checkpoint step {step} was never snapshotted (or is too old to be tracked)")]
    UnknownStep { step: u64 },
    #[error("checkpoint step {step}: the writer thread stopped")]
    WriterStopped { step: u64 },
    #[error("writer did not finish within {waited_ms} ms")]
    ShutdownTimeout { waited_ms: u64 },
}

/// State handed over by shared ownership: no copy at all on the training thread.
///
/// Contract: the writer thread copies the owned sections into a pooled staging buffer
/// first thing and then drops these `Arc`s (see [`AsyncCheckpointer::wait_released`]);
/// serialising and writing happen from the staging copy. The training loop keeps reading
/// its state (forward/backward) meanwhile; it must not mutate it before the release — it
/// cannot anyway without `Arc::make_mut`, which would copy on the training thread if the
/// writer still held a reference. So: snapshot at the step boundary, run forward/backward,
/// `wait_released` (normally already true), then `Arc::make_mut` for the optimizer step.
#[derive(Clone, Debug)]
pub struct SharedRankState {
    pub step: u64,
    pub seed: u64,
    pub params: Arc<Vec<f32>>,
    pub range: Range<usize>,
    pub m: Arc<Vec<f32>>,
    pub v: Arc<Vec<f32>>,
    pub opt_step: u64,
    pub extra: Vec<u8>,
}

#[derive(Default)]
struct Staging {
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    extra: Vec<u8>,
}

enum Payload {
    Staged(Staging),
    Shared(SharedRankState),
}

struct Job {
    step: u64,
    seed: u64,
    opt_step: u64,
    param_count: usize,
    range: Range<usize>,
    payload: Payload,
}

impl Job {
    fn parts(&self, world: usize, rank: usize) -> ShardParts<'_> {
        let (params, m, v, extra): (&[f32], &[f32], &[f32], &[u8]) = match &self.payload {
            Payload::Staged(s) => (&s.params, &s.m, &s.v, &s.extra),
            Payload::Shared(s) => (&s.params[self.range.clone()], &s.m, &s.v, &s.extra),
        };
        ShardParts {
            step: self.step,
            seed: self.seed,
            world,
            rank,
            param_count: self.param_count,
            range: self.range.clone(),
            opt_step: self.opt_step,
            params,
            m,
            v,
            extra,
        }
    }
}

#[derive(Clone, Debug)]
enum StepStatus {
    /// Accepted, not yet durable. `released`: the writer holds no reference to the
    /// caller's buffers any more (always true for staged snapshots).
    Pending {
        released: bool,
    },
    Durable(ShardRecord),
    GaveUp(String),
}

#[derive(Default)]
struct Tracker {
    in_flight: usize,
    steps: BTreeMap<u64, StepStatus>,
    stopping: bool,
    finished: bool,
}

const TRACKED_STEPS_MAX: usize = 256;

impl Tracker {
    fn prune(&mut self) {
        while self.steps.len() > TRACKED_STEPS_MAX {
            let victim = self
                .steps
                .iter()
                .find(|(_, s)| !matches!(s, StepStatus::Pending { .. }))
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    self.steps.remove(&k);
                }
                None => break,
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    tracker: Mutex<Tracker>,
    cv: Condvar,
    pool: Mutex<Vec<Staging>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Staging>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps `duration` unless shutdown starts; returns true if it did.
    fn sleep_unless_stopping(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut g = self.lock();
        while !g.stopping {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    fn wait_until<F: FnMut(&Tracker) -> bool>(
        &self,
        timeout: Duration,
        mut done: F,
    ) -> (MutexGuard<'_, Tracker>, bool) {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if done(&g) {
                return (g, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (g, false);
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Marks the writer finished even if its thread unwinds.
struct FinishGuard(Arc<Shared>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.finished = true;
        drop(g);
        self.0.cv.notify_all();
    }
}

/// One rank's asynchronous checkpoint writer. See the crate docs for the contract.
pub struct AsyncCheckpointer {
    cfg: Arc<CheckpointerConfig>,
    shared: Arc<Shared>,
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl AsyncCheckpointer {
    /// Starts the writer thread. Events arrive on the returned receiver (dropping it is
    /// fine: events are then discarded, `wait_durable` still works).
    pub fn spawn(cfg: CheckpointerConfig) -> Result<(Self, Receiver<CheckpointEvent>)> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(CheckpointError::InvalidInput(format!(
                "rank {} of world {}",
                cfg.rank, cfg.world
            )));
        }
        if cfg.max_in_flight == 0 || cfg.max_attempts == 0 {
            return Err(CheckpointError::InvalidInput(
                "max_in_flight and max_attempts must be at least 1".into(),
            ));
        }
        if cfg.auto_commit && cfg.world != 1 {
            return Err(CheckpointError::InvalidInput(format!(
                "auto_commit needs world 1 (got {}); commit the manifest from the controller",
                cfg.world
            )));
        }
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let (staged_tx, staged_rx) = mpsc::channel::<Job>();
        let (events_tx, events_rx) = mpsc::channel();
        let handle = {
            let thread_cfg = cfg.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-writer-{}", cfg.rank))
                .spawn(move || writer_main(&thread_cfg, shared, staged_rx, events_tx))
                .map_err(CheckpointError::io("spawn writer thread", &cfg.root))?
        };
        {
            let thread_cfg = cfg.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-stager-{}", cfg.rank))
                .spawn(move || stager_main(&thread_cfg, &shared, rx, staged_tx))
                .map_err(CheckpointError::io("spawn stager thread", &cfg.root))?;
        }
        Ok((
            Self {
                cfg,
                shared,
                tx: Some(tx),
                handle: Some(handle),
            },
            events_rx,
        ))
    }

    pub fn config(&self) -> &CheckpointerConfig {
        &self.cfg
    }

    fn reserve(&self, step: u64, released: bool) -> std::result::Result<(), SnapshotError> {
        let mut g = self.shared.lock();
        if g.stopping || g.finished || self.tx.is_none() {
            return Err(SnapshotError::Closed { step });
        }
        if g.in_flight >= self.cfg.max_in_flight {
            return Err(SnapshotError::Busy {
                step,
                in_flight: g.in_flight,
            });
        }
        if matches!(g.steps.get(&step), Some(StepStatus::Pending { .. })) {
            return Err(SnapshotError::DuplicateStep { step });
        }
        g.in_flight += 1;
        g.steps.insert(step, StepStatus::Pending { released });
        g.prune();
        Ok(())
    }

    fn submit(&self, job: Job) -> std::result::Result<(), SnapshotError> {
        let step = job.step;
        if self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok()) {
            return Ok(());
        }
        let mut g = self.shared.lock();
        g.in_flight = g.in_flight.saturating_sub(1);
        g.steps.remove(&step);
        Err(SnapshotError::Closed { step })
    }

    /// Copies this rank's sections (`params[range]`, `m`, `v`, `extra`) into a reusable
    /// staging buffer and queues the write. The training thread pays one memcpy of the
    /// owned bytes (no allocation once the pool is warm) and may mutate its state as soon
    /// as this returns. Never waits for I/O: refuses with `Busy` when `max_in_flight`
    /// snapshots are still being written.
    pub fn snapshot(&self, state: &RankState<'_>) -> std::result::Result<(), SnapshotError> {
        validate_rank_state(state, self.cfg.world, self.cfg.rank)?;
        self.reserve(state.step, true)?;
        let mut buf = self.shared.pool().pop().unwrap_or_default();
        let threads = self.cfg.staging_copy_threads;
        copy_into(&mut buf.params, &state.params[state.range.clone()], threads);
        copy_into(&mut buf.m, state.m, threads);
        copy_into(&mut buf.v, state.v, threads);
        buf.extra.clear();
        buf.extra.extend_from_slice(state.extra);
        self.submit(Job {
            step: state.step,
            seed: state.seed,
            opt_step: state.opt_step,
            param_count: state.params.len(),
            range: state.range.clone(),
            payload: Payload::Staged(buf),
        })
    }

    /// Queues a write of state handed over by shared ownership: O(1) on the training
    /// thread. See [`SharedRankState`] for the contract.
    pub fn snapshot_shared(
        &self,
        state: SharedRankState,
    ) -> std::result::Result<(), SnapshotError> {
        let view = RankState {
            step: state.step,
            seed: state.seed,
            params: &state.params,
            range: state.range.clone(),
            m: &state.m,
            v: &state.v,
            opt_step: state.opt_step,
            extra: &state.extra,
        };
        validate_rank_state(&view, self.cfg.world, self.cfg.rank)?;
        self.reserve(state.step, false)?;
        self.submit(Job {
            step: state.step,
            seed: state.seed,
            opt_step: state.opt_step,
            param_count: state.params.len(),
            range: state.range.clone(),
            payload: Payload::Shared(state),
        })
    }

    /// Snapshots accepted and not yet finished (durable or given up).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Waits until this rank's shard of `step` is durable (and committed, with
    /// `auto_commit`), it was given up, or `timeout` passes.
    pub fn wait_durable(
        &self,
        step: u64,
        timeout: Duration,
    ) -> std::result::Result<ShardRecord, WaitError> {
        let started = Instant::now();
        let (g, _) = self.shared.wait_until(timeout, |t| {
            t.finished || !matches!(t.steps.get(&step), Some(StepStatus::Pending { .. }))
        });
        match g.steps.get(&step) {
            Some(StepStatus::Durable(r)) => Ok(r.clone()),
            Some(StepStatus::GaveUp(e)) => Err(WaitError::GaveUp {
                step,
                error: e.clone(),
            }),
            None => Err(WaitError::UnknownStep { step }),
            Some(StepStatus::Pending { .. }) if g.finished => {
                Err(WaitError::WriterStopped { step })
            }
            Some(StepStatus::Pending { .. }) => Err(WaitError::Timeout {
                step,
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Waits until the writer holds no reference to the buffers handed over by
    /// [`snapshot_shared`](Self::snapshot_shared) for `step` (it copied them into staging),
    /// so `Arc::make_mut` on them no longer copies. Call it right before the optimizer
    /// step mutates the state; the copy normally finished during forward/backward.
    pub fn wait_released(
        &self,
        step: u64,
        timeout: Duration,
    ) -> std::result::Result<(), WaitError> {
        let started = Instant::now();
        let (g, _) = self.shared.wait_until(timeout, |t| {
            t.finished
                || !matches!(
                    t.steps.get(&step),
                    Some(StepStatus::Pending { released: false })
                )
        });
        match g.steps.get(&step) {
            None => Err(WaitError::UnknownStep { step }),
            Some(StepStatus::Pending { released: false }) if g.finished => {
                Err(WaitError::WriterStopped { step })
            }
            Some(StepStatus::Pending { released: false }) => Err(WaitError::Timeout {
                step,
                waited_ms: started.elapsed().as_millis() as u64,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Waits until nothing is in flight; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.shared
            .wait_until(timeout, |t| t.in_flight == 0 || t.finished)
            .1
    }

    /// Stops accepting snapshots, lets queued ones finish (failing ones are not retried
    /// any more) and joins the thread, waiting at most `timeout`.
    pub fn close(mut self, timeout: Duration) -> std::result::Result<(), WaitError> {
        self.shutdown(timeout)
    }

    fn shutdown(&mut self, timeout: Duration) -> std::result::Result<(), WaitError> {
        {
            let mut g = self.shared.lock();
            g.stopping = true;
        }
        self.shared.cv.notify_all();
        drop(self.tx.take());
        let (g, finished) = self.shared.wait_until(timeout, |t| t.finished);
        drop(g);
        if finished {
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
            Ok(())
        } else {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "checkpoint writer still busy at shutdown; detaching it"
            );
            Err(WaitError::ShutdownTimeout {
                waited_ms: timeout.as_millis() as u64,
            })
        }
    }
}

impl Drop for AsyncCheckpointer {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.shutdown(Duration::from_millis(self.cfg.shutdown_timeout_ms));
        }
    }
}

const PARALLEL_COPY_MIN_ELEMENTS: usize = 1 << 20;

/// `dst = src`, reusing `dst`'s allocation; large copies are split over `threads`.
fn copy_into(dst: &mut Vec<f32>, src: &[f32], threads: usize) {
    if threads <= 1 || src.len() < PARALLEL_COPY_MIN_ELEMENTS {
        dst.clear();
        dst.extend_from_slice(src);
        return;
    }
    // Same length as last time (the usual case): no fill, just the copy.
    dst.resize(src.len(), 0.0);
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut pieces = dst.chunks_mut(chunk).zip(src.chunks(chunk));
        let first = pieces.next();
        for (d, s) in pieces {
            scope.spawn(move || d.copy_from_slice(s));
        }
        if let Some((d, s)) = first {
            d.copy_from_slice(s);
        }
    });
}

/// Stages shared-ownership snapshots as soon as they arrive (even while the writer is busy
/// with an earlier one), then hands every job to the writer. Ends when the checkpointer
/// drops its sender; dropping `out` then ends the writer.
fn stager_main(cfg: &CheckpointerConfig, shared: &Shared, rx: Receiver<Job>, out: Sender<Job>) {
    while let Ok(job) = rx.recv() {
        let job = stage_shared(cfg, shared, job);
        if out.send(job).is_err() {
            break;
        }
    }
}

fn writer_main(
    cfg: &CheckpointerConfig,
    shared: Arc<Shared>,
    rx: Receiver<Job>,
    events: Sender<CheckpointEvent>,
) {
    let _guard = FinishGuard(shared.clone());
    while let Ok(job) = rx.recv() {
        process_job(cfg, &shared, &events, job);
    }
}

/// Copies a shared-ownership snapshot into a staging buffer and drops the caller's `Arc`s,
/// so the training thread can mutate its buffers again without a copy.
fn stage_shared(cfg: &CheckpointerConfig, shared: &Shared, mut job: Job) -> Job {
    if let Payload::Shared(state) = &job.payload {
        let mut buf = shared.pool().pop().unwrap_or_default();
        let threads = cfg.staging_copy_threads;
        copy_into(&mut buf.params, &state.params[job.range.clone()], threads);
        copy_into(&mut buf.m, &state.m, threads);
        copy_into(&mut buf.v, &state.v, threads);
        buf.extra.clear();
        buf.extra.extend_from_slice(&state.extra);
        job.payload = Payload::Staged(buf); // drops the Arcs
        let mut g = shared.lock();
        if let Some(StepStatus::Pending { released }) = g.steps.get_mut(&job.step) {
            *released = true;
        }
        drop(g);
        shared.cv.notify_all();
    }
    job
}

fn process_job(
    cfg: &CheckpointerConfig,
    shared: &Shared,
    events: &Sender<CheckpointEvent>,
    job: Job,
) {
    let step = job.step;
    let started = Instant::now();
    let parts = job.parts(cfg.world, cfg.rank);
    let mut attempt: u32 = 1;
    let outcome = loop {
        // Debug, like `ckpt_write_shard`: the checkpoint's trace has the phases.
        let span = tracing::debug_span!("ckpt_async_write", step, rank = cfg.rank, attempt);
        let result = span.in_scope(|| attempt_write(cfg, &parts));
        match result {
            Ok(rec) => break Ok(rec),
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(step, attempt, %error, "checkpoint write failed");
                let _ = events.send(CheckpointEvent::Failed {
                    step,
                    error: error.clone(),
                    attempt,
                    disk_full: e.is_disk_full(),
                });
                if attempt >= cfg.max_attempts || shared.lock().stopping {
                    break Err(error);
                }
                let shift = (attempt - 1).min(20);
                let backoff_ms = cfg
                    .initial_backoff_ms
                    .saturating_mul(1u64 << shift)
                    .min(cfg.max_backoff_ms);
                let _ = events.send(CheckpointEvent::Retrying {
                    step,
                    next_attempt: attempt + 1,
                    backoff_ms,
                });
                if shared.sleep_unless_stopping(Duration::from_millis(backoff_ms)) {
                    break Err(format!("{error} (writer shutting down, not retried)"));
                }
                attempt += 1;
            }
        }
    };
    let write_ms = started.elapsed().as_millis() as u64;
    let status = match outcome {
        Ok((rec, committed, times)) => {
            let _ = events.send(CheckpointEvent::Durable {
                step,
                bytes: rec.bytes,
                shard: rec.clone(),
                write_ms,
                times,
            });
            if let Some(manifest_path) = committed {
                let _ = events.send(CheckpointEvent::Committed {
                    step,
                    manifest_path,
                });
                if cfg.retain_count > 0 {
                    match apply_retention(&cfg.root, cfg.retain_count) {
                        Ok(r) if !r.deleted_steps.is_empty() => {
                            let _ = events.send(CheckpointEvent::RetentionApplied {
                                deleted_steps: r.deleted_steps,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = events.send(CheckpointEvent::RetentionFailed {
                                error: e.to_string(),
                            });
                        }
                    }
                }
            }
            StepStatus::Durable(rec)
        }
        Err(error) => {
            tracing::error!(step, attempts = attempt, %error, "checkpoint given up");
            let _ = events.send(CheckpointEvent::GaveUp {
                step,
                attempts: attempt,
                error: error.clone(),
            });
            StepStatus::GaveUp(error)
        }
    };
    if let Payload::Staged(buf) = job.payload {
        shared.pool().push(buf);
    }
    {
        let mut g = shared.lock();
        g.in_flight = g.in_flight.saturating_sub(1);
        g.steps.insert(step, status);
        g.prune();
    }
    shared.cv.notify_all();
}

fn attempt_write(
    cfg: &CheckpointerConfig,
    parts: &ShardParts<'_>,
) -> Result<(ShardRecord, Option<PathBuf>, WriteTimes)> {
    let (rec, times) = write_shard_parts(&cfg.root, parts, cfg.fault.as_ref())?;
    if !cfg.auto_commit {
        return Ok((rec, None, times));
    }
    let spec = ManifestSpec {
        step: parts.step,
        world: cfg.world,
        param_count: parts.param_count,
        seed: parts.seed,
        layout: cfg.layout.clone(),
        params_sha256: None,
        ..Default::default()
    };
    commit_manifest(&cfg.root, &spec, vec![rec.clone()])?;
    let path = crate::format::step_dir(&cfg.root, parts.step).join(crate::format::MANIFEST_FILE);
    Ok((rec, Some(path), times))
}
