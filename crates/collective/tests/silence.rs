//! The silence watch: a peer that makes no progress is reported while the operation waits,
//! and a slow peer that does come back costs nothing but the report.
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cfg, listeners};
use phalanx_collective::{BlockingGroup, PeerSilent, SilenceWatch};

#[test]
fn a_peer_that_stalls_is_reported_by_its_right_neighbour_and_the_op_still_completes() {
    let world = 3;
    let (ls, addrs) = listeners(world);
    let stall = Duration::from_millis(800);
    let after = Duration::from_millis(150);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut c = cfg(rank, addrs);
                c.op_timeout = Duration::from_secs(20);
                let mut g = BlockingGroup::connect(c, l).unwrap();
                let seen: Arc<Mutex<Vec<PeerSilent>>> = Arc::default();
                let s = seen.clone();
                g.set_silence_watch(Some(SilenceWatch::new(after, move |p| {
                    s.lock().unwrap().push(p.clone())
                })));
                if rank == 2 {
                    // A hung GPU: this rank enters the all-reduce late.
                    std::thread::sleep(stall);
                }
                let started = Instant::now();
                let mut v = vec![rank as i64 + 1; 100_000];
                g.all_reduce_sum_i64(&mut v).unwrap();
                assert!(v.iter().all(|x| *x == 6), "rank {rank}: wrong sum");
                let reports = seen.lock().unwrap().clone();
                (reports, started.elapsed())
            })
        })
        .collect();
    let res: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Rank 0 waits on its left neighbour, the stalled rank 2, and names it.
    let (r0, took) = &res[0];
    assert!(*took >= stall / 2, "rank 0 did not wait: {took:?}");
    let named: Vec<_> = r0.iter().filter(|p| p.inbound).collect();
    assert_eq!(named.len(), 1, "{r0:?}");
    assert_eq!(named[0].peer_rank, 2);
    assert_eq!(named[0].peer_addr, addrs[2]);
    assert!(named[0].silent_ms >= after.as_millis() as u64, "{named:?}");
    // The stalled rank itself waited on nobody.
    assert!(res[2].0.iter().all(|p| !p.inbound), "{:?}", res[2].0);
}

#[test]
fn no_report_when_every_peer_keeps_up() {
    let (ls, addrs) = listeners(2);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut g = BlockingGroup::connect(cfg(rank, addrs), l).unwrap();
                let seen: Arc<Mutex<Vec<PeerSilent>>> = Arc::default();
                let s = seen.clone();
                g.set_silence_watch(Some(SilenceWatch::new(Duration::from_secs(5), move |p| {
                    s.lock().unwrap().push(p.clone())
                })));
                for _ in 0..20 {
                    let mut v = vec![1i64; 1000];
                    g.all_reduce_sum_i64(&mut v).unwrap();
                }
                let n = seen.lock().unwrap().len();
                n
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 0);
    }
}

#[test]
fn a_neighbour_that_never_shows_up_is_reported_during_the_rendezvous() {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0);
    let seen: Arc<Mutex<Vec<PeerSilent>>> = Arc::default();
    let s = seen.clone();
    let watch = SilenceWatch::new(Duration::from_millis(150), move |p| {
        s.lock().unwrap().push(p.clone())
    });
    let mut c = cfg(0, addrs.clone());
    c.rendezvous_timeout = Duration::from_millis(1_500);
    // Rank 1 never starts: the rendezvous times out, but the silence was reported first.
    let e = BlockingGroup::connect_with(c, l0, None, Some(watch)).unwrap_err();
    assert!(e.peer_rank() == Some(1), "{e:?}");
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|p| p.peer_rank == 1 && p.peer_addr == addrs[1]),
        "{seen:?}"
    );
}
