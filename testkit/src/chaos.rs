//! A Jepsen-style workload, its recorded history, and the checkers that read it.
//!
//! Id clients on every node call GetId (every fifth call GetIds), senders send to one group
//! retrying each sender_seq until it is acknowledged, and one subscriber per node follows the
//! group, resubscribing where it stopped. Every operation is recorded with invoke and complete
//! instants from one monotonic clock, its node, and its outcome.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::pb::delivery::Kind;
use sequencer_client::{Client, ClientError, Identity};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::history::{linearizability_violations, overlaps, Op};
use crate::Cluster;

/// The group the workload talks in.
pub const GROUP: &str = "chaos";

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A definite refusal, with its code: nothing happened.
    Failed(Code),
    /// Timed out or lost its connection: it may or may not have taken effect.
    Indeterminate,
}

fn outcome(e: &ClientError) -> Outcome {
    match e.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Outcome::Indeterminate
        }
        code => Outcome::Failed(code),
    }
}

/// One GetId or GetIds.
#[derive(Debug, Clone, Copy)]
pub struct IdOp {
    pub node: u64,
    pub invoke: Instant,
    pub complete: Instant,
    pub outcome: Outcome,
    pub first: u64,
    pub count: u64,
}

/// One Send attempt.
#[derive(Debug, Clone, Copy)]
pub struct SendOp {
    pub sender: u64,
    pub sender_seq: u64,
    pub invoke: Instant,
    pub complete: Instant,
    pub outcome: Outcome,
    pub group_seq: u64,
}

/// What a subscriber saw: (group_seq, sender, sender_seq, is_message).
pub type Seen = Vec<(u64, u64, u64, bool)>;

/// Everything the workload recorded.
#[derive(Default)]
pub struct History {
    pub ids: Vec<IdOp>,
    pub sends: Vec<SendOp>,
    pub subscribers: Vec<Seen>,
    /// When each fault was injected.
    pub faults: Vec<Instant>,
    /// Senders the cluster removed (missed heartbeats): not a safety violation, but reported.
    pub removed: usize,
}

/// A running workload. [`Workload::finish`] stops it and drains the subscribers.
pub struct Workload {
    stop: Arc<AtomicBool>,
    id_tasks: Vec<JoinHandle<Vec<IdOp>>>,
    send_tasks: Vec<JoinHandle<(Vec<SendOp>, bool)>>,
    sub_tasks: Vec<JoinHandle<Seen>>,
    subs_stop: Arc<AtomicBool>,
    /// The group_seq subscribers must reach before the drain ends (0 while the load runs).
    sub_end: Arc<AtomicU64>,
    heartbeats: Vec<JoinHandle<()>>,
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

fn heartbeat(client: Arc<Client>, me: Identity) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let interval = match client.heartbeat(&me).await {
                Ok(r) => r.heartbeat_interval_ms.max(10),
                Err(e) if e.code() == Code::Unauthenticated => return,
                Err(_) => 100,
            };
            tokio::time::sleep(Duration::from_millis(u64::from(interval) / 2)).await;
        }
    })
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
            heartbeats: Vec::new(),
            faults: Vec::new(),
            addrs: addrs.clone(),
        };
        // Subscribers first, from their join on, so they see every message.
        for node in 0..n {
            let client = client_from(cluster, ids[node % n], Duration::from_secs(10));
            let me = registered(&client, &format!("sub{node}")).await;
            let from = client.join(&me, GROUP).await.expect("join").next_seq;
            w.heartbeats.push(heartbeat(client.clone(), me.clone()));
            let (stop, end) = (subs_stop.clone(), w.sub_end.clone());
            w.sub_tasks
                .push(tokio::spawn(follow(client, me, from, stop, end)));
        }
        for s in 0..senders {
            let client = client_from(cluster, ids[s % n], op_deadline);
            let me = registered(&client, &format!("sender{s}")).await;
            w.heartbeats.push(heartbeat(client.clone(), me.clone()));
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
                            let o = outcome(&e);
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
                            Err(e) => (outcome(&e), 0, 0),
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
        for hb in self.heartbeats {
            hb.abort();
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
) -> Seen {
    let mut seen = Seen::new();
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
                    seen.push((
                        d.group_seq,
                        d.sender_id,
                        d.sender_seq,
                        d.kind == Kind::Message as i32,
                    ));
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

/// What the checkers found. Every count but the first four must be zero.
#[derive(Debug, Default)]
pub struct Report {
    pub ops: usize,
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
    pub faults: usize,
    pub dup: usize,
    pub nonlinear: usize,
    pub lost: usize,
    pub reordered: usize,
    pub phantom: usize,
    pub gaps: usize,
    pub max_unavailable_ms: u128,
    /// The longest window without a successful id operation after each fault, in order.
    pub windows_ms: Vec<u128>,
    /// From each fault to the first successful id operation invoked after it.
    pub recovery_ms: Vec<u128>,
    pub removed: usize,
    /// Definite refusals by gRPC code.
    pub failed_codes: std::collections::BTreeMap<String, usize>,
    /// The offending operations, for the failure message.
    pub details: Vec<String>,
}

impl Report {
    /// Whether every safety check passed.
    pub fn is_safe(&self) -> bool {
        self.dup + self.nonlinear + self.lost + self.reordered + self.phantom + self.gaps == 0
    }

    /// The one summary line of a scenario.
    pub fn line(&self, scenario: &str) -> String {
        format!(
            "{scenario}: ops={} ok={} failed={} indeterminate={} faults={} lost={} dup={} nonlinear={} reordered={} phantom={} gaps={} removed={} max_recovery_ms={} max_unavailable_ms={}",
            self.ops, self.ok, self.failed, self.indeterminate, self.faults, self.lost, self.dup,
            self.nonlinear, self.reordered, self.phantom, self.gaps, self.removed,
            self.recovery_ms.iter().max().unwrap_or(&0), self.max_unavailable_ms
        )
    }
}

/// Runs every checker over `h`.
pub fn check(h: &History) -> Report {
    let mut r = Report {
        faults: h.faults.len(),
        removed: h.removed,
        ..Report::default()
    };
    let all = h
        .ids
        .iter()
        .map(|o| o.outcome)
        .chain(h.sends.iter().map(|o| o.outcome));
    for o in all {
        r.ops += 1;
        match o {
            Outcome::Ok => r.ok += 1,
            Outcome::Failed(code) => {
                r.failed += 1;
                *r.failed_codes.entry(format!("{code:?}")).or_default() += 1;
            }
            Outcome::Indeterminate => r.indeterminate += 1,
        }
    }

    // Ids: unique, and in real-time order.
    let ok: Vec<Op> = h
        .ids
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| Op {
            invoke: o.invoke,
            complete: o.complete,
            first: o.first,
            count: o.count,
        })
        .collect();
    let dups = overlaps(&ok);
    r.dup += dups.len();
    r.details.extend(
        dups.iter()
            .take(5)
            .map(|d| format!("ids handed out twice: {d:?}")),
    );
    let nonlinear = linearizability_violations(&ok);
    r.nonlinear += nonlinear.len();
    r.details.extend(
        nonlinear
            .iter()
            .take(5)
            .map(|(a, b)| format!("order: {a:?} completed before {b:?} began")),
    );

    // Groups: one common order, dense, FIFO per sender, nothing lost, invented or repeated.
    let mut order: BTreeMap<u64, (u64, u64, bool)> = BTreeMap::new();
    for seen in &h.subscribers {
        for w in seen.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                r.gaps += 1;
                r.details.push(format!(
                    "a subscriber jumped from group_seq {} to {}",
                    w[0].0, w[1].0
                ));
            }
        }
        for &(seq, sender, sender_seq, msg) in seen {
            if let Some(prev) = order.insert(seq, (sender, sender_seq, msg)) {
                if prev != (sender, sender_seq, msg) {
                    r.reordered += 1;
                    r.details.push(format!(
                        "group_seq {seq}: {prev:?} on one subscriber, {:?} on another",
                        (sender, sender_seq, msg)
                    ));
                }
            }
        }
    }
    let attempted: HashSet<(u64, u64)> = h.sends.iter().map(|s| (s.sender, s.sender_seq)).collect();
    let mut delivered: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    for (&seq, &(sender, sender_seq, msg)) in &order {
        if !msg {
            continue;
        }
        if delivered.insert((sender, sender_seq), seq).is_some() {
            r.dup += 1;
            r.details
                .push(format!("message {sender}:{sender_seq} delivered twice"));
        }
        if !attempted.contains(&(sender, sender_seq)) && sender_seq != 0 {
            // Senders of this workload only: other members send nothing.
            if h.sends.iter().any(|s| s.sender == sender) {
                r.phantom += 1;
                r.details
                    .push(format!("message {sender}:{sender_seq} was never sent"));
            }
        }
        let prev = last_seq.insert(sender, sender_seq).unwrap_or(0);
        if sender_seq != prev + 1 {
            r.reordered += 1;
            r.details.push(format!(
                "sender {sender}: {sender_seq} delivered after {prev}"
            ));
        }
    }
    for s in h.sends.iter().filter(|s| s.outcome == Outcome::Ok) {
        match delivered.get(&(s.sender, s.sender_seq)) {
            Some(&seq) if seq == s.group_seq => {}
            Some(&seq) => {
                r.reordered += 1;
                r.details.push(format!(
                    "{}:{} acknowledged at {} but delivered at {seq}",
                    s.sender, s.sender_seq, s.group_seq
                ));
            }
            None => {
                r.lost += 1;
                r.details.push(format!(
                    "acknowledged {}:{} (group_seq {}) never delivered",
                    s.sender, s.sender_seq, s.group_seq
                ));
            }
        }
    }

    r.windows_ms = unavailable_windows(h)
        .iter()
        .map(|d| d.as_millis())
        .collect();
    r.max_unavailable_ms = r.windows_ms.iter().copied().max().unwrap_or(0);
    r.recovery_ms = h
        .faults
        .iter()
        .map(|&f| {
            h.ids
                .iter()
                .filter(|o| o.outcome == Outcome::Ok && o.invoke >= f)
                .map(|o| (o.complete - f).as_millis())
                .min()
                .unwrap_or(u128::MAX)
        })
        .collect();
    r
}

/// For each fault, the longest stretch without a successful id operation in the 10 s after it.
fn unavailable_windows(h: &History) -> Vec<Duration> {
    let mut done: Vec<Instant> = h
        .ids
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.complete)
        .collect();
    done.sort();
    h.faults
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            // Up to the next fault, and at most 10 s.
            let next = h
                .faults
                .get(i + 1)
                .copied()
                .unwrap_or(f + Duration::from_secs(10));
            let window_end = next.min(f + Duration::from_secs(10));
            let mut prev = f;
            let mut worst = Duration::ZERO;
            for &t in done.iter().filter(|t| **t > f && **t <= window_end) {
                worst = worst.max(t - prev);
                prev = t;
            }
            worst
        })
        .collect()
}
