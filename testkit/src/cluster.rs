//! [`Cluster`]: a running test cluster of `server` processes, started by [`crate::Builder`].
//! Processes are killed only by the pids this harness started, and every one of them is
//! killed when the cluster is dropped. The waits on it are in `waits.rs`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use sequencer_client::{Client, Tls};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::time::{sleep, Instant};

use crate::{free_ports, proxy, Builder};

/// How long a fresh or recovering cluster may take to agree on a primary.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The mode switch of each proxied link (from, to).
pub(crate) type Links = HashMap<(u64, u64), tokio::sync::watch::Sender<proxy::Mode>>;

/// One node of a test cluster.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub peer_addr: String,
    /// Where its HTTP listener serves (JSON API, /metrics, probes, the status page).
    pub http_addr: String,
    pub(crate) child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// The pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Node `id` listening on `host` at `[client, peer, http]` ports, logging into `dir`.
    pub(crate) fn new(id: u64, host: &str, ports: &[u16], dir: &Path) -> Node {
        let [client, peer, http] = [ports[0], ports[1], ports[2]];
        Node {
            id,
            addr: format!("{host}:{client}"),
            peer_addr: format!("{host}:{peer}"),
            http_addr: format!("{host}:{http}"),
            child: None,
            log: dir.join(format!("node-{id}.log")),
        }
    }

    /// Its entry in a config's `nodes`, dialled by peers at `peer_addr`.
    pub(crate) fn entry(&self, peer_addr: &str) -> Value {
        json!({"id": self.id, "addr": self.addr, "peer_addr": peer_addr, "http_addr": self.http_addr})
    }
}

/// Ports each node listens on: client, peer, HTTP.
pub(crate) const PORTS_PER_NODE: usize = 3;

/// What a node's snapshot on disk says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The last log index it covers.
    pub index: Option<u64>,
    /// Its id, made by the node that built it (an installed snapshot keeps the builder's).
    pub snapshot_id: String,
}

/// A running test cluster. Dropping it kills every node it started.
pub struct Cluster {
    pub(crate) server_bin: PathBuf,
    pub(crate) config_path: PathBuf,
    pub(crate) nodes: Vec<Node>,
    pub(crate) links: Links,
    pub(crate) proxy_runtime: Option<tokio::runtime::Runtime>,
    pub(crate) secret: Option<String>,
    /// How this cluster's clients reach it, when it serves TLS.
    pub(crate) tls: Option<Tls>,
    // Last, so the processes die before their data dir is removed.
    pub(crate) dir: TempDir,
}

impl Cluster {
    /// The cluster secret in the nodes' config (tests that call the peer service need it).
    pub fn cluster_secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// A cluster of the given `server` binary (`env!("CARGO_BIN_EXE_server")`).
    pub fn builder(server_bin: impl Into<PathBuf>) -> Builder {
        Builder::new(server_bin.into())
    }
    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the nodes whose process is running.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("no such node")
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("no such node")
    }

    /// The config file the nodes run with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temp folder holding config, logs and data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Client addresses of every node, in id order.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// A client that knows every node.
    pub fn client(&self) -> Client {
        self.connect(self.addrs())
    }

    /// A client for `addrs`, over TLS if this cluster uses it.
    fn connect(&self, addrs: Vec<String>) -> Client {
        let client = Client::new(addrs).expect("valid addresses");
        match &self.tls {
            Some(tls) => client.with_tls(tls.clone()).expect("valid TLS settings"),
            None => client,
        }
    }

    /// A client that starts at node `id` and fails over to the others, in id order.
    pub fn client_from(&self, id: u64) -> Client {
        let mut addrs = self.addrs();
        let first = self
            .nodes
            .iter()
            .position(|n| n.id == id)
            .expect("no such node");
        addrs.rotate_left(first);
        self.connect(addrs)
    }

    /// A client bound to node `id` only (no failover).
    pub fn client_for(&self, id: u64) -> Client {
        self.connect(vec![self.node(id).addr.clone()])
    }

    /// Cuts every link to and from node `id` (needs `with_proxies`): traffic vanishes.
    pub fn isolate(&self, id: u64) {
        for ((from, to), mode) in &self.links {
            if *from == id || *to == id {
                let _ = mode.send(proxy::Mode::Blackhole);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for mode in self.links.values() {
            let _ = mode.send(proxy::Mode::Pass);
        }
    }

    /// Starts node `id` (`server --node id --config ...`), logging to its file.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        self.start_node_with(id, &[])
    }

    /// Starts node `id` with more arguments (`--join HOST:PORT`, `--rejoin HOST:PORT`).
    pub fn start_node_with(&mut self, id: u64, args: &[&str]) -> anyhow::Result<()> {
        let bin = self.server_bin.clone();
        let config = self.dir.path().join(format!("config-{id}.json"));
        let node = self.node_mut(id);
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(bin)
            .arg("--node")
            .arg(id.to_string())
            .arg("--config")
            .arg(config)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// `kill -9` node `id` by its pid, and reap it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Adds `n` nodes to every node's config, not started, as an operator who edits
    /// config.json would; returns their ids. In a cluster with proxies, each added node gets
    /// proxied links too: see [`Cluster::add_proxied_nodes`].
    pub fn add_nodes(&mut self, n: usize) -> anyhow::Result<Vec<u64>> {
        if !self.links.is_empty() {
            return self.add_proxied_nodes(n);
        }
        let (ports, host, added) = self.next_nodes(n)?;
        for (i, &id) in added.iter().enumerate() {
            let node = Node::new(id, &host, &ports[PORTS_PER_NODE * i..], self.dir.path());
            self.nodes.push(node);
        }
        let list: Vec<Value> = self.nodes.iter().map(|n| n.entry(&n.peer_addr)).collect();
        let template: Value = serde_json::from_slice(&std::fs::read(&self.config_path)?)?;
        for id in self.ids() {
            let mut config = template.clone();
            config["nodes"] = Value::Array(list.clone());
            std::fs::write(
                self.dir.path().join(format!("config-{id}.json")),
                serde_json::to_vec_pretty(&config)?,
            )?;
        }
        Ok(added)
    }

    /// For `n` nodes to add: free ports (three each), the others' host, and the next ids.
    pub(crate) fn next_nodes(&self, n: usize) -> anyhow::Result<(Vec<u16>, String, Vec<u64>)> {
        let ports = free_ports(n * PORTS_PER_NODE)?;
        let first = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        // The same host as the others (see Builder::host).
        let host = self
            .nodes
            .first()
            .and_then(|n| n.addr.rsplit_once(':'))
            .map_or("127.0.0.1".to_string(), |(h, _)| h.to_string());
        Ok((ports, host, (first..first + n as u64).collect()))
    }

    /// Node `id`'s data dir.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        let config: Option<Value> = std::fs::read(&self.config_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let root = config
            .as_ref()
            .and_then(|c| c.get("data_dir"))
            .and_then(|d| d.as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir.path().join("data"));
        root.join(format!("node-{id}"))
    }

    /// Asserts that node `lagging` holds the very snapshot node `primary` built: installed
    /// from it, since an installed snapshot keeps the id its builder gave it (term, index and
    /// the builder's count of snapshots).
    pub fn assert_installed_from(&self, lagging: u64, primary: u64) {
        let built = self
            .snapshot(primary)
            .expect("reading the primary's snapshot");
        assert!(built.is_some(), "node {primary} holds no snapshot");
        assert_eq!(
            self.snapshot(lagging).expect("reading the lagging node's snapshot"),
            built,
            "node {lagging} does not hold node {primary}'s snapshot, so it did not catch up from it"
        );
    }

    /// The snapshot node `id` holds on disk (`snapshot.bin` in its data dir), if any. The file
    /// starts with `SEQSNAP1`, the metadata's length (u32, little endian) and the metadata as
    /// JSON: see `server/src/raft/store/snapshot_file.rs`.
    pub fn snapshot(&self, id: u64) -> anyhow::Result<Option<StoredSnapshot>> {
        let path = self.data_dir(id).join("snapshot.bin");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let meta = bytes
            .strip_prefix(b"SEQSNAP1")
            .and_then(|rest| {
                let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                rest.get(4..4 + len)
            })
            .with_context(|| format!("{} does not start like a snapshot", path.display()))?;
        let meta: Value = serde_json::from_slice(meta)
            .with_context(|| format!("the metadata of {}", path.display()))?;
        Ok(Some(StoredSnapshot {
            index: meta["last_log_id"]["index"].as_u64(),
            snapshot_id: meta["snapshot_id"].as_str().unwrap_or_default().to_string(),
        }))
    }

    /// Deletes node `id`'s data dir, as a replaced disk would; the node must be stopped.
    pub fn wipe(&self, id: u64) -> anyhow::Result<()> {
        if self.node(id).child.is_some() {
            bail!("node {id} is running");
        }
        std::fs::remove_dir_all(self.data_dir(id))
            .with_context(|| format!("removing node {id}'s data dir"))
    }

    /// Waits up to `within` for node `id` to exit on its own, and reaps it.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let node = self.node_mut(id);
            let Some(child) = node.child.as_mut() else {
                bail!("node {id} is not running");
            };
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} still runs after {within:?}\n{}",
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` every node.
    pub fn kill_all(&mut self) {
        for id in self.ids() {
            self.kill(id);
        }
    }

    /// Sends a signal to node `id` (e.g. `libc::SIGSTOP`) by its pid, and returns at once.
    pub fn signal(&self, id: u64, signal: i32) -> anyhow::Result<()> {
        let Some(pid) = self.node(id).pid() else {
            bail!("node {id} is not running");
        };
        // Safety: signalling a child we spawned and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
        Ok(())
    }

    /// Sends a signal to node `id` (e.g. `libc::SIGTERM`) and waits for it to exit.
    pub fn signal_and_wait(
        &mut self,
        id: u64,
        signal: i32,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.node_mut(id).child.take() else {
            bail!("node {id} is not running");
        };
        // Safety: signalling a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        Ok(child.wait()?)
    }

    /// The log file of node `id`.
    pub fn log(&self, id: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.node(id).log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The last lines of every node's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = self.log(n.id);
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(30);
            out.push_str(&format!("---- node {} log (last 30 lines)\n", n.id));
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        // Dropping a runtime inside a test's runtime would panic; let it wind down aside.
        if let Some(rt) = self.proxy_runtime.take() {
            rt.shutdown_background();
        }
    }
}
