//! The deterministic data-parallel step loop.
use std::time::{Duration, Instant};

use phalanx_collective::{deterministic, BlockingGroup};
use phalanx_train::engine::Engine;
use phalanx_train::sampler::{assign, assign_weighted};
use serde::{Deserialize, Serialize};

use crate::WorkerError;

mod spot_check;

/// What rank 0 reports after each step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f64,
    pub step_ms: f64,
    /// Forward + backward time per local micro-batch (0 when the rank had none).
    #[serde(default)]
    pub compute_ms: f64,
    /// The step's gradient spot check, if it had one (recomputation and hash exchange).
    #[serde(default)]
    pub check_ms: f64,
    /// The deterministic gradient mean (and the loss exchange).
    #[serde(default)]
    pub reduce_ms: f64,
    /// Clipping, AdamW, the parameter all-gather and loading the parameters into the model.
    #[serde(default)]
    pub update_ms: f64,
    /// The gradients' copy from a CUDA device to host memory (0 on CPU); counted in
    /// neither `compute_ms` nor `reduce_ms`.
    #[serde(default)]
    pub grad_copy_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub steps: u64,
    pub workers: usize,
    pub initial_loss: f64,
    pub final_loss: f64,
    pub val_loss: f64,
    pub losses: Vec<f64>,
    pub tokens_per_sec: f64,
    /// Wall time of the step loop (excludes start-up and the final validation).
    pub train_s: f64,
    /// CPU time (user + system, all threads) this process spent in the step loop: on a
    /// shared machine a steadier measure of the step's cost than the wall time.
    #[serde(default)]
    pub train_cpu_s: f64,
    pub params_sha256: String,
    pub param_count: usize,
    /// Gradient spot checks run (`--grad-check-interval`), and steps redone because one
    /// failed.
    #[serde(default)]
    pub grad_checks: u64,
    #[serde(default)]
    pub steps_redone: u64,
    /// Model FLOPs utilisation, filled in by whoever knows the device (rank 0's process).
    #[serde(default)]
    pub mfu: Option<phalanx_train::mfu::Mfu>,
}

pub struct DpOptions {
    pub op_timeout: Duration,
    /// Recompute a neighbour's micro-batch and compare gradients every this many steps
    /// (0: never; see [`Stepper::grad_check_every`]).
    pub grad_check_every: u64,
}

/// The median of a rank's last few per-micro-batch compute times. Heartbeats carry this
/// rather than the latest step's time, so one step that lost its core to another process
/// neither makes a healthy rank look slow nor a slow one look healthy.
#[derive(Debug, Clone, Default)]
pub struct ComputeWindow {
    recent: std::collections::VecDeque<f64>,
}

impl ComputeWindow {
    /// Steps in the window.
    pub const LEN: usize = 9;

    /// Records one step's time; non-positive or non-finite times (a rank with no
    /// micro-batch) are not measurements and are skipped.
    pub fn push(&mut self, compute_ms: f64) {
        if !(compute_ms.is_finite() && compute_ms > 0.0) {
            return;
        }
        if self.recent.len() == Self::LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(compute_ms);
    }

    /// The median of the window, or `None` before the first measurement.
    pub fn median(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.recent.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }
}

/// One rank's step machinery for a fixed group: the buffers of its micro-batch gradients.
pub struct Stepper {
    mine: std::ops::Range<usize>,
    micro_total: usize,
    /// Flat micro-batch gradients for the group's reduction (allocated on first use: a
    /// rank alone reduces straight from the gradient tensors).
    bufs: Vec<Vec<f32>>,
    /// A rank alone: its micro-batches' gradient tensors.
    tensors: Vec<Vec<tch::Tensor>>,
    /// Their max |g|, each taken right after its backward (None: not readable in place).
    maxes: Vec<Option<f64>>,
    /// Pinned host memory for the one gradient download per step from a CUDA device.
    download: Option<tch::Tensor>,
    grad_copy_ms: f64,
    mean: Vec<f32>,
    pub op_timeout: Duration,
    /// An emulated slow device (thermal throttling, fault injection): compute takes this
    /// many times as long. 1 is a healthy device.
    pub slow_factor: f64,
    /// Gradient spot checks every this many steps (0: never; needs world >= 2): see
    /// [`Stepper::check_gradients`].
    pub grad_check_every: u64,
    /// Fault injection: flip one bit of this rank's first micro-batch gradient at the
    /// next gradient check, before the reduction.
    pub corrupt_next_checked_grad: bool,
    /// Gradient spot checks run so far (a redo's check counts again).
    pub grad_checks: u64,
    rank: usize,
    world: usize,
    /// The first micro-batch of every rank (None: a rank with no micro-batch).
    firsts: Vec<Option<usize>>,
    check_buf: Vec<f32>,
    /// The last failed check (step, micro, owner, verifier): redoing that step adds a
    /// third computation of the micro-batch.
    disputed: Option<(u64, usize, usize, usize)>,
}

impl Stepper {
    /// `shares`: the plan's relative micro-batch shares per rank (empty: equal).
    pub fn new(
        engine: &Engine,
        group: &BlockingGroup,
        shares: &[u32],
        op_timeout: Duration,
    ) -> Result<Self, WorkerError> {
        let (rank, world) = (group.rank(), group.world());
        let micro_total = engine.spec.micro_batches();
        if world > micro_total {
            return Err(WorkerError::Protocol(format!(
                "world size {world} exceeds the {micro_total} micro-batches of a step; lower the world size or the micro-batch"
            )));
        }
        let mine = assign_weighted(micro_total, shares, world, rank);
        let n = engine.params.len();
        if engine.opt.range != engine.shard_ranges(world, rank).0 {
            return Err(WorkerError::Protocol(format!(
                "optimizer shard {:?} is not rank {rank}'s of world {world}; agree on the state first",
                engine.opt.range
            )));
        }
        let firsts = (0..world)
            .map(|r| {
                let m = assign_weighted(micro_total, shares, world, r);
                (!m.is_empty()).then_some(m.start)
            })
            .collect();
        Ok(Self {
            bufs: Vec::new(),
            tensors: Vec::new(),
            maxes: Vec::new(),
            download: None,
            grad_copy_ms: 0.0,
            mine,
            micro_total,
            mean: vec![0f32; n],
            op_timeout,
            slow_factor: 1.0,
            grad_check_every: 0,
            corrupt_next_checked_grad: false,
            grad_checks: 0,
            rank,
            world,
            firsts,
            check_buf: Vec::new(),
            disputed: None,
        })
    }

    /// Trains step `engine.step()`: local micro-batch gradients, the deterministic mean
    /// across the group, then clip + AdamW on every rank. A failure leaves the engine's
    /// parameters untouched unless every collective of the step has completed, so a step
    /// is either applied whole or redone.
    pub fn step(
        &mut self,
        engine: &mut Engine,
        group: &mut BlockingGroup,
    ) -> Result<StepReport, WorkerError> {
        self.step_with(engine, group, &mut || {})
    }

    /// [`Stepper::step_with`], with a failed gradient spot check (logged) as
    /// [`Stepped::Redo`]: nothing was applied, every rank saw the same check, and each
    /// redoes the step (a device that corrupts again is named: `GradientCorrupt` ends
    /// the run).
    pub fn step_or_redo(
        &mut self,
        engine: &mut Engine,
        group: &mut BlockingGroup,
        before_update: &mut dyn FnMut(),
    ) -> Result<Stepped, WorkerError> {
        match self.step_with(engine, group, before_update) {
            Ok(report) => Ok(Stepped::Done(report)),
            Err(WorkerError::GradientMismatch {
                step,
                micro,
                owner,
                verifier,
            }) => {
                tracing::warn!(
                    step,
                    micro,
                    owner,
                    verifier,
                    "gradient check failed; redoing the step"
                );
                Ok(Stepped::Redo(Mismatch {
                    step,
                    micro,
                    owner,
                    verifier,
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// [`Stepper::step`], calling `before_update` after forward, backward and the
    /// reduction, right before the parameters and moments are written: the point by which
    /// an asynchronous checkpoint taken at the previous step boundary must have let go of
    /// them.
    pub fn step_with(
        &mut self,
        engine: &mut Engine,
        group: &mut BlockingGroup,
        before_update: &mut dyn FnMut(),
    ) -> Result<StepReport, WorkerError> {
        let t0 = Instant::now();
        let step = engine.step();
        let mut local_losses = Vec::with_capacity(self.mine.len());
        // A rank alone keeps autograd's tensors and reduces from them; a group needs one
        // flat vector per micro-batch for the collective. A CUDA device keeps them too,
        // and they come to the host in one copy after the last micro-batch.
        let alone = self.world == 1;
        let on_cuda = engine.model.device.is_cuda();
        self.tensors.clear();
        self.maxes.clear();
        if !alone {
            self.ensure_bufs(engine.params.len());
        }
        for (k, m) in self.mine.clone().enumerate() {
            if alone || on_cuda {
                let (loss, grads) = engine.micro_grad_tensors(step, m)?;
                if alone && !on_cuda {
                    let max = crate::local_mean::micro_max(
                        &grads,
                        &engine.model.layout,
                        self.tensors.len(),
                    )?;
                    self.maxes.push(max);
                }
                self.tensors.push(grads);
                local_losses.push((m, loss));
            } else {
                local_losses.push((m, engine.micro_grad(step, m, &mut self.bufs[k])?));
            }
        }
        let mut compute = t0.elapsed();
        self.grad_copy_ms = 0.0;
        if on_cuda && !alone {
            let tensors = std::mem::take(&mut self.tensors);
            self.download(engine, &tensors)?;
        }
        if self.slow_factor > 1.0 {
            let extra = compute.mul_f64(self.slow_factor - 1.0);
            std::thread::sleep(extra);
            compute += extra;
        }
        let compute_ms = compute.as_secs_f64() * 1e3 / self.mine.len().max(1) as f64;
        let t_check = Instant::now();
        let redo_of_dispute = self.disputed.is_some_and(|d| d.0 == step);
        if self.world > 1
            && self.grad_check_every > 0
            && (step % self.grad_check_every == 0 || redo_of_dispute)
        {
            self.check_gradients(engine, group, step)?;
        }
        let t_reduce = Instant::now();
        let check_ms = (t_reduce - t_check).as_secs_f64() * 1e3;
        let copied = self.grad_copy_ms;
        self.reduce(engine, group)?;
        let loss = mean_in_index_order(group, &local_losses, self.micro_total, self.op_timeout)?;
        let t_update = Instant::now();
        let reduce_ms = (t_update - t_reduce).as_secs_f64() * 1e3 - (self.grad_copy_ms - copied);
        before_update();
        let stats = engine.apply(&self.mean)?;
        gather_params(engine, group, self.op_timeout)?;
        engine.sync_model()?;
        Ok(StepReport {
            step,
            loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
            compute_ms,
            check_ms,
            reduce_ms,
            update_ms: t_update.elapsed().as_secs_f64() * 1e3,
            grad_copy_ms: self.grad_copy_ms,
        })
    }

    /// A CUDA rank's gradients to the host in one copy, timed.
    fn download(
        &mut self,
        engine: &Engine,
        tensors: &[Vec<tch::Tensor>],
    ) -> Result<(), WorkerError> {
        let t = Instant::now();
        self.ensure_bufs(engine.params.len());
        phalanx_train::cuda_io::grads_to_host(
            tensors,
            &engine.model.layout,
            &mut self.bufs,
            &mut self.download,
        )?;
        self.grad_copy_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    fn ensure_bufs(&mut self, n: usize) {
        if self.bufs.len() != self.mine.len() || self.bufs.iter().any(|b| b.len() != n) {
            self.bufs = self.mine.clone().map(|_| vec![0f32; n]).collect();
        }
    }

    /// The deterministic mean of the step's micro-batch gradients into `self.mean`.
    fn reduce(&mut self, engine: &Engine, group: &mut BlockingGroup) -> Result<(), WorkerError> {
        if !self.tensors.is_empty() {
            let tensors = std::mem::take(&mut self.tensors);
            let maxes: Option<Vec<f64>> = self.maxes.iter().copied().collect();
            let done = crate::local_mean::local_mean(
                &tensors,
                maxes.as_deref(),
                &engine.model.layout,
                &mut self.mean,
            )?;
            if done {
                return Ok(());
            }
            // Tensors the local path cannot read in place (CUDA): the flat path.
            self.ensure_bufs(engine.params.len());
            if engine.model.device.is_cuda() {
                self.download(engine, &tensors)?;
            } else {
                for (g, buf) in tensors.iter().zip(self.bufs.iter_mut()) {
                    engine.model.copy_grads(g, buf)?;
                }
            }
        }
        let refs: Vec<&[f32]> = self.bufs.iter().map(|b| b.as_slice()).collect();
        deterministic::reduce_mean(
            group,
            &refs,
            self.micro_total,
            &mut self.mean,
            self.op_timeout,
        )?;
        Ok(())
    }
}

/// ZeRO-1: every rank updated the parameters of its own range; gather the others' so that
/// every rank holds the whole new vector (the same bits everywhere).
fn gather_params(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    timeout: Duration,
) -> Result<(), WorkerError> {
    let world = group.world();
    if world == 1 {
        return Ok(());
    }
    let own = engine.opt.range.clone();
    let mut bytes = Vec::with_capacity(own.len() * 4);
    for x in &engine.params[own] {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let parts = group.all_gather_within(&bytes, timeout)?;
    let ranges: Vec<_> = (0..parts.len())
        .map(|r| engine.shard_ranges(world, r).0)
        .collect();
    let params = engine.params_mut();
    for (r, (part, range)) in parts.iter().zip(ranges).enumerate() {
        if part.len() != range.len() * 4 {
            return Err(WorkerError::Protocol(format!(
                "rank {r} sent {} parameter bytes for range {range:?}",
                part.len()
            )));
        }
        for (x, c) in params[range].iter_mut().zip(part.chunks_exact(4)) {
            *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    }
    Ok(())
}

/// Mean validation loss over the spec's validation micro-batches, shared out over the group.
pub fn validation_loss(
    engine: &Engine,
    group: &mut BlockingGroup,
    timeout: Duration,
) -> Result<f64, WorkerError> {
    let world = group.world();
    let v_total = engine.spec.val_micro_batches.max(world);
    let mine: Vec<(usize, f64)> = assign(v_total, world, group.rank())
        .map(|m| engine.val_loss(m).map(|l| (m, l)))
        .collect::<Result<_, _>>()?;
    mean_in_index_order(group, &mine, v_total, timeout)
}

/// Every replica's parameter hash; `Err(Diverged)` names the first rank that differs from
/// the majority (silent data corruption).
pub fn check_replicas(
    engine: &Engine,
    group: &mut BlockingGroup,
    timeout: Duration,
) -> Result<String, WorkerError> {
    let sha = engine.params_sha256();
    let all = group.all_gather_within(sha.as_bytes(), timeout)?;
    let majority = all
        .iter()
        .max_by_key(|h| {
            (
                all.iter().filter(|o| o == h).count(),
                std::cmp::Reverse(all.iter().position(|o| o == *h)),
            )
        })
        .cloned()
        .unwrap_or_default();
    let agreeing = all.iter().filter(|h| **h == majority).count();
    if agreeing < all.len() && agreeing * 2 <= all.len() {
        return Err(WorkerError::NoMajority {
            hashes: all
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect(),
        });
    }
    for (r, theirs) in all.iter().enumerate() {
        if *theirs != majority {
            return Err(WorkerError::Diverged {
                rank: r,
                ours: String::from_utf8_lossy(&majority).into_owned(),
                theirs: String::from_utf8_lossy(theirs).into_owned(),
            });
        }
    }
    Ok(sha)
}

/// How a step ended: trained, or to be redone (nothing was applied).
#[derive(Debug)]
pub enum Stepped {
    Done(StepReport),
    Redo(Mismatch),
}

/// A failed gradient spot check: rank `verifier` recomputed micro-batch `micro` of `step`
/// and got other bits than its owner.
#[derive(Clone, Copy, Debug)]
pub struct Mismatch {
    pub step: u64,
    pub micro: usize,
    pub owner: usize,
    pub verifier: usize,
}

/// Trains `engine.spec.steps` steps as rank `group.rank()` of `group.world()`.
pub fn train(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    opts: &DpOptions,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunResult, WorkerError> {
    engine.zero_shards(group.world(), group.rank())?;
    let mut stepper = Stepper::new(engine, group, &[], opts.op_timeout)?;
    stepper.grad_check_every = opts.grad_check_every;
    let mut losses = Vec::with_capacity(engine.spec.steps as usize);
    let mut steps_redone = 0;
    let start = Instant::now();
    let cpu0 = process_cpu_s();
    while engine.step() < engine.spec.steps {
        let report = match stepper.step_or_redo(engine, group, &mut || {})? {
            Stepped::Done(r) => r,
            Stepped::Redo(_) => {
                steps_redone += 1;
                continue;
            }
        };
        losses.push(report.loss);
        on_step(&report);
    }
    let train_s = start.elapsed().as_secs_f64();
    let train_cpu_s = process_cpu_s() - cpu0;
    let val_loss = validation_loss(engine, group, opts.op_timeout)?;
    // Every replica must hold the same bits; a mismatch is silent data corruption.
    let sha = check_replicas(engine, group, opts.op_timeout)?;
    Ok(RunResult {
        steps: engine.spec.steps,
        workers: group.world(),
        initial_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        val_loss,
        tokens_per_sec: (engine.spec.tokens_per_step() * losses.len() as u64) as f64
            / train_s.max(1e-9),
        train_s,
        train_cpu_s,
        losses,
        params_sha256: sha,
        param_count: engine.params.len(),
        grad_checks: stepper.grad_checks,
        steps_redone,
        mfu: None,
    })
}

/// CPU seconds (user + system, every thread) this process has used so far.
pub fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The mean of per-micro-batch values, summed in micro-batch index order whatever rank
/// computed them, so every world size reports the same bits.
fn mean_in_index_order(
    group: &mut BlockingGroup,
    local: &[(usize, f64)],
    total: usize,
    timeout: Duration,
) -> Result<f64, WorkerError> {
    let mut bytes = Vec::with_capacity(local.len() * 16);
    for &(i, v) in local {
        bytes.extend_from_slice(&(i as u64).to_le_bytes());
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut slots = vec![None; total];
    for (r, part) in group.all_gather_within(&bytes, timeout)?.iter().enumerate() {
        if part.len() % 16 != 0 {
            return Err(WorkerError::Protocol(format!(
                "rank {r} sent a loss record of {} bytes",
                part.len()
            )));
        }
        for rec in part.chunks_exact(16) {
            let i = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            let v = f64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            match slots.get_mut(i) {
                Some(s @ None) => *s = Some(v),
                _ => {
                    return Err(WorkerError::Protocol(format!(
                        "rank {r} sent micro-batch index {i} twice or out of range"
                    )))
                }
            }
        }
    }
    let mut sum = 0.0;
    for (i, s) in slots.iter().enumerate() {
        sum +=
            s.ok_or_else(|| WorkerError::Protocol(format!("no rank reported micro-batch {i}")))?;
    }
    Ok(sum / total as f64)
}

/// Test support: the tiny model on several ranks (threads) on loopback.
#[cfg(test)]
pub(crate) mod testing {
    use phalanx_collective::{BlockingGroup, GroupConfig};
    use phalanx_train::engine::{Engine, TrainSpec};
    use phalanx_train::optim::AdamWConfig;
    use phalanx_train::ModelConfig;

    /// Runs `f(rank, engine, group)` on `world` ranks, each with the tiny model, a global
    /// batch of `global_batch` sequences (micro-batches of 2) and its ZeRO-1 shards.
    pub(crate) fn on_ranks<T: Send + 'static>(
        world: usize,
        global_batch: usize,
        f: impl Fn(usize, Engine, BlockingGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        tch::set_num_threads(1);
        let listeners: Vec<_> = (0..world)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, f) = (peers.clone(), f.clone());
                std::thread::spawn(move || {
                    let text =
                        "all the world's a stage, and all the men and women merely players. "
                            .repeat(100)
                            .into_bytes();
                    let spec = TrainSpec {
                        model: ModelConfig::named("tiny").unwrap(),
                        seed: 5,
                        steps: 6,
                        global_batch,
                        micro_batch: 2,
                        val_fraction: 0.1,
                        val_micro_batches: 1,
                        optim: AdamWConfig::for_steps(6),
                        precision: Default::default(),
                    };
                    let mut e =
                        Engine::new(spec, text.clone(), text[..400].to_vec(), tch::Device::Cpu)
                            .unwrap();
                    e.zero_shards(world, rank).unwrap();
                    let g = BlockingGroup::connect(GroupConfig::new(rank, peers), l).unwrap();
                    f(rank, e, g)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::on_ranks;
    use super::*;

    /// Step 0 with gradient checks on; `corrupt(attempt)` says whether rank 1 flips a bit
    /// in that attempt. Returns each rank's outcome of the first two attempts.
    fn checked_step(corrupt: fn(usize) -> bool) -> Vec<Vec<String>> {
        on_ranks(3, 6, move |rank, mut e, mut g| {
            let mut s = Stepper::new(&e, &g, &[], Duration::from_secs(30)).unwrap();
            s.grad_check_every = 1;
            (0..2)
                .map(|attempt| {
                    s.corrupt_next_checked_grad = rank == 1 && corrupt(attempt);
                    match s.step(&mut e, &mut g) {
                        Ok(r) => format!("ok {}", r.step),
                        Err(WorkerError::GradientMismatch {
                            owner,
                            verifier,
                            micro,
                            ..
                        }) => {
                            format!("mismatch owner {owner} verifier {verifier} micro {micro}")
                        }
                        Err(WorkerError::GradientCorrupt { rank, .. }) => format!("corrupt {rank}"),
                        Err(other) => format!("{other}"),
                    }
                })
                .collect()
        })
    }

    #[test]
    fn a_transient_gradient_flip_is_caught_and_the_redo_passes() {
        let outcomes = checked_step(|attempt| attempt == 0);
        for o in &outcomes {
            assert_eq!(o[0], "mismatch owner 1 verifier 0 micro 1", "{outcomes:?}");
            assert_eq!(o[1], "ok 0", "the redo of step 0 applies: {outcomes:?}");
        }
    }

    #[test]
    fn a_device_that_corrupts_again_is_named_by_a_third_computation() {
        let outcomes = checked_step(|_| true);
        for o in &outcomes {
            assert_eq!(o[0], "mismatch owner 1 verifier 0 micro 1", "{outcomes:?}");
            assert_eq!(o[1], "corrupt 1", "{outcomes:?}");
        }
    }

    /// Runs 3 steps on `world` ranks; every rank's parameter hash and losses.
    fn three_steps(world: usize) -> Vec<(String, Vec<u64>)> {
        on_ranks(world, 8, |_, mut e, mut g| {
            let mut s = Stepper::new(&e, &g, &[], Duration::from_secs(30)).unwrap();
            let losses = (0..3)
                .map(|_| s.step(&mut e, &mut g).unwrap().loss.to_bits())
                .collect();
            (e.params_sha256(), losses)
        })
    }

    #[test]
    fn a_rank_alone_reduces_from_the_tensors_to_the_same_bits_as_a_group() {
        let alone = three_steps(1);
        let pair = three_steps(2);
        assert_eq!(
            alone[0], pair[0],
            "world 1 (local mean) vs world 2 (reduce_mean)"
        );
        assert_eq!(pair[0], pair[1]);
    }

    #[test]
    fn the_local_mean_equals_reduce_mean_of_the_flat_gradients() {
        on_ranks(1, 8, |_, e, mut g| {
            let n = e.params.len();
            let mut tensors = Vec::new();
            let mut flats = Vec::new();
            for m in 0..4 {
                let (_, t) = e.micro_grad_tensors(0, m).unwrap();
                let mut flat = vec![0f32; n];
                e.model.copy_grads(&t, &mut flat).unwrap();
                tensors.push(t);
                flats.push(flat);
            }
            let mut local = vec![0f32; n];
            let done =
                crate::local_mean::local_mean(&tensors, None, &e.model.layout, &mut local).unwrap();
            assert!(done, "CPU f32 gradients are read in place");
            let refs: Vec<&[f32]> = flats.iter().map(|f| f.as_slice()).collect();
            let mut reduced = vec![0f32; n];
            deterministic::reduce_mean(&mut g, &refs, 4, &mut reduced, Duration::from_secs(30))
                .unwrap();
            assert!(local
                .iter()
                .zip(&reduced)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // A NaN is refused with its place, as reduce_mean refuses it.
            let mut bad = tensors[2][3].copy();
            let _ = bad.f_fill_(f64::NAN).unwrap();
            tensors[2][3] = bad;
            let e2 = crate::local_mean::local_mean(&tensors, None, &e.model.layout, &mut local)
                .unwrap_err()
                .to_string();
            let at = e.model.layout.slots[3].offset;
            assert!(
                e2.contains(&format!("micro-batch 2 element {at} = NaN")),
                "{e2}"
            );
        });
    }

    #[test]
    fn the_compute_window_reports_the_median_of_its_last_steps() {
        let mut w = ComputeWindow::default();
        assert_eq!(w.median(), None);
        w.push(0.0);
        w.push(f64::NAN);
        assert_eq!(w.median(), None, "non-measurements are skipped");
        for t in [10.0, 11.0, 200.0, 9.0, 10.5] {
            w.push(t);
        }
        assert_eq!(w.median(), Some(10.5), "one outlier does not move it");
        for _ in 0..ComputeWindow::LEN {
            w.push(40.0);
        }
        assert_eq!(w.median(), Some(40.0), "old steps leave the window");
    }
}
