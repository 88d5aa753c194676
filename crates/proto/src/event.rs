//! The kinds of the controller's events: one enum, one kebab-case spelling, used by the
//! state machine that records them, the CLI that prints them, the JSON of the API and
//! the scenario files that expect them. The snake_case spellings of earlier releases
//! are still read (old scenario files; event logs recorded before keep their text).
use serde::{Deserialize, Serialize};

macro_rules! event_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal $(| $alias:literal)? ,)*) => {
        /// The kind of one event of the controller's log (`phalanx events`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
        pub enum EventKind {
            $( $(#[$doc])* #[serde(rename = $name $(, alias = $alias)?)] $variant, )*
        }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// The one spelling (kebab-case).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $name,)*
                }
            }

            /// The kind spelled `s`, or spelled so by an earlier release (snake_case).
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($name $(| $alias)? => Some(EventKind::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

event_kinds! {
    /// A new plan epoch (ranks and their workers).
    Plan = "plan",
    /// Rank 0 of an epoch says where the state came from.
    Resumed = "resumed",
    /// The controllers' membership changed.
    Members = "members",
    WorkerRegistered = "worker-registered" | "worker_registered",
    WorkerJoining = "worker-joining" | "worker_joining",
    WorkerHealthy = "worker-healthy" | "worker_healthy",
    WorkerSuspect = "worker-suspect" | "worker_suspect",
    WorkerFailed = "worker-failed" | "worker_failed",
    WorkerDraining = "worker-draining" | "worker_draining",
    WorkerQuarantined = "worker-quarantined" | "worker_quarantined",
    WorkerSpare = "worker-spare" | "worker_spare",
    /// The operator took a drain back.
    WorkerUndrained = "worker-undrained" | "worker_undrained",
    /// The operator brought a quarantined worker back.
    WorkerRestored = "worker-restored" | "worker_restored",
    StragglerShare = "straggler-share" | "straggler_share",
    EpochStuck = "epoch-stuck" | "epoch_stuck",
    GradientMismatch = "gradient-mismatch" | "gradient_mismatch",
    FaultInjected = "fault-injected" | "fault_injected",
    CheckpointDurable = "checkpoint-durable" | "checkpoint_durable",
    CheckpointRefused = "checkpoint-refused" | "checkpoint_refused",
    JobSubmitted = "job-submitted" | "job_submitted",
    JobWaiting = "job-waiting" | "job_waiting",
    JobCompleted = "job-completed" | "job_completed",
    JobResult = "job-result" | "job_result",
    JobCancelled = "job-cancelled" | "job_cancelled",
    /// A worker could not start its rank of the job.
    JobStartFailed = "job-start-failed" | "job_start_failed",
    /// The job cannot run (its workers failed to start it again and again).
    JobFailed = "job-failed" | "job_failed",
}

impl EventKind {
    /// The event of a worker's move to `health`.
    pub fn of_health(health: crate::WorkerHealth) -> Self {
        use crate::WorkerHealth as H;
        match health {
            H::Joining => EventKind::WorkerJoining,
            H::Healthy => EventKind::WorkerHealthy,
            H::Suspect => EventKind::WorkerSuspect,
            H::Failed => EventKind::WorkerFailed,
            H::Draining => EventKind::WorkerDraining,
            H::Quarantined => EventKind::WorkerQuarantined,
            H::Spare => EventKind::WorkerSpare,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_kebab_case_spelling_and_the_old_ones_still_read() {
        for k in EventKind::ALL {
            let s = k.as_str();
            assert!(!s.contains('_') && s == s.to_lowercase(), "{s}");
            assert_eq!(serde_json::to_string(k).unwrap(), format!("\"{s}\""));
            assert_eq!(EventKind::parse(s), Some(*k));
            let old = s.replace('-', "_");
            assert_eq!(EventKind::parse(&old), Some(*k), "{old}");
            let back: EventKind = serde_json::from_str(&format!("\"{old}\"")).unwrap();
            assert_eq!(back, *k);
        }
        assert_eq!(
            EventKind::of_health(crate::WorkerHealth::Failed).as_str(),
            "worker-failed"
        );
    }
}
