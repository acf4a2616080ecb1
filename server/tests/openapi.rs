//! The HTTP face's OpenAPI document (server/src/http/openapi.json) against a live node: the
//! node serves it, every operation it lists is routed, real responses have exactly the
//! documented shape, and schemathesis (`pip install schemathesis`, v4) finds no response
//! whose status, content type, headers or body the document does not describe.
//!
//! Both tests run a 1-node cluster. The HTTP client is a plain HTTP/1.1 request over a tokio
//! TcpStream, `Connection: close`, so the tests need no client crate.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sequencer_client::Identity;
use serde_json::Value;
use testkit::Cluster;
use tokio::time::{sleep, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// The document as the node embeds it.
const DOC: &str = include_str!("../src/http/openapi.json");

/// Examples schemathesis generates per operation and phase: enough to reach every documented
/// status, few enough for about 30 s on two cores.
const MAX_EXAMPLES: u32 = 30;

/// The schemathesis cluster's max_sequences (see the test).
const MAX_SEQUENCES: u64 = 5;

/// How long a schemathesis run may take before it is killed and the test fails.
const SCHEMATHESIS_TIMEOUT: Duration = Duration::from_secs(240);

/// The methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One HTTP response, as testkit's client reads it, with a JSON body that must parse.
#[derive(Debug)]
struct Reply(testkit::http::Answer);

impl std::ops::Deref for Reply {
    type Target = testkit::http::Answer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        self.0.json().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Sends `method path` (path with query) to `addr` with an empty body and reads the whole
/// response.
async fn request(addr: &str, method: &str, path: &str) -> anyhow::Result<Reply> {
    testkit::http::request(method, addr, path, None)
        .await
        .map(Reply)
}

/// A 1-node cluster with the given `max_sequences`, once its HTTP face reports ready.
async fn started(max_sequences: u64) -> Cluster {
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("max_sequences", max_sequences)
        .start()
        .expect("cluster starts");
    cluster.wait_for_primary().await.expect("primary elected");
    let addr = cluster.node(1).http_addr.clone();
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    loop {
        match request(&addr, "GET", "/readyz").await {
            Ok(r) if r.status == 200 => break,
            last if Instant::now() >= deadline => panic!(
                "GET http://{addr}/readyz never answered 200: {last:?}\n{}",
                cluster.log_tails()
            ),
            _ => sleep(Duration::from_millis(50)).await,
        }
    }
    cluster
}

/// `v` with every `$ref` (a local JSON pointer) followed.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r.strip_prefix('#').expect("only local $refs");
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

/// Checks `value` against the subset of JSON Schema the document uses ($ref, allOf, type,
/// nullable, enum, required, properties, additionalProperties: false, items, minimum,
/// maximum, minLength, maxLength; not pattern); pushes what does not fit to `errs`.
fn check_schema(doc: &Value, schema: &Value, value: &Value, at: &str, errs: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check_schema(doc, s, value, at, errs);
        }
    }
    if value.is_null() {
        let nullable = schema.get("nullable") == Some(&Value::Bool(true));
        if schema.get("type").is_some() && !nullable {
            errs.push(format!("{at}: null, but not nullable"));
        }
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errs.push(format!("{at}: {value} not one of {allowed:?}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let fits = match ty {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("number") => value.is_number(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{at}: schema type {other} not handled here"),
    };
    if !fits {
        errs.push(format!("{at}: {value} is not of type {}", ty.unwrap()));
        return;
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errs.push(format!("{at}: {value} < minimum {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errs.push(format!("{at}: {value} > maximum {max}"));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
            || schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
        {
            errs.push(format!("{at}: {value} has a length out of range"));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check_schema(doc, item_schema, item, &format!("{at}[{i}]"), errs);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().unwrap();
            if !obj.contains_key(req) {
                errs.push(format!("{at}: required property {req:?} missing"));
            }
        }
        let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check_schema(doc, s, v, &format!("{at}.{k}"), errs),
                None if closed => errs.push(format!("{at}: undocumented property {k:?}")),
                None => {}
            }
        }
    }
}

/// The documented response of `op` for `reply`'s status: asserts the status is documented,
/// and that the reply's required headers and JSON body fit it.
fn check_reply(doc: &Value, label: &str, op: &Value, reply: &Reply) {
    let responses = &op["responses"];
    let documented = responses.get(reply.status.to_string()).unwrap_or_else(|| {
        let listed: Vec<&String> = responses.as_object().unwrap().keys().collect();
        panic!(
            "{label}: status {} is not documented (documented: {listed:?}); body {:?}",
            reply.status,
            reply.text()
        )
    });
    let documented = resolve(doc, documented);
    for (name, header) in documented
        .get("headers")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let header = resolve(doc, header);
        if header.get("required") != Some(&Value::Bool(true)) {
            continue;
        }
        let value = reply.header(name).unwrap_or_else(|| {
            panic!(
                "{label}: {} without the required {name} header: {reply:?}",
                reply.status
            )
        });
        if resolve(doc, &header["schema"])["type"] == "integer" {
            assert!(
                value.parse::<u64>().is_ok(),
                "{label}: {name}: {value:?} is not an integer"
            );
        }
    }
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        return;
    };
    let ctype = reply.header("content-type").unwrap_or("");
    let essence = ctype.split(';').next().unwrap().trim();
    let media = content.get(essence).unwrap_or_else(|| {
        panic!(
            "{label}: {} has content type {ctype:?}, documented: {:?}",
            reply.status,
            content.keys().collect::<Vec<_>>()
        )
    });
    if essence == "application/json" {
        let mut errs = Vec::new();
        check_schema(doc, &media["schema"], &reply.json(), "body", &mut errs);
        assert!(
            errs.is_empty(),
            "{label}: {} body {} does not fit the document:\n  {}",
            reply.status,
            reply.text(),
            errs.join("\n  ")
        );
    }
}

/// Every (path, method, operation, parameters) the document lists, path-level parameters
/// first.
fn operations(doc: &Value) -> Vec<(String, String, Value, Vec<Value>)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let params = [item.get("parameters"), op.get("parameters")]
                .into_iter()
                .flatten()
                .flat_map(|p| p.as_array().unwrap().iter())
                .map(|p| resolve(doc, p).clone())
                .collect();
            out.push((path.clone(), method.to_uppercase(), op.clone(), params));
        }
    }
    out
}

/// `path` with its path parameters filled in and its required query parameters appended,
/// each with a valid value: `name` "orders", an integer its minimum.
fn concrete(doc: &Value, path: &str, params: &[Value]) -> String {
    let value = |p: &Value| -> String {
        let schema = resolve(doc, &p["schema"]);
        match schema["type"].as_str() {
            Some("integer") => schema["minimum"].as_u64().unwrap_or(1).to_string(),
            Some("string") if p["name"] == "name" => "orders".into(),
            _ => panic!("no test value for parameter {p}"),
        }
    };
    let mut out = path.to_string();
    let mut query = Vec::new();
    for p in params {
        let name = p["name"].as_str().unwrap();
        match p["in"].as_str().unwrap() {
            "path" => out = out.replace(&format!("{{{name}}}"), &value(p)),
            "query" if p["required"] == true => query.push(format!("{name}={}", value(p))),
            "query" => {}
            other => panic!("parameter {name} in {other} not handled here"),
        }
    }
    assert!(!out.contains('{'), "unfilled path parameter in {out}");
    if !query.is_empty() {
        out = format!("{out}?{}", query.join("&"));
    }
    out
}

/// GET `path` of `addr`.
async fn get(addr: &str, path: &str) -> Reply {
    request(addr, "GET", path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The operation `method path` (a documented template) of the document.
fn op<'a>(doc: &'a Value, path: &str, method: &str) -> &'a Value {
    doc["paths"][path]
        .get(method)
        .unwrap_or_else(|| panic!("{method} {path} not in the document"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_with_the_documented_shape() {
    // Small, so that a few names reach max_sequences and show the 429.
    let cluster = started(3).await;
    let addr = cluster.node(1).http_addr.clone();
    let addr = addr.as_str();
    // A group with a member and two messages (over gRPC), so /v1/groups lists one.
    let client = cluster.client();
    let me = Identity::from(&client.register("tester").await.unwrap());
    client.join(&me, "chat").await.unwrap();
    for seq in 1..=2 {
        client.send(&me, "chat", seq, b"hi".to_vec()).await.unwrap();
    }

    // The node serves the document it embeds, and it is an OpenAPI 3.0 document.
    let served = get(addr, "/v1/openapi.json").await;
    assert_eq!(served.status, 200, "{served:?}");
    let doc = served.json();
    let embedded: Value = serde_json::from_str(DOC).expect("openapi.json is JSON");
    assert_eq!(
        doc, embedded,
        "GET /v1/openapi.json differs from openapi.json"
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."));
    assert_eq!(doc["servers"][0]["url"], "/");

    // Every documented operation is routed, answers a documented status, and fits.
    let ops = operations(&doc);
    assert!(ops.len() >= 10, "only {} operations documented", ops.len());
    for (path, method, operation, params) in &ops {
        let target = concrete(&doc, path, params);
        let label = format!("{method} {target}");
        let reply = request(addr, method, &target).await.unwrap();
        assert!(
            reply.status != 404 && reply.status != 405,
            "{label}: {} {:?}",
            reply.status,
            reply.text()
        );
        check_reply(&doc, &label, operation, &reply);
    }

    // Real values: ids rise densely from where the loop above left "orders".
    let next = op(&doc, "/v1/sequences/{name}/next", "post");
    let ids = op(&doc, "/v1/sequences/{name}/ids", "post");
    let current = op(&doc, "/v1/sequences/{name}", "get");
    let body = get(addr, "/v1/sequences/orders").await;
    check_reply(&doc, "GET orders", current, &body);
    let before = body.json()["id"].as_u64().unwrap();
    assert!(before >= 2, "next and ids?count=1 ran: {}", body.text());
    let r = request(addr, "POST", "/v1/sequences/orders/next")
        .await
        .unwrap();
    check_reply(&doc, "POST next", next, &r);
    let r = r.json();
    assert_eq!(r["id"], before + 1, "{r}");
    assert_eq!(
        (r["served_by"].as_u64(), r["primary"].as_u64()),
        (Some(1), Some(1))
    );
    let r = request(addr, "POST", "/v1/sequences/orders/ids?count=10")
        .await
        .unwrap();
    check_reply(&doc, "POST ids", ids, &r);
    let r = r.json();
    assert_eq!(
        (&r["first"], &r["count"], &r["last"]),
        (&(before + 2).into(), &10.into(), &(before + 11).into()),
        "{r}"
    );
    let r = get(addr, "/v1/sequences/orders").await.json();
    assert_eq!(
        (&r["name"], &r["id"]),
        (&"orders".into(), &(before + 11).into())
    );
    assert!(r["applied_index"].as_u64().unwrap() > 0, "{r}");
    let r = get(addr, "/v1/sequences/never.used").await;
    check_reply(&doc, "GET never.used", current, &r);
    assert_eq!(r.json()["id"], 0, "{}", r.text());

    let r = get(addr, "/v1/cluster").await.json();
    assert_eq!(
        (&r["node_id"], &r["primary"], &r["role"]),
        (&1.into(), &1.into(), &"leader".into())
    );
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{r}");
    assert_eq!(
        (
            &nodes[0]["reachable"],
            &nodes[0]["primary"],
            &nodes[0]["role"],
            &nodes[0]["lag"]
        ),
        (&true.into(), &true.into(), &"voter".into(), &0.into()),
        "{r}"
    );
    let r = get(addr, "/v1/groups").await.json();
    assert_eq!(r["groups"].as_array().map(Vec::len), Some(1), "{r}");
    let chat = &r["groups"][0];
    assert_eq!(
        (&chat["name"], &chat["members"], &chat["next_seq"]),
        (&"chat".into(), &1.into(), &4.into()),
        "{r}"
    );
    let r = get(addr, "/v1/stats").await.json();
    // Both messages and the join took a group sequence number.
    assert_eq!(r["messages_total"], 3, "{r}");
    assert!(r["ids_total"].as_u64().unwrap() >= before + 11, "{r}");
    assert!(
        r["id_latency_seconds"]["count"].as_u64().unwrap() >= 4,
        "{r}"
    );
    let r = get(addr, "/readyz").await.json();
    assert_eq!((&r["status"], &r["primary"]), (&"ready".into(), &1.into()));
    let r = get(addr, "/healthz").await.json();
    assert_eq!(r, serde_json::json!({"status": "ok"}));
    let r = get(addr, "/metrics").await;
    assert!(
        r.header("content-type").unwrap().starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    assert!(r.text().contains("# TYPE"), "{}", r.text());

    // Bad input: 400 INVALID_ARGUMENT with the error body.
    for (path, target) in [
        (
            "/v1/sequences/{name}/next",
            "/v1/sequences/no%20spaces/next",
        ),
        (
            "/v1/sequences/{name}/next",
            &format!("/v1/sequences/{}/next", "a".repeat(65)),
        ),
        ("/v1/sequences/{name}/ids", "/v1/sequences/orders/ids"),
        (
            "/v1/sequences/{name}/ids",
            "/v1/sequences/orders/ids?count=0",
        ),
        (
            "/v1/sequences/{name}/ids",
            "/v1/sequences/orders/ids?count=1000001",
        ),
        (
            "/v1/sequences/{name}/ids",
            "/v1/sequences/orders/ids?count=ten",
        ),
        ("/v1/sequences/{name}", "/v1/sequences/bad!name"),
    ] {
        let method = if path.ends_with('}') { "GET" } else { "POST" };
        let r = request(addr, method, target).await.unwrap();
        let label = format!("{method} {target}");
        assert_eq!(r.status, 400, "{label}: {r:?}");
        check_reply(&doc, &label, op(&doc, path, &method.to_lowercase()), &r);
        assert_eq!(
            r.json()["error"]["code"],
            "INVALID_ARGUMENT",
            "{label}: {}",
            r.text()
        );
    }
    // An unknown route is 404 NOT_FOUND, a wrong method 405 with Allow, both with the body.
    let r = get(addr, "/v1/no-such-thing").await;
    assert_eq!(r.status, 404, "{r:?}");
    let mut errs = Vec::new();
    let error_schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
    check_schema(&doc, &error_schema, &r.json(), "body", &mut errs);
    assert!(errs.is_empty(), "GET /v1/no-such-thing: {errs:?}");
    assert_eq!(r.json()["error"]["code"], "NOT_FOUND", "{}", r.text());
    let r = request(addr, "DELETE", "/v1/cluster").await.unwrap();
    assert_eq!(r.status, 405, "{r:?}");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("GET")),
        "{r:?}"
    );
    check_schema(&doc, &error_schema, &r.json(), "body", &mut errs);
    assert!(errs.is_empty(), "DELETE /v1/cluster: {errs:?}");
    // POST next of "." reaches the client as POST /v1/sequences/next: the documented 405.
    let r = request(addr, "POST", "/v1/sequences/next").await.unwrap();
    check_reply(&doc, "POST /v1/sequences/next", next, &r);
    assert_eq!(r.status, 405, "{r:?}");

    // New names until max_sequences (3) is reached: 429 RESOURCE_EXHAUSTED with Retry-After.
    let mut exhausted = None;
    for i in 0..10 {
        let target = format!("/v1/sequences/fill-{i}/next");
        let r = request(addr, "POST", &target).await.unwrap();
        check_reply(&doc, &format!("POST {target}"), next, &r);
        if r.status == 429 {
            exhausted = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "POST {target}: {r:?}");
    }
    let r = exhausted.expect("max_sequences 3 never answered 429");
    assert_eq!(
        r.json()["error"]["code"],
        "RESOURCE_EXHAUSTED",
        "{}",
        r.text()
    );
    let r = request(addr, "POST", "/v1/sequences/fill-new/ids?count=5")
        .await
        .unwrap();
    check_reply(&doc, "POST ids of a new name", ids, &r);
    assert_eq!(r.status, 429, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_primary_answers_with_the_documented_errors() {
    // A follower of 3, restarted alone: it cannot win an election, so it knows no primary,
    // and its peers are unreachable. (Not the old primary: openraft restores a leader that
    // restarts as leader of its term, though it cannot commit.)
    let mut cluster = Cluster::builder(SERVER)
        .nodes(3)
        .set("request_timeout_ms", 1000)
        .start()
        .expect("cluster starts");
    let primary = cluster.wait_for_primary().await.expect("primary elected");
    let alone = cluster.ids().into_iter().find(|&id| id != primary).unwrap();
    cluster.kill_all();
    cluster.start_node(alone).unwrap();
    let addr = cluster.node(alone).http_addr.clone();
    let addr = addr.as_str();
    let doc: Value = serde_json::from_str(DOC).unwrap();
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    while request(addr, "GET", "/healthz").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "node {alone} never answered HTTP\n{}",
            cluster.log_tails()
        );
        sleep(Duration::from_millis(50)).await;
    }

    let r = get(addr, "/readyz").await;
    check_reply(&doc, "GET /readyz", op(&doc, "/readyz", "get"), &r);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["status"], "not ready", "{}", r.text());
    let r = get(addr, "/healthz").await;
    check_reply(&doc, "GET /healthz", op(&doc, "/healthz", "get"), &r);

    for (path, target) in [
        ("/v1/sequences/{name}/next", "/v1/sequences/orders/next"),
        (
            "/v1/sequences/{name}/ids",
            "/v1/sequences/orders/ids?count=5",
        ),
    ] {
        let label = format!("POST {target}");
        let r = request(addr, "POST", target).await.unwrap();
        check_reply(&doc, &label, op(&doc, path, "post"), &r);
        assert!(r.status == 503 || r.status == 504, "{label}: {r:?}");
        let code = &r.json()["error"]["code"];
        assert!(
            code == "UNAVAILABLE" || code == "DEADLINE_EXCEEDED",
            "{label}: {}",
            r.text()
        );
    }
    // Reads are local: still answered, and still of the documented shape.
    for (path, target) in [
        ("/v1/sequences/{name}", "/v1/sequences/orders"),
        ("/v1/cluster", "/v1/cluster"),
        ("/v1/groups", "/v1/groups"),
        ("/v1/stats", "/v1/stats"),
    ] {
        let r = get(addr, target).await;
        check_reply(&doc, &format!("GET {target}"), op(&doc, path, "get"), &r);
    }
    // Known in the document as: primary 0, and nulls for what it could not ask its peers.
    let r = get(addr, "/v1/cluster").await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = r.json();
    assert_eq!(r["primary"], 0, "{r}");
    let nodes = r["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{r}");
    for n in nodes.iter().filter(|n| n["id"] != alone) {
        assert_eq!(
            (&n["reachable"], &n["term"], &n["lag"]),
            (&false.into(), &Value::Null, &Value::Null),
            "{r}"
        );
    }
}

/// The schemathesis CLI and its version: `$SCHEMATHESIS` if set, else `schemathesis`, else
/// `st` if that is schemathesis.
fn schemathesis_cli() -> Option<(String, String)> {
    let candidates = match std::env::var("SCHEMATHESIS") {
        Ok(bin) => vec![bin],
        Err(_) => vec!["schemathesis".to_string(), "st".to_string()],
    };
    candidates.into_iter().find_map(|bin| {
        let out = Command::new(&bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "schemathesis, version 4.32.5" (or "st, version ..." through the short name).
        let (_, version) = text.trim().rsplit_once(", version ")?;
        let help = Command::new(&bin).arg("--help").output().ok()?;
        String::from_utf8_lossy(&help.stdout)
            .to_lowercase()
            .contains("schemathesis")
            .then(|| (bin.clone(), version.to_string()))
    })
}

/// Runs `cmd` with output into `log`, killing it (by its own pid) past `limit`; returns the
/// exit code, None when killed.
fn run_with_timeout(cmd: &mut Command, log: &Path, limit: Duration) -> Option<i32> {
    let file = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("schemathesis starts");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_response_the_document_does_not_describe() {
    if std::env::var("SEQUENCER_SKIP_SCHEMATHESIS").as_deref() == Ok("1") {
        println!("SEQUENCER_SKIP_SCHEMATHESIS=1: schemathesis not run");
        return;
    }
    let (bin, version) = schemathesis_cli().unwrap_or_else(|| {
        panic!(
            "this test needs the schemathesis CLI, v4 (`pip install schemathesis`); \
             set SCHEMATHESIS=/path/to/schemathesis if it is not on PATH, or \
             SEQUENCER_SKIP_SCHEMATHESIS=1 to skip it"
        )
    });
    assert!(
        version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            >= Some(4),
        "{bin} is version {version}; this test uses the v4 CLI (`pip install -U schemathesis`)"
    );
    // A small max_sequences: schemathesis draws few distinct valid names (a dozen in a run),
    // so the first ones are allocated (200) and later ones meet the limit: it sees the
    // documented 429 with Retry-After too.
    let cluster = started(MAX_SEQUENCES).await;
    let addr = cluster.node(1).http_addr.clone();
    // The document under test is the one the live node serves. It is handed to schemathesis
    // as a file with the node as base URL: given the document's own URL, schemathesis leaves
    // that operation (GET /v1/openapi.json) out of the run.
    let served = get(&addr, "/v1/openapi.json").await;
    assert_eq!(served.status, 200, "{served:?}");
    let spec = cluster.dir().join("openapi.json");
    std::fs::write(&spec, &served.body).unwrap();
    let log = cluster.dir().join("schemathesis.log");
    let reports = cluster.dir().join("schemathesis-report");
    let har = reports.join("requests.har.json");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(cluster.dir())
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("http://{addr}/")])
        .args(["--checks", "all", "--max-examples"])
        .arg(MAX_EXAMPLES.to_string())
        .args(["--request-timeout", "10", "--generation-database", "none"])
        .args([
            "--no-color",
            "--output-truncate",
            "false",
            "--report",
            "har",
        ])
        .arg("--report-har-path")
        .arg(&har);
    if let Ok(seed) = std::env::var("SEQUENCER_SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let started_at = std::time::Instant::now();
    let code =
        tokio::task::block_in_place(|| run_with_timeout(&mut cmd, &log, SCHEMATHESIS_TIMEOUT));
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "{bin} {version}, {:.1} s: {cmd:?}\n{output}",
        started_at.elapsed().as_secs_f64()
    );
    let statuses = har_statuses(&har);
    println!("statuses schemathesis saw, by method and path:");
    let mut lines: std::collections::BTreeMap<(&str, &str), Vec<String>> = Default::default();
    for ((method, path, status), n) in &statuses {
        lines
            .entry((method, path))
            .or_default()
            .push(format!("{status} x{n}"));
    }
    for ((method, path), counts) in lines {
        println!("  {method} {path}: {}", counts.join(", "));
    }
    match code {
        Some(0) => {}
        Some(code) => panic!(
            "schemathesis exited {code} (output above)\n{}",
            cluster.log_tails()
        ),
        None => panic!(
            "schemathesis did not finish within {SCHEMATHESIS_TIMEOUT:?}, killed (output above)"
        ),
    }
    // The run reached both sides of max_sequences.
    for status in [200, 429] {
        assert!(
            statuses
                .keys()
                .any(|(m, p, s)| m == "POST" && p.ends_with("/next") && *s == status),
            "schemathesis never saw POST next answer {status}: raise or lower MAX_SEQUENCES"
        );
    }
}

/// How many requests of the HAR file at `path` had each (method, path, status); sequence
/// names are shown as {name}.
fn har_statuses(path: &Path) -> std::collections::BTreeMap<(String, String, u16), usize> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        println!("no HAR report at {}", path.display());
        return out;
    };
    let har: Value = serde_json::from_str(&text).expect("HAR is JSON");
    for entry in har["log"]["entries"].as_array().into_iter().flatten() {
        let url = entry["request"]["url"].as_str().unwrap_or("");
        let path = url.splitn(4, '/').nth(3).unwrap_or("");
        let path = path.split('?').next().unwrap();
        let mut segments: Vec<&str> = path.split('/').collect();
        if segments.len() >= 3 && segments[..2] == ["v1", "sequences"] {
            segments[2] = "{name}";
        }
        let key = (
            entry["request"]["method"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
            format!("/{}", segments.join("/")),
            entry["response"]["status"].as_u64().unwrap_or(0) as u16,
        );
        *out.entry(key).or_default() += 1;
    }
    out
}
