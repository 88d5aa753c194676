//! The in-process controller harness of this crate's integration tests (`mod common;`):
//! free loopback addresses, one node's status, and a set of controllers on loopback that
//! is stopped when dropped, whether the test passed or not.
// Each test binary uses its own part of it.
#![allow(dead_code)]

use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Client, Credentials};
use phalanx_controller::server::{self, ControllerHandle, Security, ServerConfig};
use phalanx_proto::StatusResponse;

/// The shared token of the insecure test clusters.
pub const TOKEN: &str = "tok";

/// A free loopback address (bound then released; good enough for tests).
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// `GET path` on one node, decoded; `None` on any error or a non-200 answer.
pub fn get_json<T: serde::de::DeserializeOwned>(
    addr: &str,
    creds: &Credentials,
    path: &str,
) -> Option<T> {
    let (code, body) =
        http_once(addr, "GET", path, creds, None, Duration::from_millis(500)).ok()?;
    (code == 200)
        .then(|| serde_json::from_slice(&body).ok())
        .flatten()
}

/// One node's `GET /v1/status` with `creds`.
pub fn status_with(addr: &str, creds: &Credentials) -> Option<StatusResponse> {
    get_json(addr, creds, "/v1/status")
}

/// One node's `GET /v1/status` with the insecure clusters' token.
pub fn status(addr: &str) -> Option<StatusResponse> {
    status_with(addr, &Credentials::insecure(TOKEN))
}

/// Controllers in this process on loopback (insecure, token [`TOKEN`]); every node still
/// running is stopped on drop.
pub struct InProcess {
    pub dir: tempfile::TempDir,
    /// Where each node listens.
    pub peers: BTreeMap<u64, String>,
    pub nodes: BTreeMap<u64, ControllerHandle>,
}

impl InProcess {
    /// `n` nodes, each with [`Self::config`] passed through `tune`.
    pub fn start(n: u64, tune: impl Fn(ServerConfig) -> ServerConfig) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), n, tune)
    }

    /// [`Self::start`] of nodes listening at `peers` (ids 1..=n).
    pub fn start_at(
        peers: BTreeMap<u64, String>,
        tune: impl Fn(ServerConfig) -> ServerConfig,
    ) -> Self {
        Self::launch(tempfile::tempdir().unwrap(), peers, tune)
    }

    fn launch(
        dir: tempfile::TempDir,
        peers: BTreeMap<u64, String>,
        tune: impl Fn(ServerConfig) -> ServerConfig,
    ) -> Self {
        let mut c = InProcess {
            dir,
            peers,
            nodes: BTreeMap::new(),
        };
        let ids: Vec<u64> = c.peers.keys().copied().collect();
        for id in ids {
            let cfg = tune(c.config(id));
            c.start_node(id, cfg);
        }
        c
    }

    /// [`Self::start`] with the nodes' data dirs under `dir`.
    pub fn start_in(
        dir: tempfile::TempDir,
        n: u64,
        tune: impl Fn(ServerConfig) -> ServerConfig,
    ) -> Self {
        Self::launch(dir, (1..=n).map(|i| (i, free_addr())).collect(), tune)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    /// Node `id`'s configuration: its address, every peer's, its data dir.
    pub fn config(&self, id: u64) -> ServerConfig {
        ServerConfig::new(
            id,
            self.peers[&id].clone(),
            self.peers.clone(),
            self.data_dir(id),
            Security::insecure(TOKEN),
        )
    }

    pub fn start_node(&mut self, id: u64, cfg: ServerConfig) {
        let h = server::start(cfg).unwrap();
        self.nodes.insert(id, h);
    }

    pub fn stop(&mut self, id: u64) {
        if let Some(h) = self.nodes.remove(&id) {
            h.stop();
        }
    }

    pub fn status(&self, id: u64) -> Option<StatusResponse> {
        status(&self.peers[&id])
    }

    /// A client of every node.
    pub fn client(&self) -> Client {
        Client::new(
            self.peers.values().cloned().collect(),
            Credentials::insecure(TOKEN),
        )
        .unwrap()
    }

    /// Waits for a node other than `skip` to lead in a term above `above`: (leader, term).
    pub fn wait_leader(&self, timeout: Duration, above: u64, skip: Option<u64>) -> (u64, u64) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for id in self.peers.keys().filter(|i| Some(**i) != skip) {
                if let Some(s) = self.status(*id) {
                    if s.role == RaftRole::Leader && s.term > above {
                        return (s.node_id, s.term);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no leader above term {above} within {timeout:?}");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        for (_, h) in std::mem::take(&mut self.nodes) {
            h.stop();
        }
    }
}
