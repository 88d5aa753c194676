//! The worker: one process per (emulated or real) GPU.
//!
//! [`dp`] is the data-parallel step loop: every rank computes the gradients of its share
//! of the global batch's micro-batches, the ranks reduce them with the deterministic
//! (fixed-point) all-reduce, and every rank applies the same AdamW update. The result
//! does not depend on the world size.
//! [`rendezvous`] is the small stdio protocol by which `phalanx train` starts workers.
pub mod agent;
mod checkpoint_trace;
pub mod dp;
pub mod export;
pub mod fault;
pub mod job_checkpoints;
pub mod local_mean;
pub mod memory;
pub mod metrics;
pub mod numerics;
pub mod recovery_trace;
pub mod rendezvous;
pub mod silence;
pub mod snapshot;
pub mod state_sync;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Train(#[from] phalanx_train::TrainError),
    #[error("collective: {0}")]
    Collective(#[from] phalanx_collective::CollectiveError),
    #[error("replicas diverged: rank {rank} holds parameters {theirs}, rank 0 holds {ours}")]
    Diverged {
        rank: usize,
        ours: String,
        theirs: String,
    },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("controller: {0}")]
    Controller(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error(
        "replicas diverged with no majority ({hashes:?}); rolling back to the newest checkpoint"
    )]
    NoMajority { hashes: Vec<String> },
    #[error("this worker is quarantined: {0}")]
    Quarantined(String),
    #[error("epoch {epoch} was superseded by a newer plan")]
    Superseded { epoch: u64 },
    /// A gradient spot check failed: rank `verifier` recomputed micro-batch `micro` of
    /// `step` and got other bits than its owner. The step is not applied; redoing it
    /// brings in a third opinion.
    #[error(
        "gradient check failed at step {step}: micro-batch {micro} of rank {owner} differs from rank {verifier}'s recomputation"
    )]
    GradientMismatch {
        step: u64,
        micro: usize,
        owner: usize,
        verifier: usize,
    },
    /// Three computations of one micro-batch's gradient, and rank `rank`'s is the odd one.
    #[error("rank {rank}'s gradient of micro-batch {micro} at step {step} disagrees with two recomputations")]
    GradientCorrupt {
        rank: usize,
        micro: usize,
        step: u64,
    },
}
