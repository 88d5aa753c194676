//! Deterministic gradient mean, bit-identical however micro-batches are
//! spread over ranks.
//!
//! # Why it is order-free
//!
//! Floating-point addition is not associative, so a plain ring all-reduce of
//! f32 gives results that depend on the world size and on which rank holds
//! which micro-batch. Here every value is first mapped to an integer by a
//! function that depends only on the value itself and on quantities that are
//! the same on every rank whatever the distribution:
//!
//! 1. the global max `m = max |g|` over all micro-gradients — `max` is exact
//!    and associative, so `all_reduce_max_f64` yields the same `m` everywhere;
//! 2. the total micro-batch count `M` (an argument, checked to agree);
//! 3. the exponent `k` chosen from `m` and `M` such that `M * m * 2^k <= 2^61`
//!    ([`crate::fixed_point::choose_scale_exp`]).
//!
//! Each element becomes `round(g as f64 * 2^k)` as i64 — scaling by a power of
//! two is exact, rounding is a pure function. Sums of at most `M` such values
//! are bounded by `2^61 + M/2 < 2^63`, so integer addition never overflows and
//! is exact; exact addition is associative and commutative, so the local sum
//! plus `all_reduce_sum_i64` (ring order, world size — nothing matters) gives
//! the same integer. Decoding `(sum as f64 / 2^k / M) as f32` is again a pure
//! function of that integer. Hence the output bits depend only on the multiset
//! of micro-gradients.
//!
//! # What it costs
//!
//! * 2x the bytes on the wire compared with an f32 all-reduce (i64 per
//!   element), plus one tiny max all-reduce (7 f64s) for the scale and checks;
//! * encoding (integer shift-and-round of the f32 bits, vectorised) and
//!   decoding, both O(n); they are fused into the ring — each chunk of local
//!   values is encoded just before it is sent or combined with a received
//!   partial sum, and each fully reduced chunk is decoded into `out` as it
//!   passes through the all-gather — so there are no separate passes;
//! * an i64 scratch buffer of `n + 1` elements, kept in the group and reused.
//!
//! Because `out` is written during the all-gather, it holds unspecified
//! values when an error is returned.
//!
//! # Precision
//!
//! The quantum is `2^-k ≈ M * m / 2^61`, i.e. a resolution of about `2^-62`
//! relative to `M * m` (per-element rounding error ≤ half a quantum per
//! micro-batch, so the mean is within `2^-k / 2` of the exact mean before the
//! final f32 rounding). Elements whose magnitude is below roughly
//! `2^-38 * M * m` have fewer than 24 significant bits left, so they lose some
//! f32 precision (tiny gradients next to a huge one are flushed toward zero —
//! harmless for SGD/Adam in practice). Elements near `m` are accurate to f32
//! rounding.
//!
//! # Errors
//!
//! A NaN or infinity anywhere yields [`CollectiveError::NonFinite`] on *every*
//! rank (the check rides along in the max all-reduce so no rank is left waiting
//! on another); the rank holding it also reports micro-batch, element and
//! value. Disagreeing lengths, `M`, or a micro-batch count that does not add
//! up to `M` also fail consistently on all ranks.

use std::time::Duration;

use crate::blocking::BlockingGroup;
use crate::error::{CollectiveError, Result};
use crate::fixed_point;
use crate::group::Group;
use tracing::Instrument;

/// Reduce the mean of `total_micro_batches` micro-gradients held across the
/// group (`local_micro_grads` are this rank's; may be empty) into `out`, whose
/// length is the gradient length on every rank. `timeout` bounds each of the
/// two network operations.
pub fn reduce_mean(
    group: &mut BlockingGroup,
    local_micro_grads: &[&[f32]],
    total_micro_batches: usize,
    out: &mut [f32],
    timeout: Duration,
) -> Result<()> {
    group.block_on(|g| reduce_mean_async(g, local_micro_grads, total_micro_batches, out, timeout))
}

/// Async form of [`reduce_mean`].
pub async fn reduce_mean_async(
    group: &mut Group,
    local_micro_grads: &[&[f32]],
    total_micro_batches: usize,
    out: &mut [f32],
    timeout: Duration,
) -> Result<()> {
    let span = tracing::debug_span!(
        "reduce_mean",
        rank = group.rank(),
        elems = out.len(),
        local = local_micro_grads.len(),
        total_micro_batches
    );
    reduce_mean_inner(group, local_micro_grads, total_micro_batches, out, timeout)
        .instrument(span)
        .await
}

async fn reduce_mean_inner(
    group: &mut Group,
    local_micro_grads: &[&[f32]],
    total_micro_batches: usize,
    out: &mut [f32],
    timeout: Duration,
) -> Result<()> {
    let rank = group.rank();
    let n = out.len();

    // (a) local stats; everything that can go wrong travels in one max-reduce
    // so that every rank takes the same decision.
    let local = fixed_point::max_abs(local_micro_grads);
    let shape_bad = local_micro_grads.iter().any(|g| g.len() != n);
    let flag = |b: bool| if b { (rank + 1) as f64 } else { 0.0 };
    // Non-finite is flagged with -(rank) so that max picks the lowest rank.
    let nf_flag = if local.non_finite.is_some() {
        -(rank as f64)
    } else {
        f64::NEG_INFINITY
    };
    let mut stats = [
        local.max_abs,
        nf_flag,
        flag(shape_bad),
        n as f64,
        -(n as f64),
        total_micro_batches as f64,
        -(total_micro_batches as f64),
    ];
    group.all_reduce_max_f64_within(&mut stats, timeout).await?;
    let [gmax, nf, shape, nmax, nmin_neg, mmax, mmin_neg] = stats;
    if nf > f64::NEG_INFINITY {
        let source_rank = (-nf) as usize;
        return Err(CollectiveError::NonFinite {
            source_rank,
            location: if source_rank == rank {
                local.non_finite
            } else {
                None
            },
        });
    }
    if shape > 0.0 {
        return Err(CollectiveError::InvalidArgument {
            reason: format!(
                "reduce_mean: rank {} passed a micro-gradient whose length differs from out.len()",
                shape as usize - 1
            ),
        });
    }
    if nmax != -nmin_neg {
        return Err(CollectiveError::InvalidArgument {
            reason: format!(
                "reduce_mean: ranks disagree on gradient length ({} vs {})",
                -nmin_neg, nmax
            ),
        });
    }
    if mmax != -mmin_neg {
        return Err(CollectiveError::InvalidArgument {
            reason: format!(
                "reduce_mean: ranks disagree on total_micro_batches ({} vs {})",
                -mmin_neg, mmax
            ),
        });
    }
    // (b) scale
    let k = fixed_point::choose_scale_exp(gmax, total_micro_batches).map_err(|e| {
        CollectiveError::InvalidArgument {
            reason: format!("reduce_mean: {e}"),
        }
    })?;
    // (c) encode + local exact sum; the extra last slot counts micro-batches
    let mut sums = std::mem::take(&mut group.scratch_i64);
    // (reused across calls at the same length: no zero-fill)
    sums.resize(n + 1, 0);
    // (d) exact all-reduce with the encode fused into the first sends and
    // combines and the decode (e) into the all-gather
    let enc = fixed_point::Encoder::new(local_micro_grads, k);
    let count = local_micro_grads.len() as i64;
    let r = group
        .fixed_mean_ring(
            local_micro_grads,
            enc,
            count,
            k,
            total_micro_batches,
            &mut sums,
            out,
            timeout,
        )
        .await;
    let sums = ScratchGuard { group, buf: sums };
    r?;
    if sums[n] != total_micro_batches as i64 {
        return Err(CollectiveError::InvalidArgument {
            reason: format!(
                "reduce_mean: ranks hold {} micro-batches in total, total_micro_batches is {}",
                sums[n], total_micro_batches
            ),
        });
    }
    tracing::debug!(k, gmax, "reduce_mean done");
    Ok(())
}

/// Gives the scratch buffer back to the group when dropped.
struct ScratchGuard<'a> {
    group: &'a mut Group,
    buf: Vec<i64>,
}

impl std::ops::Deref for ScratchGuard<'_> {
    type Target = [i64];
    fn deref(&self) -> &[i64] {
        &self.buf
    }
}

impl Drop for ScratchGuard<'_> {
    fn drop(&mut self) {
        self.group.scratch_i64 = std::mem::take(&mut self.buf);
    }
}
