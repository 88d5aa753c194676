//! Text generation from a trained model: byte-level tokens, greedy or seeded sampling.
//!
//! Deterministic: greedy decoding (temperature 0) takes the most likely byte (the lowest
//! one on a tie); sampling draws from `softmax(logits / temperature)`, computed in f64 in
//! Rust, with a ChaCha8 stream seeded from `seed` alone. The same weights, prompt and
//! options give the same text (on any machine, under one numerics profile).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::model::Gpt;
use crate::sampler::hash4;
use crate::TrainError;

/// Most tokens one call generates.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    /// New tokens (bytes) to generate.
    pub tokens: usize,
    /// 0: greedy. Otherwise the softmax temperature, finite and positive.
    pub temperature: f64,
    /// Seed of the sampling stream (unused when greedy).
    pub seed: u64,
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(TrainError::Config(format!(
                "temperature {} must be 0 (greedy) or a positive finite number",
                self.temperature
            )));
        }
        if self.tokens > MAX_NEW_TOKENS {
            return Err(TrainError::Config(format!(
                "{} tokens requested, at most {MAX_NEW_TOKENS}",
                self.tokens
            )));
        }
        Ok(())
    }
}

/// The index chosen from `logits` (one per vocabulary entry) by `opts`, with `rng` for
/// sampling.
pub fn choose(logits: &[f32], temperature: f64, rng: &mut ChaCha8Rng) -> Result<usize, TrainError> {
    if logits.is_empty() || logits.iter().any(|x| !x.is_finite()) {
        return Err(TrainError::NonFinite {
            what: "logits".into(),
            step: 0,
        });
    }
    if temperature == 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return Ok(best);
    }
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| ((f64::from(x) - max) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, &p) in w.iter().enumerate() {
        if u < p {
            return Ok(i);
        }
        u -= p;
    }
    // Rounding left u at or above the last weight: the last non-zero entry.
    Ok(w.iter().rposition(|&p| p > 0.0).unwrap_or(0))
}

/// Generates `opts.tokens` tokens after `prompt` (token ids 0..vocab) and returns them
/// (the prompt excluded). The model sees at most its context length of trailing tokens.
pub fn generate(
    model: &Gpt,
    prompt: &[i64],
    opts: &GenerateOptions,
) -> Result<Vec<i64>, TrainError> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(TrainError::Config("the prompt is empty".into()));
    }
    let v = model.cfg.vocab_size;
    if let Some(&t) = prompt.iter().find(|&&t| !(0..v).contains(&t)) {
        return Err(TrainError::Config(format!(
            "prompt token {t} is outside the vocabulary 0..{v}"
        )));
    }
    let ctx = model.cfg.ctx_len as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(hash4(opts.seed, 0x5a4d_504c, 0, 0));
    let mut seq: Vec<i64> = prompt.to_vec();
    let mut out = Vec::with_capacity(opts.tokens);
    let mut logits = vec![0f32; v as usize];
    for _ in 0..opts.tokens {
        let window = &seq[seq.len().saturating_sub(ctx)..];
        let idx = Tensor::f_from_slice(window)?
            .f_view([1, window.len() as i64])?
            .f_to_device(model.device)?;
        let last = tch::no_grad(|| -> Result<Tensor, TrainError> {
            Ok(model
                .forward(&idx)?
                .f_get(0)?
                .f_get(window.len() as i64 - 1)?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?)
        })?;
        last.f_copy_data(&mut logits, v as usize)?;
        let next = choose(&logits, opts.temperature, &mut rng)? as i64;
        seq.push(next);
        out.push(next);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn greedy_takes_the_first_maximum_and_sampling_follows_the_seed() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(choose(&[0.0, 3.0, 1.0, 3.0], 0.0, &mut rng).unwrap(), 1);
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..64)
                .map(|_| choose(&[0.0, 0.5, 1.0, 0.2], 1.0, &mut r).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert!(draw(3).iter().any(|&i| i != 2), "sampling is not greedy");
        // A very low temperature is greedy in effect.
        let mut r = ChaCha8Rng::seed_from_u64(9);
        assert!((0..50).all(|_| choose(&[0.0, 5.0, 1.0], 1e-3, &mut r).unwrap() == 1));
        assert!(choose(&[0.0, f32::NAN], 1.0, &mut r).is_err());
    }

    #[test]
    fn generation_is_deterministic_and_bounded_by_the_context() {
        tch::set_num_threads(1);
        let cfg = ModelConfig::named("tiny").unwrap();
        let m = Gpt::new(&cfg, 5, Device::Cpu).unwrap();
        let prompt = crate::data::tokenizer::encode("int main");
        let g = |t, s| {
            generate(
                &m,
                &prompt,
                &GenerateOptions {
                    tokens: 80, // beyond the 64-token context
                    temperature: t,
                    seed: s,
                },
            )
            .unwrap()
        };
        let a = g(0.0, 1);
        assert_eq!(a.len(), 80);
        assert_eq!(a, g(0.0, 2), "greedy ignores the seed");
        assert!(a.iter().all(|t| (0..256).contains(t)));
        assert_eq!(g(1.0, 1), g(1.0, 1));
        assert_ne!(g(1.0, 1), g(1.0, 2));
        let opts = GenerateOptions {
            tokens: 1,
            temperature: 0.0,
            seed: 0,
        };
        assert!(generate(&m, &[], &opts).is_err());
        assert!(generate(&m, &[300], &opts).is_err());
        let bad = GenerateOptions {
            temperature: -1.0,
            ..opts
        };
        assert!(generate(&m, &prompt, &bad)
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
