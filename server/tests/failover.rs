//! Crashes and restarts of real node processes: a new primary takes over, a restarted node
//! catches up (from a snapshot when its log was purged), and no id is ever handed out twice.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::Client;
use testkit::history::{linearizability_violations, overlaps, Op};
use testkit::Cluster;
use testkit::{health, ServingStatus};
use tonic::Code;

mod common;
use common::primary_and_follower;

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Clients that each start at a different node and move on when it is down.
fn rotating_clients(cluster: &Cluster, n: usize) -> Vec<Arc<Client>> {
    let ids = cluster.ids();
    (0..n)
        .map(|i| Arc::new(cluster.client_from(ids[i % ids.len()])))
        .collect()
}

/// What the load saw: successful operations, and every error a caller got back.
#[derive(Default)]
struct Load {
    ops: Vec<Op>,
    errors: Vec<String>,
}

impl Load {
    /// Fails the test if any caller got an error back `during` the fault.
    fn assert_no_errors(&self, during: &str) {
        assert_eq!(
            self.errors,
            Vec::<String>::new(),
            "callers saw errors {during}"
        );
    }
}

/// GetId in a loop on 6 clients that each start at a different node, until stopped.
struct Running {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Load>>,
}

impl Running {
    /// Starts the load and waits until 200 calls have succeeded.
    async fn start(cluster: &Cluster) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = rotating_clients(cluster, 6)
            .into_iter()
            .map(|c| tokio::spawn(get_ids(c, stop.clone(), done.clone())))
            .collect();
        let running = Running { stop, done, tasks };
        running.wait_for_count(200).await;
        running
    }

    /// Waits until `at_least` calls have succeeded in all.
    async fn wait_for_count(&self, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.done.load(Ordering::Relaxed) < at_least {
            assert!(
                Instant::now() < deadline,
                "workload stalled at {} ops",
                self.done.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `n` more calls have succeeded, then stops the load and gathers it.
    async fn finish_after(self, n: usize) -> Load {
        let before = self.done.load(Ordering::Relaxed);
        self.wait_for_count(before + n).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Load::default();
        for t in self.tasks {
            let load = t.await.unwrap();
            all.ops.extend(load.ops);
            all.errors.extend(load.errors);
        }
        all
    }
}

/// Runs GetId in a loop on `c` until `stop`, counting each success in `done`.
async fn get_ids(c: Arc<Client>, stop: Arc<AtomicBool>, done: Arc<AtomicUsize>) -> Load {
    let mut load = Load::default();
    while !stop.load(Ordering::Relaxed) {
        let invoke = Instant::now();
        match c.get_id("").await {
            Ok(r) => {
                load.ops.push(Op {
                    invoke,
                    complete: Instant::now(),
                    first: r.id,
                    count: 1,
                });
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => load.errors.push(e.to_string()),
        }
    }
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_primary_elects_a_new_one_and_no_id_repeats() {
    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    let old = cluster.wait_for_primary().await.unwrap();
    let load = Running::start(&cluster).await;

    cluster.kill(old);
    let killed_at = Instant::now();
    let new = cluster.wait_for_primary().await.unwrap();
    assert_ne!(new, old);
    let load = load.finish_after(200).await;

    // One failover is well within a client's retry deadline: no caller may see an error.
    load.assert_no_errors("across the failover");
    let ops = load.ops;
    assert!(
        ops.iter().any(|o| o.invoke > killed_at),
        "no id was served after the crash"
    );
    assert_eq!(
        overlaps(&ops),
        vec![],
        "an id was handed out twice across the failover"
    );
    assert!(
        linearizability_violations(&ops).is_empty(),
        "real-time order violated across the failover"
    );

    // The old primary comes back as a follower and catches up with everything.
    cluster.start_node(old).unwrap();
    assert_eq!(cluster.wait_for_primary().await.unwrap(), new);
    let current = cluster.client_for(new).current_id("").await.unwrap().id;
    assert!(current >= ops.iter().map(|o| o.first).max().unwrap());
    cluster.wait_current_id("default", current).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_discovers_the_primary_and_follows_it_after_a_failover() {
    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    // Start the client at a follower: discovery must move it to the primary.
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    let client = cluster.client_from(follower);
    assert_eq!(
        client.discover_primary().await.unwrap(),
        Some(primary as u32)
    );
    let r = client.get_id("").await.unwrap();
    assert_eq!((r.served_by, r.primary), (primary as u32, primary as u32));

    cluster.kill(primary);
    let new = cluster.wait_for_primary().await.unwrap() as u32;
    // The first call after the crash lands on a survivor, whose answer names the new primary.
    let r = client.get_id("").await.unwrap();
    assert_eq!(r.primary, new);
    let r = client.get_id("").await.unwrap();
    assert_eq!(
        r.served_by, new,
        "the client did not follow the new primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_stopped_with_sigterm_under_load_leaves_quietly() {
    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    let term = cluster.client_for(primary).status().await.unwrap().term;
    // Load through the follower too, so it has forwarded requests in flight when it stops.
    let load = Running::start(&cluster).await;

    let status = cluster.signal_and_wait(follower, libc::SIGTERM).unwrap();
    assert!(status.success(), "node exited with {status}");
    let load = load.finish_after(100).await;
    load.assert_no_errors("while a follower stopped");
    assert_eq!(overlaps(&load.ops), vec![]);

    // It stopped Raft before its peer listener, so it never started an election on its way
    // out: back again, it rejoins the same primary in the same term.
    cluster.start_node(follower).unwrap();
    assert_eq!(cluster.wait_for_primary().await.unwrap(), primary);
    for id in cluster.ids() {
        assert_eq!(
            cluster.client_for(id).status().await.unwrap().term,
            term,
            "node {id} moved to a new term"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_killed_and_restarted_never_reissues_an_id() {
    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let mut highest = 0;
    for id in cluster.ids() {
        let c = cluster.client_for(id);
        for _ in 0..10 {
            highest = highest.max(c.get_id("").await.unwrap().id);
        }
        let block = c.get_ids("", 1000).await.unwrap();
        highest = highest.max(block.first + u64::from(block.count) - 1);
    }

    // Power loss: only what was fsynced survives.
    cluster.kill_all();
    for id in cluster.ids() {
        cluster.start_node(id).unwrap();
    }
    cluster.wait_for_primary().await.unwrap();
    for id in cluster.ids() {
        let next = cluster.client_for(id).get_id("").await.unwrap().id;
        assert!(
            next > highest,
            "id {next} after restart is not above {highest}"
        );
        highest = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_catches_up_from_a_snapshot_after_the_log_is_purged() {
    let mut cluster = Cluster::builder(SERVER)
        .steady()
        .set("snapshot_logs", 20)
        .set("logs_to_keep", 5)
        .start()
        .unwrap();
    let (primary, lagging) = primary_and_follower(&mut cluster).await;
    // Quiet: no node's log goes past what the primary has committed.
    let held = cluster
        .client_for(primary)
        .status()
        .await
        .unwrap()
        .commit_index;
    cluster.kill(lagging);

    // Sequential calls: one log entry each, so the log passes several snapshot points.
    let c = cluster.client_for(primary);
    for expected in 1..=150 {
        assert_eq!(c.get_id("").await.unwrap().id, expected);
    }
    // A snapshot past what the lagging node holds plus the 5 entries kept after a snapshot:
    // what it lacks is in no log any more.
    cluster.wait_snapshot(primary, held + 5 + 1).await.unwrap();

    cluster.start_node(lagging).unwrap();
    cluster.wait_current_id("default", 150).await.unwrap();
    cluster.assert_installed_from(lagging, primary);

    // Every node restarts from its own snapshot plus the log after it.
    cluster.kill_all();
    for id in cluster.ids() {
        cluster.start_node(id).unwrap();
    }
    cluster.wait_for_primary().await.unwrap();
    assert_eq!(cluster.client().get_id("").await.unwrap().id, 151);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_requests_fail_with_unavailable_and_health_says_not_serving() {
    let mut cluster = Cluster::builder(SERVER)
        .set("request_timeout_ms", 1000)
        .start()
        .unwrap();
    let (primary, survivor) = primary_and_follower(&mut cluster).await;
    assert_eq!(
        health(&cluster.node(survivor).addr).await,
        Some(ServingStatus::Serving)
    );

    for id in cluster.ids().into_iter().filter(|&id| id != survivor) {
        cluster.kill(id);
    }
    // Concurrent callers queue behind one failing batch; each still gets UNAVAILABLE from the
    // server within request_timeout_ms of arriving. The client gives a call 1.5 x that: one
    // attempt, as the time left after it is less than it took, and a call the server did not
    // answer in time fails with DEADLINE_EXCEEDED.
    let lone = cluster
        .client_for(survivor)
        .with_deadline(Duration::from_millis(1500))
        .with_rpc_timeout(Duration::from_millis(1500))
        .unwrap();
    let lone = Arc::new(lone);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let lone = lone.clone();
            tokio::spawn(async move { lone.get_id("").await })
        })
        .collect();
    for call in calls {
        let err = call
            .await
            .unwrap()
            .expect_err("a lone node must not hand out ids");
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    }

    // With its primary gone and no quorum to elect another, the node reports NOT_SERVING.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&cluster.node(survivor).addr).await != Some(ServingStatus::NotServing) {
        assert!(
            Instant::now() < deadline,
            "node still SERVING without a primary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A second node back makes a majority again.
    cluster.start_node(primary).unwrap();
    cluster.wait_for_primary().await.unwrap();
    assert!(cluster.client_for(survivor).get_id("").await.is_ok());
}
