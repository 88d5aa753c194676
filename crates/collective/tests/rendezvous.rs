//! The rendezvous under the conditions of a recovery: stale connections of an earlier
//! attempt, ranks that arrive seconds apart, and a caller that knows better (a newer plan).
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cfg, fake, listeners};
use phalanx_collective::auth;
use phalanx_collective::frame::{self, Tag};
use phalanx_collective::{BlockingGroup, Cancel, CollectiveError, DEFAULT_GROUP_ID};

/// Every rank of `world` connects (rank r after `delay(r)`) and runs one all-reduce with
/// `op_timeout`; returns each rank's result.
fn staggered_all_reduce(
    world: usize,
    op_timeout: Duration,
    delay: impl Fn(usize) -> Duration,
    before: impl FnOnce(&[std::net::SocketAddr]),
) -> Vec<Result<Vec<i64>, CollectiveError>> {
    let (ls, addrs) = listeners(world);
    before(&addrs);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            let d = delay(rank);
            std::thread::spawn(move || {
                std::thread::sleep(d);
                let mut c = cfg(rank, addrs);
                c.op_timeout = op_timeout;
                let mut g = BlockingGroup::connect(c, l)?;
                let mut v = vec![rank as i64 + 1; 1000];
                g.all_reduce_sum_i64(&mut v)?;
                Ok(v)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_sum(res: &[Result<Vec<i64>, CollectiveError>], world: usize) {
    let want = (world * (world + 1) / 2) as i64;
    for (rank, r) in res.iter().enumerate() {
        match r {
            Ok(v) => assert!(v.iter().all(|x| *x == want), "rank {rank}: wrong sum"),
            Err(e) => panic!("rank {rank}: {e}"),
        }
    }
}

/// A dialer of an earlier attempt connected, sent what it had and gave up (closed)
/// before the listener got to it: without the handshake's last legs the listener took
/// such a dead connection for its left link, and the group broke on its first operation
/// while the live dialer waited in the backlog. (A hello now answers the listener's
/// challenge, so a dialer cannot prove anything before it is accepted.)
#[test]
fn a_dialer_that_gave_up_is_never_taken_for_a_link() {
    let res = staggered_all_reduce(
        2,
        Duration::from_secs(5),
        // Rank 0 starts accepting only after the stale connection is queued.
        |r| Duration::from_millis(if r == 0 { 300 } else { 0 }),
        |addrs| {
            let (hello, _) = fake::dial_hello(
                fake::Claim {
                    key: auth::open_key(DEFAULT_GROUP_ID),
                    group_id: DEFAULT_GROUP_ID,
                    world: 2,
                    rank: 1,
                },
                0,
                [0; 32],
            );
            let mut stale = TcpStream::connect(addrs[0]).unwrap();
            stale
                .write_all(&frame::encode_frame(Tag::Hello, 0, &hello.encode()).unwrap())
                .unwrap();
            drop(stale);
        },
    );
    assert_sum(&res, 2);
}

/// Ranks arrive at the rendezvous seconds apart (one was backing off, another probing a
/// dead peer). A rank whose two neighbours were there formed its links at once and its
/// first operation timed out waiting on the latecomer further along the ring; now the
/// rendezvous ends with a barrier bounded by its own deadline.
#[test]
fn ranks_that_arrive_seconds_apart_form_one_group() {
    let res = staggered_all_reduce(
        4,
        Duration::from_millis(500),
        |r| Duration::from_millis(if r == 2 { 2_000 } else { 0 }),
        |_| {},
    );
    assert_sum(&res, 4);
}

/// A cancel check that fires once `flag` is set.
fn flag_cancel() -> (Arc<AtomicBool>, Cancel) {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let cancel = Cancel::new(move || {
        f.load(Ordering::SeqCst)
            .then(|| "superseded by epoch 9".to_string())
    });
    (flag, cancel)
}

fn set_after(flag: &Arc<AtomicBool>, d: Duration) {
    let flag = flag.clone();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        flag.store(true, Ordering::SeqCst);
    });
}

#[test]
fn a_cancelled_rendezvous_ends_at_once_not_at_its_deadline() {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0);
    let (flag, cancel) = flag_cancel();
    set_after(&flag, Duration::from_millis(200));
    let started = Instant::now();
    // Rank 1 never shows up; the rendezvous deadline is 10 s.
    let e = BlockingGroup::connect_with(cfg(0, addrs), l0, Some(cancel), None).unwrap_err();
    assert!(
        matches!(&e, CollectiveError::Cancelled { reason } if reason.contains("epoch 9")),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_cancelled_operation_ends_at_once_and_breaks_the_group() {
    let (ls, addrs) = listeners(2);
    let mut ls = ls.into_iter();
    let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
    let (flag, cancel) = flag_cancel();
    let a = addrs.clone();
    // Rank 1 forms the group, then never calls the operation (a hung peer).
    let idle = std::thread::spawn(move || {
        let g = BlockingGroup::connect(cfg(1, a), l1).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(g);
    });
    let mut c = cfg(0, addrs);
    c.op_timeout = Duration::from_secs(30);
    let mut g = BlockingGroup::connect_with(c, l0, Some(cancel), None).unwrap();
    set_after(&flag, Duration::from_millis(200));
    let started = Instant::now();
    let mut v = vec![1i64; 100];
    let e = g.all_reduce_sum_i64(&mut v).unwrap_err();
    assert!(matches!(e, CollectiveError::Cancelled { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    flag.store(false, Ordering::SeqCst);
    let again = g.barrier().unwrap_err();
    assert!(matches!(again, CollectiveError::Broken { .. }), "{again:?}");
    idle.join().unwrap();
}
