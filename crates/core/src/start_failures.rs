//! A job that cannot run says so: a worker that fails to start its rank (a corpus it
//! cannot read, a model it cannot build) reports why; each report is an event, and after
//! [`START_ATTEMPTS_MAX`] reports the job is `failed` with the last reason.
use phalanx_proto::{EventKind, JobState, Outcome};

use crate::state::{no, ok, ClusterState};

/// Start failures after which a job is failed. Every rank of an epoch tries once and the
/// workers retry with a backoff, so three reports come within seconds of the submission
/// when the cause is permanent, while one worker's passing trouble does not end the job.
pub const START_ATTEMPTS_MAX: u32 = 3;

impl ClusterState {
    pub(crate) fn start_failure(
        &mut self,
        index: u64,
        worker: &str,
        job_id: &str,
        epoch: u64,
        reason: &str,
    ) -> Outcome {
        if self.too_long_text(reason) {
            return no("reason too long");
        }
        let Some(j) = self.job.as_mut() else {
            return no("no job");
        };
        if j.id != job_id {
            return no(format!(
                "stale report about job {job_id}; the job is {}",
                j.id
            ));
        }
        if j.state.is_terminal() {
            return ok(format!("job {} already {}", j.spec.name, j.state.as_str()));
        }
        j.start_failures += 1;
        let n = j.start_failures;
        let name = j.spec.name.clone();
        let why = format!("worker {worker} (epoch {epoch}): {reason}");
        if n < START_ATTEMPTS_MAX {
            self.event(
                index,
                EventKind::JobStartFailed,
                &name,
                format!("attempt {n} of {START_ATTEMPTS_MAX}: {why}"),
            );
            return ok(format!("start failure {n} of job {name} recorded"));
        }
        let j = self.job.as_mut().expect("checked above");
        j.state = JobState::Failed;
        j.failure = Some(why.clone());
        self.event(
            index,
            EventKind::JobFailed,
            &name,
            format!("{n} start failures; the last: {why}"),
        );
        ok(format!("job {name} failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::START_ATTEMPTS_MAX;
    use crate::state::{ClusterState, StateLimits};
    use phalanx_proto::{Command, DeviceSpec, Envelope, JobSpec, JobState};

    fn env(id: &str, command: Command) -> Envelope {
        Envelope {
            request_id: id.into(),
            command,
        }
    }

    #[test]
    fn a_job_whose_workers_cannot_start_it_fails_with_the_reason() {
        let mut s = ClusterState::new(StateLimits::default());
        s.apply(
            1,
            &env(
                "reg",
                Command::RegisterWorker {
                    id: "w0".into(),
                    address: "127.0.0.1:9000".into(),
                    device: DeviceSpec::default(),
                },
            ),
        );
        let spec = JobSpec {
            name: "bad".into(),
            model: "tiny".into(),
            corpus: "/nonexistent/*.txt".into(),
            steps: 10,
            global_batch: 2,
            seed: 1,
            checkpoint_interval_steps: 0,
            world_size_min: 1,
            world_size_max: 1,
            numerics: Default::default(),
        };
        s.apply(2, &env("submit", Command::SubmitJob { spec }));
        let id = s.job.as_ref().unwrap().id.clone();
        assert_eq!(s.job.as_ref().unwrap().state, JobState::Running);
        let stale = s.apply(
            3,
            &env(
                "stale",
                Command::ReportStartFailure {
                    worker: "w0".into(),
                    job: "other-1".into(),
                    epoch: 1,
                    reason: "x".into(),
                },
            ),
        );
        assert!(!stale.outcome.is_applied());
        for k in 0..START_ATTEMPTS_MAX {
            assert_ne!(s.job.as_ref().unwrap().state, JobState::Failed);
            let r = s.apply(
                10 + k as u64,
                &env(
                    &format!("f{k}"),
                    Command::ReportStartFailure {
                        worker: "w0".into(),
                        job: id.clone(),
                        epoch: 1,
                        reason: "corpus /nonexistent/*.txt: no file matches".into(),
                    },
                ),
            );
            assert!(r.outcome.is_applied());
        }
        let j = s.job.as_ref().unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert!(j.failure.as_deref().unwrap().contains("no file matches"));
        let kinds: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "job-start-failed").count(),
            START_ATTEMPTS_MAX as usize - 1
        );
        assert_eq!(kinds.last(), Some(&"job-failed"));
    }
}
