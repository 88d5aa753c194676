//! Retention: keep the last R committed checkpoints, never the newest valid one.

use std::fs;
use std::path::Path;

use crate::error::{CheckpointError, Result};
use crate::format::MANIFEST_FILE;
use crate::load::{scan, verify};
use crate::store::sync_dir;

/// What [`apply_retention`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Committed checkpoints kept, ascending.
    pub kept_steps: Vec<u64>,
    /// Committed checkpoints deleted, ascending.
    pub deleted_steps: Vec<u64>,
    /// Uncommitted (partial) step directories older than the newest committed one, deleted.
    pub deleted_partial_steps: Vec<u64>,
}

/// Keeps the newest `retain_count` committed checkpoints and deletes the older ones.
///
/// Safety rules: call it only after a newer checkpoint was committed (the writer does so
/// right after the commit). The newest checkpoint that fully verifies is always kept,
/// even if it falls outside the last `retain_count` (because the newer ones are corrupt).
/// Partial directories newer than the newest committed checkpoint may be in flight and are
/// never touched. A deletion removes `manifest.json` first (fsynced), so a crash in the
/// middle leaves an uncommitted directory, never a committed one with missing shards.
pub fn apply_retention(root: &Path, retain_count: usize) -> Result<RetentionReport> {
    if retain_count == 0 {
        return Err(CheckpointError::InvalidInput(
            "retain_count must be at least 1".into(),
        ));
    }
    let span = tracing::info_span!("ckpt_retention", retain_count);
    let _enter = span.enter();
    let entries = scan(root)?;
    let committed: Vec<_> = entries.iter().filter(|e| e.committed).collect();
    let mut report = RetentionReport::default();
    let Some(newest_committed) = committed.last().map(|e| e.step) else {
        return Ok(report);
    };
    let split = committed.len().saturating_sub(retain_count);
    let (older, kept) = committed.split_at(split);
    let mut keep: Vec<u64> = kept.iter().map(|e| e.step).collect();
    // The newest valid checkpoint must survive: look through the kept ones newest first,
    // then (only if none of them verifies) through the older ones.
    let kept_has_valid = kept.iter().rev().any(|e| verify(root, e.step).is_valid());
    let mut spare_older: Option<u64> = None;
    if !kept_has_valid {
        spare_older = older
            .iter()
            .rev()
            .find(|e| verify(root, e.step).is_valid())
            .map(|e| e.step);
    }
    for e in older {
        if Some(e.step) == spare_older {
            keep.push(e.step);
            continue;
        }
        delete_checkpoint_dir(root, &e.dir)?;
        report.deleted_steps.push(e.step);
    }
    for e in entries
        .iter()
        .filter(|e| !e.committed && e.step < newest_committed)
    {
        delete_checkpoint_dir(root, &e.dir)?;
        report.deleted_partial_steps.push(e.step);
    }
    keep.sort_unstable();
    report.kept_steps = keep;
    if !report.deleted_steps.is_empty() || !report.deleted_partial_steps.is_empty() {
        tracing::info!(deleted = ?report.deleted_steps, partial = ?report.deleted_partial_steps, "retention applied");
    }
    Ok(report)
}

fn delete_checkpoint_dir(root: &Path, dir: &Path) -> Result<()> {
    let manifest = dir.join(MANIFEST_FILE);
    match fs::remove_file(&manifest) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CheckpointError::io("remove", &manifest)(e)),
    }
    fs::remove_dir_all(dir).map_err(CheckpointError::io("remove_dir_all", dir))?;
    sync_dir(root)
}
