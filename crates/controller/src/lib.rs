//! The Raft-replicated controller: raft-rs `RawNode` over sled storage, the TCP peer
//! transport and the HTTP/JSON API. This crate is the I/O shell around `phalanx-core`.

pub mod client;
pub mod node;
pub mod persist;
pub mod proc;
pub mod server;
pub mod storage;
pub mod wire;

pub use node::{NodeError, ReadyOutput, Replica, ReplicaConfig};
pub use storage::{SledStorage, StorageError};
