//! Who may talk to a node: peer RPCs must carry the cluster secret, and a stranger's RPC is
//! refused before it is decoded, so it changes nothing.

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use sequencer_proto::peer::PingRequest;
use sequencer_server::raft::TypeConfig;
use testkit::Cluster;
use tonic::{Code, Request};

mod common;
use common::{allocate, message, peer_client};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

fn refused<T: std::fmt::Debug>(rpc: &str, res: Result<T, tonic::Status>) {
    match res {
        Err(s) if s.code() == Code::Unauthenticated => {}
        other => panic!("{rpc}: expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_rpcs_without_the_cluster_secret_are_refused_and_change_nothing() {
    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    cluster.client().get_id("").await.unwrap();
    let on_primary = cluster.client_for(primary);
    let before = on_primary.status().await.unwrap();
    let first = on_primary.current_id("").await.unwrap().id;

    // Valid messages: with the secret, each would take effect (the last step proves it for
    // Propose), so only the gate can refuse them.
    let allocate = allocate(1000);
    let other = cluster.ids().into_iter().find(|&id| id != primary).unwrap();
    let higher = before.term + 100;
    let vote =
        serde_json::to_vec(&VoteRequest::<u64>::new(Vote::new(higher, other), None)).unwrap();
    let append = serde_json::to_vec(&AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(higher, other),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    })
    .unwrap();

    for id in cluster.ids() {
        let mut peer = peer_client(&cluster.node(id).peer_addr).await;
        for secret in [None, Some("not-the-cluster-secret-at-all")] {
            refused("Propose", peer.propose(message(&allocate, secret)).await);
            refused("Vote", peer.vote(message(&vote, secret)).await);
            let append = message(&append, secret).map(|m| tokio_stream::iter(vec![m]));
            refused(
                "AppendEntriesStream",
                peer.append_entries_stream(append).await,
            );
            refused(
                "InstallSnapshot",
                peer.install_snapshot(message(b"{}", secret)).await,
            );
            refused("Heartbeat", peer.heartbeat(message(b"{}", secret)).await);
            refused("ReadIndex", peer.read_index(message(b"null", secret)).await);
            let mut ping = Request::new(PingRequest {});
            if let Some(s) = secret {
                ping.metadata_mut()
                    .insert("x-cluster-secret", s.parse().unwrap());
            }
            refused("Ping", peer.ping(ping).await);
        }
    }

    let after = on_primary.status().await.unwrap();
    assert_eq!(
        after.term, before.term,
        "a stranger's Vote or AppendEntries moved the term"
    );
    assert_eq!(after.primary, before.primary);
    assert_eq!(
        on_primary.current_id("").await.unwrap().id,
        first,
        "a stranger allocated ids"
    );

    // The control: the same Propose with the secret commits.
    let mut peer = peer_client(&cluster.node(primary).peer_addr).await;
    peer.propose(message(&allocate, cluster.cluster_secret()))
        .await
        .expect("the secret's holder is let in");
    assert_eq!(on_primary.current_id("").await.unwrap().id, first + 1000);
}
