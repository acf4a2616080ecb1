//! The fault-injection suite: each scenario runs the chaos workload (ids, group messages, a
//! subscriber per node) against 3 real node processes while it injects one kind of fault, then
//! checks the recorded history and prints one summary line. CHAOS_SECONDS (default 4) sets how
//! long each scenario keeps injecting faults.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::checker::check;
use testkit::history::History;
use testkit::workload::Workload;
use testkit::Cluster;

const SERVER: &str = env!("CARGO_BIN_EXE_server");
/// Membership churn changes the membership through the Admin service.
const ADMIN_TOKEN: &str = "a-test-admin-token-0123";

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
    let mut b = Cluster::builder(SERVER).set("admin_token", ADMIN_TOKEN);
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
    let highest = h.highest_id();
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

/// One kind of fault, injected over and over while the workload runs.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillPrimary,
    KillFollower,
    KillAll,
    PausePrimary,
    PartitionPrimary,
    PartitionFollower,
    MembershipChurn,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill-primary",
            Fault::KillFollower => "kill-follower",
            Fault::KillAll => "kill-all",
            Fault::PausePrimary => "pause-primary",
            Fault::PartitionPrimary => "partition-primary",
            Fault::PartitionFollower => "partition-follower",
            Fault::MembershipChurn => "membership-churn",
        }
    }

    /// Partitions need a proxy on every peer link.
    fn needs_proxies(self) -> bool {
        matches!(self, Fault::PartitionPrimary | Fault::PartitionFollower)
    }

    /// How long the load runs between two faults.
    fn every(self) -> Duration {
        match self {
            Fault::KillAll => Duration::from_millis(1000),
            _ => Duration::from_millis(700),
        }
    }

    /// Injects the fault once, marking the instant in the workload, and waits until the cluster
    /// agrees on a primary again.
    async fn inject(self, c: &mut Cluster, w: &mut Workload) {
        match self {
            Fault::KillPrimary => {
                let p = c.wait_for_primary().await.unwrap();
                w.fault();
                c.kill(p);
                c.wait_for_primary().await.unwrap();
                c.start_node(p).unwrap();
            }
            Fault::KillFollower => {
                let restart = |c: &mut Cluster, f| c.start_node(f).unwrap();
                follower_away(c, w, Cluster::kill, Duration::from_millis(500), restart).await;
            }
            Fault::KillAll => {
                w.fault();
                restart_all(c).await;
            }
            Fault::PausePrimary => {
                let p = c.wait_for_primary().await.unwrap();
                w.fault();
                c.signal(p, libc::SIGSTOP).unwrap();
                // Paused past an election: the others choose a new primary meanwhile.
                c.wait_for_primary_among(&others(c, p)).await.unwrap();
                c.signal(p, libc::SIGCONT).unwrap();
                c.wait_for_primary().await.unwrap();
            }
            Fault::PartitionPrimary => {
                let p = c.wait_for_primary().await.unwrap();
                w.fault();
                c.isolate(p);
                c.wait_for_primary_among(&others(c, p)).await.unwrap();
                run_for(Duration::from_millis(300)).await;
                c.heal();
                c.wait_for_primary().await.unwrap();
            }
            Fault::PartitionFollower => {
                let isolate = |c: &mut Cluster, f| c.isolate(f);
                let heal = |c: &mut Cluster, _| c.heal();
                follower_away(c, w, isolate, Duration::from_millis(1000), heal).await;
            }
            Fault::MembershipChurn => churn(c, w).await,
        }
    }
}

/// How many churn rounds ran, to take turns between the two ways of losing a disk.
static CHURNS: AtomicUsize = AtomicUsize::new(0);

/// A follower loses its disk and comes back under its id with `--rejoin`: every other round
/// it is removed (RemoveMember) first and then killed, else killed and left to `--rejoin` to
/// remove its old self. Waits until it is a voter again on every node and has caught up.
async fn churn(c: &mut Cluster, w: &mut Workload) {
    let round = CHURNS.fetch_add(1, Ordering::Relaxed);
    let p = c.wait_for_primary().await.unwrap();
    let rest = others(c, p);
    let f = rest[round % rest.len()];
    w.fault();
    if round.is_multiple_of(2) {
        let res = c.admin(p).remove(f, false).await;
        assert!(res.is_ok(), "removing node {f}: {res:?}");
        c.wait_members(&others(c, f), &[]).await.unwrap();
    }
    c.kill(f);
    c.wipe(f).unwrap();
    let via = c.node(p).addr.clone();
    c.start_node_with(f, &["--rejoin", &via]).unwrap();
    c.wait_members(&c.ids(), &[]).await.unwrap();
    c.wait_caught_up(p, f).await.unwrap();
}

/// Every node but `p`.
fn others(c: &Cluster, p: u64) -> Vec<u64> {
    c.ids().into_iter().filter(|&id| id != p).collect()
}

/// Takes a follower out with `out`, marking the instant in the workload, lets the load run
/// `away` without it, brings it back with `back`, and waits until the cluster agrees on a
/// primary again.
async fn follower_away(
    c: &mut Cluster,
    w: &mut Workload,
    out: impl FnOnce(&mut Cluster, u64),
    away: Duration,
    back: impl FnOnce(&mut Cluster, u64),
) {
    let p = c.wait_for_primary().await.unwrap();
    let f = others(c, p)[0];
    w.fault();
    out(c, f);
    run_for(away).await;
    back(c, f);
    c.wait_for_primary().await.unwrap();
}

/// `kill -9` every node, starts them all again, and waits for a primary: a power loss.
async fn restart_all(c: &mut Cluster) {
    c.kill_all();
    for id in c.ids() {
        c.start_node(id).unwrap();
    }
    c.wait_for_primary().await.unwrap();
}

/// Runs the workload on a fresh cluster, injects `fault` every `fault.every()` for
/// CHAOS_SECONDS, then checks the history.
async fn scenario(fault: Fault) -> (Cluster, History) {
    let mut r = Run::start(fault.needs_proxies()).await;
    while r.going() {
        run_for(fault.every()).await;
        fault.inject(&mut r.cluster, &mut r.workload).await;
    }
    r.finish(fault.name()).await
}

/// One test per fault whose scenario's own checks are all it asserts.
macro_rules! scenario_tests {
    ($($name:ident: $fault:expr,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            scenario($fault).await;
        }
    )*};
}

scenario_tests! {
    kill_primary: Fault::KillPrimary,
    kill_follower: Fault::KillFollower,
    pause_primary: Fault::PausePrimary,
    partition_primary: Fault::PartitionPrimary,
    partition_follower: Fault::PartitionFollower,
    membership_churn: Fault::MembershipChurn,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_all() {
    let (mut cluster, h) = scenario(Fault::KillAll).await;
    // Power loss once more: the next id is above every id ever acknowledged.
    restart_all(&mut cluster).await;
    let acked = h.highest_id();
    let next = cluster.client().get_id("").await.unwrap().id;
    assert!(
        next > acked,
        "after a restart of every node, id {next} is not above {acked}"
    );
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
