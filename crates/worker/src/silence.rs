//! Progress-based detection of silent peers (hangs, cuts, stalls).
//!
//! A rank knows how long the group's steps have recently taken. A peer that makes no
//! progress on a link for `factor ×` the median step time (at least `floor`, at most the
//! operation timeout) is reported to the controller at once, in a heartbeat that names the
//! peer's rank and epoch. The operation goes on waiting: a slow peer costs only the report.
//! The controller confirms a report against the named worker's own heartbeats (see
//! `phalanx_core::Leases`) and, when they have stopped too, fails it and plans a new
//! epoch; the reporting worker watches its assignment closely for a few seconds, so the
//! new plan cancels the blocked operation within tens of milliseconds.
use std::collections::VecDeque;
use std::time::Duration;

/// How many recent step times the median is taken over.
pub const STEP_WINDOW: usize = 9;

/// The silence threshold's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SilenceConfig {
    /// A peer silent for this many median step times is reported.
    pub factor: f64,
    /// Never report sooner than this (very short steps jitter more than they last).
    pub floor: Duration,
}

impl Default for SilenceConfig {
    fn default() -> Self {
        SilenceConfig {
            factor: 4.0,
            floor: Duration::from_millis(150),
        }
    }
}

impl SilenceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(format!(
                "silence factor {} must be a number >= 1",
                self.factor
            ));
        }
        if self.floor.is_zero() {
            return Err("silence floor must be > 0 ms".into());
        }
        Ok(())
    }

    /// The threshold for the group's recent step times: `factor ×` their median, at
    /// least the floor, at most `cap` (the operation timeout, which stays the outer
    /// bound). Without a measured step yet, the cap.
    pub fn threshold(&self, steps: &StepTimes, cap: Duration) -> Duration {
        match steps.median_ms() {
            None => cap,
            Some(ms) => Duration::from_secs_f64(ms * self.factor / 1e3)
                .max(self.floor)
                .min(cap),
        }
    }
}

/// The wall times of the group's recent steps, in ms (they include waiting for peers: the
/// group's pace, not this rank's compute).
#[derive(Debug, Clone, Default)]
pub struct StepTimes(VecDeque<f64>);

impl StepTimes {
    pub fn push(&mut self, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        if self.0.len() == STEP_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    pub fn median_ms(&self) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_follows_the_median_step_between_floor_and_cap() {
        let cfg = SilenceConfig::default();
        let cap = Duration::from_secs(3);
        let mut s = StepTimes::default();
        assert_eq!(
            cfg.threshold(&s, cap),
            cap,
            "no steps yet: only the timeout"
        );
        for ms in [30.0, 35.0, 2_000.0, 32.0, 31.0] {
            s.push(ms);
        }
        // Median 32 ms (one outlier does not move it): 4 × 32 = 128 ms, under the floor.
        assert_eq!(cfg.threshold(&s, cap), Duration::from_millis(150));
        for _ in 0..STEP_WINDOW {
            s.push(400.0);
        }
        assert_eq!(cfg.threshold(&s, cap), Duration::from_millis(1_600));
        for _ in 0..STEP_WINDOW {
            s.push(5_000.0);
        }
        assert_eq!(cfg.threshold(&s, cap), cap);
        s.push(f64::NAN);
        assert_eq!(s.median_ms(), Some(5_000.0));
    }

    #[test]
    fn bad_settings_are_refused() {
        for (factor, floor) in [(0.5, 100), (f64::NAN, 100), (4.0, 0)] {
            let c = SilenceConfig {
                factor,
                floor: Duration::from_millis(floor),
            };
            assert!(c.validate().is_err(), "{c:?}");
        }
        SilenceConfig::default().validate().unwrap();
    }
}
