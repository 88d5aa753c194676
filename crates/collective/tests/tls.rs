//! Mutual TLS on ring links: each end's certificate must chain to the cluster CA and
//! name the worker that the plan puts at that rank; plain TCP is refused; and the
//! results are the same bits with and without TLS.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cfg, listeners};
use phalanx_collective::frame::{self, Tag};
use phalanx_collective::{
    deterministic, BlockingGroup, CollectiveError, EpochSecret, GroupConfig, RingCredentials,
    RingTls, Security,
};
use phalanx_pki::{Role, TlsDir};

const SECRET: [u8; 32] = [5; 32];

/// A cluster's credentials directory with certificates for `workers`.
fn cluster(dir: &std::path::Path, workers: &[&str]) -> TlsDir {
    let t = TlsDir::create(dir).unwrap();
    for w in workers {
        t.issue(&Role::Worker(w.to_string()), &[]).unwrap();
    }
    t
}

fn creds(t: &TlsDir, worker: &str) -> Arc<RingCredentials> {
    Arc::new(RingCredentials::load(t, worker).unwrap())
}

/// Rank `rank` of a group whose plan puts `plan[r]` at rank r, presenting `me`'s
/// certificate (`None`: the epoch secret without TLS).
fn tls_cfg(
    rank: usize,
    addrs: Vec<SocketAddr>,
    me: Option<Arc<RingCredentials>>,
    plan: &[&str],
) -> GroupConfig {
    let mut c = cfg(rank, addrs);
    c.group_id = 77;
    c.security = Some(Security {
        secret: EpochSecret::new(SECRET),
        tls: me.map(|creds| RingTls {
            creds,
            peer_workers: plan.iter().map(|w| w.to_string()).collect(),
        }),
    });
    c
}

/// What a rank computes for the comparison: an f32 ring sum, an i64 sum and the
/// deterministic mean, all as bits.
fn reduce_all(g: &mut BlockingGroup, rank: usize, world: usize) -> (Vec<u32>, Vec<i64>, Vec<u32>) {
    let n = 50_000;
    let mut x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + rank * 104_729) % 1_000_003) as f32 * 1e-5 - 3.0)
        .collect();
    let grads = x.clone();
    g.all_reduce_sum_f32(&mut x).unwrap();
    let mut y: Vec<i64> = (0..n as i64).map(|i| i * (rank as i64 + 1)).collect();
    g.all_reduce_sum_i64(&mut y).unwrap();
    let mut mean = vec![0f32; n];
    deterministic::reduce_mean(g, &[&grads], world, &mut mean, Duration::from_secs(20)).unwrap();
    (
        x.iter().map(|v| v.to_bits()).collect(),
        y,
        mean.iter().map(|v| v.to_bits()).collect(),
    )
}

#[test]
fn all_reduce_is_bit_identical_with_and_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let plan = ["w0", "w1", "w2"];
    let t = cluster(&dir.path().join("tls"), &plan);
    let run = |tls: bool| {
        let (ls, addrs) = listeners(3);
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let me = tls.then(|| creds(&t, plan[rank]));
                let c = tls_cfg(rank, addrs.clone(), me, &plan);
                std::thread::spawn(move || {
                    let mut g = BlockingGroup::connect(c, l).expect("connect");
                    reduce_all(&mut g, rank, 3)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    };
    let plain = run(false);
    let tls = run(true);
    for rank in 0..3 {
        assert!(plain[rank] == plain[0], "rank {rank} differs from rank 0");
        assert!(
            tls[rank] == plain[rank],
            "rank {rank}: TLS changed the bits"
        );
    }
}

/// Rank 0 of the plan `w0, w1` meets `intruder` posing as rank 1; returns rank 0's error.
fn rank0_against(
    intruder: Arc<RingCredentials>,
    intruder_plan: [&'static str; 2],
) -> CollectiveError {
    let dir = tempfile::tempdir().unwrap();
    let t = cluster(&dir.path().join("tls"), &["w0", "w1"]);
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let mut c0 = tls_cfg(0, addrs.clone(), Some(creds(&t, "w0")), &["w0", "w1"]);
    c0.rendezvous_timeout = Duration::from_secs(3);
    let mut c1 = tls_cfg(1, addrs, Some(intruder), &intruder_plan);
    c1.rendezvous_timeout = Duration::from_secs(3);
    let other = std::thread::spawn(move || BlockingGroup::connect(c1, l1).unwrap_err());
    let e = BlockingGroup::connect(c0, l0).unwrap_err();
    other.join().unwrap();
    e
}

#[test]
fn a_worker_certificate_for_another_worker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = cluster(&dir.path().join("tls"), &["w0", "w1", "intruder"]);
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let mut c0 = tls_cfg(0, addrs.clone(), Some(creds(&t, "w0")), &["w0", "w1"]);
    c0.rendezvous_timeout = Duration::from_secs(3);
    // A worker of this cluster, with a valid certificate for itself and the epoch secret,
    // claims rank 1, which the plan gives to w1.
    let mut c1 = tls_cfg(1, addrs, Some(creds(&t, "intruder")), &["w0", "intruder"]);
    c1.rendezvous_timeout = Duration::from_secs(3);
    let other = std::thread::spawn(move || BlockingGroup::connect(c1, l1).unwrap_err());
    let e = BlockingGroup::connect(c0, l0).unwrap_err();
    other.join().unwrap();
    assert!(
        matches!(&e, CollectiveError::Handshake { reason, .. }
            if reason.contains("worker/intruder") && reason.contains("worker/w1")),
        "{e:?}"
    );
}

#[test]
fn a_certificate_from_another_clusters_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = cluster(&dir.path().join("other"), &["w1"]);
    let e = rank0_against(creds(&elsewhere, "w1"), ["w0", "w1"]);
    assert!(
        matches!(&e, CollectiveError::Handshake { reason, .. } if reason.contains("TLS handshake failed")),
        "{e:?}"
    );
}

#[test]
fn plain_tcp_to_a_tls_listener_is_refused_and_does_not_delay_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let plan = ["w0", "w1"];
    let t = cluster(&dir.path().join("tls"), &plan);
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let mut c0 = tls_cfg(0, addrs.clone(), Some(creds(&t, "w0")), &plan);
    c0.hello_timeout = Duration::from_secs(20);
    c0.rendezvous_timeout = Duration::from_secs(30);
    let c1 = tls_cfg(1, addrs.clone(), Some(creds(&t, "w1")), &plan);
    let rank0 = std::thread::spawn(move || {
        let mut g = BlockingGroup::connect(c0, l0)?;
        let formed = Instant::now();
        let mut v = vec![1i64; 100];
        g.all_reduce_sum_i64(&mut v)?;
        Ok::<_, CollectiveError>((formed, v))
    });
    // An idle plain connection, held open, and a plain one that speaks the ring protocol.
    let _idle = TcpStream::connect(addrs[0]).unwrap();
    let mut plain = TcpStream::connect(addrs[0]).unwrap();
    plain
        .write_all(&frame::encode_frame(Tag::Hello, 0, &[0u8; frame::HELLO_BYTES]).unwrap())
        .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    match plain.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("plain TCP was not refused within 10 s: {e}"),
    }
    assert!(
        !got.windows(4).any(|w| w == frame::MAGIC),
        "plain TCP got a ring frame: {got:?}"
    );
    let started = Instant::now();
    let rank1 = std::thread::spawn(move || {
        let mut g = BlockingGroup::connect(c1, l1)?;
        let mut v = vec![2i64; 100];
        g.all_reduce_sum_i64(&mut v)?;
        Ok::<_, CollectiveError>(v)
    });
    let (formed, v0) = rank0.join().unwrap().expect("rank 0");
    let v1 = rank1.join().unwrap().expect("rank 1");
    assert!(v0.iter().chain(&v1).all(|x| *x == 3));
    let took = formed.duration_since(started);
    assert!(took < Duration::from_secs(10), "formed after {took:?}");
}
