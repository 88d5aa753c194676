//! Peer links that follow the network: a connection that went silent during a cut (the
//! kernel keeps it open and its retransmissions back off for seconds) must be noticed and
//! redialed, so a healed follower follows the leader again within a few election timeouts.
//!
//! Three in-process controllers; every directed peer link goes through a proxy. A
//! "stalling" cut stops forwarding on every connection open at the time, for good: the
//! connections stay established but deliver nothing, like a TCP connection stuck in
//! retransmission backoff (only more so). Connections opened after the heal work.

use phalanx_proto::RaftRole;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_controller::client::{Client, Credentials};
use phalanx_proto::Command;

/// A one-way-dialed TCP forwarder with a stalling cut.
struct StallProxy {
    addr: String,
    /// Bumped by every cut; a connection accepted before the latest cut never forwards
    /// again, and one accepted during a cut never forwards.
    cuts: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl StallProxy {
    fn new(target: String) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cuts = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (cuts2, cut2, stop2) = (cuts.clone(), cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                inbound.set_nonblocking(false).unwrap();
                let generation = cuts2.load(Ordering::SeqCst);
                let dead_from_start = cut2.load(Ordering::SeqCst);
                let Ok(outbound) =
                    TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(1))
                else {
                    continue;
                };
                for (mut a, mut b) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let (cuts3, stop3) = (cuts2.clone(), stop2.clone());
                    std::thread::spawn(move || {
                        a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                        let mut buf = vec![0u8; 65536];
                        let stalled =
                            || dead_from_start || cuts3.load(Ordering::SeqCst) != generation;
                        while !stop3.load(Ordering::Relaxed) {
                            if stalled() {
                                // Hold both ends open and deliver nothing.
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                            match a.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if stalled() {
                                        continue; // swallowed
                                    }
                                    if b.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        StallProxy {
            addr,
            cuts,
            cut,
            stop,
        }
    }

    fn set_cut(&self, cut: bool) {
        if cut {
            self.cuts.fetch_add(1, Ordering::SeqCst);
        }
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

mod common;
use common::{free_addr, status, InProcess, TOKEN};

fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn follower_follows_again_soon_after_a_stalling_cut_heals() {
    let real: BTreeMap<u64, String> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut proxies: BTreeMap<(u64, u64), StallProxy> = BTreeMap::new();
    for from in 1..=3u64 {
        for to in 1..=3u64 {
            if from != to {
                proxies.insert((from, to), StallProxy::new(real[&to].clone()));
            }
        }
    }
    // Each node reaches every other one through the proxy of that link.
    let _nodes = InProcess::start_at(real.clone(), |mut cfg| {
        let id = cfg.id;
        for (j, a) in cfg.peers.iter_mut() {
            if *j != id {
                *a = proxies[&(id, *j)].addr.clone();
            }
        }
        cfg
    });
    let client = Client::new(
        real.values().cloned().collect(),
        Credentials::insecure(TOKEN),
    )
    .unwrap();
    let write = |v: &str| {
        client
            .command(Command::SetAnnotation {
                key: "x".into(),
                value: v.into(),
            })
            .expect("write")
            .index
    };
    let leader = wait_for(Duration::from_secs(15), "a leader", || {
        real.values()
            .filter_map(|a| status(a))
            .find(|s| s.role == RaftRole::Leader)
            .map(|s| s.node_id)
    });
    // Every link has carried traffic: a committed write reached both followers.
    let idx = write("0");
    let follows = |id: u64, index: u64| {
        status(&real[&id]).is_some_and(|s| {
            s.role == RaftRole::Follower && s.leader_id == leader && s.applied_index >= index
        })
    };
    for id in real.keys().filter(|i| **i != leader) {
        wait_for(Duration::from_secs(10), "followers to apply", || {
            follows(*id, idx).then_some(())
        });
    }

    let f = *real.keys().find(|i| **i != leader).unwrap();
    let links_of_f = |cut: bool| {
        for ((a, b), p) in &proxies {
            if *a == f || *b == f {
                p.set_cut(cut);
            }
        }
    };
    let mut times = Vec::new();
    for round in 0..2 {
        links_of_f(true);
        // Long enough for the follower to have stopped hearing the leader and to campaign
        // (pre-vote) over links that now deliver nothing.
        wait_for(
            Duration::from_secs(10),
            "the cut follower to campaign",
            || {
                status(&real[&f])
                    .is_some_and(|s| s.role != RaftRole::Follower || s.leader_id == 0)
                    .then_some(())
            },
        );
        let idx = write(&format!("during-{round}"));
        links_of_f(false);
        let healed = Instant::now();
        // The leader (with its other follower) kept committing; the cut one catches up.
        wait_for(
            Duration::from_secs(20),
            "the healed follower to follow the leader and apply its writes",
            || follows(f, idx).then_some(()),
        );
        times.push(healed.elapsed());
    }
    eprintln!("heal -> follower {f} follows leader {leader} and has caught up: {times:?}");
    for t in &times {
        assert!(
            *t < Duration::from_millis(1500),
            "a healed follower took {t:?} to follow the leader again (all: {times:?})"
        );
    }
}
