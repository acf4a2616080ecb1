//! Configuration: built-in defaults < config.json < `SEQUENCER_*` env < command-line flags.
//!
//! The file either uses the shorthand (`servers`, `host`, `base_port`, `base_peer_port`) or lists
//! `nodes` explicitly for a multi-host deployment. [`Config::load`] returns a validated value;
//! nothing deeper in the server reads files or the environment.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Json, Serialized};
use figment::Figment;
use serde::{Deserialize, Serialize};

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
}

/// The raw, layered settings before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    servers: u64,
    host: String,
    base_port: u16,
    base_peer_port: u16,
    data_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<NodeConfig>>,
    max_batch: u32,
    max_sequences: u32,
    queue_capacity: u32,
    request_timeout_ms: u64,
    heartbeat_interval_ms: u64,
    election_timeout_min_ms: u64,
    election_timeout_max_ms: u64,
    snapshot_logs: u64,
    logs_to_keep: u64,
    client_heartbeat_interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_timeout_ms: Option<u64>,
    retain_messages: u32,
    retain_bytes: u64,
    retain_total_bytes: u64,
    max_payload_bytes: u32,
    max_clients: u32,
    max_groups: u32,
    max_members_per_group: u32,
    subscriber_buffer: u32,
    max_subscribers: u32,
    max_concurrent_streams: u32,
    http2_keepalive_interval_ms: u64,
    http2_keepalive_timeout_ms: u64,
    max_connections: u32,
    connection_preface_timeout_ms: u64,
    subscriber_buffer_bytes: u64,
    max_subscribers_per_client: u32,
    disk_reserve_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_ca: Option<String>,
    tls_client_auth: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker_threads: Option<u32>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            servers: 3,
            host: "127.0.0.1".into(),
            base_port: 50051,
            base_peer_port: 51051,
            data_dir: "data".into(),
            nodes: None,
            max_batch: 1_000_000,
            max_sequences: 10_000,
            queue_capacity: 65_536,
            request_timeout_ms: 5_000,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 500,
            snapshot_logs: 10_000,
            logs_to_keep: 1_000,
            client_heartbeat_interval_ms: 1_000,
            failure_timeout_ms: None,
            retain_messages: 10_000,
            retain_bytes: 16 * 1024 * 1024,
            retain_total_bytes: 256 * 1024 * 1024,
            max_payload_bytes: 1024 * 1024,
            max_clients: 100_000,
            max_groups: 10_000,
            max_members_per_group: 1_000,
            subscriber_buffer: 1_024,
            max_subscribers: 10_000,
            max_concurrent_streams: 1_024,
            http2_keepalive_interval_ms: 10_000,
            http2_keepalive_timeout_ms: 20_000,
            max_connections: 4_096,
            connection_preface_timeout_ms: 5_000,
            subscriber_buffer_bytes: 4 * 1024 * 1024,
            max_subscribers_per_client: 16,
            disk_reserve_bytes: 128 * 1024 * 1024,
            cluster_secret: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_client_auth: false,
            worker_threads: None,
        }
    }
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
}

/// The validated configuration every part of the server reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every node of the cluster, sorted by id.
    pub nodes: Vec<NodeConfig>,
    /// Root of the data; node K keeps its state under `data_dir/node-K`.
    pub data_dir: PathBuf,
    /// Most ids one GetIds may ask for.
    pub max_batch: u32,
    /// Most distinct sequences the cluster keeps.
    pub max_sequences: u32,
    /// Requests a node queues for the primary before it answers "overloaded".
    pub queue_capacity: usize,
    /// How long a request may wait for a primary and a quorum.
    pub request_timeout: Duration,
    /// Raft timing, in milliseconds.
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, for slow followers.
    pub logs_to_keep: u64,
    /// How often clients are told to send heartbeats.
    pub client_heartbeat: Duration,
    /// Silence after which the primary removes a client (default 2 x the heartbeat interval).
    pub failure_timeout: Duration,
    /// Largest Send payload.
    pub max_payload_bytes: u32,
    /// Deliveries queued per subscriber before it is cut off as too slow.
    pub subscriber_buffer: usize,
    /// Open Subscribe streams one node serves at once.
    pub max_subscribers: usize,
    /// HTTP/2 streams (calls in flight) per connection, on both listeners.
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
    /// Payload bytes queued for one subscriber (besides `subscriber_buffer` deliveries).
    pub subscriber_buffer_bytes: usize,
    /// Open Subscribe streams one client (client_id) may hold on one node.
    pub max_subscribers_per_client: usize,
    /// Free bytes the data dir's file system must keep: below it, writes are refused, so
    /// that the vote and snapshot writes Raft needs still fit.
    pub disk_reserve_bytes: u64,
    /// Group limits, stamped into every group command.
    pub group_limits: crate::state::GroupLimits,
    /// What every peer RPC must carry; required when the cluster has more than one node.
    pub cluster_secret: Option<ClusterSecret>,
    /// TLS on both listeners and between peers; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Threads of a node's async runtime; `None`: one per core, or, for nodes the launcher
    /// starts together on one host, the cores shared out among them.
    pub worker_threads: Option<usize>,
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
pub struct ClusterSecret(String);

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

/// A configuration problem, phrased as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads `path` (if it exists, or fails if `required`), then the environment, then `overrides`.
    pub fn load(path: &Path, required: bool, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if path.exists() {
            figment = figment.merge(Json::file_exact(path));
        } else if required {
            return Err(ConfigError(format!(
                "file {} does not exist",
                path.display()
            )));
        }
        let figment = figment
            // Unknown SEQUENCER_* variables are refused like unknown file keys. The secret is
            // taken as the string it is: figment would read an all-digit one as a number, and
            // the type error would print it.
            .merge(Env::prefixed(ENV_PREFIX).ignore(&NOT_SERVER_KEYS))
            .merge(secret_from_env())
            .merge(Serialized::defaults(overrides));
        let mut raw: RawConfig = figment.extract().map_err(|e| ConfigError(one_line(e)))?;
        if raw.cluster_secret.is_none() {
            raw.cluster_secret = launcher_secret(&raw.data_dir)?;
        }
        raw.validate()
    }

    /// Parses a config from JSON text with no other layers (tests and tooling).
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Json::string(text))
            .extract()
            .map_err(|e| ConfigError(one_line(e)))?;
        raw.validate()
    }

    /// The node with this id.
    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Where node `id` keeps its log and snapshots.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.data_dir.join(format!("node-{id}"))
    }
}

/// Every environment variable of the server starts with this.
const ENV_PREFIX: &str = "SEQUENCER_";

/// `SEQUENCER_*` variables that are not config keys: the secret (read verbatim below) and the
/// client's own (`eval $(client register ...)` exports them into the shell that may start a
/// server).
const NOT_SERVER_KEYS: [&str; 3] = ["CLUSTER_SECRET", "CLIENT_ID", "TOKEN"];

/// Where the one-command launcher keeps the cluster secret it made up, in `data_dir`, so that
/// its next start and `server --node K` on the same dir use the same one.
pub const SECRET_FILE: &str = "cluster.secret";

/// The launcher's secret in `data_dir`, if it made one.
fn launcher_secret(data_dir: &Path) -> Result<Option<String>, ConfigError> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError(format!("reading {}: {e}", path.display()))),
    }
}

/// `SEQUENCER_CLUSTER_SECRET`, verbatim, as a config layer.
fn secret_from_env() -> Serialized<std::collections::BTreeMap<&'static str, String>> {
    let mut layer = std::collections::BTreeMap::new();
    if let Ok(secret) = std::env::var(CLUSTER_SECRET_ENV) {
        layer.insert("cluster_secret", secret);
    }
    Serialized::defaults(layer)
}

fn one_line(e: figment::Error) -> String {
    // figment lists every error; the first is the one to fix, and its Display names the key.
    let first = e.into_iter().next();
    match first {
        Some(e) => {
            let key = e.path.join(".");
            let mut kind = e.kind.to_string();
            if let figment::error::Kind::UnknownField(field, _) = &e.kind {
                kind = format!("unknown key `{field}`");
            }
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            if from_env {
                // The user wrote a variable, not a key: name the variable.
                let (field, what) = match &e.kind {
                    figment::error::Kind::UnknownField(field, _) => (field.clone(), kind),
                    _ => (key.clone(), format!("key `{key}`: {kind}")),
                };
                let var = format!("{ENV_PREFIX}{}", field.to_uppercase());
                return format!("environment variable {var}: {what}");
            }
            let src = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" (in {s})"))
                .unwrap_or_default();
            if key.is_empty() {
                format!("{kind}{src}")
            } else {
                format!("key `{key}`: {kind}{src}")
            }
        }
        None => "invalid configuration".into(),
    }
}

/// `host:port`, where host is an IP address (IPv6 in brackets) or a DNS name. Names are
/// resolved when connecting and binding, not here: a container that comes back with a new
/// address is found again.
fn check_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("`{addr}` is not a host:port address");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("`{addr}`: the port must be 1..=65535")),
    }
    check_host(host).map_err(|why| format!("`{addr}`: {why}"))
}

/// An IP address or a DNS name (RFC 1123 labels).
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("`{host}` is neither an IP address nor a host name"));
    }
    Ok(())
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError(format!("key `{key}`: {msg}")));
        let nodes = match self.nodes {
            Some(nodes) => nodes,
            None => {
                if self.servers == 0 || self.servers > 99 {
                    return err("servers", format!("must be 1..=99, got {}", self.servers));
                }
                let last_port = |base: u16| u32::from(base) + self.servers as u32 - 1;
                if self.base_port == 0 || last_port(self.base_port) > 65535 {
                    return err(
                        "base_port",
                        format!(
                            "{} leaves no room for {} servers",
                            self.base_port, self.servers
                        ),
                    );
                }
                if self.base_peer_port == 0 || last_port(self.base_peer_port) > 65535 {
                    return err(
                        "base_peer_port",
                        format!(
                            "{} leaves no room for {} servers",
                            self.base_peer_port, self.servers
                        ),
                    );
                }
                let ports = |base: u16| u32::from(base)..=last_port(base);
                let (client, peer) = (ports(self.base_port), ports(self.base_peer_port));
                if client.start() <= peer.end() && peer.start() <= client.end() {
                    return err(
                        "base_peer_port",
                        format!(
                            "peer ports {}..={} overlap the client ports {}..={} of base_port",
                            peer.start(),
                            peer.end(),
                            client.start(),
                            client.end()
                        ),
                    );
                }
                if let Err(why) = check_host(&self.host) {
                    return err("host", why);
                }
                (1..=self.servers)
                    .map(|k| NodeConfig {
                        id: k,
                        addr: format!("{}:{}", self.host, u64::from(self.base_port) + k - 1),
                        peer_addr: format!(
                            "{}:{}",
                            self.host,
                            u64::from(self.base_peer_port) + k - 1
                        ),
                    })
                    .collect()
            }
        };
        if nodes.is_empty() {
            return err("nodes", "must list at least one node".into());
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.id == 0 || n.id > u64::from(u32::MAX) {
                return err(
                    &format!("nodes[{i}].id"),
                    format!("must be 1..={}", u32::MAX),
                );
            }
            if !ids.insert(n.id) {
                return err(
                    &format!("nodes[{i}].id"),
                    format!("duplicate node id {}", n.id),
                );
            }
            for (key, addr) in [("addr", &n.addr), ("peer_addr", &n.peer_addr)] {
                if let Err(why) = check_addr(addr) {
                    return err(&format!("nodes[{i}].{key}"), why);
                }
                if !addrs.insert(addr.clone()) {
                    return err(
                        &format!("nodes[{i}].{key}"),
                        format!("duplicate address {addr}"),
                    );
                }
            }
        }
        let mut nodes = nodes;
        nodes.sort_by_key(|n| n.id);

        if self.max_batch == 0 {
            return err("max_batch", "must be at least 1".into());
        }
        if self.max_sequences == 0 {
            return err("max_sequences", "must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return err("queue_capacity", "must be at least 1".into());
        }
        if !(1..=3_600_000).contains(&self.request_timeout_ms) {
            return err(
                "request_timeout_ms",
                "must be 1..=3600000 (one hour)".into(),
            );
        }
        if self.heartbeat_interval_ms == 0 {
            return err("heartbeat_interval_ms", "must be at least 1".into());
        }
        if self.election_timeout_min_ms <= self.heartbeat_interval_ms {
            return err(
                "election_timeout_min_ms",
                format!(
                    "must be above heartbeat_interval_ms ({})",
                    self.heartbeat_interval_ms
                ),
            );
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return err(
                "election_timeout_max_ms",
                format!(
                    "must be above election_timeout_min_ms ({})",
                    self.election_timeout_min_ms
                ),
            );
        }
        if self.snapshot_logs == 0 {
            return err("snapshot_logs", "must be at least 1".into());
        }
        if !(10..=3_600_000).contains(&self.client_heartbeat_interval_ms) {
            return err(
                "client_heartbeat_interval_ms",
                "must be 10..=3600000".into(),
            );
        }
        let failure_timeout_ms = self
            .failure_timeout_ms
            .unwrap_or(2 * self.client_heartbeat_interval_ms);
        if failure_timeout_ms <= self.client_heartbeat_interval_ms
            || failure_timeout_ms > 86_400_000
        {
            return err(
                "failure_timeout_ms",
                format!(
                    "must be above client_heartbeat_interval_ms ({}) and at most a day",
                    self.client_heartbeat_interval_ms
                ),
            );
        }
        for (key, v) in [
            ("retain_messages", self.retain_messages),
            ("max_payload_bytes", self.max_payload_bytes),
            ("max_clients", self.max_clients),
            ("max_groups", self.max_groups),
            ("max_members_per_group", self.max_members_per_group),
            ("subscriber_buffer", self.subscriber_buffer),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if self.max_payload_bytes > 1024 * 1024 {
            // One message is one log entry at most, and entries must replicate within a
            // heartbeat interval (see batch.rs).
            return err(
                "max_payload_bytes",
                "must be at most 1048576 (1 MiB)".into(),
            );
        }
        if self.retain_bytes < u64::from(self.max_payload_bytes) {
            return err(
                "retain_bytes",
                format!(
                    "must be at least max_payload_bytes ({})",
                    self.max_payload_bytes
                ),
            );
        }
        if self.retain_total_bytes < self.retain_bytes {
            return err(
                "retain_total_bytes",
                format!("must be at least retain_bytes ({})", self.retain_bytes),
            );
        }
        let cluster_secret = match self.cluster_secret {
            None => None,
            Some(secret) => {
                // It travels as an HTTP/2 header, so printable ASCII; long enough not to guess.
                let printable = secret.bytes().all(|b| (0x21..=0x7e).contains(&b));
                if !(16..=1024).contains(&secret.len()) || !printable {
                    return err(
                        "cluster_secret",
                        "must be 16 to 1024 printable ASCII characters, no spaces".into(),
                    );
                }
                Some(ClusterSecret(secret))
            }
        };
        if self.max_subscribers == 0 {
            return err("max_subscribers", "must be at least 1".into());
        }
        if self.max_concurrent_streams == 0 {
            return err("max_concurrent_streams", "must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return err("max_connections", "must be 1..=1000000".into());
        }
        if !(10..=600_000).contains(&self.connection_preface_timeout_ms) {
            return err(
                "connection_preface_timeout_ms",
                "must be 10..=600000".into(),
            );
        }
        if self.subscriber_buffer_bytes < u64::from(self.max_payload_bytes)
            || self.subscriber_buffer_bytes > 1 << 32
        {
            return err(
                "subscriber_buffer_bytes",
                format!(
                    "must be at least max_payload_bytes ({}) and at most 4 GiB",
                    self.max_payload_bytes
                ),
            );
        }
        if self.max_subscribers_per_client == 0 {
            return err("max_subscribers_per_client", "must be at least 1".into());
        }
        if let Some(n) = self.worker_threads {
            if !(1..=1024).contains(&n) {
                return err("worker_threads", "must be 1..=1024".into());
            }
        }
        for (key, ms) in [
            (
                "http2_keepalive_interval_ms",
                self.http2_keepalive_interval_ms,
            ),
            (
                "http2_keepalive_timeout_ms",
                self.http2_keepalive_timeout_ms,
            ),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return err(key, "must be 100..=3600000".into());
            }
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (None, None) => {
                if self.tls_ca.is_some() || self.tls_client_auth {
                    return err(
                        "tls_cert",
                        "is needed with tls_ca or tls_client_auth".into(),
                    );
                }
                None
            }
            (Some(_), None) => return err("tls_key", "is needed with tls_cert".into()),
            (None, Some(_)) => return err("tls_cert", "is needed with tls_key".into()),
            (Some(cert), Some(key)) => {
                if self.tls_ca.is_none() && (nodes.len() > 1 || self.tls_client_auth) {
                    return err(
                        "tls_ca",
                        "is needed with tls_cert in a cluster of several nodes (peers verify \
                         each other against it) and with tls_client_auth"
                            .into(),
                    );
                }
                Some(TlsFiles {
                    cert,
                    key,
                    ca: self.tls_ca,
                    client_auth: self.tls_client_auth,
                })
            }
        };
        Ok(Config {
            tls,
            worker_threads: self.worker_threads.map(|n| n as usize),
            max_subscribers: self.max_subscribers as usize,
            max_concurrent_streams: self.max_concurrent_streams,
            max_connections: self.max_connections as usize,
            connection_preface_timeout: Duration::from_millis(self.connection_preface_timeout_ms),
            subscriber_buffer_bytes: self.subscriber_buffer_bytes as usize,
            max_subscribers_per_client: self.max_subscribers_per_client as usize,
            disk_reserve_bytes: self.disk_reserve_bytes,
            http2_keepalive_interval: Duration::from_millis(self.http2_keepalive_interval_ms),
            http2_keepalive_timeout: Duration::from_millis(self.http2_keepalive_timeout_ms),
            cluster_secret,
            nodes,
            data_dir: self.data_dir,
            max_batch: self.max_batch,
            max_sequences: self.max_sequences,
            queue_capacity: self.queue_capacity as usize,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            snapshot_logs: self.snapshot_logs,
            logs_to_keep: self.logs_to_keep,
            client_heartbeat: Duration::from_millis(self.client_heartbeat_interval_ms),
            failure_timeout: Duration::from_millis(failure_timeout_ms),
            max_payload_bytes: self.max_payload_bytes,
            subscriber_buffer: self.subscriber_buffer as usize,
            group_limits: crate::state::GroupLimits {
                max_clients: self.max_clients,
                max_groups: self.max_groups,
                max_members_per_group: self.max_members_per_group,
                retain_messages: self.retain_messages,
                retain_bytes: self.retain_bytes,
                retain_total_bytes: self.retain_total_bytes,
            },
        })
    }
}

#[cfg(test)]
// figment's Jail closures must return its large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn shorthand_expands_to_nodes() {
        let c = Config::from_json(r#"{"servers": 2, "base_port": 7000, "base_peer_port": 8000}"#)
            .unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[1].addr, "127.0.0.1:7001");
        assert_eq!(c.nodes[1].peer_addr, "127.0.0.1:8001");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_json(r#"{"servers": 3, "sevrers": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sevrers"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn duplicate_id_and_address_are_named() {
        let dup_id = r#"{"nodes": [{"id":1,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"},
                                   {"id":1,"addr":"127.0.0.1:3","peer_addr":"127.0.0.1:4"}]}"#;
        let e = Config::from_json(dup_id).unwrap_err().to_string();
        assert!(e.contains("nodes[1].id") && e.contains("duplicate"), "{e}");
        let dup_addr = r#"{"nodes": [{"id":1,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"},
                                     {"id":2,"addr":"127.0.0.1:2","peer_addr":"127.0.0.1:4"}]}"#;
        let e = Config::from_json(dup_addr).unwrap_err().to_string();
        assert!(
            e.contains("nodes[1].addr") && e.contains("duplicate address"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        for (json, key) in [
            (r#"{"servers": 0}"#, "servers"),
            (r#"{"max_batch": 0}"#, "max_batch"),
            (
                r#"{"heartbeat_interval_ms": 500}"#,
                "election_timeout_min_ms",
            ),
            (r#"{"servers": "three"}"#, "servers"),
            (
                r#"{"request_timeout_ms": 18446744073709551615}"#,
                "request_timeout_ms",
            ),
            (
                r#"{"nodes": [{"id":4294967296,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"}]}"#,
                "nodes[0].id",
            ),
            (
                r#"{"nodes": [{"id":1,"addr":"nowhere","peer_addr":"127.0.0.1:2"}]}"#,
                "nodes[0].addr",
            ),
            (
                r#"{"retain_bytes": 2097152, "retain_total_bytes": 1048576}"#,
                "retain_total_bytes",
            ),
        ] {
            let e = Config::from_json(json).unwrap_err().to_string();
            assert!(e.contains(key), "{json}: {e}");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_is_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("config.json", r#"{"max_batch": 10}"#)?;
            jail.set_env("SEQUENCER_MAX_BATCH", "20");
            let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
            assert_eq!(c.max_batch, 20);
            jail.set_env("SEQUENCER_MAX_BATCH", "lots");
            let e =
                Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("max_batch"), "{e}");
            jail.set_env("SEQUENCER_MAX_BATCH", "20");
            jail.set_env("SEQUENCER_MAX_BATHC", "1");
            let e =
                Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("max_bathc"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_secret_from_the_environment_is_taken_verbatim_and_never_printed() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "config.json",
                r#"{"cluster_secret": "from-the-config-file"}"#,
            )?;
            // All digits, with a leading zero: a number to figment, a string to us.
            jail.set_env("SEQUENCER_CLUSTER_SECRET", "0123456789012345678");
            let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
            assert!(c.cluster_secret.unwrap().matches(b"0123456789012345678"));
            jail.set_env("SEQUENCER_CLUSTER_SECRET", "0123");
            let e = Config::load(Path::new("config.json"), true, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("cluster_secret") && !e.contains("0123"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn flags_override_everything() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "config.json",
                r#"{"data_dir": "from-file", "worker_threads": 4}"#,
            )?;
            jail.set_env("SEQUENCER_DATA_DIR", "from-env");
            let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
            assert_eq!(c.worker_threads, Some(4));
            let flags = Overrides {
                data_dir: Some("from-flag".into()),
                worker_threads: Some(1),
            };
            let c = Config::load(Path::new("config.json"), true, &flags).unwrap();
            assert_eq!(c.data_dir, PathBuf::from("from-flag"));
            assert_eq!(c.worker_threads, Some(1));
            Ok(())
        });
    }

    #[test]
    fn worker_threads_are_optional_and_bounded() {
        assert_eq!(Config::from_json("{}").unwrap().worker_threads, None);
        for bad in ["0", "1025"] {
            let e = Config::from_json(&format!(r#"{{"worker_threads": {bad}}}"#))
                .unwrap_err()
                .to_string();
            assert!(e.contains("worker_threads"), "{e}");
        }
    }

    #[test]
    fn the_clients_exports_do_not_break_the_server_and_a_bad_variable_is_named() {
        figment::Jail::expect_with(|jail| {
            // What `eval $(client register ...)` leaves in the shell.
            jail.set_env("SEQUENCER_CLIENT_ID", "7");
            jail.set_env("SEQUENCER_TOKEN", "abc");
            Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
            jail.set_env("SEQUENCER_MAX_BATHC", "1");
            let e = Config::load(Path::new("none.json"), false, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("environment variable SEQUENCER_MAX_BATHC"),
                "{e}"
            );
            jail.set_env("SEQUENCER_MAX_BATHC", "");
            jail.set_env("SEQUENCER_MAX_BATCH", "lots");
            let e = Config::load(Path::new("none.json"), false, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("SEQUENCER_MAX_BATCH"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn host_names_are_addresses_and_bad_ones_are_named() {
        let c = Config::from_json(
            r#"{"nodes": [{"id":1,"addr":"localhost:22001","peer_addr":"node-1.example:23001"},
                         {"id":2,"addr":"[::1]:22002","peer_addr":"10.0.0.2:23002"}]}"#,
        )
        .unwrap();
        assert_eq!(c.nodes[0].addr, "localhost:22001");
        for (addr, why) in [
            ("localhost", "host:port"),
            ("localhost:0", "port"),
            ("localhost:99999", "port"),
            ("bad_name:1", "host name"),
            ("-bad:1", "host name"),
            (":1", "host name"),
        ] {
            let json =
                format!(r#"{{"nodes": [{{"id":1,"addr":"{addr}","peer_addr":"127.0.0.1:2"}}]}}"#);
            let e = Config::from_json(&json).unwrap_err().to_string();
            assert!(
                e.contains("nodes[0].addr") && e.contains(why),
                "{addr}: {e}"
            );
        }
        let e = Config::from_json(r#"{"host": "no such host!"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `host`"), "{e}");
    }

    #[test]
    fn overlapping_shorthand_ports_name_the_users_keys() {
        let e = Config::from_json(r#"{"servers": 3, "base_port": 7000, "base_peer_port": 7002}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("base_peer_port") && e.contains("base_port") && !e.contains("nodes["),
            "{e}"
        );
        // Adjacent ranges do not overlap.
        Config::from_json(r#"{"servers": 3, "base_port": 7000, "base_peer_port": 7003}"#).unwrap();
    }

    #[test]
    fn the_launchers_secret_in_the_data_dir_is_used_when_none_is_configured() {
        figment::Jail::expect_with(|jail| {
            std::fs::create_dir_all("data").unwrap();
            jail.create_file("data/cluster.secret", "made-up-by-the-launcher-0123\n")?;
            let c = Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
            assert!(c
                .cluster_secret
                .unwrap()
                .matches(b"made-up-by-the-launcher-0123"));
            // A configured secret wins.
            jail.set_env("SEQUENCER_CLUSTER_SECRET", "from-the-environment-99");
            let c = Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
            assert!(c
                .cluster_secret
                .unwrap()
                .matches(b"from-the-environment-99"));
            Ok(())
        });
    }

    #[test]
    fn unparsable_json_is_one_line() {
        let e = Config::from_json("{ servers: ").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }
}
