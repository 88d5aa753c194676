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

impl Fault {
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.for_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
