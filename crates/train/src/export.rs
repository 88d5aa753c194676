//! Trained parameters as a safetensors file, and back.
//!
//! One tensor per model parameter, named as the model names it (`wte.weight`,
//! `h00.attn.c_attn.weight`, ...), with its real shape, little-endian f32. The file's
//! `__metadata__` says what the tensors are: `format` (`phalanx-gpt`), `model` (a
//! configuration name of a [`phalanx_proto::ModelPreset`]), `seed`, `steps`, `param_count`,
//! `params_sha256` (the trainer's hash of the flat parameters, so a loaded file is checked
//! against it) and `numerics` (the numerics profile the parameters were computed under).
//!
//! Pure: no tch, no files. [`param_layout`] computes the model's parameter names and
//! shapes from its configuration alone (a test checks it against the built model).
use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::ModelConfig;
use crate::engine::params_sha256;
use crate::model::{Layout, ParamSlot};
use crate::TrainError;

/// The value of the `format` metadata key.
pub const FORMAT: &str = "phalanx-gpt";

/// What the file's metadata records besides the tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportMeta {
    pub model: String,
    pub seed: u64,
    /// Optimizer steps the parameters have been trained for.
    pub steps: u64,
    pub params_sha256: String,
    /// The numerics profile (`x86-64-avx2`, `native`).
    pub numerics: String,
}

/// A model read back from a safetensors file: its configuration, its flat parameters in
/// layout order, and the metadata.
#[derive(Clone, Debug)]
pub struct Weights {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    pub meta: ExportMeta,
}

/// The model's parameters (name, shape, offset) in name-sorted order, as
/// [`crate::model::Gpt::new`] lays them out, computed without building the model.
pub fn param_layout(cfg: &ModelConfig) -> Layout {
    let (d, f, v, t) = (cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.ctx_len);
    let mut named: Vec<(String, Vec<i64>)> = vec![
        ("wte.weight".into(), vec![v, d]),
        ("wpe.weight".into(), vec![t, d]),
        ("ln_f.weight".into(), vec![d]),
        ("ln_f.bias".into(), vec![d]),
        ("lm_head.weight".into(), vec![v, d]),
    ];
    for l in 0..cfg.n_layer {
        let p = format!("h{l:02}");
        for (leaf, shape) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![3 * d, d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![f, d]),
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![d, f]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            named.push((format!("{p}.{leaf}"), shape));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offset = 0;
    let slots = named
        .into_iter()
        .map(|(name, shape)| {
            let numel = shape.iter().product::<i64>() as usize;
            let s = ParamSlot {
                decay: shape.len() >= 2,
                name,
                shape,
                offset,
                numel,
            };
            offset += numel;
            s
        })
        .collect();
    Layout {
        slots,
        total: offset,
    }
}

/// The safetensors bytes of `params` (flat, in layout order) for model `cfg`.
pub fn to_safetensors(
    cfg: &ModelConfig,
    params: &[f32],
    meta: &ExportMeta,
) -> Result<Vec<u8>, TrainError> {
    cfg.validate()?;
    if meta.model != cfg.name {
        return Err(TrainError::Config(format!(
            "metadata names model `{}`, the configuration is `{}`",
            meta.model, cfg.name
        )));
    }
    let layout = param_layout(cfg);
    if params.len() != layout.total {
        return Err(TrainError::Config(format!(
            "{} parameters given, model `{}` has {}",
            params.len(),
            cfg.name,
            layout.total
        )));
    }
    let bytes: Vec<u8> = params.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(layout.slots.len());
    for s in &layout.slots {
        let shape = s.shape.iter().map(|&d| d as usize).collect();
        let data = &bytes[s.offset * 4..(s.offset + s.numel) * 4];
        let view = TensorView::new(Dtype::F32, shape, data)
            .map_err(|e| TrainError::Config(format!("tensor {}: {e:?}", s.name)))?;
        views.push((s.name.clone(), view));
    }
    let info: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("model", meta.model.clone()),
        ("seed", meta.seed.to_string()),
        ("steps", meta.steps.to_string()),
        ("param_count", layout.total.to_string()),
        ("params_sha256", meta.params_sha256.clone()),
        ("numerics", meta.numerics.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize(views, &Some(info))
        .map_err(|e| TrainError::Config(format!("serialising safetensors: {e:?}")))
}

fn bad(why: String) -> TrainError {
    TrainError::Config(why)
}

/// Parses and validates a phalanx safetensors file: the model must be known, every
/// parameter present with its shape and dtype F32, no other tensor, and the parameters
/// must hash to the recorded `params_sha256`. Errors name what is wrong.
pub fn from_safetensors(bytes: &[u8]) -> Result<Weights, TrainError> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {}", st_error(&e))))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {}", st_error(&e))))?;
    let empty = HashMap::new();
    let md = header.metadata().as_ref().unwrap_or(&empty);
    let get = |k: &str| -> Result<&String, TrainError> {
        md.get(k).ok_or_else(|| {
            bad(format!(
                "metadata has no `{k}` (not written by phalanx? keys present: {})",
                sorted_keys(md)
            ))
        })
    };
    let model = get("model")?;
    let cfg = ModelConfig::named(model).map_err(|e| {
        bad(format!(
            "metadata `model`: {}",
            e.to_string().trim_start_matches("invalid configuration: ")
        ))
    })?;
    let num = |k: &str| -> Result<u64, TrainError> {
        let v = get(k)?;
        v.parse()
            .map_err(|_| bad(format!("metadata `{k}` is {v:?}, not an integer")))
    };
    let seed = num("seed")?;
    let steps = num("steps")?;
    let numerics = md.get("numerics").cloned().unwrap_or_default();
    let recorded_sha = md.get("params_sha256").cloned();

    let layout = param_layout(&cfg);
    let mut params = vec![0f32; layout.total];
    let names = st.names();
    for s in &layout.slots {
        let t = st.tensor(&s.name).map_err(|_| {
            bad(format!(
                "missing tensor `{}` (model `{}` has {} parameter tensors)",
                s.name,
                cfg.name,
                layout.slots.len()
            ))
        })?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor `{}` has dtype {:?}, expected F32",
                s.name,
                t.dtype()
            )));
        }
        let want: Vec<usize> = s.shape.iter().map(|&d| d as usize).collect();
        if t.shape() != want.as_slice() {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}, model `{}` expects {:?}",
                s.name,
                t.shape(),
                cfg.name,
                want
            )));
        }
        let data = t.data();
        if data.len() != s.numel * 4 {
            return Err(bad(format!(
                "tensor `{}` holds {} bytes, expected {}",
                s.name,
                data.len(),
                s.numel * 4
            )));
        }
        for (dst, c) in params[s.offset..s.offset + s.numel]
            .iter_mut()
            .zip(data.chunks_exact(4))
        {
            *dst = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    if names.len() != layout.slots.len() {
        let mut extra: Vec<&str> = names
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !layout.slots.iter().any(|s| s.name == *n))
            .collect();
        extra.sort_unstable();
        return Err(bad(format!(
            "unexpected tensor(s) for model `{}`: {}",
            cfg.name,
            extra.join(", ")
        )));
    }
    let sha = params_sha256(&params);
    if let Some(r) = recorded_sha {
        if r != sha {
            return Err(bad(format!(
                "the parameters hash to {sha}, the metadata records params_sha256 {r}: the file is damaged"
            )));
        }
    }
    Ok(Weights {
        meta: ExportMeta {
            model: cfg.name.clone(),
            seed,
            steps,
            params_sha256: sha,
            numerics,
        },
        cfg,
        params,
    })
}

fn sorted_keys(m: &HashMap<String, String>) -> String {
    let mut k: Vec<&str> = m.keys().map(|s| s.as_str()).collect();
    k.sort_unstable();
    if k.is_empty() {
        "none".into()
    } else {
        k.join(", ")
    }
}

fn st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "shorter than its 8-byte header length".into(),
        E::InvalidHeaderLength | E::HeaderTooLarge => {
            "the header length does not fit the file".into()
        }
        E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization => {
            "the header is not safetensors JSON".into()
        }
        E::MetadataIncompleteBuffer => {
            "the tensors' data does not match the file's length (truncated?)".into()
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(cfg: &ModelConfig, params: &[f32]) -> ExportMeta {
        ExportMeta {
            model: cfg.name.clone(),
            seed: 7,
            steps: 30,
            params_sha256: params_sha256(params),
            numerics: "x86-64-avx2".into(),
        }
    }

    fn tiny() -> (ModelConfig, Vec<f32>) {
        let cfg = ModelConfig::named("tiny").unwrap();
        let n = cfg.param_count() as usize;
        let params = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        (cfg, params)
    }

    #[test]
    fn layout_matches_the_built_model_for_every_configuration() {
        for preset in phalanx_proto::ModelPreset::ALL {
            let name = &preset.as_str();
            let cfg = ModelConfig::of(preset);
            cfg.validate().unwrap();
            let l = param_layout(&cfg);
            assert_eq!(l.total as i64, cfg.param_count(), "{name}");
            if *name == "tiny" || *name == "small" {
                let g = crate::model::Gpt::new(&cfg, 1, tch::Device::Cpu).unwrap();
                let a: Vec<_> = l
                    .slots
                    .iter()
                    .map(|s| (&s.name, &s.shape, s.offset))
                    .collect();
                let b: Vec<_> = g
                    .layout
                    .slots
                    .iter()
                    .map(|s| (&s.name, &s.shape, s.offset))
                    .collect();
                assert_eq!(a, b, "{name}");
            }
        }
    }

    #[test]
    fn round_trip_keeps_names_shapes_bits_and_metadata() {
        let (cfg, params) = tiny();
        let m = meta(&cfg, &params);
        let bytes = to_safetensors(&cfg, &params, &m).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let wte = st.tensor("wte.weight").unwrap();
        assert_eq!(
            (wte.dtype(), wte.shape()),
            (Dtype::F32, &[256usize, 64][..])
        );
        assert_eq!(
            st.tensor("h01.mlp.c_fc.weight").unwrap().shape(),
            &[256, 64]
        );
        let w = from_safetensors(&bytes).unwrap();
        assert_eq!(w.cfg, cfg);
        assert_eq!(w.meta, m);
        assert!(w
            .params
            .iter()
            .zip(&params)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// Builds a file from (name, dtype, shape, bytes) tensors and metadata, bypassing
    /// our writer, as another tool could.
    fn raw(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, md: &[(&str, &str)]) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let info = md
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize(views, &Some(info)).unwrap()
    }

    fn tensors_of(cfg: &ModelConfig, params: &[f32]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        param_layout(cfg)
            .slots
            .iter()
            .map(|s| {
                let b = params[s.offset..s.offset + s.numel]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                (
                    s.name.clone(),
                    Dtype::F32,
                    s.shape.iter().map(|&d| d as usize).collect(),
                    b,
                )
            })
            .collect()
    }

    fn err(bytes: &[u8]) -> String {
        from_safetensors(bytes).unwrap_err().to_string()
    }

    #[test]
    fn damaged_or_foreign_files_are_clear_errors() {
        let (cfg, params) = tiny();
        let md = [("model", "tiny"), ("seed", "7"), ("steps", "30")];
        let good = tensors_of(&cfg, &params);
        assert!(from_safetensors(&raw(good.clone(), &md)).is_ok());

        let mut t = good.clone();
        t.retain(|x| x.0 != "ln_f.bias");
        let e = err(&raw(t, &md));
        assert!(e.contains("missing tensor `ln_f.bias`"), "{e}");

        let mut t = good.clone();
        let i = t.iter().position(|x| x.0 == "wpe.weight").unwrap();
        t[i].2 = vec![32, 128];
        let e = err(&raw(t, &md));
        assert!(
            e.contains("`wpe.weight` has shape [32, 128]") && e.contains("[64, 64]"),
            "{e}"
        );

        let mut t = good.clone();
        let i = t.iter().position(|x| x.0 == "ln_f.weight").unwrap();
        t[i].1 = Dtype::F16;
        let half = t[i].3.len() / 2;
        t[i].3.truncate(half);
        let e = err(&raw(t, &md));
        assert!(
            e.contains("`ln_f.weight` has dtype F16, expected F32"),
            "{e}"
        );

        let mut t = good.clone();
        t.push(("extra.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
        let e = err(&raw(t, &md));
        assert!(
            e.contains("unexpected tensor(s)") && e.contains("extra.weight"),
            "{e}"
        );

        let e = err(&raw(
            good.clone(),
            &[("model", "huge"), ("seed", "1"), ("steps", "1")],
        ));
        assert!(
            e.contains("unknown model `huge`") && e.contains("tiny"),
            "{e}"
        );

        let e = err(&raw(good.clone(), &[("seed", "1")]));
        assert!(e.contains("no `model`"), "{e}");

        let e = err(&raw(
            good.clone(),
            &[("model", "tiny"), ("seed", "x"), ("steps", "1")],
        ));
        assert!(e.contains("`seed`"), "{e}");

        let e = err(&raw(
            good,
            &[
                ("model", "tiny"),
                ("seed", "1"),
                ("steps", "1"),
                ("params_sha256", "00"),
            ],
        ));
        assert!(e.contains("damaged"), "{e}");

        let bytes = to_safetensors(&cfg, &params, &meta(&cfg, &params)).unwrap();
        let e = err(&bytes[..bytes.len() - 10]);
        assert!(e.contains("not a valid safetensors file"), "{e}");
        assert!(err(b"hello").contains("not a valid safetensors file"));
        assert!(err(b"").contains("not a valid safetensors file"));
    }

    #[test]
    fn writer_refuses_a_mismatched_parameter_vector() {
        let (cfg, params) = tiny();
        let e = to_safetensors(&cfg, &params[1..], &meta(&cfg, &params))
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameters given"), "{e}");
    }
}
