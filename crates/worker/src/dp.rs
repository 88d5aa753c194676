//! The deterministic data-parallel step loop.
use std::time::{Duration, Instant};

use phalanx_collective::{deterministic, BlockingGroup};
use phalanx_train::engine::Engine;
use phalanx_train::sampler::assign;
use serde::{Deserialize, Serialize};

use crate::WorkerError;

/// What rank 0 reports after each step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f64,
    pub step_ms: f64,
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
    pub params_sha256: String,
    pub param_count: usize,
}

pub struct DpOptions {
    pub op_timeout: Duration,
}

/// Trains `engine.spec.steps` steps as rank `group.rank()` of `group.world()`.
pub fn train(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    opts: &DpOptions,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunResult, WorkerError> {
    let (rank, world) = (group.rank(), group.world());
    let m_total = engine.spec.micro_batches();
    if world > m_total {
        return Err(WorkerError::Protocol(format!(
            "world size {world} exceeds the {m_total} micro-batches of a step; lower --workers or --micro-batch"
        )));
    }
    let mine = assign(m_total, world, rank);
    let n = engine.params.len();
    let mut bufs: Vec<Vec<f32>> = mine.clone().map(|_| vec![0f32; n]).collect();
    let mut mean = vec![0f32; n];
    let mut losses = Vec::with_capacity(engine.spec.steps as usize);
    let start = Instant::now();
    for step in 0..engine.spec.steps {
        let t0 = Instant::now();
        let mut local_losses = Vec::with_capacity(mine.len());
        for (k, m) in mine.clone().enumerate() {
            local_losses.push((m, engine.micro_grad(step, m, &mut bufs[k])?));
        }
        let refs: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        deterministic::reduce_mean(group, &refs, m_total, &mut mean, opts.op_timeout)?;
        let loss = mean_in_index_order(group, &local_losses, m_total, opts.op_timeout)?;
        let stats = engine.apply(&mean)?;
        losses.push(loss);
        on_step(&StepReport {
            step,
            loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
        });
    }
    let train_s = start.elapsed().as_secs_f64();

    let v_total = engine.spec.val_micro_batches.max(world);
    let val_mine: Vec<(usize, f64)> = assign(v_total, world, rank)
        .map(|m| engine.val_loss(m).map(|l| (m, l)))
        .collect::<Result<_, _>>()?;
    let val_loss = mean_in_index_order(group, &val_mine, v_total, opts.op_timeout)?;

    // Every replica must hold the same bits; a mismatch is silent data corruption.
    let sha = engine.params_sha256();
    let all = group.all_gather_within(sha.as_bytes(), opts.op_timeout)?;
    for (r, theirs) in all.iter().enumerate() {
        if theirs.as_slice() != all[0].as_slice() {
            return Err(WorkerError::Diverged {
                rank: r,
                ours: String::from_utf8_lossy(&all[0]).into_owned(),
                theirs: String::from_utf8_lossy(theirs).into_owned(),
            });
        }
    }
    Ok(RunResult {
        steps: engine.spec.steps,
        workers: world,
        initial_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        val_loss,
        tokens_per_sec: (engine.spec.tokens_per_step() * engine.spec.steps) as f64 / train_s.max(1e-9),
        train_s,
        losses,
        params_sha256: sha,
        param_count: n,
    })
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
            return Err(WorkerError::Protocol(format!("rank {r} sent a loss record of {} bytes", part.len())));
        }
        for rec in part.chunks_exact(16) {
            let i = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            let v = f64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            match slots.get_mut(i) {
                Some(s @ None) => *s = Some(v),
                _ => return Err(WorkerError::Protocol(format!("rank {r} sent micro-batch index {i} twice or out of range"))),
            }
        }
    }
    let mut sum = 0.0;
    for (i, s) in slots.iter().enumerate() {
        sum += s.ok_or_else(|| WorkerError::Protocol(format!("no rank reported micro-batch {i}")))?;
    }
    Ok(sum / total as f64)
}
