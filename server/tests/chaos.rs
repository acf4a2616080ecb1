//! The fault-injection suite: each scenario runs the chaos workload (ids, group messages, a
//! subscriber per node) against 3 real node processes while it injects one kind of fault, then
//! checks the recorded history and prints one summary line. CHAOS_SECONDS (default 4) sets how
//! long each scenario keeps injecting faults.

use std::io::Write;
use std::time::{Duration, Instant};

use testkit::chaos::{check, History, Workload};
use testkit::Cluster;

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Scenarios run one at a time: on 2 cores, overlapping ones would distort the figures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chaos_time() -> Duration {
    let secs = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    Duration::from_secs(secs)
}

/// Lets the workload run between two faults.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

async fn cluster(proxies: bool) -> Cluster {
    let mut b = Cluster::builder(SERVER);
    if proxies {
        b = b.with_proxies();
    }
    let mut c = b.start().unwrap();
    c.wait_for_primary().await.unwrap();
    c
}

/// Checks the history, prints the summary line (past the test harness's capture), and fails
/// the test on any safety violation.
async fn verdict(name: &str, cluster: &mut Cluster, h: History) {
    let report = check(&h);
    // The final state has allocated at least every id handed out.
    cluster.wait_for_primary().await.unwrap();
    let highest = h
        .ids
        .iter()
        .filter(|o| o.first > 0)
        .map(|o| o.first + o.count - 1)
        .max()
        .unwrap_or(0);
    let current = cluster.client().current_id("").await.unwrap();
    let line = report.line(name);
    if let Ok(dir) = std::env::var("CHAOS_LOG_DIR") {
        for id in cluster.ids() {
            let _ = std::fs::write(format!("{dir}/{name}-node-{id}.log"), cluster.log(id));
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{line}\n  per fault (ms): recovery {:?}, longest gap {:?}",
        report.recovery_ms,
        report.windows_ms
    );
    assert!(report.is_safe(), "{line}\n{}", report.details.join("\n"));
    assert!(report.ok > 0, "{line}: nothing succeeded");
    let primary = cluster.wait_for_primary().await.unwrap();
    let on_primary = cluster.client_for(primary).current_id("").await.unwrap().id;
    assert!(
        on_primary.max(current.id) >= highest,
        "{line}: id {highest} was handed out above the final state {on_primary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_primary() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(false).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(700)).await;
        let p = cluster.wait_for_primary().await.unwrap();
        w.fault();
        cluster.kill(p);
        cluster.wait_for_primary().await.unwrap();
        cluster.start_node(p).unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("kill-primary", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_follower() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(false).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(700)).await;
        let p = cluster.wait_for_primary().await.unwrap();
        let f = cluster.ids().into_iter().find(|&id| id != p).unwrap();
        w.fault();
        cluster.kill(f);
        run_for(Duration::from_millis(500)).await;
        cluster.start_node(f).unwrap();
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("kill-follower", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_all() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(false).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(1000)).await;
        w.fault();
        cluster.kill_all();
        for id in cluster.ids() {
            cluster.start_node(id).unwrap();
        }
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    // Power loss once more: the next id is above every id ever acknowledged.
    cluster.kill_all();
    for id in cluster.ids() {
        cluster.start_node(id).unwrap();
    }
    cluster.wait_for_primary().await.unwrap();
    let acked = h
        .ids
        .iter()
        .filter(|o| o.first > 0)
        .map(|o| o.first + o.count - 1)
        .max()
        .unwrap_or(0);
    let next = cluster.client().get_id("").await.unwrap().id;
    assert!(
        next > acked,
        "after a restart of every node, id {next} is not above {acked}"
    );
    verdict("kill-all", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_primary() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(false).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(700)).await;
        let p = cluster.wait_for_primary().await.unwrap();
        let others: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != p).collect();
        w.fault();
        cluster.signal(p, libc::SIGSTOP).unwrap();
        // Paused past an election: the others choose a new primary meanwhile.
        cluster.wait_for_primary_among(&others).await.unwrap();
        cluster.signal(p, libc::SIGCONT).unwrap();
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("pause-primary", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_primary() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(true).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(700)).await;
        let p = cluster.wait_for_primary().await.unwrap();
        let others: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != p).collect();
        w.fault();
        cluster.isolate(p);
        cluster.wait_for_primary_among(&others).await.unwrap();
        run_for(Duration::from_millis(300)).await;
        cluster.heal();
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("partition-primary", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_follower() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(true).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    let end = Instant::now() + chaos_time();
    while Instant::now() < end {
        run_for(Duration::from_millis(700)).await;
        let p = cluster.wait_for_primary().await.unwrap();
        let f = cluster.ids().into_iter().find(|&id| id != p).unwrap();
        w.fault();
        cluster.isolate(f);
        run_for(Duration::from_millis(1000)).await;
        cluster.heal();
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("partition-follower", &mut cluster, h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart() {
    let _one = SERIAL.lock().await;
    let mut cluster = cluster(false).await;
    let mut w = Workload::start(&cluster, 2, 3).await;
    for id in cluster.ids() {
        run_for(Duration::from_millis(500)).await;
        w.fault();
        let status = cluster.signal_and_wait(id, libc::SIGTERM).unwrap();
        assert!(status.success(), "node {id} stopped with {status}");
        cluster.start_node(id).unwrap();
        cluster.wait_for_primary().await.unwrap();
    }
    run_for(Duration::from_millis(500)).await;
    let h = w.finish().await;
    verdict("rolling-restart", &mut cluster, h).await;
}
