//! Pure fixed-point encode/decode used by [`crate::deterministic`]. No I/O.
//!
//! A gradient value `g` is encoded as `round(g * 2^k)` as an `i64`, where the
//! power-of-two exponent `k` is chosen from the *global* max |g| and the total
//! number of micro-batches `M` so that any sum of `M` encoded values stays below
//! `2^62` in magnitude. Multiplying an `f32` (widened to `f64`) by a power of
//! two is exact, and `round` is a pure function of its input, so each encoded
//! integer depends only on `g` and `k`; integer addition is exact and
//! associative, so the sum is independent of how values are grouped.

use crate::error::NonFiniteLocation;

/// Sums of `M` encoded values are kept at or below `2^SUM_BITS` (+ M/2 from
/// rounding), well inside `i64`.
pub const SUM_BITS: i32 = 61;

/// Max |g| over a set of gradients, plus the first non-finite value found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxAbs {
    /// Max |g| over the finite values (0 if there are none).
    pub max_abs: f64,
    /// First NaN/inf found, if any.
    pub non_finite: Option<NonFiniteLocation>,
}

/// Scan micro-gradients for max |g| and non-finite values.
pub fn max_abs(micro_grads: &[&[f32]]) -> MaxAbs {
    let mut max = 0.0f32;
    let mut non_finite = None;
    for (mb, g) in micro_grads.iter().enumerate() {
        let mut m = 0.0f32;
        let mut bad = false;
        for &x in g.iter() {
            bad |= !x.is_finite();
            m = m.max(x.abs());
        }
        if bad && non_finite.is_none() {
            if let Some((i, &v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                non_finite = Some(NonFiniteLocation { micro_batch: mb, element: i, value: v });
            }
        }
        if m.is_finite() {
            max = max.max(m);
        } else {
            // recompute over finite values only
            let mf = g.iter().filter(|v| v.is_finite()).fold(0.0f32, |a, v| a.max(v.abs()));
            max = max.max(mf);
        }
    }
    MaxAbs { max_abs: max as f64, non_finite }
}

/// Errors choosing a scale (bad inputs).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScaleError {
    #[error("global max |g| = {0} is not a finite non-negative number")]
    BadMax(f64),
    #[error("total_micro_batches must be > 0")]
    ZeroMicroBatches,
    #[error("scale exponent {0} is outside the f64 normal range")]
    ExponentRange(i64),
}

/// Choose `k` such that `M * global_max_abs * 2^k <= 2^SUM_BITS`, as large as
/// possible (maximal precision). `global_max_abs == 0` gives `k = 0`.
pub fn choose_scale_exp(global_max_abs: f64, total_micro_batches: usize) -> Result<i32, ScaleError> {
    if total_micro_batches == 0 {
        return Err(ScaleError::ZeroMicroBatches);
    }
    if !global_max_abs.is_finite() || global_max_abs < 0.0 {
        return Err(ScaleError::BadMax(global_max_abs));
    }
    if global_max_abs == 0.0 {
        return Ok(0);
    }
    let x = total_micro_batches as f64 * global_max_abs; // rounding up is harmless: see below
    // e = smallest integer with 2^e >= x (x is a normal f64 here)
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mant = bits & ((1u64 << 52) - 1);
    let e = if mant == 0 { exp } else { exp + 1 };
    // The product above may have rounded down by half an ulp; one spare bit of
    // headroom (2^61 vs the 2^62 we promise) covers it.
    let k = SUM_BITS as i64 - e;
    if !(-1022..=1023).contains(&k) {
        return Err(ScaleError::ExponentRange(k));
    }
    Ok(k as i32)
}

/// `2^k` as an exact f64 (k in the normal range).
pub fn pow2(k: i32) -> f64 {
    let k = k.clamp(-1022, 1023);
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// Encode one value: `round(g * scale)` with ties away from zero (like
/// `f64::round`, but branch-free and without a libm call, so it vectorizes).
/// Valid for `|g * scale| < 2^63`, which [`choose_scale_exp`] guarantees.
#[inline]
pub fn encode_one(g: f32, scale: f64) -> i64 {
    let x = g as f64 * scale;
    let i = x as i64; // truncation toward zero
    let frac = x - i as f64; // exact: |x| < 2^63 and x, i share sign and integer part
    i + i64::from(frac >= 0.5) - i64::from(frac <= -0.5)
}

/// `out[i] += sum over micro-batches of round(g[i] * 2^k)` (wrapping, though
/// with a scale from [`choose_scale_exp`] it never wraps). All micro-grads must
/// have `out.len()` elements (shorter ones contribute only their prefix).
pub fn encode_sum(micro_grads: &[&[f32]], k: i32, out: &mut [i64]) {
    let scale = pow2(k);
    for g in micro_grads {
        for (o, &x) in out.iter_mut().zip(g.iter()) {
            *o = o.wrapping_add(encode_one(x, scale));
        }
    }
}

/// Decode summed integers into the mean: `(sum / 2^k / M) as f32`.
pub fn decode(sums: &[i64], k: i32, total_micro_batches: usize, out: &mut [f32]) {
    let scale = pow2(k);
    let m = total_micro_batches.max(1) as f64;
    for (o, &s) in out.iter_mut().zip(sums.iter()) {
        *o = ((s as f64 / scale) / m) as f32;
    }
}

/// Convenience: the whole pipeline on one machine (for tests and reference).
pub fn mean_single_process(micro_grads: &[&[f32]], len: usize) -> Result<Vec<f32>, ScaleError> {
    let m = max_abs(micro_grads);
    if m.non_finite.is_some() {
        return Err(ScaleError::BadMax(f64::NAN));
    }
    let k = choose_scale_exp(m.max_abs, micro_grads.len())?;
    let mut sums = vec![0i64; len];
    encode_sum(micro_grads, k, &mut sums);
    let mut out = vec![0f32; len];
    decode(&sums, k, micro_grads.len(), &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_bounds() {
        for &(max, m) in &[(1.0, 1usize), (3.0, 7), (f32::MAX as f64, 1 << 20), (1e-45, 1), (0.5, 1000)] {
            let k = choose_scale_exp(max, m).unwrap();
            let bound = m as f64 * (max * pow2(k));
            assert!(bound <= 2f64.powi(61) * (1.0 + 1e-12), "max {max} m {m} k {k}");
            // maximal: one more bit would exceed
            assert!(m as f64 * max * 2.0 * pow2(k) > 2f64.powi(60));
        }
        assert_eq!(choose_scale_exp(0.0, 3), Ok(0));
        assert!(choose_scale_exp(f64::NAN, 3).is_err());
        assert!(choose_scale_exp(1.0, 0).is_err());
    }

    #[test]
    fn order_free() {
        let a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
        let b: Vec<f32> = (0..100).map(|i| (i as f32 * 1.1).cos() * 5.0).collect();
        let c: Vec<f32> = (0..100).map(|i| -(i as f32) * 1e-7).collect();
        let all = mean_single_process(&[&a, &b, &c], 100).unwrap();
        let k = choose_scale_exp(max_abs(&[&a, &b, &c]).max_abs, 3).unwrap();
        let mut s1 = vec![0i64; 100];
        encode_sum(&[&c], k, &mut s1);
        let mut s2 = vec![0i64; 100];
        encode_sum(&[&b, &a], k, &mut s2);
        let sums: Vec<i64> = s1.iter().zip(&s2).map(|(x, y)| x.wrapping_add(*y)).collect();
        let mut out = vec![0f32; 100];
        decode(&sums, k, 3, &mut out);
        assert_eq!(
            all.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        for i in 0..100 {
            let r = (a[i] as f64 + b[i] as f64 + c[i] as f64) / 3.0;
            assert!((out[i] as f64 - r).abs() <= 1e-6 * r.abs() + 1e-15, "{i}: {} vs {r}", out[i]);
        }
    }

    #[test]
    fn encode_one_matches_round() {
        let scale = pow2(20);
        for &g in &[0.0f32, -0.0, 1.0, -1.0, 0.5e-6, 1.5 / (1 << 20) as f32, -2.5 / (1 << 20) as f32, 0.49999997, 3.3e-7, -7.77e-7, 123.456] {
            assert_eq!(encode_one(g, scale), (g as f64 * scale).round() as i64, "{g}");
        }
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let g = f32::from_bits(s & 0xbfff_ffff); // finite, |g| < 2
            let sc = pow2(40);
            assert_eq!(encode_one(g, sc), (g as f64 * sc).round() as i64, "{g}");
        }
    }

    #[test]
    fn non_finite_found() {
        let a = [1.0f32, 2.0];
        let b = [0.5f32, f32::NAN, f32::INFINITY];
        let m = max_abs(&[&a, &b]);
        assert_eq!(m.max_abs, 2.0);
        let nf = m.non_finite.unwrap();
        assert_eq!((nf.micro_batch, nf.element), (1, 1));
    }
}
