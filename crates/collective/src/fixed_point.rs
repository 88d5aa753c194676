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

/// [`encode_one`] as two exact f64 halves, `(hi, lo)` with `round(g * 2^k) = hi * 2^32 +
/// lo`, `hi` an integer and `0 <= lo < 2^32` an integer, using only correctly rounded
/// float operations (so it vectorizes with AVX2, which has no float→i64 conversion):
///
/// - `x = g * scale` is exact (an f32 widened to f64, times a power of two).
/// - `trunc(x + copysign(0.5, x))` is `x` rounded half away from zero: the sum is exact
///   whenever `|x| < 2^52` (`x` has at most 24 significant bits, and a sum that would
///   need more than 53 is one where `|x| < 0.5` and it stays below 1, or `|x| >= 2^23`
///   and `x` is already an integer); for `|x| >= 2^52` `x` is an even integer and adding
///   a half rounds back to it.
/// - `hi = floor(y * 2^-32)` is exact (a power-of-two scale, then an integer part), and
///   `lo = y - hi * 2^32` is an integer in `[0, 2^32)`, which f64 holds exactly, so the
///   subtraction is exact.
///
/// Sums of up to 2^19 such halves stay exact in f64 (`|hi| <= 2^30` and `lo < 2^32`
/// when `|x| < 2^62`).
#[inline(always)]
fn split_round(g: f32, scale: f64) -> (f64, f64) {
    let x = g as f64 * scale;
    let half = f64::from_bits((x.to_bits() & (1 << 63)) | 0.5f64.to_bits());
    let y = (x + half).trunc();
    let hi = (y * TWO_M32).floor();
    (hi, y - hi * TWO_32)
}

const TWO_32: f64 = 4294967296.0;
const TWO_M32: f64 = 1.0 / 4294967296.0;

/// Elements whose f64 halves are summed at a time (2 × 4 KiB, stays in L1).
const BLOCK: usize = 512;

/// Micro-batches summed into one pair of f64 halves before they are folded into i64:
/// their sums stay exact and below 2^51 (see [`split_round`]).
const MICRO_PER_FOLD: usize = 1 << 16;

/// `h[j] += hi, l[j] += lo` of `split_round(g[j], scale)`.
#[inline(always)]
fn accumulate_kernel(g: &[f32], scale: f64, h: &mut [f64], l: &mut [f64]) {
    for ((hh, ll), &x) in h.iter_mut().zip(l.iter_mut()).zip(g) {
        let (hi, lo) = split_round(x, scale);
        *hh += hi;
        *ll += lo;
    }
}

/// The integer `v` (|v| < 2^51) as an i64: adding 1.5 * 2^52 puts it in the low bits of
/// the mantissa of a number whose exponent is fixed.
#[inline(always)]
fn small_int(v: f64) -> i64 {
    const MAGIC: f64 = 6755399441055744.0;
    ((v + MAGIC).to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64)
}

/// Where a block's encoded sums go.
#[derive(Debug, Clone, Copy)]
enum Dest<'a> {
    /// `out[j] += sum`
    Add,
    /// `out[j] = sum`
    Assign,
    /// `out[j] = base[j] + sum`
    From(&'a [i64]),
}

/// The exact i64 `h * 2^32 + l` (wrapping, though it never wraps for sums of values in
/// range).
#[inline(always)]
fn join(h: f64, l: f64) -> i64 {
    (small_int(h) << 32).wrapping_add(small_int(l))
}

/// Folds a block's f64 halves into `out` as `dest` says.
#[inline(always)]
fn fold_kernel(h: &[f64], l: &[f64], dest: Dest<'_>, out: &mut [i64]) {
    let sums = h.iter().zip(l).map(|(&h, &l)| join(h, l));
    match dest {
        Dest::Add => out
            .iter_mut()
            .zip(sums)
            .for_each(|(o, s)| *o = o.wrapping_add(s)),
        Dest::Assign => out.iter_mut().zip(sums).for_each(|(o, s)| *o = s),
        Dest::From(b) => {
            for ((o, s), &b) in out.iter_mut().zip(sums).zip(b) {
                *o = b.wrapping_add(s);
            }
        }
    }
}

/// How the kernels turn an exact sum into the mean: `(sum / 2^k / M) as f32`, with each
/// division by a power of two done as a multiplication by its reciprocal. Both give the
/// correctly rounded value of the same real quotient (`2^-k` and `1/M` are exact), so
/// the bits are those of the divisions, at a fraction of their cost.
#[derive(Debug, Clone, Copy)]
struct Decoder {
    /// `2^-k`
    inv_scale: f64,
    by_m: Quotient,
}

#[derive(Debug, Clone, Copy)]
enum Quotient {
    /// `M` is a power of two: multiply by `1/M`.
    Multiply(f64),
    /// Divide by `M`.
    Divide(f64),
}

impl Decoder {
    fn new(k: i32, total_micro_batches: usize) -> Self {
        let m = total_micro_batches.max(1);
        Decoder {
            inv_scale: 1.0 / pow2(k),
            by_m: if m.is_power_of_two() {
                Quotient::Multiply(1.0 / m as f64)
            } else {
                Quotient::Divide(m as f64)
            },
        }
    }

    /// `out[j] = the mean of the sum sums[j]` (given as f64, correctly rounded).
    #[inline(always)]
    fn each(self, sums: impl Iterator<Item = f64>, out: &mut [f32]) {
        let inv = self.inv_scale;
        match self.by_m {
            Quotient::Multiply(r) => {
                for (o, x) in out.iter_mut().zip(sums) {
                    *o = ((x * inv) * r) as f32;
                }
            }
            Quotient::Divide(m) => {
                for (o, x) in out.iter_mut().zip(sums) {
                    *o = ((x * inv) / m) as f32;
                }
            }
        }
    }
}

/// The mean from a block's f64 halves: `h[j] * 2^32 + l[j]` is one correctly rounded
/// addition of the sum's two exact parts, the f64 that `i64_to_f64` gives for the i64
/// sum, so the bits are [`decode`]'s.
#[inline(always)]
fn decode_halves_kernel(h: &[f64], l: &[f64], d: Decoder, out: &mut [f32]) {
    d.each(h.iter().zip(l).map(|(&h, &l)| h * TWO_32 + l), out)
}

multiversion!(fn accumulate_simd(g: &[f32], scale: f64, h: &mut [f64], l: &mut [f64]) = accumulate_kernel);
multiversion!(fn fold_simd(h: &[f64], l: &[f64], dest: Dest<'_>, out: &mut [i64]) = fold_kernel);
multiversion!(fn decode_halves_simd(h: &[f64], l: &[f64], d: Decoder, out: &mut [f32]) = decode_halves_kernel);
multiversion!(fn decode_simd(sums: &[i64], d: Decoder, out: &mut [f32]) = decode_kernel);

/// Runs `each(start, h, l)` for every block of `range`, with `h`/`l` holding the sums of
/// the halves of `micro_grads[..][start..start + len]` (at most [`MICRO_PER_FOLD`]
/// micro-batches at a time: `first` says whether this is the first group of a block).
fn for_each_block(
    micro_grads: &[&[f32]],
    range: std::ops::Range<usize>,
    scale: f64,
    mut each: impl FnMut(usize, bool, &[f64], &[f64]),
) {
    let mut h = [0f64; BLOCK];
    let mut l = [0f64; BLOCK];
    let mut start = range.start;
    while start < range.end {
        let end = (start + BLOCK).min(range.end);
        let (h, l) = (&mut h[..end - start], &mut l[..end - start]);
        let mut groups = micro_grads.chunks(MICRO_PER_FOLD);
        let mut first = true;
        loop {
            let group = groups.next().unwrap_or(&[]);
            h.fill(0.0);
            l.fill(0.0);
            for g in group {
                accumulate_simd(&g[start..end], scale, h, l);
            }
            each(start - range.start, first, h, l);
            first = false;
            if groups.len() == 0 {
                break;
            }
        }
        start = end;
    }
}

/// Whether the exact encode is valid for every value of `g` at exponent `k`
/// (all finite and `|g * 2^k| < 2^62`); otherwise use [`encode_one`], which
/// saturates.
fn fast_path_ok(g: &[f32], k: i32) -> bool {
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
/// have `out.len()` elements.
pub fn encode_sum(micro_grads: &[&[f32]], k: i32, out: &mut [i64]) {
    let n = out.len();
    Encoder::new(micro_grads, k).sum_into(micro_grads, 0..n, Dest::Add, out);
}

/// The deterministic mean of `micro_grads` (all of `out.len()` elements), straight to
/// f32: `(sum of round(g * 2^k)) / 2^k / total_micro_batches`, the same bits as
/// [`encode_sum`] then [`decode`], without the i64 vector. `k` must come from
/// [`choose_scale_exp`] of a max |g| that covers these values (all finite), which keeps
/// every sum exact.
pub fn mean_of(micro_grads: &[&[f32]], k: i32, total_micro_batches: usize, out: &mut [f32]) {
    if micro_grads.len() > MICRO_PER_FOLD {
        // more micro-batches than the f64 halves hold exactly: go through i64
        let mut sums = vec![0i64; out.len()];
        encode_sum(micro_grads, k, &mut sums);
        return decode(&sums, k, total_micro_batches, out);
    }
    let d = Decoder::new(k, total_micro_batches);
    for_each_block(micro_grads, 0..out.len(), pow2(k), |at, _, h, l| {
        decode_halves_simd(h, l, d, &mut out[at..at + h.len()]);
    });
}

/// Encodes micro-gradients at a fixed exponent, checking once up front
/// whether the fast exact path is valid for all of them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Encoder {
    k: i32,
    fast: bool,
}

impl Encoder {
    pub(crate) fn new(micro_grads: &[&[f32]], k: i32) -> Self {
        Encoder {
            k,
            fast: micro_grads.iter().all(|g| fast_path_ok(g, k)),
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
        let dest = base.map_or(Dest::Assign, Dest::From);
        self.sum_into(micro_grads, range, dest, out)
    }

    fn sum_into(
        &self,
        micro_grads: &[&[f32]],
        range: std::ops::Range<usize>,
        dest: Dest<'_>,
        out: &mut [i64],
    ) {
        if !self.fast {
            match dest {
                Dest::Add => {}
                Dest::Assign => out.fill(0),
                Dest::From(b) => out.copy_from_slice(&b[..out.len()]),
            }
            let scale = pow2(self.k);
            for g in micro_grads {
                for (o, &x) in out.iter_mut().zip(&g[range.clone()]) {
                    *o = o.wrapping_add(encode_one(x, scale));
                }
            }
            return;
        }
        for_each_block(micro_grads, range, pow2(self.k), |at, first, h, l| {
            let n = h.len();
            let block_dest = match dest {
                _ if !first => Dest::Add,
                Dest::From(b) => Dest::From(&b[at..at + n]),
                other => other,
            };
            fold_simd(h, l, block_dest, &mut out[at..at + n]);
        });
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
fn decode_kernel(sums: &[i64], d: Decoder, out: &mut [f32]) {
    d.each(sums.iter().map(|&s| i64_to_f64(s)), out)
}

/// Decode summed integers into the mean: `(sum / 2^k / M) as f32`.
pub fn decode(sums: &[i64], k: i32, total_micro_batches: usize, out: &mut [f32]) {
    decode_simd(sums, Decoder::new(k, total_micro_batches), out)
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

    /// One value through the fast exact path.
    fn encode_fast(g: f32, k: i32) -> i64 {
        let (h, l) = split_round(g, pow2(k));
        join(h, l)
    }

    #[test]
    fn the_fast_encode_matches_encode_one() {
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
                    assert_eq!(encode_fast(g, k), encode_one(g, sc), "g {g} k {k}");
                }
            }
            for _ in 0..3000 {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let g = f32::from_bits(s);
                if g.is_finite() && ok(g) {
                    assert_eq!(encode_fast(g, k), encode_one(g, sc), "g {g} k {k}");
                }
            }
        }
        // exact halves in the lowest kept bit
        for k in 0..30 {
            for m in 0..4096u32 {
                let g = m as f32 / (1u32 << 12) as f32 / pow2(k - 12) as f32;
                for g in [g, -g] {
                    assert_eq!(encode_fast(g, k), encode_one(g, pow2(k)), "g {g} k {k}");
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
        // the divisions, whether M is a power of two (done as multiplications) or not,
        // at exponents whose quotients are subnormal in f64 or in f32 too
        for (k, m) in [
            (k, 3),
            (k, 4),
            (k, 1),
            (1000, 4),
            (1000, 6),
            (150, 8),
            (-60, 2),
        ] {
            decode(&sums, k, m, &mut out);
            for (i, &v) in sums.iter().enumerate() {
                assert_eq!(
                    out[i].to_bits(),
                    ((((v as f64) / pow2(k)) / m as f64) as f32).to_bits(),
                    "{v} k {k} m {m}"
                );
            }
        }
    }

    /// Scalar reference: the exact i64 sum of `encode_one`, then `decode`'s formula.
    fn reference_mean(micro: &[&[f32]], k: i32, total: usize) -> Vec<u32> {
        let sc = pow2(k);
        (0..micro[0].len())
            .map(|j| {
                let s = micro.iter().map(|g| encode_one(g[j], sc)).sum::<i64>();
                ((((s as f64) / sc) / total as f64) as f32).to_bits()
            })
            .collect()
    }

    #[test]
    fn the_mean_straight_to_f32_matches_the_integer_sum() {
        let mut s = 99u32;
        let mut next = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            s
        };
        for (m, len) in [
            (1usize, 7usize),
            (3, 1029),
            (4, 2 * BLOCK),
            (5, 3 * BLOCK + 11),
        ] {
            // values over 40 binades, signs mixed, zeros and subnormals, and one value at
            // the max so that the sums use the whole range below 2^61
            let data: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    (0..len)
                        .map(|i| {
                            let r = next();
                            match i % 97 {
                                0 => 0.0,
                                1 => f32::from_bits(r & 0x807f_ffff),
                                2 => 3.75,
                                _ => f32::from_bits((r & 0x807f_ffff) | ((100 + r % 41) << 23)),
                            }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
            let k = choose_scale_exp(max_abs(&refs).max_abs, m).unwrap();
            for k in [k, k - 17] {
                let mut out = vec![0f32; len];
                mean_of(&refs, k, m, &mut out);
                let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits, reference_mean(&refs, k, m), "m {m} len {len} k {k}");
                let mut sums = vec![0i64; len];
                encode_sum(&refs, k, &mut sums);
                let mut via_i64 = vec![0f32; len];
                decode(&sums, k, m, &mut via_i64);
                assert_eq!(
                    via_i64.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    bits
                );
            }
        }
    }

    #[test]
    fn more_micro_batches_than_one_fold_stay_exact() {
        let m = MICRO_PER_FOLD + 3;
        let data: Vec<[f32; 5]> = (0..m)
            .map(|i| {
                let x = (i as f32 * 0.618).sin();
                [x, -x * 1e-3, 1.0, -0.999_999_9, x * 1e-30]
            })
            .collect();
        let refs: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
        let k = choose_scale_exp(max_abs(&refs).max_abs, m).unwrap();
        let mut out = vec![0f32; 5];
        mean_of(&refs, k, m, &mut out);
        let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, reference_mean(&refs, k, m));
        let mut sums = vec![7i64; 5];
        Encoder::new(&refs, k).sum_range(&refs, 0..5, None, &mut sums);
        let sc = pow2(k);
        for (j, &got) in sums.iter().enumerate() {
            let want: i64 = refs.iter().map(|g| encode_one(g[j], sc)).sum();
            assert_eq!(got, want, "element {j}");
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
