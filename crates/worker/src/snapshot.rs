//! Checkpoint snapshots that cost the training loop next to nothing.
//!
//! At a step boundary [`Snapshots::take`] hands the rank's checkpoint state (the
//! parameters of its ZeRO-1 range and its own optimizer shard) to the asynchronous writer
//! by reference: three `Arc` clones. The writer's stager copies it off the training
//! thread while the next step runs forward and backward, which never touch the flat
//! parameter vector or the moments. Right before the optimizer writes them,
//! [`Snapshots::release`] waits for that copy; it has normally finished long before.
//!
//! The stall of a checkpoint is what the training thread spent in both calls. It is kept
//! per step until [`Snapshots::take_stall`] reports it.
use std::time::{Duration, Instant};

use phalanx_checkpoint::{AsyncCheckpointer, SharedRankState};
use phalanx_train::engine::Engine;
use tracing::warn;

/// How long [`Snapshots::release`] waits before letting the update copy the state instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stalls kept for steps not yet reported.
const STALLS_KEPT: usize = 8;

pub struct Snapshots {
    writer: AsyncCheckpointer,
    seed: u64,
    /// The step of a snapshot whose buffers the writer may still hold.
    unreleased: Option<u64>,
    /// (step, time the training thread was blocked by its snapshot).
    stalls: Vec<(u64, Duration)>,
}

impl Snapshots {
    pub fn new(writer: AsyncCheckpointer, seed: u64) -> Self {
        Self {
            writer,
            seed,
            unreleased: None,
            stalls: Vec::new(),
        }
    }

    pub fn writer(&self) -> &AsyncCheckpointer {
        &self.writer
    }

    /// Queues a checkpoint of the engine's state at its current step. O(1); a refusal
    /// (the writer is still busy with earlier snapshots) is logged and training goes on.
    pub fn take(&mut self, engine: &Engine) {
        let t = Instant::now();
        let step = engine.step();
        let st = SharedRankState {
            step,
            seed: self.seed,
            params: engine.params.clone(),
            range: engine.opt.range.clone(),
            m: engine.opt.m.clone(),
            v: engine.opt.v.clone(),
            opt_step: engine.opt.step,
            extra: Vec::new(),
        };
        match self.writer.snapshot_shared(st) {
            Ok(()) => self.unreleased = Some(step),
            Err(e) => warn!(error = %e, "checkpoint snapshot refused; training goes on"),
        }
        self.add_stall(step, t.elapsed());
    }

    /// Call right before the optimizer writes the parameters and moments: waits until the
    /// writer has copied the last snapshot. On timeout the update goes on and
    /// `Arc::make_mut` copies the state instead: slower, never wrong.
    pub fn release(&mut self) {
        let Some(step) = self.unreleased.take() else {
            return;
        };
        let t = Instant::now();
        if let Err(e) = self.writer.wait_released(step, RELEASE_TIMEOUT) {
            warn!(step, error = %e, "the checkpoint writer still holds the state; the update copies it");
        }
        self.add_stall(step, t.elapsed());
    }

    /// The training-thread time spent on the snapshot of `step`, once; older entries go.
    pub fn take_stall(&mut self, step: u64) -> Option<Duration> {
        let found = self
            .stalls
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, d)| *d);
        self.stalls.retain(|(s, _)| *s > step);
        found
    }

    /// The training-thread time spent on the snapshot of `step` so far (kept).
    pub fn stall(&self, step: u64) -> Option<Duration> {
        self.stalls
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, d)| *d)
    }

    fn add_stall(&mut self, step: u64, blocked: Duration) {
        match self.stalls.iter_mut().find(|(s, _)| *s == step) {
            Some((_, total)) => *total += blocked,
            None => {
                self.stalls.push((step, blocked));
                if self.stalls.len() > STALLS_KEPT {
                    self.stalls.remove(0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::testing::on_ranks;
    use crate::dp::Stepper;
    use phalanx_checkpoint::{load_range, CheckpointerConfig};

    #[test]
    fn a_snapshot_holds_its_step_while_training_goes_on() {
        on_ranks(1, 4, |_, mut e, mut group| {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = CheckpointerConfig::new(dir.path(), 1, 0);
            cfg.auto_commit = true;
            let (writer, _events) = AsyncCheckpointer::spawn(cfg).unwrap();
            let mut snaps = Snapshots::new(writer, 5);
            let mut stepper = Stepper::new(&e, &group, &[], Duration::from_secs(30)).unwrap();
            let mut at_2 = None;
            while e.step() < 5 {
                stepper
                    .step_with(&mut e, &mut group, &mut || snaps.release())
                    .unwrap();
                if e.step() == 2 {
                    snaps.take(&e);
                    at_2 = Some((e.params.to_vec(), e.opt.m.to_vec(), e.opt.v.to_vec()));
                }
            }
            assert!(
                snaps.take_stall(2).is_some(),
                "the stall of step 2 is recorded"
            );
            assert!(snaps.writer().wait_idle(Duration::from_secs(30)));
            let (params, m, v) = at_2.unwrap();
            assert_ne!(e.params.as_slice(), params.as_slice(), "training went on");
            let loaded = load_range(dir.path(), 2, 0..params.len()).unwrap();
            assert_eq!(loaded.opt_step, 2);
            assert_eq!(
                loaded.params, params,
                "the checkpoint holds step 2's parameters"
            );
            assert_eq!((loaded.m, loaded.v), (m, v), "and step 2's moments");
        });
    }
}
