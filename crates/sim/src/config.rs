//! The simulation file: what `serde` reads from TOML and what `schemars` describes in
//! `crates/sim/sim.schema.json`. Field names carry their units. `validate` states the
//! rules the types cannot; every error names the field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::failures::Cause;

/// One simulated training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimFile {
    /// A name for the reports.
    pub name: String,
    /// Length of the simulated run in days of wall time.
    pub days: f64,
    /// Seed of the failure draws (`--seed` overrides it).
    #[serde(default = "d_seed")]
    pub seed: u64,
    pub hardware: Hardware,
    pub model: ModelSpec,
    pub layout: Layout,
    #[serde(default)]
    pub failures: Failures,
    #[serde(default)]
    pub checkpoint: Checkpoint,
    pub policy: Policy,
}

fn d_seed() -> u64 {
    1
}

/// The machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// A GPU of the device catalogue: `H100-SXM-80GB`, `H200-141GB`, `A100-80GB`,
    /// `B200-180GB`.
    pub gpu: String,
    /// GPUs in the job (must equal tp x pp x dp x ep of the layout... see `layout`).
    pub gpus: u64,
    #[serde(default = "d_gpus_per_host")]
    pub gpus_per_host: u64,
    /// NVLink bandwidth per GPU, one direction, GB/s (H100 NVLink 4: 450).
    #[serde(default = "d_nvlink")]
    pub nvlink_gb_per_s: f64,
    /// Network bandwidth per GPU between hosts, GB/s (one 400 Gb/s NIC per GPU: 50).
    #[serde(default = "d_net")]
    pub network_gb_per_s: f64,
    /// One-way latency between hosts, µs.
    #[serde(default = "d_latency")]
    pub network_latency_us: f64,
    /// Aggregate storage bandwidth for checkpoints (write and read), GB/s.
    #[serde(default = "d_storage")]
    pub storage_gb_per_s: f64,
}

fn d_gpus_per_host() -> u64 {
    8
}
fn d_nvlink() -> f64 {
    450.0
}
fn d_net() -> f64 {
    50.0
}
fn d_latency() -> f64 {
    10.0
}
fn d_storage() -> f64 {
    2_000.0
}

/// The Transformer: a preset, or every shape field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `llama3-8b`, `llama3-70b` or `llama3-405b`; fields given beside it override it.
    #[serde(default)]
    pub preset: Option<String>,
    pub layers: Option<u64>,
    pub hidden: Option<u64>,
    pub ffn_hidden: Option<u64>,
    pub heads: Option<u64>,
    pub kv_heads: Option<u64>,
    pub vocab: Option<u64>,
    pub seq_len: Option<u64>,
    /// Sequences per optimizer step.
    pub global_batch: Option<u64>,
    /// Experts per MoE layer (absent or 1: dense).
    pub experts: Option<u64>,
    /// Experts each token is routed to.
    pub experts_active: Option<u64>,
}

/// The 4D-parallel layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub tp: u64,
    pub pp: u64,
    pub dp: u64,
    /// Expert parallelism (MoE only; it splits the data-parallel ranks' experts).
    #[serde(default = "one")]
    pub ep: u64,
    /// Sequences per micro-batch.
    #[serde(default = "one")]
    pub micro_batch: u64,
    /// Interleaved pipeline stages per rank (the bubble shrinks by this factor).
    #[serde(default = "one")]
    pub virtual_stages: u64,
    /// Model FLOPs utilisation of the compute alone (communication is added on top).
    #[serde(default = "d_mfu")]
    pub compute_mfu: f64,
    /// Share of the data-parallel gradient traffic hidden behind the backward pass.
    #[serde(default = "d_dp_overlap")]
    pub dp_overlap: f64,
    /// Activation recomputation: `selective` or `full`.
    #[serde(default)]
    pub recompute: Recompute,
}

fn one() -> u64 {
    1
}
fn d_mfu() -> f64 {
    0.45
}
fn d_dp_overlap() -> f64 {
    0.9
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    #[default]
    Selective,
    Full,
}

/// Failure rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Failures {
    /// Multiplies every rate (1 = the Llama 3 405B rates per GPU).
    #[serde(default = "d_scale")]
    pub scale: f64,
    /// Planned interruptions (maintenance, upgrades) per day for the whole job
    /// (Llama 3: 47 in 54 days).
    #[serde(default = "d_planned")]
    pub planned_per_day: f64,
    /// Slow-down factor of a thermal straggler's steps.
    #[serde(default = "d_straggler")]
    pub straggler_factor: f64,
    /// Per-cause overrides: interruptions per 16,384 GPUs in 54 days (the paper's unit).
    #[serde(default)]
    pub counts: Vec<CauseCount>,
}

fn d_scale() -> f64 {
    1.0
}
fn d_planned() -> f64 {
    47.0 / 54.0
}
fn d_straggler() -> f64 {
    2.0
}

impl Default for Failures {
    fn default() -> Self {
        Failures {
            scale: 1.0,
            planned_per_day: d_planned(),
            straggler_factor: d_straggler(),
            counts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CauseCount {
    pub cause: Cause,
    pub count: f64,
}

/// Checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    #[serde(default)]
    pub mode: CheckpointMode,
    /// Minutes between checkpoints (0.1 to a year); absent: the Young/Daly optimum for
    /// this run (at least 6 s).
    #[serde(default)]
    pub interval_min: Option<f64>,
    /// An asynchronous checkpoint blocks training for this share of a synchronous one
    /// (PyTorch DCP async: 6.3 s of 148.8 s = 4.2%).
    #[serde(default = "d_async_fraction")]
    pub async_blocking_fraction: f64,
    /// Bytes of checkpointed state per parameter (bf16 weights, fp32 master, Adam m, v).
    #[serde(default = "d_bytes_per_param")]
    pub bytes_per_param: f64,
}

fn d_async_fraction() -> f64 {
    0.042
}
fn d_bytes_per_param() -> f64 {
    14.0
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            mode: CheckpointMode::Sync,
            interval_min: None,
            async_blocking_fraction: d_async_fraction(),
            bytes_per_param: d_bytes_per_param(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointMode {
    #[default]
    Sync,
    Async,
}

impl CheckpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Sync => "synchronous",
            CheckpointMode::Async => "asynchronous",
        }
    }
}

/// What happens after a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub kind: PolicyKind,
    /// Baseline (restart) timings.
    #[serde(default)]
    pub restart: RestartTimings,
    /// Phalanx timings (from `phalanx sim calibrate`).
    #[serde(default)]
    pub phalanx: PhalanxTimings,
    /// Hot spare hosts (Phalanx).
    #[serde(default)]
    pub spare_hosts: u64,
    /// A failed host is back in the spare pool after this long (Phalanx).
    #[serde(default = "d_repair")]
    pub repair_hours: f64,
}

fn d_repair() -> f64 {
    24.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// (a) Restart the whole job from the last checkpoint on persistent storage.
    Restart,
    /// (b) Hot spares, state from survivors, elastic shrink and grow, per-step recovery;
    /// the checkpoint only as the last resort.
    Phalanx,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Restart => "restart",
            PolicyKind::Phalanx => "phalanx",
        }
    }
}

/// The baseline's timings (assumptions; see docs/simulator.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartTimings {
    /// A crash (the process exits, the device reports an error) is noticed after this.
    #[serde(default = "d_crash_detect")]
    pub crash_detect_s: f64,
    /// A hang is noticed when the collective times out (PyTorch's NCCL default: 10 min).
    #[serde(default = "d_hang_detect")]
    pub hang_detect_s: f64,
    /// A straggler is noticed by monitoring after this.
    #[serde(default = "d_straggler_detect")]
    pub straggler_detect_s: f64,
    /// Rescheduling, process start and collective initialisation of the whole job
    /// (the checkpoint load is added from the storage bandwidth).
    #[serde(default = "d_restart")]
    pub restart_s: f64,
}

fn d_crash_detect() -> f64 {
    30.0
}
fn d_hang_detect() -> f64 {
    600.0
}
fn d_straggler_detect() -> f64 {
    1_800.0
}
fn d_restart() -> f64 {
    480.0
}

impl Default for RestartTimings {
    fn default() -> Self {
        RestartTimings {
            crash_detect_s: d_crash_detect(),
            hang_detect_s: d_hang_detect(),
            straggler_detect_s: d_straggler_detect(),
            restart_s: d_restart(),
        }
    }
}

/// Phalanx's timings: measured on the emulated cluster (`phalanx sim calibrate`). The
/// defaults come from `phalanx demo --steps 120` on this project's 2-core machine
/// (2026-11-30; docs/simulator.md, "Calibration").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PhalanxTimings {
    /// Worker heartbeat period, ms.
    #[serde(default = "d_hb")]
    pub heartbeat_ms: u64,
    /// A peer waiting in a collective reports a silent rank after this, ms.
    #[serde(default = "d_silence")]
    pub silence_report_ms: u64,
    /// The controller's lease timing (as `LeaseConfig`).
    #[serde(default = "d_confirm")]
    pub silent_confirm_ms: u64,
    #[serde(default = "d_suspect")]
    pub suspect_after_ms: u64,
    #[serde(default = "d_fail")]
    pub fail_after_ms: u64,
    /// A crash (or a device's own error report) reaches the controller as a peer's or
    /// the worker's report after this, ms (measured: kill, `detect_s`).
    #[serde(default = "d_crash_report")]
    pub crash_report_ms: u64,
    /// Bound on a collective: a hang with every process alive ends after this, ms.
    #[serde(default = "d_op_timeout")]
    pub op_timeout_ms: u64,
    /// From the failed decision to training again (new plan, rendezvous, state
    /// agreement), with no state to move, ms.
    #[serde(default = "d_replan")]
    pub replan_ms: u64,
    /// A process restart after a software fault, s (its host then rejoins as a spare).
    #[serde(default = "d_process_restart")]
    pub process_restart_s: f64,
    /// Steps between gradient spot checks (silent data corruption is caught within).
    #[serde(default = "d_grad_check")]
    pub grad_check_interval_steps: u64,
    /// Where these numbers were measured.
    #[serde(default = "d_source")]
    pub source: String,
}

fn d_source() -> String {
    "phalanx demo --steps 120, calibrated with phalanx sim calibrate (docs/simulator.md)".into()
}
fn d_hb() -> u64 {
    100
}
fn d_silence() -> u64 {
    159
}
fn d_confirm() -> u64 {
    500
}
fn d_suspect() -> u64 {
    2_000
}
fn d_fail() -> u64 {
    5_000
}
fn d_crash_report() -> u64 {
    222
}
fn d_op_timeout() -> u64 {
    3_000
}
fn d_replan() -> u64 {
    483
}
fn d_process_restart() -> f64 {
    60.0
}
fn d_grad_check() -> u64 {
    10
}

impl Default for PhalanxTimings {
    fn default() -> Self {
        PhalanxTimings {
            heartbeat_ms: d_hb(),
            silence_report_ms: d_silence(),
            silent_confirm_ms: d_confirm(),
            crash_report_ms: d_crash_report(),
            op_timeout_ms: d_op_timeout(),
            suspect_after_ms: d_suspect(),
            fail_after_ms: d_fail(),
            replan_ms: d_replan(),
            process_restart_s: d_process_restart(),
            grad_check_interval_steps: d_grad_check(),
            source: d_source(),
        }
    }
}

/// A problem with a simulation file, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Toml { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

/// The presets `--preset` accepts: a name and its TOML.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "llama3-405b-16k",
        include_str!("../presets/llama3-405b-16k.toml"),
    ),
    (
        "llama3-405b-131k",
        include_str!("../presets/llama3-405b-131k.toml"),
    ),
    (
        "llama3-70b-2k",
        include_str!("../presets/llama3-70b-2k.toml"),
    ),
    ("llama3-8b-1k", include_str!("../presets/llama3-8b-1k.toml")),
];

pub fn preset(name: &str) -> Result<SimFile, ConfigError> {
    let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(ConfigError::Invalid {
            file: "--preset".into(),
            field: "preset".into(),
            message: format!("unknown preset {name:?} (known: {})", names.join(", ")),
        });
    };
    parse(text, &format!("preset {name}"))
}

/// Parse and validate a simulation file.
pub fn parse(text: &str, file: &str) -> Result<SimFile, ConfigError> {
    let sim: SimFile = toml::from_str(text).map_err(|e| ConfigError::Toml {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    sim.validate(file)?;
    Ok(sim)
}

fn finite_pos(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

impl SimFile {
    /// The rules the types cannot state. The model and layout are checked further (shape,
    /// divisibility, memory fit) when the run is built (`model::Job::build`).
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| {
            Err(ConfigError::Invalid {
                file: file.to_string(),
                field: field.to_string(),
                message,
            })
        };
        if !(self.days.is_finite() && self.days > 0.0 && self.days <= 3_650.0) {
            return bad("days", format!("{} (expected 0 < days <= 3650)", self.days));
        }
        let h = &self.hardware;
        if h.gpus == 0 || h.gpus > 1 << 22 {
            return bad(
                "hardware.gpus",
                format!("{} (expected 1..=4194304)", h.gpus),
            );
        }
        if h.gpus_per_host == 0 || h.gpus % h.gpus_per_host != 0 {
            return bad(
                "hardware.gpus_per_host",
                format!(
                    "{} does not divide hardware.gpus {}",
                    h.gpus_per_host, h.gpus
                ),
            );
        }
        for (f, v) in [
            ("hardware.nvlink_gb_per_s", h.nvlink_gb_per_s),
            ("hardware.network_gb_per_s", h.network_gb_per_s),
            ("hardware.storage_gb_per_s", h.storage_gb_per_s),
        ] {
            if !finite_pos(v) {
                return bad(f, format!("{v} (expected a positive number)"));
            }
        }
        if !(h.network_latency_us.is_finite() && h.network_latency_us >= 0.0) {
            return bad(
                "hardware.network_latency_us",
                format!("{} (expected >= 0)", h.network_latency_us),
            );
        }
        let l = &self.layout;
        // The parallel degrees are at most the GPU count (their product must equal it);
        // the others within sane bounds, so that no product of them overflows.
        for (f, v, max) in [
            ("layout.tp", l.tp, h.gpus),
            ("layout.pp", l.pp, h.gpus),
            ("layout.dp", l.dp, h.gpus),
            ("layout.ep", l.ep, h.gpus),
            ("layout.micro_batch", l.micro_batch, 1 << 16),
            ("layout.virtual_stages", l.virtual_stages, 1 << 10),
        ] {
            if v == 0 || v > max {
                return bad(f, format!("{v} (expected 1..={max})"));
            }
        }
        if !(l.compute_mfu > 0.0 && l.compute_mfu <= 1.0) {
            return bad(
                "layout.compute_mfu",
                format!("{} (expected 0 < mfu <= 1)", l.compute_mfu),
            );
        }
        if !(0.0..=1.0).contains(&l.dp_overlap) {
            return bad(
                "layout.dp_overlap",
                format!("{} (expected 0..=1)", l.dp_overlap),
            );
        }
        let f = &self.failures;
        if !(f.scale.is_finite() && f.scale >= 0.0 && f.scale <= 1_000.0) {
            return bad("failures.scale", format!("{} (expected 0..=1000)", f.scale));
        }
        if !(f.planned_per_day.is_finite() && f.planned_per_day >= 0.0) {
            return bad(
                "failures.planned_per_day",
                format!("{} (expected >= 0)", f.planned_per_day),
            );
        }
        if !(f.straggler_factor.is_finite() && f.straggler_factor >= 1.0) {
            return bad(
                "failures.straggler_factor",
                format!("{} (expected >= 1)", f.straggler_factor),
            );
        }
        for (i, c) in f.counts.iter().enumerate() {
            if !(c.count.is_finite() && c.count >= 0.0) {
                return bad(
                    &format!("failures.counts[{i}].count"),
                    format!("{} (expected >= 0)", c.count),
                );
            }
        }
        let c = &self.checkpoint;
        if let Some(m) = c.interval_min {
            if !(m.is_finite() && (0.1..=525_600.0).contains(&m)) {
                return bad(
                    "checkpoint.interval_min",
                    format!("{m} (expected 0.1 to 525600 minutes)"),
                );
            }
        }
        if !(c.async_blocking_fraction >= 0.0 && c.async_blocking_fraction <= 1.0) {
            return bad(
                "checkpoint.async_blocking_fraction",
                format!("{} (expected 0..=1)", c.async_blocking_fraction),
            );
        }
        if !finite_pos(c.bytes_per_param) {
            return bad(
                "checkpoint.bytes_per_param",
                format!("{} (expected > 0)", c.bytes_per_param),
            );
        }
        let p = &self.policy;
        for (f, v) in [
            ("policy.restart.crash_detect_s", p.restart.crash_detect_s),
            ("policy.restart.hang_detect_s", p.restart.hang_detect_s),
            (
                "policy.restart.straggler_detect_s",
                p.restart.straggler_detect_s,
            ),
            ("policy.restart.restart_s", p.restart.restart_s),
            (
                "policy.phalanx.process_restart_s",
                p.phalanx.process_restart_s,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(f, format!("{v} (expected >= 0 seconds)"));
            }
        }
        if !finite_pos(p.repair_hours) {
            return bad(
                "policy.repair_hours",
                format!("{} (expected > 0)", p.repair_hours),
            );
        }
        let t = &p.phalanx;
        if t.heartbeat_ms == 0 || t.heartbeat_ms > 60_000 {
            return bad(
                "policy.phalanx.heartbeat_ms",
                format!("{} (expected 1..=60000)", t.heartbeat_ms),
            );
        }
        if !(0 < t.suspect_after_ms && t.suspect_after_ms < t.fail_after_ms) {
            return bad(
                "policy.phalanx.suspect_after_ms",
                format!(
                    "need 0 < suspect_after_ms ({}) < fail_after_ms ({})",
                    t.suspect_after_ms, t.fail_after_ms
                ),
            );
        }
        if !(0 < t.silent_confirm_ms && t.silent_confirm_ms <= t.fail_after_ms) {
            return bad(
                "policy.phalanx.silent_confirm_ms",
                format!(
                    "need 0 < silent_confirm_ms ({}) <= fail_after_ms ({})",
                    t.silent_confirm_ms, t.fail_after_ms
                ),
            );
        }
        for (f, v) in [
            ("policy.phalanx.fail_after_ms", t.fail_after_ms),
            ("policy.phalanx.silence_report_ms", t.silence_report_ms),
            ("policy.phalanx.crash_report_ms", t.crash_report_ms),
            ("policy.phalanx.op_timeout_ms", t.op_timeout_ms),
            ("policy.phalanx.replan_ms", t.replan_ms),
        ] {
            if v > 3_600_000 {
                return bad(f, format!("{v} (expected <= 3600000 ms)"));
            }
        }
        if p.spare_hosts > h.gpus / h.gpus_per_host * 4 {
            return bad(
                "policy.spare_hosts",
                format!("{} (more than 4x the job's hosts)", p.spare_hosts),
            );
        }
        Ok(())
    }
}

/// The JSON Schema of a simulation file, as committed in `crates/sim/sim.schema.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(SimFile);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}
