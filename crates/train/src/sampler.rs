//! The deterministic sampler.
//!
//! The global batch of step `s` is a pure function of `(seed, s)`: sequence `i` of the
//! batch starts at `mix(seed, s, i) mod (len - ctx_len)`. The batch is cut into
//! micro-batches by index (micro-batch `m` holds sequences `m*mb .. (m+1)*mb`), so the
//! data a micro-batch sees never depends on which rank computes it, nor on the world size.
use std::ops::Range;

use crate::TrainError;

/// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stream-separated hash of `(seed, stream, step, index)`.
pub fn hash4(seed: u64, stream: u64, step: u64, index: u64) -> u64 {
    let mut h = mix64(seed ^ 0x9e37_79b9_7f4a_7c15);
    h = mix64(h ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93));
    h = mix64(h ^ step.wrapping_mul(0xa076_1d64_78bd_642f));
    mix64(h ^ index.wrapping_mul(0xe703_7ed1_a0b4_28db))
}

const STREAM_TRAIN: u64 = 1;
const STREAM_VAL: u64 = 2;

#[derive(Clone, Debug)]
pub struct Sampler {
    pub seed: u64,
    pub ctx_len: usize,
    pub global_batch: usize,
    pub micro_batch: usize,
}

impl Sampler {
    pub fn new(
        seed: u64,
        ctx_len: usize,
        global_batch: usize,
        micro_batch: usize,
    ) -> Result<Self, TrainError> {
        if global_batch == 0 || micro_batch == 0 || global_batch % micro_batch != 0 {
            return Err(TrainError::Config(format!(
                "global_batch {global_batch} must be a positive multiple of micro_batch {micro_batch}"
            )));
        }
        Ok(Self {
            seed,
            ctx_len,
            global_batch,
            micro_batch,
        })
    }

    pub fn micro_batches(&self) -> usize {
        self.global_batch / self.micro_batch
    }

    /// Start offsets (into the training bytes) of the sequences of micro-batch `micro` of
    /// step `step`. Each sequence is `ctx_len + 1` bytes: inputs and shifted targets.
    pub fn micro_offsets(&self, step: u64, micro: usize, data_len: usize) -> Vec<usize> {
        self.offsets(STREAM_TRAIN, step, micro, data_len)
    }

    /// Offsets of validation micro-batch `micro` (a fixed set, independent of the step).
    pub fn val_offsets(&self, micro: usize, data_len: usize) -> Vec<usize> {
        self.offsets(STREAM_VAL, 0, micro, data_len)
    }

    fn offsets(&self, stream: u64, step: u64, micro: usize, data_len: usize) -> Vec<usize> {
        let span = (data_len - self.ctx_len) as u64; // positions with a full sequence
        (0..self.micro_batch)
            .map(|j| {
                let i = (micro * self.micro_batch + j) as u64;
                (hash4(self.seed, stream, step, i) % span) as usize
            })
            .collect()
    }
}

/// Which micro-batches rank `rank` of `world` computes: contiguous, balanced blocks (the
/// first `m % world` ranks take one more). Any assignment gives the same result, because
/// the gradient reduction does not depend on it.
pub fn assign(micro_batches: usize, world: usize, rank: usize) -> Range<usize> {
    let base = micro_batches / world;
    let extra = micro_batches % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    start..start + len
}

/// Like [`assign`] with relative `shares` per rank (empty or all-zero: equal): contiguous
/// blocks of about `m * share / total` micro-batches. A rank may get none. Any assignment
/// gives the same result, so this only moves work away from a slow rank.
pub fn assign_weighted(
    micro_batches: usize,
    shares: &[u32],
    world: usize,
    rank: usize,
) -> Range<usize> {
    let total: u64 = shares.iter().map(|&s| u64::from(s)).sum();
    if shares.len() != world || total == 0 {
        return assign(micro_batches, world, rank);
    }
    let cum = |r: usize| shares[..r].iter().map(|&s| u64::from(s)).sum::<u64>();
    let at = |r: usize| ((micro_batches as u64 * cum(r) + total / 2) / total) as usize;
    at(rank)..at(rank + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_depend_only_on_seed_and_step() {
        let s = Sampler::new(7, 16, 8, 2).unwrap();
        let a: Vec<_> = (0..4).map(|m| s.micro_offsets(3, m, 1000)).collect();
        let s2 = Sampler::new(7, 16, 8, 2).unwrap();
        let b: Vec<_> = (0..4).map(|m| s2.micro_offsets(3, m, 1000)).collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..4)
                .map(|m| s.micro_offsets(4, m, 1000))
                .collect::<Vec<_>>()
        );
        let other_seed = Sampler::new(8, 16, 8, 2).unwrap();
        assert_ne!(a[0], other_seed.micro_offsets(3, 0, 1000));
        assert!(a.iter().flatten().all(|&o| o + 16 < 1000));
    }

    #[test]
    fn micro_batch_cut_is_by_index() {
        // The same global batch cut in micro-batches of 2 or of 4 gives the same sequences.
        let by2 = Sampler::new(1, 8, 8, 2).unwrap();
        let by4 = Sampler::new(1, 8, 8, 4).unwrap();
        let flat2: Vec<_> = (0..4).flat_map(|m| by2.micro_offsets(5, m, 500)).collect();
        let flat4: Vec<_> = (0..2).flat_map(|m| by4.micro_offsets(5, m, 500)).collect();
        assert_eq!(flat2, flat4);
        assert_ne!(by2.val_offsets(0, 500), by2.micro_offsets(0, 0, 500));
    }

    #[test]
    fn assignment_covers_every_micro_batch_once() {
        for m in 1..12 {
            for w in 1..=m.min(6) {
                let mut seen = vec![0; m];
                for r in 0..w {
                    for i in assign(m, w, r) {
                        seen[i] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "m={m} w={w}");
            }
        }
        assert_eq!(assign(4, 3, 0), 0..2);
        assert_eq!(assign(4, 3, 2), 3..4);
    }

    #[test]
    fn weighted_assignment_covers_every_micro_batch_once() {
        for m in 1..16 {
            let shares = [2, 2, 1, 2];
            let mut seen = vec![0; m];
            for r in 0..4 {
                for i in assign_weighted(m, &shares, 4, r) {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "m={m}");
        }
        assert_eq!(assign_weighted(7, &[2, 2, 1, 2], 4, 2).len(), 1);
        assert_eq!(assign_weighted(8, &[], 4, 1), assign(8, 4, 1));
    }

    #[test]
    fn bad_batch_shapes_are_rejected() {
        assert!(Sampler::new(1, 8, 6, 4).is_err());
        assert!(Sampler::new(1, 8, 0, 1).is_err());
    }
}
