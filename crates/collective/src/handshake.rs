//! The rendezvous handshake: challenge, hello, answer, confirm ([`crate::auth`]), over
//! TLS with worker certificates when the group has credentials.
//!
//! The listener sends a fresh nonce first; the dialer's hello proves the epoch secret over
//! it, the listener's answer proves it over the dialer's nonce, and the dialer confirms;
//! the listener takes the connection only then, so a dialer that gave up (and closed) is
//! never mistaken for a live link. Every accepted connection gets its own task and its own
//! hello deadline, so an idle, slow or hostile connection never holds up the real
//! neighbour: the listener keeps accepting until the rendezvous deadline.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::auth::{self, Key, Leg, Transcript, NONCE_BYTES};
use crate::error::{CollectiveError, Result};
use crate::frame::{self, Hello, Tag, HEADER_BYTES};
use crate::link::{frame_err, map_io, read_exact_by, timeout_err, write_all_by, Deadline, Peer};
use crate::secure::{check_tls_peer, Conn, RingTls};

/// At most this many incoming connections are in their handshake at once; more wait in
/// the listen backlog until one ends (each ends by its hello deadline).
pub(crate) const MAX_PENDING_HELLOS: usize = 64;

/// What both halves of a rank's rendezvous need.
pub(crate) struct Ctx {
    pub(crate) group_id: u64,
    pub(crate) world: u32,
    pub(crate) rank: u32,
    pub(crate) fmax: usize,
    /// Bound on one connection's whole handshake (TLS included).
    pub(crate) hello_timeout: Duration,
    pub(crate) key: Key,
    pub(crate) tls: Option<RingTls>,
}

fn refused(p: Peer, reason: String) -> CollectiveError {
    CollectiveError::Handshake {
        peer_rank: p.rank,
        peer_addr: p.addr,
        reason,
    }
}

/// Reads one handshake frame of `tag` with a payload of exactly `N` bytes.
async fn read_payload<const N: usize>(
    s: &mut Conn,
    tag: Tag,
    p: Peer,
    dl: Deadline,
    fmax: usize,
) -> Result<[u8; N]> {
    let op = "rendezvous";
    let mut hb = [0u8; HEADER_BYTES];
    read_exact_by(s, &mut hb, op, p, dl).await?;
    let h = frame::decode_header(&hb, fmax).map_err(|e| frame_err(op, p, e))?;
    frame::check_header(&h, tag, 0, Some(N)).map_err(|e| frame_err(op, p, e))?;
    let mut pb = [0u8; N];
    read_exact_by(s, &mut pb, op, p, dl).await?;
    Ok(pb)
}

async fn read_hello(s: &mut Conn, tag: Tag, p: Peer, dl: Deadline, fmax: usize) -> Result<Hello> {
    let pb = read_payload::<{ frame::HELLO_BYTES }>(s, tag, p, dl, fmax).await?;
    Hello::decode(&pb).map_err(|e| frame_err("rendezvous", p, e))
}

async fn write_frame(s: &mut Conn, tag: Tag, payload: &[u8], p: Peer, dl: Deadline) -> Result<()> {
    let f = frame::encode_frame(tag, 0, payload).map_err(|e| frame_err("rendezvous", p, e))?;
    write_all_by(s, &f, "rendezvous", p, dl).await
}

/// The public fields of a peer's hello: its group, world and rank.
fn check_fields(got: &Hello, c: &Ctx, p: Peer) -> std::result::Result<(), String> {
    if got.group_id != c.group_id {
        Err(format!(
            "group id {:#x} != ours {:#x}",
            got.group_id, c.group_id
        ))
    } else if got.world != c.world {
        Err(format!("world {} != ours {}", got.world, c.world))
    } else if got.rank as usize != p.rank {
        Err(format!(
            "peer says it is rank {}, expected rank {}",
            got.rank, p.rank
        ))
    } else {
        Ok(())
    }
}

fn binding(conn: &Conn, p: Peer) -> Result<[u8; auth::BINDING_BYTES]> {
    conn.binding()
        .map_err(|e| refused(p, format!("TLS channel binding: {e}")))
}

/// Connects to the right neighbour and runs the handshake, retrying until the deadline:
/// the neighbour may not listen yet, may still be in an older group (it then drops us),
/// or a stale connection may be refused. Each attempt is bounded by the hello deadline
/// (a connection that nobody answers is given up and dialled anew). Only the rendezvous
/// deadline ends the attempts; the error then carries the last reason.
pub(crate) async fn connect_right(p: Peer, c: Arc<Ctx>, dl: Deadline) -> Result<Conn> {
    let op = "rendezvous(connect)";
    let mut last: Option<CollectiveError> = None;
    loop {
        if Instant::now() >= dl.at {
            return Err(deadline_err(last, op, p, dl));
        }
        let attempt = Deadline {
            started: dl.started,
            at: (Instant::now() + c.hello_timeout).min(dl.at),
        };
        match dial_once(p, &c, attempt).await {
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

async fn dial_once(p: Peer, c: &Ctx, dl: Deadline) -> Result<Conn> {
    let op = "rendezvous(connect)";
    let s = match tokio::time::timeout_at(dl.at, TcpStream::connect(p.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(map_io(op, p, e)),
        Err(_) => return Err(timeout_err(op, p, dl.started)),
    };
    s.set_nodelay(true).map_err(|e| map_io(op, p, e))?;
    let mut conn = match &c.tls {
        None => Conn::Plain(s),
        Some(t) => {
            let name = ServerName::IpAddress(p.addr.ip().into());
            let connector = TlsConnector::from(t.creds.client.clone());
            let st = match tokio::time::timeout_at(dl.at, connector.connect(name, s)).await {
                Ok(Ok(st)) => st,
                Ok(Err(e)) => return Err(tls_failure(op, p, p.addr, e)),
                Err(_) => return Err(timeout_err(op, p, dl.started)),
            };
            check_tls_peer(st.get_ref().1, &t.creds, &t.peer_workers[p.rank], p.rank)
                .map_err(|r| refused(p, r))?;
            Conn::TlsClient(Box::new(st))
        }
    };
    let binding = binding(&conn, p)?;
    let listener_nonce: [u8; NONCE_BYTES] =
        read_payload(&mut conn, Tag::Challenge, p, dl, c.fmax).await?;
    let t = Transcript {
        group_id: c.group_id,
        world: c.world,
        dialer_rank: c.rank,
        listener_rank: p.rank as u32,
        listener_nonce,
        dialer_nonce: auth::nonce(),
        binding,
    };
    let mine = |leg| Hello {
        group_id: c.group_id,
        rank: c.rank,
        world: c.world,
        nonce: t.dialer_nonce,
        mac: auth::mac(&c.key, leg, &t),
    };
    write_frame(&mut conn, Tag::Hello, &mine(Leg::Dial).encode(), p, dl).await?;
    let got = read_hello(&mut conn, Tag::Hello, p, dl, c.fmax).await?;
    check_fields(&got, c, p).map_err(|r| refused(p, r))?;
    if got.nonce != listener_nonce || !auth::verify(&c.key, Leg::Answer, &t, &got.mac) {
        return Err(refused(
            p,
            "the listener's answer does not prove the epoch secret".into(),
        ));
    }
    write_frame(&mut conn, Tag::Confirm, &mine(Leg::Confirm).encode(), p, dl).await?;
    Ok(conn)
}

/// A failed TLS handshake: the peer going away is `PeerClosed`; anything else (plain TCP,
/// a certificate the CA did not sign, no certificate) is a refusal naming the address.
fn tls_failure(op: &'static str, p: Peer, from: SocketAddr, e: std::io::Error) -> CollectiveError {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            map_io(op, p, e)
        }
        _ => refused(p, format!("connection {from}: TLS handshake failed: {e}")),
    }
}

/// At the rendezvous deadline: a handshake refusal is the more useful error (the peer is
/// there but in another group, or cannot prove the secret); anything else is a timeout
/// naming the peer.
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

/// Accepts the left neighbour. Every incoming connection runs its handshake in its own
/// task under its own hello deadline; those that close early, stay silent, speak garbage,
/// belong to another group (a worker of an older epoch) or cannot prove the secret are
/// dropped, and accepting goes on until the deadline, so no stale or hostile connection
/// can fail or delay the rendezvous.
pub(crate) async fn accept_left(
    l: &TcpListener,
    p: Peer,
    c: Arc<Ctx>,
    dl: Deadline,
) -> Result<Conn> {
    let op = "rendezvous(accept)";
    let mut last: Option<CollectiveError> = None;
    let mut pending: JoinSet<Result<Conn>> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(done) = pending.join_next(), if !pending.is_empty() => match done {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => {
                    tracing::debug!(peer = p.rank, error = %e, "dropping an incoming connection");
                    last = Some(e);
                }
                Err(e) => {
                    last = Some(refused(p, format!("handshake task failed: {e}")));
                }
            },
            a = l.accept(), if pending.len() < MAX_PENDING_HELLOS => match a {
                Ok((s, from)) => {
                    let hello_dl = Deadline {
                        started: dl.started,
                        at: (Instant::now() + c.hello_timeout).min(dl.at),
                    };
                    pending.spawn(answer(s, from, p, c.clone(), hello_dl));
                }
                Err(e) => return Err(map_io(op, p, e)),
            },
            _ = tokio::time::sleep_until(dl.at) => return Err(deadline_err(last, op, p, dl)),
        }
    }
}

/// The listener's side of one connection, from `from`.
async fn answer(
    s: TcpStream,
    from: SocketAddr,
    p: Peer,
    c: Arc<Ctx>,
    dl: Deadline,
) -> Result<Conn> {
    let op = "rendezvous(accept)";
    s.set_nodelay(true).map_err(|e| map_io(op, p, e))?;
    let mut conn = match &c.tls {
        None => Conn::Plain(s),
        Some(t) => {
            let acceptor = TlsAcceptor::from(t.creds.server.clone());
            let st = match tokio::time::timeout_at(dl.at, acceptor.accept(s)).await {
                Ok(Ok(st)) => st,
                Ok(Err(e)) => return Err(tls_failure(op, p, from, e)),
                Err(_) => return Err(timeout_err(op, p, dl.started)),
            };
            check_tls_peer(st.get_ref().1, &t.creds, &t.peer_workers[p.rank], p.rank)
                .map_err(|r| refused(p, format!("connection from {from}: {r}")))?;
            Conn::TlsServer(Box::new(st))
        }
    };
    let binding = binding(&conn, p)?;
    let listener_nonce = auth::nonce();
    write_frame(&mut conn, Tag::Challenge, &listener_nonce, p, dl).await?;
    let got = read_hello(&mut conn, Tag::Hello, p, dl, c.fmax).await?;
    check_fields(&got, &c, p).map_err(|r| refused(p, format!("connection from {from}: {r}")))?;
    let t = Transcript {
        group_id: c.group_id,
        world: c.world,
        dialer_rank: p.rank as u32,
        listener_rank: c.rank,
        listener_nonce,
        dialer_nonce: got.nonce,
        binding,
    };
    if !auth::verify(&c.key, Leg::Dial, &t, &got.mac) {
        return Err(refused(
            p,
            format!(
                "connection from {from}: its hello does not prove the epoch secret (a wrong \
                 or missing secret, or a hello replayed from another connection)"
            ),
        ));
    }
    let answer = Hello {
        group_id: c.group_id,
        rank: c.rank,
        world: c.world,
        nonce: listener_nonce,
        mac: auth::mac(&c.key, Leg::Answer, &t),
    };
    write_frame(&mut conn, Tag::Hello, &answer.encode(), p, dl).await?;
    // The last leg: a dialer that gave up before our answer reached it has closed the
    // connection, and this read fails instead of handing back a dead link.
    let confirm = read_hello(&mut conn, Tag::Confirm, p, dl, c.fmax).await?;
    let ok = check_fields(&confirm, &c, p).is_ok()
        && confirm.nonce == got.nonce
        && auth::verify(&c.key, Leg::Confirm, &t, &confirm.mac);
    if !ok {
        return Err(refused(
            p,
            format!("connection from {from}: its confirmation does not prove the epoch secret"),
        ));
    }
    Ok(conn)
}
