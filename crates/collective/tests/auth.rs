//! The epoch secret guards the rendezvous: a hello without it, with a wrong one, or
//! replayed from another connection is refused, and neither such a connection nor an
//! idle one delays the real neighbour (the listener handles connections concurrently,
//! each under its own hello deadline).
mod common;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::fake::{self, Claim};
use common::{cfg, listeners};
use phalanx_collective::auth;
use phalanx_collective::frame::Tag;
use phalanx_collective::{BlockingGroup, CollectiveError, EpochSecret, GroupConfig, Security};

const GROUP: u64 = 0x0e90c4;

fn secure_cfg(rank: usize, addrs: Vec<std::net::SocketAddr>, secret: [u8; 32]) -> GroupConfig {
    let mut c = cfg(rank, addrs);
    c.group_id = GROUP;
    c.security = Some(Security {
        secret: EpochSecret::new(secret),
        tls: None,
    });
    c
}

/// Whether the other end closed `s` within `within` (EOF or reset); any frame that
/// arrives instead is returned as an error message.
fn closed_within(s: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!("still open after {within:?}"));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(n) => return Err(format!("got {n} bytes instead of a close")),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Ok(start.elapsed())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[test]
fn bad_hellos_are_refused_and_do_not_delay_the_real_rendezvous() {
    let secret = [7u8; 32];
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    // Rank 0 waits up to 20 s for any one connection's hello: a listener that handled
    // connections one after another would be held that long by the idle ones below.
    let a = addrs.clone();
    let rank0 = std::thread::spawn(move || {
        let mut c = secure_cfg(0, a, secret);
        c.hello_timeout = Duration::from_secs(20);
        c.rendezvous_timeout = Duration::from_secs(30);
        let mut g = BlockingGroup::connect(c, l0)?;
        let formed = Instant::now();
        let mut v = vec![1i64; 1000];
        g.all_reduce_sum_i64(&mut v)?;
        Ok::<_, CollectiveError>((formed, v))
    });
    let claim = |key| Claim {
        key,
        group_id: GROUP,
        world: 2,
        rank: 1,
    };
    // An idle connection that never says anything.
    let idle = TcpStream::connect(addrs[0]).unwrap();
    // A hello under a wrong secret, and one under the public key of a group without one.
    for (what, key) in [
        ("wrong secret", [8u8; 32]),
        ("no secret", auth::open_key(GROUP)),
    ] {
        let mut s = TcpStream::connect(addrs[0]).unwrap();
        let nl = fake::read_challenge(&mut s).unwrap();
        let (hello, _) = fake::dial_hello(claim(key), 0, nl);
        fake::write_frame(&mut s, Tag::Hello, &hello.encode()).unwrap();
        closed_within(&mut s, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("a hello with {what} was not refused: {e}"));
    }
    // A valid hello, made for another connection's challenge, replayed: the first
    // connection stays open and silent, the replay is refused.
    let mut first = TcpStream::connect(addrs[0]).unwrap();
    let nl1 = fake::read_challenge(&mut first).unwrap();
    let (valid_for_first, _) = fake::dial_hello(claim(secret), 0, nl1);
    let mut replay = TcpStream::connect(addrs[0]).unwrap();
    fake::read_challenge(&mut replay).unwrap();
    fake::write_frame(&mut replay, Tag::Hello, &valid_for_first.encode()).unwrap();
    closed_within(&mut replay, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("a replayed hello was not refused: {e}"));

    // The real rank 1 arrives while `idle` and `first` are still open.
    let started = Instant::now();
    let a = addrs.clone();
    let rank1 = std::thread::spawn(move || {
        let mut g = BlockingGroup::connect(secure_cfg(1, a, secret), l1)?;
        let mut v = vec![2i64; 1000];
        g.all_reduce_sum_i64(&mut v)?;
        Ok::<_, CollectiveError>(v)
    });
    let (formed, v0) = rank0.join().unwrap().expect("rank 0");
    let v1 = rank1.join().unwrap().expect("rank 1");
    let took = formed.duration_since(started);
    assert!(v0.iter().chain(&v1).all(|x| *x == 3), "wrong sums");
    assert!(
        took < Duration::from_secs(10),
        "the group took {took:?} to form next to idle connections"
    );
    // Those connections were still within their 20 s hello deadline when the group
    // formed; the rendezvous dropped them when it ended.
    let mut idle = idle;
    fake::read_challenge(&mut idle).unwrap();
    for s in [&mut idle, &mut first] {
        closed_within(s, Duration::from_secs(5)).expect("a leftover connection");
    }
}

#[test]
fn ranks_with_different_secrets_never_form_a_group() {
    let (ls, addrs) = listeners(2);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let a = addrs.clone();
            std::thread::spawn(move || {
                let mut c = secure_cfg(rank, a, [rank as u8 + 1; 32]);
                c.rendezvous_timeout = Duration::from_secs(2);
                BlockingGroup::connect(c, l).unwrap_err()
            })
        })
        .collect();
    let errs: Vec<CollectiveError> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        errs.iter().any(|e| matches!(
            e,
            CollectiveError::Handshake { reason, .. } if reason.contains("epoch secret")
        )),
        "{errs:?}"
    );
}

#[test]
fn an_idle_connection_is_dropped_at_the_hello_deadline() {
    let (mut ls, addrs) = listeners(2);
    drop(ls.pop()); // rank 1 never comes
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    let rank0 = std::thread::spawn(move || {
        let mut c = secure_cfg(0, a, [7; 32]);
        c.hello_timeout = Duration::from_millis(300);
        c.rendezvous_timeout = Duration::from_secs(4);
        BlockingGroup::connect(c, l0).unwrap_err()
    });
    let mut idle = TcpStream::connect(addrs[0]).unwrap();
    fake::read_challenge(&mut idle).unwrap();
    let after = closed_within(&mut idle, Duration::from_secs(3)).expect("idle connection");
    assert!(
        after >= Duration::from_millis(200),
        "closed after {after:?}"
    );
    let e = rank0.join().unwrap();
    assert!(
        matches!(e, CollectiveError::Timeout { peer_rank: 1, .. }),
        "{e:?}"
    );
}
