//! The library against a tonic server in the test that misbehaves on purpose: answers late,
//! counts heartbeats, forgets clients. No cluster, no fixed port.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::pb::admin_server::{Admin, AdminServer};
use sequencer_client::pb::cluster_server::{Cluster, ClusterServer};
use sequencer_client::pb::tracker_server::{Tracker, TrackerServer};
use sequencer_client::pb::{
    AddMemberRequest, AdminListRequest, AdminListResponse, MembershipResponse,
    PromoteMemberRequest, RemoveMemberRequest, TransferPrimaryRequest, TransferPrimaryResponse,
};
use sequencer_client::pb::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
    ListGroupsRequest, ListGroupsResponse, ListMembersRequest, ListMembersResponse,
    RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, UnregisterRequest,
    UnregisterResponse,
};
use sequencer_client::{Client, Identity, KeepAlive};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

/// Answers Status after `delay`; counts heartbeats, and refuses them for client 13 (which it
/// does not know). The other calls are not needed here.
#[derive(Clone)]
struct Fake {
    delay: Duration,
    heartbeat_interval_ms: u32,
    heartbeats: Arc<AtomicU64>,
}

impl Fake {
    fn new(delay: Duration, heartbeat_interval_ms: u32) -> Self {
        Self {
            delay,
            heartbeat_interval_ms,
            heartbeats: Arc::default(),
        }
    }

    /// Serves on a free loopback port until the test ends; returns the address.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClusterServer::new(self.clone()))
                .add_service(TrackerServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Cluster for Fake {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(StatusResponse {
            node_id: 7,
            ..Default::default()
        }))
    }
}

/// `impl $service for Fake` with the methods given, and with the RPCs listed as unused
/// answering UNIMPLEMENTED: the trait wants every one, these tests call few.
macro_rules! fake_service {
    ($service:ident { $($own:tt)* } unused { $($rpc:ident($req:ident) -> $resp:ident;)* }) => {
        #[tonic::async_trait]
        impl $service for Fake {
            $($own)*
            $(
                async fn $rpc(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(Status::unimplemented("not in this test"))
                }
            )*
        }
    };
}

fake_service! {
    Tracker {
        async fn heartbeat(
            &self,
            req: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            self.heartbeats.fetch_add(1, Ordering::SeqCst);
            if req.get_ref().client_id == 13 {
                return Err(Status::unauthenticated("unknown client_id 13"));
            }
            Ok(Response::new(HeartbeatResponse {
                heartbeat_interval_ms: self.heartbeat_interval_ms,
            }))
        }
    }
    unused {
        register(RegisterRequest) -> RegisterResponse;
        join(JoinRequest) -> JoinResponse;
        leave(LeaveRequest) -> LeaveResponse;
        unregister(UnregisterRequest) -> UnregisterResponse;
        list_groups(ListGroupsRequest) -> ListGroupsResponse;
        list_members(ListMembersRequest) -> ListMembersResponse;
    }
}

fn identity(client_id: u64) -> Identity {
    Identity {
        client_id,
        token: "0".repeat(32),
    }
}

/// A client of `fake`, which serves on a port of its own from now on.
async fn client_of(fake: &Fake) -> Client {
    Client::new([fake.serve().await]).unwrap()
}

/// A fake that answers at once and asks for a heartbeat every `interval_ms`, and a keep-alive
/// for `client_id` on a client of it.
async fn keeping_alive(interval_ms: u32, client_id: u64) -> (Fake, KeepAlive) {
    let fake = Fake::new(Duration::ZERO, interval_ms);
    let alive = client_of(&fake).await.keep_alive(&identity(client_id));
    (fake, alive)
}

/// Asserts that `fake` gets no heartbeat for `quiet` once a beat in flight at a stop or drop
/// has had 100 ms to land.
async fn assert_no_more_heartbeats(fake: &Fake, quiet: Duration, after: &str) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = fake.heartbeats();
    tokio::time::sleep(quiet).await;
    assert_eq!(
        fake.heartbeats(),
        stopped,
        "heartbeats went on after {after}"
    );
}

/// Polls `cond` every 10 ms for up to 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_rpc_timeout_above_six_seconds_is_honoured() {
    let client = client_of(&Fake::new(Duration::from_secs(7), 1000))
        .await
        .with_rpc_timeout(Duration::from_secs(10))
        .unwrap();
    let status = client
        .status()
        .await
        .expect("an answer within the RPC timeout");
    assert_eq!(status.node_id, 7);
}

#[tokio::test]
async fn a_call_ends_at_its_deadline_even_in_the_middle_of_an_attempt() {
    // The default RPC timeout (6 s) is far past the deadline.
    let client = client_of(&Fake::new(Duration::from_secs(7), 1000))
        .await
        .with_deadline(Duration::from_secs(1));
    let started = Instant::now();
    let err = client.status().await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&took),
        "a call with a 1 s deadline took {took:?}"
    );
}

#[tokio::test]
async fn keep_alive_beats_at_the_servers_interval_until_it_is_dropped() {
    let (fake, alive) = keeping_alive(100, 1).await;
    eventually("a first heartbeat", || fake.heartbeats() >= 1).await;
    // Told 100 ms, it beats at least once per interval: ten in a second at the very least,
    // where the client's own default (1 s) would give one or two.
    let from = fake.heartbeats();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let beats = fake.heartbeats() - from;
    assert!(beats >= 10, "{beats} heartbeats in a second at 100 ms");
    assert!(alive.is_running());

    drop(alive);
    assert_no_more_heartbeats(&fake, Duration::from_millis(500), "the guard was dropped").await;
}

#[tokio::test]
async fn keep_alive_stops_by_itself_once_the_server_does_not_know_the_client() {
    let (fake, alive) = keeping_alive(20, 13).await;
    eventually("the keep-alive to stop", || !alive.is_running()).await;
    assert_eq!(fake.heartbeats(), 1, "a refused heartbeat was repeated");
}

#[tokio::test]
async fn a_stopped_keep_alive_sends_nothing_more() {
    let (fake, alive) = keeping_alive(20, 1).await;
    eventually("a first heartbeat", || fake.heartbeats() >= 1).await;
    alive.stop().await;
    assert_no_more_heartbeats(&fake, Duration::from_millis(300), "stop").await;
}

/// The x-admin-token and grpc-timeout headers of one call.
type Headers = (Option<String>, Option<String>);

/// An Admin service that notes the admin token and grpc-timeout each call carried, and takes
/// `delay` over AddMember (a learner catching up).
#[derive(Clone, Default)]
struct FakeAdmin {
    delay: Duration,
    /// The headers of each call, in order.
    seen: Arc<std::sync::Mutex<Vec<Headers>>>,
}

impl FakeAdmin {
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    fn note<T>(&self, req: &Request<T>) {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        self.seen
            .lock()
            .unwrap()
            .push((header("x-admin-token"), header("grpc-timeout")));
    }

    fn seen(&self) -> Vec<Headers> {
        self.seen.lock().unwrap().clone()
    }

    fn listing() -> MembershipResponse {
        MembershipResponse {
            members: Some(AdminListResponse {
                primary: 1,
                membership_index: 3,
                ..Default::default()
            }),
        }
    }
}

#[tonic::async_trait]
impl Admin for FakeAdmin {
    async fn list_members(
        &self,
        req: Request<AdminListRequest>,
    ) -> Result<Response<AdminListResponse>, Status> {
        self.note(&req);
        Ok(Response::new(FakeAdmin::listing().members.unwrap()))
    }
    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.note(&req);
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(FakeAdmin::listing()))
    }
    async fn promote_member(
        &self,
        req: Request<PromoteMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.note(&req);
        Ok(Response::new(FakeAdmin::listing()))
    }
    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.note(&req);
        Err(Status::not_found(format!(
            "node {} is not a member",
            req.get_ref().id
        )))
    }
    async fn transfer_primary(
        &self,
        req: Request<TransferPrimaryRequest>,
    ) -> Result<Response<TransferPrimaryResponse>, Status> {
        self.note(&req);
        Ok(Response::new(TransferPrimaryResponse {
            from: 1,
            to: req.get_ref().to.max(2),
            took_ms: 5,
        }))
    }
    type BackupStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<sequencer_client::pb::BackupChunk, Status>>>;
    async fn backup(
        &self,
        req: Request<sequencer_client::pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        self.note(&req);
        Err(Status::unimplemented("this fake takes no backups"))
    }
}

/// A grpc-timeout header's value, e.g. "119999875u", as a duration.
fn grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("bad grpc-timeout {v}"),
    }
}

#[tokio::test]
async fn admin_calls_carry_the_token_and_their_two_minute_deadline() {
    let fake = FakeAdmin::default();
    let addr = fake.serve().await;
    let plain = Client::new([addr.clone()]).unwrap();
    plain.list_cluster_members().await.unwrap();
    let admin = Client::new([addr.clone()])
        .unwrap()
        .with_admin_token("a-test-admin-token");
    let r = admin
        .add_member(4, "127.0.0.1:9", "127.0.0.1:10", true)
        .await;
    assert_eq!(r.unwrap().members.unwrap().membership_index, 3);
    admin.promote_member(4).await.unwrap();
    let e = admin.remove_member(9, false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert_eq!(admin.transfer_primary(None).await.unwrap().to, 2);

    let seen = fake.seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[0].0, None, "a client without a token sent one");
    for (token, _) in &seen[1..] {
        assert_eq!(token.as_deref(), Some("a-test-admin-token"));
    }
    for (_, timeout) in &seen {
        let t = grpc_timeout(timeout.as_deref().expect("a grpc-timeout"));
        assert!(
            (Duration::from_secs(110)..=Duration::from_secs(120)).contains(&t),
            "{t:?}"
        );
    }

    // A deadline the caller set holds for admin calls too.
    let short = Client::new([addr])
        .unwrap()
        .with_deadline(Duration::from_secs(5));
    short.list_cluster_members().await.unwrap();
    let t = grpc_timeout(fake.seen().last().unwrap().1.as_deref().unwrap());
    assert!(
        t <= Duration::from_secs(5) && t > Duration::from_secs(4),
        "{t:?}"
    );
}

#[tokio::test]
async fn an_admin_call_may_take_longer_than_the_rpc_timeout() {
    let fake = FakeAdmin {
        delay: Duration::from_secs(2),
        ..Default::default()
    };
    // Other calls would be cut off after 1 s; adding a node takes 2.
    let client = Client::new([fake.serve().await])
        .unwrap()
        .with_rpc_timeout(Duration::from_secs(1))
        .unwrap()
        .with_admin_token("t");
    let started = Instant::now();
    client
        .add_member(4, "127.0.0.1:9", "127.0.0.1:10", false)
        .await
        .expect("an answer after 2 s");
    assert!(started.elapsed() >= Duration::from_secs(2));
}
