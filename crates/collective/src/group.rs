//! The async group: rendezvous and ring collectives over TCP.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{CollectiveError, Result};
use crate::frame::{self, FrameHeader, Hello, Tag, HEADER_BYTES};

/// Default chunk size for pipelined ring transfers.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default max payload per frame.
pub const DEFAULT_FRAME_BYTES_MAX: usize = 16 << 20;
/// Default group id carried in the handshake.
pub const DEFAULT_GROUP_ID: u64 = 0x5048_414c_414e_5831; // "PHALANX1"

/// Configuration of one rank's membership in a group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Listen address of every rank, indexed by rank.
    pub peers: Vec<SocketAddr>,
    /// Must match on all ranks (e.g. derived from job id and epoch) so that a
    /// stale worker from an older epoch cannot join.
    pub group_id: u64,
    /// Bound on the whole rendezvous (connect retries, accept, handshake).
    pub rendezvous_timeout: Duration,
    /// Default bound on each collective operation.
    pub op_timeout: Duration,
    /// Pipelining chunk size for ring transfers.
    pub chunk_bytes: usize,
    /// Largest payload accepted in one frame.
    pub frame_bytes_max: usize,
}

impl GroupConfig {
    /// A config with defaults: world = peers.len(), 10 s rendezvous, 30 s ops,
    /// 1 MiB chunks, 16 MiB frame limit, the default group id.
    pub fn new(rank: usize, peers: Vec<SocketAddr>) -> Self {
        GroupConfig {
            rank,
            world: peers.len(),
            peers,
            group_id: DEFAULT_GROUP_ID,
            rendezvous_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(30),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            frame_bytes_max: DEFAULT_FRAME_BYTES_MAX,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(CollectiveError::InvalidArgument { reason });
        if self.world == 0 {
            return bad("world must be >= 1".into());
        }
        if self.world > u32::MAX as usize {
            return bad(format!("world {} too large", self.world));
        }
        if self.rank >= self.world {
            return bad(format!(
                "rank {} out of range for world {}",
                self.rank, self.world
            ));
        }
        if self.peers.len() != self.world {
            return bad(format!(
                "peers has {} addresses, world is {}",
                self.peers.len(),
                self.world
            ));
        }
        if self.frame_bytes_max < 64 || self.frame_bytes_max > u32::MAX as usize {
            return bad(format!(
                "frame_bytes_max {} must be in 64..=u32::MAX",
                self.frame_bytes_max
            ));
        }
        if self.chunk_bytes < 8 {
            return bad(format!("chunk_bytes {} must be >= 8", self.chunk_bytes));
        }
        Ok(())
    }
}

/// Peer identity used in errors.
#[derive(Debug, Clone, Copy)]
struct Peer {
    rank: usize,
    addr: SocketAddr,
}

fn map_io(op: &'static str, p: Peer, e: std::io::Error) -> CollectiveError {
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

fn timeout_err(op: &'static str, p: Peer, started: Instant) -> CollectiveError {
    CollectiveError::Timeout {
        op,
        peer_rank: p.rank,
        peer_addr: p.addr,
        after_ms: started.elapsed().as_millis() as u64,
    }
}

fn frame_err(op: &'static str, p: Peer, source: frame::FrameError) -> CollectiveError {
    CollectiveError::Frame {
        op,
        peer_rank: p.rank,
        peer_addr: p.addr,
        source,
    }
}

/// Deadline for one op (start time kept for the error message).
#[derive(Clone, Copy)]
struct Deadline {
    started: Instant,
    at: Instant,
}

impl Deadline {
    fn after(d: Duration) -> Self {
        let started = Instant::now();
        Deadline {
            started,
            at: started + d,
        }
    }
}

async fn write_all_by(
    s: &mut TcpStream,
    buf: &[u8],
    op: &'static str,
    p: Peer,
    dl: Deadline,
) -> Result<()> {
    match tokio::time::timeout_at(dl.at, s.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(map_io(op, p, e)),
        Err(_) => Err(timeout_err(op, p, dl.started)),
    }
}

async fn read_exact_by(
    s: &mut TcpStream,
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
/// frame costs no copy into an intermediate buffer.
async fn write_all_vectored(
    s: &mut TcpStream,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = s.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The outbound link (to the right neighbour); only written after rendezvous.
struct TxLink {
    stream: TcpStream,
    peer: Peer,
    seq: u64,
}

impl TxLink {
    /// Send one data frame: header and payload in one vectored write.
    async fn send(&mut self, payload: &[u8], op: &'static str, dl: Deadline) -> Result<()> {
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
        match tokio::time::timeout_at(dl.at, write_all_vectored(&mut self.stream, &mut bufs)).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(map_io(op, self.peer, e)),
            Err(_) => Err(timeout_err(op, self.peer, dl.started)),
        }
    }
}

/// The inbound link (from the left neighbour); only read after rendezvous.
struct RxLink {
    stream: TcpStream,
    peer: Peer,
    seq: u64,
    /// Scratch for payloads that are combined rather than stored; `u64` backing
    /// so that it can be viewed as any element type without misalignment.
    buf: Vec<u64>,
    frame_bytes_max: usize,
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
    async fn recv_into(&mut self, dst: &mut [u8], op: &'static str, dl: Deadline) -> Result<()> {
        self.recv_header(Some(dst.len()), op, dl).await?;
        read_exact_by(&mut self.stream, dst, op, self.peer, dl).await
    }

    /// Receive the next data frame into the scratch buffer (8-byte aligned).
    async fn recv(
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
        Ok(&bytes_of(&self.buf[..])[..n])
    }
}

/// Plain-old-data numeric types: every bit pattern is a valid value and there
/// is no padding, so a slice may be viewed as bytes and back.
///
/// # Safety
/// Implement only for primitive integer and float types.
pub(crate) unsafe trait Pod: Copy + Send + Sync + 'static {}
// SAFETY: primitive numeric types have no padding and no invalid bit patterns.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for i64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}
// SAFETY: as above.
unsafe impl Pod for f64 {}

/// View a slice of plain numbers as its bytes (native byte order).
fn bytes_of<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding); u8 has alignment 1; same memory, same lifetime.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Mutable byte view of a slice of plain numbers (any bytes written are valid).
fn bytes_of_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod (every bit pattern valid, no padding); exclusive borrow.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// View 8-byte-aligned bytes as `T`s. Panics if misaligned or not a multiple.
fn cast_slice<T: Pod>(b: &[u8]) -> &[T] {
    let sz = std::mem::size_of::<T>();
    assert!(b.len() % sz == 0 && (b.as_ptr() as usize) % std::mem::align_of::<T>() == 0);
    // SAFETY: checked alignment and length; T is Pod so any bytes are a valid T.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<T>(), b.len() / sz) }
}

/// Element types the ring can reduce.
pub(crate) trait Elem: Pod {
    const BYTES: usize;
    fn write_le(self, out: &mut [u8]);
    fn read_le(b: &[u8]) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $n:expr) => {
        impl Elem for $t {
            const BYTES: usize = $n;
            #[inline]
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn read_le(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    };
}
impl_elem!(i64, 8);
impl_elem!(f32, 4);
impl_elem!(f64, 8);

/// Segment `i` of `n` over `len` elements (first `len % n` segments get one more).
fn segment(i: usize, n: usize, len: usize) -> Range<usize> {
    let base = len / n;
    let rem = len % n;
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

/// Disjoint borrows of two ranges: (`a` shared, `b` mutable).
fn split_two<T>(data: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    if a.end <= b.start {
        let (lo, hi) = data.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = data.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    }
}

/// Disjoint mutable borrows of two ranges.
fn split_two_mut<T>(data: &mut [T], a: Range<usize>, b: Range<usize>) -> (&mut [T], &mut [T]) {
    if a.end <= b.start {
        let (lo, hi) = data.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = data.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b])
    }
}

/// `dst` = local encoded values of the global index range `r` (indices
/// `>= glen` are the micro-batch count slot), plus `base` when given.
fn local_encode(
    enc: &crate::fixed_point::Encoder,
    grads: &[&[f32]],
    count: i64,
    glen: usize,
    r: Range<usize>,
    base: Option<&[i64]>,
    dst: &mut [i64],
) {
    let gr = r.start.min(glen)..r.end.min(glen);
    let m = gr.len();
    enc.sum_range(grads, gr, base.map(|b| &b[..m]), &mut dst[..m]);
    if r.end > glen {
        dst[m] = base.map_or(0, |b| b[m]).wrapping_add(count);
    }
}

/// Decode `src` (global indices from `start`, count slot skipped) into
/// `out_seg`, which begins at global index `seg_start`.
fn decode_range(
    src: &[i64],
    start: usize,
    glen: usize,
    k: i32,
    total: usize,
    out_seg: &mut [f32],
    seg_start: usize,
) {
    let m = (start + src.len()).min(glen).saturating_sub(start);
    if m > 0 {
        crate::fixed_point::decode(&src[..m], k, total, &mut out_seg[start - seg_start..][..m]);
    }
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// A connected group (async API). All ranks must call the same operations in
/// the same order with the same lengths.
pub struct Group {
    cfg: GroupConfig,
    tx: Option<TxLink>,
    rx: Option<RxLink>,
    broken: Option<String>,
    /// Reusable i64 buffer for [`crate::deterministic`] (avoids page faults).
    pub(crate) scratch_i64: Vec<i64>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.cfg.rank)
            .field("world", &self.cfg.world)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Group {
    /// Rendezvous: connect to rank `(r+1)%N`, accept from `(r-1+N)%N`, and
    /// exchange validated hello frames, all within `cfg.rendezvous_timeout`.
    pub async fn connect(cfg: GroupConfig, listener: TcpListener) -> Result<Group> {
        cfg.validate()?;
        let (rank, world) = (cfg.rank, cfg.world);
        let span = tracing::debug_span!("rendezvous", rank, world);
        if world == 1 {
            return Ok(Group {
                cfg,
                tx: None,
                rx: None,
                broken: None,
                scratch_i64: Vec::new(),
            });
        }
        let dl = Deadline::after(cfg.rendezvous_timeout);
        let right = Peer {
            rank: (rank + 1) % world,
            addr: cfg.peers[(rank + 1) % world],
        };
        let left = Peer {
            rank: (rank + world - 1) % world,
            addr: cfg.peers[(rank + world - 1) % world],
        };
        let hello = Hello {
            group_id: cfg.group_id,
            rank: rank as u32,
            world: world as u32,
        };
        let fmax = cfg.frame_bytes_max;
        let (tx, rx) = async {
            tokio::join!(
                connect_right(right, hello, dl, fmax),
                accept_left(&listener, left, hello, dl, fmax)
            )
        }
        .instrument(span)
        .await;
        // Both halves end by the deadline; a handshake refusal explains more than a timeout.
        let (tx, rx) = match (tx, rx) {
            (Ok(tx), Ok(rx)) => (tx, rx),
            (Err(e @ CollectiveError::Handshake { .. }), _)
            | (_, Err(e @ CollectiveError::Handshake { .. })) => return Err(e),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let mut group = Group {
            tx: Some(TxLink {
                stream: tx,
                peer: right,
                seq: 0,
            }),
            rx: Some(RxLink {
                stream: rx,
                peer: left,
                seq: 0,
                buf: Vec::new(),
                frame_bytes_max: fmax,
            }),
            cfg,
            broken: None,
            scratch_i64: Vec::new(),
        };
        // Both of this rank's links are up, but its neighbours' other links may not be:
        // the group counts as formed only once every rank has both, learned by a barrier
        // bounded by what is left of the rendezvous deadline (not by the op timeout). So
        // all ranks leave the rendezvous within one ring round trip of each other, and the
        // first operation never times out because a rank far along the ring was still
        // dialling.
        let left = dl.at.saturating_duration_since(Instant::now());
        group
            .all_gather_op("rendezvous(barrier)", &[], left)
            .await?;
        tracing::debug!(rank, world, "rendezvous complete");
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.cfg.rank
    }
    pub fn world(&self) -> usize {
        self.cfg.world
    }
    pub fn config(&self) -> &GroupConfig {
        &self.cfg
    }
    pub fn op_timeout(&self) -> Duration {
        self.cfg.op_timeout
    }
    pub fn set_op_timeout(&mut self, t: Duration) {
        self.cfg.op_timeout = t;
    }
    /// Why the group is unusable, if an earlier op failed mid-flight.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(c) => Err(CollectiveError::Broken { cause: c.clone() }),
            None => Ok(()),
        }
    }

    /// After a failure mid-operation the byte streams are out of step: mark
    /// the group broken and close both links, so that the neighbours see EOF
    /// at once instead of waiting for their own timeouts.
    fn poison<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            tracing::debug!(rank = self.cfg.rank, error = %e, "collective failed; closing links");
            self.broken = Some(e.to_string());
            self.tx = None;
            self.rx = None;
        }
        r
    }

    fn chunk_elems(&self, elem_bytes: usize) -> usize {
        (self.cfg.chunk_bytes.min(self.cfg.frame_bytes_max) / elem_bytes).max(1)
    }

    /// Ring all-reduce: reduce-scatter then all-gather, each step sending one
    /// segment to the right while receiving another from the left, chunked.
    async fn ring_all_reduce<T: Elem, F: Fn(T, T) -> T + Copy>(
        &mut self,
        op: &'static str,
        data: &mut [T],
        combine: F,
        timeout: Duration,
    ) -> Result<()> {
        self.check_usable()?;
        let (rank, n) = (self.cfg.rank, self.cfg.world);
        if n == 1 || data.is_empty() {
            return Ok(());
        }
        let chunk = self.chunk_elems(T::BYTES);
        let dl = Deadline::after(timeout);
        let span = tracing::debug_span!("all_reduce", op, rank, world = n, elems = data.len());
        let (Some(tx), Some(rx)) = (self.tx.as_mut(), self.rx.as_mut()) else {
            return Ok(());
        };
        let len = data.len();
        let r = async {
            // reduce-scatter
            for s in 0..n - 1 {
                let send = segment((rank + n - s) % n, n, len);
                let recv = segment((rank + 2 * n - s - 1) % n, n, len);
                let (sd, rd) = split_two(data, send, recv);
                ring_step(tx, rx, sd, rd, chunk, Some(combine), op, dl).await?;
            }
            // all-gather
            for s in 0..n - 1 {
                let send = segment((rank + 1 + n - s) % n, n, len);
                let recv = segment((rank + n - s) % n, n, len);
                let (sd, rd) = split_two(data, send, recv);
                ring_step::<T, F>(tx, rx, sd, rd, chunk, None, op, dl).await?;
            }
            Ok(())
        }
        .instrument(span)
        .await;
        self.poison(r)
    }

    /// The exact fixed-point ring of [`crate::deterministic`], with encoding
    /// and decoding fused into the transfers: `sums` (length `out.len() + 1`,
    /// contents ignored) ends holding the global integer sums, the last slot
    /// the sum of `count`s, and `out` the decoded mean. Same ring, segments
    /// and integer additions as `all_reduce_sum_i64` on the encoded vector, so
    /// the same bits; but the local values are encoded chunk by chunk just
    /// before they are sent or combined (no separate encode pass, no zeroed
    /// buffer) and every chunk is decoded while still in cache.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fixed_mean_ring(
        &mut self,
        grads: &[&[f32]],
        enc: crate::fixed_point::Encoder,
        count: i64,
        k: i32,
        total_micro_batches: usize,
        sums: &mut [i64],
        out: &mut [f32],
        timeout: Duration,
    ) -> Result<()> {
        self.check_usable()?;
        let (rank, n) = (self.cfg.rank, self.cfg.world);
        let op = "all_reduce_sum_i64";
        let glen = out.len();
        let len = sums.len();
        assert_eq!(
            len,
            glen + 1,
            "fixed_mean_ring: sums must have out.len() + 1 slots"
        );
        let chunk = self.chunk_elems(8);
        let dl = Deadline::after(timeout);
        let span = tracing::debug_span!("fixed_mean_ring", rank, world = n, elems = len);
        let (Some(tx), Some(rx)) = (self.tx.as_mut(), self.rx.as_mut()) else {
            // world 1: nothing to exchange
            local_encode(&enc, grads, count, glen, 0..len, None, sums);
            decode_range(sums, 0, glen, k, total_micro_batches, out, 0);
            return Ok(());
        };
        let r = async {
            let mut enc_buf: Vec<i64> = Vec::new();
            // reduce-scatter
            for s in 0..n - 1 {
                let send_r = segment((rank + n - s) % n, n, len);
                let recv_r = segment((rank + 2 * n - s - 1) % n, n, len);
                let (sd, rd) = split_two(sums, send_r.clone(), recv_r.clone());
                let send_fut = async {
                    let mut wire = Vec::new();
                    for (ci, c) in sd.chunks(chunk).enumerate() {
                        if s == 0 {
                            // own contribution: encoded just before sending
                            let start = send_r.start + ci * chunk;
                            enc_buf.resize(c.len(), 0);
                            local_encode(
                                &enc,
                                grads,
                                count,
                                glen,
                                start..start + c.len(),
                                None,
                                &mut enc_buf,
                            );
                            tx.send(to_wire(&enc_buf, &mut wire), op, dl).await?;
                        } else {
                            tx.send(to_wire(c, &mut wire), op, dl).await?;
                        }
                    }
                    Ok::<(), CollectiveError>(())
                };
                let recv_fut = async {
                    let mut be = Vec::new();
                    for (ci, c) in rd.chunks_mut(chunk).enumerate() {
                        let start = recv_r.start + ci * chunk;
                        let p = rx.recv(Some(c.len() * 8), op, dl).await?;
                        let base: &[i64] = if cfg!(target_endian = "little") {
                            cast_slice(p)
                        } else {
                            be.clear();
                            be.extend(p.chunks_exact(8).map(i64::read_le));
                            &be
                        };
                        // received partial sum + own contribution, encoded here
                        local_encode(
                            &enc,
                            grads,
                            count,
                            glen,
                            start..start + c.len(),
                            Some(base),
                            c,
                        );
                    }
                    Ok::<(), CollectiveError>(())
                };
                tokio::try_join!(send_fut, recv_fut)?;
            }
            // all-gather, decoding every chunk as it passes
            for s in 0..n - 1 {
                let send_r = segment((rank + 1 + n - s) % n, n, len);
                let recv_r = segment((rank + n - s) % n, n, len);
                let (sd, rd) = split_two(sums, send_r.clone(), recv_r.clone());
                let clip = |r: &Range<usize>| r.start.min(glen)..r.end.min(glen);
                let (os, or) = split_two_mut(out, clip(&send_r), clip(&recv_r));
                let send_fut = async {
                    let mut wire = Vec::new();
                    for (ci, c) in sd.chunks(chunk).enumerate() {
                        tx.send(to_wire(c, &mut wire), op, dl).await?;
                        if s == 0 {
                            // our own fully reduced segment
                            let start = send_r.start + ci * chunk;
                            decode_range(c, start, glen, k, total_micro_batches, os, send_r.start);
                        }
                    }
                    Ok::<(), CollectiveError>(())
                };
                let recv_fut = async {
                    for (ci, c) in rd.chunks_mut(chunk).enumerate() {
                        let start = recv_r.start + ci * chunk;
                        if cfg!(target_endian = "little") {
                            rx.recv_into(bytes_of_mut(c), op, dl).await?;
                        } else {
                            let p = rx.recv(Some(c.len() * 8), op, dl).await?;
                            for (d, b) in c.iter_mut().zip(p.chunks_exact(8)) {
                                *d = i64::read_le(b);
                            }
                        }
                        decode_range(c, start, glen, k, total_micro_batches, or, recv_r.start);
                    }
                    Ok::<(), CollectiveError>(())
                };
                tokio::try_join!(send_fut, recv_fut)?;
            }
            Ok(())
        }
        .instrument(span)
        .await;
        self.poison(r)
    }

    /// Sum with wrapping i64 addition (exact, so the result is order-free).
    pub async fn all_reduce_sum_i64(&mut self, data: &mut [i64]) -> Result<()> {
        let t = self.cfg.op_timeout;
        self.all_reduce_sum_i64_within(data, t).await
    }
    pub async fn all_reduce_sum_i64_within(
        &mut self,
        data: &mut [i64],
        timeout: Duration,
    ) -> Result<()> {
        self.ring_all_reduce("all_reduce_sum_i64", data, i64::wrapping_add, timeout)
            .await
    }

    /// Plain f32 sum (ring order; identical on all ranks but depends on world).
    pub async fn all_reduce_sum_f32(&mut self, data: &mut [f32]) -> Result<()> {
        let t = self.cfg.op_timeout;
        self.all_reduce_sum_f32_within(data, t).await
    }
    pub async fn all_reduce_sum_f32_within(
        &mut self,
        data: &mut [f32],
        timeout: Duration,
    ) -> Result<()> {
        self.ring_all_reduce("all_reduce_sum_f32", data, |a, b| a + b, timeout)
            .await
    }

    /// Element-wise max (NaN propagates).
    pub async fn all_reduce_max_f64(&mut self, data: &mut [f64]) -> Result<()> {
        let t = self.cfg.op_timeout;
        self.all_reduce_max_f64_within(data, t).await
    }
    pub async fn all_reduce_max_f64_within(
        &mut self,
        data: &mut [f64],
        timeout: Duration,
    ) -> Result<()> {
        self.ring_all_reduce("all_reduce_max_f64", data, nan_max, timeout)
            .await
    }

    /// Gather one byte string (any length) from every rank; index = rank.
    pub async fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let t = self.cfg.op_timeout;
        self.all_gather_within(bytes, t).await
    }
    pub async fn all_gather_within(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        self.all_gather_op("all_gather", bytes, timeout).await
    }

    async fn all_gather_op(
        &mut self,
        op: &'static str,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        self.check_usable()?;
        let (rank, n) = (self.cfg.rank, self.cfg.world);
        let mut blobs: Vec<Vec<u8>> = vec![Vec::new(); n];
        blobs[rank] = bytes.to_vec();
        if n == 1 {
            return Ok(blobs);
        }
        let chunk = self.cfg.chunk_bytes.min(self.cfg.frame_bytes_max);
        let dl = Deadline::after(timeout);
        let span = tracing::debug_span!("all_gather", op, rank, world = n, bytes = bytes.len());
        let (Some(tx), Some(rx)) = (self.tx.as_mut(), self.rx.as_mut()) else {
            return Ok(blobs);
        };
        let r = async {
            for s in 0..n - 1 {
                let send_idx = (rank + n - s) % n;
                let recv_idx = (rank + 2 * n - s - 1) % n;
                let send_blob = &blobs[send_idx];
                let send_fut = async {
                    tx.send(&(send_blob.len() as u64).to_le_bytes(), op, dl)
                        .await?;
                    for c in send_blob.chunks(chunk) {
                        tx.send(c, op, dl).await?;
                    }
                    Ok::<(), CollectiveError>(())
                };
                let recv_fut = async {
                    let p = rx.recv(Some(8), op, dl).await?;
                    let mut lb = [0u8; 8];
                    lb.copy_from_slice(p);
                    let total = u64::from_le_bytes(lb);
                    let total = usize::try_from(total).map_err(|_| {
                        frame_err(
                            op,
                            rx.peer,
                            frame::FrameError::TooLarge {
                                payload_bytes: total,
                                frame_bytes_max: usize::MAX,
                            },
                        )
                    })?;
                    let mut v = Vec::with_capacity(total.min(64 << 20));
                    while v.len() < total {
                        let want = chunk.min(total - v.len());
                        let at = v.len();
                        v.resize(at + want, 0);
                        rx.recv_into(&mut v[at..], op, dl).await?;
                    }
                    Ok::<Vec<u8>, CollectiveError>(v)
                };
                let ((), v) = tokio::try_join!(send_fut, recv_fut)?;
                blobs[recv_idx] = v;
            }
            Ok(())
        }
        .instrument(span)
        .await;
        self.poison(r)?;
        Ok(blobs)
    }

    /// Copy `buf` from `root` to every rank (buf must have the same length everywhere).
    pub async fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        let t = self.cfg.op_timeout;
        self.broadcast_within(buf, root, t).await
    }
    pub async fn broadcast_within(
        &mut self,
        buf: &mut [u8],
        root: usize,
        timeout: Duration,
    ) -> Result<()> {
        self.check_usable()?;
        let (rank, n) = (self.cfg.rank, self.cfg.world);
        if root >= n {
            return Err(CollectiveError::InvalidArgument {
                reason: format!("broadcast root {root} out of range for world {n}"),
            });
        }
        if n == 1 || buf.is_empty() {
            return Ok(());
        }
        let op = "broadcast";
        let chunk = self.cfg.chunk_bytes.min(self.cfg.frame_bytes_max);
        let dl = Deadline::after(timeout);
        let span = tracing::debug_span!("broadcast", rank, world = n, root, bytes = buf.len());
        let (Some(tx), Some(rx)) = (self.tx.as_mut(), self.rx.as_mut()) else {
            return Ok(());
        };
        let receives = rank != root;
        let forwards = (rank + 1) % n != root;
        let nchunks = buf.len().div_ceil(chunk);
        let len = buf.len();
        let r = async {
            // iteration i: forward chunk i-1 while receiving chunk i
            for i in 0..=nchunks {
                let send_r = (i >= 1).then(|| (i - 1) * chunk..(i * chunk).min(len));
                let recv_r = (i < nchunks).then(|| i * chunk..((i + 1) * chunk).min(len));
                let (sd, rd): (&[u8], &mut [u8]) = match (send_r, recv_r) {
                    (Some(a), Some(b)) => split_two(buf, a, b),
                    (Some(a), None) => (&buf[a], &mut []),
                    (None, Some(b)) => (&[], &mut buf[b]),
                    (None, None) => (&[], &mut []),
                };
                let send_fut = async {
                    if forwards && (i >= 1) {
                        tx.send(sd, op, dl).await?;
                    }
                    Ok::<(), CollectiveError>(())
                };
                let recv_fut = async {
                    if receives && i < nchunks {
                        rx.recv_into(rd, op, dl).await?;
                    }
                    Ok::<(), CollectiveError>(())
                };
                tokio::try_join!(send_fut, recv_fut)?;
            }
            Ok(())
        }
        .instrument(span)
        .await;
        self.poison(r)
    }

    /// Returns once every rank has entered the barrier.
    pub async fn barrier(&mut self) -> Result<()> {
        let t = self.cfg.op_timeout;
        self.barrier_within(t).await
    }
    pub async fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        self.all_gather_op("barrier", &[], timeout)
            .await
            .map(|_| ())
    }
}

#[allow(clippy::too_many_arguments)]
async fn ring_step<T: Elem, F: Fn(T, T) -> T + Copy>(
    tx: &mut TxLink,
    rx: &mut RxLink,
    send: &[T],
    recv: &mut [T],
    chunk: usize,
    combine: Option<F>,
    op: &'static str,
    dl: Deadline,
) -> Result<()> {
    let send_fut = async {
        let mut wire = Vec::new();
        for c in send.chunks(chunk) {
            tx.send(to_wire(c, &mut wire), op, dl).await?;
        }
        Ok::<(), CollectiveError>(())
    };
    let recv_fut = async {
        for c in recv.chunks_mut(chunk) {
            match combine {
                Some(f) => {
                    let p = rx.recv(Some(c.len() * T::BYTES), op, dl).await?;
                    if cfg!(target_endian = "little") {
                        for (d, &b) in c.iter_mut().zip(cast_slice::<T>(p)) {
                            *d = f(*d, b);
                        }
                    } else {
                        for (d, b) in c.iter_mut().zip(p.chunks_exact(T::BYTES)) {
                            *d = f(*d, T::read_le(b));
                        }
                    }
                }
                None if cfg!(target_endian = "little") => {
                    rx.recv_into(bytes_of_mut(c), op, dl).await?;
                }
                None => {
                    let p = rx.recv(Some(c.len() * T::BYTES), op, dl).await?;
                    for (d, b) in c.iter_mut().zip(p.chunks_exact(T::BYTES)) {
                        *d = T::read_le(b);
                    }
                }
            }
        }
        Ok::<(), CollectiveError>(())
    };
    tokio::try_join!(send_fut, recv_fut)?;
    Ok(())
}

/// Little-endian wire bytes of `c`: the memory itself on little-endian
/// targets, else encoded into `scratch`.
fn to_wire<'a, T: Elem>(c: &'a [T], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if cfg!(target_endian = "little") {
        bytes_of(c)
    } else {
        scratch.clear();
        scratch.resize(c.len() * T::BYTES, 0);
        for (x, o) in c.iter().zip(scratch.chunks_exact_mut(T::BYTES)) {
            x.write_le(o);
        }
        scratch
    }
}

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
async fn connect_right(p: Peer, hello: Hello, dl: Deadline, fmax: usize) -> Result<TcpStream> {
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
async fn accept_left(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover() {
        for n in 1..7 {
            for len in 0..20 {
                let mut next = 0;
                for i in 0..n {
                    let s = segment(i, n, len);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
