//! The library against a tonic server in the test that misbehaves on purpose: answers late,
//! counts heartbeats, forgets clients. No cluster, no fixed port.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::pb::cluster_server::{Cluster, ClusterServer};
use sequencer_client::pb::tracker_server::{Tracker, TrackerServer};
use sequencer_client::pb::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
    ListGroupsRequest, ListGroupsResponse, ListMembersRequest, ListMembersResponse,
    RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, UnregisterRequest,
    UnregisterResponse,
};
use sequencer_client::{Client, Identity};
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

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test"))
}

#[tonic::async_trait]
impl Tracker for Fake {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        unused()
    }
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        unused()
    }
    async fn leave(&self, _: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        unused()
    }
    async fn unregister(
        &self,
        _: Request<UnregisterRequest>,
    ) -> Result<Response<UnregisterResponse>, Status> {
        unused()
    }
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
    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        unused()
    }
    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        unused()
    }
}

fn identity(client_id: u64) -> Identity {
    Identity {
        client_id,
        token: "0".repeat(32),
    }
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
    let addr = Fake::new(Duration::from_secs(7), 1000).serve().await;
    let client = Client::new([addr])
        .unwrap()
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
    let addr = Fake::new(Duration::from_secs(7), 1000).serve().await;
    // The default RPC timeout (6 s) is far past the deadline.
    let client = Client::new([addr])
        .unwrap()
        .with_deadline(Duration::from_secs(1));
    let started = Instant::now();
    let err = client.status().await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "a call with a 1 s deadline took {took:?}"
    );
}

#[tokio::test]
async fn keep_alive_beats_at_the_servers_interval_until_it_is_dropped() {
    let fake = Fake::new(Duration::ZERO, 100);
    let client = Client::new([fake.serve().await]).unwrap();
    let alive = client.keep_alive(&identity(1));
    eventually("a first heartbeat", || fake.heartbeats() >= 1).await;
    // Told 100 ms, it beats at least once per interval: ten in a second at the very least,
    // where the client's own default (1 s) would give one or two.
    let from = fake.heartbeats();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let beats = fake.heartbeats() - from;
    assert!(beats >= 10, "{beats} heartbeats in a second at 100 ms");
    assert!(alive.is_running());

    drop(alive);
    // A beat in flight at the drop may still land; after that, none.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_drop = fake.heartbeats();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.heartbeats(),
        after_drop,
        "heartbeats went on after the guard was dropped"
    );
}

#[tokio::test]
async fn keep_alive_stops_by_itself_once_the_server_does_not_know_the_client() {
    let fake = Fake::new(Duration::ZERO, 20);
    let client = Client::new([fake.serve().await]).unwrap();
    let alive = client.keep_alive(&identity(13));
    eventually("the keep-alive to stop", || !alive.is_running()).await;
    assert_eq!(fake.heartbeats(), 1, "a refused heartbeat was repeated");
}

#[tokio::test]
async fn a_stopped_keep_alive_sends_nothing_more() {
    let fake = Fake::new(Duration::ZERO, 20);
    let client = Client::new([fake.serve().await]).unwrap();
    let alive = client.keep_alive(&identity(1));
    eventually("a first heartbeat", || fake.heartbeats() >= 1).await;
    alive.stop().await;
    // As after a drop: one in flight may land, then none.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = fake.heartbeats();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.heartbeats(), stopped, "heartbeats went on after stop");
}
