//! The job: a Transformer on a 4D-parallel layout, its memory per GPU and its step time
//! from an analytical cost model (formulas and sources in docs/simulator.md).

use serde::Serialize;

use crate::config::{ModelSpec, Recompute, SimFile};

/// A GPU of the device catalogue. The numbers are those of `phalanx_train::device`'s
/// catalogue (that crate links libtorch, which the simulator must not).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub bf16_tflops: f64,
    pub hbm_gib: f64,
}

pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "H100-SXM-80GB",
        bf16_tflops: 989.0,
        hbm_gib: 80.0,
    },
    Gpu {
        name: "H200-141GB",
        bf16_tflops: 989.0,
        hbm_gib: 141.0,
    },
    Gpu {
        name: "A100-80GB",
        bf16_tflops: 312.0,
        hbm_gib: 80.0,
    },
    Gpu {
        name: "B200-180GB",
        bf16_tflops: 2250.0,
        hbm_gib: 180.0,
    },
];

/// A Transformer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Shape {
    pub layers: u64,
    pub hidden: u64,
    pub ffn_hidden: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    pub seq_len: u64,
    pub global_batch: u64,
    pub experts: u64,
    pub experts_active: u64,
}

/// Llama 3 shapes ("The Llama 3 Herd of Models", Table 3), at the 8K sequence length and
/// the 16M-token batch of the main pre-training stage (2,048 sequences of 8,192).
pub const MODEL_PRESETS: &[(&str, Shape)] = &[
    ("llama3-8b", llama3(32, 4096, 14336, 32)),
    ("llama3-70b", llama3(80, 8192, 28672, 64)),
    ("llama3-405b", llama3(126, 16384, 53248, 128)),
];

const fn llama3(layers: u64, hidden: u64, ffn_hidden: u64, heads: u64) -> Shape {
    Shape {
        layers,
        hidden,
        ffn_hidden,
        heads,
        kv_heads: 8,
        vocab: 128_256,
        seq_len: 8_192,
        global_batch: 2_048,
        experts: 1,
        experts_active: 1,
    }
}

impl Shape {
    /// Parameters: attention (q, k, v, o with grouped KV heads), a SwiGLU MLP (three
    /// matrices) per expert, untied input and output embeddings. Norms are left out.
    pub fn params(&self) -> f64 {
        let h = self.hidden as f64;
        let head_dim = h / self.heads as f64;
        let attn = 2.0 * h * h + 2.0 * h * self.kv_heads as f64 * head_dim;
        let mlp = 3.0 * h * self.ffn_hidden as f64 * self.experts as f64;
        self.layers as f64 * (attn + mlp) + 2.0 * self.vocab as f64 * h
    }

    /// Parameters a token goes through (MoE: only its active experts).
    pub fn active_params(&self) -> f64 {
        let h = self.hidden as f64;
        let mlp_all = 3.0 * h * self.ffn_hidden as f64 * self.experts as f64;
        let mlp_active = 3.0 * h * self.ffn_hidden as f64 * self.experts_active as f64;
        self.params() - self.layers as f64 * (mlp_all - mlp_active)
    }

    /// Training FLOPs per token: 6 per active parameter plus attention's
    /// 12 · layers · hidden · seq_len (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
    /// appendix B).
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.active_params()
            + 12.0 * self.layers as f64 * self.hidden as f64 * self.seq_len as f64
    }

    pub fn tokens_per_step(&self) -> f64 {
        (self.global_batch * self.seq_len) as f64
    }
}

/// A problem with the model or the layout.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct JobError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: String) -> JobError {
    JobError {
        field: field.to_string(),
        message,
    }
}

/// Resolve a model section: the preset, then the fields given beside it.
pub fn shape(m: &ModelSpec) -> Result<Shape, JobError> {
    let base = match &m.preset {
        Some(p) => Some(
            MODEL_PRESETS
                .iter()
                .find(|(n, _)| n == p)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    let names: Vec<&str> = MODEL_PRESETS.iter().map(|(n, _)| *n).collect();
                    err(
                        "model.preset",
                        format!("unknown model {p:?} (known: {})", names.join(", ")),
                    )
                })?,
        ),
        None => None,
    };
    let pick = |field: &str, v: Option<u64>, from: Option<u64>| {
        v.or(from).ok_or_else(|| {
            err(
                &format!("model.{field}"),
                "missing (give it, or a model.preset)".into(),
            )
        })
    };
    let s = Shape {
        layers: pick("layers", m.layers, base.map(|b| b.layers))?,
        hidden: pick("hidden", m.hidden, base.map(|b| b.hidden))?,
        ffn_hidden: pick("ffn_hidden", m.ffn_hidden, base.map(|b| b.ffn_hidden))?,
        heads: pick("heads", m.heads, base.map(|b| b.heads))?,
        kv_heads: pick("kv_heads", m.kv_heads, base.map(|b| b.kv_heads))?,
        vocab: pick("vocab", m.vocab, base.map(|b| b.vocab))?,
        seq_len: pick("seq_len", m.seq_len, base.map(|b| b.seq_len))?,
        global_batch: pick("global_batch", m.global_batch, base.map(|b| b.global_batch))?,
        experts: m.experts.or(base.map(|b| b.experts)).unwrap_or(1),
        experts_active: m
            .experts_active
            .or(base.map(|b| b.experts_active))
            .unwrap_or(1),
    };
    for (f, v, max) in [
        ("layers", s.layers, 10_000),
        ("hidden", s.hidden, 1 << 20),
        ("ffn_hidden", s.ffn_hidden, 1 << 22),
        ("heads", s.heads, 1 << 14),
        ("kv_heads", s.kv_heads, 1 << 14),
        ("vocab", s.vocab, 1 << 24),
        ("seq_len", s.seq_len, 1 << 24),
        ("global_batch", s.global_batch, 1 << 26),
        ("experts", s.experts, 1 << 16),
        ("experts_active", s.experts_active, 1 << 16),
    ] {
        if v == 0 || v > max {
            return Err(err(
                &format!("model.{f}"),
                format!("{v} (expected 1..={max})"),
            ));
        }
    }
    if s.hidden % s.heads != 0 {
        return Err(err(
            "model.heads",
            format!("{} does not divide hidden {}", s.heads, s.hidden),
        ));
    }
    if s.heads % s.kv_heads != 0 {
        return Err(err(
            "model.kv_heads",
            format!("{} does not divide heads {}", s.kv_heads, s.heads),
        ));
    }
    if s.experts_active > s.experts {
        return Err(err(
            "model.experts_active",
            format!("{} exceeds experts {}", s.experts_active, s.experts),
        ));
    }
    Ok(s)
}

/// The job as simulated: shape, layout, hardware and the derived costs.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub shape: Shape,
    pub gpu: Gpu,
    pub gpus: u64,
    pub hosts: u64,
    pub gpus_per_host: u64,
    pub tp: u64,
    pub pp: u64,
    pub dp: u64,
    pub ep: u64,
    pub micro_batches: u64,
    pub params: f64,
    pub memory_gib_per_gpu: f64,
    pub step: StepTime,
    /// Bytes of one checkpoint (the whole job's state).
    pub checkpoint_bytes: f64,
    /// A synchronous checkpoint write (or a load), s.
    pub checkpoint_write_s: f64,
    /// Moving one host's state from its peers over the network, s.
    pub host_state_transfer_s: f64,
}

/// The step time and its parts, s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTime {
    pub compute_s: f64,
    pub bubble_s: f64,
    pub tp_comm_s: f64,
    pub pp_comm_s: f64,
    pub dp_comm_exposed_s: f64,
    pub ep_comm_s: f64,
    pub total_s: f64,
    /// End-to-end model FLOPs utilisation.
    pub mfu: f64,
    pub tokens_per_s: f64,
}

/// Ring all-reduce of `bytes` among `n` ranks at `bw` bytes/s and `lat` s per hop:
/// 2(n−1)/n · bytes / bw + 2(n−1) · lat (Patarasuk and Yuan 2009).
pub fn ring_all_reduce_s(bytes: f64, n: u64, bw: f64, lat: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    2.0 * (n - 1.0) / n * bytes / bw + 2.0 * (n - 1.0) * lat
}

/// All-to-all of `bytes` per rank among `n` ranks: (n−1)/n · bytes / bw + (n−1) · lat.
pub fn all_to_all_s(bytes: f64, n: u64, bw: f64, lat: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    (n - 1.0) / n * bytes / bw + (n - 1.0) * lat
}

impl Job {
    pub fn build(f: &SimFile) -> Result<Job, JobError> {
        let shape = shape(&f.model)?;
        let gpu = *GPUS
            .iter()
            .find(|g| g.name.eq_ignore_ascii_case(&f.hardware.gpu))
            .ok_or_else(|| {
                let names: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
                err(
                    "hardware.gpu",
                    format!(
                        "unknown GPU {:?} (catalogue: {})",
                        f.hardware.gpu,
                        names.join(", ")
                    ),
                )
            })?;
        let l = &f.layout;
        let h = &f.hardware;
        let world = l.tp.checked_mul(l.pp).and_then(|x| x.checked_mul(l.dp));
        if world != Some(h.gpus) {
            let world = world.map_or("more than 2^64".to_string(), |w| w.to_string());
            return Err(err(
                "layout",
                format!(
                    "tp {} x pp {} x dp {} = {world}, but hardware.gpus is {}",
                    l.tp, l.pp, l.dp, h.gpus
                ),
            ));
        }
        if l.tp > h.gpus_per_host || h.gpus_per_host % l.tp != 0 {
            return Err(err(
                "layout.tp",
                format!(
                    "{} must divide the {} GPUs of a host (tensor parallelism stays on NVLink)",
                    l.tp, h.gpus_per_host
                ),
            ));
        }
        if shape.heads % l.tp != 0 || shape.ffn_hidden % l.tp != 0 {
            return Err(err(
                "layout.tp",
                format!(
                    "{} must divide heads {} and ffn_hidden {}",
                    l.tp, shape.heads, shape.ffn_hidden
                ),
            ));
        }
        if l.pp * l.virtual_stages > shape.layers {
            return Err(err(
                "layout.pp",
                format!(
                    "pp {} x virtual_stages {} exceeds the {} layers",
                    l.pp, l.virtual_stages, shape.layers
                ),
            ));
        }
        if shape.global_batch % (l.dp * l.micro_batch) != 0 {
            return Err(err(
                "layout.dp",
                format!(
                    "dp {} x micro_batch {} must divide global_batch {}",
                    l.dp, l.micro_batch, shape.global_batch
                ),
            ));
        }
        if shape.experts > 1 {
            if l.ep > l.dp || l.dp % l.ep != 0 || shape.experts % l.ep != 0 {
                return Err(err(
                    "layout.ep",
                    format!(
                        "{} must divide dp {} and experts {}",
                        l.ep, l.dp, shape.experts
                    ),
                ));
            }
        } else if l.ep != 1 {
            return Err(err(
                "layout.ep",
                format!("{} on a dense model (expected 1)", l.ep),
            ));
        }
        let micro_batches = shape.global_batch / (l.dp * l.micro_batch);
        let params = shape.params();
        let bytes_per_param = f.checkpoint.bytes_per_param;

        // Memory per GPU: bf16 weights and gradients of its model-parallel slice (experts
        // further split by ep), fp32 master weights and Adam moments sharded over dp
        // (ZeRO-1), and the activations of the micro-batches in flight (1F1B keeps up to
        // pp of them), per layer sbh·34/t with selective recomputation (Korthikanti et
        // al. 2022) or the layer input 2sbh/t with full recomputation.
        let expert_params = shape.layers as f64
            * 3.0
            * (shape.hidden * shape.ffn_hidden * shape.experts) as f64
            * if shape.experts > 1 { 1.0 } else { 0.0 };
        let slice = (params - expert_params) / (l.tp * l.pp) as f64
            + expert_params / (l.tp * l.pp * l.ep) as f64;
        let optimizer = slice * (bytes_per_param - 2.0) / l.dp as f64;
        let sbh = (shape.seq_len * l.micro_batch * shape.hidden) as f64;
        let per_layer = match l.recompute {
            Recompute::Selective => 34.0 * sbh / l.tp as f64,
            Recompute::Full => 2.0 * sbh / l.tp as f64,
        };
        let layers_per_stage = shape.layers as f64 / l.pp as f64;
        let in_flight = l.pp.min(micro_batches) as f64;
        let activations = per_layer * layers_per_stage * in_flight;
        let memory = slice * 4.0 + optimizer + activations;
        let memory_gib_per_gpu = memory / (1u64 << 30) as f64;
        if memory_gib_per_gpu > gpu.hbm_gib {
            return Err(err(
                "layout",
                format!(
                    "{memory_gib_per_gpu:.1} GiB per GPU does not fit the {} GiB of a {} \
                     (weights and gradients {:.1}, optimizer {:.1}, activations {:.1} GiB); \
                     raise tp or pp, or set recompute = \"full\"",
                    gpu.hbm_gib,
                    gpu.name,
                    slice * 4.0 / (1u64 << 30) as f64,
                    optimizer / (1u64 << 30) as f64,
                    activations / (1u64 << 30) as f64,
                ),
            ));
        }

        let step = step_time(f, &shape, gpu, micro_batches);
        let checkpoint_bytes = params * bytes_per_param;
        let checkpoint_write_s = checkpoint_bytes / (h.storage_gb_per_s * 1e9);
        // A replacement host's GPUs each fetch their slice (weights and their optimizer
        // shard) from the peers holding it, one NIC per GPU, in parallel.
        let host_state_transfer_s =
            (slice * 2.0 + optimizer) / (h.network_gb_per_s * 1e9) + h.network_latency_us * 1e-6;
        Ok(Job {
            shape,
            gpu,
            gpus: h.gpus,
            hosts: h.gpus / h.gpus_per_host,
            gpus_per_host: h.gpus_per_host,
            tp: l.tp,
            pp: l.pp,
            dp: l.dp,
            ep: l.ep,
            micro_batches,
            params,
            memory_gib_per_gpu,
            step,
            checkpoint_bytes,
            checkpoint_write_s,
            host_state_transfer_s,
        })
    }

    /// GPUs in one data-parallel replica (a failed host costs the job one of these when
    /// it shrinks).
    pub fn replica_gpus(&self) -> u64 {
        self.tp * self.pp
    }
}

fn step_time(f: &SimFile, s: &Shape, gpu: Gpu, m: u64) -> StepTime {
    let l = &f.layout;
    let h = &f.hardware;
    let peak = gpu.bf16_tflops * 1e12;
    let flops = s.flops_per_token() * s.tokens_per_step();
    let compute_s = flops / (h.gpus as f64 * peak * l.compute_mfu);
    // Pipeline bubble (p−1)/(v·m + p−1) of the pipelined time (Narayanan et al. 2021).
    let (p, v) = (l.pp as f64, l.virtual_stages as f64);
    let bubble_frac = (p - 1.0) / (v * m as f64 + p - 1.0);
    let bubble_s = compute_s * bubble_frac / (1.0 - bubble_frac);
    let lat = h.network_latency_us * 1e-6;
    let nvlink = h.nvlink_gb_per_s * 1e9;
    let net = h.network_gb_per_s * 1e9;
    let act_bytes = (s.seq_len * l.micro_batch * s.hidden) as f64 * 2.0;
    let layers_per_stage = s.layers as f64 / l.pp as f64;
    // Tensor parallelism: 4 all-reduces of the activations per layer and micro-batch
    // (2 forward, 2 backward; Shoeybi et al. 2019), on NVLink, not overlapped.
    let tp_comm_s = if l.tp > 1 {
        4.0 * layers_per_stage * m as f64 * ring_all_reduce_s(act_bytes, l.tp, nvlink, 1e-6)
    } else {
        0.0
    };
    // Pipeline: the sends of the fill and drain are exposed, 2(p−1) activations each way.
    let pp_comm_s = if l.pp > 1 {
        2.0 * (p - 1.0) * (act_bytes / l.tp as f64 / net + lat)
    } else {
        0.0
    };
    // Data parallelism: a ring all-reduce of the bf16 gradients of the GPU's slice over
    // dp, hidden behind the backward pass except for (1 − dp_overlap) of it.
    let slice = s.params() / (l.tp * l.pp) as f64;
    let dp_s = ring_all_reduce_s(slice * 2.0, l.dp, net, lat);
    let dp_comm_exposed_s = dp_s * (1.0 - l.dp_overlap);
    // MoE: an all-to-all of the tokens to their experts and back, forward and backward.
    let ep_comm_s = if s.experts > 1 && l.ep > 1 {
        let bytes = act_bytes * s.experts_active as f64;
        4.0 * layers_per_stage * m as f64 * all_to_all_s(bytes, l.ep, net, lat)
    } else {
        0.0
    };
    let total_s = compute_s + bubble_s + tp_comm_s + pp_comm_s + dp_comm_exposed_s + ep_comm_s;
    StepTime {
        compute_s,
        bubble_s,
        tp_comm_s,
        pp_comm_s,
        dp_comm_exposed_s,
        ep_comm_s,
        total_s,
        mfu: flops / (h.gpus as f64 * peak * total_s),
        tokens_per_s: s.tokens_per_step() / total_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_presets_have_their_published_parameter_counts() {
        for (name, want) in [
            ("llama3-8b", 8.0e9),
            ("llama3-70b", 70.6e9),
            ("llama3-405b", 405.8e9),
        ] {
            let s = MODEL_PRESETS.iter().find(|(n, _)| *n == name).unwrap().1;
            let got = s.params();
            assert!(
                (got - want).abs() / want < 0.02,
                "{name}: {got:.3e} vs {want:.3e}"
            );
        }
    }

    #[test]
    fn ring_all_reduce_moves_twice_the_data_less_a_share() {
        let t = ring_all_reduce_s(1e9, 4, 1e9, 0.0);
        assert!((t - 1.5).abs() < 1e-12);
        assert_eq!(ring_all_reduce_s(1e9, 1, 1e9, 1.0), 0.0);
    }
}
