//! The training math of one rank, without networking: compute micro-batch gradients,
//! then apply an (externally reduced) mean gradient with clipping and AdamW.
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::config::ModelConfig;
use crate::model::{Gpt, Precision};
use crate::optim::{clip_factor, AdamW, AdamWConfig, AdamWState};
use crate::sampler::{assign, Sampler};
use crate::TrainError;
use std::ops::Range;
use std::sync::Arc;

/// Everything that defines a training run's math. Two runs with equal `TrainSpec`s and
/// corpora produce bit-identical parameters, whatever the world size.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainSpec {
    pub model: ModelConfig,
    pub seed: u64,
    pub steps: u64,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub val_fraction: f64,
    /// Validation micro-batches evaluated at the end (and at each eval).
    pub val_micro_batches: usize,
    pub optim: AdamWConfig,
    /// The arithmetic of forward and backward (absent in older specs: f32).
    #[serde(default)]
    pub precision: Precision,
}

/// Defaults shared by `phalanx train` and controller-run jobs, so that both paths have
/// one definition of the training math.
pub const DEFAULT_MICRO_BATCH: usize = 2;
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
pub const DEFAULT_VAL_MICRO_BATCHES: usize = 8;

impl TrainSpec {
    /// A spec with the default optimizer, split and validation settings.
    pub fn with_defaults(
        model: ModelConfig,
        seed: u64,
        steps: u64,
        global_batch: usize,
        micro_batch: usize,
    ) -> Self {
        Self {
            model,
            seed,
            steps,
            global_batch,
            micro_batch,
            val_fraction: DEFAULT_VAL_FRACTION,
            val_micro_batches: DEFAULT_VAL_MICRO_BATCHES,
            optim: AdamWConfig::for_steps(steps),
            precision: Precision::Fp32,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        self.model.validate()?;
        self.optim.validate()?;
        if self.steps == 0 {
            return Err(TrainError::Config("steps must be at least 1".into()));
        }
        Sampler::new(
            self.seed,
            self.model.ctx_len as usize,
            self.global_batch,
            self.micro_batch,
        )?;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.global_batch / self.micro_batch
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.global_batch as u64) * self.model.ctx_len as u64
    }
}

/// One shard in the [`Engine::shards_bytes`] format: its range, then its parameters, `m`
/// and `v`, little-endian.
fn write_shard(out: &mut Vec<u8>, range: &Range<usize>, parts: [&[f32]; 3]) {
    out.reserve(16 + 12 * range.len());
    out.extend_from_slice(&(range.start as u64).to_le_bytes());
    out.extend_from_slice(&(range.end as u64).to_le_bytes());
    for x in parts.into_iter().flatten() {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// A copy of the shards (own, then buddy) before an update: per shard its range, then the
/// parameters, `m` and `v` of that range.
struct Undo {
    step: u64,
    shards: Vec<KeptShard>,
}

/// (range, parameters, m, v) of one kept shard.
type KeptShard = (Range<usize>, Vec<f32>, Vec<f32>, Vec<f32>);

pub struct Engine {
    pub spec: TrainSpec,
    pub model: Gpt,
    pub sampler: Sampler,
    train: Vec<u8>,
    val: Vec<u8>,
    /// The master copy of the parameters, in layout order. Shared so that an
    /// asynchronous checkpoint takes it without a copy; write through
    /// [`Engine::params_mut`].
    pub params: Arc<Vec<f32>>,
    decay: Vec<bool>,
    /// This rank's optimizer shard (the whole vector when not sharded).
    pub opt: AdamWState,
    /// A replica of the previous rank's shard (ZeRO-1 with one buddy), when sharded.
    pub buddy: Option<AdamWState>,
    /// When sharded: the shards as they were before the last [`Engine::apply`] (its
    /// buffers are reused every step). A collective can complete on some ranks and fail on
    /// others, so a failure in a step's last reduction leaves some survivors one step
    /// ahead; with this they can still offer the step before.
    undo: Option<Undo>,
}

#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f32,
}

impl Engine {
    pub fn new(
        spec: TrainSpec,
        train: Vec<u8>,
        val: Vec<u8>,
        device: Device,
    ) -> Result<Self, TrainError> {
        spec.validate()?;
        let ctx = spec.model.ctx_len as usize;
        if train.len() <= ctx || val.len() <= ctx {
            return Err(TrainError::Corpus(format!(
                "train ({} bytes) and validation ({} bytes) must each exceed the context {ctx}",
                train.len(),
                val.len()
            )));
        }
        let mut model = Gpt::new(&spec.model, spec.seed, device)?;
        model.precision = spec.precision;
        let mut params = vec![0f32; model.layout.total];
        model.read_params(&mut params)?;
        let decay = model.layout.decay_mask();
        let opt = AdamWState::new(0..params.len());
        let params = Arc::new(params);
        let sampler = Sampler::new(spec.seed, ctx, spec.global_batch, spec.micro_batch)?;
        Ok(Self {
            spec,
            model,
            sampler,
            train,
            val,
            params,
            decay,
            opt,
            buddy: None,
            undo: None,
        })
    }

    /// Inputs and targets of training micro-batch `micro` of `step`.
    pub fn train_batch(&self, step: u64, micro: usize) -> Result<(Tensor, Tensor), TrainError> {
        let offsets = self.sampler.micro_offsets(step, micro, self.train.len());
        self.batch(&self.train, &offsets)
    }

    fn batch(&self, data: &[u8], offsets: &[usize]) -> Result<(Tensor, Tensor), TrainError> {
        let t = self.spec.model.ctx_len as usize;
        let mut x = Vec::with_capacity(offsets.len() * t);
        let mut y = Vec::with_capacity(offsets.len() * t);
        for &o in offsets {
            x.extend(data[o..o + t].iter().map(|&b| i64::from(b)));
            y.extend(data[o + 1..o + t + 1].iter().map(|&b| i64::from(b)));
        }
        let shape = [offsets.len() as i64, t as i64];
        let dev = self.model.device;
        Ok((
            Tensor::f_from_slice(&x)?.f_view(shape)?.f_to_device(dev)?,
            Tensor::f_from_slice(&y)?.f_view(shape)?.f_to_device(dev)?,
        ))
    }

    /// Forward and backward of micro-batch `micro` of `step`; writes its gradient (of the
    /// micro-batch's mean loss) into `grad` and returns the loss.
    pub fn micro_grad(&self, step: u64, micro: usize, grad: &mut [f32]) -> Result<f64, TrainError> {
        let (loss, grads) = self.micro_grad_tensors(step, micro)?;
        self.model.copy_grads(&grads, grad)?;
        Ok(loss)
    }

    /// Forward and backward of micro-batch `micro` of `step`: its loss and the gradient
    /// of each parameter (layout order) as autograd's own tensors, not copied anywhere.
    /// Same values as [`Engine::micro_grad`].
    pub fn micro_grad_tensors(
        &self,
        step: u64,
        micro: usize,
    ) -> Result<(f64, Vec<Tensor>), TrainError> {
        let (x, y) = self.train_batch(step, micro)?;
        let loss = self.model.loss(&x, &y)?;
        let v = loss.f_double_value(&[])?;
        if !v.is_finite() {
            return Err(TrainError::NonFinite {
                what: format!("loss of micro-batch {micro}"),
                step,
            });
        }
        let grads = self.model.grads_of(&loss)?;
        Ok((v, grads))
    }

    /// Loss of validation micro-batch `micro`, without gradients.
    pub fn val_loss(&self, micro: usize) -> Result<f64, TrainError> {
        let offsets = self.sampler.val_offsets(micro, self.val.len());
        let (x, y) = self.batch(&self.val, &offsets)?;
        let loss = tch::no_grad(|| self.model.loss(&x, &y))?;
        Ok(loss.f_double_value(&[])?)
    }

    /// Clips the mean gradient by global norm and runs AdamW over this rank's optimizer
    /// shards: its own range and, under sharding, its buddy's. Only the parameters of those
    /// ranges change; the caller gathers the rest from their owners and then calls
    /// [`Engine::sync_model`].
    pub fn apply(&mut self, mean_grad: &[f32]) -> Result<StepStats, TrainError> {
        let lr = self.spec.optim.lr_at(self.opt.step);
        let (grad_norm, clip) = clip_factor(mean_grad, self.spec.optim.grad_clip_norm);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "gradient norm".into(),
                step: self.opt.step,
            });
        }
        if self.buddy.is_some() {
            self.keep_undo();
        }
        let params = Arc::make_mut(&mut self.params);
        AdamW::update_range(
            &self.spec.optim,
            &mut self.opt,
            params,
            mean_grad,
            &self.decay,
            clip,
        );
        if let Some(b) = self.buddy.as_mut() {
            AdamW::update_range(&self.spec.optim, b, params, mean_grad, &self.decay, clip);
        }
        Ok(StepStats { grad_norm, lr })
    }

    /// The parameters for writing. Copies them first only if someone else (a checkpoint
    /// being staged) still holds a reference.
    pub fn params_mut(&mut self) -> &mut Vec<f32> {
        Arc::make_mut(&mut self.params)
    }

    /// Loads the flat parameters into the model's tensors.
    pub fn sync_model(&self) -> Result<(), TrainError> {
        self.model.write_params(&self.params)
    }

    /// Completed optimizer steps: the next step to train.
    pub fn step(&self) -> u64 {
        self.opt.step
    }

    /// ZeRO-1 ranges of rank `rank` of `world`: its own slice of the flat vector and, when
    /// `world > 1`, the slice of the rank before it, whose moments it keeps a replica of so
    /// that any single failure leaves every slice held by a survivor.
    pub fn shard_ranges(&self, world: usize, rank: usize) -> (Range<usize>, Option<Range<usize>>) {
        let n = self.params.len();
        let own = assign(n, world, rank);
        let buddy = (world > 1).then(|| assign(n, world, (rank + world - 1) % world));
        (own, buddy)
    }

    /// Sets this rank's optimizer shards (their moments come from the caller).
    pub fn set_shards(
        &mut self,
        own: AdamWState,
        buddy: Option<AdamWState>,
    ) -> Result<(), TrainError> {
        let n = self.params.len();
        for s in std::iter::once(&own).chain(buddy.as_ref()) {
            if s.range.end > n
                || s.m.len() != s.range.len()
                || s.v.len() != s.range.len()
                || s.step != own.step
            {
                return Err(TrainError::Config(format!(
                    "optimizer shard {:?} does not fit {n} parameters",
                    s.range
                )));
            }
        }
        self.opt = own;
        self.buddy = buddy;
        self.undo = None;
        Ok(())
    }

    /// Shards of `world`/`rank` with zero moments at the current step: the optimizer
    /// state of a run that has not stepped yet.
    pub fn zero_shards(&mut self, world: usize, rank: usize) -> Result<(), TrainError> {
        let step = self.opt.step;
        let (own, buddy) = self.shard_ranges(world, rank);
        let mk = |r: Range<usize>| AdamWState {
            m: Arc::new(vec![0.0; r.len()]),
            v: Arc::new(vec![0.0; r.len()]),
            range: r,
            step,
        };
        self.set_shards(mk(own), buddy.map(mk))
    }

    /// This rank's optimizer shards, serialised: per shard its range, then the parameters,
    /// `m` and `v` of that range. After [`Engine::apply`] these ranges hold the new step's
    /// values even if gathering the other ranges failed, so they are what a rank can vouch
    /// for when the group has to agree on a state.
    pub fn shards_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_shards(&mut out);
        out
    }

    /// The step of the shards kept before the last [`Engine::apply`] (see the `undo`
    /// field). None when not sharded or when the state was replaced since.
    pub fn undo_step(&self) -> Option<u64> {
        self.undo.as_ref().map(|u| u.step)
    }

    /// The shards kept before the last [`Engine::apply`], in the
    /// [`Engine::shards_bytes`] format.
    pub fn undo_shards_bytes(&self) -> Option<Vec<u8>> {
        let undo = self.undo.as_ref()?;
        let mut out = Vec::new();
        for (range, p, m, v) in &undo.shards {
            write_shard(&mut out, range, [p, m, v]);
        }
        Some(out)
    }

    /// Copies the shards into the `undo` buffers (reused: plain copies, no allocation
    /// after the first step).
    fn keep_undo(&mut self) {
        let mut undo = self.undo.take().unwrap_or(Undo {
            step: 0,
            shards: Vec::new(),
        });
        let shards: Vec<&AdamWState> = std::iter::once(&self.opt)
            .chain(self.buddy.as_ref())
            .collect();
        undo.shards.resize_with(shards.len(), Default::default);
        for (s, (range, p, m, v)) in shards.into_iter().zip(undo.shards.iter_mut()) {
            *range = s.range.clone();
            for (dst, src) in [
                (p, &self.params[s.range.clone()]),
                (m, &s.m[..]),
                (v, &s.v[..]),
            ] {
                dst.clear();
                dst.extend_from_slice(src);
            }
        }
        undo.step = self.opt.step;
        self.undo = Some(undo);
    }

    fn write_shards(&self, out: &mut Vec<u8>) {
        for s in std::iter::once(&self.opt).chain(self.buddy.as_ref()) {
            write_shard(out, &s.range, [&self.params[s.range.clone()], &s.m, &s.v]);
        }
    }

    /// Back to the seed's initial parameters at step 0 (the shards are set by the caller).
    pub fn reset_to_initial(&mut self) -> Result<(), TrainError> {
        self.params = Arc::new(crate::model::init_params(
            &self.spec.model,
            &self.model.layout,
            self.spec.seed,
        ));
        self.opt.step = 0;
        self.undo = None;
        self.sync_model()
    }

    /// Replaces parameters and step (from a checkpoint); the shards are set by the caller.
    pub fn load_params(&mut self, step: u64, params: Vec<f32>) -> Result<(), TrainError> {
        if params.len() != self.params.len() {
            return Err(TrainError::Config(format!(
                "checkpoint holds {} parameters, the model has {}",
                params.len(),
                self.params.len()
            )));
        }
        self.params = Arc::new(params);
        self.opt.step = step;
        self.undo = None;
        self.sync_model()
    }

    /// SHA-256 of the parameters' little-endian f32 bytes in name-sorted order.
    pub fn params_sha256(&self) -> String {
        params_sha256(&self.params)
    }
}

pub fn params_sha256(params: &[f32]) -> String {
    let mut h = Sha256::new();
    for p in params {
        h.update(p.to_le_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    fn spec(seed: u64, steps: u64) -> TrainSpec {
        TrainSpec {
            model: ModelConfig::named("tiny").unwrap(),
            seed,
            steps,
            global_batch: 4,
            micro_batch: 2,
            val_fraction: 0.1,
            val_micro_batches: 2,
            optim: AdamWConfig::for_steps(steps),
            precision: Precision::Fp32,
        }
    }

    fn text() -> Vec<u8> {
        "the quick brown fox jumps over the lazy dog. "
            .repeat(200)
            .into_bytes()
    }

    fn engine(seed: u64, steps: u64) -> Engine {
        tch::set_num_threads(1);
        let t = text();
        Engine::new(spec(seed, steps), t.clone(), t[..500].to_vec(), Device::Cpu).unwrap()
    }

    #[test]
    fn initialisation_depends_only_on_the_seed() {
        let (a, b, c) = (engine(1, 1), engine(1, 1), engine(2, 1));
        assert_eq!(a.params_sha256(), b.params_sha256());
        assert_ne!(a.params_sha256(), c.params_sha256());
        assert_eq!(a.params.len() as i64, a.spec.model.param_count());
        let names: Vec<&str> = a
            .model
            .layout
            .slots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names.first(), Some(&"h00.attn.c_attn.bias"), "{names:?}");
        assert!(names.contains(&"wte.weight") && names.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn micro_gradients_are_reproducible_and_loss_starts_near_uniform() {
        let e = engine(3, 1);
        let n = e.params.len();
        let (mut g1, mut g2) = (vec![0f32; n], vec![0f32; n]);
        let l1 = e.micro_grad(0, 1, &mut g1).unwrap();
        let l2 = e.micro_grad(0, 1, &mut g2).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!((l1 - 256f64.ln()).abs() < 0.3, "initial loss {l1}");
        assert!(g1.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn a_few_steps_reduce_the_loss() {
        let mut e = engine(4, 30);
        let n = e.params.len();
        let mut g = vec![0f32; n];
        let mut mean = vec![0f32; n];
        let mut losses = vec![];
        for step in 0..30 {
            mean.fill(0.0);
            let mut l = 0.0;
            for m in 0..2 {
                l += e.micro_grad(step, m, &mut g).unwrap() / 2.0;
                for (a, b) in mean.iter_mut().zip(&g) {
                    *a += b / 2.0;
                }
            }
            e.apply(&mean).unwrap();
            e.sync_model().unwrap();
            losses.push(l);
        }
        assert!(losses[29] < losses[0] - 1.0, "{losses:?}");
        assert!(e.val_loss(0).unwrap() < losses[0]);
    }

    #[test]
    fn loaded_parameters_reach_the_model() {
        let mut a = engine(5, 3);
        let n = a.params.len();
        let mut g = vec![0f32; n];
        a.micro_grad(0, 0, &mut g).unwrap();
        a.apply(&g).unwrap();
        let mut b = engine(6, 3);
        b.load_params(a.step(), a.params.to_vec()).unwrap();
        assert_eq!(b.step(), 1);
        assert_eq!(a.params_sha256(), b.params_sha256());
        let mut from_model = vec![0f32; n];
        b.model.read_params(&mut from_model).unwrap();
        assert_eq!(params_sha256(&from_model), a.params_sha256());
        assert!(b.load_params(1, vec![0.0; 3]).is_err());
        b.reset_to_initial().unwrap();
        assert_eq!(
            (b.step(), b.params_sha256()),
            (0, engine(6, 3).params_sha256())
        );
    }

    #[test]
    fn sharded_updates_with_a_buddy_match_the_whole_update() {
        let mut whole = engine(9, 3);
        let n = whole.params.len();
        let mut g = vec![0f32; n];
        whole.micro_grad(0, 0, &mut g).unwrap();
        let mut shards: Vec<Engine> = (0..3).map(|_| engine(9, 3)).collect();
        for (r, e) in shards.iter_mut().enumerate() {
            e.zero_shards(3, r).unwrap();
            let before = e.shards_bytes();
            e.apply(&g).unwrap();
            // The shards before the update are kept, at the step they held.
            assert_eq!((e.step(), e.undo_step()), (1, Some(0)));
            assert_eq!(e.undo_shards_bytes().unwrap(), before);
            assert_ne!(e.shards_bytes(), before);
        }
        whole.apply(&g).unwrap();
        assert_eq!(whole.undo_step(), None, "nothing is kept when not sharded");
        // Each rank's own range and its buddy's range hold the whole update's bits.
        for (r, e) in shards.iter().enumerate() {
            let (own, buddy) = e.shard_ranges(3, r);
            for range in std::iter::once(own).chain(buddy) {
                assert!(e.params[range.clone()]
                    .iter()
                    .zip(&whole.params[range])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
        // Replacing the state drops what was kept.
        let p = shards[2].params.to_vec();
        shards[2].load_params(1, p).unwrap();
        assert_eq!(shards[2].undo_step(), None);
        assert_eq!(
            shards[1].shards_bytes().len(),
            2 * 16
                + 12 * (shards[1].opt.range.len() + shards[1].buddy.as_ref().unwrap().range.len())
        );
    }
}
