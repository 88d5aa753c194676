//! A randomized simulation of the controller's Raft group, in the spirit of FoundationDB's
//! simulation and TigerBeetle's VOPR.
//!
//! Each seed draws a schedule: crashes and restarts, partitions (isolated nodes, splits, one-way cuts) and their
//! heals, message loss, duplication, delay and reordering, and clients that propose writes
//! and ask for linearizable reads (ReadIndex, as the server's raft loop does). The nodes are
//! the real `Replica` (raft-rs `RawNode` over `SledStorage`) and the real state machine.
//!
//! **The crash model is a real disk's:** a crashed node comes back with exactly what its last
//! completed sync made durable (log, hard state, conf state, snapshot), not with what its
//! sled still held (sled flushes on drop, so reopening its directory would keep writes that
//! no fsync covered). Every sync records the store's image (`SledStorage::image`): the
//! server's asynchronous path (`ready_async` + `PersistQueue`) as the sync starts, to be
//! durable when it finishes 1..=`sync_delay_max` ticks later; the synchronous path
//! (`on_ready`) at each `SledStorage::sync`. A sync in flight at the crash may or may not
//! have reached the disk. A restart builds a fresh store from that image.
//!
//! After every simulated tick it checks:
//!
//! - nodes acknowledge only what is durable: an append response vouches for entries (above
//!   its commit index) that its durable log holds with the same terms, a granted vote and a
//!   vote request for a term and vote its durable hard state holds;
//! - at most one leader per term;
//! - no committed entry is lost or changed (the same index always holds the same entry, and
//!   a node that becomes leader holds every entry committed before it won);
//! - the applied state machines agree (equal states at equal applied indexes);
//! - reads are linearizable (a read sees every write and read that completed before it was
//!   invoked, and the state it returns is the one every replica has at that index);
//! - every acknowledged write survives to the end, and once the faults stop the cluster
//!   elects a leader, commits a write and converges.
//!
//! raft-rs draws election jitter from an unseeded RNG, so every node gets a fixed election
//! timeout (a range one tick wide) and the whole run is a function of the seed.
//!
//! `cargo test --release -p phalanx-controller --test sim_raft` runs the fast batch;
//! arguments after `--`: `--seeds N` (how many), `--start S` (first seed), `--seed S`
//! (replay one seed with its trace), `--threads T`. `just sim-raft --seeds 10000`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use phalanx_controller::node::{NodeError, ReadyOutput};
use phalanx_controller::persist::PersistQueue;
use phalanx_controller::storage::{SledStorage, StoreImage};
use phalanx_controller::{Replica, ReplicaConfig};
use phalanx_core::ClusterState;
use phalanx_proto::{Command, Envelope, NodeId};
use raft::prelude::{Message, MessageType};
use raft::GetEntriesContext;

/// Fast batch run by `cargo test` / `just test`.
const DEFAULT_SEEDS: u64 = 300;
/// Simulated ticks with faults, then ticks allowed for the healed cluster to converge.
const FAULT_TICKS: u64 = 300;
const HEAL_TICKS: u64 = 400;

// ---------------------------------------------------------------------------------------
// Deterministic randomness.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.below(v.len() as u64) as usize])
        }
    }
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

// ---------------------------------------------------------------------------------------
// The simulated cluster.

struct InFlight {
    deliver_at: u64,
    msg: Message,
}

struct PendingWrite {
    node: NodeId,
    key: String,
}

struct PendingRead {
    node: NodeId,
    key: String,
    /// The highest log index any operation had completed at when this read was invoked.
    floor: u64,
    index: Option<u64>,
}

/// Fault rates drawn once per seed.
#[derive(Debug)]
struct Profile {
    nodes: u64,
    snapshot_entries: u64,
    loss: f64,
    dup: f64,
    delay_max: u64,
    crash: f64,
    restart: f64,
    partition: f64,
    heal: f64,
    write: f64,
    read: f64,
    /// 0: each Ready is made durable on the spot (`Replica::on_ready`); otherwise the
    /// server's asynchronous path (`ready_async` + `PersistQueue`), each sync finishing
    /// 1..=this many ticks after it starts.
    sync_delay_max: u64,
}

/// One node's round: the messages to send and its Ready outputs.
type Driven = (Vec<Message>, Vec<ReadyOutput>);

/// A sync in flight in the asynchronous mode.
struct InFlightSync {
    /// The Ready number it reports durable.
    number: u64,
    /// The tick at which it finishes.
    due: u64,
    /// What it makes durable: the store as the sync began.
    image: StoreImage,
}

struct Sim {
    seed: u64,
    rng: Rng,
    p: Profile,
    root: PathBuf,
    voters: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Replica>,
    /// Asynchronous persistence per live node: its queue and the running sync (the Ready
    /// number it covers, the tick it finishes, the image it makes durable). A crash drops
    /// both.
    persist: BTreeMap<NodeId, (PersistQueue, Option<InFlightSync>)>,
    /// Per node: what its disk holds, the image of its last completed sync. Kept across a
    /// crash: the restart begins from it.
    durable: BTreeMap<NodeId, StoreImage>,
    /// Per node: how many times it was restarted from its image (each in a new directory).
    generation: BTreeMap<NodeId, u64>,
    down: BTreeSet<NodeId>,
    /// Directed cuts: messages from .0 to .1 are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    net: Vec<InFlight>,
    now: u64,
    verbose: bool,
    trace_hash: u64,
    // checks
    leader_of_term: BTreeMap<u64, NodeId>,
    /// index -> (term, hash of entry data and type): the committed log.
    committed: BTreeMap<u64, (u64, u64)>,
    /// Per node: committed entries already compared.
    checked_to: BTreeMap<NodeId, u64>,
    /// Per node: the term in which it was last seen leading.
    led_term: BTreeMap<NodeId, u64>,
    states: BTreeMap<u64, ClusterState>,
    writes: HashMap<String, PendingWrite>,
    acked: BTreeMap<String, (u64, String, String)>,
    reads: BTreeMap<u64, PendingRead>,
    next_op: u64,
    /// The highest log index seen by any completed client operation.
    observed: u64,
    stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    writes_acked: u64,
    reads_served: u64,
    crashes: u64,
    partitions: u64,
    elections: u64,
    snapshots_installed: u64,
}

fn entry_hash(e: &raft::prelude::Entry) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut h, &(e.get_entry_type() as i32).to_le_bytes());
    fnv(&mut h, &e.data);
    h
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5851_F42D_4C95_7F2D);
        let p = Profile {
            nodes: if rng.chance(0.7) { 3 } else { 5 },
            snapshot_entries: 3 + rng.below(40),
            loss: [0.0, 0.02, 0.1, 0.25][rng.below(4) as usize],
            dup: [0.0, 0.02, 0.1][rng.below(3) as usize],
            delay_max: rng.below(5),
            crash: [0.0, 0.005, 0.02][rng.below(3) as usize],
            restart: 0.02 + 0.1 * (rng.below(4) as f64 / 4.0),
            partition: [0.0, 0.005, 0.02][rng.below(3) as usize],
            heal: 0.01 + 0.05 * (rng.below(4) as f64 / 4.0),
            write: 0.1 + 0.4 * (rng.below(4) as f64 / 4.0),
            read: 0.05 + 0.3 * (rng.below(4) as f64 / 4.0),
            sync_delay_max: [0, 1, 3, 8][rng.below(4) as usize],
        };
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let root = base.join(format!(
            "phalanx-sim-raft-{}-{}-{}",
            std::process::id(),
            seed,
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        let _ = std::fs::remove_dir_all(&root);
        let voters: Vec<NodeId> = (1..=p.nodes).collect();
        let mut sim = Sim {
            seed,
            rng,
            p,
            root,
            voters,
            nodes: BTreeMap::new(),
            persist: BTreeMap::new(),
            durable: BTreeMap::new(),
            generation: BTreeMap::new(),
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            net: Vec::new(),
            now: 0,
            verbose,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            leader_of_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            checked_to: BTreeMap::new(),
            led_term: BTreeMap::new(),
            states: BTreeMap::new(),
            writes: HashMap::new(),
            acked: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_op: 0,
            observed: 0,
            stats: Stats::default(),
        };
        if verbose {
            eprintln!("seed {seed}: {:?}", sim.p);
        }
        for id in sim.voters.clone() {
            sim.open(id);
        }
        sim
    }

    fn cfg(&self, id: NodeId) -> ReplicaConfig {
        let mut c = ReplicaConfig::new(id);
        // Fixed, distinct election timeouts (raft-rs's jitter is unseeded).
        c.election_tick = 10 + 3 * id as usize;
        c.election_tick_max = c.election_tick + 1;
        c.heartbeat_tick = 2;
        c.snapshot_entries = self.p.snapshot_entries;
        c.snapshot_retry_ticks = 40;
        c
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        let g = self.generation.get(&id).copied().unwrap_or(0);
        self.root.join(format!("n{id}-g{g}"))
    }

    /// Start a node: a new one from scratch, a crashed one from its durable image, in a
    /// fresh directory (the crashed store's sled may still be writing its old one).
    fn open(&mut self, id: NodeId) {
        let r = match self.durable.get(&id).cloned() {
            None => Replica::open(&self.dir(id), self.cfg(id), &self.voters, BTreeMap::new())
                .unwrap_or_else(|e| panic!("seed {}: node {id} failed to open: {e}", self.seed)),
            Some(image) => {
                let old = self.dir(id);
                *self.generation.entry(id).or_default() += 1;
                let _ = std::fs::remove_dir_all(old);
                let store = SledStorage::create_from_image(&self.dir(id), &image)
                    .unwrap_or_else(|e| panic!("seed {}: node {id}: restore: {e}", self.seed));
                Replica::from_storage(store, self.cfg(id), BTreeMap::new())
                    .unwrap_or_else(|e| panic!("seed {}: node {id} failed to open: {e}", self.seed))
            }
        };
        self.install(id, r);
    }

    fn install(&mut self, id: NodeId, mut r: Replica) {
        r.raw.mut_store().record_synced_images();
        // All it holds now is on disk: read back from it, or written and synced by `open`.
        let image = r.raw.store().image().expect("image of a store just opened");
        self.durable.insert(id, image);
        self.nodes.insert(id, r);
        self.persist.insert(id, (PersistQueue::default(), None));
        self.down.remove(&id);
        self.checked_to.insert(id, 0);
    }

    /// A sync of `id` made `image` durable (images of one store are ordered by writes).
    fn made_durable(&mut self, id: NodeId, image: StoreImage) {
        let d = self
            .durable
            .get_mut(&id)
            .expect("a live node has a durable image");
        if image.writes >= d.writes {
            *d = image;
        }
    }

    /// Nodes acknowledge only what their disk holds: `msgs` were just sent by `id`.
    fn check_acks(&self, id: NodeId, msgs: &[Message]) -> Result<(), String> {
        let n = &self.nodes[&id];
        let d = &self.durable[&id];
        let hs = &d.hard_state;
        for m in msgs {
            match m.get_msg_type() {
                MessageType::MsgAppendResponse if !m.reject => {
                    // Up to its commit index the entries are committed already (raft-rs
                    // answers a stale append with its commit index); above it, the append
                    // response vouches for the durable log. An answer from an earlier term
                    // than the disk's goes out with the sync that made the later term
                    // durable, which may have truncated what it answers for (a leader of that
                    // later term did): like a message delayed on the wire, raft tolerates
                    // it, since that leader's voters had the entry if it was committed.
                    let i = m.index;
                    if i <= n.commit_index()
                        || i <= d.snapshot.get_metadata().index
                        || m.term < hs.term
                    {
                        continue;
                    }
                    let durable_term = d
                        .entries
                        .first()
                        .and_then(|e| i.checked_sub(e.index))
                        .and_then(|k| d.entries.get(k as usize))
                        .map(|e| e.term);
                    let term = n.raw.raft.raft_log.term(i).unwrap_or(0);
                    if durable_term != Some(term) {
                        return Err(format!(
                            "node {id} acknowledged entry {i} (term {term}) to {} before it \
                             was durable (its disk has {durable_term:?} at {i})",
                            m.to
                        ));
                    }
                }
                MessageType::MsgRequestVoteResponse
                    if !m.reject
                        && (hs.term < m.term || (hs.term == m.term && hs.vote != m.to)) =>
                {
                    return Err(format!(
                        "node {id} granted its vote in term {} to {} before it was durable \
                         (its disk has term {}, vote {})",
                        m.term, m.to, hs.term, hs.vote
                    ));
                }
                MessageType::MsgRequestVote
                    if hs.term < m.term || (hs.term == m.term && hs.vote != id) =>
                {
                    return Err(format!(
                        "node {id} asked {} for a vote in term {} before its own vote was \
                         durable (its disk has term {}, vote {})",
                        m.to, m.term, hs.term, hs.vote
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn trace(&mut self, what: std::fmt::Arguments) {
        let s = what.to_string();
        fnv(&mut self.trace_hash, s.as_bytes());
        if self.verbose {
            eprintln!("t={:>4} {s}", self.now);
        }
    }

    fn live(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The node stops; what its last completed sync made durable is all it keeps. A sync in
    /// flight may have reached the disk before the crash without the node hearing of it
    /// (half the time it did).
    fn crash(&mut self, id: NodeId) {
        self.nodes.remove(&id);
        if let Some((_, Some(sync))) = self.persist.remove(&id) {
            if self.rng.chance(0.5) {
                self.made_durable(id, sync.image);
            }
        }
        self.down.insert(id);
        self.stats.crashes += 1;
        self.writes.retain(|_, w| w.node != id);
        self.reads.retain(|_, r| r.node != id);
        self.trace(format_args!("crash {id}"));
    }

    fn faults(&mut self) {
        let live = self.live();
        if live.len() > 1 && self.rng.chance(self.p.crash) {
            if let Some(id) = self.rng.pick(&live) {
                self.crash(id);
            }
        }
        for id in self.down.clone() {
            if self.rng.chance(self.p.restart) {
                self.open(id);
                self.trace(format_args!("restart {id}"));
            }
        }
        if self.rng.chance(self.p.partition) {
            self.stats.partitions += 1;
            self.cut.clear();
            let ids = self.voters.clone();
            match self.rng.below(3) {
                0 => {
                    let x = self.rng.pick(&ids).unwrap_or(1);
                    for &y in &ids {
                        if y != x {
                            self.cut.insert((x, y));
                            self.cut.insert((y, x));
                        }
                    }
                    self.trace(format_args!("isolate {x}"));
                }
                1 => {
                    let side: BTreeSet<NodeId> = ids
                        .iter()
                        .copied()
                        .filter(|_| self.rng.chance(0.5))
                        .collect();
                    for &a in &ids {
                        for &b in &ids {
                            if side.contains(&a) != side.contains(&b) {
                                self.cut.insert((a, b));
                            }
                        }
                    }
                    self.trace(format_args!("split {side:?}"));
                }
                _ => {
                    for _ in 0..1 + self.rng.below(3) {
                        let a = self.rng.pick(&ids).unwrap_or(1);
                        let b = self.rng.pick(&ids).unwrap_or(1);
                        if a != b {
                            self.cut.insert((a, b));
                        }
                    }
                    let cut = self.cut.clone();
                    self.trace(format_args!("one-way cuts {cut:?}"));
                }
            }
        } else if !self.cut.is_empty() && self.rng.chance(self.p.heal) {
            self.cut.clear();
            self.trace(format_args!("heal"));
        }
    }

    fn clients(&mut self) {
        let live = self.live();
        if live.is_empty() {
            return;
        }
        // Clients mostly find the node that believes it leads, sometimes another.
        let leaders: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|id| self.nodes[id].is_leader())
            .collect();
        let target = |rng: &mut Rng| {
            if !leaders.is_empty() && rng.chance(0.9) {
                rng.pick(&leaders)
            } else {
                rng.pick(&live)
            }
        };
        if self.rng.chance(self.p.write) {
            if let Some(id) = target(&mut self.rng) {
                self.next_op += 1;
                let key = format!("k{}", self.rng.below(3));
                let rid = format!("w{}", self.next_op);
                let env = Envelope {
                    trace: None,
                    request_id: rid.clone(),
                    command: Command::SetAnnotation {
                        key: key.clone(),
                        value: rid.clone(),
                    },
                };
                let n = self.nodes.get_mut(&id).expect("live node");
                if n.is_leader() && n.propose(&env).is_ok() {
                    self.writes
                        .insert(rid.clone(), PendingWrite { node: id, key });
                    self.trace(format_args!("propose {rid} on {id}"));
                }
            }
        }
        if self.rng.chance(self.p.read) {
            if let Some(id) = target(&mut self.rng) {
                self.next_op += 1;
                let key = format!("k{}", self.rng.below(3));
                let n = self.nodes.get_mut(&id).expect("live node");
                // Like the server: a leader asks for a ReadIndex once it has committed in
                // its term (the server holds the read until then; here the client retries).
                if n.is_leader() && n.raw.raft.commit_to_current_term() {
                    let ctx = self.next_op;
                    n.raw.read_index(ctx.to_be_bytes().to_vec());
                    self.reads.insert(
                        ctx,
                        PendingRead {
                            node: id,
                            key,
                            floor: self.observed,
                            index: None,
                        },
                    );
                    self.trace(format_args!("read r{ctx} on {id}"));
                }
            }
        }
    }

    /// Run every node's Ready, route the messages into the network, deliver what is due.
    /// Returns whether anything happened.
    /// Run one node's Readies (and, in the asynchronous mode, finish its sync when due):
    /// the messages to send and the Ready outputs, or `None` when it had nothing to do.
    fn drive(&mut self, id: NodeId) -> Result<Option<Driven>, String> {
        let fail = |e: NodeError| format!("node {id}: ready failed: {e}");
        let image_err = |e| format!("node {id}: image of its store: {e}");
        let n = self.nodes.get_mut(&id).expect("live node");
        if self.p.sync_delay_max == 0 {
            if !n.raw.has_ready() {
                return Ok(None);
            }
            let mut out = n.on_ready().map_err(fail)?;
            // `on_ready` syncs in place: the store recorded what its syncs made durable.
            if let Some(image) = n.raw.mut_store().take_synced_image() {
                self.made_durable(id, image);
            }
            return Ok(Some((std::mem::take(&mut out.messages), vec![out])));
        }
        let (queue, sync) = self.persist.get_mut(&id).expect("live node's queue");
        let mut msgs = Vec::new();
        let mut outs = Vec::new();
        let mut start = None;
        let mut done = None;
        if sync.as_ref().is_some_and(|s| s.due <= self.now) {
            let s = sync.take().expect("a sync in flight");
            // It made the store as it began durable; only then is raft-rs told.
            done = Some(s.image);
            let step = queue.on_synced(n, s.number);
            msgs.extend(step.send);
            start = step
                .start_sync
                .map(|number| (number, n.raw.store().image()));
        }
        let synced = done.is_some();
        while n.raw.has_ready() {
            let Some(mut ar) = n.ready_async().map_err(fail)? else {
                break;
            };
            msgs.append(&mut ar.early);
            let step = queue.after_ready(n, &mut ar);
            msgs.extend(step.send);
            if start.is_none() {
                // The sync begins now: it covers what the store holds at this moment.
                start = step
                    .start_sync
                    .map(|number| (number, n.raw.store().image()));
            }
            outs.push(ar.out);
        }
        // The raft thread never syncs by itself in this mode (compactions included).
        let direct = n.raw.mut_store().take_synced_image();
        if let Some((number, image)) = start {
            let image = image.map_err(image_err)?;
            *sync = Some(InFlightSync {
                number,
                due: self.now + 1 + self.rng.below(self.p.sync_delay_max),
                image,
            });
        }
        if direct.is_some() {
            return Err(format!(
                "node {id}: a Ready of the asynchronous path synced on the raft thread"
            ));
        }
        if let Some(image) = done {
            self.made_durable(id, image);
        }
        if outs.is_empty() && !synced {
            return Ok(None);
        }
        Ok(Some((msgs, outs)))
    }

    /// Run every node's Ready, route the messages into the network, deliver what is due.
    /// Returns whether anything happened.
    fn round(&mut self) -> Result<bool, String> {
        let mut busy = false;
        for id in self.live() {
            let Some((messages, outs)) = self.drive(id)? else {
                continue;
            };
            busy = true;
            self.check_acks(id, &messages)?;
            for m in messages {
                if self.rng.chance(self.p.loss) {
                    continue;
                }
                let copies = if self.rng.chance(self.p.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = self.rng.below(self.p.delay_max + 1);
                    self.net.push(InFlight {
                        deliver_at: self.now + delay,
                        msg: m.clone(),
                    });
                }
            }
            for out in outs {
                if out.snapshot_installed {
                    self.stats.snapshots_installed += 1;
                    self.trace(format_args!("{id} installed a snapshot"));
                }
                for a in out.applied {
                    if self.writes.get(&a.request_id).is_some_and(|w| w.node == id) {
                        let w = self.writes.remove(&a.request_id).expect("pending write");
                        self.stats.writes_acked += 1;
                        self.observed = self.observed.max(a.applied.index);
                        self.acked.insert(
                            a.request_id.clone(),
                            (a.applied.index, w.key, a.request_id.clone()),
                        );
                        self.trace(format_args!("ack {} at {}", a.request_id, a.applied.index));
                    }
                }
                for rs in out.read_states {
                    let ctx = u64::from_be_bytes(
                        rs.request_ctx
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .unwrap_or([0; 8]),
                    );
                    if let Some(r) = self.reads.get_mut(&ctx).filter(|r| r.node == id) {
                        r.index = Some(rs.index);
                    }
                }
            }
        }
        // Deliver what is due, in a random order (reordering).
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].deliver_at <= self.now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            busy = true;
            let k = self.rng.below(due.len() as u64) as usize;
            let m = due.swap_remove(k).msg;
            if self.cut.contains(&(m.from, m.to)) {
                continue;
            }
            if let Some(n) = self.nodes.get_mut(&m.to) {
                n.step(m)
                    .map_err(|e| format!("node {}: step failed: {e}", n.id()))?;
            }
        }
        self.serve_reads()?;
        Ok(busy)
    }

    fn serve_reads(&mut self) -> Result<(), String> {
        let mut done = Vec::new();
        for (ctx, r) in &self.reads {
            let Some(n) = self.nodes.get(&r.node) else {
                continue;
            };
            if !n.is_leader() {
                // The server fails pending reads when its node steps down.
                done.push((*ctx, None));
                continue;
            }
            if r.index.is_some_and(|i| n.applied_index() >= i) {
                done.push((*ctx, Some(n.applied_index())));
            }
        }
        for (ctx, served) in done {
            let r = self.reads.remove(&ctx).expect("pending read");
            let Some(at) = served else { continue };
            if at < r.floor {
                return Err(format!(
                    "stale read r{ctx} on node {}: served at index {at}, but an operation had \
                     already completed at index {}",
                    r.node, r.floor
                ));
            }
            let value = self.nodes[&r.node].state.annotations.get(&r.key).cloned();
            self.check_state(r.node)?;
            self.observed = self.observed.max(at);
            self.stats.reads_served += 1;
            self.trace(format_args!("read r{ctx} {}={value:?} at {at}", r.key));
        }
        Ok(())
    }

    fn check_state(&mut self, id: NodeId) -> Result<(), String> {
        let n = &self.nodes[&id];
        let at = n.applied_index();
        match self.states.get(&at) {
            Some(s) if *s != n.state => Err(format!(
                "node {id} applied state at index {at} differs from another replica's:\n  \
                 theirs: {s:?}\n  ours:   {:?}",
                n.state
            )),
            Some(_) => Ok(()),
            None => {
                self.states.insert(at, n.state.clone());
                Ok(())
            }
        }
    }

    fn check(&mut self) -> Result<(), String> {
        for id in self.live() {
            let (is_leader, term, commit, first, snap_index) = {
                let n = &self.nodes[&id];
                (
                    n.is_leader(),
                    n.term(),
                    n.commit_index(),
                    n.raw.raft.raft_log.first_index(),
                    n.raw.store().current_snapshot().get_metadata().index,
                )
            };
            if is_leader {
                match self.leader_of_term.get(&term) {
                    Some(&other) if other != id => {
                        return Err(format!("two leaders in term {term}: {other} and {id}"));
                    }
                    Some(_) => {}
                    None => {
                        self.leader_of_term.insert(term, id);
                        self.stats.elections += 1;
                        self.trace(format_args!("{id} leads term {term}"));
                    }
                }
                if self.led_term.get(&id) != Some(&term) {
                    self.led_term.insert(id, term);
                    // Leader completeness: the new leader holds every committed entry.
                    let n = &self.nodes[&id];
                    for (&i, &(t, _)) in self.committed.range(snap_index + 1..) {
                        let have = n.raw.raft.raft_log.term(i).unwrap_or(0);
                        if have != t {
                            return Err(format!(
                                "node {id} leads term {term} without committed entry {i} \
                                 (term {t}; it has term {have})"
                            ));
                        }
                    }
                }
            }
            // Committed entries never change.
            let from = self.checked_to[&id].max(first.saturating_sub(1)) + 1;
            if from <= commit {
                let n = &self.nodes[&id];
                let ents = n
                    .raw
                    .raft
                    .raft_log
                    .slice(from, commit + 1, None, GetEntriesContext::empty(false))
                    .map_err(|e| format!("node {id}: committed entries {from}..={commit}: {e}"))?;
                for e in ents {
                    let h = entry_hash(&e);
                    match self.committed.get(&e.index) {
                        Some(&(t, x)) if (t, x) != (e.term, h) => {
                            return Err(format!(
                                "committed entry {} changed on node {id}: term {t} -> {}",
                                e.index, e.term
                            ));
                        }
                        Some(_) => {}
                        None => {
                            self.committed.insert(e.index, (e.term, h));
                        }
                    }
                }
                self.checked_to.insert(id, commit);
            }
            self.check_state(id)?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        for _ in 0..64 {
            if !self.round()? {
                break;
            }
            self.check()?;
        }
        self.now += 1;
        for n in self.nodes.values_mut() {
            n.tick();
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        for _ in 0..FAULT_TICKS {
            self.faults();
            self.clients();
            self.step()?;
        }
        // Faults stop: heal, restart everyone, and expect progress and convergence.
        self.cut.clear();
        for id in self.down.clone() {
            self.open(id);
        }
        self.trace(format_args!("heal all, restart all"));
        let final_rid = "final-write".to_string();
        let mut final_proposed = false;
        for _ in 0..HEAL_TICKS {
            self.step()?;
            if !final_proposed {
                if let Some(l) = self
                    .live()
                    .into_iter()
                    .find(|id| self.nodes[id].is_leader())
                {
                    let env = Envelope {
                        trace: None,
                        request_id: final_rid.clone(),
                        command: Command::SetAnnotation {
                            key: "final".into(),
                            value: "done".into(),
                        },
                    };
                    if self
                        .nodes
                        .get_mut(&l)
                        .expect("leader")
                        .propose(&env)
                        .is_ok()
                    {
                        final_proposed = true;
                    }
                }
            }
            let nodes: Vec<&Replica> = self.nodes.values().collect();
            let converged = nodes.iter().all(|n| {
                n.state.annotations.get("final").map(String::as_str) == Some("done")
                    && n.applied_index() == nodes[0].applied_index()
            });
            if converged {
                break;
            }
            // The client retries (same request id, so it applies once) when its proposal
            // was lost with the leader that took it.
            if final_proposed && self.now % 50 == 0 {
                final_proposed = false;
            }
        }
        let nodes: Vec<&Replica> = self.nodes.values().collect();
        let first = nodes[0];
        for n in &nodes {
            if n.state.annotations.get("final").map(String::as_str) != Some("done") {
                return Err(format!(
                    "no progress {HEAL_TICKS} ticks after the faults stopped: node {} has not \
                     applied the final write (role {}, term {}, commit {}, applied {})",
                    n.id(),
                    n.role(),
                    n.term(),
                    n.commit_index(),
                    n.applied_index()
                ));
            }
            if n.state != first.state {
                return Err(format!(
                    "replicas did not converge: node {} and node {} differ",
                    first.id(),
                    n.id()
                ));
            }
        }
        // Every acknowledged write is still there, at the index it was acknowledged at.
        for (rid, (index, _, _)) in &self.acked {
            match first.state.lookup_request(rid) {
                Some((i, _)) if i == *index => {}
                other => {
                    return Err(format!(
                        "acknowledged write {rid} (index {index}) lost: final state has {:?}",
                        other.map(|(i, _)| i)
                    ));
                }
            }
        }
        let ah = first.applied_index();
        self.trace(format_args!("end applied {ah}"));
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Run one seed; `Err` carries the violation (a panic inside raft-rs counts too).
fn run_seed(seed: u64, verbose: bool) -> Result<(u64, Stats), String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, verbose);
        let r = sim.run();
        (r, sim.trace_hash, sim.stats)
    }));
    match r {
        Ok((Ok(()), h, st)) => Ok((h, st)),
        Ok((Err(e), _, _)) => Err(e),
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        // `cargo test -- --list`: this harness has no named tests to list.
        return;
    }
    let get = |name: &str| -> Option<u64> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    if let Some(seed) = get("--seed") {
        match run_seed(seed, true) {
            Ok((h, st)) => println!("seed {seed}: ok (trace {h:016x}, {st:?})"),
            Err(e) => {
                println!("seed {seed}: VIOLATION: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let seeds = get("--seeds")
        .or_else(|| {
            std::env::var("PHALANX_SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(DEFAULT_SEEDS);
    let start = get("--start").unwrap_or(0);
    let threads = get("--threads").unwrap_or(2).max(1);
    let t0 = Instant::now();

    // Determinism: one seed twice gives the same trace.
    let a = run_seed(start, false).map(|x| x.0);
    let b = run_seed(start, false).map(|x| x.0);
    if a != b {
        println!(
            "seed {start}: two runs differ ({a:?} vs {b:?}): the simulation is not deterministic"
        );
        std::process::exit(1);
    }

    let next = std::sync::atomic::AtomicU64::new(start);
    let failures = std::sync::Mutex::new(Vec::<(u64, String)>::new());
    let totals = std::sync::Mutex::new(Stats::default());
    // raft-rs and assertion panics are caught per seed; keep their default report quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (next, failures, totals) = (&next, &failures, &totals);
            std::thread::Builder::new()
                .name(format!("sim{t}"))
                .spawn_scoped(s, move || loop {
                    let seed = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if seed >= start + seeds {
                        return;
                    }
                    match run_seed(seed, false) {
                        Ok((_, st)) => {
                            let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                            t.writes_acked += st.writes_acked;
                            t.reads_served += st.reads_served;
                            t.crashes += st.crashes;
                            t.partitions += st.partitions;
                            t.elections += st.elections;
                            t.snapshots_installed += st.snapshots_installed;
                        }
                        Err(e) => {
                            println!("seed {seed}: VIOLATION: {e}");
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((seed, e));
                        }
                    }
                })
                .expect("spawn a simulation thread");
        }
    });
    std::panic::set_hook(hook);
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    let totals = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    println!(
        "sim_raft: {seeds} seeds from {start} in {:.1} s, {} failed; {totals:?}",
        t0.elapsed().as_secs_f64(),
        failures.len()
    );
    if !failures.is_empty() {
        for (seed, _) in &failures {
            println!(
                "replay: cargo test --release -p phalanx-controller --test sim_raft -- --seed {seed}"
            );
        }
        std::process::exit(1);
    }
}
