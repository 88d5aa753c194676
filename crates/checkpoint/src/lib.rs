//! Sharded, checksummed, asynchronous checkpoints with a resharding loader.
//!
//! # Format
//!
//! A checkpoint of step `S` is the directory `<root>/step-<S:010>/` holding:
//!
//! - one shard file per data-parallel rank, `shard-<rank>-of-<world>.bin`: a fixed
//!   128-byte header ([`ShardHeader`]: magic `PHXCKPT\0`, format version, step, seed, world,
//!   rank, param_count, the owned range start/end, optimizer step, section lengths, and a
//!   CRC-32 of the header itself), then four sections back to back: the params slice
//!   `params[range]`, the AdamW moments `m` and `v` for `range` (all little-endian `f32`),
//!   and the rank's opaque `extra` bytes;
//! - `manifest.json` ([`Manifest`]), written **last**: step, world, param_count, seed, the
//!   layout, `params_sha256` (SHA-256 of the full flat params, the trainer's definition)
//!   and per shard its file name, rank, range, byte length and SHA-256 of the whole file.
//!
//! Each rank writes only the params slice it owns under ZeRO-1 (the same range as its
//! optimizer shard, [`shard_range`]), not the full vector: the parameters are identical on
//! every rank, so writing them once in total (1× params + 1× moments) instead of once per
//! rank cuts the bytes written by a factor up to `world` and spreads the I/O evenly; the
//! loader reassembles the full vector from all shards.
//!
//! # Durability
//!
//! Every file is written to a temporary name, `fsync`ed, renamed into place, and then the
//! directory is `fsync`ed (and the root when a step directory is created), so after a
//! crash a file name is either absent or names complete, synced bytes. [`write_shard`]
//! does this for one rank's shard and returns a [`ShardRecord`]; [`commit_manifest`] is
//! called once, by whoever knows every rank's shard is durable (rank 0 of the group, after
//! an all-gather of the ranks' records), and writes the manifest the same way. On disk a
//! checkpoint is *complete* exactly when its manifest exists; since the manifest is renamed
//! into place only after every shard it names was synced, a complete checkpoint never
//! refers to bytes that may not be on disk. Whether it *counts* is not this crate's call:
//! in a cluster the controller's Raft-replicated catalog is the source of truth (the
//! worker records each manifest there, loads only what the catalog lists, and deletes what
//! it no longer lists; see `phalanx_worker::job_checkpoints`). The manifest also names the
//! job and the model that wrote it, so a loader can refuse a stranger's checkpoint. Directories without a manifest (a crash or failure mid-write) are never listed
//! and are cleaned up by retention once a newer checkpoint is committed. Bit rot or
//! tampering after the commit is caught by the per-shard SHA-256 ([`verify`]), and
//! [`latest_valid`] then falls back to the previous checkpoint, naming what it skipped.
//!
//! # Asynchronous writing
//!
//! [`AsyncCheckpointer`] owns a background thread. [`AsyncCheckpointer::snapshot`] copies
//! the rank's owned sections into a pooled staging buffer (one memcpy, no allocation once
//! warm) and returns; [`AsyncCheckpointer::snapshot_shared`] takes `Arc`s instead (no copy
//! at all; see [`SharedRankState`] for the contract). Serialisation, hashing, writing and
//! fsync happen on the writer thread. Neither call ever waits for I/O: when
//! `max_in_flight` snapshots are still pending, the snapshot is refused with
//! [`SnapshotError::Busy`]. A failed write (disk full, I/O error, injected fault) is a
//! [`CheckpointEvent::Failed`] and a [`CheckpointEvent::Retrying`] with bounded
//! exponential backoff, then [`CheckpointEvent::GaveUp`] after `max_attempts`; never a
//! panic. All waits take a timeout.
//!
//! # Loading
//!
//! [`list`], [`verify`], [`latest_valid`], and [`load_resharded`] /  [`load_range`], which
//! assemble the full params and the moments of any new rank's range from whichever old
//! shards overlap it: any old world size to any new world size, bit for bit.

mod error;
mod fault;
mod format;
mod load;
mod retention;
mod store;
mod writer;

pub use error::{CheckpointError, Result};
pub use fault::{corrupt_shard, FaultInjector};
pub use format::{
    crc32, parse_step_dir_name, shard_file_name, shard_range, step_dir, step_dir_name, LayoutEntry,
    Manifest, ManifestSpec, ShardHeader, ShardRecord, FORMAT_VERSION, HEADER_LEN, MAGIC,
    MANIFEST_FILE, MAX_EXTRA_BYTES,
};
pub use load::{
    latest_valid, list, load_range, load_resharded, params_sha256, read_manifest, scan, verify,
    CheckpointEntry, LatestValid, LoadedState, ProblemKind, ShardProblem, VerifyReport,
};
pub use retention::{apply_retention, RetentionReport};
pub use store::{commit_manifest, write_shard, RankState, WriteTimes};
pub use writer::{
    AsyncCheckpointer, CheckpointEvent, CheckpointerConfig, SharedRankState, SnapshotError,
    WaitError,
};
