//! Under Daly's assumptions (exponential failures, a fixed checkpoint cost δ, a fixed
//! restart time R) the simulated best checkpoint interval lies within 10% of
//! √(2δ(M+R)) (Daly 2006).

use phalanx_sim::config::CheckpointMode;
use phalanx_sim::failures::{Cause, CAUSES};
use phalanx_sim::sweep::{best, parse_param, sweep};
use phalanx_sim::{daly_interval_s, preset, Job};

#[test]
fn the_simulated_optimal_checkpoint_interval_is_within_10_percent_of_dalys() {
    let mut f = preset("llama3-405b-16k").unwrap();
    f.days = 1_500.0;
    f.checkpoint.mode = CheckpointMode::Sync;
    // δ = 60 s: 5.7 TB at 95 GB/s.
    f.hardware.storage_gb_per_s = 94.7;
    // One detection time for every cause, no stragglers, no planned stops: R is fixed.
    f.failures.planned_per_day = 0.0;
    f.failures.counts = CAUSES
        .iter()
        .map(|c| phalanx_sim::config::CauseCount {
            cause: c.cause,
            count: if c.cause == Cause::GpuThermal {
                0.0
            } else {
                c.llama3_count
            },
        })
        .collect();
    f.policy.restart.hang_detect_s = f.policy.restart.crash_detect_s;
    let job = Job::build(&f).unwrap();
    let rates = phalanx_sim::failures::Rates::new(&f.failures, f.hardware.gpus);
    let r = f.policy.restart.crash_detect_s + f.policy.restart.restart_s + job.checkpoint_write_s;
    let daly_min = daly_interval_s(job.checkpoint_write_s, rates.mtbf_s(), r) / 60.0;
    let grid = format!(
        "checkpoint_interval_min={:.3}..{:.3}:11",
        daly_min * 0.4,
        daly_min * 2.5
    );
    let s = parse_param(&grid).unwrap();
    let seeds = [1, 2, 3];
    let result = sweep(&f, &s, &seeds).unwrap();
    assert!((result.daly_interval_min - daly_min).abs() / daly_min < 1e-9);
    let found = best(&result).unwrap();
    let off = (found / daly_min - 1.0).abs();
    assert!(
        off <= 0.10,
        "simulated optimum {found:.2} min, Daly {daly_min:.2} min ({:.1}% off); seeds {seeds:?}\n{}",
        off * 100.0,
        phalanx_sim::sweep::text(&result)
    );
}
