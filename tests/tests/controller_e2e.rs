//! End-to-end tests of the raft-replicated controller: real `phalanx controller start`
//! processes on 127.0.0.1, killed with SIGKILL.

use phalanx_proto::DeviceKind;
use phalanx_proto::EventKind;
use phalanx_proto::RaftRole;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Client, Credentials};
use phalanx_pki::{Role, TlsDir};
use phalanx_proto::{
    ClusterStatus, Command, DeviceSpec, Event, HeartbeatRequest, JobInfo, WorkerInfo,
};
use phalanx_tests::cluster::LocalCluster;
use phalanx_tests::controllers::{get_json, tail, Controllers};
use phalanx_tests::{phalanx, run_with_timeout, stderr_of};

fn register(c: &Client, id: &str) {
    let r = c
        .command(Command::RegisterWorker {
            id: id.into(),
            address: format!("127.0.0.1:{}", 20000 + id.len()),
            device: DeviceSpec {
                kind: DeviceKind::CpuEmulated,
                index: 0,
                memory_bytes: 1 << 30,
                ..Default::default()
            },
        })
        .expect("register worker");
    assert!(r.outcome.is_applied(), "{r:?}");
}

fn write_job(dir: &Path) -> PathBuf {
    let out = run_with_timeout(
        {
            let mut c = phalanx();
            c.args(["job", "init", "--model", "tiny", "--steps", "60"]);
            c
        },
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "job init: {}", stderr_of(&out));
    let p = dir.join("job.toml");
    std::fs::write(&p, &out.stdout).unwrap();
    p
}

#[test]
fn controller_sigkill_leader_elects_a_new_leader_and_cli_writes_succeed() {
    // How fast is a benchmark (`phalanx controller bench`, docs/benchmarks.md row 3), not
    // a wall-clock assertion here: this checks that a new leader is elected in a later
    // term and that writes go on.
    let mut c = Controllers::start(3, &[]);
    let (leader, term) = c.wait_leader(Duration::from_secs(15), 0, None);
    register(&c.client(), "w0");

    c.kill(leader);
    let (new_leader, new_term) = c.wait_leader(Duration::from_secs(15), term, Some(leader));
    assert_ne!(new_leader, leader);
    assert!(new_term > term, "term {term} -> {new_term}");

    // A CLI write through all three addresses (one of them dead) succeeds.
    let job = write_job(c.dir.path());
    let mut cmd = phalanx();
    cmd.args(["job", "submit"]).arg(&job).args(c.cli_target());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "job submit after failover: {}",
        stderr_of(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("submitted"));

    // The killed node restarts and rejoins as a follower of the new leader.
    c.start_node(leader);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = c.status(leader) {
            if s.role == RaftRole::Follower && s.leader_id != 0 && s.job.is_some() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted node did not rejoin:\n{}",
            tail(&c.log(leader), 3000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn controller_restart_all_keeps_workers_job_and_events() {
    // Long leases: no heartbeats are sent, and lease decisions would add events.
    let mut c = Controllers::start(
        3,
        &[
            "--snapshot-entries",
            "5",
            "--suspect-after-ms",
            "600000",
            "--fail-after-ms",
            "900000",
        ],
    );
    c.wait_leader(Duration::from_secs(15), 0, None);
    let client = c.client();
    for w in ["a", "b", "c"] {
        register(&client, w);
    }
    let job = write_job(c.dir.path());
    let mut cmd = phalanx();
    cmd.args(["job", "submit"]).arg(&job).args(c.cli_target());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut cmd = phalanx();
    cmd.args(["worker", "drain", "b", "--reason", "host maintenance"])
        .args(c.cli_target());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));

    let workers: Vec<WorkerInfo> = client.get("/v1/workers").unwrap();
    let job: Option<JobInfo> = client.get("/v1/job").unwrap();
    let events: Vec<Event> = client.get("/v1/events?limit=1000").unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::WorkerDraining && e.reason.contains("host maintenance")));

    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.start_node(id);
    }
    c.wait_leader(Duration::from_secs(15), 0, None);
    let client = c.client();
    let workers2: Vec<WorkerInfo> = client.get("/v1/workers").unwrap();
    let job2: Option<JobInfo> = client.get("/v1/job").unwrap();
    let events2: Vec<Event> = client.get("/v1/events?limit=1000").unwrap();
    assert_eq!(workers2, workers);
    assert_eq!(job2, job);
    assert_eq!(
        events2[..events.len()],
        events[..],
        "events survive (new ones may follow)"
    );
}

#[test]
fn controller_wiped_follower_rejoins_by_snapshot() {
    let mut c = Controllers::start(3, &["--snapshot-entries", "20"]);
    let (leader, _) = c.wait_leader(Duration::from_secs(15), 0, None);
    let client = c.client();
    for i in 0..60 {
        let r = client
            .command(Command::SetAnnotation {
                key: format!("k{i}"),
                value: "v".into(),
            })
            .unwrap();
        assert!(r.outcome.is_applied());
    }
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.kill(follower);
    std::fs::remove_dir_all(c.data_dir(follower)).unwrap();
    for i in 60..70 {
        client
            .command(Command::SetAnnotation {
                key: format!("k{i}"),
                value: "v".into(),
            })
            .unwrap();
    }
    let target = c.status(leader).unwrap().commit_index;
    // Without --rejoin the wiped node refuses to start: it would vote with a log it no
    // longer has.
    c.start_node(follower);
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        let p = c.procs.get_mut(&follower).unwrap();
        if let Some(st) = p.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "a wiped node started without --rejoin kept running:\n{}",
            tail(&c.log(follower), 3000)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!code.success(), "it must exit with an error");
    assert!(
        c.log(follower).contains("--rejoin"),
        "the error names --rejoin:\n{}",
        tail(&c.log(follower), 3000)
    );
    c.procs.remove(&follower);
    c.start_node_with(follower, &["--rejoin"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The counters have no proto type: a JSON object of numbers.
        let metrics: Option<serde_json::Value> = get_json(
            &c.addrs[&follower],
            &c.admin,
            "/v1/metrics",
            Duration::from_millis(500),
        );
        let st = c.status(follower);
        if let (Some(m), Some(s)) = (metrics, st) {
            if m["snapshots_installed"].as_u64().unwrap_or(0) >= 1 && s.applied_index >= target {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "wiped follower did not rejoin by snapshot:\n{}",
            tail(&c.log(follower), 3000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn controller_wrong_token_plain_tcp_and_malformed_requests_are_rejected() {
    let c = Controllers::start(3, &[]);
    // The leader is a node known to answer (on a loaded machine another may still be
    // starting its API).
    let (leader, _) = c.wait_leader(Duration::from_secs(15), 0, None);
    let addr = &c.addrs[&leader];
    let wrong = Credentials::tls_with_token(&c.tls, "wrong-token-wrong-token".into()).unwrap();
    let (code, body) = http_once(
        addr,
        "GET",
        "/v1/status",
        &wrong,
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(code, 401);
    assert!(String::from_utf8_lossy(&body).contains("unauthorized"));

    // The CLI says 401 clearly.
    let bad = c.dir.path().join("bad-token");
    std::fs::write(&bad, "nope\n").unwrap();
    let mut cmd = phalanx();
    cmd.args(["status", "--controllers", addr, "--token-file"])
        .arg(&bad)
        .arg("--tls-dir")
        .arg(c.tls.path());
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("401"), "{}", stderr_of(&out));

    // Malformed JSON is a 400, garbage bytes get a 4xx, and the node lives on.
    let (code, _) = http_once(
        addr,
        "POST",
        "/v1/command",
        &c.admin,
        Some(b"{not json"),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(code, 400);
    // Plain bytes on the TLS port (garbage, plain HTTP, a plain peer handshake) get no
    // answer but a closed connection, and the node lives on.
    for plain in [
        &b"\x00\x01garbage that is not http\r\n\r\n"[..],
        &b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PHXR\x00\x00\x00\x19{\"from\":9,\"token\":\"nope\"}"[..],
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(plain).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
            "plain text was served: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    assert!(c.status(1).is_some(), "node survived bad input");
}

#[test]
fn controller_cluster_up_status_and_operator_verbs() {
    // `cluster up` with no workers; the harness waits for a leader and the three members,
    // and runs `cluster down` when it is dropped, should an assertion below fail.
    let mut c = LocalCluster::start_with(3, 0, 0);
    let dir = &c.dir;
    let cdir = c.cluster_dir();
    let run = |args: &[&str]| c.ctl(args);
    // `status --json` has every field of the view, and reads back as its type.
    let out = run(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "leader_id",
        "term",
        "members",
        "commit_index",
        "workers",
        "job",
    ] {
        assert!(raw.get(k).is_some(), "status --json lacks {k}: {raw}");
    }
    let status: ClusterStatus = serde_json::from_value(raw).unwrap();
    assert!(
        status.leader_id != 0 && status.members.len() == 3,
        "{status:?}"
    );

    // A malformed job file gets an error naming the field.
    let bad = dir.path().join("bad.toml");
    let good = write_job(dir.path());
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("steps = 60", "steps = 0"),
    )
    .unwrap();
    let out = run(&["job", "submit", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("`steps`"), "{}", stderr_of(&out));

    let tls = TlsDir::open(&cdir.join("tls")).unwrap();
    let addrs: Vec<String> = status.members.iter().map(|m| m.address.clone()).collect();
    // Each simulated worker speaks with its own certificate (issued with the cluster's CA).
    let as_worker = |w: &str| {
        tls.issue(&Role::Worker(w.into()), &[]).unwrap();
        Client::new(
            addrs.clone(),
            Credentials::role(&tls, &Role::Worker(w.into())).unwrap(),
        )
        .unwrap()
    };
    let workers = [("w0", as_worker("w0")), ("w1", as_worker("w1"))];
    for (w, client) in &workers {
        register(client, w);
    }
    // Keep both workers' leases alive, as real workers do.
    let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hb = {
        let beating = beating.clone();
        std::thread::spawn(move || {
            while beating.load(std::sync::atomic::Ordering::Relaxed) {
                for (w, client) in &workers {
                    let _ = client.post::<serde_json::Value>(
                        "/v1/heartbeat",
                        &HeartbeatRequest {
                            worker: w.to_string(),
                            compute_ms: None,
                            step: None,
                            silent_peer: None,
                        },
                    );
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    let out = run(&["job", "submit", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = run(&["job", "status", "--json"]);
    let job: JobInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job.plan.unwrap().ranks, vec!["w0", "w1"]);
    let out = run(&["worker", "drain", "w1"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = run(&["events"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("worker-draining") && text.contains("REASON"),
        "{text}"
    );
    let out = run(&["checkpoint", "list"]);
    assert!(out.status.success());
    let out = run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("leader:") && text.contains("draining"),
        "{text}"
    );

    beating.store(false, std::sync::atomic::Ordering::Relaxed);
    hb.join().unwrap();
    let out = c.down();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        c.wait_up_exited(Duration::from_secs(10)),
        "cluster up did not exit after cluster down"
    );
}
