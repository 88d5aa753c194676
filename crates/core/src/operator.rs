//! The operator's reversible worker verbs: drain and undrain, quarantine's way back.
//!
//! Each verb is idempotent: asking for the state a worker is already in changes nothing
//! and is applied (not rejected), so a repeated command exits like the first one.
use phalanx_proto::{EventKind, Outcome, WorkerHealth};

use crate::state::{no, ok, ClusterState};

impl ClusterState {
    /// `worker drain`: the worker leaves the plan gracefully.
    pub(crate) fn drain(&mut self, index: u64, id: &str, reason: &str) -> Outcome {
        if self.too_long_text(reason) {
            return no("reason too long");
        }
        let Some(w) = self.workers.get_mut(id) else {
            return no(format!("unknown worker {id}"));
        };
        if w.health == WorkerHealth::Draining {
            return ok(format!("worker {id} already draining"));
        }
        let from = w.health;
        w.health = WorkerHealth::Draining;
        w.health_reason = reason.to_string();
        self.event(
            index,
            EventKind::WorkerDraining,
            id,
            format!("{} -> draining: {reason}", from.as_str()),
        );
        self.replan(index);
        ok(format!("worker {id} draining (was {})", from.as_str()))
    }

    /// `worker undrain`: a drained worker may be placed again (it waits as joining until
    /// the next plan takes it).
    pub(crate) fn undrain(&mut self, index: u64, id: &str, reason: &str) -> Outcome {
        if self.too_long_text(reason) {
            return no("reason too long");
        }
        let Some(w) = self.workers.get_mut(id) else {
            return no(format!("unknown worker {id}"));
        };
        match w.health {
            WorkerHealth::Draining => {}
            h if h.placeable() || h == WorkerHealth::Suspect => {
                return ok(format!("worker {id} is not drained ({})", h.as_str()))
            }
            WorkerHealth::Quarantined => {
                return no(format!(
                    "worker {id} is quarantined, not drained; `phalanx worker restore {id}` brings it back"
                ))
            }
            h => {
                return no(format!(
                    "worker {id} is {}, not drained; it comes back when it registers again",
                    h.as_str()
                ))
            }
        }
        w.health = WorkerHealth::Joining;
        w.health_reason = format!("undrained: {reason}");
        self.event(
            index,
            EventKind::WorkerUndrained,
            id,
            format!("draining -> joining: {reason}"),
        );
        self.replan(index);
        ok(format!("worker {id} undrained (joining)"))
    }

    /// `worker restore`: a quarantined worker comes back (its fault was repaired).
    pub(crate) fn restore_worker(&mut self, index: u64, id: &str, reason: &str) -> Outcome {
        if reason.trim().is_empty() {
            return no("a restore needs a reason (what was repaired)");
        }
        if self.too_long_text(reason) {
            return no("reason too long");
        }
        let Some(w) = self.workers.get_mut(id) else {
            return no(format!("unknown worker {id}"));
        };
        match w.health {
            WorkerHealth::Quarantined => {}
            h if h.placeable() || h == WorkerHealth::Suspect => {
                return ok(format!("worker {id} is not quarantined ({})", h.as_str()))
            }
            h => {
                return no(format!(
                    "worker {id} is {}, not quarantined{}",
                    h.as_str(),
                    if h == WorkerHealth::Draining {
                        format!("; `phalanx worker undrain {id}` takes a drain back")
                    } else {
                        String::new()
                    }
                ))
            }
        }
        w.health = WorkerHealth::Joining;
        w.health_reason = format!("restored: {reason}");
        self.event(
            index,
            EventKind::WorkerRestored,
            id,
            format!("quarantined -> joining: {reason}"),
        );
        self.replan(index);
        ok(format!("worker {id} restored from quarantine (joining)"))
    }
}

#[cfg(test)]
mod tests {
    use crate::state::{ClusterState, StateLimits};
    use phalanx_proto::{Command, DeviceSpec, Envelope, EventKind, JobSpec, WorkerHealth};

    fn env(id: &str, command: Command) -> Envelope {
        Envelope {
            trace: None,
            request_id: id.into(),
            command,
        }
    }

    fn two_workers_and_a_job() -> ClusterState {
        let mut s = ClusterState::new(StateLimits::default());
        for (i, w) in ["a", "b"].iter().enumerate() {
            s.apply(
                i as u64 + 1,
                &env(
                    &format!("register-{i}"),
                    Command::RegisterWorker {
                        id: w.to_string(),
                        address: format!("127.0.0.1:{}", 9000 + i),
                        device: DeviceSpec::default(),
                    },
                ),
            );
        }
        let spec = JobSpec {
            name: "j".into(),
            model: phalanx_proto::ModelPreset::Tiny,
            corpus: "default".into(),
            steps: 10,
            global_batch: 8,
            seed: 1,
            checkpoint_interval_steps: 0,
            world_size_min: 1,
            world_size_max: 2,
            numerics: Default::default(),
            precision: Default::default(),
        };
        s.apply(3, &env("submit", Command::SubmitJob { spec }));
        s
    }

    fn drain(id: &str) -> Command {
        Command::DrainWorker {
            id: id.into(),
            reason: "maintenance".into(),
        }
    }

    fn undrain(id: &str) -> Command {
        Command::UndrainWorker {
            id: id.into(),
            reason: "maintenance done".into(),
        }
    }

    #[test]
    fn a_drained_worker_can_be_undrained_and_is_placed_again() {
        let mut s = two_workers_and_a_job();
        assert!(s.apply(4, &env("d", drain("a"))).outcome.is_applied());
        let ranks = |s: &ClusterState| s.job.as_ref().unwrap().plan.as_ref().unwrap().ranks.clone();
        assert_eq!(ranks(&s), vec!["b"]);
        let drained = s
            .events
            .iter()
            .find(|e| e.kind == EventKind::WorkerDraining)
            .unwrap();
        assert_eq!(
            drained.reason, "healthy -> draining: maintenance",
            "the reason is said once"
        );
        let again = s.apply(5, &env("d2", drain("a")));
        assert!(
            again.outcome.is_applied(),
            "a repeated drain is not an error"
        );
        assert!(s.apply(6, &env("u", undrain("a"))).outcome.is_applied());
        assert!(s.workers["a"].health.placeable());
        assert!(
            s.events
                .iter()
                .any(|e| e.kind == EventKind::WorkerUndrained
                    && e.reason.contains("maintenance done"))
        );
        let again = s.apply(7, &env("u2", undrain("a")));
        assert!(
            again.outcome.is_applied(),
            "a repeated undrain is not an error"
        );
        assert!(!s.apply(8, &env("u3", undrain("zz"))).outcome.is_applied());
    }

    #[test]
    fn a_quarantined_worker_is_restored_with_a_reason_in_the_event_log() {
        let mut s = two_workers_and_a_job();
        s.apply(
            4,
            &env(
                "q",
                Command::SetWorkerHealth {
                    id: "a".into(),
                    health: WorkerHealth::Quarantined,
                    reason: "ecc".into(),
                    address: None,
                },
            ),
        );
        let wrong = s.apply(5, &env("u", undrain("a")));
        assert!(
            !wrong.outcome.is_applied(),
            "undrain does not lift a quarantine"
        );
        assert!(wrong.outcome.message().contains("worker restore"));
        let no_reason = s.apply(
            6,
            &env(
                "r0",
                Command::RestoreWorker {
                    id: "a".into(),
                    reason: " ".into(),
                },
            ),
        );
        assert!(!no_reason.outcome.is_applied());
        let r = s.apply(
            7,
            &env(
                "r",
                Command::RestoreWorker {
                    id: "a".into(),
                    reason: "DIMM replaced".into(),
                },
            ),
        );
        assert!(r.outcome.is_applied(), "{:?}", r.outcome);
        assert!(s.workers["a"].health.placeable());
        let e = s
            .events
            .iter()
            .find(|e| e.kind == EventKind::WorkerRestored)
            .unwrap();
        assert!(e.reason.contains("DIMM replaced"), "{}", e.reason);
    }

    #[test]
    fn cancelling_twice_is_not_an_error_but_cancelling_nothing_is() {
        let mut s = ClusterState::new(StateLimits::default());
        let none = s.apply(1, &env("c0", Command::CancelJob { reason: "x".into() }));
        assert!(!none.outcome.is_applied());
        let mut s = two_workers_and_a_job();
        let c = |id: &str| env(id, Command::CancelJob { reason: "x".into() });
        assert!(s.apply(4, &c("c1")).outcome.is_applied());
        let again = s.apply(5, &c("c2"));
        assert!(again.outcome.is_applied());
        assert!(again.outcome.message().contains("already cancelled"));
    }
}
