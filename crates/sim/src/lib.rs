//! The cluster simulator: a discrete-event simulation of a large training job (16,384 to
//! 131,072 GPUs) in virtual time, over the controller's own policy code
//! (`phalanx_core::LeaderDuties`). It models the hardware, the job and its 4D-parallel
//! layout, the step time, failures by cause, detection, recovery under two policies and
//! checkpoints. No libtorch, no tokio, no wall clock: a run is a function of its file
//! and its seed. See docs/simulator.md.

pub mod calibrate;
pub mod cli;
pub mod config;
pub mod detect;
pub mod engine;
pub mod failures;
pub mod model;
pub mod report;
pub mod sweep;

pub use config::{parse, preset, schema_json, SimFile};
pub use engine::{daly_interval_s, run, Outcome};
pub use model::Job;

/// Build and run a file with a seed.
pub fn simulate(f: &SimFile, seed: u64) -> Result<Outcome, model::JobError> {
    let job = Job::build(f)?;
    Ok(run(f, &job, seed))
}
