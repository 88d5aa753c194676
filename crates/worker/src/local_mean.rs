//! The deterministic gradient mean of a group of one, straight from autograd's tensors.
//!
//! [`phalanx_collective::deterministic::reduce_mean`] takes one flat f32 vector per
//! micro-batch. A rank alone in its group has nobody to send them to, and copying every
//! micro-batch's gradient into a flat vector only to read it again costs two passes over
//! the parameters per micro-batch. Here the same fixed-point arithmetic runs over the
//! per-parameter gradient tensors themselves: the global max |g|, the exponent
//! `choose_scale_exp(max, M)`, the exact i64 sum of `round(g * 2^k)` and the decode
//! `(sum / 2^k / M) as f32`, with the collective crate's own functions. Integer sums are
//! exact, so summing per parameter in cache-sized chunks instead of over the whole
//! vector gives the same integers, and the mean has the same bits as `reduce_mean`
//! gives for the same micro-gradients at any world size (tested against a group of two).
use phalanx_collective::error::NonFiniteLocation;
use phalanx_collective::fixed_point;
use phalanx_collective::CollectiveError;
use phalanx_train::model::{cpu_f32, Layout};
use tch::Tensor;

use crate::WorkerError;

/// Elements encoded and decoded at a time: the i64 chunk (128 KiB) stays in L2.
const CHUNK: usize = 16 * 1024;

/// Writes the deterministic mean of the micro-batches' gradients `grads[micro][slot]`
/// into `out`. Returns `Ok(false)`, having written nothing, when some gradient is not a
/// contiguous f32 CPU tensor (a CUDA or bf16 tensor, an unused parameter): the caller
/// then takes the flat path. A NaN or infinity is the same error `reduce_mean` returns.
pub fn local_mean(
    grads: &[Vec<Tensor>],
    layout: &Layout,
    out: &mut [f32],
    scratch: &mut Vec<i64>,
) -> Result<bool, WorkerError> {
    let total = grads.len();
    if total == 0 || out.len() != layout.total {
        return Err(WorkerError::Protocol(format!(
            "local mean of {total} micro-batches into {} values for {} parameters",
            out.len(),
            layout.total
        )));
    }
    let mut slices: Vec<Vec<&[f32]>> = Vec::with_capacity(total);
    for g in grads {
        if g.len() != layout.slots.len() {
            return Ok(false);
        }
        let mut per_slot = Vec::with_capacity(g.len());
        for (slot, t) in layout.slots.iter().zip(g) {
            match cpu_f32(t, slot.numel) {
                Some(s) => per_slot.push(s),
                None => return Ok(false),
            }
        }
        slices.push(per_slot);
    }
    let mut gmax = 0f64;
    for (micro, per_slot) in slices.iter().enumerate() {
        for (slot, s) in layout.slots.iter().zip(per_slot) {
            let m = fixed_point::max_abs(&[s]);
            if let Some(loc) = m.non_finite {
                return Err(CollectiveError::NonFinite {
                    source_rank: 0,
                    location: Some(NonFiniteLocation {
                        micro_batch: micro,
                        element: slot.offset + loc.element,
                        value: loc.value,
                    }),
                }
                .into());
            }
            gmax = gmax.max(m.max_abs);
        }
    }
    let k = fixed_point::choose_scale_exp(gmax, total).map_err(|e| {
        WorkerError::Collective(CollectiveError::InvalidArgument {
            reason: format!("reduce_mean: {e}"),
        })
    })?;
    scratch.resize(CHUNK, 0);
    let wide = avx512();
    let mut chunk: Vec<&[f32]> = Vec::with_capacity(total);
    for (i, slot) in layout.slots.iter().enumerate() {
        let mut start = 0;
        while start < slot.numel {
            let end = (start + CHUNK).min(slot.numel);
            let sums = &mut scratch[..end - start];
            sums.fill(0);
            chunk.clear();
            chunk.extend(slices.iter().map(|per_slot| &per_slot[i][start..end]));
            let at = slot.offset + start;
            let dst = &mut out[at..at + end - start];
            if wide {
                sum_decode_avx512(&chunk, k, total, sums, dst);
            } else {
                fixed_point::encode_sum(&chunk, k, sums);
                fixed_point::decode(sums, k, total, dst);
            }
            start = end;
        }
    }
    Ok(true)
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `fixed_point::encode_sum` then `fixed_point::decode` of one chunk, with the float form
/// of the encoder (`fixed_point::encode_one`, documented to give the same integers as the
/// bit-level one for every finite value in range, which `choose_scale_exp` guarantees)
/// and `s as f64` for the decoder's exact split conversion (the same correctly rounded
/// value). Both vectorise only with AVX-512's f64/i64 conversions, 8 lanes wide. Call
/// only where [`avx512`] holds.
#[inline(always)]
fn sum_decode_kernel(chunk: &[&[f32]], scale: f64, m: f64, sums: &mut [i64], out: &mut [f32]) {
    let sums = &mut sums[..out.len()];
    let (first, rest) = chunk.split_first().expect("at least one micro-batch");
    for (s, &g) in sums.iter_mut().zip(*first) {
        *s = fixed_point::encode_one(g, scale);
    }
    for g in rest {
        for (s, &x) in sums.iter_mut().zip(*g) {
            *s = s.wrapping_add(fixed_point::encode_one(x, scale));
        }
    }
    for (o, &s) in out.iter_mut().zip(sums.iter()) {
        *o = ((s as f64 / scale) / m) as f32;
    }
}

fn sum_decode_avx512(chunk: &[&[f32]], k: i32, total: usize, sums: &mut [i64], out: &mut [f32]) {
    let (scale, m) = (fixed_point::pow2(k), total.max(1) as f64);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512dq")]
        unsafe fn wide(chunk: &[&[f32]], scale: f64, m: f64, sums: &mut [i64], out: &mut [f32]) {
            sum_decode_kernel(chunk, scale, m, sums, out)
        }
        if avx512() {
            // SAFETY: the CPU supports AVX-512F and DQ (checked just above).
            return unsafe { wide(chunk, scale, m, sums, out) };
        }
    }
    sum_decode_kernel(chunk, scale, m, sums, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 chunk kernel gives the collective's integers and mean, on values that
    /// hit every case of the encoder: ties at the scale, subnormals, negative zero, the
    /// global max itself, tiny values that round to zero.
    #[test]
    fn the_wide_kernel_gives_the_collectives_bits() {
        let n = 4099;
        let mut gs: Vec<Vec<f32>> = (0..3)
            .map(|m| {
                (0..n)
                    .map(|i| {
                        let x = (((i * 7919 + m * 104_729) % 20_011) as f32 - 10_005.0) * 1e-4;
                        match i % 11 {
                            0 => f32::from_bits(1 + i as u32),
                            1 => -0.0,
                            2 => x * 1e-30,
                            _ => x,
                        }
                    })
                    .collect()
            })
            .collect();
        gs[1][17] = 3.0;
        let refs: Vec<&[f32]> = gs.iter().map(|g| g.as_slice()).collect();
        let max = fixed_point::max_abs(&refs).max_abs;
        let k = fixed_point::choose_scale_exp(max, 3).unwrap();
        // Exact ties: half a quantum above a multiple of it.
        let q = 1.0 / fixed_point::pow2(k);
        gs[2][5] = (1000.5 * q) as f32;
        gs[2][6] = (-1000.5 * q) as f32;
        let refs: Vec<&[f32]> = gs.iter().map(|g| g.as_slice()).collect();
        let mut want_sums = vec![0i64; n];
        fixed_point::encode_sum(&refs, k, &mut want_sums);
        let mut want = vec![0f32; n];
        fixed_point::decode(&want_sums, k, 3, &mut want);
        let (mut sums, mut got) = (vec![0i64; n], vec![0f32; n]);
        sum_decode_avx512(&refs, k, 3, &mut sums, &mut got);
        assert_eq!(sums, want_sums);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
    }
}
