mod common;

use common::run_world;

const LENS: &[usize] = &[0, 1, 2, 3, 4, 5, 7, 1000, 3001];

#[test]
fn all_reduce_sum_i64_worlds_1_to_5() {
    for world in 1..=5 {
        let out = run_world(world, 4096, |g| {
            let r = g.rank() as i64;
            let mut res = Vec::new();
            for &len in LENS {
                let mut v: Vec<i64> = (0..len as i64)
                    .map(|i| i * 1000 + r + if i == 0 { i64::MAX } else { 0 })
                    .collect();
                g.all_reduce_sum_i64(&mut v).unwrap();
                res.push(v);
            }
            res
        });
        let w = world as i64;
        for (rank, res) in out.iter().enumerate() {
            for (li, &len) in LENS.iter().enumerate() {
                let expect: Vec<i64> = (0..len as i64)
                    .map(|i| {
                        let mut s = 0i64;
                        for r in 0..w {
                            s = s.wrapping_add(i * 1000 + r + if i == 0 { i64::MAX } else { 0 });
                        }
                        s
                    })
                    .collect();
                assert_eq!(res[li], expect, "world {world} rank {rank} len {len}");
            }
        }
    }
}

#[test]
fn all_reduce_f32_and_max_f64_worlds_1_to_5() {
    for world in 1..=5 {
        let out = run_world(world, 1000, |g| {
            let r = g.rank();
            let mut res = Vec::new();
            for &len in LENS {
                let mut v: Vec<f32> = (0..len).map(|i| (i % 97) as f32 + r as f32).collect();
                g.all_reduce_sum_f32(&mut v).unwrap();
                let mut m: Vec<f64> = (0..len)
                    .map(|i| ((i * 7 + r * 13) % 11) as f64 - 5.0)
                    .collect();
                g.all_reduce_max_f64(&mut m).unwrap();
                res.push((v, m));
            }
            res
        });
        for (li, &len) in LENS.iter().enumerate() {
            let ev: Vec<f32> = (0..len)
                .map(|i| (0..world).map(|r| (i % 97) as f32 + r as f32).sum())
                .collect();
            let em: Vec<f64> = (0..len)
                .map(|i| {
                    (0..world)
                        .map(|r| ((i * 7 + r * 13) % 11) as f64 - 5.0)
                        .fold(f64::MIN, f64::max)
                })
                .collect();
            for res in &out {
                assert_eq!(res[li].0, ev, "f32 world {world} len {len}");
                assert_eq!(res[li].1, em, "max world {world} len {len}");
            }
        }
        // all ranks hold identical bits
        for res in &out[1..] {
            for li in 0..LENS.len() {
                assert_eq!(res[li].0, out[0][li].0);
            }
        }
    }
}

#[test]
fn all_gather_broadcast_barrier_worlds_1_to_5() {
    for world in 1..=5 {
        let out = run_world(world, 100, |g| {
            let r = g.rank();
            let w = g.world();
            // variable sizes, including empty and multi-chunk
            let mine: Vec<u8> = (0..(r * 137) % 450).map(|i| (i * 31 + r) as u8).collect();
            let gathered = g.all_gather(&mine).unwrap();
            let mut bcasts = Vec::new();
            for root in 0..w {
                for &len in &[0usize, 1, 99, 100, 101, 1000] {
                    let mut buf: Vec<u8> = if r == root {
                        (0..len).map(|i| (i * 7 + root) as u8).collect()
                    } else {
                        vec![0u8; len]
                    };
                    g.broadcast(&mut buf, root).unwrap();
                    bcasts.push(buf);
                }
            }
            g.barrier().unwrap();
            assert!(g.broadcast(&mut [0u8; 4], w).is_err());
            g.barrier().unwrap();
            (gathered, bcasts)
        });
        for (gathered, bcasts) in &out {
            assert_eq!(gathered.len(), world);
            for (r, blob) in gathered.iter().enumerate() {
                let e: Vec<u8> = (0..(r * 137) % 450).map(|i| (i * 31 + r) as u8).collect();
                assert_eq!(blob, &e, "world {world} blob {r}");
            }
            let mut k = 0;
            for root in 0..world {
                for &len in &[0usize, 1, 99, 100, 101, 1000] {
                    let e: Vec<u8> = (0..len).map(|i| (i * 7 + root) as u8).collect();
                    assert_eq!(bcasts[k], e, "world {world} root {root} len {len}");
                    k += 1;
                }
            }
        }
    }
}

#[test]
fn large_message_many_chunks_no_deadlock() {
    // 4 MiB per rank with the default 1 MiB chunks and 64 KiB chunks.
    for &chunk in &[1usize << 20, 64 << 10] {
        let out = run_world(3, chunk, |g| {
            let mut v = vec![1.0f32 + g.rank() as f32; 1 << 20];
            g.all_reduce_sum_f32(&mut v).unwrap();
            let mut w: Vec<i64> = vec![g.rank() as i64; (1 << 19) + 3];
            g.all_reduce_sum_i64(&mut w).unwrap();
            (v.iter().all(|&x| x == 6.0), w.iter().all(|&x| x == 3))
        });
        assert!(out.iter().all(|&(a, b)| a && b));
    }
}
