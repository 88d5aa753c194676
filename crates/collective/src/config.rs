//! A rank's group configuration: its peers, deadlines, frame sizes and security.
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::{CollectiveError, Result};
use crate::handshake::Ctx;
use crate::secure::Security;

/// Default chunk size for pipelined ring transfers.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default max payload per frame.
pub const DEFAULT_FRAME_BYTES_MAX: usize = 16 << 20;
/// Default group id carried in the handshake.
pub const DEFAULT_GROUP_ID: u64 = 0x5048_414c_414e_5831; // "PHALANX1"
/// Default bound on one incoming or outgoing connection's handshake.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Bound on one connection's handshake (TLS, challenge, hello, answer, confirm): a
    /// connection that has not proved itself by then is dropped, and a dial attempt that
    /// got no answer is made anew.
    pub hello_timeout: Duration,
    /// The epoch secret and TLS credentials the links must prove (`None`: the handshake
    /// is keyed by the public group id and authenticates nothing; tests and loopback
    /// benchmarks only).
    pub security: Option<Security>,
    /// Default bound on each collective operation.
    pub op_timeout: Duration,
    /// Pipelining chunk size for ring transfers.
    pub chunk_bytes: usize,
    /// Largest payload accepted in one frame.
    pub frame_bytes_max: usize,
}

impl GroupConfig {
    /// A config with defaults: world = peers.len(), 10 s rendezvous, 1 s hello, 30 s ops,
    /// 1 MiB chunks, 16 MiB frame limit, the default group id, no security.
    pub fn new(rank: usize, peers: Vec<SocketAddr>) -> Self {
        GroupConfig {
            rank,
            world: peers.len(),
            peers,
            group_id: DEFAULT_GROUP_ID,
            rendezvous_timeout: Duration::from_secs(10),
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            security: None,
            op_timeout: Duration::from_secs(30),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            frame_bytes_max: DEFAULT_FRAME_BYTES_MAX,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.hello_timeout.is_zero() {
            return bad("hello_timeout must be positive".into());
        }
        if let Some(t) = self.security.as_ref().and_then(|s| s.tls.as_ref()) {
            if t.peer_workers.len() != self.world {
                return bad(format!(
                    "TLS: {} peer worker ids for world {}",
                    t.peer_workers.len(),
                    self.world
                ));
            }
            if t.peer_workers[self.rank] != t.creds.worker_id() {
                return bad(format!(
                    "TLS: the plan puts worker {} at rank {}, but these credentials are \
                     worker {}'s",
                    t.peer_workers[self.rank],
                    self.rank,
                    t.creds.worker_id()
                ));
            }
        }
        Ok(())
    }

    /// What the handshake of this config needs.
    pub(crate) fn handshake(&self) -> Ctx {
        Ctx {
            group_id: self.group_id,
            world: self.world as u32,
            rank: self.rank as u32,
            fmax: self.frame_bytes_max,
            hello_timeout: self.hello_timeout,
            key: match &self.security {
                Some(s) => *s.secret.bytes(),
                None => crate::auth::open_key(self.group_id),
            },
            tls: self.security.as_ref().and_then(|s| s.tls.clone()),
        }
    }
}
