//! Typed errors. Every variant names the file, step or shard it is about.

use std::io;
use std::path::PathBuf;

/// An error from writing, committing, verifying or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An I/O call failed. `op` says which (e.g. `"create"`, `"fsync"`, `"rename"`).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A shard file's fixed header is malformed or disagrees with itself.
    #[error("shard {path}: bad header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    /// A shard file's bytes do not hash to what the manifest recorded.
    #[error("shard {path}: sha256 mismatch: manifest expects {expected}, file has {actual}")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A shard file does not have the length the manifest or its header implies.
    #[error("shard {path}: {actual_bytes} bytes on disk, expected {expected_bytes}")]
    SizeMismatch {
        path: PathBuf,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    /// `manifest.json` is unreadable, not JSON, or inconsistent.
    #[error("manifest {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    /// The step directory has no `manifest.json`: the checkpoint was never committed.
    #[error("checkpoint step {step} under {root}: not committed (no manifest.json)")]
    NotCommitted { root: PathBuf, step: u64 },
    /// The shard headers and the manifest of one checkpoint disagree with each other.
    #[error("checkpoint step {step}: shard {path}: {reason}")]
    Inconsistent {
        step: u64,
        path: PathBuf,
        reason: String,
    },
    /// The reassembled parameters do not hash to the manifest's `params_sha256`.
    #[error(
        "checkpoint step {step}: params sha256 mismatch: manifest {expected}, loaded {actual}"
    )]
    ParamsMismatch {
        step: u64,
        expected: String,
        actual: String,
    },
    /// A caller passed arguments that cannot describe a shard (e.g. `rank >= world`).
    #[error("invalid argument: {0}")]
    InvalidInput(String),
}

impl CheckpointError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| CheckpointError::Io { op, path, source }
    }

    /// True when the underlying cause is a full disk (`ENOSPC` / `StorageFull`).
    pub fn is_disk_full(&self) -> bool {
        match self {
            CheckpointError::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28)
            }
            _ => false,
        }
    }
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
