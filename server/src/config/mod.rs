//! Configuration: built-in defaults < config.json < `SEQUENCER_*` env < command-line flags.
//!
//! The file either uses the shorthand (`servers`, `host`, `base_port`, `base_peer_port`,
//! `base_http_port`) or lists
//! `nodes` explicitly for a multi-host deployment. [`Config::load`] (in `load.rs`) layers the
//! sources; `validate.rs` checks them into one [`Config`] of small typed parts, durations as
//! `Duration`s. Nothing deeper in the server reads files or the environment.

mod load;
#[cfg(test)]
mod tests;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use load::{ADMIN_TOKEN_FILE, SECRET_FILE};
pub use validate::check_addr;

/// A node of the cluster as the config describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft node id, unique, at least 1.
    pub id: u64,
    /// Where clients call this node.
    pub addr: String,
    /// Where peers call this node (Raft and forwarding).
    pub peer_addr: String,
    /// Where this node serves HTTP: the JSON API, /metrics, the probes and the status page.
    /// Absent in a `nodes` entry: this node serves no HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
}

/// Overrides that come from command-line flags; `None` leaves the lower layers in force.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--worker-threads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<u32>,
    /// With the shorthand config, `--node K --join` beyond `servers`: node K's addresses
    /// follow the same rule (`base_port + K - 1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
}

/// The validated configuration every part of the server reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every node of the cluster, sorted by id.
    pub nodes: Vec<NodeConfig>,
    /// Root of the data; node K keeps its state under `data_dir/node-K`.
    pub data_dir: PathBuf,
    pub raft: RaftSettings,
    pub batching: Batching,
    pub groups: GroupSettings,
    pub transport: Transport,
    /// Free bytes the data dir's file system must keep: below it, writes are refused, so
    /// that the vote and snapshot writes Raft needs still fit.
    pub disk_reserve_bytes: u64,
    /// Scheduled backups, written by the primary; `None`: none.
    pub backups: Option<BackupSchedule>,
    /// Where this node dials a member: at the addresses the Raft membership carries (the
    /// default), or first at its own config's entry for that id (`peer_addresses:
    /// "config"`: a host that reaches its peers by names or proxies of its own).
    pub peers_from_config: bool,
    /// What every peer RPC must carry; always set when the cluster has more than one node.
    pub cluster_secret: Option<ClusterSecret>,
    /// What admin calls (membership changes, transfer) must carry; `None`: they are refused,
    /// unless a client certificate vouches for the caller (`tls_client_auth`).
    pub admin_token: Option<ClusterSecret>,
    /// How this node enters the cluster when its data dir is empty (a command-line choice).
    pub entry: Entry,
    /// TLS on both listeners and between peers; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// How the node logs: human-readable lines, or one JSON object per line.
    pub log_format: LogFormat,
    /// Threads of a node's async runtime; `None`: one per core, or, for nodes the launcher
    /// starts together on one host, the cores shared out among them.
    pub worker_threads: Option<usize>,
}

/// The shape of log lines (`log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one readable line per event.
    #[default]
    Text,
    /// For log shippers: one JSON object per line.
    Json,
}

/// Where and how often the primary writes a backup, and how many it keeps.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    pub dir: PathBuf,
    pub interval: Duration,
    pub keep: usize,
}

/// Raft's timing and log compaction.
#[derive(Debug, Clone, Copy)]
pub struct RaftSettings {
    pub heartbeat_interval: Duration,
    /// A follower that hears no primary for `election_timeout_max` (the leader lease) plus
    /// a random part of the gap campaigns.
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, for slow followers.
    pub logs_to_keep: u64,
}

/// How requests queue and batch toward the primary.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most ids one GetIds may ask for.
    pub max_batch: u32,
    /// Most distinct sequences the cluster keeps.
    pub max_sequences: u32,
    /// Requests a node queues for the primary before it answers "overloaded".
    pub queue_capacity: usize,
    /// How long a request may wait for a primary and a quorum.
    pub request_timeout: Duration,
}

/// Group clients, messages and subscribers.
#[derive(Debug, Clone, Copy)]
pub struct GroupSettings {
    /// How often clients are told to send heartbeats.
    pub client_heartbeat: Duration,
    /// Silence after which the primary removes a client (default 2 x the heartbeat interval).
    pub failure_timeout: Duration,
    /// Largest Send payload.
    pub max_payload_bytes: u32,
    /// Deliveries queued per subscriber before it is cut off as too slow.
    pub subscriber_buffer: usize,
    /// Payload bytes queued for one subscriber (besides `subscriber_buffer` deliveries).
    pub subscriber_buffer_bytes: usize,
    /// Open Subscribe streams one node serves at once.
    pub max_subscribers: usize,
    /// Open Subscribe streams one client (client_id) may hold on one node.
    pub max_subscribers_per_client: usize,
    /// Limits stamped into every group command.
    pub limits: crate::state::GroupLimits,
}

/// Both listeners.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    /// HTTP/2 streams (calls in flight) per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings on idle connections, and how long an unanswered one may take before the
    /// connection is dropped as dead.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Open connections per listener; one more is closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its HTTP/2 preface (and, with TLS, to
    /// finish its handshake) before it is closed.
    pub connection_preface_timeout: Duration,
}

/// PEM file paths; `{id}` in a path stands for the node's id.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    /// The CA peers (and, with `client_auth`, clients) must be signed by.
    pub ca: Option<String>,
    /// Require a client certificate on the client listener too.
    pub client_auth: bool,
}

/// The shared secret peers prove themselves with. Never printed: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(pub(super) String);

impl ClusterSecret {
    /// The header value peers send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in constant time, so response timing says nothing about the secret.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// The environment variable that carries the secret (also how the launcher hands it over).
pub const CLUSTER_SECRET_ENV: &str = "SEQUENCER_CLUSTER_SECRET";
/// The environment variable that carries the admin token.
pub const ADMIN_TOKEN_ENV: &str = "SEQUENCER_ADMIN_TOKEN";

/// How a node with an empty data dir enters a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Entry {
    /// Bootstrap a new cluster with every node of the config, if all of them start fresh.
    #[default]
    Bootstrap,
    /// Ask the cluster at this client address to add this node (`--join`).
    Join(String),
    /// Remove this node's old self from the cluster, then join (`--rejoin`).
    Rejoin(String),
}

/// A configuration problem, phrased as one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Invalid(String),
    /// A cluster of several nodes with no `cluster_secret` anywhere: peers could not prove
    /// who they are. The one-command launcher answers it by making one up in `data_dir`.
    #[error(
        "config: a cluster of {nodes} nodes needs `cluster_secret` (in the config or \
         {CLUSTER_SECRET_ENV}) so that peers can prove who they are; `server` without --node \
         makes one up in {}",
        data_dir.join(SECRET_FILE).display()
    )]
    NoSecret { nodes: usize, data_dir: PathBuf },
}

impl Config {
    /// The node with this id.
    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Where node `id` keeps its log and snapshots.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.data_dir.join(format!("node-{id}"))
    }
}
