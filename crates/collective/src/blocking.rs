//! Blocking wrapper for synchronous callers (the training step loop).

use std::future::Future;
use std::time::Duration;

use crate::error::{CollectiveError, Result};
use crate::group::{Group, GroupConfig};

/// A [`Group`] driven by its own current-thread tokio runtime.
///
/// Do not call its methods from inside another tokio runtime (block_on would
/// panic); async callers should use [`Group`] directly.
pub struct BlockingGroup {
    // declared before `rt` so the sockets drop first
    group: Group,
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CollectiveError::Runtime { source })?;
        let group = rt.block_on(async {
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
            let l = tokio::net::TcpListener::from_std(listener).map_err(io)?;
            Group::connect(cfg, l).await
        })?;
        Ok(BlockingGroup { group, rt })
    }

    /// Run an async operation on the underlying group.
    pub fn block_on<'a, F, T>(&'a mut self, f: impl FnOnce(&'a mut Group) -> F) -> T
    where
        F: Future<Output = T> + 'a,
    {
        let fut = f(&mut self.group);
        self.rt.block_on(fut)
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
        self.rt.block_on(self.group.all_reduce_sum_i64(data))
    }
    pub fn all_reduce_sum_i64_within(&mut self, data: &mut [i64], timeout: Duration) -> Result<()> {
        self.rt
            .block_on(self.group.all_reduce_sum_i64_within(data, timeout))
    }
    pub fn all_reduce_sum_f32(&mut self, data: &mut [f32]) -> Result<()> {
        self.rt.block_on(self.group.all_reduce_sum_f32(data))
    }
    pub fn all_reduce_sum_f32_within(&mut self, data: &mut [f32], timeout: Duration) -> Result<()> {
        self.rt
            .block_on(self.group.all_reduce_sum_f32_within(data, timeout))
    }
    pub fn all_reduce_max_f64(&mut self, data: &mut [f64]) -> Result<()> {
        self.rt.block_on(self.group.all_reduce_max_f64(data))
    }
    pub fn all_reduce_max_f64_within(&mut self, data: &mut [f64], timeout: Duration) -> Result<()> {
        self.rt
            .block_on(self.group.all_reduce_max_f64_within(data, timeout))
    }
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.rt.block_on(self.group.all_gather(bytes))
    }
    pub fn all_gather_within(&mut self, bytes: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.rt
            .block_on(self.group.all_gather_within(bytes, timeout))
    }
    pub fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.rt.block_on(self.group.broadcast(buf, root))
    }
    pub fn broadcast_within(
        &mut self,
        buf: &mut [u8],
        root: usize,
        timeout: Duration,
    ) -> Result<()> {
        self.rt
            .block_on(self.group.broadcast_within(buf, root, timeout))
    }
    pub fn barrier(&mut self) -> Result<()> {
        self.rt.block_on(self.group.barrier())
    }
    pub fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        self.rt.block_on(self.group.barrier_within(timeout))
    }
}
