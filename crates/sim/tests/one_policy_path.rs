//! One policy code path: the controller (a real in-process controller node, driving
//! `phalanx_core::LeaderDuties` with its wall clock) and the simulator's driver (the same
//! duties in virtual time) make the same decisions from the same inputs.
//!
//! The test heartbeats three workers into the controller over HTTP, stops one, and
//! records every input with its time. The controller decides (its event log holds each
//! health change with its reason); the recorded trace, replayed through
//! `phalanx_sim::detect::replay`, must give the same decisions, in the same order, with
//! the same reasons up to the measured milliseconds, at about the same times.

use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use phalanx_controller::client::{Client, Credentials};
use phalanx_controller::server::{self, Security, ServerConfig};
use phalanx_proto::{Command, HeartbeatRequest, StatusResponse, WorkerHealth, WorkerInfo};
use phalanx_sim::detect::{replay, DutyInput, World, CHECK_MS};

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// A reason with its numbers taken out (they are measured times).
fn shape(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect::<String>()
        .split('#')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("#")
}

fn health_of(word: &str) -> Option<WorkerHealth> {
    serde_json::from_value(serde_json::Value::String(word.to_string())).ok()
}

#[test]
fn the_controller_and_the_simulator_make_the_same_decisions_from_one_trace() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let peers = BTreeMap::from([(1u64, addr.clone())]);
    let cfg = ServerConfig::new(
        1,
        addr.clone(),
        peers,
        dir.path().join("n1"),
        Security::insecure("tok"),
    );
    let lease = cfg.lease;
    let node = server::start(cfg).unwrap();
    let client = Client::new(vec![addr.clone()], Credentials::insecure("tok")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = client.get::<StatusResponse>("/v1/status") {
            if s.role == RaftRole::Leader {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The controller became leader just before this; its duties' grace period covers
    // only workers it has never heard, and every worker here heartbeats at once.
    let t0 = Instant::now();
    let ms = || t0.elapsed().as_millis() as u64;
    let ids = ["w0", "w1", "w2"];
    let mut inputs = Vec::new();
    for id in ids {
        client
            .command(Command::RegisterWorker {
                id: id.into(),
                address: format!("127.0.0.1:1{}", id.len()),
                device: Default::default(),
            })
            .unwrap();
        inputs.push(DutyInput::Register {
            worker: id.into(),
            at_ms: ms(),
        });
    }
    let registered: Vec<WorkerInfo> = client.get("/v1/workers").unwrap();
    let stop_ms = 1_500;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed_at = None;
    loop {
        for id in ids {
            if id == "w1" && ms() >= stop_ms {
                continue;
            }
            let hb = HeartbeatRequest {
                worker: id.into(),
                compute_ms: None,
                step: None,
                silent_peer: None,
            };
            let at_ms = ms();
            let _: serde_json::Value = client.post("/v1/heartbeat", &hb).unwrap();
            inputs.push(DutyInput::Heartbeat { hb, at_ms });
        }
        let ws: Vec<WorkerInfo> = client.get("/v1/workers").unwrap();
        if failed_at.is_none()
            && ws
                .iter()
                .any(|w| w.id == "w1" && w.health == WorkerHealth::Failed)
        {
            failed_at = Some(ms());
        }
        // Half a second more after the failure: nothing else may be decided.
        if failed_at.is_some_and(|t| ms() > t + 500) {
            break;
        }
        assert!(Instant::now() < deadline, "w1 not failed within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let end_ms = ms();
    let events: Vec<serde_json::Value> = client.get("/v1/events?limit=1000").unwrap();
    node.stop();

    // The controller's decisions: health changes of the three workers, from its log.
    let controller: Vec<(String, WorkerHealth, String)> = events
        .iter()
        .filter_map(|e| {
            let subject = e.get("subject")?.as_str()?;
            let reason = e.get("reason")?.as_str()?;
            if !ids.contains(&subject) {
                return None;
            }
            let (_, rest) = reason.split_once(" -> ")?;
            let (to, why) = rest.split_once(": ")?;
            Some((subject.to_string(), health_of(to)?, why.to_string()))
        })
        .collect();

    // The simulator's driver over the same trace, with the leader's 50 ms checks.
    let mut at = 0;
    while at <= end_ms {
        inputs.push(DutyInput::Tick { at_ms: at });
        at += CHECK_MS;
    }
    inputs.sort_by_key(|i| (i.at_ms(), matches!(i, DutyInput::Tick { .. })));
    let mut world = World::new(&[], &[]);
    world.plan = None;
    for w in registered {
        world.workers.insert(w.id.clone(), w);
    }
    let duties = phalanx_sim::detect::duties_config(&phalanx_sim::config::PhalanxTimings {
        suspect_after_ms: lease.suspect_after_ms,
        fail_after_ms: lease.fail_after_ms,
        silent_confirm_ms: lease.silent_confirm_ms,
        ..Default::default()
    });
    assert_eq!(
        duties.lease, lease,
        "the simulator uses the controller's lease timing"
    );
    let simulated = replay(&inputs, &mut world, 0, &duties);

    let sim_kinds: Vec<(String, Option<WorkerHealth>, String)> = simulated
        .iter()
        .map(|d| (d.worker.clone(), d.health, shape(&d.reason)))
        .collect();
    let ctl_kinds: Vec<(String, Option<WorkerHealth>, String)> = controller
        .iter()
        .map(|(w, h, r)| (w.clone(), Some(*h), shape(r)))
        .collect();
    assert_eq!(
        ctl_kinds, sim_kinds,
        "controller decisions {controller:?}\nsimulated {simulated:?}"
    );
    assert_eq!(
        sim_kinds
            .iter()
            .map(|(w, h, _)| (w.as_str(), *h))
            .collect::<Vec<_>>(),
        vec![
            ("w1", Some(WorkerHealth::Suspect)),
            ("w1", Some(WorkerHealth::Failed))
        ]
    );
    // The simulated failure lands within a check period, a heartbeat and the loop's
    // latency of the controller's.
    let sim_failed = simulated.last().unwrap().at_ms;
    let real_failed = failed_at.unwrap();
    assert!(
        sim_failed <= real_failed + CHECK_MS && real_failed <= sim_failed + 1_000,
        "simulated failure at {sim_failed} ms, the controller's seen at {real_failed} ms"
    );
}
