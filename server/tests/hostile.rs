//! Hostile bytes on the wire: malformed protobuf, truncated and lying gRPC frames, sent raw
//! over HTTP/2 to every public RPC and to every peer RPC (with the cluster secret, so they get
//! past the gate to the decoders). Each must get an error status, the node must keep serving,
//! and nothing may change.

use std::time::Duration;

use bytes::Bytes;
use testkit::Cluster;
use tokio::net::TcpStream;

const SERVER: &str = env!("CARGO_BIN_EXE_server");

const PUBLIC: &[&str] = &[
    "/sequencer.v1.Sequencer/GetId",
    "/sequencer.v1.Sequencer/GetIds",
    "/sequencer.v1.Sequencer/CurrentId",
    "/sequencer.v1.Cluster/Status",
    "/sequencer.v1.Tracker/Register",
    "/sequencer.v1.Tracker/Join",
    "/sequencer.v1.Tracker/Leave",
    "/sequencer.v1.Tracker/Unregister",
    "/sequencer.v1.Tracker/Heartbeat",
    "/sequencer.v1.Tracker/ListGroups",
    "/sequencer.v1.Tracker/ListMembers",
    "/sequencer.v1.Messenger/Send",
    "/sequencer.v1.Messenger/Subscribe",
];

const PEER: &[&str] = &[
    "/sequencer.peer.v1.Peer/AppendEntriesStream",
    "/sequencer.peer.v1.Peer/Vote",
    "/sequencer.peer.v1.Peer/InstallSnapshot",
    "/sequencer.peer.v1.Peer/Propose",
    "/sequencer.peer.v1.Peer/Ping",
    "/sequencer.peer.v1.Peer/Heartbeat",
    "/sequencer.peer.v1.Peer/ReadIndex",
];

/// A gRPC frame: compression flag, declared length, then `body` (which may be shorter).
fn frame(compressed: bool, declared: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&declared.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Request bodies no well-behaved client sends, with what makes each one wrong.
fn hostile_bodies(raft_message: bool) -> Vec<(&'static str, Vec<u8>)> {
    // Field 1, wire type 7: no such wire type.
    let bad_wire_type = [0x0f, 0x01, 0x02];
    // A varint that never ends.
    let endless_varint = [0xff; 11];
    // Field 1 (bytes) claiming 1000 bytes and carrying 2.
    let short_bytes_field = [0x0a, 0xe8, 0x07, 0x01, 0x02];
    let mut bodies = vec![
        (
            "bad wire type",
            frame(false, bad_wire_type.len() as u32, &bad_wire_type),
        ),
        (
            "endless varint",
            frame(false, endless_varint.len() as u32, &endless_varint),
        ),
        (
            "length-delimited field past the end",
            frame(false, short_bytes_field.len() as u32, &short_bytes_field),
        ),
        (
            "frame shorter than it declares",
            frame(false, 100, &[0x08, 0x01]),
        ),
        (
            "frame declaring 4 GiB",
            frame(false, u32::MAX, &[0x08, 0x01]),
        ),
        (
            "compressed with nothing negotiated",
            frame(true, 2, &[0x08, 0x01]),
        ),
        ("header cut short", vec![0, 0, 0]),
    ];
    if raft_message {
        // Valid protobuf (RaftMessage.data), bytes inside that no peer would send.
        let junk = b"{\"not\": \"a raft message\"";
        let mut msg = vec![0x0a, junk.len() as u8];
        msg.extend_from_slice(junk);
        bodies.push((
            "undecodable peer payload",
            frame(false, msg.len() as u32, &msg),
        ));
    }
    bodies
}

/// Sends one raw gRPC request and returns its grpc-status (None if the server sent none).
async fn raw_call(addr: &str, path: &str, secret: Option<&str>, body: Vec<u8>) -> Option<u32> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(s) = secret {
        req = req.header("x-cluster-secret", s);
    }
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(Bytes::from(body), true).unwrap();
    let resp = resp.await.unwrap();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    // A trailers-only answer carries the status in the headers.
    if let Some(code) = status(resp.headers()) {
        return Some(code);
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    body.trailers().await.unwrap().as_ref().and_then(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_truncated_frames_get_errors_and_change_nothing() {
    let mut cluster = Cluster::builder(SERVER).steady().start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let client = cluster.client();
    client.get_id("").await.unwrap();
    let before_status = cluster.client_for(primary).status().await.unwrap();
    let mut before = Vec::new();
    for id in cluster.ids() {
        let c = cluster.client_for(id);
        before.push((
            c.current_id("").await.unwrap().id,
            c.list_groups().await.unwrap().groups.len(),
        ));
    }

    let secret = cluster.cluster_secret().map(String::from);
    for id in cluster.ids() {
        let node = cluster.node(id);
        let targets = PUBLIC
            .iter()
            .map(|p| (node.addr.clone(), *p, None, false))
            .chain(
                PEER.iter()
                    .map(|p| (node.peer_addr.clone(), *p, secret.as_deref(), true)),
            );
        for (addr, path, secret, peer) in targets {
            // Ping's request has no fields, so any well-formed protobuf is a fine Ping.
            let carries_raft_message = peer && !path.ends_with("/Ping");
            for (what, body) in hostile_bodies(carries_raft_message) {
                let code = tokio::time::timeout(
                    Duration::from_secs(10),
                    raw_call(&addr, path, secret, body),
                )
                .await
                .unwrap_or_else(|_| panic!("node {id} {path}, {what}: no answer in 10 s"));
                assert!(
                    matches!(code, Some(c) if c != 0),
                    "node {id} {path}, {what}: expected an error status, got {code:?}"
                );
            }
        }
    }

    // Every node still serves, and nothing changed.
    let after_status = cluster.client_for(primary).status().await.unwrap();
    assert_eq!(after_status.term, before_status.term, "the term moved");
    assert_eq!(after_status.primary, before_status.primary);
    for (i, id) in cluster.ids().into_iter().enumerate() {
        let c = cluster.client_for(id);
        let now = (
            c.current_id("").await.unwrap().id,
            c.list_groups().await.unwrap().groups.len(),
        );
        assert_eq!(now, before[i], "node {id}: state changed");
    }
    let next = client.get_id("").await.unwrap().id;
    assert_eq!(
        next,
        before[0].0 + 1,
        "ids were allocated by hostile requests"
    );
}
