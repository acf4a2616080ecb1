//! Client library for the sequencer cluster.
//!
//! A [`Client`] knows several servers. Each call goes to the server that answered last; when a
//! server is down or has no primary (UNAVAILABLE), the call moves on to the next one, cycling
//! with a short backoff until the client's deadline. Any server will do: followers forward to
//! the primary. Other errors (bad input, limits) come back at once.
//!
//! Primary discovery saves that forwarding hop: [`Client::discover_primary`] learns which of
//! the client's servers is which node, and from then on every id response (which names the
//! primary) steers the next call to the primary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use tonic::{Code, Status};

use pb::cluster_client::ClusterClient;
use pb::messenger_client::MessengerClient;
use pb::sequencer_client::SequencerClient;
use pb::tracker_client::TrackerClient;
pub use sequencer_proto::v1 as pb;

/// How long one RPC may take before the client tries elsewhere.
const RPC_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a call keeps moving between servers before it gives up.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);
/// Longest pause between two rounds over every server.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// The heartbeat interval assumed until a server says otherwise.
const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no server address given")]
    NoServers,
    #[error("invalid server address `{0}`: {1}")]
    BadAddress(String, String),
    /// A server answered with an error that retrying elsewhere would not fix.
    #[error("{}: {}", code_name(.status.code()), .status.message())]
    Rejected { server: String, status: Status },
    /// Every server was tried until the deadline.
    #[error("no server could serve the call; last error from {server}: {}: {}", code_name(.status.code()), .status.message())]
    Unavailable { server: String, status: Status },
}

impl ClientError {
    /// The gRPC status behind the error, if a server sent one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rejected { status, .. } | ClientError::Unavailable { status, .. } => {
                Some(status)
            }
            _ => None,
        }
    }

    /// The gRPC code behind the error; INVALID_ARGUMENT for a client built without servers or
    /// with a bad address.
    pub fn code(&self) -> Code {
        self.status()
            .map(|s| s.code())
            .unwrap_or(Code::InvalidArgument)
    }
}

/// `INVALID_ARGUMENT` style names, as grpcurl and the gRPC docs spell them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Worth trying on another server: the server is down, has no primary, or timed out. tonic
/// reports a connection reset mid-call (a server killed) as UNKNOWN. Retrying an id request
/// whose fate is unknown is safe: at worst it burns ids, it never repeats one.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

struct Server {
    addr: String,
    channel: Channel,
}

/// How to reach servers over TLS: PEM bytes, already read.
#[derive(Clone, Default)]
pub struct Tls {
    /// The CA that signed the servers' certificates; without it, the public web roots.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and key, for servers that require one (`tls_client_auth`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never prints the key.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<certificate and key>"),
            )
            .finish()
    }
}

impl Tls {
    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        c = match &self.ca {
            Some(ca) => c.ca_certificate(Certificate::from_pem(ca)),
            None => c.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            c = c.identity(TlsIdentity::from_pem(cert, key));
        }
        c
    }
}

fn server(addr: &str, rpc_timeout: Duration, tls: Option<&Tls>) -> Result<Server, ClientError> {
    let addr = addr.trim().to_string();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.clone()
    } else {
        format!("{scheme}://{addr}")
    };
    let bad = |e: String| ClientError::BadAddress(addr.clone(), e);
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(rpc_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| bad(format!("TLS: {e}")))?;
    }
    Ok(Server {
        channel: endpoint.connect_lazy(),
        addr,
    })
}

/// Who a group-messaging client is: what Register returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub client_id: u64,
    pub token: String,
}

impl From<&pb::RegisterResponse> for Identity {
    fn from(r: &pb::RegisterResponse) -> Self {
        Self {
            client_id: r.client_id,
            token: r.token.clone(),
        }
    }
}

/// A handle on the cluster. Cheap to share across tasks (`&Client` or `Arc<Client>`).
pub struct Client {
    servers: Vec<Server>,
    current: AtomicUsize,
    deadline: Duration,
    /// Node id -> index in `servers`, learned from Cluster.Status.
    nodes: RwLock<HashMap<u32, usize>>,
    /// The heartbeat interval servers last asked for, in ms.
    heartbeat_ms: AtomicU64,
    rpc_timeout: Duration,
    tls: Option<Tls>,
}

impl Client {
    /// A client for these `host:port` addresses. Nothing connects until the first call.
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Result<Self, ClientError> {
        let servers = addrs
            .into_iter()
            .map(|a| server(a.as_ref(), RPC_TIMEOUT, None))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        Ok(Self {
            servers,
            current: AtomicUsize::new(0),
            deadline: DEFAULT_DEADLINE,
            nodes: RwLock::default(),
            heartbeat_ms: AtomicU64::new(DEFAULT_HEARTBEAT_MS),
            rpc_timeout: RPC_TIMEOUT,
            tls: None,
        })
    }

    /// How long one RPC may take before the client tries the next server (default 6 s).
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Result<Self, ClientError> {
        self.rpc_timeout = timeout;
        self.reconnect()
    }

    /// Talk TLS to every server.
    pub fn with_tls(mut self, tls: Tls) -> Result<Self, ClientError> {
        self.tls = Some(tls);
        self.reconnect()
    }

    fn reconnect(mut self) -> Result<Self, ClientError> {
        self.servers = self
            .servers
            .iter()
            .map(|s| server(&s.addr, self.rpc_timeout, self.tls.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// How long a call may keep trying servers (default 15 s).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The server addresses, in order.
    pub fn addrs(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.addr.as_str()).collect()
    }

    /// One id of `sequence` ("" for the default sequence).
    pub async fn get_id(&self, sequence: &str) -> Result<pb::GetIdResponse, ClientError> {
        let req = pb::GetIdRequest {
            sequence: sequence.to_string(),
        };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { SequencerClient::new(ch).get_id(req).await }
            })
            .await?;
        self.follow_primary(resp.primary);
        Ok(resp)
    }

    /// A dense block of `count` ids of `sequence`.
    pub async fn get_ids(
        &self,
        sequence: &str,
        count: u32,
    ) -> Result<pb::GetIdsResponse, ClientError> {
        let req = pb::GetIdsRequest {
            sequence: sequence.to_string(),
            count,
        };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { SequencerClient::new(ch).get_ids(req).await }
            })
            .await?;
        self.follow_primary(resp.primary);
        Ok(resp)
    }

    /// The last id of `sequence` as applied on the server that answers.
    pub async fn current_id(&self, sequence: &str) -> Result<pb::CurrentIdResponse, ClientError> {
        let req = pb::CurrentIdRequest {
            sequence: sequence.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { SequencerClient::new(ch).current_id(req).await }
        })
        .await
    }

    /// The cluster as the answering server sees it.
    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.call(|ch| async move { ClusterClient::new(ch).status(pb::StatusRequest {}).await })
            .await
    }

    /// Registers a new client identity under `name`.
    pub async fn register(&self, name: &str) -> Result<pb::RegisterResponse, ClientError> {
        let req = pb::RegisterRequest {
            name: name.to_string(),
        };
        let resp = self
            .call(|ch| {
                let req = req.clone();
                async move { TrackerClient::new(ch).register(req).await }
            })
            .await?;
        self.learn_heartbeat(resp.heartbeat_interval_ms);
        Ok(resp)
    }

    /// Joins `group` (creating it); joining again only returns the group's state.
    pub async fn join(&self, me: &Identity, group: &str) -> Result<pb::JoinResponse, ClientError> {
        let req = pb::JoinRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { TrackerClient::new(ch).join(req).await }
        })
        .await
    }

    pub async fn leave(&self, me: &Identity, group: &str) -> Result<(), ClientError> {
        let req = pb::LeaveRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { TrackerClient::new(ch).leave(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn unregister(&self, me: &Identity) -> Result<(), ClientError> {
        let req = pb::UnregisterRequest {
            client_id: me.client_id,
            token: me.token.clone(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { TrackerClient::new(ch).unregister(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Tells the primary this client is alive; send one every `heartbeat_interval_ms`, which
    /// the answer repeats.
    ///
    /// A heartbeat is only useful on time: each server gets half an interval to answer and the
    /// pause between rounds stays short, so a hung server is left behind well before the
    /// primary's failure timeout.
    pub async fn heartbeat(&self, me: &Identity) -> Result<pb::HeartbeatResponse, ClientError> {
        let req = pb::HeartbeatRequest {
            client_id: me.client_id,
            token: me.token.clone(),
        };
        let interval = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        let resp = self
            .call_with(
                |ch| {
                    let req = req.clone();
                    async move { TrackerClient::new(ch).heartbeat(req).await }
                },
                interval / 2,
                interval / 4,
            )
            .await?;
        self.learn_heartbeat(resp.heartbeat_interval_ms);
        Ok(resp)
    }

    fn learn_heartbeat(&self, ms: u32) {
        if ms > 0 {
            self.heartbeat_ms.store(u64::from(ms), Ordering::Relaxed);
        }
    }

    pub async fn list_groups(&self) -> Result<pb::ListGroupsResponse, ClientError> {
        self.call(|ch| async move {
            TrackerClient::new(ch)
                .list_groups(pb::ListGroupsRequest {})
                .await
        })
        .await
    }

    pub async fn list_members(&self, group: &str) -> Result<pb::ListMembersResponse, ClientError> {
        let req = pb::ListMembersRequest {
            group: group.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move { TrackerClient::new(ch).list_members(req).await }
        })
        .await
    }

    /// Sends `payload` to `group` as this client's message number `sender_seq` (1, 2, ...).
    /// Retrying with the same sender_seq is safe: the server answers, it does not repeat.
    pub async fn send(
        &self,
        me: &Identity,
        group: &str,
        sender_seq: u64,
        payload: Vec<u8>,
    ) -> Result<pb::SendResponse, ClientError> {
        let req = pb::SendRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
            sender_seq,
            payload,
        };
        self.call(|ch| {
            let req = req.clone();
            async move { MessengerClient::new(ch).send(req).await }
        })
        .await
    }

    /// The deliveries of `group` from `from_seq` (0: from the next one), then live ones.
    /// If the stream breaks, subscribe again from the last group_seq seen plus one.
    pub async fn subscribe(
        &self,
        me: &Identity,
        group: &str,
        from_seq: u64,
    ) -> Result<tonic::Streaming<pb::Delivery>, ClientError> {
        let req = pb::SubscribeRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
            from_seq,
        };
        self.call(|ch| {
            let req = req.clone();
            // The channel's timeout covers only the wait for the stream to open.
            async move { MessengerClient::new(ch).subscribe(req).await }
        })
        .await
    }

    /// The standard gRPC health check: the cheapest call a server answers, the floor that
    /// every other call is measured against.
    pub async fn ping(&self) -> Result<(), ClientError> {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        self.call(|ch| async move {
            HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        })
        .await
        .map(|_| ())
    }

    /// Asks any server for the cluster's layout, learns which of this client's servers is which
    /// node, and sends the next calls to the primary. Returns the primary's id, if one is known.
    pub async fn discover_primary(&self) -> Result<Option<u32>, ClientError> {
        let status = self.status().await?;
        let mut nodes = HashMap::new();
        for n in &status.nodes {
            if let Some(i) = self.servers.iter().position(|s| s.addr == n.addr) {
                nodes.insert(n.id, i);
            }
        }
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = nodes;
        if status.primary == 0 {
            return Ok(None);
        }
        self.follow_primary(status.primary);
        Ok(Some(status.primary))
    }

    /// Points the next call at node `primary`, if discovery has told us its address.
    fn follow_primary(&self, primary: u32) {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&i) = nodes.get(&primary) {
            self.current.store(i, Ordering::Relaxed);
        }
    }

    /// Calls `f` on the current server, moving on to the next on retryable errors.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_with(f, RPC_TIMEOUT, MAX_BACKOFF).await
    }

    /// Like `call`, giving up on one server after `attempt` and pausing at most `max_backoff`
    /// between rounds.
    async fn call_with<T, F, Fut>(
        &self,
        f: F,
        attempt: Duration,
        max_backoff: Duration,
    ) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let n = self.servers.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut backoff = Duration::from_millis(25).min(max_backoff);
        let mut tries = 0usize;
        loop {
            let i = (start + tries) % n;
            let server = &self.servers[i];
            // A hung server (paused, cut off) gives no reset: stop waiting for it in time.
            let res = match tokio::time::timeout(attempt, f(server.channel.clone())).await {
                Ok(res) => res,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {attempt:?}"
                ))),
            };
            match res {
                Ok(resp) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(status) if retryable(status.code()) => {
                    tracing::debug!(server = %server.addr, %status, "server unavailable; trying the next");
                    tries += 1;
                    if Instant::now() >= deadline {
                        return Err(ClientError::Unavailable {
                            server: server.addr.clone(),
                            status,
                        });
                    }
                    // A full round failed: the cluster may be electing. Back off a little.
                    if tries.is_multiple_of(n) {
                        sleep(backoff).await;
                        backoff = (backoff * 2).min(max_backoff);
                    }
                }
                Err(status) => {
                    return Err(ClientError::Rejected {
                        server: server.addr.clone(),
                        status,
                    })
                }
            }
        }
    }
}

/// The client addresses of a config.json, in node order: the explicit `nodes` list, or the
/// shorthand `servers`/`host`/`base_port` (defaults 3, 127.0.0.1, 50051).
pub fn addrs_from_config(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("config: {e}"))?;
    if let Some(nodes) = v.get("nodes").and_then(|n| n.as_array()) {
        let mut with_ids = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let addr = n
                .get("addr")
                .and_then(|a| a.as_str())
                .ok_or_else(|| format!("config: nodes[{i}].addr is missing"))?;
            let id = n.get("id").and_then(|i| i.as_u64()).unwrap_or(i as u64);
            with_ids.push((id, addr.to_string()));
        }
        with_ids.sort();
        return Ok(with_ids.into_iter().map(|(_, a)| a).collect());
    }
    let servers = v.get("servers").and_then(|s| s.as_u64()).unwrap_or(3);
    let host = v
        .get("host")
        .and_then(|s| s.as_str())
        .unwrap_or("127.0.0.1");
    let base = v.get("base_port").and_then(|s| s.as_u64()).unwrap_or(50051);
    Ok((0..servers)
        .map(|k| format!("{host}:{}", base + k))
        .collect())
}

/// Each node's id and the hosts it is reached on (client and peer address), from config.json
/// text: for certificates that must name them.
pub fn node_hosts_from_config(text: &str) -> Result<Vec<(u64, Vec<String>)>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("config: {e}"))?;
    let host_of = |addr: &str| -> Result<String, String> {
        if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
            return Ok(a.ip().to_string());
        }
        // host:port with a host name: the certificate names the host.
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(host.to_string())
            }
            _ => Err(format!("config: `{addr}` is not a host:port address")),
        }
    };
    if let Some(nodes) = v.get("nodes").and_then(|n| n.as_array()) {
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let id = n
                .get("id")
                .and_then(|i| i.as_u64())
                .ok_or_else(|| format!("config: nodes[{i}].id is missing"))?;
            let mut hosts = Vec::new();
            for key in ["addr", "peer_addr"] {
                let addr = n
                    .get(key)
                    .and_then(|a| a.as_str())
                    .ok_or_else(|| format!("config: nodes[{i}].{key} is missing"))?;
                hosts.push(host_of(addr)?);
            }
            hosts.dedup();
            out.push((id, hosts));
        }
        return Ok(out);
    }
    let servers = v.get("servers").and_then(|s| s.as_u64()).unwrap_or(3);
    let host = v
        .get("host")
        .and_then(|s| s.as_str())
        .unwrap_or("127.0.0.1");
    Ok((1..=servers).map(|k| (k, vec![host.to_string()])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_shorthand_and_list() {
        assert_eq!(
            addrs_from_config(r#"{"servers": 2, "base_port": 7000}"#).unwrap(),
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
        let list = r#"{"nodes": [{"id": 2, "addr": "10.0.0.2:1", "peer_addr": "x"},
                                 {"id": 1, "addr": "10.0.0.1:1", "peer_addr": "y"}]}"#;
        assert_eq!(
            addrs_from_config(list).unwrap(),
            vec!["10.0.0.1:1", "10.0.0.2:1"]
        );
    }

    #[test]
    fn no_servers_is_an_error() {
        assert!(matches!(
            Client::new(Vec::<String>::new()),
            Err(ClientError::NoServers)
        ));
    }
}
