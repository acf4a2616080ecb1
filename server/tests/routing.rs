//! The one route to the primary (server/src/write/primary.rs): every call that must reach the
//! primary retries alike, and answers within its deadline, whatever the primary does.

use std::time::{Duration, Instant};

use sequencer_proto::v1::sequencer_client::SequencerClient;
use sequencer_proto::v1::GetIdRequest;
use testkit::Cluster;

mod common;
use common::{allocate, message, peer_client};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// One GetId straight to `addr` (no client-side retry): its status code and how long the
/// server took to answer.
async fn get_id_once(addr: &str) -> (tonic::Code, Duration) {
    let mut client = SequencerClient::connect(format!("http://{addr}"))
        .await
        .expect("the node listens");
    let started = Instant::now();
    let res = client
        .get_id(GetIdRequest {
            sequence: "default".into(),
        })
        .await;
    let code = match res {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    (code, started.elapsed())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_missing_from_a_nodes_config_is_retried_until_the_deadline_not_an_internal_error()
{
    let mut cluster = Cluster::builder(SERVER)
        .nodes(3)
        .set("request_timeout_ms", 1000)
        .start()
        .unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    // The follower comes back with a config that does not list the primary: it still hears
    // the primary (which dials it) but has no client for it.
    let client = cluster.client_for(primary);
    let me = sequencer_client::Identity::from(&client.register("watcher").await.unwrap());
    cluster.kill(follower);
    drop_from_config(&cluster, follower, primary);
    cluster.start_node(follower).unwrap();
    assert_eq!(cluster.wait_for_primary().await.unwrap(), primary);

    let (code, _) = get_id_once(&cluster.node(follower).addr).await;
    assert_eq!(
        code,
        tonic::Code::Unavailable,
        "GetId through node {follower}"
    );
    let heartbeat = cluster
        .client_for(follower)
        .with_deadline(Duration::from_secs(3))
        .heartbeat(&me)
        .await
        .unwrap_err();
    assert_eq!(heartbeat.code(), tonic::Code::Unavailable, "{heartbeat}");
    assert!(
        heartbeat
            .to_string()
            .contains("not among this node's peers"),
        "{heartbeat}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answers_within_request_timeout_when_the_primary_is_frozen() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let mut cluster = Cluster::builder(SERVER)
        .nodes(3)
        .set("request_timeout_ms", TIMEOUT.as_millis() as u64)
        .start()
        .unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let mut followers = cluster.ids().into_iter().filter(|id| *id != primary);
    let (asked, frozen) = (followers.next().unwrap(), followers.next().unwrap());
    // The primary and one follower frozen: no quorum anywhere, and a primary that never
    // answers.
    cluster.signal(primary, libc::SIGSTOP).unwrap();
    cluster.signal(frozen, libc::SIGSTOP).unwrap();
    let (code, took) = get_id_once(&cluster.node(asked).addr).await;
    cluster.signal(primary, libc::SIGCONT).unwrap();
    cluster.signal(frozen, libc::SIGCONT).unwrap();
    assert_eq!(code, tonic::Code::Unavailable);
    // Generous: a loaded machine, but far below two request timeouts.
    assert!(
        took < TIMEOUT + Duration::from_millis(1000),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answers_within_request_timeout_when_the_primary_is_cut_off() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let mut cluster = Cluster::builder(SERVER)
        .nodes(3)
        .with_proxies()
        .set("request_timeout_ms", TIMEOUT.as_millis() as u64)
        .start()
        .unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    cluster.isolate(primary);
    // Asked of the cut-off primary itself, which cannot commit, and of a follower, which
    // forwards into the cut until the others elect a new primary.
    let follower = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    for id in [primary, follower] {
        let (code, took) = get_id_once(&cluster.node(id).addr).await;
        assert!(
            code == tonic::Code::Unavailable || code == tonic::Code::Ok,
            "node {id}: {code:?}"
        );
        assert!(
            took < TIMEOUT + Duration::from_millis(1000),
            "node {id} answered after {took:?}"
        );
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
