//! Fault hooks for chaos tests: injected disk-full errors and shard corruption.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{CheckpointError, Result};
use crate::format::{shard_file_name, step_dir, HEADER_LEN, MANIFEST_FILE};
use crate::load::read_manifest;

#[derive(Debug, Default)]
struct FaultState {
    disk_full_until: Option<Instant>,
    fail_attempts_remaining: u32,
    injected_count: u64,
}

/// A shared handle that makes checkpoint writes fail with a disk-full error. Clone it
/// into the writer's config and keep one in the test / worker fault hook.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector {
    state: Arc<Mutex<FaultState>>,
}

impl FaultInjector {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every write fails with `StorageFull` until `duration` from now has passed.
    pub fn disk_full_for(&self, duration: Duration) {
        self.lock().disk_full_until = Some(Instant::now() + duration);
    }

    /// The next `attempts` write attempts fail with `StorageFull`.
    pub fn fail_next_attempts(&self, attempts: u32) {
        self.lock().fail_attempts_remaining = attempts;
    }

    /// Lifts every injected fault.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.disk_full_until = None;
        s.fail_attempts_remaining = 0;
    }

    /// True while a fault is armed.
    pub fn is_active(&self) -> bool {
        let s = self.lock();
        s.fail_attempts_remaining > 0 || s.disk_full_until.is_some_and(|t| Instant::now() < t)
    }

    /// How many errors have been injected so far.
    pub fn injected_count(&self) -> u64 {
        self.lock().injected_count
    }

    /// Called at the start of each write attempt: consumes one counted failure, or fails
    /// while the deadline holds.
    pub(crate) fn check_attempt(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if s.fail_attempts_remaining > 0 {
            s.fail_attempts_remaining -= 1;
            s.injected_count += 1;
            return Err(disk_full(path));
        }
        drop(s);
        self.check_deadline(path)
    }

    /// Called between writes inside one attempt: fails only while the deadline holds.
    pub(crate) fn check_deadline(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        match s.disk_full_until {
            Some(t) if Instant::now() < t => {
                s.injected_count += 1;
                Err(disk_full(path))
            }
            Some(_) => {
                s.disk_full_until = None;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn disk_full(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        format!(
            "injected fault: no space left on device writing {}",
            path.display()
        ),
    )
}

/// Flips one byte in the middle of the payload of a committed shard (the header stays
/// valid, so only the SHA-256 check can catch it) and fsyncs the file. Returns its path.
pub fn corrupt_shard(root: &Path, step: u64, rank: usize) -> Result<PathBuf> {
    let dir = step_dir(root, step);
    let file = if dir.join(MANIFEST_FILE).is_file() {
        let manifest = read_manifest(root, step)?;
        manifest
            .shards
            .get(rank)
            .map(|s| s.file.clone())
            .ok_or_else(|| {
                CheckpointError::InvalidInput(format!(
                    "checkpoint step {step} has {} shards, no rank {rank}",
                    manifest.shards.len()
                ))
            })?
    } else {
        find_shard_file(&dir, rank)?
    };
    let path = dir.join(file);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(CheckpointError::io("open", &path))?;
    let len = f
        .metadata()
        .map_err(CheckpointError::io("stat", &path))?
        .len();
    let at = if len > HEADER_LEN as u64 {
        HEADER_LEN as u64 + (len - HEADER_LEN as u64) / 2
    } else {
        len / 2
    };
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(at))
        .map_err(CheckpointError::io("seek", &path))?;
    f.read_exact(&mut byte)
        .map_err(CheckpointError::io("read", &path))?;
    byte[0] ^= 0xFF;
    f.seek(SeekFrom::Start(at))
        .map_err(CheckpointError::io("seek", &path))?;
    f.write_all(&byte)
        .map_err(CheckpointError::io("write", &path))?;
    f.sync_all().map_err(CheckpointError::io("fsync", &path))?;
    tracing::warn!(path = %path.display(), offset = at, "corrupted checkpoint shard (fault injection)");
    Ok(path)
}

fn find_shard_file(dir: &Path, rank: usize) -> Result<String> {
    let prefix = format!("shard-{rank}-of-");
    let entries = std::fs::read_dir(dir).map_err(CheckpointError::io("read_dir", dir))?;
    for entry in entries {
        let entry = entry.map_err(CheckpointError::io("read_dir", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".bin") {
            return Ok(name);
        }
    }
    Err(CheckpointError::InvalidInput(format!(
        "{}: no shard file for rank {rank} (expected e.g. {})",
        dir.display(),
        shard_file_name(rank, rank + 1)
    )))
}
