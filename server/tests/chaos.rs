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
async fn verdict(name: &str, cluster: &mut Cluster, h: &History) {
    let report = check(h);
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
        "{line}\n  per fault (ms): recovery {:?}, longest gap {:?}; refusals by code: {:?}",
        report.recovery_ms,
        report.windows_ms,
        report.failed_codes
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

/// One scenario: the cluster, the workload on it, and until when faults are injected.
struct Run {
    cluster: Cluster,
    workload: Workload,
    end: Instant,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

impl Run {
    async fn start(proxies: bool) -> Run {
        let one = SERIAL.lock().await;
        let cluster = cluster(proxies).await;
        let workload = Workload::start(&cluster, 2, 3).await;
        Run {
            cluster,
            workload,
            end: Instant::now() + chaos_time(),
            _one: one,
        }
    }

    /// Whether to inject another fault.
    fn going(&self) -> bool {
        Instant::now() < self.end
    }

    /// Lets the load run a little, stops it, and checks the history.
    async fn finish(mut self, name: &str) -> (Cluster, History) {
        run_for(Duration::from_millis(500)).await;
        let h = self.workload.finish().await;
        verdict(name, &mut self.cluster, &h).await;
        (self.cluster, h)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_primary() {
    let mut r = Run::start(false).await;
    while r.going() {
        run_for(Duration::from_millis(700)).await;
        let p = r.cluster.wait_for_primary().await.unwrap();
        r.workload.fault();
        r.cluster.kill(p);
        r.cluster.wait_for_primary().await.unwrap();
        r.cluster.start_node(p).unwrap();
    }
    r.finish("kill-primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_follower() {
    let mut r = Run::start(false).await;
    while r.going() {
        run_for(Duration::from_millis(700)).await;
        let p = r.cluster.wait_for_primary().await.unwrap();
        let f = r.cluster.ids().into_iter().find(|&id| id != p).unwrap();
        r.workload.fault();
        r.cluster.kill(f);
        run_for(Duration::from_millis(500)).await;
        r.cluster.start_node(f).unwrap();
        r.cluster.wait_for_primary().await.unwrap();
    }
    r.finish("kill-follower").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_all() {
    let mut r = Run::start(false).await;
    while r.going() {
        run_for(Duration::from_millis(1000)).await;
        r.workload.fault();
        r.cluster.kill_all();
        for id in r.cluster.ids() {
            r.cluster.start_node(id).unwrap();
        }
        r.cluster.wait_for_primary().await.unwrap();
    }
    let (mut cluster, h) = r.finish("kill-all").await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_primary() {
    let mut r = Run::start(false).await;
    while r.going() {
        run_for(Duration::from_millis(700)).await;
        let p = r.cluster.wait_for_primary().await.unwrap();
        let others: Vec<u64> = r.cluster.ids().into_iter().filter(|&id| id != p).collect();
        r.workload.fault();
        r.cluster.signal(p, libc::SIGSTOP).unwrap();
        // Paused past an election: the others choose a new primary meanwhile.
        r.cluster.wait_for_primary_among(&others).await.unwrap();
        r.cluster.signal(p, libc::SIGCONT).unwrap();
        r.cluster.wait_for_primary().await.unwrap();
    }
    r.finish("pause-primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_primary() {
    let mut r = Run::start(true).await;
    while r.going() {
        run_for(Duration::from_millis(700)).await;
        let p = r.cluster.wait_for_primary().await.unwrap();
        let others: Vec<u64> = r.cluster.ids().into_iter().filter(|&id| id != p).collect();
        r.workload.fault();
        r.cluster.isolate(p);
        r.cluster.wait_for_primary_among(&others).await.unwrap();
        run_for(Duration::from_millis(300)).await;
        r.cluster.heal();
        r.cluster.wait_for_primary().await.unwrap();
    }
    r.finish("partition-primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_follower() {
    let mut r = Run::start(true).await;
    while r.going() {
        run_for(Duration::from_millis(700)).await;
        let p = r.cluster.wait_for_primary().await.unwrap();
        let f = r.cluster.ids().into_iter().find(|&id| id != p).unwrap();
        r.workload.fault();
        r.cluster.isolate(f);
        run_for(Duration::from_millis(1000)).await;
        r.cluster.heal();
        r.cluster.wait_for_primary().await.unwrap();
    }
    r.finish("partition-follower").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart() {
    let mut r = Run::start(false).await;
    for id in r.cluster.ids() {
        run_for(Duration::from_millis(500)).await;
        r.workload.fault();
        let status = r.cluster.signal_and_wait(id, libc::SIGTERM).unwrap();
        assert!(status.success(), "node {id} stopped with {status}");
        r.cluster.start_node(id).unwrap();
        r.cluster.wait_for_primary().await.unwrap();
    }
    r.finish("rolling-restart").await;
}
