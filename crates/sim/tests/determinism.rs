//! A run is a function of its file and its seed: the same seed gives the same bytes, and
//! the time accounting always adds up.

use phalanx_sim::config::{CheckpointMode, PolicyKind};
use phalanx_sim::{preset, report, run, Job};
use proptest::prelude::*;

#[test]
fn the_same_seed_gives_the_same_output_byte_for_byte() {
    for name in ["llama3-405b-16k", "llama3-70b-2k"] {
        let f = preset(name).unwrap();
        let job = Job::build(&f).unwrap();
        let a = run(&f, &job, 42);
        let b = run(&f, &job, 42);
        assert_eq!(report::text(&f, &job, &a), report::text(&f, &job, &b));
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap(),
            "{name}"
        );
        let c = run(&f, &job, 43);
        assert_ne!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&c).unwrap(),
            "{name}: another seed, another run"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Progress and lost GPU time add up to the GPU time of the run, under both policies,
    /// at any failure rate and checkpoint interval.
    #[test]
    fn lost_gpu_hours_and_progress_add_up_to_the_whole_run(
        seed in any::<u64>(),
        scale in 0.0f64..20.0,
        interval_min in 0.5f64..120.0,
        phalanx in any::<bool>(),
        spares in 0u64..8,
    ) {
        let mut f = preset("llama3-70b-2k").unwrap();
        f.days = 5.0;
        f.failures.scale = scale;
        f.checkpoint.interval_min = Some(interval_min);
        f.policy.spare_hosts = spares;
        if phalanx {
            f.policy.kind = PolicyKind::Phalanx;
            f.checkpoint.mode = CheckpointMode::Async;
        } else {
            f.policy.kind = PolicyKind::Restart;
            f.checkpoint.mode = CheckpointMode::Sync;
        }
        let job = Job::build(&f).unwrap();
        let o = run(&f, &job, seed);
        let all = job.gpus as f64 * f.days * 24.0;
        let lost: f64 = o.lost_gpu_h.values().sum();
        let useful = o.effective_training_time * all;
        prop_assert!(
            ((useful + lost) / all - 1.0).abs() < 1e-6,
            "seed {seed}: useful {useful:.1} + lost {lost:.1} != {all:.1} GPU-hours (scale {scale}, interval {interval_min} min, phalanx {phalanx}, spares {spares})"
        );
        prop_assert!((0.0..=1.0).contains(&o.effective_training_time), "seed {seed}");
    }
}
