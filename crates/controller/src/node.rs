//! One raft replica: `RawNode` over `SledStorage`, plus the state machine.
//!
//! No sockets and no clock here: the caller ticks it, steps it with messages, and sends the
//! messages that `on_ready` returns. The in-memory test harness and the TCP shell both drive
//! this same type.

use std::collections::BTreeMap;
use std::path::Path;

use phalanx_core::{Applied, ClusterState, StateLimits};
use phalanx_proto::{Envelope, NodeId, RaftRole};
use protobuf::Message as PbMessage;
use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
};
use raft::{Config, RawNode, StateRole};
use thiserror::Error;
use tracing::{debug, info, info_span, warn};

use crate::storage::{SledStorage, StorageError};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("state snapshot: {0}")]
    Snapshot(#[from] phalanx_core::SnapshotError),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("membership change refused: {0}")]
    Refused(String),
    /// The background sync of the log failed (or its thread is gone): the node stops, as
    /// it would on a failed fsync on the raft thread.
    #[error("persisting the raft log: {0}")]
    Persist(String),
}

/// Raft timing and log-compaction settings of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: NodeId,
    /// Ticks without a leader before a follower campaigns.
    pub election_tick: usize,
    /// Upper bound (exclusive) of the randomised election timeout, in ticks. raft-rs draws
    /// the timeout from `[election_tick, election_tick_max)` with an unseeded RNG, so the
    /// deterministic harness sets `election_tick_max = election_tick + 1`.
    pub election_tick_max: usize,
    pub heartbeat_tick: usize,
    /// Take a state-machine snapshot and compact the log every this many applied entries.
    pub snapshot_entries: u64,
    /// A snapshot sent to a follower that has not moved it out of raft-rs's `Snapshot`
    /// progress state after this many ticks is reported lost, so the leader sends another.
    /// (raft-rs pauses a follower in that state until `report_snapshot`; a snapshot message
    /// lost on the way would otherwise leave the follower behind until the next election.)
    pub snapshot_retry_ticks: usize,
    pub limits: StateLimits,
}

impl ReplicaConfig {
    pub fn new(id: NodeId) -> Self {
        ReplicaConfig {
            id,
            election_tick: 10,
            election_tick_max: 20,
            heartbeat_tick: 2,
            snapshot_entries: 1_000,
            snapshot_retry_ticks: 100,
            limits: StateLimits::default(),
        }
    }
}

/// A committed entry that carried a client command.
#[derive(Debug, Clone)]
pub struct AppliedCommand {
    pub index: u64,
    pub request_id: String,
    pub applied: Applied,
}

/// What one `on_ready` round produced.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// Send these to their `to` peer.
    pub messages: Vec<Message>,
    pub applied: Vec<AppliedCommand>,
    /// A conf change was applied: the new voter set.
    pub members_changed: bool,
    pub snapshot_installed: bool,
    /// Confirmed ReadIndex requests: serve each once `applied_index >= index`.
    pub read_states: Vec<raft::ReadState>,
    /// Conf change entries applied in this round: their index and the voters after them,
    /// or why raft-rs refused them (the entry is then skipped).
    pub conf_changes: Vec<(u64, Result<Vec<NodeId>, String>)>,
}

/// One Ready handled by [`Replica::ready_async`], its persistence still to be done.
pub struct AsyncReady {
    /// Messages that may go at once (a leader's appends and heartbeats).
    pub early: Vec<Message>,
    /// The Ready's number, for [`Replica::on_persisted`].
    pub number: u64,
    /// Entries, a new term or vote, a snapshot received or a compaction were written: an
    /// fsync must precede `on_persisted`. Otherwise nothing of this Ready needs the disk.
    pub needs_sync: bool,
    /// Messages that may go only once this Ready is durable (a follower's acknowledgements
    /// and votes).
    pub after_persist: Vec<Message>,
    pub out: ReadyOutput,
}

/// A Ready between `ready_begin` and `ready_end`.
pub struct PendingReady {
    rd: raft::Ready,
    out: ReadyOutput,
}

/// Counters for telemetry (`/v1/metrics`).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub proposals: u64,
    pub commits: u64,
    pub elections_won: u64,
    pub snapshots_taken: u64,
    pub snapshots_installed: u64,
    pub fsyncs: u64,
    /// Times this node saw the leader change to a known leader (`/metrics`).
    pub leader_changes: u64,
    /// The leader this node knew last (0: none).
    #[serde(skip)]
    pub last_leader: u64,
}

pub struct Replica {
    pub raw: RawNode<SledStorage>,
    pub state: ClusterState,
    cfg: ReplicaConfig,
    /// Addresses of controllers, from the CLI's `--peers` and from conf change contexts.
    pub addresses: BTreeMap<NodeId, String>,
    pub counters: Counters,
    last_role: StateRole,
    /// Ticks since open (the clock of `snapshot_sent`).
    ticks: u64,
    /// Follower -> tick at which the last snapshot was sent to it.
    snapshot_sent: BTreeMap<NodeId, u64>,
    /// A snapshot installed by `ready_async` (its Ready's number and index): raft-rs's
    /// applied index moves to it once that Ready is durable.
    snapshot_until_durable: Option<(u64, u64)>,
}

/// Route raft-rs's slog records into `tracing`.
pub fn raft_logger() -> slog::Logger {
    use slog::Drain;
    let drain = tracing_slog::TracingSlogDrain;
    slog::Logger::root(drain.fuse(), slog::o!())
}

impl Replica {
    /// Open (or create) the replica stored in `dir`. `initial_voters` bootstraps a brand-new
    /// member of the initial cluster; a node that joins later passes an empty slice and waits
    /// for the leader to send it a snapshot.
    pub fn open(
        dir: &Path,
        cfg: ReplicaConfig,
        initial_voters: &[NodeId],
        addresses: BTreeMap<NodeId, String>,
    ) -> Result<Self, NodeError> {
        let mut store = SledStorage::open(dir)?;
        if !store.is_initialized() && !initial_voters.is_empty() {
            store.initialize(initial_voters)?;
        }
        Self::from_storage(store, cfg, addresses)
    }

    /// The replica over a store already opened (and initialized, unless it waits to be
    /// added): what [`Replica::open`] does after opening its directory.
    pub fn from_storage(
        store: SledStorage,
        cfg: ReplicaConfig,
        addresses: BTreeMap<NodeId, String>,
    ) -> Result<Self, NodeError> {
        let snap = store.current_snapshot().clone();
        let state = if snap.data.is_empty() {
            ClusterState::new(cfg.limits)
        } else {
            ClusterState::restore(&snap.data)?
        };
        let raft_cfg = Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            min_election_tick: cfg.election_tick,
            max_election_tick: cfg.election_tick_max,
            heartbeat_tick: cfg.heartbeat_tick,
            // The state machine is rebuilt from the snapshot, so replay starts after it.
            applied: store.applied(),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let raw = RawNode::new(&raft_cfg, store, &raft_logger())?;
        let mut addresses = addresses;
        for m in &state.members {
            if !m.address.is_empty() {
                addresses.entry(m.id).or_insert_with(|| m.address.clone());
            }
        }
        Ok(Replica {
            raw,
            state,
            cfg,
            addresses,
            counters: Counters::default(),
            last_role: StateRole::Follower,
            ticks: 0,
            snapshot_sent: BTreeMap::new(),
            snapshot_until_durable: None,
        })
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }
    pub fn leader_id(&self) -> NodeId {
        self.raw.raft.leader_id
    }
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }
    pub fn applied_index(&self) -> u64 {
        self.state.applied_index
    }
    pub fn voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.raw.store().conf_state().voters.clone();
        v.sort_unstable();
        v
    }
    pub fn role(&self) -> RaftRole {
        match self.raw.raft.state {
            StateRole::Leader => RaftRole::Leader,
            StateRole::Follower => RaftRole::Follower,
            StateRole::Candidate => RaftRole::Candidate,
            StateRole::PreCandidate => RaftRole::PreCandidate,
        }
    }

    pub fn tick(&mut self) {
        if !self.election_waits_for_disk() {
            self.raw.tick();
        }
        self.ticks += 1;
        self.retry_lost_snapshots();
    }

    /// A voter that is the whole quorum by itself wins its election inside the tick that
    /// starts it, and raft-rs asserts at once that its whole log is durable
    /// (`last_index == persisted` in `become_leader`): with more voters the vote requests
    /// wait for the disk, so the log is durable before any vote comes back, but a lone
    /// voter asks nobody. With asynchronous persistence a lone voter can hold entries not yet
    /// durable (ones it took as a follower just before the other voters were removed, say)
    /// while its sync is slower than an election timeout. Its election clock then waits for
    /// the disk: nobody else can lead this group, so waiting costs nothing but the wait.
    fn election_waits_for_disk(&self) -> bool {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader || raft.raft_log.persisted >= raft.raft_log.last_index()
        {
            return false;
        }
        // The quorum is this node alone when it is the only voter of the incoming and the
        // outgoing configuration (an empty half of a joint config needs no vote).
        let voters = raft.prs().conf().voters().ids();
        voters.contains(self.cfg.id) && voters.iter().all(|id| id == self.cfg.id)
    }

    /// Report snapshots that have not reached their follower in `snapshot_retry_ticks` as
    /// failed: raft-rs then probes the follower again and sends a fresh snapshot.
    fn retry_lost_snapshots(&mut self) {
        if self.snapshot_sent.is_empty() {
            return;
        }
        if !self.is_leader() {
            self.snapshot_sent.clear();
            return;
        }
        let retry = self.cfg.snapshot_retry_ticks.max(1) as u64;
        let now = self.ticks;
        let due: Vec<NodeId> = self
            .snapshot_sent
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= retry)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.snapshot_sent.remove(&id);
            let stuck = self
                .raw
                .raft
                .prs()
                .get(id)
                .is_some_and(|pr| pr.state == raft::ProgressState::Snapshot);
            if stuck {
                warn!(
                    to = id,
                    ticks = retry,
                    "snapshot not acknowledged; reporting it lost so that it is sent again"
                );
                self.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// The transport could not deliver a snapshot to `to` (link down, queue full).
    pub fn report_snapshot_lost(&mut self, to: NodeId) {
        if self.snapshot_sent.remove(&to).is_some() && self.is_leader() {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
        }
    }

    pub fn step(&mut self, msg: Message) -> Result<(), NodeError> {
        match self.raw.step(msg) {
            Ok(()) => Ok(()),
            // Messages from removed or unknown peers are dropped, not fatal.
            Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn propose(&mut self, env: &Envelope) -> Result<(), NodeError> {
        let data = serde_json::to_vec(env).unwrap_or_default();
        self.raw.propose(Vec::new(), data)?;
        self.counters.proposals += 1;
        Ok(())
    }

    /// Add or remove a voter through joint consensus (ConfChangeV2, left automatically).
    pub fn propose_member_change(
        &mut self,
        add: bool,
        id: NodeId,
        address: &str,
    ) -> Result<u64, NodeError> {
        let voters = self.voters();
        let cs = self.raw.store().conf_state();
        if !cs.voters_outgoing.is_empty() || self.raw.raft.has_pending_conf() {
            return Err(NodeError::Refused(
                "another membership change is still in progress; retry once it is applied".into(),
            ));
        }
        if add && voters.contains(&id) {
            return Err(NodeError::Refused(format!(
                "controller {id} is already a voter"
            )));
        }
        if !add && !voters.contains(&id) {
            return Err(NodeError::Refused(format!(
                "controller {id} is not a voter"
            )));
        }
        if !add && voters.len() <= 1 {
            return Err(NodeError::Refused(format!(
                "removing controller {id} would leave no voter"
            )));
        }
        let mut single = ConfChangeSingle {
            node_id: id,
            ..Default::default()
        };
        single.set_change_type(if add {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.set_transition(ConfChangeTransition::Implicit);
        let ctx: BTreeMap<NodeId, String> = if add {
            [(id, address.to_string())].into_iter().collect()
        } else {
            BTreeMap::new()
        };
        cc.set_context(serde_json::to_vec(&ctx).unwrap_or_default().into());
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose_conf_change(Vec::new(), cc)?;
        self.counters.proposals += 1;
        let index = self.raw.raft.raft_log.last_index();
        // raft-rs turns a conf change it will not take (one is pending) into an empty entry.
        let is_cc = index > before
            && self
                .raw
                .raft
                .raft_log
                .slice(
                    index,
                    index + 1,
                    None,
                    raft::GetEntriesContext::empty(false),
                )
                .ok()
                .and_then(|e| e.first().map(|e| e.get_entry_type()))
                == Some(EntryType::EntryConfChangeV2);
        if !is_cc {
            return Err(NodeError::Refused(
                "raft refused the change (another membership change is pending)".into(),
            ));
        }
        Ok(index)
    }

    /// Process one Ready, in the order raft-rs documents: send leader messages, install a
    /// snapshot, apply committed entries, persist entries and hard state (fsync), then send
    /// the messages that must follow persistence, advance, and apply what became committed.
    pub fn on_ready(&mut self) -> Result<ReadyOutput, NodeError> {
        let Some((early, pending)) = self.ready_begin() else {
            return Ok(ReadyOutput::default());
        };
        let mut out = self.ready_end(pending)?;
        let mut messages = early;
        messages.append(&mut out.messages);
        out.messages = messages;
        Ok(out)
    }

    /// The first half of `on_ready`: the messages that may go out before anything is
    /// persisted (a leader's heartbeats and appends), to be sent at once, so that they never
    /// wait behind this Ready's fsync. `ready_end` does the rest.
    fn ready_begin(&mut self) -> Option<(Vec<Message>, PendingReady)> {
        if !self.raw.has_ready() {
            return None;
        }
        let mut out = ReadyOutput::default();
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            if ss.raft_state == StateRole::Leader && self.last_role != StateRole::Leader {
                self.counters.elections_won += 1;
                info!(term = self.raw.raft.term, "became leader");
            }
            self.last_role = ss.raft_state;
            if ss.leader_id != 0 && ss.leader_id != self.counters.last_leader {
                self.counters.leader_changes += 1;
                self.counters.last_leader = ss.leader_id;
            }
        }
        let early = rd.take_messages();
        self.note_snapshots_sent(&early);
        out.read_states = rd.take_read_states();
        Some((early, PendingReady { rd, out }))
    }

    /// The second half of `on_ready` (see `ready_begin`).
    fn ready_end(&mut self, pending: PendingReady) -> Result<ReadyOutput, NodeError> {
        let PendingReady { mut rd, mut out } = pending;
        let span = info_span!("ready", node = self.cfg.id);
        let _g = span.enter();
        let snapshots_before = self.counters.snapshots_taken;

        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), &mut out)?;
        }

        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out)?;

        let hs = rd.hs().cloned();
        if !rd.entries().is_empty() || hs.is_some() {
            self.raw.mut_store().append(rd.entries(), hs.as_ref())?;
        }
        // raft-rs says when the Ready must be durable before its messages go: new entries,
        // a new term or vote. A hard state that only moves the commit index needs no fsync
        // (the commit index is recovered from the leader), so a follower's answer to a
        // heartbeat that advances the commit never waits behind the disk.
        if rd.must_sync() || !rd.entries().is_empty() || out.snapshot_installed {
            self.raw.mut_store().sync()?;
            self.counters.fsyncs += 1;
        }
        out.messages.extend(rd.take_persisted_messages());

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out)?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        if self.counters.snapshots_taken != snapshots_before {
            self.raw.mut_store().sync()?;
            self.counters.fsyncs += 1;
        }
        self.note_snapshots_sent(&out.messages);
        Ok(out)
    }

    /// One Ready with persistence left to the caller (raft-rs's asynchronous Ready), so
    /// the raft thread never waits on the disk: the Ready's entries and hard state are
    /// written to sled (memory; fast), its snapshot installed and its committed entries
    /// applied. The caller sends `early` at once, makes everything written durable when
    /// `needs_sync` (any number of Readies may share one fsync: see
    /// `storage::Syncer`), then calls [`Replica::on_persisted`] with `number` (or a larger
    /// one) and only then sends `after_persist`.
    pub fn ready_async(&mut self) -> Result<Option<AsyncReady>, NodeError> {
        let Some((early, pending)) = self.ready_begin() else {
            return Ok(None);
        };
        let PendingReady { mut rd, mut out } = pending;
        let snapshots_before = self.counters.snapshots_taken;
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone(), &mut out)?;
        }
        let committed = rd.take_committed_entries();
        let applied_upto = committed.last().map(|e| e.index);
        self.apply_entries(committed, &mut out)?;
        let hs = rd.hs().cloned();
        if !rd.entries().is_empty() || hs.is_some() {
            self.raw.mut_store().append(rd.entries(), hs.as_ref())?;
        }
        let mut needs_sync = rd.must_sync() || !rd.entries().is_empty() || out.snapshot_installed;
        let after_persist = rd.take_persisted_messages();
        let number = rd.number();
        self.raw.advance_append_async(rd);
        // raft-rs lets `applied` pass neither the commit nor what is durable here: entries
        // (handed out only once durable) advance it now, a snapshot once it is durable.
        if let Some(last) = applied_upto {
            self.raw.advance_apply_to(last);
        }
        if out.snapshot_installed {
            self.snapshot_until_durable = Some((number, self.state.applied_index));
        }
        self.maybe_compact()?;
        // A compaction (after a membership change, or every `snapshot_entries`) is made
        // durable by the sync thread like the rest of the Ready, never here.
        needs_sync |= self.counters.snapshots_taken != snapshots_before;
        self.note_snapshots_sent(&after_persist);
        Ok(Some(AsyncReady {
            early,
            number,
            needs_sync,
            after_persist,
            out,
        }))
    }

    /// Every Ready up to `number` is durable (see [`Replica::ready_async`]); `fsynced` says
    /// whether it took an fsync (for the counters).
    pub fn on_persisted(&mut self, number: u64, fsynced: bool) {
        if fsynced {
            self.counters.fsyncs += 1;
        }
        self.raw.on_persist_ready(number);
        if let Some((ready, index)) = self.snapshot_until_durable {
            if number >= ready {
                self.snapshot_until_durable = None;
                self.raw.advance_apply_to(index);
            }
        }
    }

    fn note_snapshots_sent(&mut self, messages: &[Message]) {
        for m in messages {
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshot_sent.insert(m.to, self.ticks);
            }
        }
    }

    fn install_snapshot(
        &mut self,
        snap: raft::prelude::Snapshot,
        out: &mut ReadyOutput,
    ) -> Result<(), NodeError> {
        let index = snap.get_metadata().index;
        self.state = ClusterState::restore(&snap.data)?;
        self.state.note_index(index);
        self.raw.mut_store().apply_snapshot(&snap)?;
        for m in &self.state.members {
            if !m.address.is_empty() {
                self.addresses.insert(m.id, m.address.clone());
            }
        }
        self.counters.snapshots_installed += 1;
        out.snapshot_installed = true;
        out.members_changed = true;
        info!(index, "installed snapshot from leader");
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        out: &mut ReadyOutput,
    ) -> Result<(), NodeError> {
        for e in entries {
            self.counters.commits += 1;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        self.state.note_index(e.index);
                        continue;
                    }
                    match serde_json::from_slice::<Envelope>(&e.data) {
                        Ok(env) => {
                            let applied = self.state.apply(e.index, &env);
                            debug!(index = e.index, request_id = %env.request_id, "applied");
                            out.applied.push(AppliedCommand {
                                index: e.index,
                                request_id: env.request_id,
                                applied,
                            });
                        }
                        Err(err) => {
                            // Only this node's API proposes, after decoding; keep going.
                            warn!(index = e.index, %err, "undecodable entry skipped");
                            self.state.note_index(e.index);
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = match Self::decode_conf_change(&e) {
                        Ok(cc) => cc,
                        Err(err) => {
                            warn!(index = e.index, %err, "undecodable conf change skipped");
                            self.state.note_index(e.index);
                            out.conf_changes.push((e.index, Err(err.to_string())));
                            continue;
                        }
                    };
                    let ctx: BTreeMap<NodeId, String> =
                        serde_json::from_slice(&cc.context).unwrap_or_default();
                    // A change raft-rs refuses (it would leave no voter, say) is logged and
                    // skipped: returning the error would stop the node on every replay.
                    let cs = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => cs,
                        Err(err) => {
                            warn!(index = e.index, %err, "conf change refused at apply; skipped");
                            self.state.note_index(e.index);
                            out.conf_changes.push((e.index, Err(err.to_string())));
                            continue;
                        }
                    };
                    for (id, addr) in &ctx {
                        self.addresses.insert(*id, addr.clone());
                    }
                    self.raw.mut_store().set_conf_state(cs.clone())?;
                    let voters = cs.voters.clone();
                    let addrs = self.addresses.clone();
                    self.state.set_members(e.index, &voters, &addrs);
                    out.members_changed = true;
                    let mut sorted = voters.clone();
                    sorted.sort_unstable();
                    out.conf_changes.push((e.index, Ok(sorted)));
                    // A new node starts with an empty conf state: raft-rs can neither apply a
                    // joint change on a zero-voter config nor restore a snapshot whose conf
                    // state lacks it. So snapshot right after every membership change; the
                    // leader then catches the new node up with a snapshot that includes it.
                    // The caller makes it durable: `on_ready` at once, `ready_async` on the
                    // sync thread (never an fsync on the raft thread).
                    self.compact()?;
                    info!(index = e.index, voters = ?cs.voters, outgoing = ?cs.voters_outgoing, "conf change applied");
                }
            }
        }
        Ok(())
    }

    fn decode_conf_change(e: &Entry) -> Result<ConfChangeV2, raft::Error> {
        Ok(if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            ConfChangeV2::parse_from_bytes(&e.data).map_err(raft::Error::CodecError)?
        } else {
            // Legacy v1 change (never proposed by us): convert by hand.
            let v1 = raft::prelude::ConfChange::parse_from_bytes(&e.data)
                .map_err(raft::Error::CodecError)?;
            let mut single = ConfChangeSingle {
                node_id: v1.node_id,
                ..Default::default()
            };
            single.set_change_type(v1.get_change_type());
            let mut v2 = ConfChangeV2::default();
            v2.set_changes(vec![single].into());
            v2.set_context(v1.context.clone());
            v2
        })
    }

    /// Compact once `snapshot_entries` entries were applied since the last snapshot.
    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let snap_index = self.raw.store().current_snapshot().get_metadata().index;
        if self.state.applied_index >= snap_index + self.cfg.snapshot_entries {
            self.compact()?;
        }
        Ok(())
    }

    /// Snapshot the state machine at the applied index and drop the log before it, in one
    /// sled batch that also stores the commit index (see `SledStorage::compact`). It is not
    /// made durable here: the Ready that compacted asks for a sync (`needs_sync`, done by the
    /// sync thread; `on_ready` syncs at its end). A crash before that sync finds the old log
    /// and snapshot, from which the replay compacts again.
    fn compact(&mut self) -> Result<(), NodeError> {
        let applied = self.state.applied_index;
        let snap_index = self.raw.store().current_snapshot().get_metadata().index;
        if applied > snap_index && applied <= self.raw.store().last_index_cached() {
            let data = self.state.snapshot_bytes();
            self.raw.mut_store().compact(applied, data)?;
            self.counters.snapshots_taken += 1;
            info!(index = applied, "log compacted behind a state snapshot");
        }
        Ok(())
    }
}
