//! The `server` binary as a user meets it: config errors, a busy port, the one-command
//! launcher, and the standard tooling (reflection, health) on the client listener.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sequencer_client::Client;
use sequencer_proto::peer::peer_client::PeerClient;
use sequencer_proto::peer::PingRequest;
use serde_json::json;
use testkit::{free_ports, Cluster};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

mod common;
use common::{channel, spawn_reading_output};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Runs `server` with `args` and returns (success, stderr).
fn run_server(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(SERVER)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("server runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `server` with `args`, which must fail (else the test fails saying it `started`) with
/// one line on stderr; returns that line.
fn refused_in_one_line(args: &[&str], dir: &Path, started: &str) -> String {
    let (ok, stderr) = run_server(args, dir);
    assert!(!ok, "{started}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    stderr
}

#[test]
fn a_bad_config_exits_non_zero_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (r#"{"servers": 3, "bogus": 1}"#, "bogus"),
        (r#"{"servers": "three"}"#, "servers"),
        (r#"{"servers": 3, "base_port": "#, "config"),
        (
            r#"{"nodes": [{"id": 1, "addr": "127.0.0.1:7001", "peer_addr": "127.0.0.1:7002"},
                          {"id": 1, "addr": "127.0.0.1:7003", "peer_addr": "127.0.0.1:7004"}]}"#,
            "nodes[1].id",
        ),
        (
            r#"{"nodes": [{"id": 1, "addr": "127.0.0.1:7001", "peer_addr": "127.0.0.1:7002"},
                          {"id": 2, "addr": "127.0.0.1:7001", "peer_addr": "127.0.0.1:7004"}]}"#,
            "nodes[1].addr",
        ),
        (
            r#"{"election_timeout_min_ms": 50}"#,
            "election_timeout_min_ms",
        ),
        (r#"{"cluster_secret": "short"}"#, "cluster_secret"),
        (
            r#"{"cluster_secret": "a secret with spaces in it"}"#,
            "cluster_secret",
        ),
        (r#"{"tls_cert": "node.pem"}"#, "tls_key"),
        (
            r#"{"tls_cert": "node.pem", "tls_key": "key.pem"}"#,
            "tls_ca",
        ),
        (r#"{"tls_client_auth": true}"#, "tls_cert"),
    ];
    let path = dir.path().join("config.json");
    for (text, key) in cases {
        std::fs::write(&path, text).unwrap();
        // Both the launcher and a single node check the config before anything else.
        for args in [
            vec!["--config", "config.json"],
            vec!["--config", "config.json", "--node", "1"],
        ] {
            let (ok, stderr) = run_server(&args, dir.path());
            assert!(!ok, "{text}: server accepted a bad config");
            assert_eq!(
                stderr.trim().lines().count(),
                1,
                "{text}: not one line: {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{text}: `{stderr}` does not name `{key}`"
            );
        }
    }
    // The flag goes through the same checks as the key it overrides.
    std::fs::write(&path, r#"{"servers": 1}"#).unwrap();
    for args in [
        vec!["--config", "config.json", "--worker-threads", "0"],
        vec![
            "--config",
            "config.json",
            "--node",
            "1",
            "--worker-threads",
            "0",
        ],
    ] {
        let (ok, stderr) = run_server(&args, dir.path());
        assert!(!ok && stderr.contains("worker_threads"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let (ok, stderr) = run_server(&["--config", "missing.json"], dir.path());
    assert!(!ok && stderr.contains("missing.json"), "{stderr}");
    std::fs::write(
        &path,
        r#"{"servers": 3, "cluster_secret": "a-test-secret-0123"}"#,
    )
    .unwrap();
    let (ok, stderr) = run_server(&["--config", "config.json", "--node", "9"], dir.path());
    assert!(!ok && stderr.contains("node 9"), "{stderr}");
}

#[test]
fn a_node_started_alone_in_a_multi_node_cluster_needs_the_cluster_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = testkit::nodes_config(dir.path(), 3).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let stderr = refused_in_one_line(
        &["--config", "config.json", "--node", "2"],
        dir.path(),
        "node 2 started with no cluster secret",
    );
    assert!(
        stderr.contains("cluster_secret") && stderr.contains("SEQUENCER_CLUSTER_SECRET"),
        "`{stderr}` does not say how to set the secret"
    );
    // Nothing was created for a node that refused to start.
    assert!(!dir.path().join("data").join("node-2").exists());
}

#[test]
fn a_missing_certificate_file_is_named_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = testkit::nodes_config(dir.path(), 1).unwrap();
    config["tls_cert"] = json!("certs/node-{id}.pem");
    config["tls_key"] = json!("certs/node-{id}-key.pem");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let node_1 = ["--config", "config.json", "--node", "1"];
    let stderr = refused_in_one_line(&node_1, dir.path(), "started without its certificate");
    assert!(
        stderr.contains("tls_cert") && stderr.contains("certs/node-1.pem"),
        "`{stderr}` does not name the key and the file"
    );
    assert!(!dir.path().join("data").join("node-1").exists());

    // Files that are there but hold no certificate: the same, one line, no data dir.
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::write(dir.path().join("certs/node-1.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("certs/node-1-key.pem"), "not a key").unwrap();
    let stderr = refused_in_one_line(&node_1, dir.path(), "started with a garbage certificate");
    assert!(stderr.contains("tls_cert"), "{stderr}");
    assert!(!dir.path().join("data").join("node-1").exists());
}

#[test]
fn a_port_in_use_makes_the_node_exit_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let peer = format!("127.0.0.1:{}", free_ports(1).unwrap()[0]);
    let config = json!({"nodes": [{"id": 1, "addr": addr, "peer_addr": peer}], "data_dir": dir.path().join("data")});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let (ok, stderr) = run_server(&["--config", "config.json", "--node", "1"], dir.path());
    assert!(!ok);
    assert!(stderr.contains(&addr), "`{stderr}` does not name {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_starts_every_node_prints_the_table_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = testkit::nodes_config(dir.path(), 3).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let (mut launcher, stdout, stderr) = spawn_reading_output(
        Command::new(SERVER)
            .args(["--config", "config.json"])
            .current_dir(dir.path())
            .stdin(Stdio::null()),
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut table = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stdout
            .recv_timeout(left)
            .expect("the launcher prints `cluster ready`");
        if line.starts_with("cluster ready") {
            break;
        }
        if line.starts_with("node ") {
            table.push(line);
        }
    }
    let addrs: Vec<String> = config["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["addr"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(table.len(), 3, "{table:?}");
    for (i, addr) in addrs.iter().enumerate() {
        assert!(
            table[i].starts_with(&format!("node {}  client {addr}", i + 1)),
            "{table:?}"
        );
    }
    assert_eq!(
        table.iter().filter(|l| l.ends_with("primary")).count(),
        1,
        "{table:?}"
    );

    for addr in &addrs {
        Client::new([addr])
            .unwrap()
            .get_id("")
            .await
            .expect("every node serves");
    }
    let logs: Vec<String> = stderr.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.starts_with("node1 | ")),
        "child output is not prefixed: {logs:?}"
    );
    // Nodes on one host share its cores.
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = format!("worker_threads={}", (cores / 3).max(1));
    let started: Vec<&String> = logs.iter().filter(|l| l.contains("node started")).collect();
    assert_eq!(started.len(), 3, "{logs:?}");
    assert!(started.iter().all(|l| l.contains(&threads)), "{started:?}");

    // SIGTERM to the launcher we started stops every node, then the launcher itself.
    unsafe {
        libc::kill(launcher.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "launcher did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    for addr in &addrs {
        assert!(
            TcpStream::connect(addr).is_err(),
            "node at {addr} still listening after stop"
        );
    }
}

#[test]
fn the_launcher_exits_non_zero_when_a_node_dies_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = testkit::nodes_config(dir.path(), 3).unwrap();
    let busy = TcpListener::bind(config["nodes"][1]["addr"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let (ok, stderr) = run_server(&["--config", "config.json"], dir.path());
    drop(busy);
    assert!(!ok, "launcher succeeded with a dead node");
    assert!(stderr.contains("node 2 exited"), "{stderr}");
}

/// Sends `req` to the reflection service and returns its first answer.
async fn ask(
    reflection: &mut ServerReflectionClient<Channel>,
    req: MessageRequest,
) -> Option<MessageResponse> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap().message_response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_public_services_and_never_the_peer_service() {
    let mut cluster = Cluster::builder(SERVER).nodes(1).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let node = cluster.node(1);
    let mut reflection = ServerReflectionClient::new(channel(&node.addr).await);
    let Some(MessageResponse::ListServicesResponse(list)) =
        ask(&mut reflection, MessageRequest::ListServices(String::new())).await
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "sequencer.v1.Sequencer",
        "sequencer.v1.Cluster",
        "sequencer.v1.Tracker",
        "sequencer.v1.Messenger",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("peer")),
        "peer service listed: {names:?}"
    );

    // grpcurl `describe` needs the file that defines a symbol.
    let symbol = MessageRequest::FileContainingSymbol("sequencer.v1.Sequencer".into());
    let Some(MessageResponse::FileDescriptorResponse(files)) = ask(&mut reflection, symbol).await
    else {
        panic!("no descriptor for sequencer.v1.Sequencer");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // The peer service answers only on the peer address.
    let on_client = PeerClient::new(channel(&node.addr).await)
        .ping(PingRequest {})
        .await;
    assert_eq!(on_client.unwrap_err().code(), tonic::Code::Unimplemented);
    // And there only with the cluster secret.
    let mut peer = PeerClient::new(channel(&node.peer_addr).await);
    let stranger = peer.ping(PingRequest {}).await;
    assert_eq!(stranger.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut ping = tonic::Request::new(PingRequest {});
    let secret = cluster.cluster_secret().unwrap().parse().unwrap();
    ping.metadata_mut().insert("x-cluster-secret", secret);
    assert_eq!(peer.ping(ping).await.unwrap().into_inner().node_id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_dir_refuses_naming_the_holder_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;

    let mut cluster = Cluster::builder(SERVER).nodes(1).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let holder = cluster.node(1).pid().unwrap();
    let data = cluster.dir().join("data");

    // The same node's data on other ports, so only the data dir stands in the way.
    let ports = free_ports(2).unwrap();
    let other = json!({"nodes": [{"id": 1, "addr": format!("127.0.0.1:{}", ports[0]),
                                  "peer_addr": format!("127.0.0.1:{}", ports[1])}],
                       "data_dir": data});
    std::fs::write(cluster.dir().join("other.json"), other.to_string()).unwrap();
    let (ok, stderr) = run_server(&["--config", "other.json", "--node", "1"], cluster.dir());
    assert!(!ok, "a second process opened a data dir in use");
    let node_dir = data.join("node-1");
    assert!(stderr.contains(&node_dir.display().to_string()), "{stderr}");
    assert!(stderr.contains(&format!("pid {holder}")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // The node it ran into is untouched.
    cluster.client().get_id("").await.unwrap();

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&node_dir), 0o700);
    assert_eq!(mode(&node_dir.join("raft.redb")), 0o600);
    assert_eq!(mode(&node_dir.join("LOCK")), 0o600);
    assert_eq!(mode(&node_dir.join("STORE")), 0o600);
}

/// A one-node cluster that handed out ids and stopped cleanly, and the path of its store.
async fn stopped_node_with_a_store() -> (Cluster, std::path::PathBuf) {
    let mut cluster = Cluster::builder(SERVER).nodes(1).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    cluster.client().get_ids("", 500).await.unwrap();
    let status = cluster.signal_and_wait(1, libc::SIGTERM).unwrap();
    assert!(status.success(), "node stopped with {status}");
    let store = cluster.dir().join("data").join("node-1").join("raft.redb");
    (cluster, store)
}

/// Starts the node of `stopped_node_with_a_store` again: it must refuse (else the test fails
/// saying it `started`) in one line that calls its store `state` and names the file.
fn the_node_refuses_its_store(cluster: &Cluster, store: &Path, started: &str, state: &str) {
    let stderr = refused_in_one_line(
        &["--config", "config-1.json", "--node", "1"],
        cluster.dir(),
        started,
    );
    assert!(
        stderr.contains(state) && stderr.contains(&store.display().to_string()),
        "`{stderr}` does not name the {state} file {}",
        store.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_stops_the_node_at_start_with_one_line() {
    let (cluster, store) = stopped_node_with_a_store().await;
    let len = std::fs::metadata(&store).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let started = "the node served from a truncated store";
    the_node_refuses_its_store(&cluster, &store, started, "corrupt");
    // Refused, not reset: the file is left as it was found, for whoever investigates.
    assert_eq!(std::fs::metadata(&store).unwrap().len(), len / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_store_stops_the_node_at_start_rather_than_making_a_new_one() {
    let (cluster, store) = stopped_node_with_a_store().await;
    std::fs::remove_file(&store).unwrap();
    let started = "the node started without its store";
    the_node_refuses_its_store(&cluster, &store, started, "missing");
    assert!(!store.exists(), "a new, empty store was made");
}
