//! For tests that start `server` themselves: a config on free ports, certificates made by the
//! real `client gen-certs`, and where this build's binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::free_ports;

/// A config of `n` nodes on free 127.0.0.1 ports with an explicit `nodes` list and its data
/// under `dir/data`, for tests that start `server` themselves.
pub fn nodes_config(dir: &Path, n: usize) -> anyhow::Result<Value> {
    let ports = free_ports(3 * n)?;
    let nodes: Vec<Value> = (0..n)
        .map(|i| {
            json!({"id": i + 1, "addr": format!("127.0.0.1:{}", ports[3 * i]),
                   "peer_addr": format!("127.0.0.1:{}", ports[3 * i + 1]),
                   "http_addr": format!("127.0.0.1:{}", ports[3 * i + 2])})
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

/// Where the `server` binary of this build is, given any binary of the same target dir.
pub fn sibling_binary(known: &str, name: &str) -> PathBuf {
    Path::new(known).with_file_name(name)
}

/// Registers `name`, keeps it alive and joins `group`; returns its identity, the join's
/// `next_seq`, and the guard that keeps it alive. The heartbeats go from a client of their
/// own, as a separate process would: HTTP/2 flow control is per connection, and a test's
/// unread subscription must not hold them up.
pub async fn member(
    client: &sequencer_client::Client,
    name: &str,
    group: &str,
) -> (sequencer_client::Identity, u64, sequencer_client::KeepAlive) {
    use sequencer_client::{Client, Identity};
    let me = Identity::from(&client.register(name).await.expect("register"));
    let alive = Client::new(client.addrs())
        .expect("the same addresses")
        .keep_alive(&me);
    let joined = client.join(&me, group).await.expect("join");
    (me, joined.next_seq, alive)
}
