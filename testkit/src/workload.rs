//! The chaos workload: load on a real cluster, recorded as a [`History`] for
//! [`crate::checker`].
//!
//! Id clients on every node call GetId (every fifth call GetIds), senders send to one group
//! retrying each sender_seq until it is acknowledged, and one subscriber per node follows the
//! group, resubscribing where it stopped. Every operation is recorded with invoke and complete
//! instants from one monotonic clock, its node, and its outcome.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::pb::delivery::Kind;
use sequencer_client::{Client, Identity, KeepAlive};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::history::{History, IdOp, Outcome, Seen, SendOp};
use crate::Cluster;

/// The group the workload talks in.
pub const GROUP: &str = "chaos";

/// A running workload. [`Workload::finish`] stops it and drains the subscribers.
pub struct Workload {
    stop: Arc<AtomicBool>,
    id_tasks: Vec<JoinHandle<Vec<IdOp>>>,
    send_tasks: Vec<JoinHandle<(Vec<SendOp>, bool)>>,
    sub_tasks: Vec<JoinHandle<Vec<Seen>>>,
    subs_stop: Arc<AtomicBool>,
    /// The group_seq subscribers must reach before the drain ends (0 while the load runs).
    sub_end: Arc<AtomicU64>,
    /// Every subscriber and sender heartbeats until the end.
    alive: Vec<KeepAlive>,
    faults: Vec<Instant>,
    addrs: Vec<String>,
}

/// A client that starts at node `id` and fails over to the others, giving up on one call
/// after `deadline`.
fn client_from(cluster: &Cluster, id: u64, deadline: Duration) -> Arc<Client> {
    Arc::new(cluster.client_from(id).with_deadline(deadline))
}

async fn registered(client: &Client, name: &str) -> Identity {
    let r = client.register(name).await.expect("register");
    let me = Identity::from(&r);
    client.join(&me, GROUP).await.expect("join");
    me
}

impl Workload {
    /// Starts `per_node` id clients per node, `senders` senders and one subscriber per node.
    pub async fn start(cluster: &Cluster, per_node: usize, senders: usize) -> Workload {
        let addrs = cluster.addrs();
        let ids = cluster.ids();
        let n = ids.len();
        let stop = Arc::new(AtomicBool::new(false));
        let subs_stop = Arc::new(AtomicBool::new(false));
        let op_deadline = Duration::from_secs(3);
        let mut w = Workload {
            stop: stop.clone(),
            id_tasks: Vec::new(),
            send_tasks: Vec::new(),
            sub_tasks: Vec::new(),
            subs_stop: subs_stop.clone(),
            sub_end: Arc::new(AtomicU64::new(0)),
            alive: Vec::new(),
            faults: Vec::new(),
            addrs: addrs.clone(),
        };
        // Subscribers first, from their join on, so they see every message.
        for node in 0..n {
            let client = client_from(cluster, ids[node % n], Duration::from_secs(10));
            let me = registered(&client, &format!("sub{node}")).await;
            let from = client.join(&me, GROUP).await.expect("join").next_seq;
            w.alive.push(client.keep_alive(&me));
            let (stop, end) = (subs_stop.clone(), w.sub_end.clone());
            w.sub_tasks
                .push(tokio::spawn(follow(client, me, from, stop, end)));
        }
        for s in 0..senders {
            let client = client_from(cluster, ids[s % n], op_deadline);
            let me = registered(&client, &format!("sender{s}")).await;
            w.alive.push(client.keep_alive(&me));
            let stop = stop.clone();
            w.send_tasks.push(tokio::spawn(async move {
                let mut ops = Vec::new();
                let mut seq = 1;
                while !stop.load(Ordering::Relaxed) {
                    let invoke = Instant::now();
                    let res = client
                        .send(
                            &me,
                            GROUP,
                            seq,
                            format!("{}:{seq}", me.client_id).into_bytes(),
                        )
                        .await;
                    let complete = Instant::now();
                    match res {
                        Ok(r) => {
                            ops.push(SendOp {
                                sender: me.client_id,
                                sender_seq: seq,
                                invoke,
                                complete,
                                outcome: Outcome::Ok,
                                group_seq: r.group_seq,
                            });
                            seq += 1;
                        }
                        Err(e) => {
                            let o = Outcome::of(&e);
                            ops.push(SendOp {
                                sender: me.client_id,
                                sender_seq: seq,
                                invoke,
                                complete,
                                outcome: o,
                                group_seq: 0,
                            });
                            if e.code() == Code::Unauthenticated {
                                return (ops, true);
                            }
                            // Retry the same sender_seq: Sends are idempotent.
                        }
                    }
                }
                (ops, false)
            }));
        }
        for node in 0..n {
            for t in 0..per_node {
                let client = client_from(cluster, ids[node % n], op_deadline);
                let stop = stop.clone();
                w.id_tasks.push(tokio::spawn(async move {
                    let mut ops = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let invoke = Instant::now();
                        let res = if i % 5 == 0 {
                            client
                                .get_ids("", 10)
                                .await
                                .map(|r| (r.first, u64::from(r.count)))
                        } else {
                            client.get_id("").await.map(|r| (r.id, 1))
                        };
                        let complete = Instant::now();
                        let (outcome, first, count) = match res {
                            Ok((first, count)) => (Outcome::Ok, first, count),
                            Err(e) => (Outcome::of(&e), 0, 0),
                        };
                        ops.push(IdOp {
                            node: node as u64 + 1,
                            invoke,
                            complete,
                            outcome,
                            first,
                            count,
                        });
                    }
                    ops
                }));
            }
        }
        w
    }

    /// Records that a fault was injected now.
    pub fn fault(&mut self) {
        self.faults.push(Instant::now());
    }

    /// Stops the load, lets every subscriber catch up with the group, and returns the history.
    pub async fn finish(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        let mut h = History {
            faults: self.faults,
            ..History::default()
        };
        for t in self.id_tasks {
            h.ids.extend(t.await.expect("id task"));
        }
        for t in self.send_tasks {
            let (ops, removed) = t.await.expect("send task");
            h.sends.extend(ops);
            h.removed += usize::from(removed);
        }
        // Final drain: every subscriber follows the group to its end, then stops.
        self.sub_end
            .store(final_end(&self.addrs).await.max(1), Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !self.sub_tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.subs_stop.store(true, Ordering::Relaxed);
        for t in self.sub_tasks {
            h.subscribers.push(t.await.expect("subscriber task"));
        }
        for alive in self.alive {
            alive.stop().await;
        }
        h
    }
}

async fn final_end(addrs: &[String]) -> u64 {
    let client = Client::new(addrs.to_vec()).expect("addresses");
    for _ in 0..100 {
        if let Ok(groups) = client.list_groups().await {
            if let Some(g) = groups.groups.iter().find(|g| g.name == GROUP) {
                return g.next_seq.saturating_sub(1);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    u64::MAX
}

async fn follow(
    client: Arc<Client>,
    me: Identity,
    mut from: u64,
    stop: Arc<AtomicBool>,
    end: Arc<AtomicU64>,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let last = end.load(Ordering::Relaxed);
        if last != 0 && from > last {
            break;
        }
        let Ok(mut stream) = client.subscribe(&me, GROUP, from).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
            match next {
                Ok(Ok(Some(d))) => {
                    from = d.group_seq + 1;
                    seen.push(Seen {
                        group_seq: d.group_seq,
                        sender: d.sender_id,
                        sender_seq: d.sender_seq,
                        message: d.kind == Kind::Message as i32,
                    });
                }
                Ok(_) => break,
                Err(_) => {
                    let last = end.load(Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) || (last != 0 && from > last) {
                        return seen;
                    }
                }
            }
        }
    }
    seen
}
