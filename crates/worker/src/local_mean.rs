//! The deterministic gradient mean of a group of one, straight from autograd's tensors.
//!
//! [`phalanx_collective::deterministic::reduce_mean`] takes one flat f32 vector per
//! micro-batch. A rank alone in its group has nobody to send them to, and copying every
//! micro-batch's gradient into a flat vector only to read it again costs two passes over
//! the parameters per micro-batch. Here the same fixed-point arithmetic runs over the
//! per-parameter gradient tensors themselves: the global max |g|, the exponent
//! `choose_scale_exp(max, M)`, the exact sum of `round(g * 2^k)` and the decode
//! `(sum / 2^k / M) as f32`, with the collective crate's own functions
//! ([`fixed_point::mean_of`] sums in L1-sized blocks, as two exact f64 halves, and
//! decodes without writing the integers). The sums are exact, so summing per parameter
//! instead of over the whole vector gives the same integers, and the mean has the same bits as `reduce_mean`
//! gives for the same micro-gradients at any world size (tested against a group of two).
use phalanx_collective::error::NonFiniteLocation;
use phalanx_collective::fixed_point;
use phalanx_collective::CollectiveError;
use phalanx_train::model::{cpu_f32, Layout};
use tch::Tensor;

use crate::WorkerError;

/// Max |g| over micro-batch `micro`'s gradient tensors, computed right after its backward
/// while they are still in cache; `Ok(None)` when some tensor is not a contiguous f32 CPU
/// tensor. A NaN or infinity is the error `reduce_mean` returns for it.
pub fn micro_max(
    grads: &[Tensor],
    layout: &Layout,
    micro: usize,
) -> Result<Option<f64>, WorkerError> {
    if grads.len() != layout.slots.len() {
        return Ok(None);
    }
    let mut max = 0f64;
    for (slot, t) in layout.slots.iter().zip(grads) {
        let Some(s) = cpu_f32(t, slot.numel) else {
            return Ok(None);
        };
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
        max = max.max(m.max_abs);
    }
    Ok(Some(max))
}

/// Writes the deterministic mean of the micro-batches' gradients `grads[micro][slot]`
/// into `out`. Returns `Ok(false)`, having written nothing, when some gradient is not a
/// contiguous f32 CPU tensor (a CUDA or bf16 tensor, an unused parameter): the caller
/// then takes the flat path. A NaN or infinity is the same error `reduce_mean` returns.
/// `maxes`: each micro-batch's [`micro_max`], if the caller has them.
pub fn local_mean(
    grads: &[Vec<Tensor>],
    maxes: Option<&[f64]>,
    layout: &Layout,
    out: &mut [f32],
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
    match maxes.filter(|m| m.len() == total) {
        Some(m) => gmax = m.iter().fold(0f64, |a, &b| a.max(b)),
        None => {
            for (micro, g) in grads.iter().enumerate() {
                match micro_max(g, layout, micro)? {
                    Some(m) => gmax = gmax.max(m),
                    None => return Ok(false),
                }
            }
        }
    }
    let k = fixed_point::choose_scale_exp(gmax, total).map_err(|e| {
        WorkerError::Collective(CollectiveError::InvalidArgument {
            reason: format!("reduce_mean: {e}"),
        })
    })?;
    let mut per_slot: Vec<&[f32]> = Vec::with_capacity(total);
    for (i, slot) in layout.slots.iter().enumerate() {
        per_slot.clear();
        per_slot.extend(slices.iter().map(|s| s[i]));
        let at = slot.offset;
        fixed_point::mean_of(&per_slot, k, total, &mut out[at..at + slot.numel]);
    }
    Ok(true)
}
