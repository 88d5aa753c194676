//! Tests of `state.rs` (the replicated state machine).
use super::*;
use phalanx_proto::{DeviceSpec, JobSpec, StateSource};

fn env(id: &str, command: Command) -> Envelope {
    Envelope {
        trace: None,
        request_id: id.into(),
        command,
    }
}

fn reg(id: &str) -> Command {
    Command::RegisterWorker {
        id: id.into(),
        address: format!("127.0.0.1:7{id}"),
        device: DeviceSpec::default(),
    }
}

fn spec() -> JobSpec {
    crate::jobfile::parse_job_toml(&crate::jobfile::job_template("tiny", 20).unwrap()).unwrap()
}

#[test]
fn duplicate_request_id_applies_once() {
    let mut s = ClusterState::new(StateLimits::default());
    let a = s.apply(
        1,
        &env(
            "r1",
            Command::SetAnnotation {
                key: "k".into(),
                value: "1".into(),
            },
        ),
    );
    s.apply(
        2,
        &env(
            "r2",
            Command::SetAnnotation {
                key: "k".into(),
                value: "2".into(),
            },
        ),
    );
    let again = s.apply(
        3,
        &env(
            "r1",
            Command::SetAnnotation {
                key: "k".into(),
                value: "1".into(),
            },
        ),
    );
    assert!(again.duplicate);
    assert_eq!(again.index, 1);
    assert_eq!(again.outcome, a.outcome);
    assert_eq!(
        s.annotations["k"], "2",
        "the retry must not overwrite the later write"
    );
}

#[test]
fn a_stuck_epoch_is_reissued_once_under_a_new_epoch() {
    let mut s = ClusterState::new(StateLimits::default());
    for (i, w) in ["a", "b", "c"].into_iter().enumerate() {
        s.apply(i as u64 + 1, &env(&format!("reg-{w}"), reg(w)));
    }
    s.apply(4, &env("submit", Command::SubmitJob { spec: spec() }));
    let stuck = |worker: &str, epoch: u64| Command::ReportEpochStuck {
        worker: worker.into(),
        epoch,
        attempts: 3,
        blamed_rank: Some(2),
        reason: "peer rank 2 closed the connection".into(),
    };
    let out = s.apply(5, &env("stuck-a-1", stuck("a", 1)));
    assert!(out.outcome.is_applied(), "{out:?}");
    let plan = s.job.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(plan.epoch, 2);
    assert_eq!(plan.ranks, vec!["a", "b", "c"], "the same ranks regroup");
    let ev: Vec<_> = s
        .events
        .iter()
        .map(|e| (e.kind, e.reason.clone()))
        .collect();
    assert!(
        ev.iter().any(|(k, r)| *k == EventKind::EpochStuck
            && r.contains("blames rank 2 (c)")
            && r.contains("closed the connection")),
        "{ev:?}"
    );
    // The other ranks' reports about the same epoch are stale: one re-issue per epoch.
    let again = s.apply(6, &env("stuck-b-1", stuck("b", 1)));
    assert!(!again.outcome.is_applied());
    assert_eq!(s.job.as_ref().unwrap().plan.as_ref().unwrap().epoch, 2);
    // A worker without a rank cannot bump the epoch.
    let outsider = s.apply(7, &env("stuck-z-2", stuck("z", 2)));
    assert!(!outsider.outcome.is_applied());
}

#[test]
fn a_ranked_worker_that_registers_from_a_new_address_starts_a_new_epoch() {
    let mut s = ClusterState::new(StateLimits::default());
    for (i, w) in ["a", "b", "c"].iter().enumerate() {
        s.apply(1 + i as u64, &env(&format!("reg-{w}"), reg(w)));
    }
    s.apply(5, &env("submit", Command::SubmitJob { spec: spec() }));
    let epoch = |s: &ClusterState| s.job.as_ref().unwrap().plan.as_ref().unwrap().epoch;
    assert_eq!(epoch(&s), 1);
    // The same process registering again (same address) changes nothing.
    s.apply(6, &env("again-a", reg("a")));
    assert_eq!(epoch(&s), 1);
    // A restarted process (all workers killed and back before any lease expired): its
    // memory is gone, so the same ranks regroup under a new epoch.
    let restarted = Command::RegisterWorker {
        id: "b".into(),
        address: "127.0.0.1:9999".into(),
        device: DeviceSpec::default(),
    };
    s.apply(7, &env("restart-b", restarted));
    let plan = s.job.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(plan.epoch, 2);
    assert_eq!(plan.ranks, vec!["a", "b", "c"]);
    assert!(s
        .events
        .iter()
        .any(|e| e.kind == EventKind::Plan && e.reason.contains("b restarted")));
}

#[test]
fn job_lifecycle_replans_on_failure_and_completes() {
    let mut s = ClusterState::new(StateLimits::default());
    let mut i = 0;
    let mut next = || {
        i += 1;
        i
    };
    for w in ["a", "b", "c"] {
        s.apply(next(), &env(&format!("reg-{w}"), reg(w)));
    }
    let out = s.apply(next(), &env("submit", Command::SubmitJob { spec: spec() }));
    assert!(out.outcome.is_applied(), "{:?}", out);
    let job = s.job.clone().unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.plan.as_ref().unwrap().ranks, vec!["a", "b", "c"]);
    // Second submit is rejected while one runs.
    let again = s.apply(next(), &env("submit2", Command::SubmitJob { spec: spec() }));
    assert!(!again.outcome.is_applied());
    s.apply(
        next(),
        &env(
            "fail-b",
            Command::SetWorkerHealth {
                id: "b".into(),
                health: WorkerHealth::Failed,
                reason: "no heartbeat".into(),
                address: None,
            },
        ),
    );
    let plan = s.job.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(plan.epoch, 2);
    assert_eq!(plan.ranks, vec!["a", "c"]);
    // A stale epoch report is rejected.
    let stale = s.apply(
        next(),
        &env(
            "p0",
            Command::ReportProgress {
                worker: "a".into(),
                epoch: 1,
                step: 5,
                loss_millionths: None,
                compute_us: None,
                throughput: None,
            },
        ),
    );
    assert!(!stale.outcome.is_applied());
    s.apply(
        next(),
        &env(
            "p1",
            Command::ReportProgress {
                worker: "a".into(),
                epoch: 2,
                step: 20,
                loss_millionths: None,
                compute_us: None,
                throughput: None,
            },
        ),
    );
    assert_eq!(s.job.as_ref().unwrap().state, JobState::Running);
    s.apply(
        next(),
        &env(
            "p2",
            Command::ReportProgress {
                worker: "c".into(),
                epoch: 2,
                step: 20,
                loss_millionths: None,
                compute_us: None,
                throughput: None,
            },
        ),
    );
    // Every rank at the last step is not the end: the result needs the final
    // checkpoint, and that must be the job's own, of the current epoch.
    assert_eq!(s.job.as_ref().unwrap().state, JobState::Running);
    let result = |epoch| Command::ReportResult {
        worker: "a".into(),
        epoch,
        params_sha256: "ab".repeat(32),
        finished_at_ms: None,
    };
    let early = s.apply(next(), &env("r0", result(2)));
    assert!(
        early.outcome.message().contains("final checkpoint"),
        "{early:?}"
    );
    let id = s.job.as_ref().unwrap().id.clone();
    let record = |job: &str, epoch, step| Command::RecordCheckpoint {
        job: job.into(),
        step,
        epoch,
        shards: vec![],
        durable: true,
        stall_us: None,
        retain: 2,
    };
    for (rid, cmd) in [
        ("c-other-job", record("other-1", 2, 20)),
        ("c-stale-epoch", record(&id, 1, 20)),
        ("c-past-end", record(&id, 2, 21)),
    ] {
        let out = s.apply(next(), &env(rid, cmd));
        assert!(!out.outcome.is_applied(), "{rid}: {out:?}");
    }
    assert!(s.checkpoints.is_empty());
    // Retention in the catalog: the job's two newest stay listed.
    for step in [5, 10, 15, 20] {
        let out = s.apply(next(), &env(&format!("c{step}"), record(&id, 2, step)));
        assert!(out.outcome.is_applied(), "{out:?}");
    }
    let steps: Vec<u64> = s.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![15, 20]);
    let done = s.apply(next(), &env("r1", result(2)));
    assert!(done.outcome.is_applied(), "{done:?}");
    assert_eq!(s.job.as_ref().unwrap().state, JobState::Completed);
    assert!(s
        .events
        .iter()
        .any(|e| e.kind == EventKind::WorkerFailed && e.reason.contains("no heartbeat")));
    // A finished job's catalog takes nothing more.
    let late = s.apply(next(), &env("c-late", record(&id, 2, 20)));
    assert!(!late.outcome.is_applied());
}

#[test]
fn every_job_gets_its_own_id() {
    let mut s = ClusterState::new(StateLimits::default());
    s.apply(1, &env("reg-a", reg("a")));
    s.apply(2, &env("s1", Command::SubmitJob { spec: spec() }));
    let first = s.job.as_ref().unwrap().id.clone();
    s.apply(3, &env("cancel", Command::CancelJob { reason: "x".into() }));
    s.apply(4, &env("s2", Command::SubmitJob { spec: spec() }));
    let second = s.job.as_ref().unwrap().id.clone();
    assert_ne!(first, second, "the same job file submitted twice");
    assert!(second.starts_with(&s.job.as_ref().unwrap().spec.name));
}

#[test]
fn a_resume_reported_after_its_epoch_was_superseded_is_still_recorded() {
    let mut s = ClusterState::new(StateLimits::default());
    let mut i = 0;
    let mut next = || {
        i += 1;
        i
    };
    for w in ["a", "b", "c"] {
        s.apply(next(), &env(&format!("reg-{w}"), reg(w)));
    }
    s.apply(next(), &env("submit", Command::SubmitJob { spec: spec() }));
    for (id, health) in [("b", WorkerHealth::Failed), ("c", WorkerHealth::Failed)] {
        s.apply(
            next(),
            &env(
                &format!("fail-{id}"),
                Command::SetWorkerHealth {
                    id: id.into(),
                    health,
                    reason: "no heartbeat".into(),
                    address: None,
                },
            ),
        );
    }
    assert_eq!(s.job.as_ref().unwrap().plan.as_ref().unwrap().epoch, 3);
    // Without a kind (a worker that predates it): the kind is read from the words.
    let resume = |epoch, source: &str| Command::ReportResume {
        worker: "a".into(),
        epoch,
        step: 4,
        source: source.into(),
        source_kind: None,
        steps_redone: 1,
        mttr_ms: Some(10),
        at_ms: None,
    };
    let later = s.apply(next(), &env("r3", resume(3, "peers")));
    assert!(later.outcome.is_applied(), "{later:?}");
    let earlier = s.apply(next(), &env("r2", resume(2, "checkpoint step 0")));
    assert!(earlier.outcome.is_applied(), "{earlier:?}");
    let epochs: Vec<u64> = s
        .job
        .as_ref()
        .unwrap()
        .recoveries
        .iter()
        .map(|r| r.epoch)
        .collect();
    assert_eq!(epochs, vec![2, 3], "kept in epoch order");
    let kinds: Vec<_> = s
        .job
        .as_ref()
        .unwrap()
        .recoveries
        .iter()
        .map(|r| r.source_kind)
        .collect();
    assert_eq!(
        kinds,
        vec![Some(StateSource::Checkpoint), Some(StateSource::Peer)]
    );
    let again = s.apply(next(), &env("r2-again", resume(2, "peers")));
    assert!(!again.outcome.is_applied(), "one record per epoch");
    let future = s.apply(next(), &env("r9", resume(9, "peers")));
    assert!(!future.outcome.is_applied(), "an epoch that never existed");
}

#[test]
fn snapshot_roundtrip_and_bounded_event_log() {
    let limits = StateLimits {
        events_max: 5,
        request_ids_max: 3,
        ..Default::default()
    };
    let mut s = ClusterState::new(limits);
    for i in 1..=20u64 {
        s.apply(i, &env(&format!("r{i}"), reg(&format!("w{i}"))));
    }
    assert_eq!(s.events.len(), 5);
    assert_eq!(s.applied_order.len(), 3);
    let back = ClusterState::restore(&s.snapshot_bytes()).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.applied_index, 20);
    assert!(ClusterState::restore(b"not json").is_err());
}

#[test]
fn drain_moves_worker_out_of_plan() {
    let mut s = ClusterState::new(StateLimits::default());
    s.apply(1, &env("1", reg("a")));
    s.apply(2, &env("2", reg("b")));
    s.apply(3, &env("3", Command::SubmitJob { spec: spec() }));
    s.apply(
        4,
        &env(
            "4",
            Command::DrainWorker {
                id: "a".into(),
                reason: "maintenance".into(),
            },
        ),
    );
    assert_eq!(s.workers["a"].health, WorkerHealth::Draining);
    assert_eq!(
        s.job.as_ref().unwrap().plan.as_ref().unwrap().ranks,
        vec!["b"]
    );
    let unknown = s.apply(
        5,
        &env(
            "5",
            Command::DrainWorker {
                id: "zz".into(),
                reason: String::new(),
            },
        ),
    );
    assert!(!unknown.outcome.is_applied());
}

/// Issue 12: a plan carries the trace context of the command that made it (the workers'
/// recovery spans join that trace); a command that makes no plan leaves it alone.
#[test]
fn a_plan_carries_the_trace_context_of_the_command_that_made_it() {
    let tp = |s: &str| phalanx_proto::TraceParent::parse(s).unwrap();
    let submit_tp = tp("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    let fail_tp = tp("00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01");
    let mut s = ClusterState::new(StateLimits::default());
    for (i, w) in ["a", "b", "c"].into_iter().enumerate() {
        s.apply(i as u64 + 1, &env(&format!("reg-{w}"), reg(w)));
    }
    let traced = |id: &str, command: Command, trace: &phalanx_proto::TraceParent| Envelope {
        trace: Some(trace.clone()),
        ..env(id, command)
    };
    s.apply(
        4,
        &traced("submit", Command::SubmitJob { spec: spec() }, &submit_tp),
    );
    let plan = |s: &ClusterState| s.job.as_ref().unwrap().plan.clone().unwrap();
    assert_eq!(plan(&s).epoch, 1);
    assert_eq!(plan(&s).trace.as_ref(), Some(&submit_tp));
    // No new plan: the trace stays the submission's.
    s.apply(
        5,
        &traced(
            "note",
            Command::SetAnnotation {
                key: "k".into(),
                value: "v".into(),
            },
            &fail_tp,
        ),
    );
    assert_eq!(plan(&s).trace.as_ref(), Some(&submit_tp));
    let fail = Command::SetWorkerHealth {
        id: "b".into(),
        health: WorkerHealth::Failed,
        reason: "killed".into(),
        address: None,
    };
    assert!(s
        .apply(6, &traced("fail-b", fail, &fail_tp))
        .outcome
        .is_applied());
    assert_eq!(plan(&s).epoch, 2);
    assert_eq!(plan(&s).trace.as_ref(), Some(&fail_tp));
    // Through a snapshot and back, and absent from a plan of an older version.
    let json = serde_json::to_string(&plan(&s)).unwrap();
    let back: phalanx_proto::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back.trace.as_ref(), Some(&fail_tp));
    let old: phalanx_proto::Plan =
        serde_json::from_str(r#"{"epoch":1,"ranks":["a"],"reason":"r"}"#).unwrap();
    assert_eq!(old.trace, None);
}
