//! Clients, groups, members, and each group's totally ordered stream of deliveries.
//!
//! Every change to a group appends a [`Delivery`] with the group's next `group_seq`, so
//! messages and membership events share one dense order. Tokens are stored as SHA-256 hashes.
//!
//! The data is here; the rules on it are one seam a file: `clients.rs` (clients, tokens and
//! membership), `stream.rs` (a group's stream: appending, trimming, reading), `retention.rs`
//! (the bound across groups), `dedup.rs` (Sends, each sender_seq taken once).

mod clients;
mod dedup;
mod retention;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use clients::ClientRecord;
pub use clients::{hash_token, Joined, Member};
use dedup::SenderState;
pub use dedup::{SendRequest, Sent};
use retention::Retained;
pub use stream::{Delivery, Kind, Slice};

/// Limits stamped into each command by the node that took the request, so every node applies
/// the entry alike whatever its own config says. Keep them equal across the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimits {
    pub max_clients: u32,
    pub max_groups: u32,
    pub max_members_per_group: u32,
    pub retain_messages: u32,
    /// Payload bytes each group retains; the older deliveries go first.
    pub retain_bytes: u64,
    /// Payload bytes all groups together retain; the group retaining the most gives first.
    /// Entries logged by earlier versions carry none, and those versions kept no such bound.
    #[serde(default = "unbounded")]
    pub retain_total_bytes: u64,
}

fn unbounded() -> u64 {
    u64::MAX
}

/// Groups whose streams grew while applying one command, for waking subscribers.
pub type Touched = Vec<String>;

/// The tracker's and messenger's replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredGroups")]
pub struct Groups {
    next_client_id: u64,
    clients: BTreeMap<u64, ClientRecord>,
    groups: BTreeMap<String, Group>,
    /// Derived from `groups`, so not stored: rebuilt when a snapshot is read.
    #[serde(skip_serializing)]
    retained: Retained,
}

/// The fields of [`Groups`] that snapshots hold.
#[derive(Deserialize)]
struct StoredGroups {
    next_client_id: u64,
    clients: BTreeMap<u64, ClientRecord>,
    groups: BTreeMap<String, Group>,
}

impl From<StoredGroups> for Groups {
    fn from(s: StoredGroups) -> Self {
        Self {
            retained: Retained::of(&s.groups),
            next_client_id: s.next_client_id,
            clients: s.clients,
            groups: s.groups,
        }
    }
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            next_client_id: 1,
            clients: BTreeMap::new(),
            groups: BTreeMap::new(),
            retained: Retained::default(),
        }
    }
}

/// One group: its members, the sender state of whoever sent to it, and its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Group {
    next_seq: u64,
    members: BTreeMap<u64, Member>,
    senders: BTreeMap<u64, SenderState>,
    /// Shared, so that copying the state for a snapshot (under the lock that apply takes)
    /// copies pointers, not payloads.
    retained: VecDeque<Arc<Delivery>>,
    retained_bytes: u64,
}

impl Group {
    fn new() -> Self {
        Self {
            next_seq: 1,
            members: BTreeMap::new(),
            senders: BTreeMap::new(),
            retained: VecDeque::new(),
            retained_bytes: 0,
        }
    }
}
