//! The simulator against the Llama 3 405B paper: 16,384 H100s, 54 days, the paper's cause
//! rates, restarts from checkpoints (policy "restart"). The paper reports 419 unexpected
//! interruptions, the cause mix of its Table 5, and "higher than 90%" effective training
//! time. The table in docs/simulator.md comes from `phalanx sim run --preset
//! llama3-405b-16k --seed N`.

use std::collections::BTreeMap;

use phalanx_sim::failures::{Cause, CAUSES, LLAMA3_UNEXPECTED};
use phalanx_sim::{preset, run, Job};

const SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[test]
fn llama3_405b_interruptions_cause_mix_and_effective_training_time_match_the_paper() {
    let f = preset("llama3-405b-16k").unwrap();
    let job = Job::build(&f).unwrap();
    let sd = LLAMA3_UNEXPECTED.sqrt();
    let mut pooled: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut total = 0u64;
    for seed in SEEDS {
        let o = run(&f, &job, seed);
        // Each run: within 4 standard deviations of a Poisson count of mean 419.
        let n = o.interruptions as f64;
        assert!(
            (n - LLAMA3_UNEXPECTED).abs() <= 4.0 * sd,
            "seed {seed}: {n} interruptions, paper 419 (sd {sd:.1}); replay: phalanx sim run --preset llama3-405b-16k --seed {seed}"
        );
        assert!(
            o.effective_training_time > 0.90,
            "seed {seed}: effective training time {:.4} (the paper: higher than 90%)",
            o.effective_training_time
        );
        for (c, k) in &o.interruptions_by_cause {
            *pooled.entry(*c).or_default() += k;
        }
        total += o.interruptions;
    }
    // The mean over the seeds: within 3 standard errors.
    let mean = total as f64 / SEEDS.len() as f64;
    let se = sd / (SEEDS.len() as f64).sqrt();
    assert!(
        (mean - LLAMA3_UNEXPECTED).abs() <= 3.0 * se,
        "mean {mean:.1} over seeds {SEEDS:?}, paper 419 (standard error {se:.1})"
    );
    // The cause mix: Pearson's chi-square of the pooled counts against the paper's shares
    // (causes expected fewer than 5 times pooled into one bin), below the 0.1% critical
    // value.
    let mut chi2 = 0.0;
    let mut bins = 0;
    let (mut small_obs, mut small_exp) = (0.0, 0.0);
    for c in CAUSES {
        let expected = total as f64 * c.llama3_count / LLAMA3_UNEXPECTED;
        let observed = pooled.get(&c.cause).copied().unwrap_or(0) as f64;
        if expected < 5.0 * SEEDS.len() as f64 {
            small_obs += observed;
            small_exp += expected;
            continue;
        }
        chi2 += (observed - expected).powi(2) / expected;
        bins += 1;
    }
    chi2 += (small_obs - small_exp).powi(2) / small_exp;
    bins += 1;
    // Critical values of chi-square at p = 0.001 for df = bins - 1.
    let critical = [
        0.0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91,
        34.53, 36.12, 37.70, 39.25, 40.79, 42.31,
    ];
    let df = bins - 1;
    assert!(
        chi2 < critical[df],
        "cause mix: chi-square {chi2:.1} over {df} degrees of freedom (critical {}), pooled {pooled:?}",
        critical[df]
    );
}
