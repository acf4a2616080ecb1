//! The layers, later wins: built-in defaults < config.json < `SEQUENCER_*` environment <
//! command-line flags; then the launcher's secret file when no secret is set.

use std::path::Path;

use figment::providers::{Env, Format, Json, Serialized};
use figment::Figment;
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, NodeConfig, Overrides, ADMIN_TOKEN_ENV, CLUSTER_SECRET_ENV};
use std::path::PathBuf;

/// The raw, layered settings before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) servers: u64,
    pub(super) host: String,
    pub(super) base_port: u16,
    pub(super) base_peer_port: u16,
    pub(super) base_http_port: u16,
    pub(super) data_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) nodes: Option<Vec<NodeConfig>>,
    pub(super) max_batch: u32,
    pub(super) max_sequences: u32,
    pub(super) queue_capacity: u32,
    pub(super) request_timeout_ms: u64,
    pub(super) heartbeat_interval_ms: u64,
    pub(super) election_timeout_min_ms: u64,
    pub(super) election_timeout_max_ms: u64,
    pub(super) snapshot_logs: u64,
    pub(super) logs_to_keep: u64,
    pub(super) client_heartbeat_interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) failure_timeout_ms: Option<u64>,
    pub(super) retain_messages: u32,
    pub(super) retain_bytes: u64,
    pub(super) retain_total_bytes: u64,
    pub(super) max_payload_bytes: u32,
    pub(super) max_clients: u32,
    pub(super) max_groups: u32,
    pub(super) max_members_per_group: u32,
    pub(super) subscriber_buffer: u32,
    pub(super) max_subscribers: u32,
    pub(super) max_concurrent_streams: u32,
    pub(super) http2_keepalive_interval_ms: u64,
    pub(super) http2_keepalive_timeout_ms: u64,
    pub(super) max_connections: u32,
    pub(super) connection_preface_timeout_ms: u64,
    pub(super) subscriber_buffer_bytes: u64,
    pub(super) max_subscribers_per_client: u32,
    pub(super) disk_reserve_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) backup_dir: Option<PathBuf>,
    pub(super) backup_interval_s: u64,
    pub(super) backup_keep: u32,
    pub(super) peer_addresses: String,
    pub(super) log_format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cluster_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) admin_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tls_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tls_ca: Option<String>,
    pub(super) tls_client_auth: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) worker_threads: Option<u32>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            servers: 3,
            host: "127.0.0.1".into(),
            base_port: 50051,
            base_peer_port: 51051,
            base_http_port: 52051,
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
            backup_dir: None,
            backup_interval_s: 3600,
            backup_keep: 24,
            peer_addresses: "membership".into(),
            log_format: "text".into(),
            cluster_secret: None,
            admin_token: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_client_auth: false,
            worker_threads: None,
        }
    }
}

impl Config {
    /// Loads `path` (if it exists, or fails if `required`), then the environment, then `overrides`.
    pub fn load(path: &Path, required: bool, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if path.exists() {
            figment = figment.merge(Json::file_exact(path));
        } else if required {
            return Err(ConfigError::Invalid(format!(
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
        let mut raw: RawConfig = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(one_line(e)))?;
        if raw.cluster_secret.is_none() {
            raw.cluster_secret = launcher_file(&raw.data_dir, SECRET_FILE)?;
        }
        if raw.admin_token.is_none() {
            raw.admin_token = launcher_file(&raw.data_dir, ADMIN_TOKEN_FILE)?;
        }
        raw.validate()
    }

    /// Parses a config from JSON text with no other layers (tests and tooling).
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Json::string(text))
            .extract()
            .map_err(|e| ConfigError::Invalid(one_line(e)))?;
        raw.validate()
    }
}

/// Every environment variable of the server starts with this.
const ENV_PREFIX: &str = "SEQUENCER_";

/// `SEQUENCER_*` variables that are not config keys: the secret (read verbatim below) and the
/// client's own (`eval $(client register ...)` exports them into the shell that may start a
/// server).
const NOT_SERVER_KEYS: [&str; 4] = ["CLUSTER_SECRET", "ADMIN_TOKEN", "CLIENT_ID", "TOKEN"];

/// Where the one-command launcher keeps the cluster secret it made up, in `data_dir`, so that
/// its next start and `server --node K` on the same dir use the same one.
pub const SECRET_FILE: &str = "cluster.secret";

/// Where the launcher keeps the admin token it made up, beside the cluster secret; the local
/// `client` reads it there for admin calls.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A secret the launcher made up in `data_dir`, if it did.
fn launcher_file(data_dir: &Path, name: &str) -> Result<Option<String>, ConfigError> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::Invalid(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

/// `SEQUENCER_CLUSTER_SECRET` and `SEQUENCER_ADMIN_TOKEN`, verbatim, as a config layer.
fn secret_from_env() -> Serialized<std::collections::BTreeMap<&'static str, String>> {
    let mut layer = std::collections::BTreeMap::new();
    if let Ok(secret) = std::env::var(CLUSTER_SECRET_ENV) {
        layer.insert("cluster_secret", secret);
    }
    if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
        layer.insert("admin_token", token);
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
