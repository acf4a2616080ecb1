//! Replication, kept in its place: openraft's adapters. Here the type config and openraft's
//! settings, the state machine with its snapshots (`state_machine.rs`), the network that
//! carries Raft over the peer service (`network.rs`) and when to campaign (`election.rs`);
//! what lives on disk is in `store/`.
//!
//! Nothing here knows protobuf types; the peer module wraps our serde types in bytes.

// openraft's StorageError is large, and its traits make us return it.
#![allow(clippy::result_large_err)]

pub mod election;
pub mod network;
pub mod state_machine;
pub(crate) mod store;

use std::io::Cursor;

use openraft::SnapshotPolicy;

use crate::config::Config;
use crate::error::Error;
use crate::state::{Command, Reply};

openraft::declare_raft_types!(
    /// Our Raft: commands and replies from `state`, u64 node ids, [`Member`] for each node
    /// of the membership, and in-memory snapshot cursors.
    pub TypeConfig:
        D = Command,
        R = Reply,
        Node = Member,
);

/// What the Raft membership says of one node: where clients and peers reach it. The first
/// membership holds ids only (every node must write the same entry, and each node's config
/// may name its peers its own way); the first primary fills in addresses from its config.
/// Entries written by openraft's `BasicNode` (`{"addr": ""}`) read as a member with empty
/// addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    #[serde(default)]
    pub addr: String,
    #[serde(default)]
    pub peer_addr: String,
}

impl Member {
    /// Whether the membership knows where this node is.
    pub fn has_addresses(&self) -> bool {
        !self.addr.is_empty() && !self.peer_addr.is_empty()
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (peer {})", self.addr, self.peer_addr)
    }
}

/// Node ids are the `id`s of config.json.
pub type NodeId = u64;
/// The Raft handle every part of the node shares.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;

/// openraft's settings, from ours.
pub fn raft_config(config: &Config) -> Result<openraft::Config, Error> {
    // openraft counts in milliseconds.
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "sequencer".into(),
        heartbeat_interval: ms(config.raft.heartbeat_interval),
        election_timeout_min: ms(config.raft.election_timeout_min),
        election_timeout_max: ms(config.raft.election_timeout_max),
        // The 200 ms default resends large snapshots forever on a slow disk.
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_logs),
        max_in_snapshot_log_to_keep: config.raft.logs_to_keep,
        // openraft 0.9 gives an AppendEntries one heartbeat interval, so a catch-up round stays
        // a few MiB: an entry carries at most about max(MAX_BATCH_BYTES, max_payload_bytes)
        // of payload (1 MiB, 1.4 MiB encoded) and 1,024 names.
        max_payload_entries: 4,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| Error::Internal(format!("raft config: {e}")))
}

/// serde encoding shared by the log, the snapshots and the peer wire.
pub mod codec {
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(value)
    }

    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
