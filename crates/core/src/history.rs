//! A job's history for the dashboard: the loss curve and each rank's compute time, as the
//! ranks report them with their progress. Bounded: at most [`SAMPLES_MAX`] samples, thinned
//! (every other one dropped, the stride doubled) when full, so the curve always spans the
//! whole run at a resolution that halves as it grows.

use phalanx_proto::{JobHistory, StepSample};

/// The most samples a job keeps.
pub const SAMPLES_MAX: usize = 256;

/// What one rank reported with its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankReport {
    pub epoch: u64,
    /// The number of ranks of that epoch's plan.
    pub ranks: usize,
    pub rank: usize,
    pub step: u64,
    pub loss_millionths: Option<u64>,
    pub compute_us: Option<u64>,
}

/// Record one rank's report. The first report of a step that is at least `stride` past
/// the last sample adds a sample (the loss is the same on every rank; the compute times
/// are each rank's newest). Steps trained again after a recovery (their loss is the same
/// again) add nothing.
pub fn record(h: &mut JobHistory, r: RankReport) {
    if r.rank >= r.ranks {
        return;
    }
    if h.epoch != r.epoch || h.rank_compute_us.len() != r.ranks {
        h.epoch = r.epoch;
        h.rank_compute_us = vec![0; r.ranks];
    }
    if let Some(us) = r.compute_us {
        h.rank_compute_us[r.rank] = us;
    }
    let Some(loss) = r.loss_millionths else {
        return;
    };
    let stride = h.stride.max(1);
    if h.samples.last().is_some_and(|s| r.step < s.step + stride) {
        return;
    }
    h.samples.push(StepSample {
        step: r.step,
        epoch: r.epoch,
        loss_millionths: loss,
        compute_us: h.rank_compute_us.clone(),
    });
    h.stride = stride;
    if h.samples.len() > SAMPLES_MAX {
        let mut i = 0;
        h.samples.retain(|_| {
            i += 1;
            i % 2 == 1
        });
        h.stride = stride * 2;
    }
}

/// A loss as the worker measured it, in millionths; `None` for a loss that is not a
/// finite number in `0..1e9` (nothing to plot).
pub fn loss_millionths(loss: f64) -> Option<u64> {
    (loss.is_finite() && (0.0..1e9).contains(&loss)).then(|| (loss * 1e6).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(rank: usize, step: u64, loss: Option<u64>, us: Option<u64>) -> RankReport {
        RankReport {
            epoch: 1,
            ranks: 2,
            rank,
            step,
            loss_millionths: loss,
            compute_us: us,
        }
    }

    #[test]
    fn one_sample_per_step_with_every_ranks_newest_compute_time() {
        let mut h = JobHistory::default();
        record(&mut h, rep(1, 1, Some(5_000_000), Some(900)));
        record(&mut h, rep(0, 1, Some(5_000_000), Some(100)));
        record(&mut h, rep(0, 2, Some(4_000_000), Some(110)));
        assert_eq!(h.samples.len(), 2);
        assert_eq!(h.samples[0].compute_us, vec![0, 900]);
        assert_eq!(h.samples[1].compute_us, vec![110, 900]);
        assert_eq!(h.rank_compute_us, vec![110, 900]);
        // A step trained again after a recovery adds nothing.
        record(&mut h, rep(0, 1, Some(5_000_000), None));
        assert_eq!(h.samples.len(), 2);
        // A new epoch starts the compute times afresh.
        record(
            &mut h,
            RankReport {
                epoch: 2,
                ranks: 3,
                ..rep(2, 3, None, Some(7))
            },
        );
        assert_eq!((h.epoch, h.rank_compute_us.clone()), (2, vec![0, 0, 7]));
        // A rank outside the plan is ignored.
        record(&mut h, rep(5, 9, Some(1), Some(1)));
        assert_eq!(h.samples.len(), 2);
    }

    #[test]
    fn stays_bounded_and_spans_the_whole_run() {
        let mut h = JobHistory::default();
        for step in 1..=10_000 {
            record(&mut h, rep(0, step, Some(step), Some(1)));
            assert!(h.samples.len() <= SAMPLES_MAX);
        }
        assert_eq!(h.samples[0].step, 1);
        assert!(h.samples.last().unwrap().step > 10_000 - h.stride);
        assert!(h
            .samples
            .windows(2)
            .all(|w| w[1].step - w[0].step <= h.stride));
        assert!(h.samples.len() > SAMPLES_MAX / 2);
    }

    #[test]
    fn losses_that_are_not_numbers_are_not_recorded() {
        assert_eq!(loss_millionths(2.5), Some(2_500_000));
        assert_eq!(loss_millionths(f64::NAN), None);
        assert_eq!(loss_millionths(-1.0), None);
        assert_eq!(loss_millionths(f64::INFINITY), None);
    }
}
