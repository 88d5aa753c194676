//! A committed sharded checkpoint as a safetensors file (`phalanx job export`).
//!
//! The checkpoint's shards are read, checksummed and reassembled by
//! [`phalanx_checkpoint::load_range`]; the parameters then go through the same writer as
//! `phalanx train --save` ([`phalanx_train::export::to_safetensors`]).
use std::path::Path;

use phalanx_train::export::{param_layout, to_safetensors, ExportMeta};
use phalanx_train::ModelConfig;

use crate::WorkerError;

/// Reads checkpoint `step` under `root` (the job's checkpoint directory) of a job that
/// trains `model`, and returns the safetensors bytes and their metadata. The checkpoint
/// must hold exactly the model's parameters; when its manifest records a layout, names
/// and shapes must match too.
pub fn checkpoint_to_safetensors(
    root: &Path,
    step: u64,
    model: &str,
    numerics: &str,
) -> Result<(Vec<u8>, ExportMeta), WorkerError> {
    let cfg = ModelConfig::named(model)?;
    let manifest = phalanx_checkpoint::read_manifest(root, step).map_err(|e| {
        WorkerError::Checkpoint(format!(
            "reading checkpoint step {step} in {}: {e}",
            root.display()
        ))
    })?;
    if !manifest.model.is_empty() && manifest.model != cfg.name {
        return Err(WorkerError::Checkpoint(format!(
            "checkpoint step {step} in {} holds model `{}`, not `{model}`",
            root.display(),
            manifest.model
        )));
    }
    let loaded = phalanx_checkpoint::load_range(root, step, 0..0).map_err(|e| {
        WorkerError::Checkpoint(format!(
            "loading checkpoint step {step} from {}: {e}",
            root.display()
        ))
    })?;
    let layout = param_layout(&cfg);
    if loaded.params.len() != layout.total {
        return Err(WorkerError::Checkpoint(format!(
            "checkpoint step {step} in {} holds {} parameters, model `{model}` has {}",
            root.display(),
            loaded.params.len(),
            layout.total
        )));
    }
    if !loaded.layout.is_empty() {
        let ours: Vec<(&str, &[i64], usize)> = layout
            .slots
            .iter()
            .map(|s| (s.name.as_str(), s.shape.as_slice(), s.offset))
            .collect();
        let theirs: Vec<(&str, &[i64], usize)> = loaded
            .layout
            .iter()
            .map(|(n, s, o)| (n.as_str(), s.as_slice(), *o))
            .collect();
        if ours != theirs {
            return Err(WorkerError::Checkpoint(format!(
                "checkpoint step {step} in {} has another parameter layout than model `{model}`",
                root.display()
            )));
        }
    }
    let meta = ExportMeta {
        model: cfg.name.clone(),
        seed: loaded.seed,
        steps: loaded.opt_step,
        params_sha256: phalanx_train::engine::params_sha256(&loaded.params),
        numerics: numerics.to_string(),
    };
    let bytes = to_safetensors(&cfg, &loaded.params, &meta)?;
    Ok((bytes, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_checkpoint::{commit_manifest, shard_range, write_shard, ManifestSpec, RankState};
    use phalanx_train::export::from_safetensors;

    /// A checkpoint of `params` written by `world` ranks, as the agents write one.
    fn write_checkpoint(root: &Path, step: u64, seed: u64, params: &[f32], world: usize) {
        let n = params.len();
        let mut shards = Vec::new();
        for rank in 0..world {
            let range = shard_range(n, world, rank);
            let zeros = vec![0f32; range.len()];
            let st = RankState {
                step,
                seed,
                params,
                range,
                m: &zeros,
                v: &zeros,
                opt_step: step,
                extra: &[],
            };
            shards.push(write_shard(root, world, rank, &st, None).unwrap());
        }
        let spec = ManifestSpec {
            model: "tiny".into(),
            step,
            world,
            param_count: n,
            seed,
            params_sha256: Some(phalanx_train::engine::params_sha256(params)),
            ..Default::default()
        };
        commit_manifest(root, &spec, shards).unwrap();
    }

    #[test]
    fn a_sharded_checkpoint_exports_to_the_same_parameters() {
        let d = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::named("tiny").unwrap();
        let n = cfg.param_count() as usize;
        let params: Vec<f32> = (0..n).map(|i| (i as f32 * 0.011).cos()).collect();
        write_checkpoint(d.path(), 40, 7, &params, 3);
        let (bytes, meta) = checkpoint_to_safetensors(d.path(), 40, "tiny", "x86-64-avx2").unwrap();
        assert_eq!((meta.seed, meta.steps), (7, 40));
        let w = from_safetensors(&bytes).unwrap();
        assert_eq!(w.meta, meta);
        assert!(w
            .params
            .iter()
            .zip(&params)
            .all(|(a, b)| a.to_bits() == b.to_bits()));

        let e = checkpoint_to_safetensors(d.path(), 40, "small", "x86-64-avx2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds model `tiny`, not `small`"), "{e}");
        let e = checkpoint_to_safetensors(d.path(), 41, "tiny", "x86-64-avx2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("step 41"), "{e}");
        let e = checkpoint_to_safetensors(d.path(), 40, "huge", "x86-64-avx2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown model"), "{e}");
    }
}
