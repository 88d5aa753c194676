//! The protocol's fixed vocabularies: each an enum with its one wire spelling (`as_str`,
//! which a test pins to the serde name), parsed from job files and command lines where
//! people write them.

use serde::{Deserialize, Serialize};

/// Health of one worker, as recorded in the replicated state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum WorkerHealth {
    /// Registered, not yet placed in a plan.
    Joining,
    Healthy,
    /// Missed heartbeats for longer than the suspect timeout.
    Suspect,
    /// Declared dead; it leaves the plan.
    Failed,
    /// Leaving gracefully at the operator's request.
    Draining,
    /// Kept out of plans (e.g. memory errors, silent data corruption).
    Quarantined,
    /// Healthy but not needed by the current plan.
    Spare,
}

impl WorkerHealth {
    pub const ALL: [WorkerHealth; 7] = [
        WorkerHealth::Joining,
        WorkerHealth::Healthy,
        WorkerHealth::Suspect,
        WorkerHealth::Failed,
        WorkerHealth::Draining,
        WorkerHealth::Quarantined,
        WorkerHealth::Spare,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerHealth::Joining => "joining",
            WorkerHealth::Healthy => "healthy",
            WorkerHealth::Suspect => "suspect",
            WorkerHealth::Failed => "failed",
            WorkerHealth::Draining => "draining",
            WorkerHealth::Quarantined => "quarantined",
            WorkerHealth::Spare => "spare",
        }
    }

    /// Can this worker be given a rank in a new plan?
    pub fn placeable(self) -> bool {
        matches!(
            self,
            WorkerHealth::Joining | WorkerHealth::Healthy | WorkerHealth::Spare
        )
    }
}

/// The arithmetic of the forward and backward passes. The master weights, the gradients
/// that are reduced and the AdamW moments stay f32 in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    Fp32,
    /// Matrix products and attention in bfloat16; norms, the residual stream, the loss
    /// and the gradients that leave the model in f32.
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Fp32, Precision::Bf16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The precision named `s` (as written in job files and on the command line).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which floating-point kernels a worker's libraries may pick, and so which bits it
/// computes. Workers of one profile compute the same bits on machines with one vendor's
/// x86-64 CPUs (measured: an AMD EPYC and an Intel Xeon differ under the same profile);
/// a job runs only on workers of its profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
pub enum NumericsProfile {
    /// ATen, MKL and oneDNN pinned to their AVX2 kernels.
    #[default]
    #[serde(rename = "x86-64-avx2")]
    X86_64Avx2,
    /// Whatever the libraries pick for the CPU they run on (fastest; not portable).
    #[serde(rename = "native")]
    Native,
}

impl NumericsProfile {
    pub const ALL: [NumericsProfile; 2] = [NumericsProfile::X86_64Avx2, NumericsProfile::Native];

    pub fn as_str(self) -> &'static str {
        match self {
            NumericsProfile::X86_64Avx2 => "x86-64-avx2",
            NumericsProfile::Native => "native",
        }
    }

    /// The profile named `s` (as written in job files and on the command line).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The variables the profile pins (or, for `native`, removes), with their values
    /// (`None`: unset). Read by libtorch's libraries once, when they initialise; see
    /// `phalanx_worker::numerics`.
    pub fn environment(self) -> [(&'static str, Option<&'static str>); 4] {
        let v = match self {
            NumericsProfile::X86_64Avx2 => [Some("avx2"), Some("AVX2"), Some("AVX2"), Some("AVX2")],
            NumericsProfile::Native => [None; 4],
        };
        [
            ("ATEN_CPU_CAPABILITY", v[0]),
            ("MKL_CBWR", v[1]),
            ("ONEDNN_MAX_CPU_ISA", v[2]),
            ("DNNL_MAX_CPU_ISA", v[3]),
        ]
    }
}

impl std::fmt::Display for NumericsProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a worker computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum DeviceKind {
    /// A GPU emulated on the CPU (libtorch's CPU device with a memory cap).
    #[default]
    #[serde(rename = "cpu-emulated")]
    CpuEmulated,
    /// A CUDA device.
    #[serde(rename = "cuda")]
    Cuda,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::CpuEmulated => "cpu-emulated",
            DeviceKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The model configurations of the data plane (their shapes are
/// `phalanx_train::config::ModelConfig::of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum ModelPreset {
    /// About 0.1M parameters (tests).
    #[serde(rename = "tiny")]
    Tiny,
    /// About 1M.
    #[serde(rename = "small")]
    Small,
    /// About 10M.
    #[serde(rename = "base")]
    Base,
    /// GPT-2 small's shape over the byte vocabulary (about 86M).
    #[serde(rename = "gpt2-124m")]
    Gpt2_124m,
}

impl ModelPreset {
    pub const ALL: [ModelPreset; 4] = [
        ModelPreset::Tiny,
        ModelPreset::Small,
        ModelPreset::Base,
        ModelPreset::Gpt2_124m,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelPreset::Tiny => "tiny",
            ModelPreset::Small => "small",
            ModelPreset::Base => "base",
            ModelPreset::Gpt2_124m => "gpt2-124m",
        }
    }

    /// The preset named `s` (as written in job files and on the command line).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Every name, for messages: `tiny, small, base, gpt2-124m`.
    pub fn names() -> String {
        Self::ALL.map(|p| p.as_str()).join(", ")
    }
}

impl std::fmt::Display for ModelPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a plan epoch's state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// The survivors' memory (their parameters and optimizer shards).
    Peer,
    /// The newest valid checkpoint.
    Checkpoint,
    /// Nothing held state: the seed's initial parameters.
    Initial,
}

impl StateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StateSource::Peer => "peer",
            StateSource::Checkpoint => "checkpoint",
            StateSource::Initial => "initial",
        }
    }

    /// The kind of a source text from a worker that predates `source_kind`.
    pub fn of_text(text: &str) -> Option<Self> {
        let t = text.trim();
        if t.starts_with("peer") {
            Some(StateSource::Peer)
        } else if t.starts_with("checkpoint") {
            Some(StateSource::Checkpoint)
        } else if t.contains("initial state") {
            Some(StateSource::Initial)
        } else {
            None
        }
    }
}

impl std::fmt::Display for StateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
