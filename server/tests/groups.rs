//! Group messaging on real 3-node clusters: one total order for every subscriber on every
//! server, FIFO per sender, idempotent retries, resumable subscriptions, failure detection,
//! nothing acknowledged lost across a primary crash, and a clear error for every bad input.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::pb::delivery::Kind;
use sequencer_client::pb::Delivery;
use sequencer_client::{Client, Identity, KeepAlive};
use testkit::{assert_code, member, Cluster};
use tonic::Code;

mod common;
use common::{
    primary_and_follower, subscribe_once_a_place_frees, two_streams_then_refused, NAME_PATTERN,
};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

async fn started(builder: testkit::Builder) -> Cluster {
    let mut c = builder.start().unwrap();
    c.wait_for_primary().await.unwrap();
    c
}

/// Keeps `me` alive from a client of its own, as a separate process would: HTTP/2 flow
/// control is per connection, and a test's unread subscription must not hold heartbeats up.
fn keep_alive(client: &Client, me: &Identity) -> KeepAlive {
    Client::new(client.addrs()).unwrap().keep_alive(me)
}

/// Reads deliveries until `done` says the list is complete, or fails after 30 s.
async fn collect(
    stream: &mut tonic::Streaming<Delivery>,
    done: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(d))) => got.push(d),
            other => panic!(
                "stream ended early after {} deliveries: {other:?}",
                got.len()
            ),
        }
    }
    got
}

fn messages(ds: &[Delivery]) -> usize {
    ds.iter().filter(|d| d.kind == Kind::Message as i32).count()
}

/// Dense group_seq, and each sender's messages in sender_seq order 1, 2, 3...
fn assert_dense_and_fifo(ds: &[Delivery]) {
    let first = ds[0].group_seq;
    for (i, d) in ds.iter().enumerate() {
        assert_eq!(d.group_seq, first + i as u64, "group_seq not dense at {i}");
    }
    let mut last: HashMap<u64, u64> = HashMap::new();
    for d in ds.iter().filter(|d| d.kind == Kind::Message as i32) {
        let prev = last.insert(d.sender_id, d.sender_seq).unwrap_or(0);
        assert_eq!(
            d.sender_seq,
            prev + 1,
            "sender {} out of FIFO order",
            d.sender_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_subscriber_on_every_server_sees_one_order_fifo_per_sender() {
    let cluster = started(Cluster::builder(SERVER)).await;
    let ids = cluster.ids();
    // A subscriber on each server, subscribed before anyone sends.
    let mut streams = Vec::new();
    let mut alive = Vec::new();
    for &id in &ids {
        let c = cluster.client_for(id);
        let (me, _, guard) = member(&c, &format!("reader{id}"), "room").await;
        alive.push(guard);
        streams.push(c.subscribe(&me, "room", 1).await.unwrap());
    }
    // A sender registered on each server, 100 messages each, all at once.
    let mut senders = Vec::new();
    for &id in &ids {
        let c = Arc::new(cluster.client_for(id));
        let (me, _, guard) = member(&c, &format!("writer{id}"), "room").await;
        alive.push(guard);
        senders.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for seq in 1..=100u64 {
                let r = c
                    .send(&me, "room", seq, format!("{id}:{seq}").into_bytes())
                    .await
                    .unwrap();
                assert!(!r.duplicate);
                acks.push((me.client_id, seq, r.group_seq));
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for s in senders {
        acks.extend(s.await.unwrap());
    }
    let mut seen = Vec::new();
    for s in &mut streams {
        seen.push(collect(s, |d| messages(d) == 300).await);
    }
    for other in &seen[1..] {
        assert_eq!(other, &seen[0], "two subscribers saw different orders");
    }
    assert_eq!(seen[0][0].group_seq, 1);
    assert_dense_and_fifo(&seen[0]);
    // Each acknowledged group_seq holds exactly that message.
    let by_seq: BTreeMap<u64, &Delivery> = seen[0].iter().map(|d| (d.group_seq, d)).collect();
    for (sender, seq, group_seq) in acks {
        let d = by_seq[&group_seq];
        assert_eq!((d.sender_id, d.sender_seq), (sender, seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_deduplicated_gaps_refused_and_resubscribing_misses_nothing() {
    let cluster = started(Cluster::builder(SERVER)).await;
    let c = cluster.client();
    let (me, next, _alive_me) = member(&c, "alice", "g").await;
    let first = c.send(&me, "g", 1, b"one".to_vec()).await.unwrap();
    let again = c.send(&me, "g", 1, b"one".to_vec()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.group_seq, first.group_seq);
    assert_code(
        c.send(&me, "g", 3, b"x".to_vec()).await,
        Code::FailedPrecondition,
        "expected 2",
    );
    assert_eq!(c.join(&me, "g").await.unwrap().next_sender_seq, 2);

    // Read part of the stream, drop it, and resume from the last seq seen + 1.
    let mut stream = c.subscribe(&me, "g", next).await.unwrap();
    for seq in 2..=5 {
        c.send(&me, "g", seq, format!("m{seq}").into_bytes())
            .await
            .unwrap();
    }
    let part = collect(&mut stream, |d| d.len() == 3).await;
    drop(stream);
    for seq in 6..=8 {
        c.send(&me, "g", seq, format!("m{seq}").into_bytes())
            .await
            .unwrap();
    }
    let resume = part.last().unwrap().group_seq + 1;
    let mut stream = c.subscribe(&me, "g", resume).await.unwrap();
    let rest = collect(&mut stream, |d| d.last().is_some_and(|d| d.sender_seq == 8)).await;
    let all: Vec<Delivery> = part.into_iter().chain(rest).collect();
    assert_dense_and_fifo(&all);
    let payloads: Vec<String> = all
        .iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["one", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]);
    // Leave and rejoin: the sender count carries on, and a subscription replaying the old
    // LEFT does not end there.
    c.leave(&me, "g").await.unwrap();
    let rejoined = c.join(&me, "g").await.unwrap();
    assert_eq!(rejoined.next_sender_seq, 9);
    assert!(
        c.send(&me, "g", 1, b"stale".to_vec())
            .await
            .unwrap()
            .duplicate
    );
    c.send(&me, "g", 9, b"back".to_vec()).await.unwrap();
    let mut stream = c.subscribe(&me, "g", next).await.unwrap();
    let replay = collect(&mut stream, |d| {
        d.last().is_some_and(|d| d.payload == b"back")
    })
    .await;
    let kinds: Vec<i32> = replay[replay.len() - 3..].iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [Kind::Left as i32, Kind::Joined as i32, Kind::Message as i32]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_heartbeating_is_removed_with_a_failed_event() {
    let cluster = started(Cluster::builder(SERVER).set("client_heartbeat_interval_ms", 200)).await;
    let c = Arc::new(cluster.client());
    let (alive, _, _alive_alive) = member(&c, "alive", "g").await;
    let registered = c.register("silent").await.unwrap();
    assert_eq!(
        (
            registered.heartbeat_interval_ms,
            registered.failure_timeout_ms
        ),
        (200, 400)
    );
    let silent = Identity::from(&registered);
    let silent_joined = Instant::now();
    let joined = c.join(&silent, "g").await.unwrap();
    let mut stream = c.subscribe(&alive, "g", joined.next_seq - 1).await.unwrap();

    // One client heartbeats every interval; the other never does.
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let (c, alive, stop) = (c.clone(), alive.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.heartbeat(&alive).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let got = collect(&mut stream, |d| {
        d.iter().any(|d| d.kind == Kind::Failed as i32)
    })
    .await;
    let removed_after = silent_joined.elapsed();
    let failed = got.iter().find(|d| d.kind == Kind::Failed as i32).unwrap();
    assert_eq!(failed.sender_id, silent.client_id);
    assert_eq!(
        got[0].kind,
        Kind::Joined as i32,
        "events are in the group's order"
    );
    // failure_timeout + one interval, plus slack for a loaded machine.
    assert!(
        removed_after < Duration::from_millis(400 + 200 + 2000),
        "removed only after {removed_after:?}"
    );
    let members = c.list_members("g").await.unwrap().members;
    assert!(members.iter().all(|m| m.client_id != silent.client_id));
    assert_code(
        c.heartbeat(&silent).await,
        Code::Unauthenticated,
        "unknown client_id",
    );

    // The heartbeating client outlives several timeouts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let members = c.list_members("g").await.unwrap().members;
    assert!(
        members.iter().any(|m| m.client_id == alive.client_id),
        "a live client was removed"
    );
    stop.store(true, Ordering::Relaxed);
    beat.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_message_is_lost_or_reordered_when_the_primary_dies() {
    let mut cluster = started(Cluster::builder(SERVER)).await;
    let primary = cluster.wait_for_primary().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut alive = Vec::new();
    for i in 0..3usize {
        let c = Arc::new(cluster.client_from(i as u64 + 1));
        let (me, _, guard) = member(&c, &format!("w{i}"), "g").await;
        alive.push(guard);
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut seq = 1;
            while !stop.load(Ordering::Relaxed) {
                // Retry the same sender_seq until it is acknowledged: retries are idempotent.
                if let Ok(r) = c
                    .send(&me, "g", seq, format!("{i}:{seq}").into_bytes())
                    .await
                {
                    acks.push((me.client_id, seq, r.group_seq));
                    seq += 1;
                }
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(primary);
    cluster.wait_for_primary().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acks = Vec::new();
    for s in senders {
        acks.extend(s.await.unwrap());
    }
    assert!(!acks.is_empty());

    // A fresh member reads the whole stream from a surviving node.
    let survivor = cluster.running()[0];
    let c = cluster.client_for(survivor);
    let (reader, next, _alive_reader) = member(&c, "reader", "g").await;
    let mut stream = c.subscribe(&reader, "g", 1).await.unwrap();
    let all = collect(&mut stream, |d| {
        d.last().is_some_and(|d| d.group_seq + 1 == next)
    })
    .await;
    assert_dense_and_fifo(&all);
    let by_seq: BTreeMap<u64, &Delivery> = all.iter().map(|d| (d.group_seq, d)).collect();
    for (sender, seq, group_seq) in &acks {
        let d = by_seq
            .get(group_seq)
            .expect("an acknowledged message is missing");
        assert_eq!(
            (d.sender_id, d.sender_seq),
            (*sender, *seq),
            "acknowledged message changed"
        );
    }
    // The new primary gave every client a fresh timeout: nobody alive was failed over.
    assert!(
        all.iter().all(|d| d.kind != Kind::Failed as i32),
        "a live client was removed by the failover"
    );

    // Power loss of every node: the stream comes back whole, from the durable log.
    drop(stream);
    cluster.kill_all();
    for id in cluster.ids() {
        cluster.start_node(id).unwrap();
    }
    cluster.wait_for_primary().await.unwrap();
    let mut stream = c
        .subscribe(&reader, "g", 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tails()));
    let again = collect(&mut stream, |d| d.len() == all.len()).await;
    assert_eq!(
        again, all,
        "the stream changed across a restart of every node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = started(
        Cluster::builder(SERVER)
            .set("max_payload_bytes", 1000)
            .set("max_groups", 2)
            .set("max_members_per_group", 2)
            .set("retain_messages", 5),
    )
    .await;
    let c = cluster.client();
    for name in ["", &"n".repeat(65)] {
        assert_code(c.register(name).await, Code::InvalidArgument, NAME_PATTERN);
    }
    let (a, _, _alive_a) = member(&c, "a", "g").await;
    let b = Identity::from(&c.register("b").await.unwrap());
    let _alive_b = keep_alive(&c, &b);
    let forged = Identity {
        client_id: a.client_id,
        token: "0".repeat(32),
    };
    assert_code(
        c.join(&a, "bad group").await,
        Code::InvalidArgument,
        "group name",
    );
    assert_code(c.join(&forged, "g").await, Code::Unauthenticated, "token");
    assert_code(
        c.send(&forged, "g", 1, vec![]).await,
        Code::Unauthenticated,
        "token",
    );
    assert_code(c.heartbeat(&forged).await, Code::Unauthenticated, "token");
    assert_code(
        c.send(&a, "g", 1, vec![0; 1001]).await,
        Code::InvalidArgument,
        "1000 (max_payload_bytes)",
    );
    assert_code(
        c.send(&a, "g", 0, vec![]).await,
        Code::InvalidArgument,
        "sender_seq",
    );
    assert_code(
        c.send(&a, "nowhere", 1, vec![]).await,
        Code::NotFound,
        "nowhere",
    );
    assert_code(
        c.send(&b, "g", 1, vec![]).await,
        Code::PermissionDenied,
        "not a member",
    );
    assert_code(
        c.subscribe(&b, "g", 0).await,
        Code::PermissionDenied,
        "not a member",
    );
    assert_code(c.list_members("nowhere").await, Code::NotFound, "nowhere");
    assert_code(
        c.leave(&b, "g").await,
        Code::PermissionDenied,
        "not a member",
    );

    c.join(&a, "h").await.unwrap();
    assert_code(
        c.join(&a, "third").await,
        Code::ResourceExhausted,
        "max_groups",
    );
    c.join(&b, "g").await.unwrap();
    let d = Identity::from(&c.register("d").await.unwrap());
    let _alive_d = keep_alive(&c, &d);
    assert_code(
        c.join(&d, "g").await,
        Code::ResourceExhausted,
        "max_members_per_group",
    );

    // Nothing above reached the group's stream: a's first message is still sender_seq 1.
    let sent = c.send(&a, "g", 1, b"hi".to_vec()).await.unwrap();
    assert!(!sent.duplicate);
    for seq in 2..=8 {
        c.send(&a, "g", seq, vec![]).await.unwrap();
    }
    // 2 joins + 8 messages, and only the last 5 are retained.
    assert_code(
        c.subscribe(&a, "g", 1).await,
        Code::OutOfRange,
        "(6; retain_messages, retain_bytes, retain_total_bytes)",
    );
    let mut stream = c.subscribe(&a, "g", 6).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().group_seq, 6);
    assert_code(
        c.subscribe(&a, "g", 12).await,
        Code::OutOfRange,
        "beyond the end",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_cut_off_without_stalling_others() {
    let cluster = started(Cluster::builder(SERVER).set("subscriber_buffer", 8)).await;
    let c = cluster.client_for(1);
    // Its own connection, as a separate client would have: HTTP/2 flow control is per
    // connection too, and an unread stream would hold up everything sharing it.
    let slow_client = cluster.client_for(1);
    let (slow, next, _alive_slow) = member(&slow_client, "slow", "g").await;
    let (fast, _, _alive_fast) = member(&c, "fast", "g").await;
    let mut slow_stream = slow_client.subscribe(&slow, "g", next).await.unwrap();
    let mut fast_stream = c.subscribe(&fast, "g", next).await.unwrap();
    // More than HTTP/2 buffers between a server and an unread stream (a few MiB), so the
    // server-side buffer fills and stays full.
    const N: u64 = 100;
    let fast_reader =
        tokio::spawn(async move { collect(&mut fast_stream, |d| messages(d) == N as usize).await });
    for seq in 1..=N {
        c.send(&fast, "g", seq, vec![7; 128 * 1024]).await.unwrap();
    }
    let fast_got = fast_reader.await.unwrap();
    assert_eq!(
        messages(&fast_got),
        N as usize,
        "the fast subscriber was held up"
    );
    // A late subscriber catches up on a backlog far larger than its buffer.
    let mut late = c.subscribe(&fast, "g", next).await.unwrap();
    assert_eq!(
        messages(&collect(&mut late, |d| messages(d) == N as usize).await),
        N as usize
    );

    let mut received = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow_stream.message()).await {
            Ok(Ok(Some(_))) => received += 1,
            Ok(Ok(None)) => panic!("the slow stream ended without an error"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the slow stream was never cut off; it delivered {received}"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("subscriber_buffer") && status.message().contains("from_seq"),
        "{status}"
    );
    assert!(
        received < N + 2,
        "the slow subscriber got everything: {received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_travel_in_snapshots_to_a_lagging_node() {
    let mut cluster = started(
        Cluster::builder(SERVER)
            .set("snapshot_logs", 10)
            .set("logs_to_keep", 2)
            .set("retain_messages", 100),
    )
    .await;
    let (primary, lagging) = primary_and_follower(&mut cluster).await;
    let c = cluster.client_for(primary);
    let (me, next, _alive) = member(&c, "writer", "g").await;
    // Quiet: no node's log goes past what the primary has committed.
    let held = c.status().await.unwrap().commit_index;
    cluster.kill(lagging);
    // Sequential sends: one log entry each, well past several snapshot points.
    for seq in 1..=60 {
        c.send(&me, "g", seq, format!("m{seq}").into_bytes())
            .await
            .unwrap();
    }
    // A snapshot past what the lagging node holds plus the 2 entries kept after a snapshot:
    // what it lacks, the messages included, is in no log any more.
    cluster.wait_snapshot(primary, held + 2 + 1).await.unwrap();
    cluster.start_node(lagging).unwrap();
    cluster.wait_for_primary().await.unwrap();

    let on_lagging = cluster.client_for(lagging);
    let mut stream = on_lagging.subscribe(&me, "g", next - 1).await.unwrap();
    let got = collect(&mut stream, |d| messages(d) == 60).await;
    assert_dense_and_fifo(&got);
    assert_eq!(got[0].kind, Kind::Joined as i32);
    assert_eq!(got.last().unwrap().payload, b"m60");
    cluster.assert_installed_from(lagging, primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_primary_coming_back_removes_nobody() {
    // A failure timeout of two intervals must cover an election plus a client stepping over
    // the frozen node (one interval per attempt): 400 ms intervals leave room on a busy machine.
    let mut cluster =
        started(Cluster::builder(SERVER).set("client_heartbeat_interval_ms", 400)).await;
    let (primary, follower) = primary_and_follower(&mut cluster).await;
    // The client starts at a follower, so its heartbeats travel the forwarding path.
    let c = cluster.client_from(follower);
    let (me, _, _alive) = member(&c, "steady", "g").await;

    // Frozen for many failure timeouts: the others elect a new primary, which the client
    // keeps heartbeating through. The old one, thawed, must not act on its stale view.
    cluster.signal(primary, libc::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    cluster.signal(primary, libc::SIGCONT).unwrap();
    cluster.wait_for_primary().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let members = c.list_members("g").await.unwrap().members;
    assert!(
        members.iter().any(|m| m.client_id == me.client_id),
        "a live client was removed\n{}",
        cluster.log_tails()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_large_messages_are_all_delivered() {
    // openraft 0.9 gives one AppendEntries a heartbeat interval, follower fsync included: with
    // MiB-sized messages on a loaded machine, use a longer one (see README, max_payload_bytes).
    let cluster = started(
        Cluster::builder(SERVER)
            .set("heartbeat_interval_ms", 300)
            .set("election_timeout_min_ms", 1500)
            .set("election_timeout_max_ms", 3000),
    )
    .await;
    let c = Arc::new(cluster.client());
    let (reader, next, _alive_reader) = member(&c, "reader", "big").await;
    let mut stream = c.subscribe(&reader, "big", next).await.unwrap();
    // Read while they are sent: a subscriber that reads nothing for a second while more than
    // subscriber_buffer_bytes wait for it is cut off, by design.
    let reading = tokio::spawn(async move { collect(&mut stream, |d| messages(d) == 24).await });
    let mut tasks = Vec::new();
    let mut alive = Vec::new();
    for w in 0..6 {
        let (me, _, guard) = member(&c, &format!("w{w}"), "big").await;
        alive.push(guard);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 1..=4 {
                c.send(&me, "big", seq, vec![w as u8; 1024 * 1024])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = reading.await.unwrap();
    assert_dense_and_fifo(&got);
    assert!(got
        .iter()
        .filter(|d| d.kind == Kind::Message as i32)
        .all(|d| d.payload.len() == 1024 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_at_most_max_subscribers_and_frees_a_place_when_one_leaves() {
    let cluster = started(Cluster::builder(SERVER).set("max_subscribers", 2)).await;
    let on_1 = cluster.client_for(1);
    let (me, next, _alive) = member(&on_1, "watcher", "g").await;
    let [first, _second] = two_streams_then_refused(&on_1, &me, "g", next, "max_subscribers").await;
    // The cap is per node: another server still takes subscribers.
    let on_2 = cluster.client_for(2);
    let _elsewhere = on_2.subscribe(&me, "g", next).await.unwrap();

    // A subscriber that goes away gives its place back.
    drop(first);
    subscribe_once_a_place_frees(&on_1, &me, "g", next, "after a subscriber left").await;
}
