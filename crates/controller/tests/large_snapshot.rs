//! A wiped follower catches up on a state many times larger than a peer frame: the leader's
//! snapshot goes over the link in frame-sized pieces (it used to be dropped as exceeding
//! `frame_bytes_max`, and the follower never caught up).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Client, Credentials};
use phalanx_controller::server::{self, ControllerHandle, Security, ServerConfig};
use phalanx_proto::{Command, StatusResponse};

const FRAME: u64 = 64 << 10;

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

fn get_json<T: serde::de::DeserializeOwned>(addr: &str, path: &str) -> Option<T> {
    let (code, body) = http_once(
        addr,
        "GET",
        path,
        &Credentials::insecure("tok"),
        None,
        Duration::from_millis(500),
    )
    .ok()?;
    (code == 200)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

fn leader(peers: &BTreeMap<u64, String>, skip: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for (id, a) in peers {
            if Some(*id) == skip {
                continue;
            }
            if let Some(s) = get_json::<StatusResponse>(a, "/v1/status") {
                if s.role == "leader" {
                    return s.node_id;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no leader");
}

fn config(id: u64, peers: &BTreeMap<u64, String>, dir: std::path::PathBuf) -> ServerConfig {
    let mut cfg = ServerConfig::new(
        id,
        peers[&id].clone(),
        peers.clone(),
        dir,
        Security::insecure("tok"),
    );
    cfg.frame_bytes_max = FRAME;
    cfg.snapshot_entries = 50;
    cfg
}

#[test]
fn wiped_follower_catches_up_on_a_state_larger_than_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let peers: BTreeMap<u64, String> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes: BTreeMap<u64, ControllerHandle> = BTreeMap::new();
    for id in 1..=3 {
        let cfg = config(id, &peers, dir.path().join(format!("n{id}")));
        nodes.insert(id, server::start(cfg).unwrap());
    }
    let l = leader(&peers, None);
    let client = Client::new(
        peers.values().cloned().collect(),
        Credentials::insecure("tok"),
    )
    .unwrap();
    let value = "v".repeat(4000);
    let put = |i: usize| {
        let r = client
            .command(Command::SetAnnotation {
                key: format!("k{i}"),
                value: value.clone(),
            })
            .unwrap();
        assert!(r.outcome.is_applied(), "{r:?}");
    };
    // About 1.2 MB of state: 19 frames.
    for i in 0..300 {
        put(i);
    }
    let f = (1..=3).find(|i| *i != l).unwrap();
    nodes.remove(&f).unwrap().stop();
    for i in 300..360 {
        put(i);
    }
    let l = leader(&peers, Some(f));
    let target = get_json::<StatusResponse>(&peers[&l], "/v1/status")
        .unwrap()
        .commit_index;
    // The follower's disk is gone: it comes back on an empty dir with --rejoin.
    let mut cfg = config(f, &peers, dir.path().join(format!("n{f}-wiped")));
    cfg.rejoin = true;
    nodes.insert(f, server::start(cfg).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = get_json::<serde_json::Value>(&peers[&f], "/v1/metrics");
        let s = get_json::<StatusResponse>(&peers[&f], "/v1/status");
        if let (Some(m), Some(s)) = (m, s) {
            if m["snapshots_installed"].as_u64().unwrap_or(0) >= 1
                && s.applied_index >= target
                && s.members.iter().any(|x| x.id == f)
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the wiped follower did not catch up on the large state"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // It serves the state it caught up on once it leads.
    let annotations: Option<serde_json::Value> = client.get("/v1/annotations/k359").ok();
    assert!(annotations.is_some());
    for (_, h) in nodes {
        h.stop();
    }
}
