//! The pure controller: the replicated state machine and the policies.
//!
//! No I/O, no tokio, no wall clock, no thread RNG: time comes in as `now_ms` arguments,
//! and `apply` is a deterministic function of the committed log.

pub mod jobfile;
pub mod policy;
pub mod state;

pub use jobfile::{job_template, parse_job_toml, validate_job, JobFileError};
pub use policy::{LeaseConfig, LeaseDecision, Leases, PlacementDecision, Reason, StragglerConfig, Stragglers};
pub use state::{Applied, ClusterState, SnapshotError, StateLimits};
