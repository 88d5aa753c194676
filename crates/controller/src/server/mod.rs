//! The controller process: a raft thread that owns the `Replica`, a tokio runtime for the
//! peer transport and the HTTP API, all on one port (TLS by default; see `listen` and
//! `security`).
//!
//! The raft thread is a plain loop over a channel with a tick deadline, so raft logic never
//! waits on a socket.

mod api;
mod listen;
mod metrics;
mod raft_loop;
pub mod routes;
pub mod security;
mod trace;
mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_core::{LeaseConfig, StateLimits};
use phalanx_proto::{MemberAction, MemberChange, NodeId, RaftRole};
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::client::Client;
use crate::node::{NodeError, Replica, ReplicaConfig};

pub use api::{status_of, ApiError};
use raft_loop::{Input, RaftLoop};
pub use security::{Principal, Security};

/// Bounds of the HTTP API.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body; a larger one is refused with 413 before it is read.
    pub body_bytes_max: usize,
    /// Open connections at once (API and peer links); more are closed on accept.
    pub connections_max: usize,
    /// A request's headers must arrive within this (hyper's header read timeout).
    pub header_timeout_ms: u64,
    /// A request (reading its body included) is answered 408 if its handler has not
    /// answered within this: a client that stops sending its body holds nothing.
    pub request_max_ms: u64,
    /// An API connection that moved no byte either way for this long is closed: a client
    /// that stopped reading its answer (or vanished) does not keep its slot for good.
    pub idle_max_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            body_bytes_max: 1024 * 1024,
            connections_max: 512,
            header_timeout_ms: 10_000,
            request_max_ms: 30_000,
            idle_max_ms: 60_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("invalid config: {0}")]
    Config(String),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: NodeId,
    pub listen: String,
    /// Every controller of the initial cluster, this one included: id -> address.
    pub peers: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    /// Credentials: TLS with a certificate per role (the default), or `--insecure`.
    pub security: Security,
    /// Start with no voters and wait to be added with `POST /v1/members`.
    pub join: bool,
    /// This node's data dir was lost: start empty and rejoin the running cluster by having
    /// its id removed and added again (each a joint-consensus change), then catch up from a
    /// snapshot. Without it, a node with an empty data dir that the cluster knows refuses
    /// to start rather than vote with a log it no longer has.
    pub rejoin: bool,
    pub tick_ms: u64,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub snapshot_entries: u64,
    pub lease: LeaseConfig,
    pub stragglers: phalanx_core::StragglerConfig,
    pub request_timeout_ms: u64,
    /// Largest frame on a peer link. A larger message (a snapshot of a large state) goes
    /// in pieces of this size, reassembled by the receiver up to `message_bytes_max`.
    pub frame_bytes_max: u64,
    /// Largest raft message (in practice, a snapshot) a peer link carries, in pieces.
    pub message_bytes_max: u64,
    pub http: HttpLimits,
    pub peer_queue_max: usize,
    /// A peer link whose oldest unacknowledged frame waits longer than this is dropped and
    /// redialed (also its sockets' `TCP_USER_TIMEOUT`). `None`: four heartbeat intervals,
    /// `4 * heartbeat_tick * tick_ms` (200 ms by default), well inside an election
    /// timeout, so a link cut while it held data is redialed before the leader's quorum
    /// rests on it for an election timeout.
    pub peer_liveness_ms: Option<u64>,
}

impl ServerConfig {
    pub fn new(
        id: NodeId,
        listen: String,
        peers: BTreeMap<NodeId, String>,
        data_dir: PathBuf,
        security: Security,
    ) -> Self {
        ServerConfig {
            id,
            listen,
            peers,
            data_dir,
            security,
            join: false,
            rejoin: false,
            // An election timeout of 500 ms-1 s (raft-rs draws it from [50, 100) ticks)
            // and a heartbeat every 50 ms: with 100-200 ms, a loaded 2-core machine saw
            // 87-199 spurious elections in 10 minutes (docs/benchmarks.md, "Leader
            // stability"); training does not stop during an election, so the slower
            // failover costs a controller kill little.
            tick_ms: 10,
            election_tick: 50,
            heartbeat_tick: 5,
            snapshot_entries: 1_000,
            lease: LeaseConfig::default(),
            stragglers: phalanx_core::StragglerConfig::default(),
            request_timeout_ms: 3_000,
            frame_bytes_max: 64 << 20,
            message_bytes_max: 1 << 30,
            http: HttpLimits::default(),
            peer_queue_max: 4_096,
            peer_liveness_ms: None,
        }
    }

    /// The peer links' liveness deadline (see `peer_liveness_ms`), at least 50 ms.
    pub fn peer_liveness(&self) -> Duration {
        let ms = self
            .peer_liveness_ms
            .unwrap_or(4 * self.heartbeat_tick as u64 * self.tick_ms);
        Duration::from_millis(ms.max(50))
    }

    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.id == 0 {
            return bad("id: must be >= 1 (raft reserves 0)".into());
        }
        match &self.security {
            Security::Insecure { token } if token.trim().is_empty() => {
                return bad("token: the cluster token is empty".into());
            }
            Security::Tls(t) if t.id != self.id => {
                return bad(format!(
                    "tls: the certificate is controller {}'s, this is controller {}",
                    t.id, self.id
                ));
            }
            _ => {}
        }
        if !self.join && !self.peers.contains_key(&self.id) {
            return bad(format!(
                "peers: must include this node's own id {}",
                self.id
            ));
        }
        if self.tick_ms == 0 || self.tick_ms > 10_000 {
            return bad(format!("tick_ms: {} (expected 1..=10000)", self.tick_ms));
        }
        if self.election_tick <= self.heartbeat_tick {
            return bad("election_tick: must be greater than heartbeat_tick".into());
        }
        if self.frame_bytes_max < 4096 || self.frame_bytes_max >= 1 << 31 {
            return bad(format!(
                "frame_bytes_max: {} (expected 4096..2^31)",
                self.frame_bytes_max
            ));
        }
        if self.message_bytes_max < self.frame_bytes_max {
            return bad("message_bytes_max: must be at least frame_bytes_max".into());
        }
        if self.snapshot_entries == 0 {
            return bad("snapshot_entries: must be >= 1".into());
        }
        let l = &self.lease;
        if l.suspect_after_ms == 0 || l.fail_after_ms <= l.suspect_after_ms {
            return bad(format!(
                "lease: need 0 < suspect_after_ms ({}) < fail_after_ms ({})",
                l.suspect_after_ms, l.fail_after_ms
            ));
        }
        if l.rejoin_after_ms == 0 {
            return bad("lease: rejoin_after_ms must be >= 1".into());
        }
        if l.silent_confirm_ms == 0 || l.silent_confirm_ms > l.fail_after_ms {
            return bad(format!(
                "lease: need 0 < silent_confirm_ms ({}) <= fail_after_ms ({})",
                l.silent_confirm_ms, l.fail_after_ms
            ));
        }
        Ok(())
    }
}

/// Handle to a running controller (used by tests and `phalanx controller start`).
pub struct ControllerHandle {
    pub local_addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    raft_thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ControllerHandle {
    /// Block until the raft thread exits (it runs until `stop` or a fatal storage error).
    pub fn wait(mut self) {
        if let Some(t) = self.raft_thread.take() {
            let _ = t.join();
        }
    }
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.raft_thread.take() {
            let _ = t.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

/// Start a controller node; returns once it listens.
pub fn start(cfg: ServerConfig) -> Result<ControllerHandle, ServerError> {
    cfg.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ctl-io")
        .build()
        .map_err(ServerError::Runtime)?;
    let listener = runtime
        .block_on(TcpListener::bind(&cfg.listen))
        .map_err(|e| ServerError::Bind {
            addr: cfg.listen.clone(),
            source: e,
        })?;
    let local_addr = listener.local_addr().map_err(ServerError::Runtime)?;

    let mut rcfg = ReplicaConfig::new(cfg.id);
    rcfg.election_tick = cfg.election_tick;
    rcfg.election_tick_max = cfg.election_tick * 2;
    rcfg.heartbeat_tick = cfg.heartbeat_tick;
    rcfg.snapshot_entries = cfg.snapshot_entries;
    rcfg.limits = StateLimits::default();
    // A node of an existing cluster that lost its data dir must not rejoin as if it were
    // bootstrapping: it would vote with a log it no longer has (and the leader, which
    // still believes it holds what it acked, would make raft-rs panic). Rejoining is an
    // explicit act (`--rejoin`): the node starts empty and has its id removed and added
    // again, and the leader catches it up from a snapshot. Without `--rejoin`, a node whose
    // dir is empty refuses to start when a leader reports it had acknowledged entries.
    let fresh = !crate::storage::SledStorage::has_data(&cfg.data_dir);
    let rejoin = cfg.rejoin && fresh && !cfg.join;
    if cfg.rejoin && !fresh {
        warn!(
            id = cfg.id,
            "--rejoin ignored: the data dir holds this node's state"
        );
    }
    if fresh && !cfg.join && !cfg.rejoin {
        if let Some((leader, matched)) = acked_by_cluster(&cfg) {
            return Err(ServerError::Config(format!(
                "data dir {} is empty, but controller {} is a member of a running cluster \
                 (leader {leader} records it as holding the log up to index {matched}): it \
                 must not vote with a log it no longer has; start it with --rejoin to rejoin \
                 through a membership change and catch up from a snapshot",
                cfg.data_dir.display(),
                cfg.id
            )));
        }
    }
    if rejoin {
        warn!(
            id = cfg.id,
            "--rejoin with an empty data dir: rejoining through a membership change"
        );
    }
    let voters: Vec<NodeId> = if cfg.join || rejoin {
        Vec::new()
    } else {
        cfg.peers.keys().copied().collect()
    };
    let replica = Replica::open(&cfg.data_dir, rcfg, &voters, cfg.peers.clone())?;
    let cluster_id = (!voters.is_empty()).then(|| initial_cluster_id(&cfg));
    let (stored_node, stored_cluster) = replica.raw.store().identity().map_err(NodeError::from)?;
    match stored_node {
        Some(n) if n != cfg.id => {
            return Err(ServerError::Config(format!(
                "data dir {} belongs to controller {n}, not {}",
                cfg.data_dir.display(),
                cfg.id
            )));
        }
        Some(_) => {}
        None => {
            // First start on this dir (or a dir from before identities were stored).
            let mut replica = replica;
            let store = replica.raw.mut_store();
            store
                .set_identity(cfg.id, cluster_id.as_deref())
                .and_then(|()| store.sync())
                .map_err(NodeError::from)?;
            return start_with(cfg, runtime, listener, local_addr, replica, rejoin);
        }
    }
    info!(id = cfg.id, cluster = ?stored_cluster, "data dir identity checked");
    start_with(cfg, runtime, listener, local_addr, replica, rejoin)
}

/// The cluster id of a bootstrapping cluster: a digest of its initial members, the same on
/// every one of them (FNV-1a, 64 bits, hex).
fn initial_cluster_id(cfg: &ServerConfig) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (id, addr) in &cfg.peers {
        for b in format!("{id}={addr};").bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn start_with(
    cfg: ServerConfig,
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    local_addr: SocketAddr,
    replica: Replica,
    rejoin: bool,
) -> Result<ControllerHandle, ServerError> {
    info!(id = cfg.id, addr = %local_addr, voters = ?replica.voters(), term = replica.term(), "controller started");

    let (in_tx, in_rx) = std_mpsc::channel::<Input>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctx = Arc::new(ConnCtx {
        inputs: in_tx,
        cfg: cfg.clone(),
        metrics: metrics::new_metrics(cfg.id)?,
    });
    let in_tx2 = ctx.inputs.clone();
    runtime.spawn(listen::accept_loop(listener, ctx));

    let handle = runtime.handle().clone();
    let stop2 = stop.clone();
    // While rejoining, leader messages meant for the node's old self (commit indexes it no
    // longer has) are dropped until the old membership is gone.
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(!rejoin));
    let gate2 = gate.clone();
    let cfg2 = cfg.clone();
    let raft_thread = std::thread::Builder::new()
        .name(format!("raft-{}", cfg.id))
        .spawn(move || {
            let mut lp = RaftLoop::new(replica, cfg2, handle, gate2, in_tx2);
            if let Err(e) = lp.run(in_rx, &stop2) {
                error!(%e, "raft loop stopped on a fatal error");
            }
        })
        .map_err(ServerError::Runtime)?;
    if rejoin {
        let cfg3 = cfg.clone();
        let gate3 = gate.clone();
        std::thread::spawn(move || rejoin_cluster(&cfg3, &gate3));
    }
    Ok(ControllerHandle {
        local_addr,
        runtime: Some(runtime),
        raft_thread: Some(raft_thread),
        stop,
    })
}

fn other_peers(cfg: &ServerConfig) -> Vec<String> {
    cfg.peers
        .iter()
        .filter(|(id, _)| **id != cfg.id)
        .map(|(_, a)| a.clone())
        .collect()
}

/// Did this node lose data it had acknowledged? `Some((leader, matched))` when a leader of
/// the running cluster records a non-zero matched index for it. A node that merely starts
/// late in a brand-new cluster has acknowledged nothing (matched 0) and starts normally.
fn acked_by_cluster(cfg: &ServerConfig) -> Option<(NodeId, u64)> {
    let client = Client::new(other_peers(cfg), cfg.security.client_credentials()).ok()?;
    client
        .status_all_within(Duration::from_millis(500))
        .into_iter()
        .find_map(|(_, s)| {
            let s = s.ok().filter(|s| s.role == RaftRole::Leader)?;
            let m = s.matched.get(&cfg.id).copied().unwrap_or(0);
            (m > 0).then_some((s.node_id, m))
        })
}

/// Remove this node's id from the cluster, then add it back (each a joint-consensus change).
fn rejoin_cluster(cfg: &ServerConfig, gate: &std::sync::atomic::AtomicBool) {
    let Ok(mut client) = Client::new(other_peers(cfg), cfg.security.client_credentials()) else {
        return;
    };
    client.deadline = Duration::from_secs(5);
    let address = cfg
        .peers
        .get(&cfg.id)
        .cloned()
        .unwrap_or_else(|| cfg.listen.clone());
    let members_of = |client: &Client| -> Option<Vec<NodeId>> {
        client
            .status_all_within(Duration::from_millis(500))
            .into_iter()
            .find_map(|(_, s)| {
                let s = s.ok().filter(|s| s.role == RaftRole::Leader)?;
                Some(s.members.iter().map(|m| m.id).collect())
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for (action, want_member) in [(MemberAction::Remove, false), (MemberAction::Add, true)] {
        loop {
            if Instant::now() > deadline {
                error!(
                    id = cfg.id,
                    action = action.as_str(),
                    "rejoin did not complete in 60 s"
                );
                return;
            }
            if members_of(&client).is_some_and(|m| m.contains(&cfg.id) == want_member) {
                if !want_member {
                    // Let the leader leave the joint config (which still lists this id).
                    std::thread::sleep(Duration::from_millis(500));
                    gate.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                break;
            }
            let change = MemberChange {
                action,
                id: cfg.id,
                address: address.clone(),
            };
            let r: Result<serde_json::Value, _> = client.post("/v1/members", &change);
            info!(
                id = cfg.id,
                action = action.as_str(),
                ok = r.is_ok(),
                "rejoin membership change proposed"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    info!(
        id = cfg.id,
        "rejoined the cluster; catching up from a snapshot"
    );
}

pub(crate) struct ConnCtx {
    pub(crate) inputs: std_mpsc::Sender<Input>,
    pub(crate) cfg: ServerConfig,
    pub(crate) metrics: Arc<phalanx_telemetry::controller::ControllerMetrics>,
}
