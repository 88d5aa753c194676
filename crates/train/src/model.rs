//! A GPT-style decoder over tch tensors.
//!
//! Token and learned position embeddings, pre-LayerNorm blocks with causal multi-head
//! attention (`scaled_dot_product_attention`) and a GELU MLP, a final LayerNorm and an
//! untied LM head. No dropout: training is a pure function of the seed and the data.
//!
//! Parameters are created in a `VarStore` (so a bare tch loop can drive the same model
//! in benchmarks) and listed in name-sorted order; that order defines the flat layout
//! used by the optimizer, the reduction, checkpoints and `params_sha256`.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{nn, Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::sampler::hash4;
use crate::TrainError;
pub use phalanx_proto::Precision;

/// Where each parameter sits in the flat f32 vector.
#[derive(Clone, Debug)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub numel: usize,
    /// Weight decay applies to matrices and embeddings, not to biases and norms.
    pub decay: bool,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub slots: Vec<ParamSlot>,
    pub total: usize,
}

impl Layout {
    /// A per-element decay mask (one byte per parameter).
    pub fn decay_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.total];
        for s in &self.slots {
            m[s.offset..s.offset + s.numel].fill(s.decay);
        }
        m
    }
}

struct Block {
    ln1_w: Tensor,
    ln1_b: Tensor,
    attn_w: Tensor,
    attn_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    fc_w: Tensor,
    fc_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
}

pub struct Gpt {
    pub cfg: ModelConfig,
    pub vs: nn::VarStore,
    pub device: Device,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    lnf_w: Tensor,
    lnf_b: Tensor,
    head: Tensor,
    /// Parameters in name-sorted order, matching `layout.slots`.
    params: Vec<Tensor>,
    pub layout: Layout,
    /// The arithmetic of forward and backward. The parameters stay f32 either way (they
    /// are the master weights); under bf16 each matrix product and the attention take
    /// bf16 copies of their operands, as autocast does, so the gradients come out f32.
    pub precision: Precision,
    /// Pinned host memory for the parameter upload to a CUDA device.
    upload: std::sync::Mutex<Option<Tensor>>,
}

impl Gpt {
    /// Builds the model with parameters initialised from `seed` alone (GPT-2's scheme:
    /// N(0, 0.02), residual projections N(0, 0.02/√(2L)), zero biases, unit norms),
    /// drawn in name-sorted order from a ChaCha8 stream, so the same seed gives the same
    /// bits on any device and any torch build.
    pub fn new(cfg: &ModelConfig, seed: u64, device: Device) -> Result<Self, TrainError> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (d, f, v, t) = (cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.ctx_len);
        let z = nn::Init::Const(0.0);
        let wte = var(&root, "wte.weight", &[v, d], z)?;
        let wpe = var(&root, "wpe.weight", &[t, d], z)?;
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layer {
            let p = root.sub(format!("h{l:02}"));
            blocks.push(Block {
                ln1_w: var(&p, "ln_1.weight", &[d], z)?,
                ln1_b: var(&p, "ln_1.bias", &[d], z)?,
                attn_w: var(&p, "attn.c_attn.weight", &[3 * d, d], z)?,
                attn_b: var(&p, "attn.c_attn.bias", &[3 * d], z)?,
                proj_w: var(&p, "attn.c_proj.weight", &[d, d], z)?,
                proj_b: var(&p, "attn.c_proj.bias", &[d], z)?,
                ln2_w: var(&p, "ln_2.weight", &[d], z)?,
                ln2_b: var(&p, "ln_2.bias", &[d], z)?,
                fc_w: var(&p, "mlp.c_fc.weight", &[f, d], z)?,
                fc_b: var(&p, "mlp.c_fc.bias", &[f], z)?,
                fc2_w: var(&p, "mlp.c_proj.weight", &[d, f], z)?,
                fc2_b: var(&p, "mlp.c_proj.bias", &[d], z)?,
            });
        }
        let lnf_w = var(&root, "ln_f.weight", &[d], z)?;
        let lnf_b = var(&root, "ln_f.bias", &[d], z)?;
        let head = var(&root, "lm_head.weight", &[v, d], z)?;

        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut slots = Vec::with_capacity(named.len());
        let mut offset = 0;
        for (name, t) in &named {
            let shape = t.size();
            let numel = shape.iter().product::<i64>() as usize;
            slots.push(ParamSlot {
                name: name.clone(),
                shape: shape.clone(),
                offset,
                numel,
                decay: shape.len() >= 2,
            });
            offset += numel;
        }
        let layout = Layout {
            slots,
            total: offset,
        };
        let params = named.into_iter().map(|(_, t)| t).collect();
        let model = Self {
            cfg: cfg.clone(),
            vs,
            device,
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
            head,
            params,
            layout,
            precision: Precision::Fp32,
            upload: std::sync::Mutex::new(None),
        };
        let init = init_params(cfg, &model.layout, seed);
        model.write_params(&init)?;
        Ok(model)
    }

    /// The parameter tensors in layout order (for a plain tch optimizer in benchmarks).
    pub fn param_tensors(&self) -> &[Tensor] {
        &self.params
    }

    /// Logits `[b, t, vocab]` for token ids `idx` `[b, t]` (f32 in either precision).
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor, TrainError> {
        if self.precision == Precision::Bf16 {
            return self.forward_bf16(idx);
        }
        let (b, t) = idx.size2()?;
        if t > self.cfg.ctx_len {
            return Err(TrainError::Config(format!(
                "sequence length {t} exceeds the model's context {}",
                self.cfg.ctx_len
            )));
        }
        let (d, nh) = (self.cfg.d_model, self.cfg.n_head);
        let pos = Tensor::f_arange(t, (Kind::Int64, self.device))?;
        let mut x = Tensor::f_embedding(&self.wte, idx, -1, false, false)?
            .f_add(&Tensor::f_embedding(&self.wpe, &pos, -1, false, false)?)?;
        for blk in &self.blocks {
            let h = x.f_layer_norm([d], Some(&blk.ln1_w), Some(&blk.ln1_b), 1e-5, false)?;
            let qkv = h
                .f_linear(&blk.attn_w, Some(&blk.attn_b))?
                .f_view([b, t, 3, nh, d / nh])?
                .f_permute([2, 0, 3, 1, 4])?;
            let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
            let y = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_contiguous()?
            .f_view([b, t, d])?;
            x = x.f_add(&y.f_linear(&blk.proj_w, Some(&blk.proj_b))?)?;
            let h = x.f_layer_norm([d], Some(&blk.ln2_w), Some(&blk.ln2_b), 1e-5, false)?;
            let h = h
                .f_linear(&blk.fc_w, Some(&blk.fc_b))?
                .f_gelu("none")?
                .f_linear(&blk.fc2_w, Some(&blk.fc2_b))?;
            x = x.f_add(&h)?;
        }
        let x = x.f_layer_norm([d], Some(&self.lnf_w), Some(&self.lnf_b), 1e-5, false)?;
        Ok(x.f_linear(&self.head, None::<Tensor>)?)
    }

    /// [`Gpt::forward`] with bf16 matrix products and attention: LayerNorm runs on the f32
    /// residual stream, its output is rounded to bf16 for the next product, each
    /// product's result goes back to f32 before it joins the residual, and the logits
    /// are f32 for the loss (the mixed-precision recipe of autocast and of large runs).
    fn forward_bf16(&self, idx: &Tensor) -> Result<Tensor, TrainError> {
        let (b, t) = idx.size2()?;
        if t > self.cfg.ctx_len {
            return Err(TrainError::Config(format!(
                "sequence length {t} exceeds the model's context {}",
                self.cfg.ctx_len
            )));
        }
        let (d, nh) = (self.cfg.d_model, self.cfg.n_head);
        let h16 = Kind::BFloat16;
        let lin = |x: &Tensor, w: &Tensor, bias: Option<&Tensor>| -> Result<Tensor, TrainError> {
            let bias = bias.map(|b| b.f_to_kind(h16)).transpose()?;
            Ok(x.f_to_kind(h16)?
                .f_linear(&w.f_to_kind(h16)?, bias.as_ref())?)
        };
        let pos = Tensor::f_arange(t, (Kind::Int64, self.device))?;
        let mut x = Tensor::f_embedding(&self.wte, idx, -1, false, false)?
            .f_add(&Tensor::f_embedding(&self.wpe, &pos, -1, false, false)?)?;
        for blk in &self.blocks {
            let h = x.f_layer_norm([d], Some(&blk.ln1_w), Some(&blk.ln1_b), 1e-5, false)?;
            let qkv = lin(&h, &blk.attn_w, Some(&blk.attn_b))?
                .f_view([b, t, 3, nh, d / nh])?
                .f_permute([2, 0, 3, 1, 4])?;
            let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
            let y = Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                true,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_contiguous()?
            .f_view([b, t, d])?;
            x = x.f_add(&lin(&y, &blk.proj_w, Some(&blk.proj_b))?.f_to_kind(Kind::Float)?)?;
            let h = x.f_layer_norm([d], Some(&blk.ln2_w), Some(&blk.ln2_b), 1e-5, false)?;
            let h = lin(&h, &blk.fc_w, Some(&blk.fc_b))?.f_gelu("none")?;
            x = x.f_add(&lin(&h, &blk.fc2_w, Some(&blk.fc2_b))?.f_to_kind(Kind::Float)?)?;
        }
        let x = x.f_layer_norm([d], Some(&self.lnf_w), Some(&self.lnf_b), 1e-5, false)?;
        Ok(lin(&x, &self.head, None)?.f_to_kind(Kind::Float)?)
    }

    /// Mean cross-entropy of predicting `targets` from `idx` (both `[b, t]`).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor, TrainError> {
        let logits = self.forward(idx)?;
        let v = self.cfg.vocab_size;
        Ok(logits.f_view([-1, v])?.f_cross_entropy_loss(
            &targets.f_view([-1])?,
            None::<Tensor>,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?)
    }

    /// Copies the flat parameter vector into the model's tensors.
    pub fn write_params(&self, flat: &[f32]) -> Result<(), TrainError> {
        check_len("parameter", flat.len(), self.layout.total)?;
        if self.device.is_cuda() {
            let mut staging = self.upload.lock().unwrap_or_else(|p| p.into_inner());
            return crate::cuda_io::params_to_device(
                flat,
                &self.params,
                &self.layout,
                self.device,
                &mut staging,
            );
        }
        tch::no_grad(|| -> Result<(), TrainError> {
            for (slot, t) in self.layout.slots.iter().zip(&self.params) {
                let src = &flat[slot.offset..slot.offset + slot.numel];
                if let Some(dst) = cpu_f32_mut(t, slot.numel) {
                    dst.copy_from_slice(src);
                    continue;
                }
                let src = Tensor::f_from_slice(src)?
                    .f_view(slot.shape.as_slice())?
                    .f_to_device(self.device)?;
                let mut t = t.shallow_clone();
                t.f_copy_(&src)?;
            }
            Ok(())
        })
    }

    /// Copies the model's parameters into `flat`.
    pub fn read_params(&self, flat: &mut [f32]) -> Result<(), TrainError> {
        check_len("parameter", flat.len(), self.layout.total)?;
        for (slot, t) in self.layout.slots.iter().zip(&self.params) {
            t.f_to_device(Device::Cpu)?
                .f_copy_data(&mut flat[slot.offset..slot.offset + slot.numel], slot.numel)?;
        }
        Ok(())
    }

    /// The gradients of `loss` with respect to the parameters, in layout order, as the
    /// tensors autograd computed: nothing is accumulated into or zeroed in `.grad` (an
    /// accumulate-then-zero costs two passes over the parameters per micro-batch). The
    /// values are those `.grad` would receive; a parameter without a gradient gets an
    /// undefined tensor. Frees the graph.
    pub fn grads_of(&self, loss: &Tensor) -> Result<Vec<Tensor>, TrainError> {
        Ok(Tensor::f_run_backward(&[loss], &self.params, false, false)?)
    }

    /// Copies per-parameter gradients (from [`Gpt::grads_of`]) into the flat vector; an
    /// undefined one contributes zeros.
    pub fn copy_grads(&self, grads: &[Tensor], flat: &mut [f32]) -> Result<(), TrainError> {
        check_len("gradient", flat.len(), self.layout.total)?;
        check_len("gradient tensor", grads.len(), self.layout.slots.len())?;
        for (slot, g) in self.layout.slots.iter().zip(grads) {
            let dst = &mut flat[slot.offset..slot.offset + slot.numel];
            if !g.defined() {
                dst.fill(0.0);
            } else if let Some(src) = cpu_f32(g, slot.numel) {
                dst.copy_from_slice(src);
            } else {
                g.f_to_kind(Kind::Float)?
                    .f_to_device(Device::Cpu)?
                    .f_copy_data(dst, slot.numel)?;
            }
        }
        Ok(())
    }
}

/// Creates a variable at a dotted path (`attn.c_attn.weight`), one sub-path per segment.
fn var(base: &nn::Path, dotted: &str, shape: &[i64], init: nn::Init) -> Result<Tensor, TrainError> {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let leaf = parts.pop().unwrap_or(dotted);
    let Some((first, rest)) = parts.split_first() else {
        return Ok(base.f_var(leaf, shape, init)?);
    };
    let path = rest.iter().fold(base.sub(*first), |p, s| p.sub(*s));
    Ok(path.f_var(leaf, shape, init)?)
}

/// The storage of a contiguous f32 CPU tensor as a slice, so that parameters are written
/// with one memcpy instead of a temporary tensor and a copy. `None` for other tensors
/// (CUDA, other layouts), which take the general path.
// A `Tensor` is a handle: writing its storage through `&Tensor` is how tch works (its own
// in-place ops take `&Tensor` too).
#[allow(clippy::mut_from_ref)]
fn cpu_f32_mut(t: &Tensor, numel: usize) -> Option<&mut [f32]> {
    let ok = t.device() == Device::Cpu
        && t.kind() == Kind::Float
        && t.is_contiguous()
        && t.numel() == numel;
    if !ok || numel == 0 {
        return None;
    }
    // SAFETY: the tensor is a contiguous f32 CPU tensor of `numel` elements that owns its
    // storage (a parameter of our VarStore); nothing else reads or writes it while the
    // optimizer loads parameters (no autograd graph is alive between steps), and the slice
    // does not outlive this call's use of it.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, numel) })
}

/// The storage of a contiguous f32 CPU tensor of `numel` elements, read-only; `None` for
/// any other tensor (CUDA, bf16, strided, undefined).
pub fn cpu_f32(t: &Tensor, numel: usize) -> Option<&[f32]> {
    let ok = t.defined()
        && t.device() == Device::Cpu
        && t.kind() == Kind::Float
        && t.is_contiguous()
        && t.numel() == numel;
    if !ok || numel == 0 {
        return None;
    }
    // SAFETY: a contiguous f32 CPU tensor of `numel` elements; the slice borrows the
    // tensor handle, which keeps the storage alive, and nothing writes it meanwhile (a
    // gradient handed over by autograd belongs to the caller alone).
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, numel) })
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), TrainError> {
    if got != want {
        return Err(TrainError::Config(format!(
            "{what} buffer holds {got} values, the model has {want}"
        )));
    }
    Ok(())
}

/// The initial flat parameter vector for `seed`.
pub fn init_params(cfg: &ModelConfig, layout: &Layout, seed: u64) -> Vec<f32> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(hash4(seed, 0x1917, 0, 0));
    let resid_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let mut out = vec![0f32; layout.total];
    for s in &layout.slots {
        let dst = &mut out[s.offset..s.offset + s.numel];
        if s.name.ends_with(".bias") {
            dst.fill(0.0);
        } else if s.name.contains("ln_") {
            dst.fill(1.0);
        } else {
            let std = if s.name.ends_with("c_proj.weight") {
                resid_std
            } else {
                0.02
            };
            // Box–Muller from two uniforms in (0, 1].
            for x in dst.iter_mut() {
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                *x = (z * std) as f32;
            }
        }
    }
    out
}
