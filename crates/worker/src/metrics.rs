//! The worker's metric call sites (see `phalanx_telemetry::worker`): each is a no-op
//! unless `--metrics-listen` turned the metrics on in this process.
use std::time::Duration;

use phalanx_telemetry::worker::{get, StepSample};

use crate::dp::StepReport;

/// A step this rank completed; `tokens_per_step` is the global batch's.
pub fn step(r: &StepReport, tokens_per_step: u64) {
    if let Some(m) = get() {
        m.step(&StepSample {
            step: r.step + 1,
            duration: Duration::try_from_secs_f64(r.step_ms / 1000.0).unwrap_or_default(),
            tokens: tokens_per_step,
            loss: r.loss,
            grad_norm: r.grad_norm,
        });
    }
}

/// The plan epoch this worker now trains in.
pub fn plan_epoch(epoch: u64) {
    if let Some(m) = get() {
        m.plan_epoch(epoch);
    }
}

/// This rank's shard of a checkpoint is durable after `write_ms`; its snapshot blocked
/// training for `stall`.
pub fn checkpoint_durable(write_ms: u64, stall: Option<Duration>) {
    if let Some(m) = get() {
        m.checkpoint_write(Duration::from_millis(write_ms));
        if let Some(d) = stall {
            m.checkpoint_stall(d);
        }
    }
}
