mod common;

use std::time::Duration;

use common::run_world;
use phalanx_collective::{deterministic, fixed_point, CollectiveError};

const M: usize = 12;
const LEN: usize = 2003;

fn micro_grads() -> Vec<Vec<f32>> {
    // varied magnitudes and signs, a few exact zeros, one large outlier
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..M)
        .map(|m| {
            (0..LEN)
                .map(|i| {
                    let u = (next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                    let mag = 10f64.powi((i % 9) as i32 - 6);
                    if i % 101 == 0 {
                        0.0
                    } else if i == 17 && m == 3 {
                        250.0
                    } else {
                        (u * mag) as f32
                    }
                })
                .collect()
        })
        .collect()
}

/// Which micro-batches rank `r` of `world` holds.
fn assignment(kind: &str, world: usize, r: usize) -> Vec<usize> {
    match kind {
        "round_robin" => (0..M).filter(|m| m % world == r).collect(),
        "contiguous" => {
            let per = M.div_ceil(world);
            (r * per..((r + 1) * per).min(M)).collect()
        }
        "all_on_last" => {
            if r == world - 1 {
                (0..M).rev().collect()
            } else {
                Vec::new()
            }
        }
        _ => unreachable!(),
    }
}

#[test]
fn bit_identical_across_distributions_and_worlds() {
    let grads = micro_grads();
    let single = {
        let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        fixed_point::mean_single_process(&refs, LEN).unwrap()
    };
    let mut seen = 0;
    for world in 1..=4 {
        for kind in ["round_robin", "contiguous", "all_on_last"] {
            let g2 = grads.clone();
            let out = run_world(world, 4096, move |g| {
                let mine = assignment(kind, g.world(), g.rank());
                let refs: Vec<&[f32]> = mine.iter().map(|&m| g2[m].as_slice()).collect();
                let mut out = vec![0f32; LEN];
                deterministic::reduce_mean(g, &refs, M, &mut out, Duration::from_secs(20)).unwrap();
                out
            });
            for (rank, o) in out.iter().enumerate() {
                let a: Vec<u32> = o.iter().map(|x| x.to_bits()).collect();
                let b: Vec<u32> = single.iter().map(|x| x.to_bits()).collect();
                assert!(
                    a == b,
                    "world {world} {kind} rank {rank} differs from the single-process result"
                );
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 3 * (1 + 2 + 3 + 4));
    // close to the f64 reference: error bounded by the quantum (relative to max)
    let max = 250.0f64;
    for i in 0..LEN {
        let r: f64 = grads.iter().map(|g| g[i] as f64).sum::<f64>() / M as f64;
        let tol = max * M as f64 * 2f64.powi(-60) + r.abs() * 2f64.powi(-23);
        assert!(
            (single[i] as f64 - r).abs() <= tol,
            "elem {i}: {} vs {r}",
            single[i]
        );
    }
    // sanity: the data is order-sensitive for plain f32 summation, so the
    // bit-identity above is not an accident of benign inputs
    let fwd: Vec<u32> = (0..LEN)
        .map(|i| grads.iter().map(|g| g[i]).sum::<f32>().to_bits())
        .collect();
    let rev: Vec<u32> = (0..LEN)
        .map(|i| grads.iter().rev().map(|g| g[i]).sum::<f32>().to_bits())
        .collect();
    assert_ne!(
        fwd, rev,
        "test data should make f32 summation order-dependent"
    );
}

#[test]
fn all_zero_gradients() {
    let out = run_world(3, 4096, |g| {
        let z = vec![0f32; 10];
        let mut out = vec![1f32; 10];
        deterministic::reduce_mean(g, &[&z], 3, &mut out, Duration::from_secs(10)).unwrap();
        out
    });
    assert!(out.iter().all(|o| o.iter().all(|&x| x == 0.0)));
}

#[test]
fn non_finite_is_a_typed_error_on_every_rank() {
    let out = run_world(3, 4096, |g| {
        let mut v = vec![1f32; 50];
        if g.rank() == 1 {
            v[42] = f32::NAN;
        }
        let mut out = vec![0f32; 50];
        deterministic::reduce_mean(g, &[&v], 3, &mut out, Duration::from_secs(10)).unwrap_err()
    });
    for (rank, e) in out.iter().enumerate() {
        match e {
            CollectiveError::NonFinite {
                source_rank,
                location,
            } => {
                assert_eq!(*source_rank, 1);
                if rank == 1 {
                    let l = location.expect("location on the source rank");
                    assert_eq!((l.micro_batch, l.element), (0, 42));
                    assert!(l.value.is_nan());
                } else {
                    assert!(location.is_none());
                }
            }
            other => panic!("rank {rank}: unexpected {other:?}"),
        }
        assert!(e.to_string().contains("non-finite"));
    }
}

#[test]
fn micro_batch_count_mismatch_is_reported_everywhere() {
    let out = run_world(2, 4096, |g| {
        let v = vec![1f32; 8];
        let mut out = vec![0f32; 8];
        // 2 micro-batches held, but 3 claimed
        deterministic::reduce_mean(g, &[&v], 3, &mut out, Duration::from_secs(10)).unwrap_err()
    });
    for e in out {
        assert!(
            matches!(e, CollectiveError::InvalidArgument { .. }),
            "{e:?}"
        );
    }
}
