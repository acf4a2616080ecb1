//! Config loading and validation.

// figment's Jail closures must return its large error type.
#![allow(clippy::result_large_err)]
use std::path::{Path, PathBuf};

use super::*;

#[test]
fn shorthand_expands_to_nodes() {
    let c = Config::from_json(r#"{"servers": 2, "base_port": 7000, "base_peer_port": 8000, "cluster_secret": "a-test-secret-0123"}"#)
        .unwrap();
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.nodes[1].addr, "127.0.0.1:7001");
    assert_eq!(c.nodes[1].peer_addr, "127.0.0.1:8001");
}

#[test]
fn unknown_key_is_named() {
    let e = Config::from_json(r#"{"servers": 3, "sevrers": 2}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sevrers"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn duplicate_id_and_address_are_named() {
    let dup_id = r#"{"nodes": [{"id":1,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"},
                               {"id":1,"addr":"127.0.0.1:3","peer_addr":"127.0.0.1:4"}]}"#;
    let e = Config::from_json(dup_id).unwrap_err().to_string();
    assert!(e.contains("nodes[1].id") && e.contains("duplicate"), "{e}");
    let dup_addr = r#"{"nodes": [{"id":1,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"},
                                 {"id":2,"addr":"127.0.0.1:2","peer_addr":"127.0.0.1:4"}]}"#;
    let e = Config::from_json(dup_addr).unwrap_err().to_string();
    assert!(
        e.contains("nodes[1].addr") && e.contains("duplicate address"),
        "{e}"
    );
}

#[test]
fn bad_values_are_named() {
    for (json, key) in [
        (r#"{"servers": 0}"#, "servers"),
        (r#"{"max_batch": 0}"#, "max_batch"),
        (
            r#"{"heartbeat_interval_ms": 500}"#,
            "election_timeout_min_ms",
        ),
        (r#"{"servers": "three"}"#, "servers"),
        (
            r#"{"request_timeout_ms": 18446744073709551615}"#,
            "request_timeout_ms",
        ),
        (
            r#"{"nodes": [{"id":4294967296,"addr":"127.0.0.1:1","peer_addr":"127.0.0.1:2"}]}"#,
            "nodes[0].id",
        ),
        (
            r#"{"nodes": [{"id":1,"addr":"nowhere","peer_addr":"127.0.0.1:2"}]}"#,
            "nodes[0].addr",
        ),
        (
            r#"{"retain_bytes": 2097152, "retain_total_bytes": 1048576}"#,
            "retain_total_bytes",
        ),
    ] {
        let e = Config::from_json(json).unwrap_err().to_string();
        assert!(e.contains(key), "{json}: {e}");
    }
}

#[test]
fn environment_overrides_the_file_and_is_checked() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("config.json", r#"{"max_batch": 10}"#)?;
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "a-test-secret-0123");
        jail.set_env("SEQUENCER_MAX_BATCH", "20");
        let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
        assert_eq!(c.batching.max_batch, 20);
        jail.set_env("SEQUENCER_MAX_BATCH", "lots");
        let e = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("max_batch"), "{e}");
        jail.set_env("SEQUENCER_MAX_BATCH", "20");
        jail.set_env("SEQUENCER_MAX_BATHC", "1");
        let e = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("max_bathc"), "{e}");
        Ok(())
    });
}

#[test]
fn a_secret_from_the_environment_is_taken_verbatim_and_never_printed() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "config.json",
            r#"{"cluster_secret": "from-the-config-file"}"#,
        )?;
        // All digits, with a leading zero: a number to figment, a string to us.
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "0123456789012345678");
        let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
        assert!(c.cluster_secret.unwrap().matches(b"0123456789012345678"));
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "0123");
        let e = Config::load(Path::new("config.json"), true, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster_secret") && !e.contains("0123"), "{e}");
        Ok(())
    });
}

#[test]
fn flags_override_everything() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "config.json",
            r#"{"data_dir": "from-file", "worker_threads": 4}"#,
        )?;
        jail.set_env("SEQUENCER_DATA_DIR", "from-env");
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "a-test-secret-0123");
        let c = Config::load(Path::new("config.json"), true, &Overrides::default()).unwrap();
        assert_eq!(c.worker_threads, Some(4));
        let flags = Overrides {
            data_dir: Some("from-flag".into()),
            worker_threads: Some(1),
            servers: None,
        };
        let c = Config::load(Path::new("config.json"), true, &flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("from-flag"));
        assert_eq!(c.worker_threads, Some(1));
        Ok(())
    });
}

#[test]
fn worker_threads_are_optional_and_bounded() {
    assert_eq!(
        Config::from_json(r#"{"servers": 1}"#)
            .unwrap()
            .worker_threads,
        None
    );
    for bad in ["0", "1025"] {
        let e = Config::from_json(&format!(r#"{{"worker_threads": {bad}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker_threads"), "{e}");
    }
}

#[test]
fn the_clients_exports_do_not_break_the_server_and_a_bad_variable_is_named() {
    figment::Jail::expect_with(|jail| {
        // What `eval $(client register ...)` leaves in the shell.
        jail.set_env("SEQUENCER_CLIENT_ID", "7");
        jail.set_env("SEQUENCER_TOKEN", "abc");
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "a-test-secret-0123");
        Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
        jail.set_env("SEQUENCER_MAX_BATHC", "1");
        let e = Config::load(Path::new("none.json"), false, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment variable SEQUENCER_MAX_BATHC"),
            "{e}"
        );
        jail.set_env("SEQUENCER_MAX_BATHC", "");
        jail.set_env("SEQUENCER_MAX_BATCH", "lots");
        let e = Config::load(Path::new("none.json"), false, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("SEQUENCER_MAX_BATCH"), "{e}");
        Ok(())
    });
}

#[test]
fn host_names_are_addresses_and_bad_ones_are_named() {
    let c = Config::from_json(
        r#"{"nodes": [{"id":1,"addr":"localhost:22001","peer_addr":"node-1.example:23001"},
                     {"id":2,"addr":"[::1]:22002","peer_addr":"10.0.0.2:23002"}],
            "cluster_secret": "a-test-secret-0123"}"#,
    )
    .unwrap();
    assert_eq!(c.nodes[0].addr, "localhost:22001");
    for (addr, why) in [
        ("localhost", "host:port"),
        ("localhost:0", "port"),
        ("localhost:99999", "port"),
        ("bad_name:1", "host name"),
        ("-bad:1", "host name"),
        (":1", "host name"),
    ] {
        let json =
            format!(r#"{{"nodes": [{{"id":1,"addr":"{addr}","peer_addr":"127.0.0.1:2"}}]}}"#);
        let e = Config::from_json(&json).unwrap_err().to_string();
        assert!(
            e.contains("nodes[0].addr") && e.contains(why),
            "{addr}: {e}"
        );
    }
    let e = Config::from_json(r#"{"host": "no such host!"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `host`"), "{e}");
}

#[test]
fn overlapping_shorthand_ports_name_the_users_keys() {
    let e = Config::from_json(r#"{"servers": 3, "base_port": 7000, "base_peer_port": 7002}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("base_peer_port") && e.contains("base_port") && !e.contains("nodes["),
        "{e}"
    );
    // Adjacent ranges do not overlap.
    Config::from_json(
        r#"{"servers": 3, "base_port": 7000, "base_peer_port": 7003, "cluster_secret": "a-test-secret-0123"}"#,
    )
    .unwrap();
}

#[test]
fn the_launchers_secret_in_the_data_dir_is_used_when_none_is_configured() {
    figment::Jail::expect_with(|jail| {
        std::fs::create_dir_all("data").unwrap();
        jail.create_file("data/cluster.secret", "made-up-by-the-launcher-0123\n")?;
        let c = Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
        assert!(c
            .cluster_secret
            .unwrap()
            .matches(b"made-up-by-the-launcher-0123"));
        // A configured secret wins.
        jail.set_env("SEQUENCER_CLUSTER_SECRET", "from-the-environment-99");
        let c = Config::load(Path::new("none.json"), false, &Overrides::default()).unwrap();
        assert!(c
            .cluster_secret
            .unwrap()
            .matches(b"from-the-environment-99"));
        Ok(())
    });
}

#[test]
fn unparsable_json_is_one_line() {
    let e = Config::from_json("{ servers: ").unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn several_nodes_without_a_secret_are_refused_and_one_node_needs_none() {
    let e = Config::from_json(r#"{"servers": 2}"#).unwrap_err();
    assert!(matches!(e, ConfigError::NoSecret { nodes: 2, .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("cluster_secret") && e.contains(CLUSTER_SECRET_ENV) && !e.contains('\n'),
        "{e}"
    );
    let c = Config::from_json(r#"{"servers": 1}"#).unwrap();
    assert!(c.cluster_secret.is_none());
}
