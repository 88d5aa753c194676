//! The peer transport: one outgoing TCP connection per peer, fed by a bounded queue that
//! the raft thread never blocks on (`try_send`; a full queue drops, raft retransmits);
//! incoming peer connections deliver frames to the raft thread.
//!
//! Links follow the network. A connection that was cut while it held unacknowledged data
//! sits in the kernel's retransmission backoff (the RTO doubles up to seconds) long after
//! the network has healed, and a write only fails once the send buffer is full. So:
//!
//! - the receiver acknowledges what it reads on the same connection (a cumulative `u64`
//!   count of bytes, big-endian, sent after every frame and every 64 KiB of a long one),
//!   and the sender pings an idle link with empty frames;
//! - a link whose oldest unacknowledged frame has waited longer than the liveness
//!   deadline (`ServerConfig::peer_liveness`, four heartbeat intervals by default) with no
//!   acknowledgement in between is dropped, and the next message redials;
//! - peer sockets carry `TCP_USER_TIMEOUT` (the same deadline) and keepalives, so the
//!   kernel also aborts a connection whose data goes unacknowledged;
//! - every write is bounded by the deadline per 64 KiB chunk, and dials by a short
//!   connect timeout.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_pki::Role;
use phalanx_proto::NodeId;
use protobuf::Message as PbMessage;
use raft::prelude::Message;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::raft_loop::Input;
use super::security::{token_eq, Security};
use super::ConnCtx;
use crate::wire::{self, PEER_MAGIC};

/// Set in a frame's length: the frame is a piece of a longer message, and more follow.
const FRAME_MORE: u32 = 0x8000_0000;

#[derive(Serialize, Deserialize)]
struct Handshake {
    /// The sender's node id: with TLS it must be the one its certificate names.
    from: NodeId,
    /// The shared token in `--insecure` mode; empty with TLS.
    #[serde(default)]
    token: String,
    /// The sender wants a cumulative count of bytes read back and may send empty frames
    /// (pings). Nodes of this version always ask.
    #[serde(default)]
    acks: bool,
}

/// Timing of one outgoing peer link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkTiming {
    /// Drop the link when its oldest unacknowledged frame has waited this long.
    pub liveness: Duration,
    /// Give up a dial (or the handshake write) after this long.
    pub connect: Duration,
    /// After a failed dial, wait this long (dropping what is queued) before the next.
    pub backoff: Duration,
}

impl LinkTiming {
    pub(crate) fn new(liveness: Duration) -> Self {
        LinkTiming {
            liveness,
            connect: (liveness / 2).max(Duration::from_millis(100)),
            backoff: (liveness / 10).max(Duration::from_millis(10)),
        }
    }
    fn ping_every(&self) -> Duration {
        self.liveness / 4
    }
}

/// `TCP_USER_TIMEOUT` and keepalives on a peer socket: the kernel aborts a connection
/// whose data stays unacknowledged for `user_timeout`.
pub(crate) fn set_peer_socket_options(s: &TcpStream, user_timeout: Duration) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let _ = s.set_nodelay(true);
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt on a socket this function borrows, with a pointer to a live
        // c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            debug!(opt, err = %std::io::Error::last_os_error(), "setsockopt failed");
        }
    };
    let ms = user_timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    let secs = (ms / 1000).max(1);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    #[cfg(target_os = "linux")]
    {
        set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    }
}

/// One live outgoing connection.
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

struct Link {
    w: BoxWrite,
    /// The receiver's cumulative count of bytes read; closed when the connection ends.
    acks: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<()>,
    sent: u64,
    acked: u64,
    /// (byte offset of its end, when its write completed) of each frame not yet read.
    unacked: VecDeque<(u64, Instant)>,
    last_progress: Instant,
    last_write: Instant,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Link {
    /// Dials node `to` at `addr`: with TLS, the server must present `to`'s controller
    /// certificate.
    async fn dial(
        from: NodeId,
        to: NodeId,
        addr: &str,
        sec: &Security,
        t: LinkTiming,
    ) -> Option<Link> {
        let s = tokio::time::timeout(t.connect, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        set_peer_socket_options(&s, t.liveness);
        let token = match sec {
            Security::Insecure { token } => token.clone(),
            Security::Tls(_) => String::new(),
        };
        let hs = serde_json::to_vec(&Handshake {
            from,
            token,
            acks: true,
        })
        .ok()?;
        let mut hello = PEER_MAGIC.to_vec();
        hello.extend_from_slice(&wire::encode_frame(&hs));
        let (mut r, mut w): (Box<dyn AsyncRead + Send + Unpin>, BoxWrite) = match sec {
            Security::Insecure { .. } => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Security::Tls(tls) => {
                let conn = tokio_rustls::TlsConnector::from(tls.raft_client.clone());
                let name = ServerName::try_from("phalanx-controller").ok()?;
                let st = match tokio::time::timeout(t.connect, conn.connect(name, s)).await {
                    Ok(Ok(st)) => st,
                    Ok(Err(e)) => {
                        debug!(to, %addr, %e, "peer TLS handshake failed");
                        return None;
                    }
                    Err(_) => return None,
                };
                let who = st
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| phalanx_pki::peer_role(c, tls.dir.cluster_id()));
                if !matches!(who, Some(Ok(Role::Controller(id))) if id == to) {
                    warn!(to, %addr, ?who, "peer link refused: the server is not controller {to}");
                    return None;
                }
                let (r, w) = tokio::io::split(st);
                (Box::new(r), Box::new(w))
            }
        };
        tokio::time::timeout(t.connect, w.write_all(&hello))
            .await
            .ok()?
            .ok()?;
        let (tx, acks) = watch::channel(0u64);
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            while r.read_exact(&mut b).await.is_ok() {
                tx.send_replace(u64::from_be_bytes(b));
            }
        });
        let now = Instant::now();
        Some(Link {
            w,
            acks,
            reader,
            sent: 0,
            acked: 0,
            unacked: VecDeque::new(),
            last_progress: now,
            last_write: now,
        })
    }

    async fn write_frame(&mut self, frame: &[u8], t: LinkTiming) -> std::io::Result<()> {
        for chunk in frame.chunks(64 << 10) {
            match tokio::time::timeout(t.liveness, self.w.write_all(chunk)).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        self.sent += frame.len() as u64;
        let now = Instant::now();
        self.unacked.push_back((self.sent, now));
        self.last_write = now;
        Ok(())
    }

    /// Why the link should be dropped, if it should.
    fn dead(&mut self, t: LinkTiming) -> Option<String> {
        if self.acks.has_changed().is_err() {
            return Some("the peer closed the connection".into());
        }
        let acked = *self.acks.borrow_and_update();
        let now = Instant::now();
        if acked > self.acked {
            self.acked = acked;
            self.last_progress = now;
            while self.unacked.front().is_some_and(|(n, _)| *n <= acked) {
                self.unacked.pop_front();
            }
        }
        let (_, oldest) = self.unacked.front()?;
        let waited = now.saturating_duration_since((*oldest).max(self.last_progress));
        (waited > t.liveness).then(|| {
            format!(
                "{} frame(s) unacknowledged for {} ms",
                self.unacked.len(),
                waited.as_millis()
            )
        })
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn peer_sender(
    from: NodeId,
    to: NodeId,
    addr: String,
    sec: Security,
    mut rx: mpsc::Receiver<Message>,
    frame_bytes_max: u64,
    message_bytes_max: u64,
    t: LinkTiming,
) {
    let mut link: Option<Link> = None;
    let mut check = tokio::time::interval(t.ping_every());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = check.tick() => {
                if let Some(l) = link.as_mut() {
                    if let Some(why) = l.dead(t) {
                        info!(to, %addr, %why, "peer link dead; redialing on the next message");
                        link = None;
                    } else if l.last_write.elapsed() >= t.ping_every()
                        && l.write_frame(&wire::encode_frame(&[]), t).await.is_err()
                    {
                        debug!(to, "peer ping failed; reconnecting");
                        link = None;
                    }
                }
                continue;
            }
        };
        if link.is_none() {
            link = Link::dial(from, to, &addr, &sec, t).await;
            if link.is_none() {
                // Unreachable: drop what is queued (raft retransmits) and back off a little.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(t.backoff).await;
                continue;
            }
            debug!(to, %addr, "peer link up");
        }
        let bytes = match m.write_to_bytes() {
            Ok(b) if (b.len() as u64) <= message_bytes_max => b,
            Ok(b) => {
                warn!(
                    to,
                    len = b.len(),
                    "message exceeds message_bytes_max; dropped"
                );
                continue;
            }
            Err(e) => {
                warn!(to, %e, "cannot encode message");
                continue;
            }
        };
        let Some(l) = link.as_mut().filter(|_| !bytes.is_empty()) else {
            continue;
        };
        // A message longer than a frame goes in frame-sized pieces; every piece but the
        // last carries the MORE bit in its length.
        let piece = (frame_bytes_max as usize).max(1);
        let n = bytes.len().div_ceil(piece).max(1);
        let mut failed = false;
        for (i, part) in bytes.chunks(piece).enumerate() {
            let mut len = part.len() as u32;
            if i + 1 < n {
                len |= FRAME_MORE;
            }
            let mut frame = Vec::with_capacity(4 + part.len());
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(part);
            if l.write_frame(&frame, t).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            debug!(to, "peer write failed; reconnecting");
            link = None;
        } else if let Some(why) = l.dead(t) {
            info!(to, %addr, %why, "peer link dead; redialing on the next message");
            link = None;
        }
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: u64,
    idle: Duration,
) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    tokio::time::timeout(idle, stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let n = u32::from_be_bytes(len) as u64;
    if n > max {
        return None;
    }
    let mut buf = vec![0u8; n as usize];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf)
}

/// Serves one incoming peer link. `verified`: the node id of the TLS client certificate
/// (`None` in `--insecure` mode, where the shared token is checked instead).
pub(crate) async fn handle_peer<S>(
    mut stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnCtx>,
    verified: Option<NodeId>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut magic = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut magic));
    if !matches!(read.await, Ok(Ok(_))) {
        return;
    }
    let Some(hs) = read_frame(&mut stream, 4096, Duration::from_secs(2)).await else {
        warn!(%peer, "peer handshake missing or too large; closed");
        return;
    };
    let hs: Handshake = match serde_json::from_slice(&hs) {
        Ok(h) => h,
        Err(e) => {
            warn!(%peer, %e, "malformed peer handshake; closed");
            return;
        }
    };
    if &magic != PEER_MAGIC {
        warn!(%peer, "peer link without the PHXR magic; closed");
        return;
    }
    match (verified, &ctx.cfg.security) {
        (Some(id), _) if id != hs.from => {
            warn!(%peer, claimed = hs.from, certificate = id, "peer connection rejected: it claims another node's id than its certificate names");
            return;
        }
        (Some(_), _) => {}
        (None, Security::Insecure { token }) if token_eq(&hs.token, token) => {}
        (None, _) => {
            warn!(%peer, from = hs.from, "peer connection rejected: wrong cluster token");
            return;
        }
    }
    debug!(%peer, from = hs.from, acks = hs.acks, "peer connected");
    let liveness = ctx.cfg.peer_liveness();
    let (mut r, mut w) = tokio::io::split(stream);
    // Acknowledgements go back from their own task, so a stalled back channel never holds
    // up delivery; only the latest count matters.
    let (ack_tx, mut ack_rx) = watch::channel(0u64);
    let acker = hs.acks.then(|| {
        tokio::spawn(async move {
            while ack_rx.changed().await.is_ok() {
                let n = *ack_rx.borrow_and_update();
                match tokio::time::timeout(liveness, w.write_all(&n.to_be_bytes())).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        })
    });
    // A sender of this version pings an idle link every quarter of its liveness deadline;
    // one that asked for no acks may stay silent for long.
    let idle = if hs.acks {
        (liveness * 10).max(Duration::from_secs(2))
    } else {
        Duration::from_secs(30)
    };
    let mut read = 0u64;
    // Pieces of a message longer than a frame, until its last piece arrives.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let ack = |n: u64| {
            if hs.acks {
                ack_tx.send_replace(n);
            }
        };
        let mut len = [0u8; 4];
        match tokio::time::timeout(idle, r.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let raw_len = u32::from_be_bytes(len);
        let more = raw_len & FRAME_MORE != 0;
        let n = (raw_len & !FRAME_MORE) as u64;
        if n > ctx.cfg.frame_bytes_max {
            warn!(%peer, len = n, "peer frame exceeds frame_bytes_max; closed");
            break;
        }
        read += 4;
        // The body in 64 KiB pieces, each acknowledged, so that a long frame on a slow
        // link shows progress before it is complete.
        let mut buf = vec![0u8; n as usize];
        let mut at = 0usize;
        let mut ok = true;
        while at < buf.len() {
            let end = (at + (64 << 10)).min(buf.len());
            match tokio::time::timeout(idle, r.read_exact(&mut buf[at..end])).await {
                Ok(Ok(_)) => {}
                _ => {
                    ok = false;
                    break;
                }
            }
            read += (end - at) as u64;
            at = end;
            if at < buf.len() {
                ack(read);
            }
        }
        if !ok {
            break;
        }
        ack(read);
        if more || !pending.is_empty() {
            if pending.len() as u64 + buf.len() as u64 > ctx.cfg.message_bytes_max {
                warn!(%peer, len = pending.len() + buf.len(), "peer message exceeds message_bytes_max; closed");
                break;
            }
            pending.extend_from_slice(&buf);
            if more {
                continue;
            }
            buf = std::mem::take(&mut pending);
        } else if buf.is_empty() && hs.acks {
            continue; // ping
        }
        match Message::parse_from_bytes(&buf) {
            Ok(m) => {
                if m.from != hs.from {
                    warn!(%peer, claimed = m.from, handshake = hs.from, "message from a different node id; closed");
                    break;
                }
                if ctx.inputs.send(Input::Peer(m)).is_err() {
                    break;
                }
            }
            Err(e) => {
                warn!(%peer, %e, "malformed peer frame; closed");
                break;
            }
        }
    }
    if let Some(a) = acker {
        a.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use tokio::net::TcpListener;

    use super::*;
    use crate::server::ServerConfig;

    /// A long frame on a slow link is acknowledged piece by piece, so the link is not
    /// taken for dead while the frame is still arriving (when only whole frames were
    /// acknowledged, a snapshot slower than the liveness deadline was never delivered: the
    /// link was dropped and the snapshot sent again, for ever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_frame_on_a_slow_link_keeps_the_link_alive() {
        let (tx, rx) = std::sync::mpsc::channel();
        let cfg = ServerConfig::new(
            1,
            "127.0.0.1:0".into(),
            BTreeMap::from([(1, "127.0.0.1:1".to_string())]),
            PathBuf::from("/nonexistent"),
            Security::insecure("tok"),
        );
        let ctx = Arc::new(ConnCtx {
            inputs: tx,
            cfg,
            metrics: crate::server::metrics::new_metrics(1).unwrap(),
        });
        let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver_addr = receiver.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, peer)) = receiver.accept().await {
                tokio::spawn(handle_peer(s, peer, ctx.clone(), None));
            }
        });
        // A link of 512 KiB/s towards the receiver (acknowledgements flow back freely).
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let Ok((inbound, _)) = proxy.accept().await else {
                return;
            };
            let outbound = TcpStream::connect(receiver_addr).await.unwrap();
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut or, &mut iw).await;
            });
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let Ok(n) = ir.read(&mut buf).await else {
                    return;
                };
                if n == 0 || ow.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(31)).await;
            }
        });

        let t = LinkTiming::new(Duration::from_millis(400));
        let mut link = Link::dial(2, 1, &proxy_addr, &Security::insecure("tok"), t)
            .await
            .expect("dial");
        let m = Message {
            from: 2,
            to: 1,
            context: vec![7u8; 1 << 20].into(),
            ..Default::default()
        };
        let frame = wire::encode_frame(&m.write_to_bytes().unwrap());
        let started = Instant::now();
        link.write_frame(&frame, t).await.expect("write");
        let rx = Arc::new(std::sync::Mutex::new(rx));
        loop {
            let r = rx.clone();
            let got = tokio::task::spawn_blocking(move || {
                r.lock()
                    .unwrap()
                    .recv_timeout(Duration::from_millis(20))
                    .ok()
            })
            .await
            .unwrap();
            if let Some(Input::Peer(got)) = got {
                assert_eq!(got.context.len(), 1 << 20);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the frame never arrived"
            );
            if let Some(why) = link.dead(t) {
                panic!(
                    "the link was taken for dead {:?} into a frame that was still arriving: {why}",
                    started.elapsed()
                );
            }
        }
        assert!(
            started.elapsed() > 2 * t.liveness,
            "the link was not slow enough to test anything ({:?})",
            started.elapsed()
        );
        assert!(link.dead(t).is_none());
    }
}
