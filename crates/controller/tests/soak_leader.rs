//! Leader stability soak (ignored by default; `just soak-leader`): three in-process
//! controllers on disk, clients writing and reading without pause, and busy threads beside
//! them (`PHALANX_SOAK_BUSY`, 2) on this machine's cores. With no fault injected, every new
//! term is a spurious election; the soak prints how many there were and fails on any.
//! `PHALANX_SOAK_S` sets the length (600 s), `PHALANX_SOAK_ELECTION_TICK` the election
//! timeout in 10 ms ticks (10, drawn from 10..20).

use phalanx_proto::RaftRole;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_controller::client::{Client, Credentials};
use phalanx_proto::Command;

mod common;
use common::{status, InProcess};

#[test]
#[ignore = "a 10-minute soak; run with --ignored (just soak-leader)"]
fn no_spurious_elections_under_load_beside_busy_threads() {
    let secs: u64 = std::env::var("PHALANX_SOAK_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let busy: usize = std::env::var("PHALANX_SOAK_BUSY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // On disk (not tmpfs): the fsyncs are part of the load.
    let dir = tempfile::tempdir_in(std::env::var("PHALANX_SOAK_DIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let election_tick: Option<usize> = std::env::var("PHALANX_SOAK_ELECTION_TICK")
        .ok()
        .and_then(|v| v.parse().ok());
    let cluster = InProcess::start_in(dir, 3, |mut cfg| {
        if let Some(t) = election_tick {
            cfg.election_tick = t;
        }
        cfg
    });
    let peers = cluster.peers.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..busy {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..100_000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                }
                std::hint::black_box(x);
            }
        }));
    }
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    for c in 0..4 {
        let (stop, ops, errors) = (stop.clone(), ops.clone(), errors.clone());
        let addrs: Vec<String> = peers.values().cloned().collect();
        threads.push(std::thread::spawn(move || {
            let client = Client::new(addrs, Credentials::insecure(common::TOKEN)).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let ok = if i % 2 == 0 {
                    client
                        .command(Command::SetAnnotation {
                            key: format!("c{c}"),
                            value: i.to_string(),
                        })
                        .is_ok()
                } else {
                    client
                        .get::<serde_json::Value>(&format!("/v1/annotations/c{c}"))
                        .is_ok()
                        || i < 4
                };
                if ok {
                    ops.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // The first leader's term is the baseline; every later term is an election.
    let t0 = Instant::now();
    let mut first_term = None;
    let mut max_term = 0;
    let mut terms_seen: Vec<(f64, u64, u64)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        for (id, a) in &peers {
            if let Some(s) = status(a) {
                if s.role == RaftRole::Leader {
                    if first_term.is_none() {
                        first_term = Some(s.term);
                    }
                    if s.term > max_term {
                        max_term = s.term;
                        terms_seen.push((t0.elapsed().as_secs_f64(), s.term, *id));
                    }
                }
                max_term = max_term.max(s.term);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    drop(cluster);
    let first = first_term.expect("a leader was elected");
    let spurious = max_term - first;
    println!(
        "soak: {secs} s, {busy} busy threads, {} client operations ({} errors); leader terms {:?}; \
         spurious elections (new terms after the first leader): {spurious}",
        ops.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        terms_seen
    );
    assert_eq!(spurious, 0, "spurious elections: {terms_seen:?}");
}
