//! AdamW over flat f32 buffers, with warm-up + cosine learning rate and global-norm
//! gradient clipping.
//!
//! The state is plain memory (`m`, `v`, `step`) so it can be checkpointed and sharded:
//! [`AdamW::update_range`] updates any contiguous slice of the flat parameter vector, and
//! since AdamW is element-wise, updating the whole vector at once or shard by shard gives
//! the same bits. The arithmetic is plain Rust f32 (no fused multiply-add: rustc never
//! contracts float operations), so the result is identical on every machine.
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::TrainError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr_max: f32,
    pub lr_min: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip_norm: f32,
}

impl AdamWConfig {
    pub fn for_steps(total_steps: u64) -> Self {
        Self {
            lr_max: 3e-3,
            lr_min: 3e-4,
            warmup_steps: (total_steps / 10).max(1),
            total_steps,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip_norm: 1.0,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |f: &str, why: &str| Err(TrainError::Config(format!("optimizer.{f}: {why}")));
        if !(self.lr_max.is_finite() && self.lr_max > 0.0) {
            return bad("lr_max", "must be a positive number");
        }
        if !(self.lr_min.is_finite() && (0.0..=self.lr_max).contains(&self.lr_min)) {
            return bad("lr_min", "must be in [0, lr_max]");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1/beta2", "must be in [0, 1)");
        }
        // Written so that NaN fails too.
        let ok = self.eps > 0.0 && self.weight_decay >= 0.0 && self.grad_clip_norm >= 0.0;
        if !ok {
            return bad(
                "eps/weight_decay/grad_clip_norm",
                "must be non-negative (eps positive)",
            );
        }
        Ok(())
    }

    /// Linear warm-up to `lr_max` over `warmup_steps`, then cosine decay to `lr_min` at
    /// `total_steps`. `step` counts from 0.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr_max * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        (self.lr_min as f64 + (self.lr_max - self.lr_min) as f64 * cos) as f32
    }
}

/// The clip factor for a gradient: `min(1, clip / norm)`, as the f64 sum of squares in
/// index order gives it, so every rank holding the same gradient gets the same factor.
///
/// That sequential sum is latency-bound (one dependent addition per value), so the norm
/// is summed in 16 interleaved lanes instead, and the sequential sum runs only when it
/// could decide otherwise. Both sums of `n` exact squares are within `γ_n = n·u/(1−n·u)`
/// (`u = 2^-53`) of the exact sum; `factor` below is monotone in the sum, so when it
/// gives the same f32 at both ends of an interval around the lane sum that covers both
/// errors (`4(n+8)u`, twice what they need), the sequential sum, inside that interval,
/// gives it too. The norm returned is the lane sum's.
pub fn clip_factor(grad: &[f32], clip_norm: f32) -> (f64, f32) {
    let clip = f64::from(clip_norm);
    let factor = |sum_sq: f64| {
        let norm = sum_sq.sqrt();
        if clip_norm > 0.0 && norm > clip {
            (clip / (norm + 1e-6)) as f32
        } else {
            1.0
        }
    };
    let sum = sum_squares_lanes(grad);
    let delta = 2.0 * (grad.len() as f64 + 8.0) * f64::EPSILON;
    let (lo, hi) = (factor(sum * (1.0 + delta)), factor(sum * (1.0 - delta)));
    let f = if lo == hi || !sum.is_finite() {
        lo
    } else {
        factor(sum_squares_sequential(grad))
    };
    (sum.sqrt(), f)
}

/// `sum of g^2` in f64, in index order.
fn sum_squares_sequential(grad: &[f32]) -> f64 {
    grad.iter().map(|&g| f64::from(g) * f64::from(g)).sum()
}

/// `sum of g^2` in f64 over 16 lanes (lane `i % 16`), then the lanes in a fixed tree:
/// a function of the values alone, like the sequential sum, and vectorized.
#[inline(always)]
fn sum_squares_kernel(grad: &[f32]) -> f64 {
    const LANES: usize = 16;
    let mut acc = [0f64; LANES];
    let mut chunks = grad.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &g) in acc.iter_mut().zip(c) {
            *a += f64::from(g) * f64::from(g);
        }
    }
    for (a, &g) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f64::from(g) * f64::from(g);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// [`sum_squares_kernel`] compiled for AVX2 when the CPU has it (the same bits: only
/// correctly rounded additions and multiplications, in the same order).
fn sum_squares_lanes(grad: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(grad: &[f32]) -> f64 {
            sum_squares_kernel(grad)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(grad) };
        }
    }
    sum_squares_kernel(grad)
}

/// AdamW moments for a slice `[range]` of the flat parameter vector.
///
/// The moments are shared (`Arc`) so that an asynchronous checkpoint can take them
/// without a copy on the training thread; [`AdamW::update_range`] writes through
/// `Arc::make_mut`, which copies only if a checkpoint still holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    pub range: Range<usize>,
    pub m: Arc<Vec<f32>>,
    pub v: Arc<Vec<f32>>,
    /// Completed optimizer steps.
    pub step: u64,
}

impl AdamWState {
    pub fn new(range: Range<usize>) -> Self {
        let n = range.len();
        Self {
            range,
            m: Arc::new(vec![0.0; n]),
            v: Arc::new(vec![0.0; n]),
            step: 0,
        }
    }
}

pub struct AdamW;

impl AdamW {
    /// One step over `state.range`. `params` and `grads` are the full flat vectors;
    /// `decay[i]` says whether flat element `i` gets weight decay (matrices yes; biases,
    /// norms no). `clip` multiplies the gradient first.
    ///
    /// The range is processed in runs of equal `decay`, so the inner loop is branch-free
    /// and vectorises; vector `sqrt` and division are correctly rounded like the scalar
    /// ones, so the bits do not depend on the vector width.
    pub fn update_range(
        cfg: &AdamWConfig,
        state: &mut AdamWState,
        params: &mut [f32],
        grads: &[f32],
        decay: &[bool],
        clip: f32,
    ) {
        let lr = cfg.lr_at(state.step);
        state.step += 1;
        let t = state.step as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2 = 1.0 - cfg.beta2.powi(t);
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        let lr_wd = lr * cfg.weight_decay;
        let start = state.range.start;
        let (sm, sv) = (Arc::make_mut(&mut state.m), Arc::make_mut(&mut state.v));
        let mut k = 0;
        let n = state.range.len();
        while k < n {
            let d = decay[start + k];
            let mut end = k + 1;
            while end < n && decay[start + end] == d {
                end += 1;
            }
            let (p, g) = (
                &mut params[start + k..start + end],
                &grads[start + k..start + end],
            );
            let (m, v) = (&mut sm[k..end], &mut sv[k..end]);
            let c = Consts {
                clip,
                b1,
                b2,
                bc1,
                bc2,
                eps,
                lr,
                lr_wd: if d { lr_wd } else { 0.0 },
                decay: d,
            };
            update_run(p, g, m, v, c);
            k = end;
        }
    }
}

/// The per-run constants of an AdamW step.
#[derive(Clone, Copy)]
struct Consts {
    clip: f32,
    b1: f32,
    b2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    lr: f32,
    lr_wd: f32,
    decay: bool,
}

/// AdamW over one run of equal `decay`. Plain f32 operations, each correctly rounded
/// (Rust never fuses a multiply and an add), so the bits do not depend on the vector
/// width the compiler picks.
#[inline(always)]
fn update_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Consts) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * c.clip;
        let mm = c.b1 * *m + (1.0 - c.b1) * g;
        let vv = c.b2 * *v + (1.0 - c.b2) * g * g;
        *m = mm;
        *v = vv;
        let mut x = *p;
        if c.decay {
            x -= c.lr_wd * x;
        }
        x -= c.lr * (mm / c.bc1) / ((vv / c.bc2).sqrt() + c.eps);
        *p = x;
    }
}

/// [`update_kernel`] compiled for AVX2 (8 lanes of division and square root instead of
/// SSE2's 4) when the CPU has it, else the baseline build; the same bits either way
/// (tested).
fn update_run(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Consts) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Consts) {
            update_kernel(p, g, m, v, c)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(p, g, m, v, c) };
        }
    }
    update_kernel(p, g, m, v, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook AdamW in f64.
    fn reference(cfg: &AdamWConfig, p: &mut [f64], grads: &[Vec<f64>], decay: &[bool]) {
        let n = p.len();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for (s, g) in grads.iter().enumerate() {
            let lr = cfg.lr_at(s as u64) as f64;
            let t = (s + 1) as i32;
            let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                if decay[i] {
                    p[i] -= lr * cfg.weight_decay as f64 * p[i];
                }
                p[i] -= lr * mh / (vh.sqrt() + cfg.eps as f64);
            }
        }
    }

    fn grads(n: usize, steps: usize) -> Vec<Vec<f64>> {
        (0..steps)
            .map(|s| {
                (0..n)
                    .map(|i| ((i * 7 + s * 13) % 11) as f64 / 11.0 - 0.45)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let cfg = AdamWConfig::for_steps(20);
        let n = 37;
        let decay: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let g = grads(n, 20);
        let mut p64: Vec<f64> = (0..n).map(|i| (i as f64 - 18.0) / 20.0).collect();
        let mut p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
        reference(&cfg, &mut p64, &g, &decay);
        let mut st = AdamWState::new(0..n);
        for gs in &g {
            let g32: Vec<f32> = gs.iter().map(|&x| x as f32).collect();
            AdamW::update_range(&cfg, &mut st, &mut p32, &g32, &decay, 1.0);
        }
        for i in 0..n {
            assert!(
                (p32[i] as f64 - p64[i]).abs() < 1e-5,
                "i={i}: {} vs {}",
                p32[i],
                p64[i]
            );
        }
        assert_eq!(st.step, 20);
    }

    #[test]
    fn sharded_update_is_bit_identical_to_whole() {
        let cfg = AdamWConfig::for_steps(5);
        let n = 50;
        let g = grads(n, 5);
        let decay: Vec<bool> = (0..n).map(|i| i % 7 < 4).collect();
        let mut whole: Vec<f32> = (0..n).map(|i| i as f32 / 50.0).collect();
        let mut sharded = whole.clone();
        let mut st = AdamWState::new(0..n);
        let mut shards = [
            AdamWState::new(0..17),
            AdamWState::new(17..33),
            AdamWState::new(33..50),
        ];
        for gs in &g {
            let g32: Vec<f32> = gs.iter().map(|&x| x as f32).collect();
            AdamW::update_range(&cfg, &mut st, &mut whole, &g32, &decay, 0.5);
            for s in shards.iter_mut() {
                AdamW::update_range(&cfg, s, &mut sharded, &g32, &decay, 0.5);
            }
        }
        assert_eq!(
            whole.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            sharded.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_avx2_kernel_computes_the_baseline_bits() {
        let n = 1003;
        let c = Consts {
            clip: 0.7,
            b1: 0.9,
            b2: 0.95,
            bc1: 0.19,
            bc2: 0.0975,
            eps: 1e-8,
            lr: 3e-3,
            lr_wd: 3e-4,
            decay: true,
        };
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let start: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 1e-3).collect();
        let (mut p1, mut m1, mut v1) = (start.clone(), vec![1e-4f32; n], vec![1e-6f32; n]);
        let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
        update_run(&mut p1, &g, &mut m1, &mut v1, c);
        update_kernel(&mut p2, &g, &mut m2, &mut v2, c);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p1), bits(&p2));
        assert_eq!(bits(&m1), bits(&m2));
        assert_eq!(bits(&v1), bits(&v2));
        assert_ne!(bits(&p1), bits(&start));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let cfg = AdamWConfig {
            warmup_steps: 10,
            total_steps: 100,
            ..AdamWConfig::for_steps(100)
        };
        assert!((cfg.lr_at(0) - cfg.lr_max / 10.0).abs() < 1e-9);
        assert!((cfg.lr_at(9) - cfg.lr_max).abs() < 1e-9);
        assert!(cfg.lr_at(50) < cfg.lr_max && cfg.lr_at(50) > cfg.lr_min);
        assert!((cfg.lr_at(100) - cfg.lr_min).abs() < 1e-7);
        assert!((cfg.lr_at(1000) - cfg.lr_min).abs() < 1e-7);
    }

    #[test]
    fn clipping_scales_to_the_clip_norm() {
        let g = [3.0f32, 4.0];
        let (norm, f) = clip_factor(&g, 1.0);
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((f - 0.2).abs() < 1e-6);
        assert_eq!(clip_factor(&g, 10.0).1, 1.0);
        assert_eq!(clip_factor(&g, 0.0).1, 1.0);
    }

    /// The factor the sequential sum gives, as `clip_factor` did before the lanes.
    fn sequential_factor(g: &[f32], clip_norm: f32) -> f32 {
        let norm = sum_squares_sequential(g).sqrt();
        if clip_norm > 0.0 && norm > f64::from(clip_norm) {
            (f64::from(clip_norm) / (norm + 1e-6)) as f32
        } else {
            1.0
        }
    }

    #[test]
    fn the_lane_sum_gives_the_sequential_sums_clip_factor() {
        let mut s = 5u32;
        let mut fell_back = 0;
        for n in [1usize, 15, 16, 17, 1000, 100_003] {
            let g: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    f32::from_bits((s & 0x807f_ffff) | ((110 + s % 20) << 23))
                })
                .collect();
            let seq = sum_squares_sequential(&g);
            let lanes = sum_squares_lanes(&g);
            assert!(
                (lanes - seq).abs() <= 2.0 * n as f64 * f64::EPSILON * seq,
                "n {n}"
            );
            // clip norms around the norm itself: below, at, above, and within an ulp
            let norm = seq.sqrt();
            let mut clips = vec![0.0f32, (norm * 0.5) as f32, (norm * 2.0) as f32];
            let c = norm as f32;
            clips.extend([
                c,
                f32::from_bits(c.to_bits() - 1),
                f32::from_bits(c.to_bits() + 1),
            ]);
            for clip in clips {
                let (_, f) = clip_factor(&g, clip);
                assert_eq!(
                    f.to_bits(),
                    sequential_factor(&g, clip).to_bits(),
                    "n {n} clip {clip}"
                );
            }
            // a clip norm whose factor's f32 rounding is decided by the last bits of the sum
            for i in 0..200 {
                let clip = (norm * (0.5 + i as f64 * 1e-3)) as f32;
                let (_, f) = clip_factor(&g, clip);
                assert_eq!(f.to_bits(), sequential_factor(&g, clip).to_bits());
                let d = 2.0 * (n as f64 + 8.0) * f64::EPSILON;
                let lanes_f = |x: f64| {
                    let nn = x.sqrt();
                    (f64::from(clip) / (nn + 1e-6)) as f32
                };
                if lanes_f(lanes * (1.0 + d)) != lanes_f(lanes * (1.0 - d)) {
                    fell_back += 1;
                }
            }
        }
        // the fallback is rare: the interval is far narrower than an f32 ulp
        assert!(fell_back < 20, "{fell_back}");
        assert_eq!(clip_factor(&[f32::INFINITY], 1.0).0, f64::INFINITY);
    }

    #[test]
    fn bad_config_names_the_field() {
        let cfg = AdamWConfig {
            lr_max: -1.0,
            ..AdamWConfig::for_steps(10)
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("lr_max"));
    }
}
