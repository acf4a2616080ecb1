//! The HTTP face of a node against real clusters: the JSON API hands out the same ids with the
//! same checks as gRPC, the probes follow the primary and a cut-off node, /metrics moves with
//! the load (parsed by the Prometheus project's own parser), and `log_format: "json"`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::http::{get, post, Answer};
use testkit::Cluster;
use tonic::Code;

mod common;
use common::primary_and_follower;

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Polls `path` on `addr` until it answers `status`, or fails after `within`.
async fn wait_status(addr: &str, path: &str, status: u16, within: Duration) -> Answer {
    let end = Instant::now() + within;
    loop {
        let answer = get(addr, path).await;
        match answer {
            Ok(a) if a.status == status => return a,
            other if Instant::now() > end => {
                panic!("{addr}{path} did not answer {status} within {within:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn error_of(a: &Answer) -> (String, String) {
    let body = a.json().unwrap();
    let e = &body["error"];
    (
        e["code"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_hands_out_the_ids_grpc_does_with_the_same_checks() {
    let mut cluster = Cluster::builder(SERVER)
        .set("max_batch", 100)
        .set("max_sequences", 3)
        .start()
        .unwrap();
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    let (on_primary, on_follower) = (
        cluster.node(primary).http_addr.clone(),
        cluster.node(follower).http_addr.clone(),
    );
    let grpc = cluster.client();

    // HTTP and gRPC calls, through the primary and a follower, take from one dense sequence.
    let mut ids = Vec::new();
    for round in 0..5 {
        let a = post(&on_follower, "/v1/sequences/orders/next")
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        let body = a.json().unwrap();
        assert_eq!(body["served_by"], follower, "{body}");
        assert_eq!(body["primary"], primary, "{body}");
        ids.push(body["id"].as_u64().unwrap());

        let block = post(&on_primary, "/v1/sequences/orders/ids?count=4")
            .await
            .unwrap()
            .json()
            .unwrap();
        let first = block["first"].as_u64().unwrap();
        assert_eq!(block["count"], 4, "{block}");
        assert_eq!(block["last"].as_u64(), Some(first + 3), "{block}");
        assert_eq!(block["served_by"], primary, "{block}");
        ids.extend(first..=first + 3);

        ids.push(grpc.get_id("orders").await.unwrap().id);
        let got = grpc.get_ids("orders", 2).await.unwrap();
        ids.extend(got.first..got.first + 2);
        assert!(round < 5);
    }
    let expected: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(ids, expected, "ids in call order are not 1, 2, 3, ...");

    // Every node reports the same current id once it has applied the last call.
    cluster
        .wait_current_id("orders", *ids.last().unwrap())
        .await
        .unwrap();
    for id in cluster.ids() {
        let a = get(&cluster.node(id).http_addr, "/v1/sequences/orders")
            .await
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(a["id"].as_u64(), ids.last().copied(), "node {id}: {a}");
        assert_eq!(a["served_by"], id, "{a}");
        assert_eq!(a["name"], "orders", "{a}");
        assert!(a["applied_index"].as_u64().unwrap() > 0, "{a}");
    }

    // A bad name: the status and the message gRPC gives.
    let a = post(&on_follower, "/v1/sequences/bad*name/next")
        .await
        .unwrap();
    assert_eq!(a.status, 400, "{}", a.text());
    let grpc_err = grpc.get_id("bad*name").await.unwrap_err();
    assert_eq!(grpc_err.code(), Code::InvalidArgument);
    assert_eq!(
        error_of(&a),
        (
            "INVALID_ARGUMENT".to_string(),
            grpc_err.status().unwrap().message().to_string()
        )
    );
    for (query, names) in [
        ("", "count is required"),
        ("?count=0", "max_batch"),
        ("?count=101", "max_batch"),
        ("?count=ten", "whole number"),
        ("?count=-1", "whole number"),
        ("?count=1&count=2", "more than once"),
        ("?count=1&size=2", "unknown query parameter"),
    ] {
        let a = post(&on_primary, &format!("/v1/sequences/orders/ids{query}"))
            .await
            .unwrap();
        let (code, message) = error_of(&a);
        assert_eq!(
            (a.status, code.as_str()),
            (400, "INVALID_ARGUMENT"),
            "{query}"
        );
        assert!(message.contains(names), "{query}: {message}");
    }

    // A limit reached: 429, as gRPC says RESOURCE_EXHAUSTED; no hint to come back, since
    // waiting does not lift it.
    for name in ["two", "three"] {
        let a = post(&on_follower, &format!("/v1/sequences/{name}/next"))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
    }
    let a = post(&on_follower, "/v1/sequences/four/next").await.unwrap();
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(error_of(&a).0, "RESOURCE_EXHAUSTED");
    assert!(a.headers.get("retry-after").is_none(), "{:?}", a.headers);
    assert_eq!(
        grpc.get_id("four").await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // What no route serves, and a method a route does not take.
    let a = get(&on_primary, "/v1/nothing").await.unwrap();
    assert_eq!((a.status, error_of(&a).0.as_str()), (404, "NOT_FOUND"));
    let a = get(&on_primary, "/v1/sequences/orders/next").await.unwrap();
    assert_eq!(a.status, 405, "{}", a.text());
    assert!(error_of(&a).1.contains("GET"), "{}", a.text());

    // /v1/cluster says what Cluster.Status says.
    let status = cluster.client_for(follower).status().await.unwrap();
    let body = get(&on_follower, "/v1/cluster")
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(body["node_id"], follower);
    assert_eq!(body["primary"], status.primary);
    assert_eq!(body["role"], "follower");
    let nodes = body["nodes"].as_array().unwrap();
    let listed: Vec<u64> = nodes.iter().map(|n| n["id"].as_u64().unwrap()).collect();
    assert_eq!(listed, cluster.ids());
    for n in nodes {
        assert_eq!(n["reachable"], true, "{n}");
        assert_eq!(n["primary"], n["id"] == primary, "{n}");
        assert_eq!(n["role"], "voter", "{n}");
        assert_eq!(n["term"].as_u64(), Some(status.term), "{n}");
        assert!(n["lag"].as_u64().is_some(), "{n}");
        let addr = &cluster.node(n["id"].as_u64().unwrap()).addr;
        assert_eq!(n["addr"], addr.as_str(), "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_on_a_node_cut_off_from_the_others_and_healthz_does_not() {
    let mut cluster = Cluster::builder(SERVER).with_proxies().start().unwrap();
    let (_, cut) = primary_and_follower(&mut cluster).await;
    let within = Duration::from_secs(15);
    for id in cluster.ids() {
        let addr = cluster.node(id).http_addr.clone();
        assert_eq!(get(&addr, "/healthz").await.unwrap().status, 200);
        let ready = wait_status(&addr, "/readyz", 200, within).await;
        assert_eq!(ready.json().unwrap()["status"], "ready");
    }

    cluster.isolate(cut);
    let addr = cluster.node(cut).http_addr.clone();
    let started = Instant::now();
    let not_ready = wait_status(&addr, "/readyz", 503, within).await;
    let body = not_ready.json().unwrap();
    assert_eq!(body["status"], "not ready", "{body}");
    assert!(!body["reason"].as_str().unwrap().is_empty(), "{body}");
    println!("cut-off node {cut} not ready after {:?}", started.elapsed());
    // The process still serves: a liveness probe must not restart it.
    assert_eq!(get(&addr, "/healthz").await.unwrap().status, 200);
    // The other two keep a quorum and stay ready.
    let others: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != cut).collect();
    cluster.wait_for_primary_among(&others).await.unwrap();
    for id in &others {
        wait_status(&cluster.node(*id).http_addr, "/readyz", 200, within).await;
    }

    cluster.heal();
    wait_status(&addr, "/readyz", 200, within).await;
}

/// The families of node `addr`'s /metrics, as the Prometheus project's parser reads them.
async fn scrape(addr: &str) -> Vec<Value> {
    let a = get(addr, "/metrics").await.unwrap();
    assert_eq!(a.status, 200);
    let kind = a.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/parse_metrics.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&a.body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics (pip install prometheus-client): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Samples named `name` whose labels include `labels`, summed.
fn value(families: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(families, name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

fn samples<'a>(families: &'a [Value], name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .filter(move |s| s["name"] == name)
}

/// Buckets ascend, never fall, and the +Inf one holds every observation.
fn assert_histogram(families: &[Value], name: &str, labels: &[(&str, &str)]) {
    let bucket = format!("{name}_bucket");
    let buckets: Vec<(f64, f64)> = samples(families, &bucket)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| {
            let le = s["labels"]["le"].as_str().unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s["value"].as_f64().unwrap())
        })
        .collect();
    assert!(buckets.len() > 5, "{name}{labels:?}: buckets {buckets:?}");
    assert!(buckets
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    let (le, inf) = *buckets.last().unwrap();
    assert!(le.is_infinite(), "{name}: no +Inf bucket");
    assert_eq!(
        inf,
        value(families, &format!("{name}_count"), labels),
        "{name}"
    );
    assert!(inf > 0.0, "{name}{labels:?} observed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_load_and_read_with_the_prometheus_parser() {
    let mut cluster = Cluster::builder(SERVER)
        .set("max_sequences", 2)
        .set("snapshot_logs", 20)
        .start()
        .unwrap();
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    let (p_addr, f_addr) = (
        cluster.node(primary).http_addr.clone(),
        cluster.node(follower).http_addr.clone(),
    );
    let before = scrape(&f_addr).await;

    // Load through the follower: gRPC and HTTP, single ids and blocks, and one refusal.
    let client = cluster.client_for(follower);
    let calls = (0..200).map(|_| client.get_id("load"));
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    for _ in 0..5 {
        client.get_ids("load", 10).await.unwrap();
    }
    for _ in 0..20 {
        assert_eq!(
            post(&f_addr, "/v1/sequences/load/next")
                .await
                .unwrap()
                .status,
            200
        );
    }
    client.get_id("second").await.unwrap();
    let refused = client.get_id("third").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let after = scrape(&f_addr).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(delta("sequencer_ids_issued_total", &[]), 271.0);
    let get_id = [("rpc", "sequencer.v1.Sequencer/GetId"), ("code", "OK")];
    assert_eq!(delta("sequencer_grpc_requests_total", &get_id), 201.0);
    let exhausted = [
        ("rpc", "sequencer.v1.Sequencer/GetId"),
        ("code", "RESOURCE_EXHAUSTED"),
    ];
    assert_eq!(delta("sequencer_grpc_requests_total", &exhausted), 1.0);
    let next = [("route", "/v1/sequences/{name}/next"), ("status", "200")];
    assert_eq!(delta("sequencer_http_requests_total", &next), 20.0);
    assert!(delta("sequencer_refusals_total", &[("reason", "max_sequences")]) >= 1.0);
    assert!(delta("sequencer_forwards_total", &[("kind", "command")]) >= 1.0);
    assert_histogram(
        &after,
        "sequencer_grpc_request_duration_seconds",
        &[("rpc", "sequencer.v1.Sequencer/GetId")],
    );
    assert_histogram(&after, "sequencer_batch_requests", &[("kind", "ids")]);
    assert_histogram(&after, "sequencer_batch_ids", &[]);
    assert_histogram(&after, "sequencer_journal_fsync_duration_seconds", &[]);
    // Group commit: 200 calls at once took fewer entries than calls.
    let entries = value(&after, "sequencer_batch_requests_count", &[("kind", "ids")])
        - value(
            &before,
            "sequencer_batch_requests_count",
            &[("kind", "ids")],
        );
    assert!(entries < 227.0, "{entries} entries for 227 id requests");

    // Snapshots: the load wrote more than snapshot_logs entries; each node builds its own.
    let end = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let m = scrape(&f_addr).await;
        if value(&m, "sequencer_snapshots_built_total", &[]) >= 1.0 || Instant::now() > end {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(value(&after, "sequencer_snapshots_built_total", &[]) >= 1.0);
    assert!(value(&after, "sequencer_snapshot_size_bytes", &[]) > 0.0);
    assert_histogram(&after, "sequencer_snapshot_build_duration_seconds", &[]);

    // Raft as each node sees it.
    let on_primary = scrape(&p_addr).await;
    assert_eq!(value(&on_primary, "sequencer_is_primary", &[]), 1.0);
    assert_eq!(value(&after, "sequencer_is_primary", &[]), 0.0);
    for m in [&on_primary, &after] {
        assert_eq!(value(m, "sequencer_has_primary", &[]), 1.0);
        assert!(value(m, "sequencer_raft_term", &[]) >= 1.0);
        assert!(value(m, "sequencer_raft_applied_index", &[]) > 0.0);
        assert!(value(m, "sequencer_data_dir_bytes", &[]) > 0.0);
        assert!(value(m, "process_resident_memory_bytes", &[]) > 0.0);
        assert!(value(m, "process_open_fds", &[]) > 0.0);
        assert_eq!(value(m, "sequencer_sequences", &[]), 2.0);
    }
    let lagging: BTreeSet<String> = samples(&on_primary, "sequencer_replication_lag_entries")
        .map(|s| s["labels"]["member"].as_str().unwrap().to_string())
        .collect();
    let others: BTreeSet<String> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != primary)
        .map(|id| id.to_string())
        .collect();
    assert_eq!(lagging, others);
    assert_eq!(
        samples(&after, "sequencer_replication_lag_entries").count(),
        0
    );

    // Conventions: our prefix or the standard process_ one, counters end in _total, and
    // every family says what it is.
    let mut types = BTreeMap::new();
    for f in &after {
        let name = f["name"].as_str().unwrap();
        assert!(
            name.starts_with("sequencer_") || name.starts_with("process_"),
            "{name}"
        );
        assert!(
            !f["help"].as_str().unwrap().is_empty(),
            "{name} has no help"
        );
        if f["type"] == "counter" {
            for s in f["samples"].as_array().unwrap() {
                assert!(s["name"].as_str().unwrap().ends_with("_total"), "{s}");
            }
        }
        types.insert(name.to_string(), f["type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        types["sequencer_grpc_request_duration_seconds"],
        "histogram"
    );
    assert_eq!(types["sequencer_raft_term"], "gauge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_object_per_line() {
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("log_format", "json")
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    cluster.client().get_id("").await.unwrap();
    let log = cluster.log(1);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    // Structured fields stay fields, beside the message.
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "this node is now the primary" && l["node"] == 1),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_http2_too() {
    let mut cluster = Cluster::builder(SERVER).nodes(1).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let tcp = tokio::net::TcpStream::connect(&cluster.node(1).http_addr)
        .await
        .unwrap();
    // Prior knowledge: the connection opens with the HTTP/2 preface, no upgrade.
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::post("/v1/sequences/h2/next")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        bytes.extend_from_slice(&chunk);
    }
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["id"], 1, "{json}");
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_does_not_hold_a_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("max_connections", 2)
        .set("connection_preface_timeout_ms", 500)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let addr = cluster.node(1).http_addr.clone();
    // One caller says nothing; another sends the start of the HTTP/2 preface and stalls,
    // before hyper's own deadlines begin. Together they fill the cap.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(b"PRI * HT").await.unwrap();
    let started = Instant::now();
    // Only once the listener has taken both: a third is turned away while they hold the cap.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = get(&addr, "/healthz").await;
        if answer.is_err() {
            break;
        }
        assert!(
            Instant::now() < end,
            "the cap of 2 let a third connection in: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (what, s) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the {what} connection was not closed: {read:?}"
        );
    }
    let took = started.elapsed();
    println!("silent connections closed after {took:?}");
    assert!(
        took >= Duration::from_millis(400),
        "closed before the deadline: {took:?}"
    );
    // Their places are free again, though this test still holds both sockets.
    assert_eq!(get(&addr, "/healthz").await.unwrap().status, 200);
    drop((silent, stalled));
}
