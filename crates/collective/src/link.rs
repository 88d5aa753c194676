//! The two links of a ring rank (to the right neighbour, from the left one), the
//! deadlines that bound every read and write, and the activity record that the silence
//! watch reads: since when each direction has been waiting on its peer.
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::{CollectiveError, Result};
use crate::frame::{self, FrameHeader, Tag, HEADER_BYTES};
use crate::group::{bytes_of, bytes_of_mut};
use crate::secure::Conn;

/// Since when one direction of a link has been waiting for its current frame (µs after
/// the group's origin, plus one; 0 when nothing is pending).
#[derive(Debug, Default)]
pub(crate) struct Pending(AtomicU64);

impl Pending {
    fn begin(&self, a: &Activity) {
        let us = a.origin.elapsed().as_micros() as u64 + 1;
        self.0.store(us, Ordering::Relaxed);
    }
    fn end(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
    /// Pending while `fut` runs (a rendezvous half waiting on its neighbour).
    pub(crate) async fn during<T>(
        &self,
        a: &Activity,
        fut: impl std::future::Future<Output = T>,
    ) -> T {
        self.begin(a);
        let out = fut.await;
        self.end();
        out
    }
    /// How long the current frame has been pending, if one is.
    pub(crate) fn waiting(&self, a: &Activity) -> Option<Duration> {
        let since = self.0.load(Ordering::Relaxed);
        (since != 0).then(|| {
            let now = a.origin.elapsed().as_micros() as u64 + 1;
            Duration::from_micros(now.saturating_sub(since))
        })
    }
}

/// A rank's view of its links' progress, shared with whoever watches for silence.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: std::time::Instant,
    /// The frame being sent to the right neighbour.
    pub(crate) send: Pending,
    /// The frame awaited from the left neighbour.
    pub(crate) recv: Pending,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            origin: std::time::Instant::now(),
            send: Pending::default(),
            recv: Pending::default(),
        }
    }
}

/// Peer identity used in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) rank: usize,
    pub(crate) addr: SocketAddr,
}

pub(crate) fn map_io(op: &'static str, p: Peer, e: std::io::Error) -> CollectiveError {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            CollectiveError::PeerClosed {
                op,
                peer_rank: p.rank,
                peer_addr: p.addr,
            }
        }
        _ => CollectiveError::Io {
            op,
            peer_rank: p.rank,
            peer_addr: p.addr,
            source: e,
        },
    }
}

pub(crate) fn timeout_err(op: &'static str, p: Peer, started: Instant) -> CollectiveError {
    CollectiveError::Timeout {
        op,
        peer_rank: p.rank,
        peer_addr: p.addr,
        after_ms: started.elapsed().as_millis() as u64,
    }
}

pub(crate) fn frame_err(op: &'static str, p: Peer, source: frame::FrameError) -> CollectiveError {
    CollectiveError::Frame {
        op,
        peer_rank: p.rank,
        peer_addr: p.addr,
        source,
    }
}

/// Deadline for one op (start time kept for the error message).
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) started: Instant,
    pub(crate) at: Instant,
}

impl Deadline {
    pub(crate) fn after(d: Duration) -> Self {
        let started = Instant::now();
        Deadline {
            started,
            at: started + d,
        }
    }
}

/// Writes all of `buf` and flushes it (a TLS stream may hold back the last record).
pub(crate) async fn write_all_by<S: AsyncWrite + Unpin>(
    s: &mut S,
    buf: &[u8],
    op: &'static str,
    p: Peer,
    dl: Deadline,
) -> Result<()> {
    let write = async {
        s.write_all(buf).await?;
        s.flush().await
    };
    match tokio::time::timeout_at(dl.at, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(map_io(op, p, e)),
        Err(_) => Err(timeout_err(op, p, dl.started)),
    }
}

pub(crate) async fn read_exact_by<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    op: &'static str,
    p: Peer,
    dl: Deadline,
) -> Result<()> {
    match tokio::time::timeout_at(dl.at, s.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(map_io(op, p, e)),
        Err(_) => Err(timeout_err(op, p, dl.started)),
    }
}

/// Write all of `bufs` (header + payload) with vectored writes, so that a
/// frame costs no copy into an intermediate buffer, then flush (TLS: the last record
/// leaves now, not with the next frame, which may never come before the peer answers).
pub(crate) async fn write_all_vectored<S: AsyncWrite + Unpin>(
    s: &mut S,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = s.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    s.flush().await
}

/// The outbound link (to the right neighbour); only written after rendezvous.
pub(crate) struct TxLink {
    pub(crate) stream: Conn,
    pub(crate) peer: Peer,
    pub(crate) seq: u64,
    pub(crate) activity: Arc<Activity>,
}

impl TxLink {
    /// Send one data frame: header and payload in one vectored write.
    pub(crate) async fn send(
        &mut self,
        payload: &[u8],
        op: &'static str,
        dl: Deadline,
    ) -> Result<()> {
        let payload_bytes = u32::try_from(payload.len()).map_err(|_| {
            frame_err(
                op,
                self.peer,
                frame::FrameError::TooLarge {
                    payload_bytes: payload.len() as u64,
                    frame_bytes_max: u32::MAX as usize,
                },
            )
        })?;
        self.seq += 1;
        let h = frame::encode_header(&FrameHeader {
            tag: Tag::Data,
            seq: self.seq,
            payload_bytes,
        });
        let mut bufs = [IoSlice::new(&h), IoSlice::new(payload)];
        self.activity.send.begin(&self.activity);
        match tokio::time::timeout_at(dl.at, write_all_vectored(&mut self.stream, &mut bufs)).await
        {
            Ok(Ok(())) => {
                self.activity.send.end();
                Ok(())
            }
            Ok(Err(e)) => Err(map_io(op, self.peer, e)),
            Err(_) => Err(timeout_err(op, self.peer, dl.started)),
        }
    }
}

/// The inbound link (from the left neighbour); only read after rendezvous.
pub(crate) struct RxLink {
    pub(crate) stream: Conn,
    pub(crate) peer: Peer,
    pub(crate) seq: u64,
    /// Scratch for payloads that are combined rather than stored; `u64` backing
    /// so that it can be viewed as any element type without misalignment.
    pub(crate) buf: Vec<u64>,
    pub(crate) frame_bytes_max: usize,
    pub(crate) activity: Arc<Activity>,
}

impl RxLink {
    /// Read and check the next data frame header; `expected` is the exact
    /// payload size when known. Returns the payload size.
    async fn recv_header(
        &mut self,
        expected: Option<usize>,
        op: &'static str,
        dl: Deadline,
    ) -> Result<usize> {
        let mut hb = [0u8; HEADER_BYTES];
        self.activity.recv.begin(&self.activity);
        read_exact_by(&mut self.stream, &mut hb, op, self.peer, dl).await?;
        let h = frame::decode_header(&hb, self.frame_bytes_max)
            .map_err(|e| frame_err(op, self.peer, e))?;
        self.seq += 1;
        frame::check_header(&h, Tag::Data, self.seq, expected)
            .map_err(|e| frame_err(op, self.peer, e))?;
        Ok(h.payload_bytes as usize)
    }

    /// Receive the next data frame, whose payload must be exactly `dst.len()`
    /// bytes, directly into `dst`.
    pub(crate) async fn recv_into(
        &mut self,
        dst: &mut [u8],
        op: &'static str,
        dl: Deadline,
    ) -> Result<()> {
        self.recv_header(Some(dst.len()), op, dl).await?;
        read_exact_by(&mut self.stream, dst, op, self.peer, dl).await?;
        self.activity.recv.end();
        Ok(())
    }

    /// Receive the next data frame into the scratch buffer (8-byte aligned).
    pub(crate) async fn recv(
        &mut self,
        expected: Option<usize>,
        op: &'static str,
        dl: Deadline,
    ) -> Result<&[u8]> {
        let n = self.recv_header(expected, op, dl).await?;
        if self.buf.len() * 8 < n {
            self.buf.resize(n.div_ceil(8), 0);
        }
        let dst = &mut bytes_of_mut(&mut self.buf[..])[..n];
        read_exact_by(&mut self.stream, dst, op, self.peer, dl).await?;
        self.activity.recv.end();
        Ok(&bytes_of(&self.buf[..])[..n])
    }
}
