mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{cfg, fake, listeners};
use phalanx_collective::auth;
use phalanx_collective::frame::{self, Tag, HEADER_BYTES};
use phalanx_collective::{BlockingGroup, CollectiveError, DEFAULT_GROUP_ID};

/// A hand-written rank 1 of a world of 2 (an open group): performs the handshakes,
/// returns (outbound to rank 0, inbound from rank 0).
fn fake_rank1(l1: &TcpListener, addr0: std::net::SocketAddr) -> (TcpStream, TcpStream) {
    let me = fake::Claim {
        key: auth::open_key(DEFAULT_GROUP_ID),
        group_id: DEFAULT_GROUP_ID,
        world: 2,
        rank: 1,
    };
    let mut out = fake::dial(addr0, me, 0).unwrap();
    let mut inb = fake::answer(l1, me, 0).unwrap();
    // The formation barrier: an all-gather of nothing (one length frame, seq 1, each way).
    out.write_all(&frame::encode_frame(Tag::Data, 1, &0u64.to_le_bytes()).unwrap())
        .unwrap();
    let mut barrier = [0u8; HEADER_BYTES + 8];
    inb.read_exact(&mut barrier).unwrap();
    (out, inb)
}

/// The first data frame after the rendezvous (the barrier used seq 1).
const FIRST_SEQ: u64 = 2;

#[test]
fn killed_peer_mid_op_is_peer_closed() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    let t = std::thread::spawn(move || {
        let mut c = cfg(0, a);
        c.chunk_bytes = 64 << 10;
        c.op_timeout = Duration::from_secs(5);
        let mut g = BlockingGroup::connect(c, l0).unwrap();
        let mut v = vec![1f32; 1 << 20];
        let start = Instant::now();
        let e = g.all_reduce_sum_f32(&mut v).unwrap_err();
        // the group is now broken
        let again = g.barrier().unwrap_err();
        (e, start.elapsed(), again)
    });
    let (mut out, inb) = fake_rank1(&l1, addrs[0]);
    // send one valid chunk of the first step, then die
    let chunk = vec![0u8; 64 << 10];
    out.write_all(&frame::encode_frame(Tag::Data, FIRST_SEQ, &chunk).unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(out);
    drop(inb);
    let (e, elapsed, again) = t.join().unwrap();
    match &e {
        CollectiveError::PeerClosed {
            peer_rank,
            peer_addr,
            ..
        }
        | CollectiveError::Io {
            peer_rank,
            peer_addr,
            ..
        } => {
            assert_eq!(*peer_rank, 1);
            assert_eq!(*peer_addr, addrs[1]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(matches!(again, CollectiveError::Broken { .. }));
}

#[test]
fn killed_real_peer_errors_everywhere_within_timeout() {
    let (ls, addrs) = listeners(3);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let a = addrs.clone();
            std::thread::spawn(move || {
                let mut c = cfg(rank, a);
                c.op_timeout = Duration::from_secs(3);
                let mut g = BlockingGroup::connect(c, l).unwrap();
                if rank == 2 {
                    drop(g); // dies right after rendezvous
                    return None;
                }
                let start = Instant::now();
                let mut v = vec![1i64; 100_000];
                let e = g.all_reduce_sum_i64(&mut v).unwrap_err();
                Some((e, start.elapsed()))
            })
        })
        .collect();
    let res: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // rank 0 reads from rank 2 and rank 1 writes to rank 2; a rank that fails
    // closes its links, so the other may instead see its neighbour go away.
    // Either way: typed errors naming a peer, well before the op timeout, and
    // at least one names the dead rank.
    let mut named_dead = false;
    for (rank, r) in res[..2].iter().enumerate() {
        let (e, t) = r.as_ref().unwrap();
        assert!(
            matches!(
                e,
                CollectiveError::PeerClosed { .. } | CollectiveError::Io { .. }
            ),
            "rank {rank}: {e:?}"
        );
        named_dead |= e.peer_rank() == Some(2);
        assert!(*t < Duration::from_secs(3), "rank {rank} took {t:?}");
    }
    assert!(named_dead, "{res:?}");
}

#[test]
fn silent_peer_times_out_naming_it() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    let timeout = Duration::from_millis(600);
    let t = std::thread::spawn(move || {
        let mut c = cfg(0, a);
        c.op_timeout = timeout;
        let mut g = BlockingGroup::connect(c, l0).unwrap();
        let mut v = vec![1i64; 1000];
        let start = Instant::now();
        let e = g.all_reduce_sum_i64(&mut v).unwrap_err();
        (e, start.elapsed())
    });
    let (out, inb) = fake_rank1(&l1, addrs[0]);
    let (e, elapsed) = t.join().unwrap();
    drop((out, inb));
    match &e {
        CollectiveError::Timeout {
            peer_rank,
            peer_addr,
            after_ms,
            ..
        } => {
            assert_eq!(*peer_rank, 1);
            assert_eq!(*peer_addr, addrs[1]);
            assert!(*after_ms >= 600);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(elapsed >= timeout, "{elapsed:?}");
    assert!(elapsed < timeout + Duration::from_secs(2), "{elapsed:?}");
}

#[test]
fn absent_peer_fails_rendezvous_within_timeout() {
    let (mut ls, addrs) = listeners(2);
    drop(ls.pop()); // rank 1 never shows up; its port is closed
    let l0 = ls.pop().unwrap();
    let mut c = cfg(0, addrs.clone());
    c.rendezvous_timeout = Duration::from_millis(700);
    let start = Instant::now();
    let e = BlockingGroup::connect(c, l0).unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(e, CollectiveError::Timeout { peer_rank: 1, .. }),
        "{e:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_millis(2700),
        "{elapsed:?}"
    );
}

#[test]
fn handshake_rejects_wrong_group() {
    let (ls, addrs) = listeners(2);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let a = addrs.clone();
            std::thread::spawn(move || {
                let mut c = cfg(rank, a);
                c.rendezvous_timeout = Duration::from_secs(3);
                c.group_id = 100 + rank as u64;
                BlockingGroup::connect(c, l).unwrap_err()
            })
        })
        .collect();
    // Each side drops the other's connection and keeps trying until its deadline; the
    // accepting side names the group mismatch.
    let errs: Vec<CollectiveError> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for e in &errs {
        assert!(
            matches!(
                e,
                CollectiveError::Handshake { .. } | CollectiveError::Timeout { .. }
            ),
            "{e:?}"
        );
    }
    assert!(
        errs.iter()
            .any(|e| matches!(e, CollectiveError::Handshake { .. })),
        "{errs:?}"
    );
}

#[test]
fn bad_config_is_rejected() {
    let (mut ls, addrs) = listeners(1);
    let mut c = cfg(3, addrs);
    c.world = 1;
    assert!(matches!(
        BlockingGroup::connect(c, ls.pop().unwrap()),
        Err(CollectiveError::InvalidArgument { .. })
    ));
}

#[test]
fn garbage_frame_is_a_frame_error() {
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let a = addrs.clone();
    let t = std::thread::spawn(move || {
        let mut c = cfg(0, a);
        c.op_timeout = Duration::from_secs(5);
        c.frame_bytes_max = 1 << 16;
        let mut g = BlockingGroup::connect(c, l0).unwrap();
        let mut v = vec![1i64; 10];
        g.all_reduce_sum_i64(&mut v).unwrap_err()
    });
    let (mut out, inb) = fake_rank1(&l1, addrs[0]);
    // oversized length in an otherwise valid header
    let mut f = frame::encode_frame(Tag::Data, FIRST_SEQ, &[0u8; 8]).unwrap();
    f[16..20].copy_from_slice(&(1u32 << 30).to_le_bytes());
    out.write_all(&f).unwrap();
    let e = t.join().unwrap();
    drop((out, inb));
    assert!(
        matches!(
            e,
            CollectiveError::Frame {
                peer_rank: 1,
                source: frame::FrameError::TooLarge { .. },
                ..
            }
        ),
        "{e:?}"
    );
}
