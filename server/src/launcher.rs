//! The one-command cluster: re-executes this binary as `server --node K` for every node of the
//! config, prefixes each child's output with its node id, waits until every node agrees on a
//! primary, prints the node table, and stops every child on Ctrl-C or SIGTERM.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use sequencer_proto::v1::cluster_client::ClusterClient;
use sequencer_proto::v1::StatusRequest;
use sequencer_server::config::{Config, CLUSTER_SECRET_ENV};
use sequencer_server::tls::{self, TlsMaterial};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

/// How long the cluster may take to elect its first primary.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a child may take to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

struct ChildNode {
    id: u64,
    child: Child,
}

pub async fn run(
    path: &Path,
    file_exists: bool,
    config: &Config,
    data_dir: &Option<PathBuf>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the server binary")?;
    // Peers must share a secret; with none configured, these children get a fresh one.
    let generated = match &config.cluster_secret {
        None if config.nodes.len() > 1 => Some(random_secret()?),
        _ => None,
    };
    // Nodes on one host share its cores rather than each start a thread per core: on 2 cores,
    // three nodes with one thread each answered 10 % more pings than with two (BENCHMARKS.md).
    let threads = config.worker_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / config.nodes.len()).max(1)
    });
    let mut children = Vec::new();
    for node in &config.nodes {
        let mut cmd = Command::new(&exe);
        cmd.arg("--node").arg(node.id.to_string());
        if file_exists {
            cmd.arg("--config").arg(path);
        }
        if let Some(dir) = data_dir {
            cmd.arg("--data-dir").arg(dir);
        }
        cmd.arg("--worker-threads").arg(threads.to_string());
        if let Some(secret) = &generated {
            cmd.env(CLUSTER_SECRET_ENV, secret);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting node {}", node.id))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(prefix_lines(node.id, out, false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(prefix_lines(node.id, err, true));
        }
        children.push(ChildNode { id: node.id, child });
    }

    let result = supervise(config, &mut children).await;
    stop_all(&mut children).await;
    result
}

/// 32 random bytes, hex: a secret for this run's children only.
fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn supervise(config: &Config, children: &mut [ChildNode]) -> anyhow::Result<()> {
    let mut down = HashSet::new();
    let primary = tokio::select! {
        p = wait_for_primary(config) => p?,
        exited = next_exit(children, &mut down) => bail!("{exited} while the cluster was starting"),
        _ = crate::shutdown_signal() => return Ok(()),
    };
    print_table(config, primary);
    // A node that dies later is reported; the others serve on while they are a majority.
    loop {
        tokio::select! {
            _ = crate::shutdown_signal() => return Ok(()),
            exited = next_exit(children, &mut down) => {
                eprintln!("server: {exited}");
                if down.len() == children.len() {
                    bail!("every node has exited");
                }
            }
        }
    }
}

/// Resolves with a description of the next child to exit that is not yet in `down`.
async fn next_exit(children: &mut [ChildNode], down: &mut HashSet<u64>) -> String {
    loop {
        for c in children.iter_mut().filter(|c| !down.contains(&c.id)) {
            if let Ok(Some(status)) = c.child.try_wait() {
                down.insert(c.id);
                return format!("node {} exited ({status})", c.id);
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Polls every node's Cluster.Status until all of them name the same primary.
async fn wait_for_primary(config: &Config) -> anyhow::Result<u64> {
    let deadline = Instant::now() + START_DEADLINE;
    // Over TLS when the nodes use it, showing each node's own certificate (this host has
    // every node's files), which also passes `tls_client_auth`. Read once, not every poll.
    let tls = config
        .nodes
        .iter()
        .map(|n| TlsMaterial::load(config, n.id))
        .collect::<Result<Vec<_>, _>>()
        .context("reading TLS files")?;
    loop {
        let mut seen = Vec::new();
        for (node, tls) in config.nodes.iter().zip(&tls) {
            seen.push(primary_seen_by(&node.addr, tls.as_ref()).await);
        }
        if let Some(Some(p)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*p)) {
                return Ok(*p);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no primary agreed by every node within {} s",
                START_DEADLINE.as_secs()
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
}

async fn primary_seen_by(addr: &str, tls: Option<&TlsMaterial>) -> Option<u64> {
    let call = async {
        let channel = tls::endpoint(addr, tls).ok()?.connect().await.ok()?;
        let mut client = ClusterClient::new(channel);
        let status = client.status(StatusRequest {}).await.ok()?.into_inner();
        (status.primary != 0).then_some(u64::from(status.primary))
    };
    timeout(Duration::from_secs(1), call).await.ok().flatten()
}

fn print_table(config: &Config, primary: u64) {
    for n in &config.nodes {
        let role = if n.id == primary { "  primary" } else { "" };
        println!(
            "node {}  client {}  peer {}{role}",
            n.id, n.addr, n.peer_addr
        );
    }
    println!(
        "cluster ready: {} nodes, primary is node {primary}; Ctrl-C stops every node",
        config.nodes.len()
    );
}

async fn prefix_lines(id: u64, stream: impl AsyncRead + Unpin, stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if stderr {
            eprintln!("node{id} | {line}");
        } else {
            println!("node{id} | {line}");
        }
    }
}

/// SIGTERM to every child we started (by pid), then SIGKILL to any still running.
async fn stop_all(children: &mut [ChildNode]) {
    for c in children.iter_mut() {
        if let (Ok(None), Some(pid)) = (c.child.try_wait(), c.child.id()) {
            // Safety: signalling a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for c in children.iter_mut() {
        match timeout(STOP_DEADLINE, c.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("server: node {} did not stop in time; killing it", c.id);
                let _ = c.child.kill().await;
            }
        }
    }
}
