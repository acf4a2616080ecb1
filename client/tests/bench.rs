//! `client bench` against a cluster that dies mid-run: it must still end at its duration
//! (plus a bounded grace) and report what it did and what failed, by code.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{sibling_binary, Cluster, READY_TIMEOUT};

const CLIENT: &str = env!("CARGO_BIN_EXE_client");
/// Seconds each bench runs.
const DURATION: u64 = 3;
/// How long past its duration the bench may take to wind down: generous, so only a bench
/// that does not end fails.
const GRACE: Duration = Duration::from_secs(15);

/// How the cluster dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// `kill -9` every node: connections are reset.
    Killed,
    /// SIGSTOP every node: connections stay open and nothing answers, as when the hosts or
    /// the network go away.
    Frozen,
}

async fn cluster() -> Cluster {
    let mut c = Cluster::builder(sibling_binary(CLIENT, "server"))
        .nodes(3)
        .start()
        .unwrap();
    c.wait_for_primary().await.unwrap();
    c
}

fn spawn_bench(cluster: &Cluster, mode: &str) -> Child {
    Command::new(CLIENT)
        .arg("--config")
        .arg(cluster.config_path())
        .args(["--json", "bench", "--mode", mode, "--concurrency", "4"])
        .args(["--count", "10", "--duration", &DURATION.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Everything the exited `child` printed: (stdout, stderr).
fn output(child: &mut Child) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

/// Polls until the bench has got well into its run, so the cluster dies mid-run: `mode`'s
/// effect on the cluster has grown past a few dozen calls.
async fn wait_for_load(cluster: &Cluster, bench: &mut Child, mode: &str) {
    let client = cluster.client().with_deadline(Duration::from_secs(1));
    let group = format!("bench-{}", bench.id());
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let progress = match mode {
            // Four callers and a watcher joined first.
            "send" => client.list_groups().await.ok().and_then(|l| {
                l.groups
                    .iter()
                    .find(|g| g.name == group)
                    .map(|g| g.next_seq.saturating_sub(5))
            }),
            // Ten ids a call.
            "get-ids" => client.current_id("").await.ok().map(|r| r.id / 10),
            _ => client.current_id("").await.ok().map(|r| r.id),
        };
        if progress.unwrap_or(0) >= 40 {
            return;
        }
        if let Ok(Some(status)) = bench.try_wait() {
            panic!(
                "{mode}: bench exited ({status}) before the load began: {:?}",
                output(bench)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{mode}: the bench never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill_or_freeze(cluster: &mut Cluster, death: Death) {
    match death {
        Death::Killed => cluster.kill_all(),
        Death::Frozen => {
            for id in cluster.ids() {
                let pid = cluster.node(id).pid().unwrap().to_string();
                // The cluster's Drop kills the nodes, stopped or not.
                let ok = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
                assert!(ok.success(), "could not stop node {id}");
            }
        }
    }
}

/// Runs a `mode` bench, lets the cluster die once it is loaded, and returns the bench's report
/// after checking that it ended in time and succeeded.
async fn bench_through(mode: &str, death: Death) -> serde_json::Value {
    let mut cluster = cluster().await;
    let started = Instant::now();
    let mut bench = spawn_bench(&cluster, mode);
    wait_for_load(&cluster, &mut bench, mode).await;
    kill_or_freeze(&mut cluster, death);
    let limit = started + Duration::from_secs(DURATION) + GRACE;
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= limit {
            let _ = bench.kill();
            let _ = bench.wait();
            panic!(
                "{mode} ({death:?}): a {DURATION} s bench still ran after {:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (out, err) = output(&mut bench);
    // Errors do not fail a run, and a cluster gone is no violation of what it promises.
    assert!(status.success(), "{mode} ({death:?}): {status}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{mode}: {e}: {out}{err}"))
}

fn assert_reports_ops_and_errors(mode: &str, death: Death, r: &serde_json::Value) {
    assert_eq!(r["violations"], 0, "{mode} ({death:?}): {r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{mode} ({death:?}): {r}");
    let errors = r["errors"].as_object().unwrap();
    assert!(
        errors.values().any(|n| n.as_u64().unwrap() > 0),
        "{mode} ({death:?}): no errors reported: {r}"
    );
    if mode == "send" && matches!(death, Death::Killed) {
        // Every subscription broke and could not be made again; the report says so.
        let broken = r["subscriber_errors"].as_object().unwrap();
        assert!(
            broken.values().map(|n| n.as_u64().unwrap()).sum::<u64>() >= 3,
            "{r}"
        );
        assert!(r["subscribers_cut_short"].as_u64().unwrap() <= 3, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_at_its_duration_and_reports_errors_when_the_cluster_is_killed() {
    for mode in ["send", "get-id", "get-ids"] {
        let r = bench_through(mode, Death::Killed).await;
        assert_reports_ops_and_errors(mode, Death::Killed, &r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_at_its_duration_and_reports_errors_when_the_cluster_freezes() {
    for mode in ["send", "get-id", "get-ids"] {
        let r = bench_through(mode, Death::Frozen).await;
        assert_reports_ops_and_errors(mode, Death::Frozen, &r);
    }
}
