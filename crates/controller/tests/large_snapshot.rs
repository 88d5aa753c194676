//! A wiped follower catches up on a state many times larger than a peer frame: the leader's
//! snapshot goes over the link in frame-sized pieces (it used to be dropped as exceeding
//! `frame_bytes_max`, and the follower never caught up).

use std::time::{Duration, Instant};

use phalanx_controller::client::Credentials;
use phalanx_controller::server::ServerConfig;
use phalanx_proto::Command;

const FRAME: u64 = 64 << 10;
/// How long a leader may take to emerge.
const LEADER_WAIT: Duration = Duration::from_secs(20);

mod common;
use common::{get_json, InProcess, TOKEN};

fn config(cfg: ServerConfig) -> ServerConfig {
    let mut cfg = cfg;
    cfg.frame_bytes_max = FRAME;
    cfg.snapshot_entries = 50;
    cfg
}

#[test]
fn wiped_follower_catches_up_on_a_state_larger_than_a_frame() {
    let mut c = InProcess::start(3, config);
    let peers = c.peers.clone();
    let creds = Credentials::insecure(TOKEN);
    let (l, _) = c.wait_leader(LEADER_WAIT, 0, None);
    let client = c.client();
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
    c.stop(f);
    for i in 300..360 {
        put(i);
    }
    let (l, _) = c.wait_leader(LEADER_WAIT, 0, Some(f));
    let target = c.status(l).unwrap().commit_index;
    // The follower's disk is gone: it comes back on an empty dir with --rejoin.
    let mut cfg = config(c.config(f));
    cfg.data_dir = c.dir.path().join(format!("n{f}-wiped"));
    cfg.rejoin = true;
    c.start_node(f, cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The counters have no proto type: a JSON object of numbers.
        let m = get_json::<serde_json::Value>(&peers[&f], &creds, "/v1/metrics");
        let s = c.status(f);
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
}
