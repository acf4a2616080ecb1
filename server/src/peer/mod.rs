//! Node-to-node gRPC: the peer service each node serves on its `peer_addr`, and the clients
//! that call it. Raft messages and forwarded commands travel as serde bytes inside
//! `RaftMessage`, so replication code never sees protobuf types.

mod auth;
mod client;
pub mod messages;
mod service;

pub use auth::RequireSecret;

pub use client::{AppendStream, PeerClient, PeerClients, PeerError, Progress};
pub(crate) use service::grpc_timeout;
pub use service::PeerService;

/// Largest peer message, both ways: a batch of log entries or a snapshot chunk, with room.
pub const PEER_MESSAGE_LIMIT: usize = 64 * 1024 * 1024;
