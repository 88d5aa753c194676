//! A job that cannot run says so: a worker that fails to start its rank (a corpus it
//! cannot read, a model it cannot build) reports why; each report is an event, and after
//! [`START_ATTEMPTS_MAX`] reports since the job's last progress, from as many distinct
//! workers as its plan has ranks (up to that number), the job is `failed` with the last
//! reason. One worker's passing trouble therefore never ends a job that has other
//! workers, and progress clears the count.
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
        if !j.start_failed_workers.iter().any(|w| w == worker) {
            j.start_failed_workers.push(worker.to_string());
        }
        let n = j.start_failures;
        let distinct = j.start_failed_workers.len() as u32;
        let ranks = j.plan.as_ref().map(|p| p.ranks.len() as u32).unwrap_or(1);
        let distinct_needed = START_ATTEMPTS_MAX.min(ranks.max(1));
        let name = j.spec.name.clone();
        let why = format!("worker {worker} (epoch {epoch}): {reason}");
        if n < START_ATTEMPTS_MAX || distinct < distinct_needed {
            self.event(
                index,
                EventKind::JobStartFailed,
                &name,
                format!(
                    "attempt {n} ({distinct} of {distinct_needed} distinct workers needed to \
                     fail the job): {why}"
                ),
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
            format!("{n} start failures from {distinct} workers; the last: {why}"),
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
            trace: None,
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
            model: phalanx_proto::ModelPreset::Tiny,
            corpus: "/nonexistent/*.txt".into(),
            steps: 10,
            global_batch: 2,
            seed: 1,
            checkpoint_interval_steps: 0,
            world_size_min: 1,
            world_size_max: 1,
            numerics: Default::default(),
            precision: Default::default(),
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

    #[test]
    fn one_workers_repeated_failures_do_not_fail_a_job_that_has_others() {
        let mut s = ClusterState::new(StateLimits::default());
        for (i, w) in ["w0", "w1", "w2"].iter().enumerate() {
            s.apply(
                1 + i as u64,
                &env(
                    &format!("reg-{w}"),
                    Command::RegisterWorker {
                        id: (*w).into(),
                        address: format!("127.0.0.1:{}", 9000 + i),
                        device: DeviceSpec::default(),
                    },
                ),
            );
        }
        let spec = JobSpec {
            name: "flaky".into(),
            model: phalanx_proto::ModelPreset::Tiny,
            corpus: "default".into(),
            steps: 10,
            global_batch: 6,
            seed: 1,
            checkpoint_interval_steps: 0,
            world_size_min: 1,
            world_size_max: 3,
            numerics: Default::default(),
            precision: Default::default(),
        };
        s.apply(10, &env("submit", Command::SubmitJob { spec }));
        let id = s.job.as_ref().unwrap().id.clone();
        assert_eq!(
            s.job.as_ref().unwrap().plan.as_ref().unwrap().ranks.len(),
            3
        );
        let mut index = 20;
        let mut report = |s: &mut ClusterState, w: &str| {
            index += 1;
            s.apply(
                index,
                &env(
                    &format!("f{index}"),
                    Command::ReportStartFailure {
                        worker: w.into(),
                        job: id.clone(),
                        epoch: 1,
                        reason: "device busy".into(),
                    },
                ),
            )
        };
        for _ in 0..2 * START_ATTEMPTS_MAX {
            assert!(report(&mut s, "w0").outcome.is_applied());
        }
        assert_eq!(s.job.as_ref().unwrap().state, JobState::Running);
        report(&mut s, "w1");
        assert_eq!(s.job.as_ref().unwrap().state, JobState::Running);
        report(&mut s, "w2");
        let j = s.job.as_ref().unwrap();
        assert_eq!(
            j.state,
            JobState::Failed,
            "three distinct workers failed to start it"
        );
        assert!(j.failure.as_deref().unwrap().contains("w2"));
    }
}
