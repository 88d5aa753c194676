//! Linearizability of the controller under faults.
//!
//! Three `phalanx controller start` processes; every peer link goes through a small TCP
//! proxy that the test can cut. Concurrent clients write unique values to one register (a
//! cluster annotation) and read it, while a nemesis SIGKILLs the leader, restarts it, and
//! isolates the next leader by cutting its links. The recorded history is then checked
//! against a sequential register with a WGL-style search (Wing & Gong, with Lowe's
//! memoisation). Writes that failed on the client side may or may not have taken effect:
//! they stay "pending" (may linearize anywhere after their call, or never).

mod support;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::linearizability::{linearizable, Op, OpKind};

use phalanx_controller::client::Client;
use phalanx_proto::Command;
use phalanx_tests::controllers::Controllers;

/// A cuttable one-way TCP forwarder for one peer link.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn new(target: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (cut2, stop2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((inbound, _)) => {
                        if cut2.load(Ordering::Relaxed) {
                            continue; // dropped
                        }
                        let Ok(outbound) = TcpStream::connect_timeout(
                            &target.parse().unwrap(),
                            Duration::from_millis(300),
                        ) else {
                            continue;
                        };
                        for (mut a, mut b) in [
                            (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                            (outbound, inbound),
                        ] {
                            let (cut3, stop3) = (cut2.clone(), stop2.clone());
                            std::thread::spawn(move || {
                                a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                                let mut buf = vec![0u8; 65536];
                                loop {
                                    if cut3.load(Ordering::Relaxed) || stop3.load(Ordering::Relaxed)
                                    {
                                        break;
                                    }
                                    match a.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => {
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
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, cut, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The shared controller harness with a proxy on every directed peer link.
struct Net {
    c: Controllers,
    /// (from, to) -> proxy that `from` dials to reach `to`. After the processes (in `c`)
    /// in drop order.
    links: BTreeMap<(u64, u64), Proxy>,
}

impl Net {
    fn new(n: u64) -> Net {
        let mut c = Controllers::prepare(n, &[]);
        let mut links = BTreeMap::new();
        for from in 1..=n {
            for to in 1..=n {
                if from != to {
                    let p = Proxy::new(c.addrs[&to].clone());
                    c.route(from, to, p.addr.clone());
                    links.insert((from, to), p);
                }
            }
        }
        for id in 1..=n {
            c.start_node(id);
        }
        Net { c, links }
    }

    fn isolate(&self, id: u64, cut: bool) {
        for ((a, b), p) in &self.links {
            if *a == id || *b == id {
                p.cut.store(cut, Ordering::Relaxed);
            }
        }
    }

    fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.c.leader() {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn checker_accepts_linearizable_and_rejects_stale_reads() {
    let w = |v, call, ret| Op {
        kind: OpKind::Write(v),
        call,
        ret,
    };
    let r = |v, call, ret| Op {
        kind: OpKind::Read(v),
        call,
        ret,
    };
    assert!(linearizable(&[w(1, 0, Some(10)), r(Some(1), 11, Some(12))]).is_ok());
    assert!(
        linearizable(&[w(1, 0, Some(10)), r(None, 5, Some(6))]).is_ok(),
        "concurrent read may see the old value"
    );
    assert!(
        linearizable(&[
            w(1, 0, Some(10)),
            w(2, 11, Some(20)),
            r(Some(1), 21, Some(22))
        ])
        .is_err(),
        "stale read"
    );
    assert!(linearizable(&[
        w(1, 0, None),
        r(Some(1), 50, Some(51)),
        r(None, 60, Some(61))
    ])
    .is_err());
    assert!(
        linearizable(&[w(1, 0, None), r(None, 50, Some(51))]).is_ok(),
        "a failed write may never apply"
    );
}

#[test]
fn controller_linearizable_under_leader_kill_and_partition() {
    let mut net = Net::new(3);
    net.wait_leader(Duration::from_secs(15));
    let addrs: Vec<String> = net.c.addrs.values().cloned().collect();
    let start = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4u32 {
        let (history, stop, addrs) = (history.clone(), stop.clone(), addrs.clone());
        let admin = net.c.admin.clone();
        clients.push(std::thread::spawn(move || {
            let mut client = Client::new(addrs, admin).unwrap();
            client.request_timeout = Duration::from_millis(800);
            client.deadline = Duration::from_millis(2500);
            let now = || start.elapsed().as_micros() as u64;
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                if (k + c) % 2 == 0 {
                    let v = c * 1_000_000 + k;
                    let call = now();
                    let r = client.command(Command::SetAnnotation {
                        key: "x".into(),
                        value: v.to_string(),
                    });
                    let ret = match r {
                        Ok(resp) if resp.outcome.is_applied() => Some(now()),
                        _ => None,
                    };
                    history.lock().unwrap().push(Op {
                        kind: OpKind::Write(v),
                        call,
                        ret,
                    });
                } else {
                    let call = now();
                    if let Ok(v) = client.get::<serde_json::Value>("/v1/annotations/x") {
                        let ret = now();
                        let val = v["value"].as_str().and_then(|s| s.parse::<u32>().ok());
                        history.lock().unwrap().push(Op {
                            kind: OpKind::Read(val),
                            call,
                            ret: Some(ret),
                        });
                    }
                }
            }
        }));
    }
    // Nemesis.
    std::thread::sleep(Duration::from_millis(1200));
    let l1 = net.wait_leader(Duration::from_secs(5));
    net.c.kill(l1);
    std::thread::sleep(Duration::from_millis(1500));
    net.c.start_node(l1);
    std::thread::sleep(Duration::from_millis(1000));
    let l2 = net.wait_leader(Duration::from_secs(5));
    net.isolate(l2, true);
    std::thread::sleep(Duration::from_millis(1500));
    net.isolate(l2, false);
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let mut ops = history.lock().unwrap().clone();
    ops.sort_by_key(|o| o.call);
    let writes_ok = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Write(_)) && o.ret.is_some())
        .count();
    let reads = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Read(_)))
        .count();
    assert!(
        writes_ok >= 20 && reads >= 20,
        "too little progress: {writes_ok} writes, {reads} reads"
    );
    // Run the search on a big stack.
    let ops2 = ops.clone();
    let verdict = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || linearizable(&ops2))
        .unwrap()
        .join()
        .unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for o in &ops {
        *counts
            .entry(match (&o.kind, o.ret) {
                (OpKind::Write(_), Some(_)) => "write_ok",
                (OpKind::Write(_), None) => "write_unknown",
                _ => "read",
            })
            .or_default() += 1;
    }
    eprintln!("history: {counts:?}; killed leader {l1}, isolated leader {l2}");
    if let Err(e) = verdict {
        let dump: Vec<String> = ops.iter().map(|o| format!("{:?}", o)).collect();
        panic!("history is not linearizable: {e}\n{}", dump.join("\n"));
    }
}
