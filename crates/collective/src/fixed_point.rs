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

/// Define `fn $name` that runs the `#[inline(always)]` kernel through a copy
/// compiled for AVX2 when the CPU has it (runtime check), else the baseline
/// build. Same source, same results: the kernels use only integer ops and
/// correctly rounded IEEE ops, which do not depend on the instruction set.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? = $kernel:ident) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $kernel($($a),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($a),*) };
                }
            }
            $kernel($($a),*)
        }
    };
}

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

/// Max of `|x|` as IEEE bits (sign cleared). For non-NaN values the integer
/// order of these bits is the order of `|x|`; anything `>= 0x7f80_0000` is
/// infinite or NaN. Integer max has no NaN special cases, so this vectorizes.
#[inline(always)]
fn max_abs_bits_kernel(g: &[f32]) -> u32 {
    let mut m = 0u32;
    for &x in g {
        m = m.max(x.to_bits() & 0x7fff_ffff);
    }
    m
}

multiversion!(fn max_abs_bits(g: &[f32]) -> u32 = max_abs_bits_kernel);

/// Scan micro-gradients for max |g| and non-finite values.
pub fn max_abs(micro_grads: &[&[f32]]) -> MaxAbs {
    let mut max = 0.0f32;
    let mut non_finite = None;
    for (mb, g) in micro_grads.iter().enumerate() {
        let bits = max_abs_bits(g);
        if bits < 0x7f80_0000 {
            max = max.max(f32::from_bits(bits));
            continue;
        }
        // slow path: some value is NaN or infinite
        if non_finite.is_none() {
            if let Some((i, &v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                non_finite = Some(NonFiniteLocation {
                    micro_batch: mb,
                    element: i,
                    value: v,
                });
            }
        }
        let mf = g
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |a, v| a.max(v.abs()));
        max = max.max(mf);
    }
    MaxAbs {
        max_abs: max as f64,
        non_finite,
    }
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
pub fn choose_scale_exp(
    global_max_abs: f64,
    total_micro_batches: usize,
) -> Result<i32, ScaleError> {
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

/// [`encode_one`] computed on the f32 bits with integer operations only:
/// `g = ±m * 2^e` with a 24-bit integer `m`, so `g * 2^k` is `m` shifted left
/// (exact) or right with round-half-away-from-zero. Identical results to
/// [`encode_one`] for every finite `g` with `|g * 2^k| < 2^62`, and it
/// vectorizes (no float→i64 conversion, which x86 lacks before AVX-512).
#[inline(always)]
pub(crate) fn encode_bits(g: f32, k: i32) -> i64 {
    let b = g.to_bits();
    let biased = ((b >> 23) & 0xff) as i64;
    let frac = (b & 0x7f_ffff) as u64;
    let normal = biased != 0;
    let m = if normal { frac | 0x80_0000 } else { frac };
    // g = m * 2^(max(biased,1) - 150)
    let sh = biased.max(1) - 150 + k as i64;
    let left = m << sh.clamp(0, 63) as u64;
    let d = (-sh).clamp(0, 63) as u64;
    let right = (m + ((1u64 << d) >> 1)) >> d;
    let mag = (if sh >= 0 { left } else { right }) as i64;
    if b >> 31 != 0 {
        mag.wrapping_neg()
    } else {
        mag
    }
}

multiversion!(fn encode_add_simd(g: &[f32], k: i32, out: &mut [i64]) = encode_add_kernel);
multiversion!(fn encode_assign_simd(g: &[f32], k: i32, out: &mut [i64]) = encode_assign_kernel);
multiversion!(fn encode_add_from_simd(g: &[f32], k: i32, base: &[i64], out: &mut [i64]) = encode_add_from_kernel);
multiversion!(fn decode_simd(sums: &[i64], scale: f64, m: f64, out: &mut [f32]) = decode_kernel);

#[inline(always)]
fn encode_add_kernel(g: &[f32], k: i32, out: &mut [i64]) {
    for (o, &x) in out.iter_mut().zip(g.iter()) {
        *o = o.wrapping_add(encode_bits(x, k));
    }
}

#[inline(always)]
fn encode_add_from_kernel(g: &[f32], k: i32, base: &[i64], out: &mut [i64]) {
    for ((o, &b), &x) in out.iter_mut().zip(base).zip(g) {
        *o = b.wrapping_add(encode_bits(x, k));
    }
}

#[inline(always)]
fn encode_assign_kernel(g: &[f32], k: i32, out: &mut [i64]) {
    for (o, &x) in out.iter_mut().zip(g.iter()) {
        *o = encode_bits(x, k);
    }
}

/// Whether [`encode_bits`] is exact for every value of `g` at exponent `k`
/// (all finite and `|g * 2^k| < 2^62`); otherwise use the float path, which
/// saturates like before.
fn bits_path_ok(g: &[f32], k: i32) -> bool {
    // |g| <= f32::from_bits(max_abs_bits) < 2^(e+1); need 2^(e+1+k) <= 2^62.
    let bits = max_abs_bits(g);
    if bits >= 0x7f80_0000 {
        return false;
    }
    let e = ((bits >> 23) as i64).max(1) - 127;
    e + 1 + k as i64 <= 62
}

/// `out[i] += sum over micro-batches of round(g[i] * 2^k)` (wrapping, though
/// with a scale from [`choose_scale_exp`] it never wraps). All micro-grads must
/// have `out.len()` elements (shorter ones contribute only their prefix).
pub fn encode_sum(micro_grads: &[&[f32]], k: i32, out: &mut [i64]) {
    for g in micro_grads {
        encode_add(g, k, out);
    }
}

/// `out[i] += round(g[i] * 2^k)` for one micro-gradient.
pub(crate) fn encode_add(g: &[f32], k: i32, out: &mut [i64]) {
    if bits_path_ok(g, k) {
        encode_add_simd(g, k, out)
    } else {
        let scale = pow2(k);
        for (o, &x) in out.iter_mut().zip(g.iter()) {
            *o = o.wrapping_add(encode_one(x, scale));
        }
    }
}

/// Encodes micro-gradients at a fixed exponent, checking once up front
/// whether the fast integer path is exact for all of them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Encoder {
    k: i32,
    fast: bool,
}

impl Encoder {
    pub(crate) fn new(micro_grads: &[&[f32]], k: i32) -> Self {
        Encoder {
            k,
            fast: micro_grads.iter().all(|g| bits_path_ok(g, k)),
        }
    }

    /// `out[i] = base[i] + round(g[i] * 2^k)` (wrapping).
    pub(crate) fn add_from(&self, g: &[f32], base: &[i64], out: &mut [i64]) {
        if self.fast {
            encode_add_from_simd(g, self.k, base, out)
        } else {
            let scale = pow2(self.k);
            for ((o, &b), &x) in out.iter_mut().zip(base).zip(g) {
                *o = b.wrapping_add(encode_one(x, scale));
            }
        }
    }

    /// `out[j] = base[j] + sum over micro-batches of round(g[r.start + j] * 2^k)`
    /// for `r = range`, or just the encoded sum when `base` is `None`.
    pub(crate) fn sum_range(
        &self,
        micro_grads: &[&[f32]],
        range: std::ops::Range<usize>,
        base: Option<&[i64]>,
        out: &mut [i64],
    ) {
        let mut gs = micro_grads.iter().map(|g| &g[range.clone()]);
        match (base, gs.next()) {
            (Some(b), Some(g)) => self.add_from(g, b, out),
            (Some(b), None) => out.copy_from_slice(&b[..out.len()]),
            (None, Some(g)) if self.fast => encode_assign_simd(g, self.k, out),
            (None, Some(g)) => {
                out.fill(0);
                self.add_from_self(g, out)
            }
            (None, None) => out.fill(0),
        }
        for g in gs {
            self.add_from_self(g, out);
        }
    }

    fn add_from_self(&self, g: &[f32], out: &mut [i64]) {
        if self.fast {
            encode_add_simd(g, self.k, out)
        } else {
            let scale = pow2(self.k);
            for (o, &x) in out.iter_mut().zip(g) {
                *o = o.wrapping_add(encode_one(x, scale));
            }
        }
    }
}

/// `s as f64`, correctly rounded, from two exact 32-bit halves: the high half
/// times 2^32 and the low half are both exact in f64, so their sum is one
/// correctly rounded operation — the same bits as `s as f64`, but it
/// vectorizes without AVX-512.
#[inline(always)]
fn i64_to_f64(s: i64) -> f64 {
    let hi = (s >> 32) as i32 as f64 * 4294967296.0;
    let lo = (s as u64 & 0xffff_ffff) as u32 as f64;
    hi + lo
}

#[inline(always)]
fn decode_kernel(sums: &[i64], scale: f64, m: f64, out: &mut [f32]) {
    for (o, &s) in out.iter_mut().zip(sums.iter()) {
        *o = ((i64_to_f64(s) / scale) / m) as f32;
    }
}

/// Decode summed integers into the mean: `(sum / 2^k / M) as f32`.
pub fn decode(sums: &[i64], k: i32, total_micro_batches: usize, out: &mut [f32]) {
    let scale = pow2(k);
    let m = total_micro_batches.max(1) as f64;
    decode_simd(sums, scale, m, out)
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
        for &(max, m) in &[
            (1.0, 1usize),
            (3.0, 7),
            (f32::MAX as f64, 1 << 20),
            (1e-45, 1),
            (0.5, 1000),
        ] {
            let k = choose_scale_exp(max, m).unwrap();
            let bound = m as f64 * (max * pow2(k));
            assert!(
                bound <= 2f64.powi(61) * (1.0 + 1e-12),
                "max {max} m {m} k {k}"
            );
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
        let sums: Vec<i64> = s1
            .iter()
            .zip(&s2)
            .map(|(x, y)| x.wrapping_add(*y))
            .collect();
        let mut out = vec![0f32; 100];
        decode(&sums, k, 3, &mut out);
        assert_eq!(
            all.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        for i in 0..100 {
            let r = (a[i] as f64 + b[i] as f64 + c[i] as f64) / 3.0;
            assert!(
                (out[i] as f64 - r).abs() <= 1e-6 * r.abs() + 1e-15,
                "{i}: {} vs {r}",
                out[i]
            );
        }
    }

    #[test]
    fn encode_one_matches_round() {
        let scale = pow2(20);
        for &g in &[
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            0.5e-6,
            1.5 / (1 << 20) as f32,
            -2.5 / (1 << 20) as f32,
            0.49999997,
            3.3e-7,
            -7.77e-7,
            123.456,
        ] {
            assert_eq!(
                encode_one(g, scale),
                (g as f64 * scale).round() as i64,
                "{g}"
            );
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
    fn encode_bits_matches_encode_one() {
        let mut s = 0x1234_5678u32;
        let mut specials = vec![
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
            0.5,
            -0.5,
            1.5,
            -2.5,
        ];
        specials.extend([f32::MAX, -f32::MAX, 1e-40, -3e-39]);
        for k in -160..=200 {
            let sc = pow2(k);
            let ok = |g: f32| (g.abs() as f64) * sc < 2f64.powi(62);
            for &g in &specials {
                if ok(g) {
                    assert_eq!(encode_bits(g, k), encode_one(g, sc), "g {g} k {k}");
                }
            }
            for _ in 0..3000 {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let g = f32::from_bits(s);
                if g.is_finite() && ok(g) {
                    assert_eq!(encode_bits(g, k), encode_one(g, sc), "g {g} k {k}");
                }
            }
        }
        // exact halves in the lowest kept bit
        for k in 0..30 {
            for m in 0..4096u32 {
                let g = m as f32 / (1u32 << 12) as f32 / pow2(k - 12) as f32;
                for g in [g, -g] {
                    assert_eq!(encode_bits(g, k), encode_one(g, pow2(k)), "g {g} k {k}");
                }
            }
        }
    }

    #[test]
    fn simd_paths_match_scalar() {
        let mut s = 7u32;
        let g: Vec<f32> = (0..10_007)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                f32::from_bits(s & 0xbfff_ffff) * 1e-3
            })
            .collect();
        let m = max_abs(&[&g]);
        let exact = g.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(m.max_abs, exact as f64);
        let k = choose_scale_exp(m.max_abs, 3).unwrap();
        let mut a = vec![5i64; g.len()];
        encode_sum(&[&g, &g], k, &mut a);
        let sc = pow2(k);
        for (i, &x) in g.iter().enumerate() {
            assert_eq!(a[i], 5 + 2 * encode_one(x, sc));
        }
        let mut b = vec![0i64; g.len()];
        let enc = Encoder::new(&[&g], k);
        enc.sum_range(&[&g], 0..g.len(), None, &mut b);
        for (i, &x) in g.iter().enumerate() {
            assert_eq!(b[i], encode_one(x, sc));
        }
        let mut c = vec![0i64; 100];
        enc.sum_range(&[&g, &g], 50..150, Some(&a[50..150]), &mut c);
        for (j, &x) in g[50..150].iter().enumerate() {
            assert_eq!(c[j], a[50 + j] + 2 * encode_one(x, sc));
        }
        let mut sums: Vec<i64> = b.iter().map(|v| v * 3).collect();
        sums.extend([
            i64::MAX,
            i64::MIN,
            -1,
            1 << 62,
            (1 << 53) + 1,
            -(1 << 53) - 3,
        ]);
        let mut out = vec![0f32; sums.len()];
        decode(&sums, k, 3, &mut out);
        for (i, &v) in sums.iter().enumerate() {
            assert_eq!(
                out[i].to_bits(),
                ((((v as f64) / sc) / 3.0) as f32).to_bits(),
                "{v}"
            );
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
