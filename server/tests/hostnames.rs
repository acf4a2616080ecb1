//! Nodes addressed by host name, as containers and real deployments name them: the config
//! takes `host:port`, and names are resolved when binding and connecting.

use testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_addressed_by_host_name_form_a_cluster_and_serve() {
    let mut cluster = Cluster::builder(env!("CARGO_BIN_EXE_server"))
        .nodes(3)
        .host("localhost")
        .start()
        .unwrap();
    assert!(cluster.node(1).addr.starts_with("localhost:"));
    cluster.wait_for_primary().await.unwrap();
    // Through a follower: forwarding resolves the primary's peer address by name.
    let primary = cluster.wait_for_primary().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    assert_eq!(
        cluster
            .client_for(follower)
            .get_id("default")
            .await
            .unwrap()
            .id,
        1
    );
}
