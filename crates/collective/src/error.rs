//! Typed errors for the collective layer.

use std::net::SocketAddr;

use crate::frame::FrameError;

/// Every failure a collective can report. Errors that concern a link name the
/// peer's rank and listed address so an operator knows which worker to blame.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The group configuration or an argument is invalid (no I/O happened).
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },

    /// A peer did not send/accept data before the deadline.
    #[error("{op}: timed out after {after_ms} ms waiting on peer rank {peer_rank} ({peer_addr})")]
    Timeout {
        op: &'static str,
        peer_rank: usize,
        peer_addr: SocketAddr,
        after_ms: u64,
    },

    /// The peer closed or reset its connection (EOF, ECONNRESET, EPIPE).
    #[error("{op}: peer rank {peer_rank} ({peer_addr}) closed the connection")]
    PeerClosed {
        op: &'static str,
        peer_rank: usize,
        peer_addr: SocketAddr,
    },

    /// Any other socket error on the link to a peer.
    #[error("{op}: I/O error on the link to peer rank {peer_rank} ({peer_addr}): {source}")]
    Io {
        op: &'static str,
        peer_rank: usize,
        peer_addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The peer sent a malformed frame.
    #[error("{op}: malformed frame from peer rank {peer_rank} ({peer_addr}): {source}")]
    Frame {
        op: &'static str,
        peer_rank: usize,
        peer_addr: SocketAddr,
        #[source]
        source: FrameError,
    },

    /// The rendezvous handshake was rejected (wrong group id, rank or world).
    #[error("rendezvous handshake with peer rank {peer_rank} ({peer_addr}) failed: {reason}")]
    Handshake {
        peer_rank: usize,
        peer_addr: SocketAddr,
        reason: String,
    },

    /// A gradient element is NaN or infinite. `source_rank` is the lowest rank
    /// that holds a non-finite value; the location is known only on that rank.
    #[error(
        "non-finite gradient on rank {source_rank}{}",
        match location { Some(l) => format!(": micro-batch {} element {} = {}", l.micro_batch, l.element, l.value), None => String::new() }
    )]
    NonFinite {
        source_rank: usize,
        location: Option<NonFiniteLocation>,
    },

    /// An earlier operation failed mid-flight; the links are in an unknown
    /// state and the group must be rebuilt.
    #[error("collective group is broken by an earlier error: {cause}")]
    Broken { cause: String },

    /// The caller's cancel check fired while the rendezvous or an operation waited (for
    /// example, a newer plan superseded the group); the group is unusable afterwards.
    #[error("cancelled: {reason}")]
    Cancelled { reason: String },

    /// The blocking wrapper could not build its tokio runtime.
    #[error("cannot build the collective runtime: {source}")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
}

/// Where a non-finite gradient value was found (on the rank that holds it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteLocation {
    /// Index into the local micro-gradient list.
    pub micro_batch: usize,
    /// Element index within that gradient.
    pub element: usize,
    pub value: f32,
}

impl CollectiveError {
    /// The peer rank this error blames, when there is one.
    pub fn peer_rank(&self) -> Option<usize> {
        match self {
            Self::Timeout { peer_rank, .. }
            | Self::PeerClosed { peer_rank, .. }
            | Self::Io { peer_rank, .. }
            | Self::Frame { peer_rank, .. }
            | Self::Handshake { peer_rank, .. } => Some(*peer_rank),
            Self::NonFinite { source_rank, .. } => Some(*source_rank),
            _ => None,
        }
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;
