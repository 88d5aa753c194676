//! Writing: one shard per rank, then the manifest. Every file goes temp -> fsync -> rename
//! -> fsync(dir).

use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{CheckpointError, Result};
use crate::fault::FaultInjector;
use crate::format::{
    shard_file_name, step_dir, Manifest, ManifestSpec, ShardHeader, ShardRecord, FORMAT_VERSION,
    MANIFEST_FILE,
};

/// One rank's state at a step boundary, borrowed from the training loop.
#[derive(Clone, Debug)]
pub struct RankState<'a> {
    pub step: u64,
    pub seed: u64,
    /// The full flat parameter vector (identical on all ranks). Only `params[range]` is
    /// written by this rank.
    pub params: &'a [f32],
    /// The ZeRO-1 slice this rank owns.
    pub range: Range<usize>,
    /// AdamW first moment for `range` (len = `range.len()`).
    pub m: &'a [f32],
    /// AdamW second moment for `range` (len = `range.len()`).
    pub v: &'a [f32],
    /// Completed optimizer steps.
    pub opt_step: u64,
    /// Opaque per-rank bytes (sampler cursor, RNG state as JSON...).
    pub extra: &'a [u8],
}

/// The sections of one shard, already sliced: what actually goes into the file.
#[derive(Clone, Debug)]
pub(crate) struct ShardParts<'a> {
    pub step: u64,
    pub seed: u64,
    pub world: usize,
    pub rank: usize,
    pub param_count: usize,
    pub range: Range<usize>,
    pub opt_step: u64,
    pub params: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
    pub extra: &'a [u8],
}

pub(crate) fn validate_rank_state(state: &RankState<'_>, world: usize, rank: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(CheckpointError::InvalidInput(format!(
            "rank {rank} of world {world}"
        )));
    }
    let r = &state.range;
    if r.start > r.end || r.end > state.params.len() {
        return Err(CheckpointError::InvalidInput(format!(
            "step {}: rank {rank} range {}..{} not within params of length {}",
            state.step,
            r.start,
            r.end,
            state.params.len()
        )));
    }
    if state.m.len() != r.len() || state.v.len() != r.len() {
        return Err(CheckpointError::InvalidInput(format!(
            "step {}: rank {rank} moments m {} v {} differ from range length {}",
            state.step,
            state.m.len(),
            state.v.len(),
            r.len()
        )));
    }
    Ok(())
}

impl<'a> ShardParts<'a> {
    pub(crate) fn from_state(state: &RankState<'a>, world: usize, rank: usize) -> Result<Self> {
        validate_rank_state(state, world, rank)?;
        Ok(ShardParts {
            step: state.step,
            seed: state.seed,
            world,
            rank,
            param_count: state.params.len(),
            range: state.range.clone(),
            opt_step: state.opt_step,
            params: &state.params[state.range.clone()],
            m: state.m,
            v: state.v,
            extra: state.extra,
        })
    }

    fn header(&self) -> ShardHeader {
        let n = self.range.len() as u64;
        ShardHeader {
            step: self.step,
            seed: self.seed,
            world: self.world as u32,
            rank: self.rank as u32,
            param_count: self.param_count as u64,
            range_start: self.range.start as u64,
            range_end: self.range.end as u64,
            opt_step: self.opt_step,
            params_len: n,
            m_len: n,
            v_len: n,
            extra_len: self.extra.len() as u64,
        }
    }
}

/// When the phases of one shard's write happened (wall clock), for the checkpoint's trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteTimes {
    /// The temp file created and its bytes written.
    pub write: (SystemTime, SystemTime),
    /// Durable: fsync of the file, its rename into place and the fsync of the step
    /// directory.
    pub fsync: (SystemTime, SystemTime),
}

/// Writes this rank's shard of checkpoint `state.step` under `root` and makes it durable
/// (temp file, fsync, rename, fsync of the step directory). Returns the record the
/// manifest committer needs. `fault` lets chaos tests make the write fail.
pub fn write_shard(
    root: &Path,
    world: usize,
    rank: usize,
    state: &RankState<'_>,
    fault: Option<&FaultInjector>,
) -> Result<ShardRecord> {
    let parts = ShardParts::from_state(state, world, rank)?;
    write_shard_parts(root, &parts, fault).map(|(rec, _)| rec)
}

const CHUNK_FLOATS: usize = 1 << 18; // 1 MiB of bytes per write

pub(crate) fn write_shard_parts(
    root: &Path,
    parts: &ShardParts<'_>,
    fault: Option<&FaultInjector>,
) -> Result<(ShardRecord, WriteTimes)> {
    // Debug: a worker's checkpoint trace has this write's phases as spans of their own
    // (`WriteTimes`), so no separate trace of it is exported.
    let span = tracing::debug_span!(
        "ckpt_write_shard",
        step = parts.step,
        rank = parts.rank,
        world = parts.world
    );
    let _enter = span.enter();
    let started = Instant::now();
    if parts.world > u32::MAX as usize || parts.rank >= parts.world {
        return Err(CheckpointError::InvalidInput(format!(
            "rank {} of world {}",
            parts.rank, parts.world
        )));
    }
    let dir = step_dir(root, parts.step);
    create_dir_durable(root, &dir)?;
    uncommit_if_committed(&dir, parts.step)?;
    let name = shard_file_name(parts.rank, parts.world);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    if let Some(f) = fault {
        f.check_attempt(&path)
            .map_err(CheckpointError::io("write", &path))?;
    }
    let header = parts.header();
    let write_began = SystemTime::now();
    let mut fsync_began = write_began;
    let result = (|| -> Result<(u64, String, String)> {
        let mut file = File::create(&tmp).map_err(CheckpointError::io("create", &tmp))?;
        let mut file_hash = Sha256::new();
        let mut params_hash = Sha256::new();
        let head = header.encode();
        file.write_all(&head)
            .map_err(CheckpointError::io("write", &tmp))?;
        file_hash.update(head);
        let mut scratch = Vec::with_capacity(CHUNK_FLOATS * 4);
        write_f32s(
            &mut file,
            &tmp,
            &mut file_hash,
            Some(&mut params_hash),
            parts.params,
            &mut scratch,
        )?;
        if let Some(f) = fault {
            f.check_deadline(&tmp)
                .map_err(CheckpointError::io("write", &tmp))?;
        }
        write_f32s(&mut file, &tmp, &mut file_hash, None, parts.m, &mut scratch)?;
        write_f32s(&mut file, &tmp, &mut file_hash, None, parts.v, &mut scratch)?;
        file.write_all(parts.extra)
            .map_err(CheckpointError::io("write", &tmp))?;
        file_hash.update(parts.extra);
        fsync_began = SystemTime::now();
        file.sync_all()
            .map_err(CheckpointError::io("fsync", &tmp))?;
        let bytes = file
            .metadata()
            .map_err(CheckpointError::io("stat", &tmp))?
            .len();
        Ok((
            bytes,
            hex::encode(file_hash.finalize()),
            hex::encode(params_hash.finalize()),
        ))
    })();
    let (bytes, sha256, params_section_sha256) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Some(Err(e)) = fault.map(|f| f.check_deadline(&path)) {
        let _ = fs::remove_file(&tmp);
        return Err(CheckpointError::io("rename", &path)(e));
    }
    fs::rename(&tmp, &path).map_err(CheckpointError::io("rename", &path))?;
    sync_dir(&dir)?;
    let times = WriteTimes {
        write: (write_began, fsync_began),
        fsync: (fsync_began, SystemTime::now()),
    };
    tracing::debug!(bytes, ms = started.elapsed().as_millis() as u64, file = %path.display(), "shard durable");
    let rec = ShardRecord {
        file: name,
        rank: parts.rank,
        world: parts.world,
        step: parts.step,
        range: parts.range.clone(),
        bytes,
        sha256,
        params_section_sha256,
    };
    Ok((rec, times))
}

fn write_f32s(
    file: &mut File,
    path: &Path,
    file_hash: &mut Sha256,
    mut section_hash: Option<&mut Sha256>,
    data: &[f32],
    scratch: &mut Vec<u8>,
) -> Result<()> {
    for chunk in data.chunks(CHUNK_FLOATS) {
        scratch.clear();
        for x in chunk {
            scratch.extend_from_slice(&x.to_le_bytes());
        }
        file_hash.update(&scratch[..]);
        if let Some(h) = section_hash.as_deref_mut() {
            h.update(&scratch[..]);
        }
        file.write_all(scratch)
            .map_err(CheckpointError::io("write", path))?;
    }
    Ok(())
}

/// Commits checkpoint `spec.step`: checks every shard file named by `shards` exists with
/// the recorded length, then writes `manifest.json` durably. Call it once, after every
/// rank's shard is durable. After this returns the checkpoint is listed and loadable.
pub fn commit_manifest(
    root: &Path,
    spec: &ManifestSpec,
    mut shards: Vec<ShardRecord>,
) -> Result<Manifest> {
    let span = tracing::info_span!("ckpt_commit_manifest", step = spec.step, world = spec.world);
    let _enter = span.enter();
    let dir = step_dir(root, spec.step);
    let path = dir.join(MANIFEST_FILE);
    shards.sort_by_key(|s| s.rank);
    let params_sha256 = match (&spec.params_sha256, spec.world, shards.first()) {
        (Some(h), _, _) => Some(h.clone()),
        (None, 1, Some(only)) => Some(only.params_section_sha256.clone()),
        _ => None,
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        job: spec.job.clone(),
        model: spec.model.clone(),
        numerics: spec.numerics.clone(),
        step: spec.step,
        world: spec.world,
        param_count: spec.param_count,
        seed: spec.seed,
        layout: spec.layout.clone(),
        params_sha256,
        shards,
    };
    manifest
        .validate()
        .map_err(|reason| CheckpointError::BadManifest {
            path: path.clone(),
            reason,
        })?;
    for s in &manifest.shards {
        let shard_path = dir.join(&s.file);
        let len = fs::metadata(&shard_path)
            .map_err(CheckpointError::io("stat", &shard_path))?
            .len();
        if len != s.bytes {
            return Err(CheckpointError::SizeMismatch {
                path: shard_path,
                expected_bytes: s.bytes,
                actual_bytes: len,
            });
        }
    }
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::BadManifest {
        path: path.clone(),
        reason: format!("serialise: {e}"),
    })?;
    write_file_durable(&dir, MANIFEST_FILE, &json)?;
    tracing::info!(step = spec.step, world = spec.world, "checkpoint committed");
    Ok(manifest)
}

/// Rewriting a shard of a committed checkpoint (e.g. re-running steps after a rollback)
/// first removes its manifest, durably, so the directory is never committed while its
/// shards are being replaced. The checkpoint is committed again by `commit_manifest`.
fn uncommit_if_committed(dir: &Path, step: u64) -> Result<()> {
    let manifest = dir.join(MANIFEST_FILE);
    match fs::remove_file(&manifest) {
        Ok(()) => {
            tracing::warn!(step, dir = %dir.display(), "rewriting a committed checkpoint: manifest removed until recommitted");
            sync_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CheckpointError::io("remove", &manifest)(e)),
    }
}

/// Writes `bytes` to `dir/name` via a temp file, fsync, rename, fsync(dir).
pub(crate) fn write_file_durable(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp).map_err(CheckpointError::io("create", &tmp))?;
        f.write_all(bytes)
            .map_err(CheckpointError::io("write", &tmp))?;
        f.sync_all().map_err(CheckpointError::io("fsync", &tmp))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &path).map_err(CheckpointError::io("rename", &path))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Creates `dir` (a child of `root`) if needed and fsyncs `root` so the entry survives.
pub(crate) fn create_dir_durable(root: &Path, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(CheckpointError::io("create_dir", dir))?;
    sync_dir(root)
}

/// fsync of a directory, so renames and new entries in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(CheckpointError::io("open_dir", dir))?;
    f.sync_all().map_err(CheckpointError::io("fsync_dir", dir))
}
