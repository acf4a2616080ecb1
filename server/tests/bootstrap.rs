//! A new cluster is bootstrapped only when every node of the config starts fresh. Fresh nodes
//! that are only a majority of the config (a replaced disk beside nodes that are down, a
//! config grown from 3 to 5) used to form a new, empty cluster and hand out ids from 1 again.
//! Once the cluster answers, a fresh node that it lists as a voter that ran (its disk was
//! lost) or does not list at all (a grown config) refuses to start, saying what to do.

use std::time::Duration;

use testkit::Cluster;
use tokio::time::Instant;

/// Three nodes, started together, that agree on a primary.
async fn three_nodes() -> Cluster {
    let mut cluster = Cluster::builder(env!("CARGO_BIN_EXE_server"))
        .nodes(3)
        // A node that cannot find a primary says so within this.
        .set("request_timeout_ms", 2000)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    cluster
}

/// A cluster that handed out ids 1..=100 of "default", every node has applied them, and then
/// every node was killed.
async fn stopped_after_100_ids() -> Cluster {
    let mut cluster = three_nodes().await;
    let block = cluster.client().get_ids("default", 100).await.unwrap();
    assert_eq!(block.first, 1);
    // On every node, so whichever survives holds them.
    cluster.wait_current_id("default", 100).await.unwrap();
    // Every node has run as a member: an empty data dir under its id is a lost disk.
    cluster.wait_all_started().await.unwrap();
    cluster.kill_all();
    cluster
}

/// Node `id` refuses its start in one line that names `what` to do.
async fn assert_refused(cluster: &mut Cluster, id: u64, what: &str) {
    let line = cluster.wait_refused(id).await.unwrap();
    assert!(line.contains(what), "node {id}: {line}");
}

/// Waits until node `id` answers Cluster.Status: its listeners are up.
async fn wait_answering(cluster: &Cluster, id: u64) {
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    while cluster.client_for(id).status().await.is_err() {
        assert!(Instant::now() < deadline, "node {id} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every node in `ids` refuses GetId: none of them may hand out an id, since the ids they
/// would start from were handed out before. Given more than an election's time to go wrong.
async fn assert_no_ids_from(cluster: &Cluster, ids: &[u64]) {
    for &id in ids {
        wait_answering(cluster, id).await;
    }
    // Fresh nodes that bootstrap elect a primary in well under a second; request_timeout_ms
    // (2 s) gives them that time while this call waits for one.
    for &id in ids {
        // One try: the node waits request_timeout_ms for a primary and answers.
        let client = cluster
            .client_for(id)
            .with_deadline(Duration::from_millis(2500));
        match client.get_id("default").await {
            Ok(r) => panic!(
                "node {id} handed out id {} from a second cluster\n{}",
                r.id,
                cluster.log_tails()
            ),
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_nodes_of_a_grown_config_never_bootstrap_a_second_cluster() {
    let mut cluster = stopped_after_100_ids().await;
    // config.json grows to 5 servers, and node 3's disk is replaced.
    let added = cluster.add_nodes(2).unwrap();
    assert_eq!(added, vec![4, 5]);
    cluster.wipe(3).unwrap();
    for id in [3, 4, 5] {
        cluster.start_node(id).unwrap();
    }
    assert_no_ids_from(&cluster, &[3, 4, 5]).await;
    // The waiting node says why once, at info.
    let log = cluster.log(3);
    let waits = log
        .matches("bootstraps a new cluster only once every node of the config")
        .count();
    assert_eq!(waits, 1, "{log}");

    // The old members come back: the cluster they hold goes on, above every id handed out.
    cluster.start_node(1).unwrap();
    cluster.start_node(2).unwrap();
    // Node 3 lost its vote with its disk, and nodes 4 and 5 were never added: each refuses,
    // naming the command that fixes it.
    assert_refused(&mut cluster, 3, "--rejoin").await;
    assert_refused(&mut cluster, 4, "--join").await;
    assert_refused(&mut cluster, 5, "--join").await;
    cluster.wait_for_primary_among(&[1, 2]).await.unwrap();
    let next = cluster.client_from(1).get_id("default").await.unwrap().id;
    assert!(next > 100, "id {next} was handed out before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replaced_disks_never_bootstrap_while_the_third_node_is_down() {
    let mut cluster = stopped_after_100_ids().await;
    cluster.wipe(2).unwrap();
    cluster.wipe(3).unwrap();
    cluster.start_node(2).unwrap();
    cluster.start_node(3).unwrap();
    assert_no_ids_from(&cluster, &[2, 3]).await;

    // Node 1 holds the cluster. Nodes 2 and 3 lost their votes: they refuse rather than form
    // a majority with it that lacks what they acknowledged, and node 1 alone hands out
    // nothing (bringing back a cluster that lost its majority is a restore).
    cluster.start_node(1).unwrap();
    assert_refused(&mut cluster, 2, "--rejoin").await;
    assert_refused(&mut cluster, 3, "--rejoin").await;
    assert_no_ids_from(&cluster, &[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_fresh_bootstraps_even_when_they_start_far_apart() {
    // The first start does not need every node at once: the first ones wait for the rest.
    let mut cluster = three_nodes().await;
    cluster.kill_all();
    for id in [1, 2, 3] {
        cluster.wipe(id).unwrap();
    }
    cluster.start_node(1).unwrap();
    cluster.start_node(2).unwrap();
    assert_no_ids_from(&cluster, &[1, 2]).await;
    cluster.start_node(3).unwrap();
    cluster.wait_for_primary().await.unwrap();
    assert_eq!(cluster.client().get_id("default").await.unwrap().id, 1);
}
