//! Reading: listing, verification, fallback to the newest valid checkpoint, and the
//! resharding loader.

use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{CheckpointError, Result};
use crate::format::{
    parse_step_dir_name, shard_range, step_dir, LayoutEntry, Manifest, ShardHeader, ShardRecord,
    HEADER_LEN, MANIFEST_FILE,
};

/// A step directory found under the checkpoint root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub step: u64,
    pub dir: PathBuf,
    /// `manifest.json` is present (the checkpoint was committed).
    pub committed: bool,
}

/// Every `step-NNNNNNNNNN` directory under `root`, committed or not, by ascending step.
/// A missing root is an empty list.
pub fn scan(root: &Path) -> Result<Vec<CheckpointEntry>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CheckpointError::io("read_dir", root)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(CheckpointError::io("read_dir", root))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir_name) else {
            continue;
        };
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let committed = dir.join(MANIFEST_FILE).is_file();
        out.push(CheckpointEntry {
            step,
            dir,
            committed,
        });
    }
    out.sort_by_key(|e| e.step);
    Ok(out)
}

/// Committed checkpoints (manifest present) by ascending step. Presence of the manifest
/// is not validity: see [`verify`] and [`latest_valid`].
pub fn list(root: &Path) -> Result<Vec<CheckpointEntry>> {
    Ok(scan(root)?.into_iter().filter(|e| e.committed).collect())
}

/// Reads and validates `manifest.json` of checkpoint `step`.
pub fn read_manifest(root: &Path, step: u64) -> Result<Manifest> {
    let path = step_dir(root, step).join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::NotCommitted {
                root: root.to_path_buf(),
                step,
            })
        }
        Err(e) => return Err(CheckpointError::io("read", &path)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadManifest {
            path: path.clone(),
            reason: format!("not a valid manifest: {e}"),
        })?;
    manifest
        .validate()
        .map_err(|reason| CheckpointError::BadManifest {
            path: path.clone(),
            reason,
        })?;
    if manifest.step != step {
        return Err(CheckpointError::BadManifest {
            path,
            reason: format!(
                "manifest says step {}, directory is step {step}",
                manifest.step
            ),
        });
    }
    Ok(manifest)
}

/// What is wrong with one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    ManifestUnreadable {
        reason: String,
    },
    Missing,
    ChecksumMismatch {
        expected: String,
        actual: String,
    },
    SizeMismatch {
        expected_bytes: u64,
        actual_bytes: u64,
    },
    BadHeader {
        reason: String,
    },
    Unreadable {
        reason: String,
    },
}

/// One corrupt or missing file, named so the caller can report it as an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardProblem {
    pub step: u64,
    pub file: PathBuf,
    pub kind: ProblemKind,
}

impl fmt::Display for ShardProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        let step = self.step;
        match &self.kind {
            ProblemKind::ManifestUnreadable { reason } => {
                write!(f, "step {step}: {file}: manifest unreadable: {reason}")
            }
            ProblemKind::Missing => write!(f, "step {step}: {file}: missing"),
            ProblemKind::ChecksumMismatch { expected, actual } => {
                write!(
                    f,
                    "step {step}: {file}: sha256 mismatch: expected {expected}, actual {actual}"
                )
            }
            ProblemKind::SizeMismatch {
                expected_bytes,
                actual_bytes,
            } => {
                write!(
                    f,
                    "step {step}: {file}: {actual_bytes} bytes, expected {expected_bytes}"
                )
            }
            ProblemKind::BadHeader { reason } => {
                write!(f, "step {step}: {file}: bad header: {reason}")
            }
            ProblemKind::Unreadable { reason } => {
                write!(f, "step {step}: {file}: unreadable: {reason}")
            }
        }
    }
}

/// Result of [`verify`]: valid when `problems` is empty.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub step: u64,
    pub manifest: Option<Manifest>,
    pub problems: Vec<ShardProblem>,
}

impl VerifyReport {
    pub fn is_valid(&self) -> bool {
        self.manifest.is_some() && self.problems.is_empty()
    }
}

/// Checks checkpoint `step`: the manifest parses and is consistent, and every shard
/// exists, has the recorded length and SHA-256, and a header that agrees with its record.
/// Problems are collected, not returned as the first error.
pub fn verify(root: &Path, step: u64) -> VerifyReport {
    let dir = step_dir(root, step);
    let manifest = match read_manifest(root, step) {
        Ok(m) => m,
        Err(e) => {
            return VerifyReport {
                step,
                manifest: None,
                problems: vec![ShardProblem {
                    step,
                    file: dir.join(MANIFEST_FILE),
                    kind: ProblemKind::ManifestUnreadable {
                        reason: e.to_string(),
                    },
                }],
            }
        }
    };
    let mut problems = Vec::new();
    for rec in &manifest.shards {
        let path = dir.join(&rec.file);
        if let Err(kind) = verify_shard_file(&path, rec) {
            problems.push(ShardProblem {
                step,
                file: path,
                kind,
            });
        }
    }
    VerifyReport {
        step,
        manifest: Some(manifest),
        problems,
    }
}

fn verify_shard_file(path: &Path, rec: &ShardRecord) -> std::result::Result<(), ProblemKind> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ProblemKind::Missing),
        Err(e) => {
            return Err(ProblemKind::Unreadable {
                reason: e.to_string(),
            })
        }
    };
    let len = f
        .metadata()
        .map_err(|e| ProblemKind::Unreadable {
            reason: e.to_string(),
        })?
        .len();
    if len != rec.bytes {
        return Err(ProblemKind::SizeMismatch {
            expected_bytes: rec.bytes,
            actual_bytes: len,
        });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut head = Vec::with_capacity(HEADER_LEN);
    loop {
        let n = f.read(&mut buf).map_err(|e| ProblemKind::Unreadable {
            reason: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        if head.len() < HEADER_LEN {
            let take = (HEADER_LEN - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != rec.sha256 {
        return Err(ProblemKind::ChecksumMismatch {
            expected: rec.sha256.clone(),
            actual,
        });
    }
    let header = ShardHeader::decode(&head).map_err(|reason| ProblemKind::BadHeader { reason })?;
    check_header_matches(&header, rec, len).map_err(|reason| ProblemKind::BadHeader { reason })
}

fn check_header_matches(
    h: &ShardHeader,
    rec: &ShardRecord,
    len: u64,
) -> std::result::Result<(), String> {
    if h.step != rec.step
        || h.world as usize != rec.world
        || h.rank as usize != rec.rank
        || h.range() != rec.range
    {
        return Err(format!(
            "header says step {} rank {}/{} range {}..{}, manifest says step {} rank {}/{} range {}..{}",
            h.step, h.rank, h.world, h.range_start, h.range_end, rec.step, rec.rank, rec.world, rec.range.start, rec.range.end
        ));
    }
    if h.file_len() != Some(len) {
        return Err(format!(
            "header implies {:?} bytes, file has {len}",
            h.file_len()
        ));
    }
    Ok(())
}

/// Outcome of [`latest_valid`].
#[derive(Clone, Debug, Default)]
pub struct LatestValid {
    /// The newest checkpoint whose every shard verifies, if any.
    pub manifest: Option<Manifest>,
    /// Every problem of the newer checkpoints that were skipped, newest first.
    pub skipped: Vec<ShardProblem>,
}

impl LatestValid {
    pub fn step(&self) -> Option<u64> {
        self.manifest.as_ref().map(|m| m.step)
    }
}

/// The newest committed checkpoint that verifies completely, and the named problems of
/// the newer ones it skipped. Uncommitted (partial) step directories are never candidates.
pub fn latest_valid(root: &Path) -> Result<LatestValid> {
    let mut out = LatestValid::default();
    for entry in list(root)?.into_iter().rev() {
        let report = verify(root, entry.step);
        if report.is_valid() {
            out.manifest = report.manifest;
            return Ok(out);
        }
        for p in &report.problems {
            tracing::warn!(problem = %p, "skipping invalid checkpoint");
        }
        out.skipped.extend(report.problems);
    }
    Ok(out)
}

/// A checkpoint reassembled for one rank of a (possibly different) world.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedState {
    pub step: u64,
    pub seed: u64,
    pub opt_step: u64,
    /// Full flat parameters.
    pub params: Vec<f32>,
    /// The range the loading rank owns now.
    pub range: Range<usize>,
    /// AdamW moments for `range`.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Each old rank's opaque bytes, indexed by old rank.
    pub extras: Vec<Vec<u8>>,
    /// World size the checkpoint was written with.
    pub old_world: usize,
    pub layout: Vec<LayoutEntry>,
}

/// Loads checkpoint `step` for rank `new_rank` of `new_world`, whose optimizer range is
/// `shard_range(param_count, new_world, new_rank)`. Any old world size to any new one.
pub fn load_resharded(
    root: &Path,
    step: u64,
    new_world: usize,
    new_rank: usize,
) -> Result<LoadedState> {
    if new_world == 0 || new_rank >= new_world {
        return Err(CheckpointError::InvalidInput(format!(
            "rank {new_rank} of world {new_world}"
        )));
    }
    let manifest = read_manifest(root, step)?;
    let range = shard_range(manifest.param_count, new_world, new_rank);
    load_range_with(root, manifest, range)
}

/// Loads checkpoint `step` with the optimizer moments for an arbitrary `range` (for a
/// caller with its own split). Every shard is read, checksummed and header-checked.
pub fn load_range(root: &Path, step: u64, range: Range<usize>) -> Result<LoadedState> {
    let manifest = read_manifest(root, step)?;
    load_range_with(root, manifest, range)
}

fn load_range_with(root: &Path, manifest: Manifest, range: Range<usize>) -> Result<LoadedState> {
    let step = manifest.step;
    let span = tracing::info_span!(
        "ckpt_load",
        step,
        old_world = manifest.world,
        start = range.start,
        end = range.end
    );
    let _enter = span.enter();
    if range.start > range.end || range.end > manifest.param_count {
        return Err(CheckpointError::InvalidInput(format!(
            "range {}..{} not within 0..{} of checkpoint step {step}",
            range.start, range.end, manifest.param_count
        )));
    }
    let dir = step_dir(root, step);
    // Sizes first: allocations below are bounded by what is really on disk, not by
    // whatever a damaged manifest claims.
    for rec in &manifest.shards {
        let path = dir.join(&rec.file);
        let len = fs::metadata(&path)
            .map_err(CheckpointError::io("stat", &path))?
            .len();
        if len != rec.bytes {
            return Err(CheckpointError::SizeMismatch {
                path,
                expected_bytes: rec.bytes,
                actual_bytes: len,
            });
        }
    }
    let mut params = vec![0f32; manifest.param_count];
    let mut m = vec![0f32; range.len()];
    let mut v = vec![0f32; range.len()];
    let mut extras = Vec::with_capacity(manifest.world);
    let mut opt_step: Option<u64> = None;
    for rec in &manifest.shards {
        let path = dir.join(&rec.file);
        let bytes = fs::read(&path).map_err(CheckpointError::io("read", &path))?;
        if bytes.len() as u64 != rec.bytes {
            return Err(CheckpointError::SizeMismatch {
                path,
                expected_bytes: rec.bytes,
                actual_bytes: bytes.len() as u64,
            });
        }
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != rec.sha256 {
            return Err(CheckpointError::ChecksumMismatch {
                path,
                expected: rec.sha256.clone(),
                actual,
            });
        }
        let h = ShardHeader::decode(&bytes).map_err(|reason| CheckpointError::BadHeader {
            path: path.clone(),
            reason,
        })?;
        check_header_matches(&h, rec, bytes.len() as u64).map_err(|reason| {
            CheckpointError::BadHeader {
                path: path.clone(),
                reason,
            }
        })?;
        if h.param_count as usize != manifest.param_count || h.seed != manifest.seed {
            return Err(CheckpointError::Inconsistent {
                step,
                path,
                reason: format!(
                    "header param_count {} seed {}, manifest {} {}",
                    h.param_count, h.seed, manifest.param_count, manifest.seed
                ),
            });
        }
        match opt_step {
            None => opt_step = Some(h.opt_step),
            Some(o) if o != h.opt_step => {
                return Err(CheckpointError::Inconsistent {
                    step,
                    path,
                    reason: format!(
                        "optimizer step {} differs from other shards' {o}",
                        h.opt_step
                    ),
                })
            }
            Some(_) => {}
        }
        let own = h.range();
        let n = own.len();
        let sec = |i: usize| &bytes[HEADER_LEN + 4 * n * i..HEADER_LEN + 4 * n * (i + 1)];
        decode_f32s_into(sec(0), &mut params[own.clone()]);
        let lo = own.start.max(range.start);
        let hi = own.end.min(range.end);
        if lo < hi {
            let src = (lo - own.start) * 4..(hi - own.start) * 4;
            let dst = lo - range.start..hi - range.start;
            decode_f32s_into(&sec(1)[src.clone()], &mut m[dst.clone()]);
            decode_f32s_into(&sec(2)[src], &mut v[dst]);
        }
        extras.push(bytes[HEADER_LEN + 12 * n..].to_vec());
    }
    if let Some(expected) = &manifest.params_sha256 {
        let actual = params_sha256(&params);
        if &actual != expected {
            return Err(CheckpointError::ParamsMismatch {
                step,
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(LoadedState {
        step,
        seed: manifest.seed,
        opt_step: opt_step.unwrap_or(0),
        params,
        range,
        m,
        v,
        extras,
        old_world: manifest.world,
        layout: manifest.layout,
    })
}

fn decode_f32s_into(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// SHA-256 of the little-endian f32 bytes of `params`: the trainer's `params_sha256`.
pub fn params_sha256(params: &[f32]) -> String {
    let mut h = Sha256::new();
    let mut buf = Vec::with_capacity(1 << 20);
    for chunk in params.chunks(1 << 18) {
        buf.clear();
        for x in chunk {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        h.update(&buf);
    }
    hex::encode(h.finalize())
}
