//! Blocking wrapper for synchronous callers (the training step loop).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{CollectiveError, Result};
use crate::group::{Group, GroupConfig, WatchedLinks};

/// How often a waiting rendezvous or operation polls its [`Cancel`] check.
pub const CANCEL_POLL: Duration = Duration::from_millis(20);

/// A check polled every [`CANCEL_POLL`] while the group waits: `Some(reason)` ends the
/// rendezvous or the operation at once with [`CollectiveError::Cancelled`], so that a
/// rank stuck behind a dead or hung peer leaves as soon as the caller knows better (a
/// newer plan), instead of at the operation's timeout.
#[derive(Clone)]
pub struct Cancel(Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl Cancel {
    pub fn new(check: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        Cancel(Arc::new(check))
    }
    pub fn check(&self) -> Option<String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cancel(..)")
    }
}

/// A peer that has made no progress on a link for longer than the [`SilenceWatch`]
/// allows: the left neighbour has not sent the awaited frame, or the right one has not
/// taken ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSilent {
    pub peer_rank: usize,
    pub peer_addr: SocketAddr,
    pub silent_ms: u64,
    /// True when the silence is on the link from the peer (we wait for its frame).
    pub inbound: bool,
}

/// Reports a silent peer while an operation waits on it, without ending the operation:
/// a slow peer (a straggler, a loaded host) costs nothing but the report, while a dead or
/// hung one is confirmed by the controller, whose new plan then cancels the operation
/// through [`Cancel`]. Each direction is reported once per operation.
#[derive(Clone)]
pub struct SilenceWatch {
    /// Silence longer than this is reported (the caller derives it from the group's
    /// recent step time; the operation's own timeout stays the outer bound).
    pub after: Duration,
    on_silent: Arc<dyn Fn(&PeerSilent) + Send + Sync>,
}

impl SilenceWatch {
    pub fn new(after: Duration, on_silent: impl Fn(&PeerSilent) + Send + Sync + 'static) -> Self {
        SilenceWatch {
            after,
            on_silent: Arc::new(on_silent),
        }
    }
}

impl SilenceWatch {
    pub(crate) fn report(&self, s: &PeerSilent) {
        (self.on_silent)(s)
    }
}

impl std::fmt::Debug for SilenceWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SilenceWatch")
            .field("after", &self.after)
            .finish()
    }
}

/// What an operation is watched with while it waits.
#[derive(Default)]
struct Watchers {
    cancel: Option<Cancel>,
    silence: Option<SilenceWatch>,
    /// The group's links (none for a world of 1).
    links: Option<WatchedLinks>,
}

impl Watchers {
    fn idle(&self) -> bool {
        self.cancel.is_none() && (self.silence.is_none() || self.links.is_none())
    }
}

/// Runs `fut` to completion on `rt`, unless `cancel` fires first. An abandoned operation
/// leaves the streams out of step, so a cancellation poisons the group: every later call
/// fails with [`CollectiveError::Broken`].
fn drive<T>(
    rt: &tokio::runtime::Runtime,
    watch: &Watchers,
    poisoned: &mut Option<String>,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    if let Some(cause) = poisoned {
        return Err(CollectiveError::Broken {
            cause: cause.clone(),
        });
    }
    let r = drive_unpoisoned(rt, watch, fut);
    if let Err(CollectiveError::Cancelled { reason }) = &r {
        *poisoned = Some(format!("cancelled: {reason}"));
    }
    r
}

fn drive_unpoisoned<T>(
    rt: &tokio::runtime::Runtime,
    watch: &Watchers,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    if watch.idle() {
        return rt.block_on(fut);
    }
    let cancelled = || {
        watch
            .cancel
            .as_ref()
            .and_then(Cancel::check)
            .map(|reason| CollectiveError::Cancelled { reason })
    };
    if let Some(e) = cancelled() {
        return Err(e);
    }
    let mut reported = [false; 2];
    rt.block_on(async {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return r,
                _ = tokio::time::sleep(CANCEL_POLL) => {
                    if let Some(e) = cancelled() {
                        return Err(e);
                    }
                    if let (Some(w), Some(l)) = (&watch.silence, &watch.links) {
                        l.report_silence(w, &mut reported);
                    }
                }
            }
        }
    })
}

/// A [`Group`] driven by its own current-thread tokio runtime.
///
/// Do not call its methods from inside another tokio runtime (block_on would
/// panic); async callers should use [`Group`] directly.
pub struct BlockingGroup {
    // declared before `rt` so the sockets drop first
    group: Group,
    watch: Watchers,
    /// Set when a cancelled operation was abandoned mid-flight.
    poisoned: Option<String>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BlockingGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.group.fmt(f)
    }
}

impl BlockingGroup {
    /// Rendezvous with the other ranks. `listener` must already be bound to
    /// `cfg.peers[cfg.rank]`.
    pub fn connect(cfg: GroupConfig, listener: std::net::TcpListener) -> Result<BlockingGroup> {
        Self::connect_with(cfg, listener, None, None)
    }

    /// [`Self::connect`] with a cancel check that also bounds every later operation, and
    /// a silence watch that already covers the rendezvous (a neighbour that never shows
    /// up is reported like one that stops sending).
    pub fn connect_with(
        cfg: GroupConfig,
        listener: std::net::TcpListener,
        cancel: Option<Cancel>,
        silence: Option<SilenceWatch>,
    ) -> Result<BlockingGroup> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CollectiveError::Runtime { source })?;
        let listen_addr = listener.local_addr().ok();
        let peer_addr = listen_addr.unwrap_or_else(|| {
            cfg.peers
                .get(cfg.rank)
                .copied()
                .unwrap_or(([127, 0, 0, 1], 0).into())
        });
        let io = |source| CollectiveError::Io {
            op: "rendezvous(listen)",
            peer_rank: cfg.rank,
            peer_addr,
            source,
        };
        listener.set_nonblocking(true).map_err(io)?;
        let l = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener).map_err(io)?
        };
        let watch = Watchers {
            cancel,
            silence,
            links: WatchedLinks::of(&cfg),
        };
        let activity = watch
            .links
            .as_ref()
            .map(|l| l.activity.clone())
            .unwrap_or_default();
        let group = drive_unpoisoned(&rt, &watch, Group::connect_watched(cfg, l, activity))?;
        Ok(BlockingGroup {
            group,
            watch,
            poisoned: None,
            rt,
        })
    }

    /// Run an async operation on the underlying group (bounded by the cancel check).
    pub fn block_on<'a, F, T>(&'a mut self, f: impl FnOnce(&'a mut Group) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>> + 'a,
    {
        let fut = f(&mut self.group);
        drive(&self.rt, &self.watch, &mut self.poisoned, fut)
    }

    /// Watch the links for silent peers from now on (`None`: stop watching).
    pub fn set_silence_watch(&mut self, w: Option<SilenceWatch>) {
        self.watch.silence = w;
    }

    /// The silence threshold of the current watch, to adjust it to the recent step time.
    pub fn set_silence_after(&mut self, after: Duration) {
        if let Some(w) = self.watch.silence.as_mut() {
            w.after = after;
        }
    }

    pub fn group(&self) -> &Group {
        &self.group
    }
    pub fn group_mut(&mut self) -> &mut Group {
        &mut self.group
    }
    pub fn rank(&self) -> usize {
        self.group.rank()
    }
    pub fn world(&self) -> usize {
        self.group.world()
    }
    pub fn op_timeout(&self) -> Duration {
        self.group.op_timeout()
    }
    pub fn set_op_timeout(&mut self, t: Duration) {
        self.group.set_op_timeout(t)
    }

    pub fn all_reduce_sum_i64(&mut self, data: &mut [i64]) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_sum_i64(data),
        )
    }
    pub fn all_reduce_sum_i64_within(&mut self, data: &mut [i64], timeout: Duration) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_sum_i64_within(data, timeout),
        )
    }
    pub fn all_reduce_sum_f32(&mut self, data: &mut [f32]) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_sum_f32(data),
        )
    }
    pub fn all_reduce_sum_f32_within(&mut self, data: &mut [f32], timeout: Duration) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_sum_f32_within(data, timeout),
        )
    }
    pub fn all_reduce_max_f64(&mut self, data: &mut [f64]) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_max_f64(data),
        )
    }
    pub fn all_reduce_max_f64_within(&mut self, data: &mut [f64], timeout: Duration) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_reduce_max_f64_within(data, timeout),
        )
    }
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_gather(bytes),
        )
    }
    pub fn all_gather_within(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.all_gather_within(bytes, timeout),
        )
    }
    pub fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.broadcast(buf, root),
        )
    }
    pub fn broadcast_within(
        &mut self,
        buf: &mut [u8],
        root: usize,
        timeout: Duration,
    ) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.broadcast_within(buf, root, timeout),
        )
    }
    pub fn barrier(&mut self) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.barrier(),
        )
    }
    pub fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        drive(
            &self.rt,
            &self.watch,
            &mut self.poisoned,
            self.group.barrier_within(timeout),
        )
    }
}
