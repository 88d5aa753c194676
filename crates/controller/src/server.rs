//! The controller process: a raft thread that owns the `Replica`, a tokio runtime for the
//! peer transport and the HTTP API, all on one port.
//!
//! The raft thread is a plain loop over a channel with a tick deadline, so raft logic never
//! waits on a socket. Peer connections begin with the magic `PHXR`; anything else on the
//! port is HTTP.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_core::{LeaseConfig, Leases, StateLimits};
use phalanx_proto::{
    Assignment, Command, CommandResponse, ControllerMember, Envelope, ErrorResponse,
    HeartbeatRequest, MemberChange, NodeId, StatusResponse, WorkerHealth, WorkerId,
};
use protobuf::Message as PbMessage;
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::node::{NodeError, Replica, ReplicaConfig};
use crate::wire::{self, HttpLimits, PEER_MAGIC};

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
    pub token: String,
    /// Start with no voters and wait to be added with `POST /v1/members`.
    pub join: bool,
    pub tick_ms: u64,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub snapshot_entries: u64,
    pub lease: LeaseConfig,
    pub stragglers: phalanx_core::StragglerConfig,
    pub request_timeout_ms: u64,
    pub frame_bytes_max: u64,
    pub http: HttpLimits,
    pub peer_queue_max: usize,
}

impl ServerConfig {
    pub fn new(
        id: NodeId,
        listen: String,
        peers: BTreeMap<NodeId, String>,
        data_dir: PathBuf,
        token: String,
    ) -> Self {
        ServerConfig {
            id,
            listen,
            peers,
            data_dir,
            token,
            join: false,
            tick_ms: 10,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_entries: 1_000,
            lease: LeaseConfig::default(),
            stragglers: phalanx_core::StragglerConfig::default(),
            request_timeout_ms: 3_000,
            frame_bytes_max: 64 << 20,
            http: HttpLimits::default(),
            peer_queue_max: 4_096,
        }
    }

    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.id == 0 {
            return bad("id: must be >= 1 (raft reserves 0)".into());
        }
        if self.token.trim().is_empty() {
            return bad("token: the cluster token is empty".into());
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
        Ok(())
    }
}

/// An API failure, mapped to an HTTP status.
#[derive(Debug, Clone)]
pub enum ApiError {
    NotLeader {
        leader_id: NodeId,
        leader_address: Option<String>,
    },
    NoLeader,
    Timeout,
    BadRequest(String),
    NotFound(String),
    Internal(String),
}

impl ApiError {
    fn status_and_body(&self) -> (u16, ErrorResponse) {
        let e = |error: &str, message: String| ErrorResponse {
            error: error.into(),
            message,
            leader_id: None,
            leader_address: None,
        };
        match self {
            ApiError::NotLeader {
                leader_id,
                leader_address,
            } => (
                421,
                ErrorResponse {
                    error: "not_leader".into(),
                    message: format!("this node is not the leader; the leader is node {leader_id}"),
                    leader_id: Some(*leader_id),
                    leader_address: leader_address.clone(),
                },
            ),
            ApiError::NoLeader => (
                503,
                e("no_leader", "no leader is known right now; retry".into()),
            ),
            ApiError::Timeout => (
                504,
                e(
                    "timeout",
                    "the request did not commit in time; retry with the same request id".into(),
                ),
            ),
            ApiError::BadRequest(m) => (400, e("bad_request", m.clone())),
            ApiError::NotFound(m) => (404, e("not_found", m.clone())),
            ApiError::Internal(m) => (500, e("internal", m.clone())),
        }
    }
}

type ApiResult = Result<serde_json::Value, ApiError>;
type Reply = oneshot::Sender<ApiResult>;
type Query = Box<dyn FnOnce(&Replica) -> ApiResult + Send>;

enum Input {
    Peer(Message),
    Propose {
        env: Envelope,
        reply: Reply,
    },
    /// Linearizable read: ReadIndex on the leader, then the query once applied.
    Read {
        query: Query,
        reply: Reply,
    },
    /// Local (possibly stale) read on any node.
    Local {
        query: Query,
        reply: Reply,
    },
    Heartbeat {
        worker: WorkerId,
        compute_ms: Option<f64>,
        reply: Reply,
    },
    Member {
        change: MemberChange,
        reply: Reply,
    },
}

struct Waiter {
    reply: Reply,
    deadline: Instant,
}

struct PendingRead {
    query: Query,
    reply: Reply,
    deadline: Instant,
    /// Set once the ReadIndex is confirmed: the query runs when applied >= index.
    index: Option<u64>,
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

#[derive(Serialize, Deserialize)]
struct Handshake {
    from: NodeId,
    token: String,
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
    // bootstrapping: the leader still believes it holds the log it had acked (raft-rs
    // would panic on the leader's commit index). It starts empty and has itself removed
    // and re-added, so the leader catches it up from a snapshot.
    let fresh = !crate::storage::SledStorage::has_data(&cfg.data_dir);
    let rejoin = !cfg.join && fresh && cluster_exists(&cfg);
    if rejoin {
        warn!(
            id = cfg.id,
            "empty data dir but the cluster exists: rejoining through a membership change"
        );
    }
    let voters: Vec<NodeId> = if cfg.join || rejoin {
        Vec::new()
    } else {
        cfg.peers.keys().copied().collect()
    };
    let replica = Replica::open(&cfg.data_dir, rcfg, &voters, cfg.peers.clone())?;
    info!(id = cfg.id, addr = %local_addr, voters = ?replica.voters(), term = replica.term(), "controller started");

    let (in_tx, in_rx) = std_mpsc::channel::<Input>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctx = Arc::new(ConnCtx {
        inputs: in_tx,
        token: cfg.token.clone(),
        cfg: cfg.clone(),
    });
    runtime.spawn(accept_loop(listener, ctx));

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
            let mut lp = RaftLoop::new(replica, cfg2, handle, gate2);
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

/// Does any other controller report a cluster with committed entries?
/// Did this node lose data it had acknowledged? True when a leader of the running cluster
/// records a non-zero matched index for it. A node that merely starts late in a brand-new
/// cluster has acknowledged nothing (matched 0) and joins normally.
fn cluster_exists(cfg: &ServerConfig) -> bool {
    other_peers(cfg).iter().any(|a| {
        crate::client::http_once(
            a,
            "GET",
            "/v1/status",
            &cfg.token,
            None,
            Duration::from_millis(500),
        )
        .ok()
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, b)| serde_json::from_slice::<StatusResponse>(&b).ok())
        .is_some_and(|s| s.role == "leader" && s.matched.get(&cfg.id).copied().unwrap_or(0) > 0)
    })
}

/// Remove this node's id from the cluster, then add it back (each a joint-consensus change).
fn rejoin_cluster(cfg: &ServerConfig, gate: &std::sync::atomic::AtomicBool) {
    let Ok(mut client) = crate::client::Client::new(other_peers(cfg), cfg.token.clone()) else {
        return;
    };
    client.deadline = Duration::from_secs(5);
    let address = cfg
        .peers
        .get(&cfg.id)
        .cloned()
        .unwrap_or_else(|| cfg.listen.clone());
    let members_of = |client: &crate::client::Client| -> Option<Vec<NodeId>> {
        for a in client.addrs() {
            let Ok((200, b)) = crate::client::http_once(
                a,
                "GET",
                "/v1/status",
                &cfg.token,
                None,
                Duration::from_millis(500),
            ) else {
                continue;
            };
            if let Ok(s) = serde_json::from_slice::<StatusResponse>(&b) {
                if s.role == "leader" {
                    return Some(s.members.iter().map(|m| m.id).collect());
                }
            }
        }
        None
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for (action, want_member) in [("remove", false), ("add", true)] {
        loop {
            if Instant::now() > deadline {
                error!(id = cfg.id, action, "rejoin did not complete in 60 s");
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
                action: action.into(),
                id: cfg.id,
                address: address.clone(),
            };
            let r: Result<serde_json::Value, _> = client.post("/v1/members", &change);
            info!(
                id = cfg.id,
                action,
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

// ------------------------------------------------------------------ raft loop

struct RaftLoop {
    r: Replica,
    cfg: ServerConfig,
    rt: tokio::runtime::Handle,
    peers: HashMap<NodeId, mpsc::Sender<Message>>,
    waiters: HashMap<String, Vec<Waiter>>,
    reads: HashMap<u64, PendingRead>,
    next_read: u64,
    leases: Option<Leases>,
    lease_inflight: BTreeMap<WorkerId, (WorkerHealth, Instant)>,
    /// Leader-local: each worker's latest compute time per micro-batch, from heartbeats.
    compute_ms: BTreeMap<WorkerId, f64>,
    stragglers: phalanx_core::Stragglers,
    straggler_checked: Instant,
    lease_seq: u64,
    start: Instant,
    was_leader: bool,
    peer_gate: Arc<std::sync::atomic::AtomicBool>,
}

impl RaftLoop {
    fn new(
        r: Replica,
        cfg: ServerConfig,
        rt: tokio::runtime::Handle,
        peer_gate: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        RaftLoop {
            r,
            cfg,
            rt,
            peers: HashMap::new(),
            waiters: HashMap::new(),
            reads: HashMap::new(),
            next_read: 1,
            leases: None,
            lease_inflight: BTreeMap::new(),
            compute_ms: BTreeMap::new(),
            stragglers: Default::default(),
            straggler_checked: Instant::now(),
            lease_seq: 0,
            start: Instant::now(),
            was_leader: false,
            peer_gate,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn not_leader(&self) -> ApiError {
        let l = self.r.leader_id();
        if l == 0 {
            ApiError::NoLeader
        } else {
            ApiError::NotLeader {
                leader_id: l,
                leader_address: self.r.addresses.get(&l).cloned(),
            }
        }
    }

    fn run(
        &mut self,
        inputs: std_mpsc::Receiver<Input>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), NodeError> {
        let tick = Duration::from_millis(self.cfg.tick_ms);
        let mut next_tick = Instant::now() + tick;
        let mut next_lease_check = Instant::now();
        loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let now = Instant::now();
            let wait = next_tick.saturating_duration_since(now);
            match inputs.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input)?;
                    // Drain what else is queued so one Ready covers a batch of proposals.
                    for _ in 0..1024 {
                        match inputs.try_recv() {
                            Ok(i) => self.handle(i)?,
                            Err(_) => break,
                        }
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                self.r.tick();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            self.process_ready()?;
            self.on_role_change();
            if Instant::now() >= next_lease_check {
                next_lease_check = Instant::now() + Duration::from_millis(100);
                self.check_leases()?;
                self.expire_waiters();
            }
        }
    }

    fn handle(&mut self, input: Input) -> Result<(), NodeError> {
        match input {
            Input::Peer(m) => {
                if self.peer_gate.load(std::sync::atomic::Ordering::Relaxed) {
                    self.r.step(m)?
                }
            }
            Input::Propose { env, reply } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                if let Some((index, outcome)) = self.r.state.lookup_request(&env.request_id) {
                    let resp = CommandResponse {
                        outcome: outcome.clone(),
                        index,
                        duplicate: true,
                    };
                    let _ = reply.send(Ok(serde_json::to_value(resp).unwrap_or_default()));
                    return Ok(());
                }
                if let Command::RegisterWorker { id, .. } = &env.command {
                    // Registration starts the worker's lease.
                    let now = self.now_ms();
                    if let Some(l) = self.leases.as_mut() {
                        l.heartbeat(id, now, &self.cfg.lease);
                    }
                }
                match self.r.propose(&env) {
                    Ok(()) => {
                        let deadline =
                            Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms);
                        self.waiters
                            .entry(env.request_id.clone())
                            .or_default()
                            .push(Waiter { reply, deadline });
                    }
                    Err(e) => {
                        debug!(%e, "proposal dropped");
                        let _ = reply.send(Err(self.not_leader()));
                    }
                }
            }
            Input::Read { query, reply } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                let id = self.next_read;
                self.next_read += 1;
                self.r.raw.read_index(id.to_be_bytes().to_vec());
                let deadline = Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms);
                self.reads.insert(
                    id,
                    PendingRead {
                        query,
                        reply,
                        deadline,
                        index: None,
                    },
                );
            }
            Input::Local { query, reply } => {
                let _ = reply.send(query(&self.r));
            }
            Input::Heartbeat {
                worker,
                compute_ms,
                reply,
            } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                if !self.r.state.workers.contains_key(&worker) {
                    let _ = reply.send(Err(ApiError::NotFound(format!(
                        "worker {worker} is not registered"
                    ))));
                    return Ok(());
                }
                let now = self.now_ms();
                if let Some(l) = self.leases.as_mut() {
                    l.heartbeat(&worker, now, &self.cfg.lease);
                }
                if let Some(t) = compute_ms.filter(|t| t.is_finite() && *t >= 0.0) {
                    self.compute_ms.insert(worker, t);
                }
                let _ = reply.send(Ok(serde_json::json!({"ok": true})));
            }
            Input::Member { change, reply } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                let add = match change.action.as_str() {
                    "add" => true,
                    "remove" => false,
                    other => {
                        let _ = reply.send(Err(ApiError::BadRequest(format!(
                            "action: {other:?} (expected add or remove)"
                        ))));
                        return Ok(());
                    }
                };
                if add && change.address.is_empty() {
                    let _ = reply.send(Err(ApiError::BadRequest(
                        "address: required to add a member".into(),
                    )));
                    return Ok(());
                }
                match self
                    .r
                    .propose_member_change(add, change.id, &change.address)
                {
                    Ok(()) => {
                        let _ = reply.send(Ok(serde_json::json!({"proposed": true})));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::BadRequest(e.to_string())));
                    }
                }
            }
        }
        Ok(())
    }

    fn process_ready(&mut self) -> Result<(), NodeError> {
        for _ in 0..16 {
            if !self.r.raw.has_ready() {
                break;
            }
            let span = info_span!("ready_loop", node = self.cfg.id);
            let _g = span.enter();
            // Read states come with the Ready; grab them before on_ready consumes it.
            let out = self.r.on_ready()?;
            for m in out.messages {
                self.send(m);
            }
            for a in out.applied {
                if let Some(ws) = self.waiters.remove(&a.request_id) {
                    let resp = CommandResponse {
                        outcome: a.applied.outcome.clone(),
                        index: a.applied.index,
                        duplicate: a.applied.duplicate,
                    };
                    let v = serde_json::to_value(resp).unwrap_or_default();
                    for w in ws {
                        let _ = w.reply.send(Ok(v.clone()));
                    }
                }
            }
            for rs in out.read_states {
                let id = u64::from_be_bytes(
                    rs.request_ctx
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 8]),
                );
                if let Some(p) = self.reads.get_mut(&id) {
                    p.index = Some(rs.index);
                }
            }
        }
        // Serve reads whose index has been applied.
        let applied = self.r.applied_index();
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, p)| p.index.is_some_and(|i| i <= applied))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(p) = self.reads.remove(&id) {
                let _ = p.reply.send((p.query)(&self.r));
            }
        }
        Ok(())
    }

    fn send(&mut self, m: Message) {
        let to = m.to;
        if !self.peers.contains_key(&to) {
            let Some(addr) = self.r.addresses.get(&to).cloned() else {
                debug!(to, "no address for peer; message dropped");
                return;
            };
            let (tx, rx) = mpsc::channel(self.cfg.peer_queue_max);
            let token = self.cfg.token.clone();
            let from = self.cfg.id;
            let frame_max = self.cfg.frame_bytes_max;
            self.rt
                .spawn(peer_sender(from, to, addr, token, rx, frame_max));
            self.peers.insert(to, tx);
        }
        if let Some(tx) = self.peers.get(&to) {
            // Full queue: drop; raft retransmits.
            let _ = tx.try_send(m);
        }
    }

    fn on_role_change(&mut self) {
        let leader = self.r.is_leader();
        if leader && !self.was_leader {
            // Fresh leases: this leader has heard no heartbeat yet; the grace period keeps
            // it from failing healthy workers.
            self.leases = Some(Leases::new(self.now_ms()));
            self.compute_ms.clear();
            self.stragglers = Default::default();
            self.lease_inflight.clear();
        }
        if !leader && self.was_leader {
            self.leases = None;
            let err = self.not_leader();
            for (_, ws) in self.waiters.drain() {
                for w in ws {
                    let _ = w.reply.send(Err(err.clone()));
                }
            }
            for (_, p) in self.reads.drain() {
                let _ = p.reply.send(Err(err.clone()));
            }
        }
        self.was_leader = leader;
    }

    fn check_leases(&mut self) -> Result<(), NodeError> {
        let now = self.now_ms();
        let Some(leases) = self.leases.as_mut() else {
            return Ok(());
        };
        let decisions = leases.decide(now, &self.r.state.workers, &self.cfg.lease);
        for (worker, decision, reason) in decisions {
            let health = decision.health();
            if let Some((h, at)) = self.lease_inflight.get(&worker) {
                if *h == health && at.elapsed() < Duration::from_secs(2) {
                    continue;
                }
            }
            self.lease_seq += 1;
            let env = Envelope {
                request_id: format!(
                    "lease-n{}-t{}-{}",
                    self.cfg.id,
                    self.r.term(),
                    self.lease_seq
                ),
                command: Command::SetWorkerHealth {
                    id: worker.clone(),
                    health,
                    reason,
                    address: None,
                },
            };
            info!(worker = %worker, health = health.as_str(), "lease decision");
            if self.r.propose(&env).is_ok() {
                self.lease_inflight.insert(worker, (health, Instant::now()));
            }
        }
        self.check_stragglers();
        Ok(())
    }

    /// Twice a second: a rank whose compute time stays far above the plan's median first
    /// gets a smaller share of the micro-batches; if it stays slow it is drained, so the
    /// placement swaps a spare in.
    fn check_stragglers(&mut self) {
        if self.straggler_checked.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.straggler_checked = Instant::now();
        let Some(plan) = self
            .r
            .state
            .job
            .as_ref()
            .filter(|j| j.state == phalanx_proto::JobState::Running)
            .and_then(|j| j.plan.clone())
        else {
            return;
        };
        let decisions = self.stragglers.observe(
            &plan,
            &self.compute_ms,
            &self.r.state.workers,
            &self.cfg.stragglers,
        );
        for (worker, decision, reason) in decisions {
            self.lease_seq += 1;
            let command = match decision {
                phalanx_core::StragglerDecision::ReduceShare => Command::ReduceShare {
                    worker: worker.clone(),
                    epoch: plan.epoch,
                    reason,
                },
                phalanx_core::StragglerDecision::SwapForSpare => Command::SetWorkerHealth {
                    id: worker.clone(),
                    health: WorkerHealth::Draining,
                    reason,
                    address: None,
                },
            };
            let env = Envelope {
                request_id: format!(
                    "straggler-n{}-t{}-{}",
                    self.cfg.id,
                    self.r.term(),
                    self.lease_seq
                ),
                command,
            };
            info!(worker = %worker, ?decision, "straggler decision");
            let _ = self.r.propose(&env);
            self.compute_ms.remove(&worker);
        }
    }

    fn expire_waiters(&mut self) {
        let now = Instant::now();
        self.waiters.retain(|_, ws| {
            let mut keep = Vec::new();
            for w in ws.drain(..) {
                if w.deadline <= now {
                    let _ = w.reply.send(Err(ApiError::Timeout));
                } else {
                    keep.push(w);
                }
            }
            *ws = keep;
            !ws.is_empty()
        });
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.reads.remove(&id) {
                let _ = p.reply.send(Err(ApiError::Timeout));
            }
        }
    }
}

// ------------------------------------------------------------------ peer transport

async fn peer_sender(
    from: NodeId,
    to: NodeId,
    addr: String,
    token: String,
    mut rx: mpsc::Receiver<Message>,
    frame_bytes_max: u64,
) {
    let mut conn: Option<TcpStream> = None;
    while let Some(m) = rx.recv().await {
        if conn.is_none() {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(&addr)).await
            {
                {
                    let _ = s.set_nodelay(true);
                    let hs = serde_json::to_vec(&Handshake {
                        from,
                        token: token.clone(),
                    })
                    .unwrap_or_default();
                    let mut hello = PEER_MAGIC.to_vec();
                    hello.extend_from_slice(&wire::encode_frame(&hs));
                    if tokio::time::timeout(Duration::from_secs(1), s.write_all(&hello))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        conn = Some(s);
                    }
                }
            }
            if conn.is_none() {
                // Unreachable: drop what is queued (raft retransmits) and back off a little.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let bytes = match m.write_to_bytes() {
            Ok(b) if (b.len() as u64) <= frame_bytes_max => b,
            Ok(b) => {
                warn!(
                    to,
                    len = b.len(),
                    "message exceeds frame_bytes_max; dropped"
                );
                continue;
            }
            Err(e) => {
                warn!(to, %e, "cannot encode message");
                continue;
            }
        };
        let frame = wire::encode_frame(&bytes);
        let Some(s) = conn.as_mut() else { continue };
        let ok = tokio::time::timeout(Duration::from_secs(2), s.write_all(&frame))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ok {
            debug!(to, "peer write failed; reconnecting");
            conn = None;
        }
    }
}

struct ConnCtx {
    inputs: std_mpsc::Sender<Input>,
    token: String,
    cfg: ServerConfig,
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ConnCtx>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                tokio::spawn(async move { handle_conn(stream, peer, ctx).await });
            }
            Err(e) => {
                warn!(%e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn token_eq(a: &str, b: &str) -> bool {
    // Constant-time in the length of the presented token.
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn handle_conn(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let mut first = [0u8; 4];
    let deadline = Instant::now() + Duration::from_secs(5);
    // Peek until 4 bytes arrived (or the client sent fewer and waits: then treat as HTTP).
    loop {
        match tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut first)).await {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) if n >= 4 => break,
            Ok(Ok(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return,
        }
    }
    if &first == PEER_MAGIC {
        handle_peer(stream, peer, ctx).await;
    } else {
        let span = info_span!("api", %peer);
        handle_http(&mut stream, peer, ctx).instrument(span).await;
    }
}

async fn read_frame(stream: &mut TcpStream, max: u64, idle: Duration) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    tokio::time::timeout(idle, stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let n = u32::from_be_bytes(len) as u64;
    if n > max {
        return None;
    }
    let mut buf = vec![0u8; n as usize];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf)
}

async fn handle_peer(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let mut magic = [0u8; 4];
    if stream.read_exact(&mut magic).await.is_err() {
        return;
    }
    let Some(hs) = read_frame(&mut stream, 4096, Duration::from_secs(2)).await else {
        warn!(%peer, "peer handshake missing or too large; closed");
        return;
    };
    let hs: Handshake = match serde_json::from_slice(&hs) {
        Ok(h) => h,
        Err(e) => {
            warn!(%peer, %e, "malformed peer handshake; closed");
            return;
        }
    };
    if !token_eq(&hs.token, &ctx.token) {
        warn!(%peer, from = hs.from, "peer connection rejected: wrong cluster token");
        return;
    }
    debug!(%peer, from = hs.from, "peer connected");
    while let Some(buf) = read_frame(
        &mut stream,
        ctx.cfg.frame_bytes_max,
        Duration::from_secs(30),
    )
    .await
    {
        match Message::parse_from_bytes(&buf) {
            Ok(m) => {
                if m.from != hs.from {
                    warn!(%peer, claimed = m.from, handshake = hs.from, "message from a different node id; closed");
                    return;
                }
                if ctx.inputs.send(Input::Peer(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(%peer, %e, "malformed peer frame; closed");
                return;
            }
        }
    }
}

async fn write_json(stream: &mut TcpStream, status: u16, body: &impl Serialize) {
    let body = serde_json::to_vec_pretty(body).unwrap_or_default();
    let resp = wire::encode_response(status, &body);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
}

async fn handle_http(stream: &mut TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let limits = ctx.cfg.http;
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let req = loop {
        match wire::parse_request(&buf, limits) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => {
                let status = match e {
                    wire::HttpError::BodyTooLarge { .. } | wire::HttpError::HeadersTooLarge(_) => {
                        413
                    }
                    _ => 400,
                };
                warn!(%peer, %e, "bad HTTP request");
                let body = ErrorResponse {
                    error: "bad_request".into(),
                    message: e.to_string(),
                    leader_id: None,
                    leader_address: None,
                };
                write_json(stream, status, &body).await;
                return;
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                let body = ErrorResponse {
                    error: "timeout".into(),
                    message: "request not received in time".into(),
                    leader_id: None,
                    leader_address: None,
                };
                write_json(stream, 408, &body).await;
                return;
            }
        }
    };
    let presented = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token_eq(presented, &ctx.token) {
        warn!(%peer, method = %req.method, path = %req.path, "API call rejected: missing or wrong cluster token");
        let body = ErrorResponse {
            error: "unauthorized".into(),
            message: "missing or wrong cluster token: send `Authorization: Bearer <token>` with the token from the cluster's token file".into(),
            leader_id: None,
            leader_address: None,
        };
        write_json(stream, 401, &body).await;
        return;
    }
    let timeout = Duration::from_millis(ctx.cfg.request_timeout_ms + 500);
    let result = route(&req, &ctx, timeout).await;
    match result {
        Ok(v) => write_json(stream, 200, &v).await,
        Err(e) => {
            let (status, body) = e.status_and_body();
            write_json(stream, status, &body).await;
        }
    }
}

async fn call(ctx: &ConnCtx, make: impl FnOnce(Reply) -> Input, timeout: Duration) -> ApiResult {
    let (tx, rx) = oneshot::channel();
    ctx.inputs
        .send(make(tx))
        .map_err(|_| ApiError::Internal("raft loop stopped".into()))?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::Internal("raft loop dropped the request".into())),
        Err(_) => Err(ApiError::Timeout),
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(req: &wire::Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v).map_err(|e| ApiError::Internal(e.to_string()))
}

pub fn status_of(r: &Replica) -> StatusResponse {
    let members = r
        .voters()
        .into_iter()
        .map(|id| ControllerMember {
            id,
            address: r.addresses.get(&id).cloned().unwrap_or_default(),
        })
        .collect();
    StatusResponse {
        node_id: r.id(),
        role: r.role().into(),
        leader_id: r.leader_id(),
        term: r.term(),
        commit_index: r.commit_index(),
        applied_index: r.applied_index(),
        members,
        workers: r.state.workers.values().cloned().collect(),
        job: r.state.job.clone(),
        checkpoints: r.state.checkpoints.len(),
        events: r.state.events.len(),
        matched: if r.role() == "leader" {
            r.raw
                .raft
                .prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            Default::default()
        },
    }
}

fn assignment(r: &Replica, worker: &str) -> ApiResult {
    let s = &r.state;
    let Some(_w) = s.workers.get(worker) else {
        return Err(ApiError::NotFound(format!(
            "worker {worker} is not registered"
        )));
    };
    let job = s.job.as_ref();
    let plan = job.and_then(|j| {
        if j.state.is_terminal() {
            None
        } else {
            j.plan.as_ref()
        }
    });
    let rank = plan
        .and_then(|p| p.ranks.iter().position(|id| id == worker))
        .map(|i| i as u32);
    let peers = plan
        .map(|p| {
            p.ranks
                .iter()
                .map(|id| {
                    s.workers
                        .get(id)
                        .map(|w| w.address.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let resume_step = s
        .checkpoints
        .iter()
        .filter(|c| c.durable)
        .map(|c| c.step)
        .max()
        .unwrap_or(0);
    to_json(&Assignment {
        worker: worker.to_string(),
        rank,
        epoch: plan.map(|p| p.epoch).unwrap_or(0),
        world_size: plan.map(|p| p.ranks.len() as u32).unwrap_or(0),
        peers,
        job: job.map(|j| j.spec.clone()),
        job_state: job.map(|j| j.state),
        resume_step,
        micro_shares: plan.map(|p| p.micro_shares.clone()).unwrap_or_default(),
    })
}

async fn route(req: &wire::Request, ctx: &ConnCtx, timeout: Duration) -> ApiResult {
    let path = req.path.trim_end_matches('/');
    let read = |f: Query| call(ctx, move |reply| Input::Read { query: f, reply }, timeout);
    match (req.method.as_str(), path) {
        ("GET", "/v1/status") => {
            call(
                ctx,
                |reply| Input::Local {
                    query: Box::new(|r| to_json(&status_of(r))),
                    reply,
                },
                timeout,
            )
            .await
        }
        ("GET", "/v1/metrics") => {
            call(
                ctx,
                |reply| Input::Local {
                    query: Box::new(|r| {
                        let mut v = to_json(&r.counters)?;
                        v["storage_syncs"] = r.raw.store().syncs.into();
                        Ok(v)
                    }),
                    reply,
                },
                timeout,
            )
            .await
        }
        ("POST", "/v1/command") => {
            let env: Envelope = parse_body(req)?;
            if env.request_id.is_empty() || env.request_id.len() > 128 {
                return Err(ApiError::BadRequest(
                    "request_id: expected 1..=128 bytes".into(),
                ));
            }
            if let Command::SubmitJob { spec } = &env.command {
                phalanx_core::validate_job(spec)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            }
            call(ctx, |reply| Input::Propose { env, reply }, timeout).await
        }
        ("POST", "/v1/heartbeat") => {
            let hb: HeartbeatRequest = parse_body(req)?;
            call(
                ctx,
                |reply| Input::Heartbeat {
                    worker: hb.worker,
                    compute_ms: hb.compute_ms,
                    reply,
                },
                timeout,
            )
            .await
        }
        ("POST", "/v1/members") => {
            let change: MemberChange = parse_body(req)?;
            call(ctx, |reply| Input::Member { change, reply }, timeout).await
        }
        ("GET", "/v1/workers") => {
            read(Box::new(|r| {
                to_json(&r.state.workers.values().collect::<Vec<_>>())
            }))
            .await
        }
        ("GET", "/v1/job") => read(Box::new(|r| to_json(&r.state.job))).await,
        ("GET", "/v1/checkpoints") => read(Box::new(|r| to_json(&r.state.checkpoints))).await,
        ("GET", "/v1/events") => {
            let limit: usize = req
                .query_param("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100)
                .min(10_000);
            read(Box::new(move |r| {
                let n = r.state.events.len();
                to_json(
                    &r.state
                        .events
                        .iter()
                        .skip(n.saturating_sub(limit))
                        .collect::<Vec<_>>(),
                )
            }))
            .await
        }
        ("GET", p) if p.starts_with("/v1/annotations/") => {
            let key = p["/v1/annotations/".len()..].to_string();
            read(Box::new(move |r| {
                Ok(serde_json::json!({"key": key, "value": r.state.annotations.get(&key)}))
            }))
            .await
        }
        ("GET", p) if p.starts_with("/v1/assignment/") => {
            let worker = p["/v1/assignment/".len()..].to_string();
            read(Box::new(move |r| assignment(r, &worker))).await
        }
        (_, p) if p.starts_with("/v1/") => Err(ApiError::NotFound(format!(
            "no route {} {}",
            req.method, req.path
        ))),
        _ => Err(ApiError::NotFound(format!(
            "no route {} {}",
            req.method, req.path
        ))),
    }
}
