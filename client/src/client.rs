//! [`Client`]: every RPC of the public services, sent through the retry policy, and primary
//! discovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::Status;

use crate::pb::admin_client::AdminClient;
use crate::pb::cluster_client::ClusterClient;
use crate::pb::messenger_client::MessengerClient;
use crate::pb::sequencer_client::SequencerClient;
use crate::pb::tracker_client::TrackerClient;
use crate::retry::RetryPolicy;
use crate::transport::Server;
use crate::{pb, ClientError, Tls};

/// The heartbeat interval assumed until a server says otherwise.
const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// How long an Admin call may take unless [`Client::with_deadline`] set a deadline: adding a
/// node answers only once it has caught up, which may take a while.
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(120);

/// The header Admin calls carry the admin token in.
const ADMIN_TOKEN_HEADER: &str = "x-admin-token";

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

/// One call of the Admin service, like [`rpc!`] but under [`Client::admin_policy`], on the
/// channels of [`Client::admin_servers`], and with the admin token and the time left in every
/// attempt's headers: `admin_rpc!(self, add_member(req))`.
macro_rules! admin_rpc {
    ($client:expr, $method:ident ($req:expr)) => {{
        let req = $req;
        let policy = $client.admin_policy();
        let token = $client.admin_header()?;
        let servers = $client.admin_servers()?;
        let until = Instant::now() + policy.deadline;
        $client
            .call_on(servers, policy, |ch| {
                let req = admin_request(req.clone(), token.as_ref(), until);
                async move { AdminClient::new(ch).$method(req).await }
            })
            .await
    }};
}

/// A request with the admin token, if there is one, and the time left until `until` as its
/// grpc-timeout, so the server gives up when the caller does (a minute without one).
fn admin_request<T>(
    msg: T,
    token: Option<&AsciiMetadataValue>,
    until: Instant,
) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = token {
        req.metadata_mut().insert(ADMIN_TOKEN_HEADER, token.clone());
    }
    req.set_timeout(until.saturating_duration_since(Instant::now()));
    req
}

/// The admin token, which no Debug output shows.
#[derive(Clone, PartialEq, Eq)]
struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
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
    /// Whether [`Client::with_deadline`] set `policy.deadline`; if not, Admin calls get
    /// [`ADMIN_DEADLINE`].
    deadline_set: bool,
    admin_token: Option<AdminToken>,
    /// Channels to the same servers, in the same order, that do not cut a call off at the RPC
    /// timeout: an Admin call may rightly take minutes. Made on the first Admin call.
    admin_servers: OnceLock<Vec<Server>>,
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
            deadline_set: false,
            admin_token: None,
            admin_servers: OnceLock::new(),
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
        self.admin_servers = OnceLock::new();
        Ok(self)
    }

    /// How long a call may keep trying servers, every attempt and pause included
    /// (default 15 s; for Admin calls 120 s, [`ADMIN_DEADLINE`]). No attempt outlasts it:
    /// each gets the RPC timeout or what is left. Set here, it holds for Admin calls too.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.policy.deadline = deadline;
        self.deadline_set = true;
        self
    }

    /// The admin token that Admin calls send in the `x-admin-token` header: membership
    /// changes and primary hand-over need it (or a client certificate the cluster trusts).
    /// It is sent to no other service, and nothing the client prints shows it.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(AdminToken(token.into()));
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
            deadline_set: self.deadline_set,
            admin_token: self.admin_token.clone(),
            admin_servers: self.admin_servers.clone(),
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

    /// The cluster's voters and learners, with their addresses and how far each is behind,
    /// as the primary sees them (Admin.ListMembers; needs no admin token). Not to be confused
    /// with [`Client::list_members`], the members of a group.
    pub async fn list_cluster_members(&self) -> Result<pb::AdminListResponse, ClientError> {
        admin_rpc!(self, list_members(pb::AdminListRequest {}))
    }

    /// Adds node `id`, which clients reach at `addr` and peers at `peer_addr`, as a learner;
    /// unless `learner_only`, the primary promotes it to voter once it has caught up, and only
    /// then answers. Refused with ALREADY_EXISTS if `id` is a member already.
    pub async fn add_member(
        &self,
        id: u32,
        addr: &str,
        peer_addr: &str,
        learner_only: bool,
    ) -> Result<pb::MembershipResponse, ClientError> {
        let req = pb::AddMemberRequest {
            id,
            addr: addr.to_string(),
            peer_addr: peer_addr.to_string(),
            learner_only,
        };
        admin_rpc!(self, add_member(req))
    }

    /// Promotes learner `id` to voter.
    pub async fn promote_member(&self, id: u32) -> Result<pb::MembershipResponse, ClientError> {
        admin_rpc!(self, promote_member(pb::PromoteMemberRequest { id }))
    }

    /// Removes voter or learner `id` (NOT_FOUND if it is not a member). With `force`, even if
    /// the voters left could not form a quorum with the members reachable now.
    pub async fn remove_member(
        &self,
        id: u32,
        force: bool,
    ) -> Result<pb::MembershipResponse, ClientError> {
        admin_rpc!(self, remove_member(pb::RemoveMemberRequest { id, force }))
    }

    /// Hands the primary to voter `to`, or with `None` to the most up-to-date voter, without
    /// waiting for an election. The next calls go to the new primary if discovery knows it.
    pub async fn transfer_primary(
        &self,
        to: Option<u32>,
    ) -> Result<pb::TransferPrimaryResponse, ClientError> {
        let req = pb::TransferPrimaryRequest {
            to: to.unwrap_or(0),
        };
        admin_rpc!(self, transfer_primary(req)).inspect(|resp| self.follow_primary(resp.to))
    }

    /// A backup of the whole replicated state, streamed from the node that takes it (after a
    /// read barrier through the primary); the last message carries the summary.
    pub async fn backup(&self) -> Result<tonic::Streaming<pb::BackupChunk>, ClientError> {
        admin_rpc!(self, backup(pb::BackupRequest {}))
    }

    /// The policy of Admin calls: one attempt may take the whole deadline (the default RPC
    /// timeout would cut a learner's catching up short), which is [`ADMIN_DEADLINE`] unless
    /// [`Client::with_deadline`] set one.
    fn admin_policy(&self) -> RetryPolicy {
        let deadline = if self.deadline_set {
            self.policy.deadline
        } else {
            ADMIN_DEADLINE
        };
        self.policy.for_admin(deadline)
    }

    /// The admin token as a header value, if there is one.
    fn admin_header(&self) -> Result<Option<AsciiMetadataValue>, ClientError> {
        let Some(AdminToken(token)) = &self.admin_token else {
            return Ok(None);
        };
        let mut value =
            AsciiMetadataValue::try_from(token.as_str()).map_err(|_| ClientError::BadAdminToken)?;
        // Kept out of HTTP/2 header compression tables.
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// The channels of Admin calls: the servers' addresses again, with no timeout of their
    /// own, so that each call's deadline alone bounds it.
    fn admin_servers(&self) -> Result<&[Server], ClientError> {
        if let Some(servers) = self.admin_servers.get() {
            return Ok(servers);
        }
        let servers = self
            .servers
            .iter()
            .map(|s| Server::untimed(&s.addr, self.tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.admin_servers.get_or_init(|| servers))
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
        self.call_on(&self.servers, policy, f).await
    }

    /// [`Client::call_under`] on `servers`: these servers' channels, in the same order.
    async fn call_on<T, F, Fut>(
        &self,
        servers: &[Server],
        policy: RetryPolicy,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (i, resp) = policy
            .call(servers, self.current.load(Ordering::Relaxed), f)
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

    #[tokio::test]
    async fn admin_calls_get_two_minutes_unless_a_deadline_was_set() {
        let c = Client::new(["127.0.0.1:1"]).unwrap();
        assert_eq!(c.admin_policy().deadline, ADMIN_DEADLINE);
        assert_eq!(c.admin_policy().rpc_timeout, ADMIN_DEADLINE);
        assert_eq!(c.policy.deadline, RetryPolicy::default().deadline);
        let c = c
            .with_deadline(Duration::from_secs(5))
            .with_admin_token("t");
        assert_eq!(c.admin_policy().deadline, Duration::from_secs(5));
        assert_eq!(c.share().admin_policy(), c.admin_policy());
    }

    #[tokio::test]
    async fn the_admin_token_is_sent_as_a_sensitive_header_and_never_printed() {
        let c = Client::new(["127.0.0.1:1"]).unwrap();
        assert!(c.admin_header().unwrap().is_none());
        let c = c.with_admin_token("s3cret-admin-token");
        let shown = format!("{:?}", c.admin_token);
        assert!(!shown.contains("s3cret"), "{shown}");
        let value = c.admin_header().unwrap().unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "s3cret-admin-token");
        assert!(!format!("{value:?}").contains("s3cret"));
        let req = admin_request((), Some(&value), Instant::now() + Duration::from_secs(60));
        assert_eq!(
            req.metadata().get(ADMIN_TOKEN_HEADER).unwrap(),
            "s3cret-admin-token"
        );
        assert!(req.metadata().get("grpc-timeout").is_some());

        let bad = Client::new(["127.0.0.1:1"])
            .unwrap()
            .with_admin_token("line\nbreak-s3cret");
        let e = bad.admin_header().unwrap_err();
        assert!(matches!(e, ClientError::BadAdminToken));
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[tokio::test]
    async fn admin_channels_are_made_once_and_again_after_a_reconnect() {
        let c = Client::new(["127.0.0.1:1", "127.0.0.1:2"]).unwrap();
        let addrs: Vec<_> = c
            .admin_servers()
            .unwrap()
            .iter()
            .map(|s| s.addr.clone())
            .collect();
        assert_eq!(addrs, c.addrs());
        assert!(c.admin_servers.get().is_some());
        let c = c.with_rpc_timeout(Duration::from_secs(1)).unwrap();
        assert!(c.admin_servers.get().is_none());
    }
}
