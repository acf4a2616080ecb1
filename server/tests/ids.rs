//! The id service on a healthy 3-node cluster of real `server` processes: uniqueness, density,
//! real-time order, agreement between nodes, and a clear error for every bad input.

use std::sync::Arc;
use std::time::Instant;

use sequencer_client::{Client, ClientError};
use testkit::history::{gaps, linearizability_violations, overlaps, Op};
use testkit::{assert_code, Cluster};
use tonic::Code;

mod common;
use common::{primary_and_follower, NAME_PATTERN};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

async fn started(builder: testkit::Builder) -> Cluster {
    let mut cluster = builder.steady().start().expect("cluster starts");
    cluster.wait_for_primary().await.expect("primary elected");
    cluster
}

/// Runs `per_task` sequential calls of `alloc` in `tasks_per_node` tasks on every node.
async fn workload<F, Fut>(
    cluster: &Cluster,
    tasks_per_node: usize,
    per_task: usize,
    alloc: F,
) -> Vec<Op>
where
    F: Fn(Arc<Client>, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(u64, u64), ClientError>> + Send,
{
    let mut handles = Vec::new();
    for id in cluster.ids() {
        let client = Arc::new(cluster.client_for(id));
        for t in 0..tasks_per_node {
            let (client, alloc) = (client.clone(), alloc.clone());
            handles.push(tokio::spawn(async move {
                let mut ops = Vec::new();
                for i in 0..per_task {
                    let invoke = Instant::now();
                    let (first, count) = alloc(client.clone(), t * per_task + i)
                        .await
                        .expect("allocation succeeds");
                    ops.push(Op {
                        invoke,
                        complete: Instant::now(),
                        first,
                        count,
                    });
                }
                ops
            }));
        }
    }
    let mut all = Vec::new();
    for h in handles {
        let ops = h.await.expect("task");
        // Each task is sequential, so its own ids must rise.
        assert!(
            ops.windows(2).all(|w| w[0].first < w[1].first),
            "a client saw ids go down: {ops:?}"
        );
        all.extend(ops);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_get_id_on_every_node_is_unique_dense_and_in_real_time_order() {
    let mut cluster = started(Cluster::builder(SERVER)).await;
    let ops = workload(&cluster, 4, 40, |c, _| async move {
        c.get_id("").await.map(|r| (r.id, 1))
    })
    .await;
    assert_eq!(ops.len(), 3 * 4 * 40);
    assert_eq!(overlaps(&ops), vec![], "an id was handed out twice");
    assert_eq!(gaps(&ops), vec![], "ids are not dense from 1");
    assert_eq!(ops.iter().map(|o| o.last()).max(), Some(480));
    assert!(
        linearizability_violations(&ops).is_empty(),
        "real-time order violated"
    );

    // Every node applies every entry, so all converge on the same current id.
    cluster
        .wait_current_id("default", 480)
        .await
        .expect("nodes agree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_ids_blocks_never_overlap_and_stay_dense() {
    let cluster = started(Cluster::builder(SERVER)).await;
    let ops = workload(&cluster, 3, 20, |c, i| async move {
        // A mix of single ids and blocks of varying size on one sequence.
        let count = [1u32, 7, 1000, 1, 250][i % 5];
        if count == 1 {
            c.get_id("blocks").await.map(|r| (r.id, 1))
        } else {
            c.get_ids("blocks", count).await.map(|r| {
                assert_eq!(r.count, count);
                (r.first, u64::from(r.count))
            })
        }
    })
    .await;
    assert_eq!(overlaps(&ops), vec![], "blocks overlap");
    assert_eq!(gaps(&ops), vec![], "blocks leave gaps");
    assert!(
        linearizability_violations(&ops).is_empty(),
        "real-time order violated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_are_independent_and_start_at_one() {
    let cluster = started(Cluster::builder(SERVER)).await;
    let c = cluster.client();
    assert_eq!(c.get_id("orders").await.unwrap().id, 1);
    assert_eq!(c.get_id("orders").await.unwrap().id, 2);
    assert_eq!(c.get_id("users").await.unwrap().id, 1);
    assert_eq!(c.get_ids("users", 10).await.unwrap().first, 2);
    assert_eq!(c.get_id("users").await.unwrap().id, 12);
    // The empty name is the sequence called "default".
    assert_eq!(c.get_id("").await.unwrap().id, 1);
    assert_eq!(c.get_id("default").await.unwrap().id, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let mut cluster = Cluster::builder(SERVER)
        .steady()
        .set("max_batch", 100)
        .set("max_sequences", 2)
        .start()
        .unwrap();
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    // Ask the primary and a follower alone, so no retry elsewhere hides an error.
    for id in [primary, follower] {
        let c = cluster.client_for(id);
        assert_code(c.get_ids("a", 0).await, Code::InvalidArgument, "max_batch");
        assert_code(
            c.get_ids("a", 101).await,
            Code::InvalidArgument,
            "100 (max_batch)",
        );
        for name in ["bad name", &"x".repeat(65), "é"] {
            assert_code(c.get_id(name).await, Code::InvalidArgument, NAME_PATTERN);
        }
        assert_code(
            c.current_id("no/slash").await,
            Code::InvalidArgument,
            NAME_PATTERN,
        );
    }
    let c = cluster.client();
    assert_eq!(c.get_ids("a", 100).await.unwrap().first, 1);
    assert_eq!(c.get_id("b").await.unwrap().id, 1);
    for id in [primary, follower] {
        assert_code(
            cluster.client_for(id).get_id("c").await,
            Code::ResourceExhausted,
            "max_sequences",
        );
    }
    // Nothing above changed state: "a" continues at 101, "c" does not exist.
    assert_eq!(c.get_id("a").await.unwrap().id, 101);
    cluster.wait_current_id("a", 101).await.unwrap();
    cluster.wait_current_id("c", 0).await.unwrap();
}
