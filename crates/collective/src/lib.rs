//! Collectives among Phalanx worker processes over TCP.
//!
//! # Topology and rendezvous
//!
//! Ranks `0..N` form a ring. Every rank has a listener already bound by the
//! caller; rank `r` connects to `(r+1) % N` ("right") and accepts one
//! connection from `(r-1+N) % N` ("left"). Each new connection runs a handshake
//! ([`auth`]): the listener's fresh nonce, then hellos both ways carrying the group id,
//! the rank and the world size, each with an HMAC that proves the plan epoch's secret
//! over both nonces, then the dialer's confirmation. With worker credentials the links
//! are mutual TLS and each end checks that the other's certificate names the worker the
//! plan puts at that rank ([`Security`]). The listener runs every incoming handshake
//! concurrently under its own short deadline, so an idle or hostile connection never
//! delays the real neighbour. Connects are retried until the rendezvous
//! timeout. Afterwards the outbound socket is only written and the inbound one
//! only read, so sending and receiving are independent streams that run
//! concurrently (`try_join!`) — large messages cannot deadlock on full socket
//! buffers. With `N == 1` no sockets are opened and every op is the identity.
//!
//! # Ring all-reduce
//!
//! The vector is cut into `N` contiguous segments (the first `len % N` one
//! element longer; some may be empty when `len < N`).
//!
//! * reduce-scatter, `N-1` steps: at step `s` rank `r` sends segment
//!   `(r-s) mod N` to the right and receives segment `(r-s-1) mod N` from the
//!   left, combining it into its own copy. Afterwards rank `r` holds the fully
//!   reduced segment `(r+1) mod N`.
//! * all-gather, `N-1` steps: rank `r` sends segment `(r+1-s) mod N` and
//!   overwrites segment `(r-s) mod N` with what it receives.
//!
//! Each segment transfer is split into frames of `chunk_bytes`; the sender
//! encodes and writes chunk after chunk while the receiver decodes and combines
//! chunks as they arrive (pipelined). Every rank sends `2 (N-1)/N` of the
//! vector, which is bandwidth-optimal. Each segment is reduced in one fixed
//! order and then copied, so all ranks end with identical bits.
//!
//! # Determinism
//!
//! `all_reduce_sum_i64` uses wrapping integer addition, which is exact and
//! associative, so its result does not depend on the order of reduction.
//! [`deterministic::reduce_mean`] builds on it: gradients are converted to
//! fixed point with a power-of-two scale derived from the global max (an exact,
//! order-free quantity), summed exactly, and converted back — so the mean is
//! bit-identical however micro-batches are spread over ranks or how many ranks
//! there are. `all_reduce_sum_f32` is the plain (order-dependent) baseline.
//!
//! # Failure handling
//!
//! Every operation has a deadline (`op_timeout` or a `*_within` argument);
//! every socket read and write is bounded by it, so a dead peer surfaces as
//! [`CollectiveError::PeerClosed`] and a hung one as
//! [`CollectiveError::Timeout`], each naming the peer rank and address. Frames
//! are checked (magic, tag, reserved bytes, sequence number, exact payload
//! size, `frame_bytes_max`) by the pure [`frame`] module. After an error
//! mid-operation the group is marked broken and must be rebuilt.

pub mod auth;
pub mod blocking;
mod config;
pub mod deterministic;
pub mod error;
pub mod fixed_point;
pub mod frame;
pub mod group;
mod handshake;
mod link;
pub mod secure;

pub use blocking::{BlockingGroup, Cancel, PeerSilent, SilenceWatch};
pub use error::{CollectiveError, NonFiniteLocation, Result};
pub use frame::FrameError;
pub use group::{
    Group, GroupConfig, DEFAULT_CHUNK_BYTES, DEFAULT_FRAME_BYTES_MAX, DEFAULT_GROUP_ID,
    DEFAULT_HELLO_TIMEOUT,
};
pub use secure::{EpochSecret, RingCredentials, RingTls, Security};
