//! The raft thread: a plain loop over a channel with a tick deadline that owns the
//! `Replica`, so raft logic never waits on a socket.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_core::{DutiesConfig, DutyKind, LeaderDuties};
use phalanx_proto::{
    Command, CommandResponse, Envelope, HeartbeatRequest, MemberAction, MemberChange, NodeId,
};
use raft::prelude::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span};

use super::api::{ApiError, Query, Reply};
use super::transport::{peer_sender, LinkTiming};
use super::ServerConfig;
use crate::node::{NodeError, Replica};
use crate::persist::{PersistQueue, PersistStep};

pub(crate) enum Input {
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
        hb: HeartbeatRequest,
        reply: Reply,
    },
    Member {
        change: MemberChange,
        reply: Reply,
    },
    /// The sync thread made every Ready up to `number` durable (or failed to).
    Persisted {
        number: u64,
        result: Result<(), String>,
    },
}

/// Persistence off the raft thread (see `crate::persist`): the sync thread runs one
/// fsync at a time and reports through the raft loop's own input channel.
struct Persistence {
    requests: std_mpsc::Sender<u64>,
    queue: PersistQueue,
}

impl Persistence {
    fn start(
        id: NodeId,
        syncer: crate::storage::Syncer,
        inputs: std_mpsc::Sender<Input>,
    ) -> Persistence {
        let (tx, rx) = std_mpsc::channel::<u64>();
        let spawned = std::thread::Builder::new()
            .name(format!("raft-sync-{id}"))
            .spawn(move || {
                // Whatever ends this thread while a sync is asked for (a panic in sled, say)
                // is reported, so the raft loop stops instead of holding acknowledgements.
                struct Report(std_mpsc::Sender<Input>, Option<u64>);
                impl Drop for Report {
                    fn drop(&mut self) {
                        if let Some(number) = self.1.take() {
                            let _ = self.0.send(Input::Persisted {
                                number,
                                result: Err("the raft sync thread ended during a sync".into()),
                            });
                        }
                    }
                }
                let mut report = Report(inputs, None);
                // Ends when the raft loop (the sender) is gone.
                while let Ok(number) = rx.recv() {
                    report.1 = Some(number);
                    let result = syncer.sync().map_err(|e| e.to_string());
                    report.1 = None;
                    if report.0.send(Input::Persisted { number, result }).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread the first sync request fails and the loop stops with it.
            tracing::error!(%e, "could not start the raft sync thread");
        }
        Persistence {
            requests: tx,
            queue: PersistQueue::default(),
        }
    }
}

struct Waiter {
    reply: Reply,
    deadline: Instant,
}

/// A membership change proposed at `index`, answered once that entry is applied.
struct MemberWaiter {
    index: u64,
    id: NodeId,
    action: MemberAction,
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

pub(crate) struct RaftLoop {
    r: Replica,
    cfg: ServerConfig,
    rt: tokio::runtime::Handle,
    peers: HashMap<NodeId, mpsc::Sender<Message>>,
    waiters: HashMap<String, Vec<Waiter>>,
    member_waiters: Vec<MemberWaiter>,
    reads: HashMap<u64, PendingRead>,
    /// Reads that reached this leader before its first commit in the term; their ReadIndex
    /// is requested as soon as that commit lands.
    held_reads: Vec<u64>,
    next_read: u64,
    /// Leases, stragglers and repeat suppression while this node leads: the pure
    /// `phalanx_core::LeaderDuties`, driven here by the wall clock (the simulator drives
    /// the same code in virtual time).
    duties: Option<LeaderDuties>,
    lease_seq: u64,
    start: Instant,
    was_leader: bool,
    peer_gate: Arc<std::sync::atomic::AtomicBool>,
    persist: Persistence,
}

impl RaftLoop {
    pub(crate) fn new(
        r: Replica,
        cfg: ServerConfig,
        rt: tokio::runtime::Handle,
        peer_gate: Arc<std::sync::atomic::AtomicBool>,
        inputs: std_mpsc::Sender<Input>,
    ) -> Self {
        let persist = Persistence::start(cfg.id, r.raw.store().syncer(), inputs);
        RaftLoop {
            persist,
            r,
            cfg,
            rt,
            peers: HashMap::new(),
            waiters: HashMap::new(),
            member_waiters: Vec::new(),
            reads: HashMap::new(),
            held_reads: Vec::new(),
            next_read: 1,
            duties: None,
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

    pub(crate) fn run(
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
            // Leases are judged right after the queued inputs (heartbeats among them) are
            // handled, never after a slow Ready while heartbeats wait in the queue.
            if Instant::now() >= next_lease_check {
                next_lease_check = Instant::now() + Duration::from_millis(50);
                self.check_leases()?;
                self.expire_waiters();
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
        }
    }

    fn handle(&mut self, input: Input) -> Result<(), NodeError> {
        match input {
            Input::Persisted { number, result } => self.on_persisted(number, result)?,
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
                    let (now, cfg) = (self.now_ms(), self.duties_cfg());
                    if let Some(d) = self.duties.as_mut() {
                        d.on_register(id, now, &cfg);
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
                if self.r.raw.raft.commit_to_current_term() {
                    self.r.raw.read_index(id.to_be_bytes().to_vec());
                } else {
                    // raft-rs silently drops a ReadIndex until the leader has committed an
                    // entry of its term (its no-op, one round trip after the election):
                    // hold the read until then.
                    self.held_reads.push(id);
                }
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
            Input::Heartbeat { hb, reply } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                if !self.r.state.workers.contains_key(&hb.worker) {
                    let _ = reply.send(Err(ApiError::NotFound(format!(
                        "worker {} is not registered",
                        hb.worker
                    ))));
                    return Ok(());
                }
                let (now, cfg) = (self.now_ms(), self.duties_cfg());
                let plan = self.r.state.job.as_ref().and_then(|j| j.plan.as_ref());
                if let Some(d) = self.duties.as_mut() {
                    d.on_heartbeat(&hb, plan, now, &cfg);
                }
                let _ = reply.send(Ok(serde_json::json!({"ok": true})));
            }
            Input::Member { change, reply } => {
                if !self.r.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return Ok(());
                }
                if let Some(problem) = change.problem() {
                    let _ = reply.send(Err(ApiError::BadRequest(problem)));
                    return Ok(());
                }
                let add = change.action == MemberAction::Add;
                match self
                    .r
                    .propose_member_change(add, change.id, &change.address)
                {
                    // Answered when the entry is applied (accepted, or refused at apply).
                    Ok(index) => self.member_waiters.push(MemberWaiter {
                        index,
                        id: change.id,
                        action: change.action,
                        reply,
                        deadline: Instant::now()
                            + Duration::from_millis(self.cfg.request_timeout_ms),
                    }),
                    Err(NodeError::Refused(m)) => {
                        let _ = reply.send(Err(ApiError::Conflict(m)));
                    }
                    Err(NodeError::Raft(raft::Error::ProposalDropped)) => {
                        let _ = reply.send(Err(self.not_leader()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::BadRequest(e.to_string())));
                    }
                }
            }
        }
        Ok(())
    }

    /// Request the ReadIndex of held reads once this leader has committed in its term.
    fn release_held_reads(&mut self) {
        if self.held_reads.is_empty() || !self.r.raw.raft.commit_to_current_term() {
            return;
        }
        for id in std::mem::take(&mut self.held_reads) {
            if self.reads.contains_key(&id) {
                self.r.raw.read_index(id.to_be_bytes().to_vec());
            }
        }
    }

    fn process_ready(&mut self) -> Result<(), NodeError> {
        for _ in 0..16 {
            self.release_held_reads();
            if !self.r.raw.has_ready() {
                break;
            }
            let span = info_span!("ready_loop", node = self.cfg.id);
            let _g = span.enter();
            // A leader's messages go out at once; the fsync runs on the sync thread.
            let Some(mut ar) = self.r.ready_async()? else {
                break;
            };
            for m in std::mem::take(&mut ar.early) {
                self.send(m);
            }
            let step = self.persist.queue.after_ready(&mut self.r, &mut ar);
            self.apply_persist_step(step)?;
            let out = ar.out;
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
            for (index, result) in out.conf_changes {
                let Some(k) = self.member_waiters.iter().position(|w| w.index == index) else {
                    continue;
                };
                let w = self.member_waiters.swap_remove(k);
                let answer = match result {
                    Ok(voters) => Ok(serde_json::json!({
                        "accepted": true,
                        "action": w.action,
                        "id": w.id,
                        "index": index,
                        "voters": voters,
                    })),
                    Err(reason) => Err(ApiError::Conflict(format!(
                        "the change committed at index {index} but raft refused it at apply: \
                         {reason}"
                    ))),
                };
                let _ = w.reply.send(answer);
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

    /// Send what a persistence step released and start the sync it asks for.
    fn apply_persist_step(&mut self, step: PersistStep) -> Result<(), NodeError> {
        for m in step.send {
            self.send(m);
        }
        if let Some(number) = step.start_sync {
            self.persist
                .requests
                .send(number)
                .map_err(|_| NodeError::Persist("the raft sync thread is gone".into()))?;
        }
        Ok(())
    }

    fn on_persisted(&mut self, number: u64, result: Result<(), String>) -> Result<(), NodeError> {
        result.map_err(NodeError::Persist)?;
        let step = self.persist.queue.on_synced(&mut self.r, number);
        self.apply_persist_step(step)
    }

    fn send(&mut self, m: Message) {
        let to = m.to;
        if !self.peers.contains_key(&to) {
            let Some(addr) = self.r.addresses.get(&to).cloned() else {
                debug!(to, "no address for peer; message dropped");
                return;
            };
            let (tx, rx) = mpsc::channel(self.cfg.peer_queue_max);
            let sec = self.cfg.security.clone();
            let from = self.cfg.id;
            let frame_max = self.cfg.frame_bytes_max;
            let message_max = self.cfg.message_bytes_max;
            let timing = LinkTiming::new(self.cfg.peer_liveness());
            self.rt.spawn(peer_sender(
                from,
                to,
                addr,
                sec,
                rx,
                frame_max,
                message_max,
                timing,
            ));
            self.peers.insert(to, tx);
        }
        if let Some(tx) = self.peers.get(&to) {
            // Full queue: drop; raft retransmits. A dropped snapshot is reported at once
            // (otherwise the replica reports it after `snapshot_retry_ticks`).
            let snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
            if tx.try_send(m).is_err() && snapshot {
                self.r.report_snapshot_lost(to);
            }
        }
    }

    fn on_role_change(&mut self) {
        let leader = self.r.is_leader();
        if leader && !self.was_leader {
            // Fresh leases: this leader has heard no heartbeat yet; the grace period keeps
            // it from failing healthy workers.
            self.duties = Some(LeaderDuties::new(self.now_ms()));
        }
        if !leader && self.was_leader {
            self.duties = None;
            let err = self.not_leader();
            for (_, ws) in self.waiters.drain() {
                for w in ws {
                    let _ = w.reply.send(Err(err.clone()));
                }
            }
            for w in self.member_waiters.drain(..) {
                let _ = w.reply.send(Err(err.clone()));
            }
            self.held_reads.clear();
            for (_, p) in self.reads.drain() {
                let _ = p.reply.send(Err(err.clone()));
            }
        }
        self.was_leader = leader;
    }

    fn duties_cfg(&self) -> DutiesConfig {
        DutiesConfig {
            lease: self.cfg.lease,
            stragglers: self.cfg.stragglers,
            ..DutiesConfig::default()
        }
    }

    /// The leader's duties: lease decisions (a repeat of one in flight is suppressed) and,
    /// twice a second, the stragglers of the running job's plan (a rank far slower than
    /// the median first gets a smaller share, then is drained so a spare takes its place).
    /// Every duty is proposed with its reason.
    fn check_leases(&mut self) -> Result<(), NodeError> {
        let (now, cfg) = (self.now_ms(), self.duties_cfg());
        let Some(duties) = self.duties.as_mut() else {
            return Ok(());
        };
        let plan = self
            .r
            .state
            .job
            .as_ref()
            .filter(|j| j.state == phalanx_proto::JobState::Running)
            .and_then(|j| j.plan.as_ref());
        let due = duties.on_tick(now, &self.r.state.workers, plan, &cfg);
        for duty in due {
            self.lease_seq += 1;
            let prefix = match duty.kind {
                DutyKind::Lease => "lease",
                DutyKind::Straggler => "straggler",
            };
            // The decision joins the trace of the report it confirms, or is the root of its
            // own (a recovery the controller detected, from the worker's last heartbeat):
            // a plan it makes carries its context to the workers.
            let since = duty.since_ms.map(|t| {
                let ago = std::time::Duration::from_millis(now.saturating_sub(t));
                std::time::SystemTime::now()
                    .checked_sub(ago)
                    .unwrap_or(std::time::UNIX_EPOCH)
            });
            let trace = super::trace::duty_trace(
                prefix,
                &duty.worker,
                duty.reason(),
                duty.trace.as_ref(),
                since,
            );
            let env = Envelope {
                trace,
                request_id: format!(
                    "{prefix}-n{}-t{}-{}",
                    self.cfg.id,
                    self.r.term(),
                    self.lease_seq
                ),
                command: duty.command.clone(),
            };
            info!(worker = %duty.worker, health = ?duty.health(), reason = duty.reason(), "{prefix} decision");
            if let Err(e) = self.r.propose(&env) {
                debug!(%e, "{prefix} decision not proposed; decided again at the next check");
                if let Some(d) = self.duties.as_mut() {
                    d.not_proposed(&duty);
                }
            }
        }
        Ok(())
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
        let (expired, live): (Vec<MemberWaiter>, Vec<MemberWaiter>) = self
            .member_waiters
            .drain(..)
            .partition(|w| w.deadline <= now);
        self.member_waiters = live;
        for w in expired {
            let _ = w.reply.send(Err(ApiError::Timeout));
        }
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
