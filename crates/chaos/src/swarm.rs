//! The swarm: faults drawn from the seed, a Poisson process per kind.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::*;

/// A deterministic index in `0..n` for the `k`-th firing of fault `index` under `seed`
/// (how `random-worker` is resolved).
pub fn pick(seed: u64, index: usize, k: u64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k.rotate_left(17),
    );
    rng.gen_range(0..n)
}

/// The swarm's faults for `seed`, as `at_s` faults up to `horizon_s` (or `stop_s`),
/// at least `min_gap_s` apart; `first_index` numbers them after the file's own.
pub fn draw(
    sw: &SwarmSpec,
    cluster: &ClusterSpec,
    seed: u64,
    horizon_s: f64,
    first_index: usize,
) -> Vec<Fault> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5a4a_c0ff_ee00);
    let stop = sw.stop_s.unwrap_or(horizon_s).min(horizon_s);
    let mut draws: Vec<(f64, FaultKind)> = Vec::new();
    for (&kind, &rate) in &sw.rates_per_min {
        if !(rate.is_finite() && rate > 0.0) {
            continue;
        }
        let mean_s = 60.0 / rate;
        let mut t = sw.start_s;
        loop {
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            t += -u.ln() * mean_s;
            if t >= stop || t.is_nan() || draws.len() >= crate::parse::FAULTS_MAX {
                break;
            }
            draws.push((t, kind));
        }
    }
    draws.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<Fault> = Vec::new();
    let mut last = f64::NEG_INFINITY;
    for (t, kind) in draws {
        if t - last < sw.min_gap_s {
            continue;
        }
        last = t;
        let target = match kind {
            FaultKind::ControllerPause => Some(Target::Controller(
                1 + rng.gen_range(0..cluster.controllers.max(1)) as u64,
            )),
            FaultKind::LinkDown | FaultKind::CpuHog => {
                Some(Target::Host(rng.gen_range(0..cluster.hosts.max(1))))
            }
            k if k.targetless() => None,
            _ => Some(Target::RandomWorker),
        };
        out.push(Fault {
            index: first_index + out.len(),
            kind,
            target,
            trigger: Trigger::AtS((t * 10.0).round() / 10.0),
            delay_s: 0.0,
            duration_s: kind.has_duration().then_some(sw.duration_s),
            factor: 4.0,
            threads: 2,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swarm() -> SwarmSpec {
        SwarmSpec {
            rates_per_min: [(FaultKind::Kill, 2.0), (FaultKind::Hang, 1.0)]
                .into_iter()
                .collect(),
            start_s: 5.0,
            stop_s: None,
            duration_s: 3.0,
            min_gap_s: 8.0,
        }
    }

    #[test]
    fn the_draw_is_a_function_of_the_seed() {
        let c = ClusterSpec::default();
        let a = draw(&swarm(), &c, 1, 600.0, 0);
        assert_eq!(a, draw(&swarm(), &c, 1, 600.0, 0));
        assert_ne!(a, draw(&swarm(), &c, 2, 600.0, 0));
        // About 3 a minute for 10 minutes, thinned by the gap.
        assert!((10..=40).contains(&a.len()), "{}", a.len());
        let times: Vec<f64> = a
            .iter()
            .map(|f| match f.trigger {
                Trigger::AtS(t) => t,
                _ => panic!("swarm faults fire at_s"),
            })
            .collect();
        assert!(
            times.windows(2).all(|w| w[1] - w[0] >= 8.0 - 0.1),
            "{times:?}"
        );
        assert!(times.iter().all(|t| (5.0..600.0).contains(t)));
        assert!(a
            .iter()
            .all(|f| f.duration_s.is_some() == f.kind.has_duration()));
    }

    #[test]
    fn pick_is_deterministic_and_in_range() {
        for k in 0..100 {
            let i = pick(9, 3, k, 4);
            assert!(i < 4);
            assert_eq!(i, pick(9, 3, k, 4));
        }
        assert_eq!(pick(1, 1, 1, 0), 0);
    }
}
