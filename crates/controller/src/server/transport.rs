//! The peer transport: one outgoing TCP connection per peer, fed by a bounded queue that
//! the raft thread never blocks on; incoming peer connections deliver frames to the raft
//! thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use phalanx_proto::NodeId;
use protobuf::Message as PbMessage;
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::raft_loop::Input;
use super::{token_eq, ConnCtx};
use crate::wire::{self, PEER_MAGIC};

#[derive(Serialize, Deserialize)]
struct Handshake {
    from: NodeId,
    token: String,
}

pub(crate) async fn peer_sender(
    from: NodeId,
    to: NodeId,
    addr: String,
    token: String,
    mut rx: mpsc::Receiver<Message>,
    frame_bytes_max: u64,
) {
    let mut conn: Option<TcpStream> = None;
    while let Some(m) = rx.recv().await {
        if conn.is_none() {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(&addr)).await
            {
                {
                    let _ = s.set_nodelay(true);
                    let hs = serde_json::to_vec(&Handshake {
                        from,
                        token: token.clone(),
                    })
                    .unwrap_or_default();
                    let mut hello = PEER_MAGIC.to_vec();
                    hello.extend_from_slice(&wire::encode_frame(&hs));
                    if tokio::time::timeout(Duration::from_secs(1), s.write_all(&hello))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        conn = Some(s);
                    }
                }
            }
            if conn.is_none() {
                // Unreachable: drop what is queued (raft retransmits) and back off a little.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let bytes = match m.write_to_bytes() {
            Ok(b) if (b.len() as u64) <= frame_bytes_max => b,
            Ok(b) => {
                warn!(
                    to,
                    len = b.len(),
                    "message exceeds frame_bytes_max; dropped"
                );
                continue;
            }
            Err(e) => {
                warn!(to, %e, "cannot encode message");
                continue;
            }
        };
        let frame = wire::encode_frame(&bytes);
        let Some(s) = conn.as_mut() else { continue };
        let ok = tokio::time::timeout(Duration::from_secs(2), s.write_all(&frame))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ok {
            debug!(to, "peer write failed; reconnecting");
            conn = None;
        }
    }
}

async fn read_frame(stream: &mut TcpStream, max: u64, idle: Duration) -> Option<Vec<u8>> {
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

pub(crate) async fn handle_peer(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let mut magic = [0u8; 4];
    if stream.read_exact(&mut magic).await.is_err() {
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
    if !token_eq(&hs.token, &ctx.token) {
        warn!(%peer, from = hs.from, "peer connection rejected: wrong cluster token");
        return;
    }
    debug!(%peer, from = hs.from, "peer connected");
    while let Some(buf) = read_frame(
        &mut stream,
        ctx.cfg.frame_bytes_max,
        Duration::from_secs(30),
    )
    .await
    {
        match Message::parse_from_bytes(&buf) {
            Ok(m) => {
                if m.from != hs.from {
                    warn!(%peer, claimed = m.from, handshake = hs.from, "message from a different node id; closed");
                    return;
                }
                if ctx.inputs.send(Input::Peer(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(%peer, %e, "malformed peer frame; closed");
                return;
            }
        }
    }
}
