//! [`Client`]: every RPC of the public services, sent through the retry policy, and primary
//! discovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::pb::cluster_client::ClusterClient;
use crate::pb::messenger_client::MessengerClient;
use crate::pb::sequencer_client::SequencerClient;
use crate::pb::tracker_client::TrackerClient;
use crate::retry::RetryPolicy;
use crate::transport::Server;
use crate::{pb, ClientError, Tls};

/// The heartbeat interval assumed until a server says otherwise.
const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// One RPC through [`Client::call_under`]: `rpc!(self, TrackerClient.join(req))`, or with a
/// policy of its own, `rpc!(self, policy, ...)`. Every attempt sends its own clone of the
/// request, on a stub for the channel of the server tried.
macro_rules! rpc {
    ($client:expr, $stub:ident . $method:ident ($req:expr)) => {
        rpc!($client, $client.policy, $stub.$method($req))
    };
    ($client:expr, $policy:expr, $stub:ident . $method:ident ($req:expr)) => {{
        let req = $req;
        $client
            .call_under($policy, |ch| {
                let req = req.clone();
                async move { $stub::new(ch).$method(req).await }
            })
            .await
    }};
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
    /// The server the next call goes to first: the one that answered last.
    current: AtomicUsize,
    policy: RetryPolicy,
    /// Node id -> index in `servers`, learned from Cluster.Status.
    nodes: RwLock<HashMap<u32, usize>>,
    /// The heartbeat interval servers last asked for, in ms.
    heartbeat_ms: AtomicU64,
    tls: Option<Tls>,
}

impl Client {
    /// A client for these `host:port` addresses. Nothing connects until the first call.
    pub fn new<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> Result<Self, ClientError> {
        let policy = RetryPolicy::default();
        let servers = addrs
            .into_iter()
            .map(|a| Server::new(a.as_ref(), policy.rpc_timeout, None))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ClientError::NoServers);
        }
        Ok(Self {
            servers,
            current: AtomicUsize::new(0),
            policy,
            nodes: RwLock::default(),
            heartbeat_ms: AtomicU64::new(DEFAULT_HEARTBEAT_MS),
            tls: None,
        })
    }

    /// How long one RPC may take before the client tries the next server (default 6 s).
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Result<Self, ClientError> {
        self.policy.rpc_timeout = timeout;
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
            .map(|s| Server::new(&s.addr, self.policy.rpc_timeout, self.tls.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(self)
    }

    /// How long a call may keep trying servers, every attempt and pause included
    /// (default 15 s). No attempt outlasts it: each gets the RPC timeout or what is left.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.policy.deadline = deadline;
        self
    }

    /// The server addresses, in order.
    pub fn addrs(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.addr.as_str()).collect()
    }

    /// Another handle on the same connections, with the same settings and what this one has
    /// learned: for a task that must own its client.
    pub(crate) fn share(&self) -> Client {
        Client {
            servers: self.servers.clone(),
            current: AtomicUsize::new(self.current.load(Ordering::Relaxed)),
            policy: self.policy,
            nodes: RwLock::new(self.nodes.read().unwrap_or_else(|p| p.into_inner()).clone()),
            heartbeat_ms: AtomicU64::new(self.heartbeat_ms.load(Ordering::Relaxed)),
            tls: self.tls.clone(),
        }
    }

    /// One id of `sequence` ("" for the default sequence).
    pub async fn get_id(&self, sequence: &str) -> Result<pb::GetIdResponse, ClientError> {
        let req = pb::GetIdRequest {
            sequence: sequence.to_string(),
        };
        rpc!(self, SequencerClient.get_id(req)).inspect(|resp| self.follow_primary(resp.primary))
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
        rpc!(self, SequencerClient.get_ids(req)).inspect(|resp| self.follow_primary(resp.primary))
    }

    /// The last id of `sequence` as applied on the server that answers.
    pub async fn current_id(&self, sequence: &str) -> Result<pb::CurrentIdResponse, ClientError> {
        let req = pb::CurrentIdRequest {
            sequence: sequence.to_string(),
        };
        rpc!(self, SequencerClient.current_id(req))
    }

    /// The cluster as the answering server sees it.
    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        rpc!(self, ClusterClient.status(pb::StatusRequest {}))
    }

    /// Registers a new client identity under `name`.
    pub async fn register(&self, name: &str) -> Result<pb::RegisterResponse, ClientError> {
        let req = pb::RegisterRequest {
            name: name.to_string(),
        };
        rpc!(self, TrackerClient.register(req))
            .inspect(|resp| self.learn_heartbeat(resp.heartbeat_interval_ms))
    }

    /// Joins `group` (creating it); joining again only returns the group's state.
    pub async fn join(&self, me: &Identity, group: &str) -> Result<pb::JoinResponse, ClientError> {
        let req = pb::JoinRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
        };
        rpc!(self, TrackerClient.join(req))
    }

    pub async fn leave(&self, me: &Identity, group: &str) -> Result<(), ClientError> {
        let req = pb::LeaveRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: group.to_string(),
        };
        rpc!(self, TrackerClient.leave(req)).map(|_| ())
    }

    pub async fn unregister(&self, me: &Identity) -> Result<(), ClientError> {
        let req = pb::UnregisterRequest {
            client_id: me.client_id,
            token: me.token.clone(),
        };
        rpc!(self, TrackerClient.unregister(req)).map(|_| ())
    }

    /// Tells the primary this client is alive; send one every `heartbeat_interval_ms`, which
    /// the answer repeats, or let [`Client::keep_alive`] do it.
    pub async fn heartbeat(&self, me: &Identity) -> Result<pb::HeartbeatResponse, ClientError> {
        let req = pb::HeartbeatRequest {
            client_id: me.client_id,
            token: me.token.clone(),
        };
        let policy = self.policy.for_heartbeat(self.heartbeat_interval());
        rpc!(self, policy, TrackerClient.heartbeat(req))
            .inspect(|resp| self.learn_heartbeat(resp.heartbeat_interval_ms))
    }

    /// The heartbeat interval servers last asked for.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed))
    }

    fn learn_heartbeat(&self, ms: u32) {
        if ms > 0 {
            self.heartbeat_ms.store(u64::from(ms), Ordering::Relaxed);
        }
    }

    pub async fn list_groups(&self) -> Result<pb::ListGroupsResponse, ClientError> {
        rpc!(self, TrackerClient.list_groups(pb::ListGroupsRequest {}))
    }

    pub async fn list_members(&self, group: &str) -> Result<pb::ListMembersResponse, ClientError> {
        let req = pb::ListMembersRequest {
            group: group.to_string(),
        };
        rpc!(self, TrackerClient.list_members(req))
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
        rpc!(self, MessengerClient.send(req))
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
        // The timeouts cover only the wait for the stream to open.
        rpc!(self, MessengerClient.subscribe(req))
    }

    /// The standard gRPC health check: the cheapest call a server answers, the floor that
    /// every other call is measured against.
    pub async fn ping(&self) -> Result<(), ClientError> {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let req = HealthCheckRequest {
            service: String::new(),
        };
        rpc!(self, HealthClient.check(req)).map(|_| ())
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

    /// Calls `f` under `policy`, from the server that answered last; the one that answers
    /// becomes the next call's first.
    async fn call_under<T, F, Fut>(&self, policy: RetryPolicy, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (i, resp) = policy
            .call(&self.servers, self.current.load(Ordering::Relaxed), f)
            .await?;
        self.current.store(i, Ordering::Relaxed);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_servers_is_an_error() {
        assert!(matches!(
            Client::new(Vec::<String>::new()),
            Err(ClientError::NoServers)
        ));
    }

    #[tokio::test]
    async fn settings_carry_over_to_a_shared_handle_and_to_new_channels() {
        let c = Client::new(["127.0.0.1:1", "127.0.0.1:2"])
            .unwrap()
            .with_deadline(Duration::from_secs(2))
            .with_rpc_timeout(Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            c.policy,
            RetryPolicy {
                rpc_timeout: Duration::from_secs(10),
                deadline: Duration::from_secs(2),
                ..RetryPolicy::default()
            }
        );
        c.current.store(1, Ordering::Relaxed);
        c.learn_heartbeat(250);
        let shared = c.share();
        assert_eq!(shared.policy, c.policy);
        assert_eq!(shared.addrs(), c.addrs());
        assert_eq!(shared.current.load(Ordering::Relaxed), 1);
        assert_eq!(shared.heartbeat_interval(), Duration::from_millis(250));
    }
}
