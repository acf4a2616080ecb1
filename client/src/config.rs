//! What the client reads from a cluster's config.json: where the servers are, the hosts
//! their certificates must name, and the data dir (where the launcher keeps the admin token).
//! The server owns the file's meaning; this reads only those keys, with the server's defaults.

use std::path::PathBuf;

use serde_json::Value;

use crate::ClientError;

fn parse(text: &str) -> Result<Value, ClientError> {
    serde_json::from_str(text).map_err(|e| ClientError::Config(e.to_string()))
}

/// The explicit `nodes` list, if the config has one.
fn node_list(v: &Value) -> Option<&Vec<Value>> {
    v.get("nodes").and_then(|n| n.as_array())
}

/// Key `key` of node `n`, the `i`th of the list, as `read` takes it; absent or of another
/// type, an error that names it.
fn node_key<'a, T>(
    n: &'a Value,
    i: usize,
    key: &str,
    read: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, ClientError> {
    n.get(key)
        .and_then(read)
        .ok_or_else(|| ClientError::Config(format!("nodes[{i}].{key} is missing")))
}

/// The shorthand's node count and host, with the server's defaults (3, 127.0.0.1).
fn shorthand(v: &Value) -> (u64, &str) {
    let servers = v.get("servers").and_then(|s| s.as_u64()).unwrap_or(3);
    let host = v
        .get("host")
        .and_then(|s| s.as_str())
        .unwrap_or("127.0.0.1");
    (servers, host)
}

/// The client addresses of a config.json, in node order: the explicit `nodes` list, or the
/// shorthand `servers`/`host`/`base_port` (defaults 3, 127.0.0.1, 50051).
pub fn addrs_from_config(text: &str) -> Result<Vec<String>, ClientError> {
    let v = parse(text)?;
    if let Some(nodes) = node_list(&v) {
        let mut with_ids = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let addr = node_key(n, i, "addr", Value::as_str)?;
            let id = n.get("id").and_then(|i| i.as_u64()).unwrap_or(i as u64);
            with_ids.push((id, addr.to_string()));
        }
        with_ids.sort();
        return Ok(with_ids.into_iter().map(|(_, a)| a).collect());
    }
    let (servers, host) = shorthand(&v);
    let base = v.get("base_port").and_then(|s| s.as_u64()).unwrap_or(50051);
    Ok((0..servers)
        .map(|k| format!("{host}:{}", base + k))
        .collect())
}

/// The `data_dir` of a config.json, as written (default `data`): a relative one is relative
/// to the current directory, as the server takes it.
pub fn data_dir_from_config(text: &str) -> Result<PathBuf, ClientError> {
    match parse(text)?.get("data_dir") {
        None | Some(Value::Null) => Ok(PathBuf::from("data")),
        Some(Value::String(dir)) => Ok(PathBuf::from(dir)),
        Some(_) => Err(ClientError::Config("data_dir is not a string".into())),
    }
}

/// The host of a `host:port` address, as a certificate must name it.
fn host_of(addr: &str) -> Result<String, ClientError> {
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return Ok(a.ip().to_string());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(host.to_string())
        }
        _ => Err(ClientError::Config(format!(
            "`{addr}` is not a host:port address"
        ))),
    }
}

/// Each node's id and the hosts it is reached on (client and peer address), from config.json
/// text: for certificates that must name them.
pub fn node_hosts_from_config(text: &str) -> Result<Vec<(u64, Vec<String>)>, ClientError> {
    let v = parse(text)?;
    if let Some(nodes) = node_list(&v) {
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let id = node_key(n, i, "id", Value::as_u64)?;
            let mut hosts = Vec::new();
            for key in ["addr", "peer_addr"] {
                hosts.push(host_of(node_key(n, i, key, Value::as_str)?)?);
            }
            hosts.dedup();
            out.push((id, hosts));
        }
        return Ok(out);
    }
    let (servers, host) = shorthand(&v);
    Ok((1..=servers).map(|k| (k, vec![host.to_string()])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_shorthand_and_list() {
        assert_eq!(
            addrs_from_config(r#"{"servers": 2, "base_port": 7000}"#).unwrap(),
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
        let list = r#"{"nodes": [{"id": 2, "addr": "10.0.0.2:1", "peer_addr": "x"},
                                 {"id": 1, "addr": "10.0.0.1:1", "peer_addr": "y"}]}"#;
        assert_eq!(
            addrs_from_config(list).unwrap(),
            vec!["10.0.0.1:1", "10.0.0.2:1"]
        );
    }

    #[test]
    fn data_dir_as_written_or_the_default() {
        assert_eq!(data_dir_from_config("{}").unwrap(), PathBuf::from("data"));
        assert_eq!(
            data_dir_from_config(r#"{"data_dir": "/var/lib/seq"}"#).unwrap(),
            PathBuf::from("/var/lib/seq")
        );
        assert_eq!(
            data_dir_from_config(r#"{"data_dir": "rel/dir"}"#).unwrap(),
            PathBuf::from("rel/dir")
        );
        let e = data_dir_from_config(r#"{"data_dir": 3}"#).unwrap_err();
        assert_eq!(e.to_string(), "config: data_dir is not a string");
    }

    #[test]
    fn hosts_of_each_node_once_and_errors_that_name_the_key() {
        let list = r#"{"nodes": [{"id": 1, "addr": "db1:1", "peer_addr": "db1:2"},
                                 {"id": 2, "addr": "10.0.0.2:1", "peer_addr": "[::1]:2"}]}"#;
        assert_eq!(
            node_hosts_from_config(list).unwrap(),
            vec![
                (1, vec!["db1".to_string()]),
                (2, vec!["10.0.0.2".to_string(), "::1".to_string()])
            ]
        );
        let e = node_hosts_from_config(r#"{"nodes": [{"id": 1, "addr": "a:1"}]}"#).unwrap_err();
        assert_eq!(e.to_string(), "config: nodes[0].peer_addr is missing");
        let e = addrs_from_config("{").unwrap_err();
        assert!(e.to_string().starts_with("config: "), "{e}");
    }
}
