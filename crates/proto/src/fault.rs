//! The fault-injection message a worker reads from its inbox (chaos testing only), and
//! the one spelling of each worker-side fault kind.
use serde::{Deserialize, Serialize};

/// A fault that a worker applies to itself. Spelled in kebab-case everywhere (the CLI,
/// the inbox, the event log); the snake_case spellings of older inboxes are still read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The process exits non-zero at the next step boundary (a software bug).
    Crash,
    /// The device reports an uncorrectable memory error; the worker asks to be quarantined.
    Ecc,
    /// One bit of one parameter flips on this replica (silent data corruption).
    Sdc,
    /// One bit of this rank's gradient flips before the reduction, at its next gradient
    /// check (silent data corruption that every replica would apply alike).
    #[serde(alias = "sdc_grad")]
    SdcGrad,
    /// Steps take `factor` times as long for `for_ms` (a thermal straggler).
    Slow,
    /// Checkpoint writes fail with a disk-full error for `for_ms`.
    #[serde(alias = "disk_full")]
    DiskFull,
    /// The worker is cut off from the controllers and its peers for `for_ms`: no
    /// heartbeats, its collective group is dropped, it joins no group; then it re-registers.
    Partition,
    /// Ends every lasting fault of this worker now (slow, disk-full, partition).
    Heal,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::Ecc => "ecc",
            FaultKind::Sdc => "sdc",
            FaultKind::SdcGrad => "sdc-grad",
            FaultKind::Slow => "slow",
            FaultKind::DiskFull => "disk-full",
            FaultKind::Partition => "partition",
            FaultKind::Heal => "heal",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a worker's fault inbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub seq: u64,
    pub kind: FaultKind,
    #[serde(default)]
    pub factor: f64,
    /// How long a lasting fault lasts; 0 with a lasting kind: until healed.
    #[serde(default)]
    pub for_ms: u64,
}

/// The largest slowdown factor of a `slow` fault: a step a thousand times as long is
/// already a hang for every detector; a larger one (or `inf`, `NaN`) is a typing error.
pub const SLOW_FACTOR_MAX: f64 = 1000.0;

/// The longest a lasting fault may last, in ms (a day; longer: until healed).
pub const FOR_MS_MAX: u64 = 86_400_000;

/// `None` when `factor` is a slowdown factor `slow` can take, else what is wrong with it.
pub fn slow_factor_problem(factor: f64) -> Option<String> {
    (!(factor.is_finite() && factor > 1.0 && factor <= SLOW_FACTOR_MAX))
        .then(|| format!("factor = {factor:?}: expected more than 1, at most {SLOW_FACTOR_MAX}"))
}

impl Fault {
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.for_ms)
    }

    /// Whether a line read from an inbox (a file anyone with access may write) can be
    /// acted on: a `slow` fault's factor in range, a duration of at most a day.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind == FaultKind::Slow {
            if let Some(p) = slow_factor_problem(self.factor) {
                return Err(p);
            }
        }
        if self.for_ms > FOR_MS_MAX {
            return Err(format!(
                "for_ms = {}: at most {FOR_MS_MAX} (a day); 0 lasts until healed",
                self.for_ms
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_factor_out_of_range_is_named() {
        let f = |factor, for_ms| Fault {
            seq: 1,
            kind: FaultKind::Slow,
            factor,
            for_ms,
        };
        assert_eq!(f(4.0, 5_000).validate(), Ok(()));
        assert_eq!(f(4.0, 0).validate(), Ok(()));
        for bad in [1.0, 0.5, -3.0, 1e300, f64::INFINITY, f64::NAN, 1000.5] {
            let e = f(bad, 5_000).validate().unwrap_err();
            assert!(e.starts_with(&format!("factor = {bad:?}:")), "{e}");
        }
        assert!(f(4.0, FOR_MS_MAX + 1)
            .validate()
            .unwrap_err()
            .contains("for_ms"));
        // Other kinds carry no factor.
        let crash = Fault {
            kind: FaultKind::Crash,
            ..f(0.0, 0)
        };
        assert_eq!(crash.validate(), Ok(()));
    }

    #[test]
    fn kinds_are_kebab_case_and_old_snake_case_lines_still_read() {
        let f = Fault {
            seq: 1,
            kind: FaultKind::DiskFull,
            factor: 0.0,
            for_ms: 5,
        };
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.contains("\"disk-full\""), "{s}");
        let old: Fault = serde_json::from_str(r#"{"seq":2,"kind":"sdc_grad"}"#).unwrap();
        assert_eq!(old.kind, FaultKind::SdcGrad);
        for k in [FaultKind::SdcGrad, FaultKind::DiskFull, FaultKind::Heal] {
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{}\"", k.as_str()));
        }
    }
}
