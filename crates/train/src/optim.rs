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

/// The clip factor for a gradient: `min(1, clip / norm)`. The norm is summed in f64 in
/// index order, so every rank holding the same gradient gets the same factor.
pub fn clip_factor(grad: &[f32], clip_norm: f32) -> (f64, f32) {
    let norm = grad
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    if clip_norm > 0.0 && norm > f64::from(clip_norm) {
        (norm, (f64::from(clip_norm) / (norm + 1e-6)) as f32)
    } else {
        (norm, 1.0)
    }
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

    #[test]
    fn bad_config_names_the_field() {
        let cfg = AdamWConfig {
            lr_max: -1.0,
            ..AdamWConfig::for_steps(10)
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("lr_max"));
    }
}
