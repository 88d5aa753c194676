//! The pure controller: the replicated state machine and the policies.
//!
//! No I/O, no tokio, no wall clock, no thread RNG: time comes in as `now_ms` arguments,
//! and `apply` is a deterministic function of the committed log.

pub mod authz;
pub mod history;
pub mod jobfile;
pub mod leader_duties;
pub mod leases;
mod operator;
pub mod policy;
mod start_failures;
pub mod state;
pub mod throughput;

pub use jobfile::{job_template, parse_job_toml, validate_job, JobFileError};
pub use leader_duties::{DutiesConfig, Duty, DutyKind, LeaderDuties};
pub use leases::{LeaseConfig, LeaseDecision, Leases};
pub use policy::{PlacementDecision, Reason, StragglerConfig, StragglerDecision, Stragglers};
pub use start_failures::START_ATTEMPTS_MAX;
pub use state::{Applied, ClusterState, SnapshotError, StateLimits};

/// `<root>/<job id>`: a job's own checkpoint directory. The id is the job's name (letters,
/// digits, `-`, `_`, `.`, validated at submission) and its submission index; anything
/// else is refused rather than joined into a path.
pub fn job_checkpoint_dir(
    root: &std::path::Path,
    job_id: &str,
) -> Result<std::path::PathBuf, String> {
    let ok = !job_id.is_empty()
        && job_id.len() <= 200
        && !job_id.starts_with('.')
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(format!("job id {job_id:?} is not a safe directory name"));
    }
    Ok(root.join(job_id))
}

/// Effective training time of a finished job: wall time from the start of training to its
/// end, minus the recovery windows its workers measured, over that wall time. `None` until
/// the job has both timestamps.
pub fn effective_training_time(job: &phalanx_proto::JobInfo) -> Option<f64> {
    let (start, end) = (job.started_at_ms?, job.finished_at_ms?);
    let wall = end.checked_sub(start).filter(|w| *w > 0)? as f64;
    let lost: u64 = job.recoveries.iter().filter_map(|r| r.mttr_ms).sum();
    Some(((wall - lost as f64) / wall).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_proto::{JobInfo, JobSpec, JobState, Recovery};

    #[test]
    fn effective_training_time_subtracts_the_recovery_windows() {
        let spec = JobSpec {
            name: "j".into(),
            model: phalanx_proto::ModelPreset::Tiny,
            corpus: "default".into(),
            steps: 10,
            global_batch: 8,
            seed: 1,
            checkpoint_interval_steps: 0,
            world_size_min: 1,
            world_size_max: 1,
            numerics: Default::default(),
            precision: Default::default(),
        };
        let rec = |ms| Recovery {
            epoch: 2,
            source: "peers".into(),
            source_kind: Some(phalanx_proto::StateSource::Peer),
            resumed_at_step: 1,
            steps_redone: 0,
            mttr_ms: ms,
        };
        let mut job = JobInfo {
            id: "j-1".into(),
            spec,
            state: JobState::Completed,
            plan: None,
            progress_step: 10,
            rank_steps: vec![],
            params_sha256: None,
            recoveries: vec![rec(Some(1_000)), rec(None), rec(Some(1_000))],
            checkpoint_stall_us: vec![],
            started_at_ms: Some(10_000),
            finished_at_ms: None,
            failure: None,
            start_failures: 0,
            start_failed_workers: Vec::new(),
            history: Default::default(),
            throughput: None,
        };
        assert_eq!(effective_training_time(&job), None);
        job.finished_at_ms = Some(30_000);
        assert!((effective_training_time(&job).unwrap() - 0.9).abs() < 1e-12);
        job.finished_at_ms = Some(5_000);
        assert_eq!(effective_training_time(&job), None);
    }
}
