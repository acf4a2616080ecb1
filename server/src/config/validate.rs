//! Validation: the raw layers checked into one [`Config`] of typed parts, every problem one
//! line naming the key the user wrote.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::load::RawConfig;
use super::{
    Batching, ClusterSecret, Config, ConfigError, GroupSettings, NodeConfig, RaftSettings,
    TlsFiles, Transport,
};
use crate::write::batch::MAX_BATCH_BYTES;

/// `host:port`, where host is an IP address (IPv6 in brackets) or a DNS name. Names are
/// resolved when connecting and binding, not here: a container that comes back with a new
/// address is found again.
pub fn check_addr(addr: &str) -> Result<(), String> {
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

/// A secret that travels as an HTTP/2 header: printable ASCII, and long enough not to guess.
fn secret_value(key: &str, secret: String) -> Result<ClusterSecret, ConfigError> {
    let printable = secret.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !(16..=1024).contains(&secret.len()) || !printable {
        return Err(ConfigError::Invalid(format!(
            "key `{key}`: must be 16 to 1024 printable ASCII characters, no spaces"
        )));
    }
    Ok(ClusterSecret(secret))
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError::Invalid(format!("key `{key}`: {msg}")));
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
                for (key, base) in [
                    ("base_peer_port", self.base_peer_port),
                    ("base_http_port", self.base_http_port),
                ] {
                    if base == 0 || last_port(base) > 65535 {
                        return err(
                            key,
                            format!("{base} leaves no room for {} servers", self.servers),
                        );
                    }
                }
                let ports = |base: u16| u32::from(base)..=last_port(base);
                let ranges = [
                    ("base_port", "client", ports(self.base_port)),
                    ("base_peer_port", "peer", ports(self.base_peer_port)),
                    ("base_http_port", "HTTP", ports(self.base_http_port)),
                ];
                for (i, (key, what, a)) in ranges.iter().enumerate() {
                    for (other, other_what, b) in &ranges[..i] {
                        if a.start() <= b.end() && b.start() <= a.end() {
                            return err(
                                key,
                                format!(
                                    "{what} ports {}..={} overlap the {other_what} ports \
                                     {}..={} of {other}",
                                    a.start(),
                                    a.end(),
                                    b.start(),
                                    b.end()
                                ),
                            );
                        }
                    }
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
                        http_addr: Some(format!(
                            "{}:{}",
                            self.host,
                            u64::from(self.base_http_port) + k - 1
                        )),
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
            let http = n.http_addr.iter().map(|a| ("http_addr", a));
            for (key, addr) in [("addr", &n.addr), ("peer_addr", &n.peer_addr)]
                .into_iter()
                .chain(http)
            {
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
        if self.max_payload_bytes as usize > MAX_BATCH_BYTES {
            // One message is one log entry at most, and entries must replicate within a
            // heartbeat interval (see write/batch.rs).
            return err(
                "max_payload_bytes",
                format!("must be at most {MAX_BATCH_BYTES} (1 MiB)"),
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
            Some(secret) => Some(secret_value("cluster_secret", secret)?),
        };
        let admin_token = match self.admin_token {
            None => None,
            Some(token) => Some(secret_value("admin_token", token)?),
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
        // Checked here, not by the binary: a program that calls the library's `run` must not
        // start peers that anyone may call.
        if nodes.len() > 1 && cluster_secret.is_none() {
            return Err(ConfigError::NoSecret {
                nodes: nodes.len(),
                data_dir: self.data_dir,
            });
        }
        let backups = match self.backup_dir {
            None => None,
            Some(dir) => {
                if !(1..=31_536_000).contains(&self.backup_interval_s) {
                    return err("backup_interval_s", "must be 1..=31536000 (a year)".into());
                }
                if !(1..=10_000).contains(&self.backup_keep) {
                    return err("backup_keep", "must be 1..=10000".into());
                }
                Some(super::BackupSchedule {
                    dir,
                    interval: Duration::from_secs(self.backup_interval_s),
                    keep: self.backup_keep as usize,
                })
            }
        };
        let ms = Duration::from_millis;
        Ok(Config {
            backups,
            nodes,
            data_dir: self.data_dir,
            raft: RaftSettings {
                heartbeat_interval: ms(self.heartbeat_interval_ms),
                election_timeout_min: ms(self.election_timeout_min_ms),
                election_timeout_max: ms(self.election_timeout_max_ms),
                snapshot_logs: self.snapshot_logs,
                logs_to_keep: self.logs_to_keep,
            },
            batching: Batching {
                max_batch: self.max_batch,
                max_sequences: self.max_sequences,
                queue_capacity: self.queue_capacity as usize,
                request_timeout: ms(self.request_timeout_ms),
            },
            groups: GroupSettings {
                client_heartbeat: ms(self.client_heartbeat_interval_ms),
                failure_timeout: ms(failure_timeout_ms),
                max_payload_bytes: self.max_payload_bytes,
                subscriber_buffer: self.subscriber_buffer as usize,
                subscriber_buffer_bytes: self.subscriber_buffer_bytes as usize,
                max_subscribers: self.max_subscribers as usize,
                max_subscribers_per_client: self.max_subscribers_per_client as usize,
                limits: crate::state::GroupLimits {
                    max_clients: self.max_clients,
                    max_groups: self.max_groups,
                    max_members_per_group: self.max_members_per_group,
                    retain_messages: self.retain_messages,
                    retain_bytes: self.retain_bytes,
                    retain_total_bytes: self.retain_total_bytes,
                },
            },
            transport: Transport {
                max_concurrent_streams: self.max_concurrent_streams,
                http2_keepalive_interval: ms(self.http2_keepalive_interval_ms),
                http2_keepalive_timeout: ms(self.http2_keepalive_timeout_ms),
                max_connections: self.max_connections as usize,
                connection_preface_timeout: ms(self.connection_preface_timeout_ms),
            },
            disk_reserve_bytes: self.disk_reserve_bytes,
            peers_from_config: match self.peer_addresses.as_str() {
                "membership" => false,
                "config" => true,
                other => {
                    return err(
                        "peer_addresses",
                        format!("must be \"membership\" or \"config\", not {other:?}"),
                    )
                }
            },
            log_format: match self.log_format.as_str() {
                "text" => super::LogFormat::Text,
                "json" => super::LogFormat::Json,
                other => {
                    return err(
                        "log_format",
                        format!("must be \"text\" or \"json\", not {other:?}"),
                    )
                }
            },
            cluster_secret,
            admin_token,
            entry: super::Entry::default(),
            tls,
            worker_threads: self.worker_threads.map(|n| n as usize),
        })
    }
}
