//! Real sequencer clusters for integration tests: one process of the real `server` binary per
//! node, on free loopback ports, each with its own data dir in a temp folder.
//!
//! Nothing sleeps in the hope that a node is up: [`Cluster::wait_for_primary`] polls
//! Cluster.Status with a deadline. Processes are killed only by the pids this harness started,
//! and every one of them is killed when the [`Cluster`] is dropped.

pub mod chaos;
pub mod history;
pub mod proxy;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use sequencer_client::{Client, ClientError, Tls};
use serde_json::{json, Map, Value};
use tempfile::TempDir;
use tokio::time::{sleep, Instant};

/// Asserts that `res` failed with `code` and a message that mentions `mentions`.
pub fn assert_code<T: std::fmt::Debug>(
    res: Result<T, ClientError>,
    code: tonic::Code,
    mentions: &str,
) {
    match res {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{e}");
            assert!(
                e.to_string().contains(mentions),
                "error `{e}` does not mention `{mentions}`"
            );
        }
    }
}

/// How long a fresh or recovering cluster may take to agree on a primary.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where [`free_ports`] looks: below Linux's default ephemeral range (32768–60999). A port the
/// kernel picked (bind to port 0) is free only until the node binds it, and meanwhile any
/// outgoing connection of a test running beside it may take it as its local port; CI saw a
/// node refused with "Address already in use" that way. The kernel never hands out ports from
/// this range on its own.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_768;

/// `n` distinct free TCP ports on 127.0.0.1, all held open together while they are picked,
/// and never handed out twice by this process.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    use std::hash::BuildHasher;
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
    let mut listeners = Vec::new();
    let mut tries = 0;
    while listeners.len() < n {
        tries += 1;
        if tries > 100_000 {
            bail!("no {n} free ports left in {PORT_RANGE:?}");
        }
        let random = std::collections::hash_map::RandomState::new().hash_one(tries);
        let port = PORT_RANGE.start + (random % span) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        // Taken by someone else: try another.
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A config of `n` nodes on free 127.0.0.1 ports with an explicit `nodes` list and its data
/// under `dir/data`, for tests that start `server` themselves.
pub fn nodes_config(dir: &Path, n: usize) -> anyhow::Result<Value> {
    let ports = free_ports(2 * n)?;
    let nodes: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": i + 1, "addr": format!("127.0.0.1:{}", ports[2 * i]),
                   "peer_addr": format!("127.0.0.1:{}", ports[2 * i + 1])})
        })
        .collect();
    Ok(json!({"nodes": nodes, "data_dir": dir.join("data")}))
}

/// Certificates for a shorthand cluster of `servers` nodes on 127.0.0.1, written into
/// `dir/certs` by the real `client gen-certs` (`client` is its binary).
pub fn gen_certs(client: &Path, dir: &Path, servers: usize) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("config.json"),
        json!({ "servers": servers }).to_string(),
    )?;
    let out = Command::new(client)
        .args(["gen-certs", "--out", "certs"])
        .current_dir(dir)
        .output()
        .context("running client gen-certs (cargo build --bin client)")?;
    if !out.status.success() {
        bail!("gen-certs: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub use tonic_health::pb::health_check_response::ServingStatus;

/// The gRPC health of the server at `addr` (plaintext), or `None` if it does not answer.
pub async fn health(addr: &str) -> Option<ServingStatus> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let req = HealthCheckRequest {
        service: String::new(),
    };
    let resp = HealthClient::new(channel).check(req).await.ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}

/// Where the `server` binary of this build is, given any binary of the same target dir.
pub fn sibling_binary(known: &str, name: &str) -> PathBuf {
    Path::new(known).with_file_name(name)
}

/// One node of a test cluster.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub peer_addr: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// The pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Settings for a test cluster before it starts.
pub struct Builder {
    server_bin: PathBuf,
    nodes: usize,
    settings: Map<String, Value>,
    proxies: bool,
    tls: Option<(PathBuf, bool)>,
    host: String,
}

impl Builder {
    /// Names every node's addresses with `host` (e.g. `localhost`) instead of 127.0.0.1.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.into();
        self
    }

    /// TLS on every listener with the certificates `client gen-certs` wrote into `certs`
    /// (mutual between peers); `client_auth` also asks clients for one. The cluster's clients
    /// trust the CA, and show `client.pem` when asked.
    pub fn tls(mut self, certs: &Path, client_auth: bool) -> Self {
        let file = |name: &str| json!(certs.join(name).display().to_string());
        self = self
            .set("tls_cert", file("node-{id}.pem"))
            .set("tls_key", file("node-{id}-key.pem"))
            .set("tls_ca", file("ca.pem"))
            .set("tls_client_auth", client_auth);
        self.tls = Some((certs.to_path_buf(), client_auth));
        self
    }

    /// Number of nodes (default 3).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Sets a config.json key, e.g. `set("max_sequences", 2)`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.settings.insert(key.to_string(), value.into());
        self
    }

    /// Route every peer link through its own fault-injecting proxy, so tests can cut links.
    pub fn with_proxies(mut self) -> Self {
        self.proxies = true;
        self
    }

    /// Long election timeouts, for tests that assert ids are dense: on a starved CI machine a
    /// spurious election may commit a batch whose waiters were already told to retry, leaving
    /// a gap (never a duplicate). Failover tests keep the defaults.
    pub fn steady(self) -> Self {
        self.set("election_timeout_min_ms", 2000)
            .set("election_timeout_max_ms", 4000)
    }

    /// Writes config.json and starts every node. Does not wait for a primary.
    pub fn start(self) -> anyhow::Result<Cluster> {
        // SEQTEST_KEEP=1 leaves every cluster's dir (node logs, data) behind for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("seqtest")
            .disable_cleanup(std::env::var_os("SEQTEST_KEEP").is_some())
            .tempdir()?;
        let ports = free_ports(self.nodes * 2)?;
        let nodes: Vec<Node> = (0..self.nodes)
            .map(|i| Node {
                id: i as u64 + 1,
                addr: format!("{}:{}", self.host, ports[2 * i]),
                peer_addr: format!("{}:{}", self.host, ports[2 * i + 1]),
                child: None,
                log: dir.path().join(format!("node-{}.log", i + 1)),
            })
            .collect();
        // With proxies, node i dials node j through its own proxy for the link i -> j.
        let mut links = HashMap::new();
        let mut proxy_addr = HashMap::new();
        let runtime = if self.proxies {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            for a in &nodes {
                for b in nodes.iter().filter(|b| b.id != a.id) {
                    let listener = TcpListener::bind("127.0.0.1:0")?;
                    listener.set_nonblocking(true)?;
                    proxy_addr.insert((a.id, b.id), listener.local_addr()?.to_string());
                    let target = b.peer_addr.parse()?;
                    let (tx, rx) = tokio::sync::watch::channel(proxy::Mode::Pass);
                    let _guard = rt.enter();
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    rt.spawn(proxy::run(listener, target, rx));
                    links.insert((a.id, b.id), tx);
                }
            }
            Some(rt)
        } else {
            None
        };
        // Peers need a shared secret; a test may set its own.
        let mut settings = self.settings.clone();
        settings
            .entry("cluster_secret")
            .or_insert_with(|| json!(format!("test-cluster-secret-{}", std::process::id())));
        for me in &nodes {
            let mut config = settings.clone();
            let list: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    let peer = proxy_addr.get(&(me.id, n.id)).unwrap_or(&n.peer_addr);
                    json!({"id": n.id, "addr": n.addr, "peer_addr": peer})
                })
                .collect();
            config.insert("nodes".into(), Value::Array(list));
            // A test may put the data elsewhere (a small file system of its own).
            config
                .entry("data_dir")
                .or_insert_with(|| json!(dir.path().join("data")));
            std::fs::write(
                dir.path().join(format!("config-{}.json", me.id)),
                serde_json::to_vec_pretty(&Value::Object(config))?,
            )?;
        }
        // Clients read the addresses from any of them.
        let config_path = dir.path().join("config-1.json");
        if !self.server_bin.exists() {
            bail!(
                "{} does not exist: build it first (cargo build --bin server)",
                self.server_bin.display()
            );
        }
        let mut cluster = Cluster {
            server_bin: self.server_bin,
            config_path,
            nodes,
            links,
            proxy_runtime: runtime,
            tls: match &self.tls {
                None => None,
                Some((certs, client_auth)) => Some(Tls {
                    ca: Some(std::fs::read(certs.join("ca.pem"))?),
                    identity: if *client_auth {
                        Some((
                            std::fs::read(certs.join("client.pem"))?,
                            std::fs::read(certs.join("client-key.pem"))?,
                        ))
                    } else {
                        None
                    },
                }),
            },
            secret: settings
                .get("cluster_secret")
                .and_then(|v| v.as_str())
                .map(String::from),
            dir,
        };
        for id in cluster.ids() {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }
}

/// A running test cluster. Dropping it kills every node it started.
pub struct Cluster {
    server_bin: PathBuf,
    config_path: PathBuf,
    nodes: Vec<Node>,
    /// The mode switch of each proxied link (from, to).
    links: HashMap<(u64, u64), tokio::sync::watch::Sender<proxy::Mode>>,
    proxy_runtime: Option<tokio::runtime::Runtime>,
    secret: Option<String>,
    /// How this cluster's clients reach it, when it serves TLS.
    tls: Option<Tls>,
    // Last, so the processes die before their data dir is removed.
    dir: TempDir,
}

impl Cluster {
    /// The cluster secret in the nodes' config (tests that call the peer service need it).
    pub fn cluster_secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// A cluster of the given `server` binary (`env!("CARGO_BIN_EXE_server")`).
    pub fn builder(server_bin: impl Into<PathBuf>) -> Builder {
        Builder {
            server_bin: server_bin.into(),
            nodes: 3,
            settings: Map::new(),
            proxies: false,
            tls: None,
            host: "127.0.0.1".into(),
        }
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
    /// config.json would; returns their ids. Not with proxies.
    pub fn add_nodes(&mut self, n: usize) -> anyhow::Result<Vec<u64>> {
        if !self.links.is_empty() {
            bail!("add_nodes does not rewire proxies");
        }
        let ports = free_ports(n * 2)?;
        let first = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        // The same host as the others (see Builder::host).
        let host = self
            .nodes
            .first()
            .and_then(|n| n.addr.rsplit_once(':'))
            .map_or("127.0.0.1".to_string(), |(h, _)| h.to_string());
        let added: Vec<u64> = (first..first + n as u64).collect();
        for (i, id) in added.iter().enumerate() {
            self.nodes.push(Node {
                id: *id,
                addr: format!("{host}:{}", ports[2 * i]),
                peer_addr: format!("{host}:{}", ports[2 * i + 1]),
                child: None,
                log: self.dir.path().join(format!("node-{id}.log")),
            });
        }
        let list: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| json!({"id": n.id, "addr": n.addr, "peer_addr": n.peer_addr}))
            .collect();
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

    /// Waits until every running node names the same running primary; returns its id.
    pub async fn wait_for_primary(&mut self) -> anyhow::Result<u64> {
        let running = self.running();
        self.wait_for_primary_among(&running).await
    }

    /// Waits until the nodes `ids` (running ones) name the same primary among them: for
    /// when another node is cut off or paused and still believes what it believed.
    pub async fn wait_for_primary_among(&mut self, ids: &[u64]) -> anyhow::Result<u64> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Some(p) = self.agreed_primary(ids).await {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no agreed primary among {ids:?} within {:?}\n{}",
                    READY_TIMEOUT,
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until CurrentId of `sequence` is `expected` on every running node.
    pub async fn wait_current_id(&mut self, sequence: &str, expected: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let mut seen = Vec::new();
            for id in self.running() {
                let c = self.client_for(id).with_deadline(Duration::from_secs(1));
                seen.push((id, c.current_id(sequence).await.map(|r| r.id).ok()));
            }
            if seen.iter().all(|(_, v)| *v == Some(expected)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "CurrentId({sequence}) never reached {expected} everywhere: {seen:?}\n{}",
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agreed_primary(&self, ids: &[u64]) -> Option<u64> {
        let running = self.running();
        let members: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| running.contains(id))
            .collect();
        let mut agreed = None;
        for &id in &members {
            let c = self
                .client_for(id)
                .with_deadline(Duration::from_millis(500));
            let p = u64::from(c.status().await.ok()?.primary);
            if p == 0 || !members.contains(&p) || agreed.is_some_and(|a| a != p) {
                return None;
            }
            agreed = Some(p);
        }
        agreed
    }

    /// Fails if a node we believe is running has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            if let Some(child) = &mut n.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let id = n.id;
                    n.child = None;
                    bail!(
                        "node {id} exited unexpectedly ({status})\n{}",
                        self.log_tails()
                    );
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let mut all = free_ports(40).unwrap();
        all.extend(free_ports(40).unwrap());
        for &port in &all {
            assert!(PORT_RANGE.contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "a port was handed out twice");
    }
}
