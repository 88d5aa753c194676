//! The async group: rendezvous and ring collectives over TCP.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::Instrument;

pub use crate::config::{
    GroupConfig, DEFAULT_CHUNK_BYTES, DEFAULT_FRAME_BYTES_MAX, DEFAULT_GROUP_ID,
    DEFAULT_HELLO_TIMEOUT,
};
use crate::error::{CollectiveError, Result};
use crate::frame;
use crate::handshake::{accept_left, connect_right};
use crate::link::{frame_err, Activity, Deadline, Peer, RxLink, TxLink};

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
pub(crate) fn bytes_of<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding); u8 has alignment 1; same memory, same lifetime.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Mutable byte view of a slice of plain numbers (any bytes written are valid).
pub(crate) fn bytes_of_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
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

/// A group's two links as a silence watch sees them.
pub(crate) struct WatchedLinks {
    pub(crate) activity: Arc<Activity>,
    left: Peer,
    right: Peer,
}

impl WatchedLinks {
    /// The links of `cfg`'s rank (none in a world of 1), watched from the rendezvous on.
    pub(crate) fn of(cfg: &GroupConfig) -> Option<WatchedLinks> {
        let (rank, world) = (cfg.rank, cfg.world);
        if world < 2 || cfg.peers.len() != world || rank >= world {
            return None;
        }
        let peer = |r: usize| Peer {
            rank: r,
            addr: cfg.peers[r],
        };
        Some(WatchedLinks {
            activity: Arc::new(Activity::new()),
            left: peer((rank + world - 1) % world),
            right: peer((rank + 1) % world),
        })
    }

    /// Reports each direction that has waited past `w.after`, once (`reported` holds
    /// which already were: inbound, outbound).
    pub(crate) fn report_silence(
        &self,
        w: &crate::blocking::SilenceWatch,
        reported: &mut [bool; 2],
    ) {
        let dirs = [
            (&self.activity.recv, self.left, true),
            (&self.activity.send, self.right, false),
        ];
        for (i, (pending, peer, inbound)) in dirs.into_iter().enumerate() {
            if reported[i] {
                continue;
            }
            if let Some(waited) = pending.waiting(&self.activity).filter(|d| *d >= w.after) {
                reported[i] = true;
                w.report(&crate::blocking::PeerSilent {
                    peer_rank: peer.rank,
                    peer_addr: peer.addr,
                    silent_ms: waited.as_millis() as u64,
                    inbound,
                });
            }
        }
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
        Self::connect_watched(cfg, listener, Arc::new(Activity::new())).await
    }

    /// [`Self::connect`], recording in `activity` which neighbour the rendezvous waits on,
    /// so that a silence watch sees a peer that never shows up.
    pub(crate) async fn connect_watched(
        cfg: GroupConfig,
        listener: TcpListener,
        activity: Arc<Activity>,
    ) -> Result<Group> {
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
        let hs = Arc::new(cfg.handshake());
        let fmax = cfg.frame_bytes_max;
        let (tx, rx) = async {
            tokio::join!(
                activity
                    .send
                    .during(&activity, connect_right(right, hs.clone(), dl)),
                activity
                    .recv
                    .during(&activity, accept_left(&listener, left, hs.clone(), dl))
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
                activity: activity.clone(),
            }),
            rx: Some(RxLink {
                stream: rx,
                peer: left,
                seq: 0,
                buf: Vec::new(),
                frame_bytes_max: fmax,
                activity: activity.clone(),
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
