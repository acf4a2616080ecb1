//! What the integration tests share: clients of the peer service, the cluster's primary and
//! another node, output of a `server` process read line by line, and waits for a freed place.
//!
//! Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sequencer_client::pb::Delivery;
use sequencer_client::{Client, Identity};
use sequencer_proto::peer::peer_client::PeerClient;
use sequencer_proto::peer::RaftMessage;
use sequencer_server::state::{AllocRequest, Command as StateCommand};
use testkit::{assert_code, Cluster};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Streaming};

/// What a refused sequence, client or group name is told to match.
pub const NAME_PATTERN: &str = "[A-Za-z0-9._-]{1,64}";

/// A plaintext channel to `addr`.
pub async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A plaintext client of the peer service at `addr`.
pub async fn peer_client(addr: &str) -> PeerClient<Channel> {
    PeerClient::new(channel(addr).await)
}

/// A peer message carrying `data`, with the cluster secret if given.
pub fn message(data: &[u8], secret: Option<&str>) -> Request<RaftMessage> {
    let mut req = Request::new(RaftMessage {
        data: data.to_vec(),
    });
    if let Some(s) = secret {
        req.metadata_mut()
            .insert("x-cluster-secret", s.parse().unwrap());
    }
    req
}

/// A forwarded command that takes `count` ids of "default", encoded as a peer sends it.
pub fn allocate(count: u64) -> Vec<u8> {
    serde_json::to_vec(&StateCommand::Allocate {
        requests: vec![AllocRequest {
            sequence: "default".into(),
            count,
        }],
        max_sequences: 10_000,
    })
    .unwrap()
}

/// Waits until the cluster agrees on a primary; returns it and the first other node.
pub async fn primary_and_follower(cluster: &mut Cluster) -> (u64, u64) {
    let primary = cluster.wait_for_primary().await.unwrap();
    let follower = cluster.ids().into_iter().find(|&id| id != primary).unwrap();
    (primary, follower)
}

/// Reads lines of `stream` into a channel on a thread, so the child never blocks on a full pipe.
pub fn line_channel(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Spawns `cmd` with stdout and stderr piped; returns the child and the lines of each stream.
pub fn spawn_reading_output(
    cmd: &mut Command,
) -> (Child, mpsc::Receiver<String>, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = line_channel(child.stdout.take().unwrap());
    let stderr = line_channel(child.stderr.take().unwrap());
    (child, stdout, stderr)
}

/// Subscribes `me` to `group` from `from_seq` twice through `client`, and asserts that the
/// node refuses a third stream with RESOURCE_EXHAUSTED naming `cap`; returns the two streams.
pub async fn two_streams_then_refused(
    client: &Client,
    me: &Identity,
    group: &str,
    from_seq: u64,
    cap: &str,
) -> [Streaming<Delivery>; 2] {
    let first = client.subscribe(me, group, from_seq).await.unwrap();
    let second = client.subscribe(me, group, from_seq).await.unwrap();
    assert_code(
        client.subscribe(me, group, from_seq).await.map(|_| ()),
        Code::ResourceExhausted,
        cap,
    );
    [first, second]
}

/// Subscribes `me` to `group` from `from_seq` through `client` once the node has a place for
/// the stream: retried while it refuses with RESOURCE_EXHAUSTED, for up to 10 s. Any other
/// error, or a refusal past then, fails the test "no place freed `after`".
pub async fn subscribe_once_a_place_frees(
    client: &Client,
    me: &Identity,
    group: &str,
    from_seq: u64,
    after: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.subscribe(me, group, from_seq).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no place freed {after}: {e}"),
        }
    }
}
