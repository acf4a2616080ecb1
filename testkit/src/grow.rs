//! Growing a cluster that runs with proxies: nodes added at run time get proxied links too.
//!
//! The nodes that run already read their config when they started, so they reach an added
//! node at the address the Raft membership carries for it, the one its AddMember named. Each
//! added node therefore gets one proxy in front of its peer listener that every other node
//! dials ([`Cluster::member_peer_addr`]: give that to AddMember), written into every other
//! node's config too for their next start; and one proxy per link from it to each other
//! node, in its own config, as [`crate::Builder::with_proxies`] wires them. `isolate` and
//! `heal` then cut and restore every link to and from it.

use std::net::TcpListener;

use anyhow::Context;
use serde_json::Value;

use crate::cluster::{Cluster, Node, PORTS_PER_NODE};
use crate::proxy;

/// The key in `links` of the proxy in front of node `id`'s peer listener, which every node
/// dials: it runs from no one node in particular (ids start at 1).
fn inbound(id: u64) -> (u64, u64) {
    (0, id)
}

impl Cluster {
    /// [`Cluster::add_nodes`] for a cluster with proxies.
    pub(crate) fn add_proxied_nodes(&mut self, n: usize) -> anyhow::Result<Vec<u64>> {
        let (ports, host, added) = self.next_nodes(n)?;
        let existing = self.ids();
        for (i, &id) in added.iter().enumerate() {
            let node = Node::new(id, &host, &ports[PORTS_PER_NODE * i..], self.dir.path());
            self.nodes.push(node);
        }
        // Every node dials an added node through the proxy in front of it.
        let mut front = std::collections::HashMap::new();
        for &id in &added {
            let target = self.node(id).peer_addr.clone();
            front.insert(id, self.proxy(inbound(id), &target)?);
        }
        let entry = |n: &Node, peer: &str| n.entry(peer);
        // The nodes there were: their config lists the added nodes behind their proxies.
        for &id in &existing {
            let path = self.dir.path().join(format!("config-{id}.json"));
            let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            let list = config["nodes"]
                .as_array_mut()
                .with_context(|| format!("{} lists no nodes", path.display()))?;
            for &new in &added {
                list.push(entry(self.node(new), &front[&new]));
            }
            std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        }
        // An added node: itself as it listens, the nodes there were through a proxy per link,
        // the other added nodes through the proxy in front of each.
        let template: Value = serde_json::from_slice(&std::fs::read(&self.config_path)?)?;
        for &me in &added {
            let mut list = Vec::new();
            for id in self.ids() {
                let peer = if id == me {
                    self.node(id).peer_addr.clone()
                } else if let Some(addr) = front.get(&id) {
                    addr.clone()
                } else {
                    let target = self.node(id).peer_addr.clone();
                    self.proxy((me, id), &target)?
                };
                list.push(entry(self.node(id), &peer));
            }
            let mut config = template.clone();
            config["nodes"] = Value::Array(list);
            std::fs::write(
                self.dir.path().join(format!("config-{me}.json")),
                serde_json::to_vec_pretty(&config)?,
            )?;
        }
        Ok(added)
    }

    /// Starts a proxy to `target` for the link `key`; returns its address.
    fn proxy(&mut self, key: (u64, u64), target: &str) -> anyhow::Result<String> {
        let rt = self
            .proxy_runtime
            .as_ref()
            .context("this cluster has no proxies")?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let (tx, rx) = tokio::sync::watch::channel(proxy::Mode::Pass);
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        rt.spawn(proxy::run(listener, target.parse()?, rx));
        self.links.insert(key, tx);
        Ok(addr)
    }

    /// The peer address the membership should carry for node `id`: where the other nodes'
    /// configs say it is (in a cluster with proxies, the proxy in front of a node added at
    /// run time). What an AddMember for it names.
    pub fn member_peer_addr(&self, id: u64) -> anyhow::Result<String> {
        let other = self
            .ids()
            .into_iter()
            .find(|n| *n != id)
            .context("no other node")?;
        let path = self.dir.path().join(format!("config-{other}.json"));
        let config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        config["nodes"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["id"].as_u64() == Some(id)))
            .and_then(|n| n["peer_addr"].as_str())
            .map(String::from)
            .with_context(|| format!("{} does not list node {id}", path.display()))
    }
}
