//! The data plane's training math: a GPT model over tch, byte-level data, the
//! deterministic sampler, AdamW over flat buffers, and device handling (emulated GPUs on
//! CPU with a memory cap, or real CUDA devices).
//!
//! Nothing here does networking: the step loop that talks to peers lives in
//! `phalanx-worker`. One step of training math is split so that a worker can put a
//! reduction between the two halves: [`engine::Engine::micro_grad`] then
//! [`engine::Engine::apply`].
pub mod config;
pub mod cuda_io;
pub mod data;
pub mod device;
pub mod engine;
pub mod export;
pub mod generate;
pub mod mfu;
pub mod model;
pub mod optim;
pub mod sampler;

pub use config::ModelConfig;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("corpus: {0}")]
    Corpus(String),
    #[error("device: {0}")]
    Device(String),
    #[error("out of device memory on {device}: need {need_bytes} bytes ({need_gib:.3} GiB) for {what}, the device has {have_bytes} bytes ({have_gib:.3} GiB)",
        need_gib = *need_bytes as f64 / GIB, have_gib = *have_bytes as f64 / GIB)]
    OutOfMemory {
        device: String,
        what: String,
        need_bytes: u64,
        have_bytes: u64,
    },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("non-finite {what} at step {step}")]
    NonFinite { what: String, step: u64 },
}

const GIB: f64 = (1u64 << 30) as f64;
