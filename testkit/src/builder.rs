//! [`Builder`]: a test cluster's settings, and starting it: ports, per-node config files,
//! the optional fault-injecting proxies, and one `server` process per node.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::bail;
use sequencer_client::Tls;
use serde_json::{json, Map, Value};

use crate::cluster::{Cluster, Links, Node, PORTS_PER_NODE};
use crate::{free_ports, proxy};

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
    /// A 3-node cluster of the `server` binary at `server_bin`, on 127.0.0.1.
    pub(crate) fn new(server_bin: PathBuf) -> Self {
        Builder {
            server_bin,
            nodes: 3,
            settings: Map::new(),
            proxies: false,
            tls: None,
            host: "127.0.0.1".into(),
        }
    }

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
        let mut cluster = self.configure()?;
        for id in cluster.ids() {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    /// Writes config.json but starts no node, for tests that prepare the data dirs first (a
    /// restore); [`Cluster::start_node`] starts each.
    pub fn configure(self) -> anyhow::Result<Cluster> {
        // SEQTEST_KEEP=1 leaves every cluster's dir (node logs, data) behind for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("seqtest")
            .disable_cleanup(std::env::var_os("SEQTEST_KEEP").is_some())
            .tempdir()?;
        let ports = free_ports(self.nodes * PORTS_PER_NODE)?;
        let nodes: Vec<Node> = (0..self.nodes)
            .map(|i| {
                let id = i as u64 + 1;
                Node::new(id, &self.host, &ports[PORTS_PER_NODE * i..], dir.path())
            })
            .collect();
        let (links, proxy_addr, proxy_runtime) = if self.proxies {
            let (links, addrs, rt) = start_proxies(&nodes)?;
            (links, addrs, Some(rt))
        } else {
            Default::default()
        };
        // Peers need a shared secret; a test may set its own.
        let mut settings = self.settings.clone();
        if self.proxies {
            // Each node dials its peers through its own proxies, named in its own config.
            settings
                .entry("peer_addresses")
                .or_insert_with(|| json!("config"));
        }
        settings
            .entry("cluster_secret")
            .or_insert_with(|| json!(format!("test-cluster-secret-{}", std::process::id())));
        for me in &nodes {
            let mut config = settings.clone();
            let list: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    let peer = proxy_addr.get(&(me.id, n.id)).unwrap_or(&n.peer_addr);
                    n.entry(peer)
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
        if !self.server_bin.exists() {
            bail!(
                "{} does not exist: build it first (cargo build --bin server)",
                self.server_bin.display()
            );
        }
        let cluster = Cluster {
            server_bin: self.server_bin,
            // Clients read the addresses from any of them.
            config_path: dir.path().join("config-1.json"),
            nodes,
            links,
            proxy_runtime,
            tls: self.tls.as_ref().map(client_tls).transpose()?,
            secret: settings
                .get("cluster_secret")
                .and_then(|v| v.as_str())
                .map(String::from),
            dir,
        };
        Ok(cluster)
    }
}

/// The proxy address of each directed link (from, to).
type ProxyAddrs = HashMap<(u64, u64), String>;

/// One proxy per directed link: node i dials node j through its own proxy for i -> j. Returns
/// each link's switch, each link's proxy address, and the runtime they run on.
fn start_proxies(nodes: &[Node]) -> anyhow::Result<(Links, ProxyAddrs, tokio::runtime::Runtime)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut links = HashMap::new();
    let mut addrs = HashMap::new();
    for a in nodes {
        for b in nodes.iter().filter(|b| b.id != a.id) {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            addrs.insert((a.id, b.id), listener.local_addr()?.to_string());
            let target = b.peer_addr.parse()?;
            let (tx, rx) = tokio::sync::watch::channel(proxy::Mode::Pass);
            let _guard = rt.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            rt.spawn(proxy::run(listener, target, rx));
            links.insert((a.id, b.id), tx);
        }
    }
    Ok((links, addrs, rt))
}

/// How the cluster's clients reach a TLS cluster: they trust its CA, and show `client.pem`
/// when it asks for a client certificate.
fn client_tls((certs, client_auth): &(PathBuf, bool)) -> anyhow::Result<Tls> {
    Ok(Tls {
        ca: Some(std::fs::read(certs.join("ca.pem"))?),
        identity: if *client_auth {
            Some((
                std::fs::read(certs.join("client.pem"))?,
                std::fs::read(certs.join("client-key.pem"))?,
            ))
        } else {
            None
        },
    })
}
