//! Devices: a catalogue of GPU specs, emulated GPUs (tch on CPU, one intra-op thread,
//! a memory cap) and real CUDA devices.
use std::ffi::CString;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::TrainError;

/// Published figures of a GPU model (dense bf16, no sparsity).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    pub name: &'static str,
    pub bf16_tflops: f64,
    pub hbm_gib: f64,
    pub hbm_tb_per_s: f64,
    /// Per-GPU interconnect bandwidth (NVLink, one direction summed over links).
    pub interconnect_gb_per_s: f64,
}

pub const CATALOGUE: &[GpuSpec] = &[
    GpuSpec {
        name: "H100-SXM-80GB",
        bf16_tflops: 989.0,
        hbm_gib: 80.0,
        hbm_tb_per_s: 3.35,
        interconnect_gb_per_s: 900.0,
    },
    GpuSpec {
        name: "H200-141GB",
        bf16_tflops: 989.0,
        hbm_gib: 141.0,
        hbm_tb_per_s: 4.8,
        interconnect_gb_per_s: 900.0,
    },
    GpuSpec {
        name: "A100-80GB",
        bf16_tflops: 312.0,
        hbm_gib: 80.0,
        hbm_tb_per_s: 2.039,
        interconnect_gb_per_s: 600.0,
    },
    GpuSpec {
        name: "B200-180GB",
        bf16_tflops: 2250.0,
        hbm_gib: 180.0,
        hbm_tb_per_s: 8.0,
        interconnect_gb_per_s: 1800.0,
    },
];

pub fn spec_named(name: &str) -> Result<&'static GpuSpec, TrainError> {
    CATALOGUE
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let names: Vec<_> = CATALOGUE.iter().map(|s| s.name).collect();
            TrainError::Device(format!(
                "unknown GPU model `{name}`; known: {}",
                names.join(", ")
            ))
        })
}

/// What `--device` asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceRequest {
    /// An emulated GPU of this spec; `memory_bytes` is its capacity (the spec's HBM,
    /// unless overridden to emulate a smaller part).
    Emulated {
        spec: &'static GpuSpec,
        memory_bytes: u64,
    },
    Cuda(usize),
}

impl DeviceRequest {
    /// Parses `emulated`, `emulated:MODEL` or `cuda:N`. `memory_gib` overrides an emulated
    /// device's capacity.
    pub fn parse(s: &str, memory_gib: Option<f64>) -> Result<Self, TrainError> {
        let bad = || {
            TrainError::Device(format!(
                "bad device `{s}`: expected `emulated[:MODEL]` or `cuda:N`"
            ))
        };
        if let Some(rest) = s.strip_prefix("cuda:") {
            let n = rest.parse::<usize>().map_err(|_| bad())?;
            return Ok(Self::Cuda(n));
        }
        let spec = match s {
            "emulated" => &CATALOGUE[0],
            _ => spec_named(s.strip_prefix("emulated:").ok_or_else(bad)?)?,
        };
        let gib = memory_gib.unwrap_or(spec.hbm_gib);
        if !(gib.is_finite() && gib > 0.0) {
            return Err(TrainError::Device(format!(
                "memory capacity {gib} GiB must be positive"
            )));
        }
        Ok(Self::Emulated {
            spec,
            memory_bytes: (gib * (1u64 << 30) as f64) as u64,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Emulated { spec, memory_bytes } => format!(
                "emulated {} ({:.2} GiB cap, CPU, 1 thread)",
                spec.name,
                *memory_bytes as f64 / (1u64 << 30) as f64
            ),
            Self::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Prepares the process for this device; must run before the first torch call.
    /// Emulated GPUs get one intra-op thread (libtorch CPU results differ between thread
    /// counts); CUDA needs libtorch_cuda.so loaded.
    pub fn activate(&self) -> Result<tch::Device, TrainError> {
        match self {
            Self::Emulated { .. } => {
                tch::set_num_threads(1);
                tch::set_num_interop_threads(1);
                Ok(tch::Device::Cpu)
            }
            Self::Cuda(n) => {
                // cuBLAS picks reduction orders by workspace; a fixed configuration
                // makes its products deterministic (UNVERIFIED here: no GPU).
                if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
                    std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
                }
                load_cuda()?;
                let count = tch::Cuda::device_count();
                if (*n as i64) >= count {
                    return Err(TrainError::Device(format!(
                        "cuda:{n} requested but libtorch sees {count} CUDA device(s)"
                    )));
                }
                Ok(tch::Device::Cuda(*n))
            }
        }
    }

    /// Refuses a model that cannot fit: parameters, gradients, optimizer state, the
    /// flat buffers of the deterministic reduction and the activations of one
    /// micro-batch must fit in the emulated capacity.
    pub fn check_fits(&self, est: &MemoryEstimate) -> Result<(), TrainError> {
        if let Self::Emulated { spec, memory_bytes } = self {
            if est.total_bytes() > *memory_bytes {
                return Err(TrainError::OutOfMemory {
                    device: format!("emulated {}", spec.name),
                    what: est.describe(),
                    need_bytes: est.total_bytes(),
                    have_bytes: *memory_bytes,
                });
            }
        }
        Ok(())
    }
}

/// Caps this process's use of CUDA device `n` at `gib` GiB, so that several worker
/// processes can share one GPU: libtorch's caching allocator refuses allocations past
/// `per_process_memory_fraction` of the device (set through `PYTORCH_CUDA_ALLOC_CONF`,
/// read when CUDA initialises, so call this before [`DeviceRequest::activate`]). The
/// device's size comes from `nvidia-smi`. UNVERIFIED here: no GPU.
pub fn cap_cuda_memory(n: usize, gib: f64) -> Result<f64, TrainError> {
    if !(gib.is_finite() && gib > 0.0) {
        return Err(TrainError::Device(format!(
            "memory cap {gib} GiB must be positive"
        )));
    }
    let total_mib = nvidia_smi_query(n, "memory.total").and_then(|s| s.parse::<f64>().ok());
    let total_gib = total_mib.map(|m| m / 1024.0).ok_or_else(|| {
        TrainError::Device(format!(
            "cannot read the memory size of cuda:{n} from nvidia-smi, needed for --memory-gib"
        ))
    })?;
    let fraction = gib / total_gib;
    if fraction > 1.0 {
        return Err(TrainError::Device(format!(
            "memory cap {gib} GiB exceeds cuda:{n}'s {total_gib:.1} GiB"
        )));
    }
    let mut conf = std::env::var("PYTORCH_CUDA_ALLOC_CONF").unwrap_or_default();
    if !conf.is_empty() {
        conf.push(',');
    }
    conf.push_str(&format!("per_process_memory_fraction:{fraction:.6}"));
    std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", conf);
    Ok(fraction)
}

/// One field of `nvidia-smi --query-gpu` for device `n` (no units), with a bounded wait.
pub fn nvidia_smi_query(n: usize, field: &str) -> Option<String> {
    let mut cmd = std::process::Command::new("nvidia-smi");
    cmd.arg(format!("--query-gpu={field}"))
        .args(["--format=csv,noheader,nounits", "-i"])
        .arg(n.to_string());
    first_line_of(cmd, Duration::from_secs(20))
}

/// The first line of a command's standard output when it succeeds within `timeout`
/// (killed and `None` otherwise, or when that line is empty).
fn first_line_of(mut cmd: std::process::Command, timeout: Duration) -> Option<String> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    let v = out.lines().next()?.trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// Bytes a training rank needs.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryEstimate {
    pub params: u64,
    /// Model weights, autograd gradients, the flat parameter copy, the reduced gradient.
    pub weights_and_grads_bytes: u64,
    /// AdamW first and second moments.
    pub optimizer_bytes: u64,
    /// Per-micro-batch f32 gradients kept for the reduction plus the i64 accumulator.
    pub reduction_bytes: u64,
    /// Activations saved for backward for one micro-batch.
    pub activation_bytes: u64,
}

impl MemoryEstimate {
    pub fn new(cfg: &ModelConfig, micro_batch: usize, local_micro_batches: usize) -> Self {
        let p = cfg.param_count() as u64;
        let (b, t, d, f, h, v, l) = (
            micro_batch as u64,
            cfg.ctx_len as u64,
            cfg.d_model as u64,
            cfg.d_ff as u64,
            cfg.n_head as u64,
            cfg.vocab_size as u64,
            cfg.n_layer as u64,
        );
        // Per layer: two norms, qkv, attention output, projection, MLP in/out (all f32),
        // plus the attention matrix; then the logits with their softmax and gradient.
        let per_layer = 4 * b * t * (12 * d + 2 * f) + 4 * b * h * t * t;
        let activation_bytes = l * per_layer + 3 * 4 * b * t * v;
        Self {
            params: p,
            weights_and_grads_bytes: 4 * p * 4,
            optimizer_bytes: 8 * p,
            reduction_bytes: 4 * p * local_micro_batches.max(1) as u64 + 8 * p,
            activation_bytes,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_and_grads_bytes
            + self.optimizer_bytes
            + self.reduction_bytes
            + self.activation_bytes
    }

    pub fn describe(&self) -> String {
        format!(
            "{} parameters: weights+grads {} B, optimizer {} B, reduction buffers {} B, activations {} B",
            self.params, self.weights_and_grads_bytes, self.optimizer_bytes, self.reduction_bytes, self.activation_bytes
        )
    }
}

static CUDA_LOADED: OnceLock<Result<String, String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` with RTLD_GLOBAL so that libtorch registers its CUDA backend.
/// Looks at `$PHALANX_LIBTORCH_CUDA` (a file), then the loader's search path
/// (`LD_LIBRARY_PATH`), then the `torch/lib` of the machine's Python PyTorch.
pub fn load_cuda() -> Result<String, TrainError> {
    CUDA_LOADED
        .get_or_init(|| {
            let mut tried = Vec::new();
            let mut candidates = Vec::new();
            if let Ok(p) = std::env::var("PHALANX_LIBTORCH_CUDA") {
                candidates.push(p);
            }
            candidates.push("libtorch_cuda.so".to_string());
            if let Some(dir) = python_torch_lib_dir() {
                candidates.push(format!("{dir}/libtorch_cuda.so"));
            }
            for c in candidates {
                match dlopen_global(&c) {
                    Ok(()) => return Ok(c),
                    Err(e) => tried.push(format!("{c}: {e}")),
                }
            }
            Err(format!(
                "libtorch's CUDA library is not available (tried {}). On a GPU machine point \
                 LD_LIBRARY_PATH at the torch/lib of PyTorch 2.11.0+cu130, or set PHALANX_LIBTORCH_CUDA",
                tried.join("; ")
            ))
        })
        .clone()
        .map_err(TrainError::Device)
}

fn dlopen_global(path: &str) -> Result<(), String> {
    let c = CString::new(path).map_err(|_| "path contains NUL".to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is intentionally leaked so that the
    // library stays loaded for the life of the process.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}

/// Asks Python where PyTorch lives, with a bound on the wait.
fn python_torch_lib_dir() -> Option<String> {
    let mut cmd = std::process::Command::new("python3");
    cmd.args([
        "-c",
        "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
    ]);
    first_line_of(cmd, Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_requests() {
        assert!(matches!(
            DeviceRequest::parse("cuda:1", None).unwrap(),
            DeviceRequest::Cuda(1)
        ));
        let DeviceRequest::Emulated { spec, memory_bytes } =
            DeviceRequest::parse("emulated:h200-141gb", None).unwrap()
        else {
            panic!()
        };
        assert_eq!(spec.name, "H200-141GB");
        assert_eq!(memory_bytes, 141 << 30);
        let e = DeviceRequest::parse("emulated:Z80", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Z80") && e.contains("H100-SXM-80GB"), "{e}");
        assert!(DeviceRequest::parse("tpu", None).is_err());
        assert!(DeviceRequest::parse("emulated", Some(-1.0)).is_err());
    }

    #[test]
    fn a_model_that_does_not_fit_names_both_sizes() {
        let cfg = ModelConfig::named("base").unwrap();
        let dev = DeviceRequest::parse("emulated:A100-80GB", Some(0.01)).unwrap();
        let est = MemoryEstimate::new(&cfg, 4, 2);
        let e = dev.check_fits(&est).unwrap_err().to_string();
        assert!(
            e.contains(&est.total_bytes().to_string()) && e.contains(&(10737418u64).to_string()),
            "{e}"
        );
        let big = DeviceRequest::parse("emulated:A100-80GB", None).unwrap();
        big.check_fits(&est).unwrap();
    }

    #[test]
    fn catalogue_has_the_required_parts() {
        for n in ["H100-SXM-80GB", "H200-141GB", "A100-80GB"] {
            let s = spec_named(n).unwrap();
            assert!(
                s.bf16_tflops > 0.0
                    && s.hbm_gib > 0.0
                    && s.hbm_tb_per_s > 0.0
                    && s.interconnect_gb_per_s > 0.0
            );
        }
    }
}
