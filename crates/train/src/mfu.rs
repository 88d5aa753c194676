//! Model FLOPs utilisation: the FLOPs a step of the model needs, against what the devices
//! could do.
//!
//! FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): `6N + 12·L·d·T`,
//! where `N` counts the parameters that take part in matrix products (every parameter
//! but the token and position tables, which are lookups), `L` the layers, `d` the model
//! width and `T` the context. `6N` is the forward (2 FLOPs per weight and token) and the
//! backward (twice the forward); `12·L·d·T` the attention scores and their weighted sum,
//! counted without the causal mask's savings, as PaLM and nanoGPT do.
//!
//! The peak: for a real GPU the catalogue's dense bf16 figure; for an emulated GPU (one
//! CPU thread) a matrix-product microbenchmark on this CPU in the run's arithmetic,
//! measured once and cached per CPU model, kernel settings and precision, so that MFU
//! compares a run with what its own core can do.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::device::{DeviceRequest, CATALOGUE};
use crate::model::Precision;
use crate::TrainError;

/// Training FLOPs per token (forward and backward) of a model: `6N + 12·L·d·T`.
pub fn flops_per_token(cfg: &ModelConfig) -> f64 {
    let lookups = (cfg.vocab_size + cfg.ctx_len) * cfg.d_model;
    let n = (cfg.param_count() - lookups) as f64;
    6.0 * n + 12.0 * (cfg.n_layer * cfg.d_model * cfg.ctx_len) as f64
}

/// A device's peak rate and where the figure comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub tflops: f64,
    pub source: String,
}

/// What a run achieved against its devices' peak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mfu {
    pub flops_per_token: f64,
    /// Model FLOPs per second of the whole group, in TFLOP/s.
    pub achieved_tflops: f64,
    pub devices: usize,
    pub peak_tflops_per_device: f64,
    pub peak_source: String,
    /// achieved / (devices × peak), in [0, 1] for a sane measurement.
    pub mfu: f64,
}

impl Mfu {
    pub fn new(cfg: &ModelConfig, tokens_per_sec: f64, devices: usize, peak: &Peak) -> Self {
        let flops_per_token = flops_per_token(cfg);
        let achieved_tflops = tokens_per_sec * flops_per_token / 1e12;
        Self {
            flops_per_token,
            achieved_tflops,
            devices,
            peak_tflops_per_device: peak.tflops,
            peak_source: peak.source.clone(),
            mfu: achieved_tflops / (devices.max(1) as f64 * peak.tflops),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "MFU {:.1}%: {:.4} TFLOP/s achieved ({:.3e} FLOPs/token) of {} × {:.4} TFLOP/s ({})",
            self.mfu * 100.0,
            self.achieved_tflops,
            self.flops_per_token,
            self.devices,
            self.peak_tflops_per_device,
            self.peak_source
        )
    }
}

impl Mfu {
    /// The report a running job's rank 0 sends with its progress: integers (tokens/s,
    /// MFLOP/s, millionths of MFU) for the replicated state, the source cut to
    /// [`phalanx_proto::Throughput::SOURCE_BYTES_MAX`] bytes.
    pub fn to_report(
        &self,
        step: u64,
        steps: u32,
        tokens_per_sec: f64,
    ) -> phalanx_proto::Throughput {
        let int = |x: f64| {
            if x.is_finite() && x > 0.0 {
                x.round() as u64
            } else {
                0
            }
        };
        let mut source = self.peak_source.clone();
        if source.len() > phalanx_proto::Throughput::SOURCE_BYTES_MAX {
            let mut end = phalanx_proto::Throughput::SOURCE_BYTES_MAX;
            while !source.is_char_boundary(end) {
                end -= 1;
            }
            source.truncate(end);
        }
        phalanx_proto::Throughput {
            step,
            steps,
            tokens_per_s: int(tokens_per_sec),
            flops_per_token: int(self.flops_per_token),
            achieved_mflops: int(self.achieved_tflops * 1e6),
            devices: self.devices as u32,
            peak_mflops_per_device: int(self.peak_tflops_per_device * 1e6),
            peak_source: source,
            mfu_ppm: int(self.mfu * 1e6),
        }
    }
}

/// A running job's throughput, as its rank 0 measures it: tokens/s over the wall time
/// between its last [`StepRate::WINDOW`] step completions (everything the step loop does
/// counts: the step, checkpoint hand-overs, replica checks), reported at most once per
/// `every` so that the progress reports stay small.
pub struct StepRate {
    done: VecDeque<Instant>,
    last_report: Option<Instant>,
    every: Duration,
}

impl StepRate {
    /// Step completions kept: the rate is over `WINDOW - 1` steps.
    pub const WINDOW: usize = 10;

    pub fn new(every: Duration) -> Self {
        Self {
            done: VecDeque::with_capacity(Self::WINDOW),
            last_report: None,
            every,
        }
    }

    /// Records that `step` steps are done at `at`; returns the report when one is due
    /// (at least two completions measured and `every` since the last one). `peak`: one
    /// device's peak (`None` when unknown: the report then carries no MFU).
    pub fn on_step(
        &mut self,
        at: Instant,
        step: u64,
        cfg: &ModelConfig,
        tokens_per_step: u64,
        devices: usize,
        peak: Option<&Peak>,
    ) -> Option<phalanx_proto::Throughput> {
        if self.done.len() == Self::WINDOW {
            self.done.pop_front();
        }
        self.done.push_back(at);
        let first = *self.done.front()?;
        let steps = self.done.len() - 1;
        let secs = at.saturating_duration_since(first).as_secs_f64();
        if steps == 0 || secs <= 0.0 {
            return None;
        }
        if self
            .last_report
            .is_some_and(|t| at.saturating_duration_since(t) < self.every)
        {
            return None;
        }
        self.last_report = Some(at);
        let tokens_per_sec = (tokens_per_step * steps as u64) as f64 / secs;
        let unknown = Peak {
            tflops: f64::INFINITY,
            source: "unknown".into(),
        };
        let mut report = Mfu::new(cfg, tokens_per_sec, devices, peak.unwrap_or(&unknown))
            .to_report(step, steps as u32, tokens_per_sec);
        if peak.is_none() {
            report.peak_mflops_per_device = 0;
            report.mfu_ppm = 0;
        }
        Some(report)
    }
}

/// The peak of one device of `req` in `precision`. For an emulated GPU this runs the
/// CPU microbenchmark unless a cached figure exists; call it in the worker process, whose
/// thread count and kernel settings are the ones training uses.
pub fn device_peak(req: &DeviceRequest, precision: Precision) -> Result<Peak, TrainError> {
    match req {
        DeviceRequest::Emulated { .. } => cpu_peak(precision),
        DeviceRequest::Cuda(n) => gpu_peak(*n),
    }
}

/// The catalogue's dense bf16 figure for CUDA device `n`, found by the name
/// `nvidia-smi` gives (or `$PHALANX_GPU_MODEL`, a catalogue name).
fn gpu_peak(n: usize) -> Result<Peak, TrainError> {
    let name = match std::env::var("PHALANX_GPU_MODEL") {
        Ok(m) => m,
        Err(_) => nvidia_smi_name(n).ok_or_else(|| {
            TrainError::Device(format!(
                "cannot tell which GPU cuda:{n} is (nvidia-smi gave no name); set PHALANX_GPU_MODEL to one of {}",
                CATALOGUE.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ))
        })?,
    };
    let family = |s: &str| s.split('-').next().unwrap_or(s).to_ascii_uppercase();
    let spec = CATALOGUE
        .iter()
        .find(|s| {
            s.name.eq_ignore_ascii_case(&name)
                || name.to_ascii_uppercase().contains(&family(s.name))
        })
        .ok_or_else(|| {
            TrainError::Device(format!(
                "GPU `{name}` is not in the catalogue; set PHALANX_GPU_MODEL to one of {}",
                CATALOGUE
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    Ok(Peak {
        tflops: spec.bf16_tflops,
        source: format!("catalogue: {} dense bf16 ({name})", spec.name),
    })
}

fn nvidia_smi_name(n: usize) -> Option<String> {
    crate::device::nvidia_smi_query(n, "name")
}

/// What a measured CPU peak depends on: the CPU, the kernel settings (the numerics
/// profile's variables) and the arithmetic. An emulated GPU always computes on one
/// thread ([`DeviceRequest::activate`]), and so does the microbenchmark in its process.
fn cpu_key(precision: Precision) -> String {
    let cpu = cpu_model_name().unwrap_or_else(|| "unknown CPU".into());
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    format!(
        "{cpu} | {precision} | 1 thread | ATEN_CPU_CAPABILITY={} MKL_CBWR={} ONEDNN_MAX_CPU_ISA={}",
        env("ATEN_CPU_CAPABILITY"),
        env("MKL_CBWR"),
        env("ONEDNN_MAX_CPU_ISA")
    )
}

/// This machine's CPU model, as the first `model name` line of `/proc/cpuinfo` gives
/// it (`None` where there is no such line).
pub fn cpu_model_name() -> Option<String> {
    cpu_model_in(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn cpu_model_in(cpuinfo: &str) -> Option<String> {
    cpuinfo_field(cpuinfo, "model name")
}

/// This machine's CPU vendor (`vendor_id` of /proc/cpuinfo: `GenuineIntel`,
/// `AuthenticAMD`, ...), if known. The numerics libraries take other kernels per vendor,
/// so the same numerics profile computes other bits on another vendor.
pub fn cpu_vendor() -> Option<String> {
    cpuinfo_field(&std::fs::read_to_string("/proc/cpuinfo").ok()?, "vendor_id")
}

/// The first non-empty `key` field of a `/proc/cpuinfo` text.
fn cpuinfo_field(cpuinfo: &str, key: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `$XDG_CACHE_HOME/phalanx/cpu-peak.json` (or `~/.cache/...`).
pub fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("phalanx").join("cpu-peak.json"))
}

/// The CPU's matrix-product peak for `precision`, from the cache or measured (and then
/// cached; a cache that cannot be written only costs a new measurement next time). For
/// bf16 it is the faster of the bf16 and the f32 products: a core without bf16
/// arithmetic (AVX2) computes bf16 products through f32 and, in some shapes, far slower
/// than a model's own products (0.0008 against 0.10 TFLOP/s f32 here), so its f32 rate
/// is the bound a bf16 run can reach; a core with bf16 units measures higher in bf16.
pub fn cpu_peak(precision: Precision) -> Result<Peak, TrainError> {
    let own = cpu_peak_of(precision)?;
    if precision == Precision::Bf16 {
        let f32 = cpu_peak_of(Precision::Fp32)?;
        if f32.tflops > own.tflops {
            return Ok(Peak {
                tflops: f32.tflops,
                source: format!(
                    "{}; its bf16 products measured slower, {:.4} TFLOP/s",
                    f32.source, own.tflops
                ),
            });
        }
    }
    Ok(own)
}

/// [`cpu_peak`] of the products in `precision` alone.
fn cpu_peak_of(precision: Precision) -> Result<Peak, TrainError> {
    let key = cpu_key(precision);
    let file = cache_file();
    let mut cache: std::collections::BTreeMap<String, f64> = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(&t) = cache.get(&key).filter(|t| t.is_finite() && **t > 0.0) {
        return Ok(Peak {
            tflops: t,
            source: format!("measured matmul peak of this CPU (cached: {key})"),
        });
    }
    let tflops = matmul_tflops(precision)?;
    if let Some(f) = &file {
        cache.insert(key.clone(), tflops);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(f.parent().expect("a file in a directory"))?;
            let tmp = f.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec_pretty(&cache).unwrap_or_default())?;
            std::fs::rename(&tmp, f)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %f.display(), error = %e, "could not cache the CPU peak");
        }
    }
    Ok(Peak {
        tflops,
        source: format!("measured matmul peak of this CPU ({key})"),
    })
}

/// The best rate of square matrix products on this thread: f32 1024² or bf16 512²
/// (bf16 products are slow on CPUs without native support), repeated for about 0.3 s.
pub fn matmul_tflops(precision: Precision) -> Result<f64, TrainError> {
    let (n, kind) = match precision {
        Precision::Fp32 => (1024i64, Kind::Float),
        Precision::Bf16 => (512, Kind::BFloat16),
    };
    tch::no_grad(|| -> Result<f64, TrainError> {
        tch::manual_seed(0);
        let opts = (kind, tch::Device::Cpu);
        let a = Tensor::f_randn([n, n], opts)?;
        let b = Tensor::f_randn([n, n], opts)?;
        let _ = a.f_matmul(&b)?;
        let started = Instant::now();
        let mut best = f64::INFINITY;
        for _ in 0..50 {
            let t = Instant::now();
            let c = a.f_matmul(&b)?;
            let _ = c.f_sum(Kind::Float)?.f_double_value(&[])?;
            best = best.min(t.elapsed().as_secs_f64());
            if started.elapsed() > Duration::from_millis(300) {
                break;
            }
        }
        Ok(2.0 * (n * n * n) as f64 / best / 1e12)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_per_token_is_six_n_plus_attention() {
        // gpt2-124m's shape over bytes: 85M parameters in products (lookups excluded).
        let cfg = ModelConfig::named("gpt2-124m").unwrap();
        let n = cfg.param_count() - (256 + 1024) * 768;
        let f = flops_per_token(&cfg);
        assert_eq!(f, 6.0 * n as f64 + 12.0 * 12.0 * 768.0 * 1024.0);
        assert!((6.0e8..6.5e8).contains(&f), "{f}");
    }

    #[test]
    fn mfu_is_achieved_over_devices_times_peak() {
        let cfg = ModelConfig::named("small").unwrap();
        let peak = Peak {
            tflops: 0.1,
            source: "test".into(),
        };
        let m = Mfu::new(&cfg, 10_000.0, 2, &peak);
        let achieved = 10_000.0 * flops_per_token(&cfg) / 1e12;
        assert!((m.achieved_tflops - achieved).abs() < 1e-12);
        assert!((m.mfu - achieved / 0.2).abs() < 1e-12);
        assert!(m.describe().contains("of 2 × 0.1000 TFLOP/s (test)"));
    }

    #[test]
    fn the_step_rate_reports_tokens_and_mfu_over_its_window_at_most_once_per_period() {
        let cfg = ModelConfig::named("small").unwrap();
        let peak = Peak {
            tflops: 0.1,
            source: "x".repeat(300),
        };
        let mut r = StepRate::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 1,024 tokens per step every 100 ms: 10,240 tokens/s.
        assert!(
            r.on_step(at(0), 1, &cfg, 1024, 2, Some(&peak)).is_none(),
            "one completion measures nothing"
        );
        let first = r.on_step(at(100), 2, &cfg, 1024, 2, Some(&peak)).unwrap();
        assert_eq!(
            (first.step, first.steps, first.tokens_per_s),
            (2, 1, 10_240)
        );
        let achieved = 10_240.0 * flops_per_token(&cfg);
        assert_eq!(first.achieved_mflops, (achieved / 1e6).round() as u64);
        assert_eq!(first.flops_per_token, flops_per_token(&cfg) as u64);
        assert_eq!((first.devices, first.peak_mflops_per_device), (2, 100_000));
        assert_eq!(first.mfu_ppm, (achieved / 0.2e12 * 1e6).round() as u64);
        assert_eq!(
            first.peak_source.len(),
            phalanx_proto::Throughput::SOURCE_BYTES_MAX
        );
        // Within the period: nothing; after it, the window's rate (the last 9 intervals).
        for (i, ms) in (200..=900).step_by(100).enumerate() {
            assert!(r
                .on_step(at(ms), 3 + i as u64, &cfg, 1024, 2, Some(&peak))
                .is_none());
        }
        let slow = r.on_step(at(1300), 11, &cfg, 1024, 2, Some(&peak)).unwrap();
        assert_eq!(slow.steps, 9);
        assert_eq!(slow.tokens_per_s, (9.0 * 1024.0 / 1.2f64).round() as u64);
        // An unknown peak: throughput without MFU.
        let mut r = StepRate::new(Duration::ZERO);
        r.on_step(at(0), 1, &cfg, 1024, 1, None);
        let none = r.on_step(at(50), 2, &cfg, 1024, 1, None).unwrap();
        assert_eq!(
            (none.tokens_per_s, none.mfu_ppm, none.peak_mflops_per_device),
            (20_480, 0, 0)
        );
    }

    #[test]
    fn the_cpu_peak_is_measured_once_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("XDG_CACHE_HOME", dir.path());
        tch::set_num_threads(1);
        let first = cpu_peak(Precision::Fp32).unwrap();
        assert!(first.tflops > 0.0 && first.tflops < 10.0, "{first:?}");
        assert!(!first.source.contains("cached"));
        let file = dir.path().join("phalanx/cpu-peak.json");
        assert!(file.exists());
        let second = cpu_peak(Precision::Fp32).unwrap();
        // The same value, read back from JSON (serde_json's default float parser may be
        // one ulp off).
        assert!(
            (second.tflops - first.tflops).abs() <= 1e-12 * first.tflops,
            "{second:?} vs {first:?}"
        );
        assert!(second.source.contains("cached"), "{second:?}");
        // bf16: never below the f32 products' rate, which bounds a core without bf16 units.
        let bf16 = cpu_peak(Precision::Bf16).unwrap();
        assert!(bf16.tflops >= second.tflops, "{bf16:?} vs {second:?}");
        assert!(
            bf16.source.len() <= phalanx_proto::Throughput::SOURCE_BYTES_MAX,
            "{bf16:?}"
        );
    }

    #[test]
    fn the_cpu_model_is_the_first_model_name_line() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model_in(info).as_deref(), Some("AMD EPYC 9B14"));
        assert_eq!(cpu_model_in("processor\t: 0\nmodel name\t:  \n"), None);
        assert_eq!(cpu_model_in(""), None);
        assert_eq!(
            cpuinfo_field(info, "vendor_id").as_deref(),
            Some("AuthenticAMD")
        );
    }

    #[test]
    fn a_gpu_peak_comes_from_the_catalogue() {
        std::env::set_var("PHALANX_GPU_MODEL", "NVIDIA H200");
        let p = gpu_peak(0).unwrap();
        assert_eq!(p.tflops, 989.0);
        assert!(p.source.contains("H200-141GB"), "{p:?}");
        std::env::set_var("PHALANX_GPU_MODEL", "Voodoo 2");
        let e = gpu_peak(0).unwrap_err().to_string();
        assert!(e.contains("Voodoo 2") && e.contains("A100-80GB"), "{e}");
        std::env::remove_var("PHALANX_GPU_MODEL");
    }
}
