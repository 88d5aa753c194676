//! On-disk format: the fixed shard header, file names, the manifest, and `shard_range`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First 8 bytes of every shard file.
pub const MAGIC: [u8; 8] = *b"PHXCKPT\0";
/// Version of the shard header and manifest layout written by this crate.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed shard header in bytes.
pub const HEADER_LEN: usize = 128;
/// Name of the manifest file inside a step directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Upper bound on a shard's opaque `extra` section (sampler cursor, RNG state...).
pub const MAX_EXTRA_BYTES: u64 = 1 << 30;

/// One entry of the parameter layout: (name, shape, flat offset).
pub type LayoutEntry = (String, Vec<i64>, usize);

/// Balanced contiguous split of `0..total` into `world` ranges: the first `total % world`
/// ranks take one element more. The same rule as the trainer's micro-batch assignment.
/// `world == 0` or `rank >= world` gives an empty range at `total`.
pub fn shard_range(total: usize, world: usize, rank: usize) -> Range<usize> {
    if world == 0 || rank >= world {
        return total..total;
    }
    let base = total / world;
    let extra = total % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// `step-0000000042`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:010}")
}

/// `<root>/step-0000000042`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(step_dir_name(step))
}

/// `shard-1-of-4.bin`.
pub fn shard_file_name(rank: usize, world: usize) -> String {
    format!("shard-{rank}-of-{world}.bin")
}

/// Parses `step-0000000042` into 42; anything else is `None`.
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The fixed 128-byte header at the start of every shard file (all integers little-endian).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `PHXCKPT\0` |
/// | 8 | 4 | format version (1) |
/// | 12 | 4 | header length (128) |
/// | 16 | 8 | step |
/// | 24 | 8 | seed |
/// | 32 | 4 | world |
/// | 36 | 4 | rank |
/// | 40 | 8 | param_count (length of the full flat vector) |
/// | 48 | 8 | range start |
/// | 56 | 8 | range end |
/// | 64 | 8 | optimizer step |
/// | 72 | 8 | params section length (f32 elements) = range length |
/// | 80 | 8 | m section length (f32 elements) = range length |
/// | 88 | 8 | v section length (f32 elements) = range length |
/// | 96 | 8 | extra section length (bytes) |
/// | 104 | 20 | reserved, zero |
/// | 124 | 4 | CRC-32 (IEEE) of bytes 0..124 |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub step: u64,
    pub seed: u64,
    pub world: u32,
    pub rank: u32,
    pub param_count: u64,
    pub range_start: u64,
    pub range_end: u64,
    pub opt_step: u64,
    pub params_len: u64,
    pub m_len: u64,
    pub v_len: u64,
    pub extra_len: u64,
}

impl ShardHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.step.to_le_bytes());
        b[24..32].copy_from_slice(&self.seed.to_le_bytes());
        b[32..36].copy_from_slice(&self.world.to_le_bytes());
        b[36..40].copy_from_slice(&self.rank.to_le_bytes());
        b[40..48].copy_from_slice(&self.param_count.to_le_bytes());
        b[48..56].copy_from_slice(&self.range_start.to_le_bytes());
        b[56..64].copy_from_slice(&self.range_end.to_le_bytes());
        b[64..72].copy_from_slice(&self.opt_step.to_le_bytes());
        b[72..80].copy_from_slice(&self.params_len.to_le_bytes());
        b[80..88].copy_from_slice(&self.m_len.to_le_bytes());
        b[88..96].copy_from_slice(&self.v_len.to_le_bytes());
        b[96..104].copy_from_slice(&self.extra_len.to_le_bytes());
        let crc = crc32(&b[0..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header. The error string says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ));
        }
        let b = &bytes[..HEADER_LEN];
        if b[0..8] != MAGIC {
            return Err(format!("magic {:02x?}, expected {:02x?}", &b[0..8], MAGIC));
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        let header_len = le_u32(b, 12);
        if header_len as usize != HEADER_LEN {
            return Err(format!("header length {header_len}, expected {HEADER_LEN}"));
        }
        let stored_crc = le_u32(b, 124);
        let crc = crc32(&b[0..124]);
        if stored_crc != crc {
            return Err(format!("header crc32 {stored_crc:08x}, computed {crc:08x}"));
        }
        let h = ShardHeader {
            step: le_u64(b, 16),
            seed: le_u64(b, 24),
            world: le_u32(b, 32),
            rank: le_u32(b, 36),
            param_count: le_u64(b, 40),
            range_start: le_u64(b, 48),
            range_end: le_u64(b, 56),
            opt_step: le_u64(b, 64),
            params_len: le_u64(b, 72),
            m_len: le_u64(b, 80),
            v_len: le_u64(b, 88),
            extra_len: le_u64(b, 96),
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), String> {
        if self.world == 0 {
            return Err("world is 0".into());
        }
        if self.rank >= self.world {
            return Err(format!("rank {} >= world {}", self.rank, self.world));
        }
        if self.range_start > self.range_end || self.range_end > self.param_count {
            return Err(format!(
                "range {}..{} not within 0..{}",
                self.range_start, self.range_end, self.param_count
            ));
        }
        let n = self.range_end - self.range_start;
        if self.params_len != n || self.m_len != n || self.v_len != n {
            return Err(format!(
                "section lengths params {} m {} v {} differ from range length {n}",
                self.params_len, self.m_len, self.v_len
            ));
        }
        if self.extra_len > MAX_EXTRA_BYTES {
            return Err(format!(
                "extra section {} bytes > {MAX_EXTRA_BYTES}",
                self.extra_len
            ));
        }
        if self.file_len().is_none() {
            return Err("section lengths overflow".into());
        }
        Ok(())
    }

    /// Total file length implied by the header, `None` on overflow.
    pub fn file_len(&self) -> Option<u64> {
        let floats = self
            .params_len
            .checked_add(self.m_len)?
            .checked_add(self.v_len)?;
        floats
            .checked_mul(4)?
            .checked_add(self.extra_len)?
            .checked_add(HEADER_LEN as u64)
    }

    pub fn range(&self) -> Range<usize> {
        self.range_start as usize..self.range_end as usize
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib). Bitwise: it only ever covers 124 header bytes.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &byte in data {
        c ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (c & 1).wrapping_neg();
            c = (c >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !c
}

/// What a durable shard looks like; produced by `write_shard`, recorded in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// File name inside the step directory, e.g. `shard-0-of-4.bin`.
    pub file: String,
    pub rank: usize,
    pub world: usize,
    pub step: u64,
    /// The slice of the flat parameter vector this shard owns.
    pub range: Range<usize>,
    /// File length in bytes (header included).
    pub bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// SHA-256 of the params section alone (little-endian f32 bytes of `params[range]`).
    /// For a one-shard checkpoint this equals the trainer's `params_sha256`.
    pub params_section_sha256: String,
}

/// What the committer knows about the checkpoint beyond the shard records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestSpec {
    /// The id of the job that wrote it; a loader refuses a checkpoint of another job.
    pub job: String,
    /// The model configuration's name (a loader refuses another model's checkpoint).
    pub model: String,
    /// The numerics profile the parameters were computed under.
    pub numerics: String,
    pub step: u64,
    pub world: usize,
    pub param_count: usize,
    pub seed: u64,
    pub layout: Vec<LayoutEntry>,
    /// SHA-256 of the full flat params (LE f32 bytes). When `None` and `world == 1` the
    /// committer takes it from the single shard's `params_section_sha256`.
    pub params_sha256: Option<String>,
}

/// `manifest.json`: written last; its presence is what makes a checkpoint committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The job that wrote it (empty in checkpoints written before jobs had ids).
    #[serde(default)]
    pub job: String,
    /// The model configuration's name (empty when the writer did not say).
    #[serde(default)]
    pub model: String,
    /// The numerics profile the parameters were computed under (empty when not said).
    #[serde(default)]
    pub numerics: String,
    pub step: u64,
    pub world: usize,
    pub param_count: usize,
    pub seed: u64,
    pub layout: Vec<LayoutEntry>,
    pub params_sha256: Option<String>,
    /// One record per rank, sorted by rank.
    pub shards: Vec<ShardRecord>,
}

impl Manifest {
    /// Checks the manifest describes a complete, contiguous cover of `0..param_count`.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {}, this build reads {FORMAT_VERSION}",
                self.format_version
            ));
        }
        if self.world == 0 {
            return Err("world is 0".into());
        }
        if self.shards.len() != self.world {
            return Err(format!(
                "{} shard records for world {}",
                self.shards.len(),
                self.world
            ));
        }
        let mut next = 0usize;
        for (i, s) in self.shards.iter().enumerate() {
            if s.rank != i {
                return Err(format!("shard record {i} has rank {}", s.rank));
            }
            if s.world != self.world || s.step != self.step {
                return Err(format!(
                    "shard record {i} says step {} world {}, manifest step {} world {}",
                    s.step, s.world, self.step, self.world
                ));
            }
            let expected_name = shard_file_name(i, self.world);
            if s.file != expected_name {
                return Err(format!(
                    "shard record {i} names file {:?}, expected {expected_name:?}",
                    s.file
                ));
            }
            if s.range.start != next || s.range.end < s.range.start {
                return Err(format!(
                    "shard {i} range {}..{} does not continue at {next}",
                    s.range.start, s.range.end
                ));
            }
            next = s.range.end;
            let min_bytes = (s.range.len() as u64)
                .checked_mul(12)
                .and_then(|b| b.checked_add(HEADER_LEN as u64));
            if min_bytes.is_none_or(|min| s.bytes < min) {
                return Err(format!(
                    "shard {i} records {} bytes, too few for {} elements",
                    s.bytes,
                    s.range.len()
                ));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "shard {i} sha256 {:?} is not 64 hex digits",
                    s.sha256
                ));
            }
        }
        if next != self.param_count {
            return Err(format!(
                "shard ranges end at {next}, param_count is {}",
                self.param_count
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn shard_range_covers_and_balances() {
        for total in [0usize, 1, 7, 10, 1001] {
            for world in 1..9 {
                let mut next = 0;
                for rank in 0..world {
                    let r = shard_range(total, world, rank);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / world || r.len() == total / world + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!(shard_range(10, 0, 0), 10..10);
    }

    #[test]
    fn step_dir_names_round_trip() {
        assert_eq!(step_dir_name(42), "step-0000000042");
        assert_eq!(parse_step_dir_name("step-0000000042"), Some(42));
        assert_eq!(parse_step_dir_name("step-42"), None);
        assert_eq!(parse_step_dir_name("step-00000000x2"), None);
    }
}
