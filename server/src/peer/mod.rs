//! Node-to-node gRPC: the peer service each node serves on its `peer_addr`, and the clients
//! that call it. Raft messages and forwarded commands travel as serde bytes inside
//! `RaftMessage`, so replication code never sees protobuf types.

mod client;
mod service;

pub use client::{PeerClient, PeerClients, PeerError, PeerRpc};
pub use service::PeerService;
