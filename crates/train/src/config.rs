//! Named model configurations.
use serde::{Deserialize, Serialize};

use phalanx_proto::ModelPreset;

use crate::TrainError;

/// Byte-level tokens: one token per byte.
pub const VOCAB_SIZE: i64 = 256;

/// The shape of a GPT-style decoder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub vocab_size: i64,
    /// Context length in tokens (also the size of the learned position table).
    pub ctx_len: i64,
    pub d_model: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// Hidden width of the MLP (4 × d_model as in GPT-2).
    pub d_ff: i64,
}

impl ModelConfig {
    /// `tiny` ≈ 0.1M parameters (tests), `small` ≈ 1M, `base` ≈ 10M, and `gpt2-124m`, which
    /// has GPT-2 small's shape (12 × 768, 12 heads, 1024 context) over the byte vocabulary,
    /// so it holds ≈ 86M parameters rather than 124M (GPT-2's 50,257-token embedding
    /// accounts for the difference).
    pub fn named(name: &str) -> Result<Self, TrainError> {
        let preset = ModelPreset::parse(name).ok_or_else(|| {
            TrainError::Config(format!(
                "unknown model `{name}`; expected one of {}",
                ModelPreset::names()
            ))
        })?;
        Ok(Self::of(preset))
    }

    /// The shape of `preset`.
    pub fn of(preset: ModelPreset) -> Self {
        let (ctx_len, d_model, n_layer, n_head) = match preset {
            ModelPreset::Tiny => (64, 64, 2, 4),
            ModelPreset::Small => (128, 128, 4, 4),
            ModelPreset::Base => (256, 384, 6, 6),
            ModelPreset::Gpt2_124m => (1024, 768, 12, 12),
        };
        Self {
            name: preset.as_str().to_string(),
            vocab_size: VOCAB_SIZE,
            ctx_len,
            d_model,
            n_layer,
            n_head,
            d_ff: 4 * d_model,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, why: &str| Err(TrainError::Config(format!("model.{field}: {why}")));
        if self.vocab_size != VOCAB_SIZE {
            return bad("vocab_size", "must be 256 (byte-level tokens)");
        }
        if self.ctx_len < 2 {
            return bad("ctx_len", "must be at least 2");
        }
        if self.d_model < 1 || self.n_layer < 1 || self.n_head < 1 || self.d_ff < 1 {
            return bad("d_model/n_layer/n_head/d_ff", "must all be positive");
        }
        if self.d_model % self.n_head != 0 {
            return bad("n_head", "must divide d_model");
        }
        Ok(())
    }

    /// Parameter count, computed from the shapes (matches the built model).
    pub fn param_count(&self) -> i64 {
        let (d, f, v, t) = (self.d_model, self.d_ff, self.vocab_size, self.ctx_len);
        let per_layer = 2 * d // ln_1
            + 3 * d * d + 3 * d // c_attn
            + d * d + d // attn c_proj
            + 2 * d // ln_2
            + d * f + f // c_fc
            + f * d + d; // mlp c_proj
        v * d + t * d + self.n_layer * per_layer + 2 * d + v * d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_sizes_are_roughly_what_the_names_say() {
        let n = |m: &str| ModelConfig::named(m).unwrap().param_count();
        assert!((80_000..200_000).contains(&n("tiny")), "tiny {}", n("tiny"));
        assert!(
            (700_000..1_500_000).contains(&n("small")),
            "small {}",
            n("small")
        );
        assert!(
            (8_000_000..14_000_000).contains(&n("base")),
            "base {}",
            n("base")
        );
        assert!((80_000_000..130_000_000).contains(&n("gpt2-124m")));
    }

    #[test]
    fn unknown_model_names_the_choices() {
        let e = ModelConfig::named("huge").unwrap_err().to_string();
        assert!(e.contains("huge") && e.contains("tiny"), "{e}");
    }
}
