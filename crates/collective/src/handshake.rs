//! The rendezvous handshake: hello, hello, confirm. The dialer sends its hello, the
//! listener checks it and answers with its own, and the dialer confirms once it has
//! checked the answer; the listener takes the connection only then, so a dialer that gave
//! up (and closed) is never mistaken for a live link.
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::error::{CollectiveError, Result};
use crate::frame::{self, Hello, Tag, HEADER_BYTES};
use crate::link::{frame_err, map_io, read_exact_by, timeout_err, write_all_by, Deadline, Peer};

async fn read_hello(s: &mut TcpStream, p: Peer, dl: Deadline, fmax: usize) -> Result<Hello> {
    read_frame(s, Tag::Hello, p, dl, fmax).await
}

/// Reads one handshake frame (`Hello` or `Confirm`, both carrying a [`Hello`]).
async fn read_frame(
    s: &mut TcpStream,
    tag: Tag,
    p: Peer,
    dl: Deadline,
    fmax: usize,
) -> Result<Hello> {
    let op = "rendezvous";
    let mut hb = [0u8; HEADER_BYTES];
    read_exact_by(s, &mut hb, op, p, dl).await?;
    let h = frame::decode_header(&hb, fmax).map_err(|e| frame_err(op, p, e))?;
    frame::check_header(&h, tag, 0, Some(frame::HELLO_BYTES)).map_err(|e| frame_err(op, p, e))?;
    let mut pb = [0u8; frame::HELLO_BYTES];
    read_exact_by(s, &mut pb, op, p, dl).await?;
    Hello::decode(&pb).map_err(|e| frame_err(op, p, e))
}

async fn write_frame(
    s: &mut TcpStream,
    tag: Tag,
    hello: Hello,
    p: Peer,
    dl: Deadline,
) -> Result<()> {
    let f =
        frame::encode_frame(tag, 0, &hello.encode()).map_err(|e| frame_err("rendezvous", p, e))?;
    write_all_by(s, &f, "rendezvous", p, dl).await
}

fn check_hello(got: Hello, mine: Hello, p: Peer) -> Result<()> {
    let reason = if got.group_id != mine.group_id {
        format!("group id {:#x} != ours {:#x}", got.group_id, mine.group_id)
    } else if got.world != mine.world {
        format!("world {} != ours {}", got.world, mine.world)
    } else if got.rank as usize != p.rank {
        format!(
            "peer says it is rank {}, expected rank {}",
            got.rank, p.rank
        )
    } else {
        return Ok(());
    };
    Err(CollectiveError::Handshake {
        peer_rank: p.rank,
        peer_addr: p.addr,
        reason,
    })
}

/// Connects to the right neighbour and exchanges hellos, retrying until the deadline: the
/// neighbour may not listen yet, may still be in an older group (it then drops us), or a
/// stale connection may be refused. Only the deadline ends the attempts; the error then
/// carries the last reason.
pub(crate) async fn connect_right(
    p: Peer,
    hello: Hello,
    dl: Deadline,
    fmax: usize,
) -> Result<TcpStream> {
    let op = "rendezvous(connect)";
    let mut last: Option<CollectiveError> = None;
    loop {
        if Instant::now() >= dl.at {
            return Err(deadline_err(last, op, p, dl));
        }
        let attempt = async {
            let mut s = match tokio::time::timeout_at(dl.at, TcpStream::connect(p.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(map_io(op, p, e)),
                Err(_) => return Err(timeout_err(op, p, dl.started)),
            };
            s.set_nodelay(true).map_err(|e| map_io(op, p, e))?;
            write_frame(&mut s, Tag::Hello, hello, p, dl).await?;
            let got = read_hello(&mut s, p, dl, fmax).await?;
            check_hello(got, hello, p)?;
            write_frame(&mut s, Tag::Confirm, hello, p, dl).await?;
            Ok(s)
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::trace!(peer = p.rank, error = %e, "connect attempt failed, retrying");
                last = Some(e);
                let next = (Instant::now() + Duration::from_millis(25)).min(dl.at);
                tokio::time::sleep_until(next).await;
            }
        }
    }
}

/// At the rendezvous deadline: a handshake refusal is the more useful error (the peer is
/// there but in another group); anything else is a timeout naming the peer.
fn deadline_err(
    last: Option<CollectiveError>,
    op: &'static str,
    p: Peer,
    dl: Deadline,
) -> CollectiveError {
    match last {
        Some(e @ CollectiveError::Handshake { .. }) => e,
        _ => timeout_err(op, p, dl.started),
    }
}

/// Accepts the left neighbour: connections that close early, speak garbage or belong to
/// another group (a worker of an older epoch) are dropped and accepting goes on until the
/// deadline, so one stale connection cannot fail the rendezvous.
pub(crate) async fn accept_left(
    l: &TcpListener,
    p: Peer,
    hello: Hello,
    dl: Deadline,
    fmax: usize,
) -> Result<TcpStream> {
    let op = "rendezvous(accept)";
    let mut last: Option<CollectiveError> = None;
    loop {
        let mut s = match tokio::time::timeout_at(dl.at, l.accept()).await {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => return Err(map_io(op, p, e)),
            Err(_) => return Err(deadline_err(last, op, p, dl)),
        };
        let attempt = async {
            s.set_nodelay(true).map_err(|e| map_io(op, p, e))?;
            let got = read_hello(&mut s, p, dl, fmax).await?;
            check_hello(got, hello, p)?;
            write_frame(&mut s, Tag::Hello, hello, p, dl).await?;
            // The third leg: a dialer that gave up before our hello reached it has closed
            // the connection, and this read fails instead of handing back a dead link.
            let confirm = read_frame(&mut s, Tag::Confirm, p, dl, fmax).await?;
            check_hello(confirm, hello, p)
        };
        match attempt.await {
            Ok(()) => return Ok(s),
            Err(e) => {
                tracing::debug!(peer = p.rank, error = %e, "dropping an incoming connection");
                last = Some(e);
            }
        }
    }
}
