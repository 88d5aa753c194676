//! End-to-end tests of the raft-replicated controller: real `phalanx controller start`
//! processes on 127.0.0.1, killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Client, Credentials};
use phalanx_pki::{Role, TlsDir};
use phalanx_proto::{Command, DeviceSpec, Event, JobInfo, StatusResponse, WorkerInfo};
use phalanx_tests::{free_port, phalanx, run_with_timeout, stderr_of, KillOnDrop};

struct Cluster {
    dir: tempfile::TempDir,
    tls: TlsDir,
    admin: Credentials,
    addrs: BTreeMap<u64, String>,
    procs: BTreeMap<u64, KillOnDrop>,
    extra: Vec<String>,
}

impl Cluster {
    fn start(n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addrs: BTreeMap<u64, String> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let tls = TlsDir::create(&dir.path().join("tls")).unwrap();
        for r in [Role::Admin, Role::Reader] {
            tls.issue(&r, &[]).unwrap();
        }
        for id in addrs.keys() {
            tls.issue(&Role::Controller(*id), &["127.0.0.1".into()])
                .unwrap();
        }
        let admin = Credentials::role(&tls, &Role::Admin).unwrap();
        let mut c = Cluster {
            dir,
            tls,
            admin,
            addrs,
            procs: BTreeMap::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            c.start_node(id);
        }
        c
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    fn start_node(&mut self, id: u64) {
        self.start_node_with(id, &[]);
    }

    fn start_node_with(&mut self, id: u64, more: &[&str]) {
        let peers: Vec<String> = self.addrs.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{id}.log")))
            .unwrap();
        let child = phalanx()
            .args([
                "--log",
                "info",
                "controller",
                "start",
                "--id",
                &id.to_string(),
                "--listen",
                &self.addrs[&id],
            ])
            .args(["--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .arg("--tls-dir")
            .arg(self.tls.path())
            .args(&self.extra)
            .args(more)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn phalanx controller start");
        self.procs.insert(id, KillOnDrop(child));
    }

    /// SIGKILL one node.
    fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.procs.remove(&id) {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::new(self.addrs.values().cloned().collect(), self.admin.clone()).unwrap()
    }

    fn status(&self, id: u64) -> Option<StatusResponse> {
        let (code, body) = http_once(
            &self.addrs[&id],
            "GET",
            "/v1/status",
            &self.admin,
            None,
            Duration::from_millis(500),
        )
        .ok()?;
        (code == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    fn wait_leader(&self, timeout: Duration, above_term: u64, exclude: Option<u64>) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for id in self.addrs.keys().filter(|i| Some(**i) != exclude) {
                if let Some(s) = self.status(*id) {
                    if s.role == "leader" && s.term > above_term {
                        return (s.node_id, s.term);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let logs: Vec<String> = self
            .addrs
            .keys()
            .map(|i| format!("--- node {i}\n{}", tail(&self.log(*i), 2000)))
            .collect();
        panic!(
            "no leader above term {above_term} within {timeout:?}\n{}",
            logs.join("\n")
        );
    }

    fn cli_target(&self) -> Vec<String> {
        vec![
            "--controllers".into(),
            self.addrs.values().cloned().collect::<Vec<_>>().join(","),
            "--tls-dir".into(),
            self.tls.path().display().to_string(),
        ]
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn register(c: &Client, id: &str) {
    let r = c
        .command(Command::RegisterWorker {
            id: id.into(),
            address: format!("127.0.0.1:{}", 20000 + id.len()),
            device: DeviceSpec {
                kind: "cpu-emulated".into(),
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
    let mut c = Cluster::start(3, &[]);
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
            if s.role == "follower" && s.leader_id != 0 && s.job.is_some() {
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
    let mut c = Cluster::start(
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
        .any(|e| e.kind == "worker-draining" && e.reason.contains("host maintenance")));

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
    let mut c = Cluster::start(3, &["--snapshot-entries", "20"]);
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
        let metrics = http_once(
            &c.addrs[&follower],
            "GET",
            "/v1/metrics",
            &c.admin,
            None,
            Duration::from_millis(500),
        )
        .ok()
        .and_then(|(code, b)| {
            (code == 200)
                .then(|| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .flatten()
        });
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
    let c = Cluster::start(3, &[]);
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
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("local-cluster");
    let up = phalanx()
        .args(["cluster", "up", "--controllers", "3", "--dir"])
        .arg(&cdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = KillOnDrop(up);
    let d = cdir.display().to_string();
    let run = |args: &[&str]| {
        let mut cmd = phalanx();
        cmd.args(args).args(["--dir", &d]);
        run_with_timeout(cmd, Duration::from_secs(30))
    };
    // Wait for a leader through the CLI.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if cdir.join("cluster.json").exists() {
            let out = run(&["status", "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["leader_id"].as_u64().unwrap_or(0) != 0
                    && v["members"].as_array().map(|m| m.len()) == Some(3)
                {
                    break v;
                }
            }
        }
        assert!(Instant::now() < deadline, "cluster up: no leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    for k in [
        "leader_id",
        "term",
        "members",
        "commit_index",
        "workers",
        "job",
    ] {
        assert!(status.get(k).is_some(), "status --json lacks {k}: {status}");
    }

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
    let addrs: Vec<String> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["address"].as_str().unwrap().to_string())
        .collect();
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
                        &serde_json::json!({"worker": w}),
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
    let out = run_with_timeout(
        {
            let mut c = phalanx();
            c.args(["cluster", "down", "--dir", &d]);
            c
        },
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        up.wait_timeout(Duration::from_secs(10)).is_some(),
        "cluster up did not exit after cluster down"
    );
}
