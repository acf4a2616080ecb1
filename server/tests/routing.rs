//! The one route to the primary (server/src/write/primary.rs): every call that must reach the
//! primary retries alike, and answers within its deadline, whatever the primary does.

use std::time::{Duration, Instant};

use sequencer_proto::v1::messenger_client::MessengerClient;
use sequencer_proto::v1::sequencer_client::SequencerClient;
use sequencer_proto::v1::tracker_client::TrackerClient;
use sequencer_proto::v1::{
    GetIdRequest, GetIdResponse, HeartbeatRequest, RegisterResponse, SubscribeRequest,
};
use testkit::Cluster;
use tonic::Status;

mod common;
use common::{allocate, message, peer_client};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// A started 3-node cluster with `settings`, its primary, and the two followers.
async fn three_nodes(
    builder: testkit::Builder,
    settings: &[(&str, u64)],
) -> (Cluster, u64, [u64; 2]) {
    let builder = settings
        .iter()
        .fold(builder.nodes(3), |b, (key, value)| b.set(key, *value));
    let mut cluster = builder.start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != primary)
        .collect();
    (cluster, primary, [followers[0], followers[1]])
}

/// The public services of one node, called straight (no client-side retry).
struct Raw {
    ids: SequencerClient<tonic::transport::Channel>,
    tracker: TrackerClient<tonic::transport::Channel>,
    messenger: MessengerClient<tonic::transport::Channel>,
}

impl Raw {
    async fn connect(cluster: &Cluster, id: u64) -> Self {
        let addr = format!("http://{}", cluster.node(id).addr);
        Self {
            ids: SequencerClient::connect(addr.clone()).await.unwrap(),
            tracker: TrackerClient::connect(addr.clone()).await.unwrap(),
            messenger: MessengerClient::connect(addr).await.unwrap(),
        }
    }

    /// One GetId of "default": its answer, and how long the server took to give it.
    async fn get_id(&mut self) -> (Result<GetIdResponse, Status>, Duration) {
        let started = Instant::now();
        let req = GetIdRequest {
            sequence: "default".into(),
        };
        let res = self.ids.get_id(req).await.map(|r| r.into_inner());
        (res, started.elapsed())
    }

    async fn heartbeat(&mut self, client_id: u64, token: &str) -> (Result<(), Status>, Duration) {
        let started = Instant::now();
        let token = token.to_string();
        let res = self
            .tracker
            .heartbeat(HeartbeatRequest { client_id, token })
            .await;
        (res.map(|_| ()), started.elapsed())
    }

    async fn subscribe(
        &mut self,
        client_id: u64,
        token: &str,
        group: &str,
    ) -> (Result<(), Status>, Duration) {
        let started = Instant::now();
        let (token, group) = (token.to_string(), group.to_string());
        let req = SubscribeRequest {
            client_id,
            token,
            group,
            from_seq: 0,
        };
        let res = self.messenger.subscribe(req).await;
        (res.map(|_| ()), started.elapsed())
    }
}

/// A client registered through node `id`, and two raw connections to `id` for calls made
/// side by side.
async fn registered_at(cluster: &Cluster, id: u64, name: &str) -> (RegisterResponse, Raw, Raw) {
    let reg = cluster.client_for(id).register(name).await.unwrap();
    let raw = (
        Raw::connect(cluster, id).await,
        Raw::connect(cluster, id).await,
    );
    (reg, raw.0, raw.1)
}

/// Time enough for an election; a heartbeat's deadline is the smaller of request_timeout_ms
/// and half the client interval, so the interval is raised too.
const PATIENT: [(&str, u64); 2] = [
    ("request_timeout_ms", 10_000),
    ("client_heartbeat_interval_ms", 20_000),
];

fn code<T>(res: &Result<T, Status>) -> tonic::Code {
    res.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok)
}

/// Rewrites node `id`'s config without node `missing`, as a stale config.json would be.
fn drop_from_config(cluster: &Cluster, id: u64, missing: u64) {
    let path = cluster.dir().join(format!("config-{id}.json"));
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let nodes = config["nodes"].as_array_mut().unwrap();
    nodes.retain(|n| n["id"].as_u64() != Some(missing));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// The membership is the truth after bootstrap: a node whose config.json does not list the
/// primary (a stale config) reaches it at the address the membership carries. Before, the
/// primary was "not among this node's peers" and every call through that node failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_config_lacks_the_primary_reaches_it_at_the_membership_address() {
    let settings = [("request_timeout_ms", 3000)];
    let (mut cluster, primary, [follower, _]) =
        three_nodes(Cluster::builder(SERVER), &settings).await;
    cluster
        .wait_log(primary, "wrote members' addresses into the membership")
        .await
        .unwrap();
    let client = cluster.client_for(primary);
    let me = sequencer_client::Identity::from(&client.register("watcher").await.unwrap());
    cluster.kill(follower);
    drop_from_config(&cluster, follower, primary);
    cluster.start_node(follower).unwrap();
    assert_eq!(cluster.wait_for_primary().await.unwrap(), primary);

    let (res, _) = Raw::connect(&cluster, follower).await.get_id().await;
    let answered = res.expect("GetId through the node whose config lacks the primary");
    assert_eq!(answered.primary as u64, primary);
    cluster
        .client_for(follower)
        .heartbeat(&me)
        .await
        .expect("a heartbeat through it");
}

/// Generous: a loaded machine, but far below two request timeouts.
const MARGIN: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answers_within_request_timeout_when_the_primary_is_frozen() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let settings = [("request_timeout_ms", TIMEOUT.as_millis() as u64)];
    let (cluster, primary, [asked, frozen]) =
        three_nodes(Cluster::builder(SERVER), &settings).await;
    // The primary and one follower frozen: no quorum anywhere, and a primary that never
    // answers.
    cluster.signal(primary, libc::SIGSTOP).unwrap();
    cluster.signal(frozen, libc::SIGSTOP).unwrap();
    let (res, took) = Raw::connect(&cluster, asked).await.get_id().await;
    cluster.signal(primary, libc::SIGCONT).unwrap();
    cluster.signal(frozen, libc::SIGCONT).unwrap();
    assert_eq!(code(&res), tonic::Code::Unavailable);
    assert!(took < TIMEOUT + MARGIN, "answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answers_within_request_timeout_when_the_primary_is_cut_off() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let settings = [("request_timeout_ms", TIMEOUT.as_millis() as u64)];
    let (cluster, primary, [follower, _]) =
        three_nodes(Cluster::builder(SERVER).with_proxies(), &settings).await;
    cluster.isolate(primary);
    // Asked of the cut-off primary itself, which cannot commit, and of a follower, which
    // forwards into the cut until the others elect a new primary.
    for id in [primary, follower] {
        let (res, took) = Raw::connect(&cluster, id).await.get_id().await;
        let code = code(&res);
        assert!(
            code == tonic::Code::Unavailable || code == tonic::Code::Ok,
            "node {id}: {code:?}"
        );
        assert!(took < TIMEOUT + MARGIN, "node {id} answered after {took:?}");
    }
    cluster.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_propose_whose_deadline_has_passed_is_never_proposed() {
    let mut cluster = Cluster::builder(SERVER).nodes(3).start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let client = cluster.client_for(primary);
    let first = client.get_id("default").await.unwrap().id;

    // A Propose as a follower forwards it, but with a caller's deadline already spent: the
    // primary must not put it into Raft, where it would commit after its caller gave up.
    let mut peer = peer_client(&cluster.node(primary).peer_addr).await;
    let mut req = message(&allocate(1000), cluster.cluster_secret());
    req.set_timeout(Duration::from_millis(1));
    let _ = peer.propose(req).await;

    // Anything the Propose put into Raft is ordered before this request.
    let next = client.get_id("default").await.unwrap().id;
    assert_eq!(next, first + 1, "the expired Propose took ids");
}

/// With no primary to be had, a GetId (a command), a Heartbeat and a Subscribe that needs a
/// read barrier all give up the same way: UNAVAILABLE at their deadline, neither sooner nor
/// much later, naming the timeout they ran by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_to_the_primary_gives_up_alike_at_its_deadline() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let settings = [
        ("request_timeout_ms", TIMEOUT.as_millis() as u64),
        // A heartbeat's deadline is the smaller of request_timeout_ms and half the interval.
        (
            "client_heartbeat_interval_ms",
            4 * TIMEOUT.as_millis() as u64,
        ),
    ];
    let (mut cluster, primary, [survivor, other]) =
        three_nodes(Cluster::builder(SERVER), &settings).await;
    let reg = cluster
        .client_for(survivor)
        .register("stranded")
        .await
        .unwrap();
    // The survivor alone: it campaigns and never wins, so it never knows a primary.
    cluster.kill(primary);
    cluster.kill(other);

    let mut raw = Raw::connect(&cluster, survivor).await;
    let (get_id, took_get_id) = raw.get_id().await;
    let heartbeat = raw.heartbeat(reg.client_id, &reg.token).await;
    // Not a member of "g": the node must ask the primary whether a Join it has not applied
    // yet was committed, which is a read barrier.
    let subscribe = raw.subscribe(reg.client_id, &reg.token, "g").await;
    for (name, (res, took)) in [
        ("GetId", (get_id.map(|_| ()), took_get_id)),
        ("Heartbeat", heartbeat),
        ("Subscribe", subscribe),
    ] {
        let err = res.expect_err(name);
        assert_eq!(err.code(), tonic::Code::Unavailable, "{name}: {err}");
        assert!(
            err.message().contains("no primary elected")
                && err.message().contains("request_timeout_ms"),
            "{name}: {err}"
        );
        // No early shortcut: it used the whole deadline, bar one retry pause.
        assert!(
            took >= TIMEOUT - Duration::from_millis(60),
            "{name} gave up after {took:?}"
        );
        assert!(took < TIMEOUT + MARGIN, "{name} answered after {took:?}");
    }
}

/// A call forwarded to a primary that freezes is dropped as soon as the node sees a new
/// primary, and answered by the new one: not held until the forward's own cap (the longest
/// election timeout, 3 s here) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_to_a_primary_that_is_replaced_moves_to_the_new_primary() {
    let settings = [
        ("election_timeout_min_ms", 300),
        ("election_timeout_max_ms", 3000),
        PATIENT[0],
        PATIENT[1],
    ];
    let (cluster, primary, [follower, _]) = three_nodes(Cluster::builder(SERVER), &settings).await;
    let (reg, mut raw, mut raw2) = registered_at(&cluster, follower, "mover").await;

    cluster.signal(primary, libc::SIGSTOP).unwrap();
    let frozen_at = Instant::now();
    // When the asked node first names another primary.
    let moved = async {
        let status = cluster.client_for(follower);
        loop {
            if let Ok(s) = status.status().await {
                if s.primary != 0 && s.primary as u64 != primary {
                    return frozen_at.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((get_id, took_get_id), (heartbeat, took_heartbeat), moved) = tokio::join!(
        raw.get_id(),
        raw2.heartbeat(reg.client_id, &reg.token),
        moved
    );
    cluster.signal(primary, libc::SIGCONT).unwrap();

    let answered = get_id.expect("GetId through the new primary");
    assert_ne!(
        answered.primary as u64, primary,
        "ordered by the frozen one"
    );
    heartbeat.expect("Heartbeat through the new primary");
    for (name, took) in [("GetId", took_get_id), ("Heartbeat", took_heartbeat)] {
        assert!(
            took < moved + MARGIN,
            "{name} answered {took:?} after the freeze, the new primary was seen after {moved:?}"
        );
    }
}

/// A forward to a primary that has died fails to connect until the others elect a new one;
/// that peer error is worth another try on every route, never a final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_to_a_primary_that_died_is_retried_until_a_new_one_answers() {
    let (mut cluster, primary, [follower, _]) =
        three_nodes(Cluster::builder(SERVER), &PATIENT).await;
    let (reg, mut raw, mut raw2) = registered_at(&cluster, follower, "survivor").await;
    // Until its election timeout the follower still names the dead node, so both calls are
    // first forwarded to a port nobody listens on.
    cluster.kill(primary);
    let ((get_id, _), (heartbeat, _)) =
        tokio::join!(raw.get_id(), raw2.heartbeat(reg.client_id, &reg.token));
    let answered = get_id.expect("GetId answered by the new primary");
    assert_ne!(answered.primary as u64, primary);
    heartbeat.expect("Heartbeat answered by the new primary");
}
