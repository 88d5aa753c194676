//! A sled-backed `raft::Storage`.
//!
//! Everything lives in one sled tree, under key prefixes, so that one `apply_batch` makes a
//! Ready's entries and hard state visible atomically:
//! - `e` + index (u64 big-endian): a log entry (protobuf);
//! - `m/hs`, `m/cs`: hard state and conf state (protobuf);
//! - `m/snap`: the latest state-machine snapshot, metadata and data (protobuf);
//! - `m/applied`: the index that the snapshot's state machine image covers;
//! - `m/node`, `m/cluster`: the node's id and its cluster's id, written when the node is
//!   created, so that a data dir is never opened as another node or for another cluster.
//!
//! # Durability
//!
//! sled 0.34's `flush()` ends in `sync_file_range(2)` on Linux. That writes the dirty pages
//! of its files but neither the file metadata (size, extents) nor the device's write cache,
//! so a power loss can still lose a flushed write. `sync()` therefore calls `flush()` and
//! then `fsync(2)` (`File::sync_all`) on every file of the sled directory and on the
//! directory itself. That is enough because sled writes all its state (the log file `db`,
//! `conf`, `snap.*` and `blobs/`) through ordinary files in that directory: once `flush()`
//! has returned, every byte of the batch has been handed to the kernel for those files, and
//! `fsync` of each file forces its data and metadata to stable storage, while `fsync` of the
//! directory makes newly created file names durable. Raft acknowledges nothing (no vote, no
//! append response) before `sync()` returns, so a crash loses no acknowledged write.

use std::fs::File;
use std::path::{Path, PathBuf};

use protobuf::Message as PbMessage;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use thiserror::Error;

const KEY_HS: &[u8] = b"m/hs";
const KEY_CS: &[u8] = b"m/cs";
const KEY_SNAP: &[u8] = b"m/snap";
const KEY_APPLIED: &[u8] = b"m/applied";
const KEY_NODE: &[u8] = b"m/node";
const KEY_CLUSTER: &[u8] = b"m/cluster";

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("sled at {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("fsync of {path}: {source}")]
    Fsync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt record {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("entries not contiguous: last index {last}, append starts at {first}")]
    Gap { last: u64, first: u64 },
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Storage of one raft node.
pub struct SledStorage {
    db: sled::Db,
    dir: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    applied: u64,
    first_index: u64,
    last_index: u64,
    /// Count of fsync rounds (telemetry).
    pub syncs: u64,
    /// Writes made through this handle (orders the images of one store).
    writes: u64,
    /// With [`SledStorage::record_synced_images`]: the image the last `sync` made durable.
    synced_image: Option<Option<StoreImage>>,
}

/// Everything a store holds, as raft reads it back after a restart: its log, hard state,
/// conf state, snapshot and identity. A crash model (`tests/sim_raft.rs`) keeps the image
/// that each completed sync made durable and brings a crashed node back with exactly that,
/// since a reopened sled still has the writes that no sync covered (sled flushes on drop).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreImage {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: Snapshot,
    pub applied: u64,
    /// The log after the snapshot, in index order.
    pub entries: Vec<Entry>,
    pub node: Option<u64>,
    pub cluster: Option<String>,
    /// How many writes the store had taken when the image was made: of two images of one
    /// store (opened once), the one with more writes is the newer.
    pub writes: u64,
}

impl SledStorage {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let sled_err = |source| StorageError::Sled {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Fsync {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let db = sled::Config::new().path(dir).open().map_err(sled_err)?;
        Self::load(db, dir)
    }

    /// Read the raft state of an opened database.
    fn load(db: sled::Db, dir: &Path) -> Result<Self, StorageError> {
        let sled_err = |source| StorageError::Sled {
            path: dir.to_path_buf(),
            source,
        };
        let get = |key: &[u8]| db.get(key).map_err(sled_err);
        fn decode<M: PbMessage>(key: &[u8], v: Option<sled::IVec>) -> Result<M, StorageError> {
            match v {
                None => Ok(M::new()),
                Some(b) => M::parse_from_bytes(&b).map_err(|e| StorageError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    message: e.to_string(),
                }),
            }
        }
        let hard_state: HardState = decode(KEY_HS, get(KEY_HS)?)?;
        let conf_state: ConfState = decode(KEY_CS, get(KEY_CS)?)?;
        let snapshot: Snapshot = decode(KEY_SNAP, get(KEY_SNAP)?)?;
        let applied = match get(KEY_APPLIED)? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        };
        let snap_index = snapshot.get_metadata().index;
        let last_index = match db.scan_prefix(b"e").keys().next_back() {
            Some(k) => {
                let k = k.map_err(sled_err)?;
                u64::from_be_bytes(k[1..9].try_into().unwrap_or([0; 8]))
            }
            None => snap_index,
        };
        Ok(SledStorage {
            db,
            dir: dir.to_path_buf(),
            hard_state,
            conf_state,
            snapshot,
            applied,
            first_index: snap_index + 1,
            last_index: last_index.max(snap_index),
            syncs: 0,
            writes: 0,
            synced_image: None,
        })
    }

    /// Create a store in `dir` (which must hold none) holding exactly `image`, durable.
    pub fn create_from_image(dir: &Path, image: &StoreImage) -> Result<Self, StorageError> {
        if Self::has_data(dir) {
            return Err(StorageError::Corrupt {
                key: dir.display().to_string(),
                message: "a store from an image needs an empty directory".into(),
            });
        }
        let mut s = Self::open(dir)?;
        let mut batch = sled::Batch::default();
        for e in &image.entries {
            batch.insert(&entry_key(e.index), Self::encode(e));
        }
        batch.insert(KEY_HS, Self::encode(&image.hard_state));
        batch.insert(KEY_CS, Self::encode(&image.conf_state));
        if image.snapshot != Snapshot::default() {
            batch.insert(KEY_SNAP, Self::encode(&image.snapshot));
        }
        batch.insert(KEY_APPLIED, &image.applied.to_be_bytes());
        if let Some(node) = image.node {
            batch.insert(KEY_NODE, &node.to_be_bytes());
        }
        if let Some(c) = &image.cluster {
            batch.insert(KEY_CLUSTER, c.as_bytes());
        }
        s.db.apply_batch(batch).map_err(|e| s.sled_err(e))?;
        s.sync()?;
        // Read it back the way a restart does (a new `open` of the directory could find
        // sled's lock still held by the handle just dropped).
        Self::load(s.db.clone(), dir)
    }

    /// The store's contents now (see [`StoreImage`]).
    pub fn image(&self) -> Result<StoreImage, StorageError> {
        let (node, cluster) = self.identity()?;
        let mut entries = Vec::new();
        for i in self.first_index..=self.last_index {
            entries.push(self.get_entry(i).map_err(|e| StorageError::Corrupt {
                key: format!("entry {i}"),
                message: e.to_string(),
            })?);
        }
        Ok(StoreImage {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            snapshot: self.snapshot.clone(),
            applied: self.applied,
            entries,
            node,
            cluster,
            writes: self.writes,
        })
    }

    /// From now on every `sync` on this handle keeps the image it made durable, for
    /// [`SledStorage::take_synced_image`] (a crash model; it costs a read of the log per
    /// sync, so the server never turns it on).
    pub fn record_synced_images(&mut self) {
        self.synced_image.get_or_insert(None);
    }

    /// The image of the last `sync` since the previous call, when recording.
    pub fn take_synced_image(&mut self) -> Option<StoreImage> {
        self.synced_image.as_mut().and_then(Option::take)
    }

    /// Writes made through this handle so far (compare with [`StoreImage::writes`]).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Does `dir` hold a sled database already (without opening it)?
    pub fn has_data(dir: &Path) -> bool {
        dir.join("db").exists() || dir.join("conf").exists()
    }

    fn sled_err(&self, source: sled::Error) -> StorageError {
        StorageError::Sled {
            path: self.dir.clone(),
            source,
        }
    }

    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.last_index > 0 || self.hard_state.term > 0
    }

    /// Bootstrap a brand-new node of the initial cluster with its voters.
    pub fn initialize(&mut self, voters: &[u64]) -> Result<(), StorageError> {
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        self.set_conf_state(cs)?;
        self.sync()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
    pub fn current_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
    /// Index covered by the stored state-machine snapshot: where replay starts on restart.
    pub fn applied(&self) -> u64 {
        self.applied
    }
    pub fn last_index_cached(&self) -> u64 {
        self.last_index
    }
    pub fn first_index_cached(&self) -> u64 {
        self.first_index
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn encode(m: &impl PbMessage) -> Vec<u8> {
        m.write_to_bytes().unwrap_or_default()
    }

    /// Append entries, replacing any conflicting suffix, together with the hard state.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        let mut new_last = self.last_index;
        if let Some(first) = entries.first() {
            if first.index > self.last_index + 1 {
                return Err(StorageError::Gap {
                    last: self.last_index,
                    first: first.index,
                });
            }
            for i in first.index..=self.last_index {
                batch.remove(&entry_key(i));
            }
            for e in entries {
                batch.insert(&entry_key(e.index), Self::encode(e));
            }
            new_last = entries.last().map(|e| e.index).unwrap_or(new_last);
        }
        if let Some(hs) = hs {
            batch.insert(KEY_HS, Self::encode(hs));
        }
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.writes += 1;
        if !entries.is_empty() {
            self.last_index = new_last;
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.append(&[], Some(&hs))
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), StorageError> {
        self.db
            .insert(KEY_CS, Self::encode(&cs))
            .map_err(|e| self.sled_err(e))?;
        self.writes += 1;
        self.conf_state = cs;
        Ok(())
    }

    /// Install a snapshot received from the leader: it replaces the whole log.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        let mut batch = sled::Batch::default();
        for k in self.db.scan_prefix(b"e").keys() {
            batch.remove(k.map_err(|e| self.sled_err(e))?);
        }
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        batch.insert(KEY_HS, Self::encode(&hs));
        batch.insert(KEY_CS, Self::encode(meta.get_conf_state()));
        batch.insert(KEY_SNAP, Self::encode(snap));
        batch.insert(KEY_APPLIED, &meta.index.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.writes += 1;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap.clone();
        self.applied = meta.index;
        self.first_index = meta.index + 1;
        self.last_index = meta.index;
        Ok(())
    }

    /// Store a snapshot of the state machine at `index` (already applied) and drop the log
    /// up to it.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), StorageError> {
        if index < self.first_index || index > self.last_index {
            return Ok(());
        }
        let term = raft::Storage::term(self, index).map_err(|e| StorageError::Corrupt {
            key: format!("entry {index}"),
            message: e.to_string(),
        })?;
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let mut batch = sled::Batch::default();
        for i in self.first_index..=index {
            batch.remove(&entry_key(i));
        }
        // The snapshot's index was applied, so it is committed: store that commit index in
        // the same batch. raft-rs refuses to start (panics) when the hard state's commit is
        // below the first index, and a conf change is compacted in the middle of a Ready,
        // before the Ready's commit index is written.
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(index);
        batch.insert(KEY_HS, Self::encode(&hs));
        batch.insert(KEY_SNAP, Self::encode(&snap));
        batch.insert(KEY_APPLIED, &index.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.writes += 1;
        self.hard_state = hs;
        self.snapshot = snap;
        self.applied = index;
        self.first_index = index + 1;
        Ok(())
    }

    /// The node id and cluster id stored when this data dir was created (if any).
    pub fn identity(&self) -> Result<(Option<u64>, Option<String>), StorageError> {
        let node = self
            .db
            .get(KEY_NODE)
            .map_err(|e| self.sled_err(e))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes);
        let cluster = self
            .db
            .get(KEY_CLUSTER)
            .map_err(|e| self.sled_err(e))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        Ok((node, cluster))
    }

    /// Record the node id and (when known) the cluster id; `sync` makes them durable.
    pub fn set_identity(&mut self, node: u64, cluster: Option<&str>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        batch.insert(KEY_NODE, &node.to_be_bytes());
        if let Some(c) = cluster {
            batch.insert(KEY_CLUSTER, c.as_bytes());
        }
        self.db.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.writes += 1;
        Ok(())
    }

    /// Make everything written so far durable (see the module docs for why this suffices).
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.syncer().sync()?;
        self.syncs += 1;
        if self.synced_image.is_some() {
            self.synced_image = Some(Some(self.image()?));
        }
        Ok(())
    }

    /// A handle that makes this store durable from another thread, so that the raft
    /// thread keeps ticking and answering while the disk works.
    pub fn syncer(&self) -> Syncer {
        Syncer {
            db: self.db.clone(),
            dir: self.dir.clone(),
        }
    }

    fn get_entry(&self, index: u64) -> raft::Result<Entry> {
        let v = self
            .db
            .get(entry_key(index))
            .map_err(|e| raft::Error::Store(RaftStorageError::Other(Box::new(e))))?
            .ok_or(raft::Error::Store(RaftStorageError::Unavailable))?;
        Entry::parse_from_bytes(&v).map_err(raft::Error::CodecError)
    }
}

/// Makes a [`SledStorage`] durable from any thread: sled's `flush`, then `fsync` of its
/// files and directory. Everything written to the store before `sync` begins is durable
/// when it returns (writes made while it runs may or may not be).
#[derive(Clone)]
pub struct Syncer {
    db: sled::Db,
    dir: PathBuf,
}

impl Syncer {
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush().map_err(|e| StorageError::Sled {
            path: self.dir.clone(),
            source: e,
        })?;
        fsync_tree(&self.dir)
    }
}

/// fsync every file under `dir` (sled keeps a `blobs/` subdirectory) and `dir` itself.
fn fsync_tree(dir: &Path) -> Result<(), StorageError> {
    let err = |path: &Path, source| StorageError::Fsync {
        path: path.to_path_buf(),
        source,
    };
    let rd = std::fs::read_dir(dir).map_err(|e| err(dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| err(dir, e))?;
        let path = ent.path();
        let ft = ent.file_type().map_err(|e| err(&path, e))?;
        if ft.is_dir() {
            fsync_tree(&path)?;
        } else if ft.is_file() {
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|e| err(&path, e))?,
                // sled may delete an old snapshot file between read_dir and open.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&path, e)),
            }
        }
    }
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| err(dir, e))
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        for kv in self.db.range(entry_key(low)..entry_key(high)) {
            let (_, v) =
                kv.map_err(|e| raft::Error::Store(RaftStorageError::Other(Box::new(e))))?;
            out.push(Entry::parse_from_bytes(&v).map_err(raft::Error::CodecError)?);
        }
        if out.len() as u64 != high - low {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(self.get_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// Raw sled baseline for the benchmark: one writer appending a 64-byte entry and making it
/// durable (insert, flush, fsync) per operation. Returns operations per second.
pub fn bench_raw_sled(dir: &Path, duration: std::time::Duration) -> Result<f64, StorageError> {
    let mut s = SledStorage::open(dir)?;
    s.initialize(&[1])?;
    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < duration {
        n += 1;
        let e = Entry {
            index: n,
            term: 1,
            data: vec![0u8; 64].into(),
            ..Default::default()
        };
        s.append(&[e], None)?;
        s.sync()?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("d{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    /// A membership change is compacted in the middle of a Ready, before the Ready's commit
    /// index is stored. The snapshot must carry its commit index in the same batch, or a
    /// crash right after leaves a hard state whose commit is below the first index and
    /// raft-rs refuses to start ("out of range") on every restart.
    #[test]
    fn compaction_stores_the_commit_index_with_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStorage::open(dir.path()).unwrap();
            s.initialize(&[1]).unwrap();
            let hs = HardState {
                term: 1,
                commit: 2,
                vote: 1,
                ..Default::default()
            };
            s.append(&(1..=6).map(|i| ent(i, 1)).collect::<Vec<_>>(), Some(&hs))
                .unwrap();
            // Applied (and so committed) up to 5; the crash comes before `set_commit`.
            s.compact(5, b"state@5".to_vec()).unwrap();
            s.sync().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert!(
            s.hard_state().commit >= 5,
            "commit {}",
            s.hard_state().commit
        );
        let cfg = raft::Config {
            id: 1,
            applied: s.applied(),
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            raft::RawNode::new(&cfg, s, &logger).map(|_| ())
        }));
        assert!(
            matches!(node, Ok(Ok(()))),
            "raft-rs must start from the compacted storage"
        );
    }

    /// A store rebuilt from an image holds exactly that image: what the crash model of
    /// `sim_raft` restarts a crashed node from. Writes after the image are not in it.
    #[test]
    fn a_store_from_an_image_holds_exactly_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStorage::open(&dir.path().join("a")).unwrap();
        s.initialize(&[1, 2, 3]).unwrap();
        s.set_identity(2, Some("c-1")).unwrap();
        let hs = HardState {
            term: 3,
            commit: 4,
            vote: 2,
            ..Default::default()
        };
        s.append(&(1..=8).map(|i| ent(i, 3)).collect::<Vec<_>>(), Some(&hs))
            .unwrap();
        s.compact(4, b"state@4".to_vec()).unwrap();
        let image = s.image().unwrap();
        // Written after the image: a later entry and a new vote, never synced.
        let later = HardState {
            term: 4,
            vote: 3,
            ..hs.clone()
        };
        s.append(&[ent(9, 4)], Some(&later)).unwrap();
        assert!(s.image().unwrap().writes > image.writes);

        let b = SledStorage::create_from_image(&dir.path().join("b"), &image).unwrap();
        let back = b.image().unwrap();
        assert_eq!(
            StoreImage {
                writes: image.writes,
                ..back
            },
            image
        );
        assert_eq!(b.first_index().unwrap(), 5);
        assert_eq!(b.last_index().unwrap(), 8);
        assert_eq!(b.hard_state().vote, 2);
        assert_eq!(b.applied(), 4);
        assert_eq!(b.identity().unwrap(), (Some(2), Some("c-1".to_string())));
        assert_eq!(&b.snapshot(0, 1).unwrap().data[..], b"state@4");
        // A directory that holds a store already is refused.
        assert!(SledStorage::create_from_image(&dir.path().join("a"), &image).is_err());
    }

    #[test]
    fn append_truncate_compact_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStorage::open(dir.path()).unwrap();
            assert!(!s.is_initialized());
            s.initialize(&[1, 2, 3]).unwrap();
            s.append(&(1..=10).map(|i| ent(i, 1)).collect::<Vec<_>>(), None)
                .unwrap();
            // A conflicting suffix from a new leader replaces 8..=10.
            s.append(&[ent(8, 2), ent(9, 2)], None).unwrap();
            assert_eq!(s.last_index().unwrap(), 9);
            assert_eq!(s.term(8).unwrap(), 2);
            let hs = HardState {
                term: 2,
                commit: 6,
                vote: 1,
                ..Default::default()
            };
            s.append(&[], Some(&hs)).unwrap();
            s.compact(5, b"state@5".to_vec()).unwrap();
            assert_eq!(s.first_index().unwrap(), 6);
            assert!(s
                .entries(3, 6, None, GetEntriesContext::empty(false))
                .is_err());
            assert_eq!(s.term(5).unwrap(), 1);
            s.sync().unwrap();
        }
        let s = SledStorage::open(dir.path()).unwrap();
        assert!(s.is_initialized());
        assert_eq!(s.first_index().unwrap(), 6);
        assert_eq!(s.last_index().unwrap(), 9);
        assert_eq!(s.applied(), 5);
        assert_eq!(s.hard_state().commit, 6);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        let es = s
            .entries(6, 10, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            es.iter().map(|e| e.term).collect::<Vec<_>>(),
            vec![1, 1, 2, 2]
        );
        assert_eq!(&s.snapshot(0, 2).unwrap().data[..], b"state@5");
        // A size limit still returns at least one entry.
        assert_eq!(
            s.entries(6, 10, Some(1), GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
    }
}
