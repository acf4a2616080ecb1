//! What subscribers may hold on a node, against real server processes: subscriber_buffer_bytes
//! bounds what the node queues for one subscriber whatever window the client grants, and
//! max_subscribers_per_client bounds how many streams one client keeps open on a node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use sequencer_client::pb::{Delivery, SubscribeRequest};
use sequencer_client::Identity;
use testkit::{member, Cluster};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::Code;

mod common;
use common::{subscribe_once_a_place_frees, two_streams_then_refused};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Resident memory of process `pid`, in bytes (0 once it is gone).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

/// Opens Subscribe streams over one raw HTTP/2 connection that grants `window` bytes per
/// stream and per connection, and never reads them unless asked to.
struct Subscriber {
    client: h2::client::SendRequest<Bytes>,
    addr: String,
}

impl Subscriber {
    async fn connect(addr: &str, window: u32) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake(tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        Self {
            client,
            addr: addr.to_string(),
        }
    }

    async fn subscribe(&mut self, req: &SubscribeRequest) -> h2::RecvStream {
        let body = req.encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let http = http::Request::post(format!(
            "http://{}/sequencer.v1.Messenger/Subscribe",
            self.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        let mut client = self.client.clone().ready().await.unwrap();
        let (resp, mut send) = client.send_request(http, false).unwrap();
        send.send_data(Bytes::from(frame), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers().get("grpc-status").is_none(),
            "Subscribe refused: {:?}",
            resp.headers()
        );
        resp.into_body()
    }
}

/// Reads a stream to its end: its deliveries, then (grpc-status, grpc-message).
async fn read_to_end(mut body: h2::RecvStream) -> (Vec<Delivery>, u32, String) {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            got.push(Delivery::decode(buf.split_to(len).freeze()).unwrap());
        }
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    let status = trailers["grpc-status"].to_str().unwrap().parse().unwrap();
    let message = trailers
        .get("grpc-message")
        .map(|m| percent_decode(m.to_str().unwrap()))
        .unwrap_or_default();
    (got, status, message)
}

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_subscribers_with_huge_windows_are_bounded_in_bytes_and_cut_off() {
    const SUBSCRIBERS: usize = 32;
    const PAYLOAD: usize = 64 * 1024;
    const MESSAGES: u64 = 200;
    const BUDGET: usize = 256 * 1024;
    const WINDOW: u32 = 64 * 1024 * 1024;
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("max_payload_bytes", PAYLOAD)
        .set("subscriber_buffer_bytes", BUDGET)
        // One stream per client: a second Subscribe of subscriber 0 tells when its first
        // has ended.
        .set("max_subscribers_per_client", 1)
        // Nobody is removed for want of heartbeats during the test.
        .set("client_heartbeat_interval_ms", 60_000)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let pid = cluster.node(1).pid().unwrap();
    let c = cluster.client_for(1);
    let mut readers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let me = Identity::from(&c.register(&format!("hoarder{i}")).await.unwrap());
        c.join(&me, "g").await.unwrap();
        readers.push(me);
    }
    let writer = Identity::from(&c.register("writer").await.unwrap());
    let from = c.join(&writer, "g").await.unwrap().next_seq;

    // All on one connection that grants 64 MiB per stream and in all, and never reads.
    let mut raw = Subscriber::connect(&cluster.node(1).addr, WINDOW).await;
    let mut streams = Vec::new();
    for me in &readers {
        let req = SubscribeRequest {
            client_id: me.client_id,
            token: me.token.clone(),
            group: "g".into(),
            from_seq: from,
        };
        streams.push(raw.subscribe(&req).await);
    }
    let before = rss(pid);
    assert!(before > 0, "no VmRSS for the node");
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Unbounded, every subscriber would come to hold all of it: 12.5 MiB each, 400 MiB in
    // all, of which one connection window (64 MiB) can leave the node.
    for seq in 1..=MESSAGES {
        c.send(&writer, "g", seq, vec![seq as u8; PAYLOAD])
            .await
            .unwrap();
    }

    // Subscriber 0 may subscribe again once the node has cut its first stream off.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.subscribe(&readers[0], "g", from).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                assert!(e.to_string().contains("max_subscribers_per_client"), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!(
                "the unread stream was never cut off (node RSS {} MiB, peak {} MiB): {e}",
                before >> 20,
                peak.load(Ordering::Relaxed) >> 20
            ),
        }
    }
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);

    // The others go (which frees the connection's window), and subscriber 0 reads to its end:
    // what was queued for it, then where to resume.
    let first = streams.swap_remove(0);
    drop(streams);
    let (got, status, message) = tokio::time::timeout(Duration::from_secs(20), read_to_end(first))
        .await
        .expect("the stream that was cut off did not end");
    eprintln!(
        "rss before {} MiB, peak {} MiB; {} deliveries read, then: {message}",
        before >> 20,
        peak >> 20,
        got.len()
    );
    assert_eq!(status, Code::ResourceExhausted as u32, "{message}");
    let resume = got.last().map_or(from, |d| d.group_seq + 1);
    assert!(
        message.contains("subscriber_buffer_bytes")
            && message.contains(&format!("from_seq {resume}")),
        "expected a resume point of {resume}: {message}"
    );
    assert!(
        (got.len() as u64) < MESSAGES,
        "the subscriber got everything"
    );
    // Per subscriber: its budget, plus what tonic and hyper buffer beyond it (hyper's
    // per-stream send buffer is 400 KiB) and one read chunk; plus the node's own growth.
    let bound = before + (SUBSCRIBERS * (BUDGET + 1536 * 1024)) as u64 + (64 << 20);
    assert!(
        peak < bound,
        "node RSS rose from {} MiB to {} MiB, above {} MiB",
        before >> 20,
        peak >> 20,
        bound >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holds_at_most_max_subscribers_per_client_on_a_node() {
    let cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("max_subscribers_per_client", 2)
        .start();
    let mut cluster = cluster.unwrap();
    cluster.wait_for_primary().await.unwrap();
    let c = cluster.client_for(1);
    let (me, next, _alive_me) = member(&c, "greedy", "g").await;
    let (other, _, _alive_other) = member(&c, "other", "g").await;
    let cap = "max_subscribers_per_client";
    let [first, _second] = two_streams_then_refused(&c, &me, "g", next, cap).await;
    // The cap is per client: another one still subscribes.
    let _theirs = c.subscribe(&other, "g", next).await.unwrap();

    // A stream that goes away gives its place back.
    drop(first);
    subscribe_once_a_place_frees(&c, &me, "g", next, "after a stream closed").await;
}
