//! `client bench`: a closed-loop load generator. C callers, spread over the servers and over
//! several HTTP/2 connections per server, each issue one call at a time for a fixed duration.
//! Latencies go into HDR histograms; what came back is checked (ids unique, group_seq dense
//! and never duplicated) and a violation fails the run.
//!
//! The run ends at its duration whatever the servers do: every call is bounded by
//! CALL_LIMIT, subscribers drain for at most DRAIN_LIMIT after the callers stop, and what
//! failed is reported as errors by code (errors do not fail the run; violations do).
//!
//! The same harness loads etcd (a Put's revision is the id) and Redis (INCR), for comparison.

mod etcd;
mod redis;

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use sequencer_client::{code_name, Client, Identity, Tls};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;

/// How long the client keeps retrying one call before it gives up with an error.
const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// A backstop above CALL_DEADLINE, which the client keeps: past this a call is dropped as
/// DEADLINE_EXCEEDED. Also how long past the end a call in flight may finish.
const CALL_LIMIT: Duration = Duration::from_secs(3);
/// After the callers stop, a subscriber whose stream has been quiet this long has seen it all.
const QUIET: Duration = Duration::from_secs(1);
/// The longest a subscriber goes on after the callers stop, whatever its servers do.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Between two attempts to resubscribe.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(100);

/// What each caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    GetId,
    GetIds,
    Send,
    Ping,
}

/// What is loaded: our cluster, or a peer a user might pick instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Sequencer,
    /// get-id is a Put (its header.revision is the id); ping is Maintenance.Status.
    Etcd,
    /// get-id is INCR; ping is PING. One TCP connection per caller.
    Redis,
}

/// One caller's way to the system under test.
enum Conn {
    Sequencer(Arc<Client>),
    Etcd(Box<etcd::Conn>),
    Redis(redis::Conn),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub system: System,
    pub mode: Mode,
    pub concurrency: usize,
    pub duration: Duration,
    /// Ids per GetIds call.
    pub count: u32,
    /// HTTP/2 connections per server.
    pub connections: usize,
    /// Payload bytes per Send.
    pub payload: usize,
    pub servers: Vec<String>,
    pub tls: Option<Tls>,
    pub json: bool,
}

/// One caller's record.
#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    errors: HashMap<&'static str, u64>,
    /// (first, count) of every id range handed out.
    ids: Vec<(u64, u64)>,
}

/// What one subscriber saw, for `send`.
#[derive(Default)]
struct Deliveries {
    messages: u64,
    problems: Vec<String>,
    /// Broken streams and failed (re)subscriptions, by code.
    errors: HashMap<&'static str, u64>,
    /// Why it could not follow the group to the end (its server stopped answering), if so:
    /// then what it missed is not a violation.
    cut_short: Option<&'static str>,
}

/// What all the subscribers saw, for the report.
struct Subscriptions {
    delivered: u64,
    errors: BTreeMap<&'static str, u64>,
    /// Subscribers that missed acknowledged messages because their server stopped answering.
    cut_short: usize,
    total: usize,
}

/// A spawned task that is aborted if dropped, so an early return leaves nothing running.
struct Task<T>(JoinHandle<T>);

impl<T> Task<T> {
    fn spawn(f: impl std::future::Future<Output = T> + Send + 'static) -> Self
    where
        T: Send + 'static,
    {
        Self(tokio::spawn(f))
    }

    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.concurrency == 0 || opts.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    if opts.mode == Mode::GetIds && opts.count == 0 {
        bail!("--count must be at least 1");
    }
    if opts.system != System::Sequencer {
        if !matches!(opts.mode, Mode::GetId | Mode::Ping) {
            bail!("--system {:?} runs get-id and ping only", opts.system);
        }
        if opts.tls.is_some() {
            bail!(
                "--system {:?} is benchmarked in plaintext only",
                opts.system
            );
        }
    }
    let clients = connect(&opts)?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));

    // For send: one identity per caller in one fresh group, and a subscriber per server.
    let group = format!("bench-{}", std::process::id());
    let mut identities = Vec::new();
    let mut subscribers = Vec::new();
    // Every bench identity heartbeats from its registration on, each from its own task: one
    // after another, hundreds of heartbeats on a loaded machine outlast the failure timeout,
    // and the server removes the bench's own clients.
    let mut alive = Vec::new();
    // Once every caller has stopped: how many sends were acknowledged.
    let (finished, finished_rx) = watch::channel(None::<u64>);
    if opts.mode == Mode::Send {
        let first = &clients[0][0];
        let watcher = Identity::from(&first.register("bench-watcher").await?);
        alive.push(first.keep_alive(&watcher));
        first.join(&watcher, &group).await?;
        for i in 0..opts.concurrency {
            let me = Identity::from(&first.register(&format!("bench-{i}")).await?);
            alive.push(first.keep_alive(&me));
            first.join(&me, &group).await?;
            identities.push(me);
        }
        for server in &clients {
            subscribers.push(Task::spawn(subscribe(
                server[0].clone(),
                watcher.clone(),
                group.clone(),
                finished_rx.clone(),
            )));
        }
    }

    // The key etcd puts to and Redis increments: fresh for each run.
    let key = format!("bench-{}", std::process::id());
    let etcd_channels = match opts.system {
        System::Etcd => opts
            .servers
            .iter()
            .map(|addr| {
                (0..opts.connections)
                    .map(|_| etcd::Conn::new(addr, &key, CALL_DEADLINE))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let mut conns = Vec::new();
    for i in 0..opts.concurrency {
        // Callers go round the servers, then round each server's connections.
        let (server, connection) = (i % clients.len(), (i / clients.len()) % opts.connections);
        conns.push(match opts.system {
            System::Sequencer => Conn::Sequencer(clients[server][connection].clone()),
            System::Etcd => Conn::Etcd(Box::new(etcd_channels[server][connection].clone())),
            System::Redis => {
                Conn::Redis(redis::Conn::connect(&opts.servers[server], &key, CALL_DEADLINE).await?)
            }
        });
    }
    let started = Instant::now();
    let end = tokio::time::Instant::from_std(started + opts.duration);
    let mut callers = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let me = identities.get(i).cloned();
        callers.push(Task::spawn(caller(
            opts.mode,
            opts.count,
            opts.payload,
            conn,
            me,
            group.clone(),
            end,
            done.clone(),
            failed.clone(),
        )));
    }
    let progress = progress_line(&opts, started, done.clone(), failed.clone());
    let mut latency = Histogram::<u64>::new(3).context("histogram")?;
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut ranges = Vec::new();
    for c in callers {
        let t = c.join().await.context("a caller panicked")?;
        if let Some(h) = &t.latency {
            latency.add(h).context("merging histograms")?;
        }
        for (code, n) in t.errors {
            *errors.entry(code).or_default() += n;
        }
        ranges.extend(t.ids);
    }
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.finish_and_clear();
    }

    let mut problems = Vec::new();
    let mut subscriptions = None;
    match opts.mode {
        Mode::GetId | Mode::GetIds => problems.extend(overlaps(&mut ranges)),
        Mode::Send => {
            let sent = latency.len();
            finished.send_replace(Some(sent));
            let mut s = Subscriptions {
                delivered: 0,
                errors: BTreeMap::new(),
                cut_short: 0,
                total: subscribers.len(),
            };
            for (i, task) in subscribers.into_iter().enumerate() {
                let d = task.join().await.context("a subscriber panicked")?;
                problems.extend(d.problems);
                for (code, n) in d.errors {
                    *s.errors.entry(code).or_default() += n;
                }
                s.delivered += d.messages;
                // Every subscriber must have seen at least every acknowledged message, unless
                // its server stopped answering first.
                if d.messages < sent {
                    if d.cut_short.is_some() {
                        s.cut_short += 1;
                    } else {
                        problems.push(format!(
                            "subscriber on server {} saw {} messages of {sent} acknowledged",
                            i + 1,
                            d.messages
                        ));
                    }
                }
            }
            subscriptions = Some(s);
        }
        Mode::Ping => {}
    }
    // Only now: the server must not drop the watcher while its subscribers drain.
    for a in alive {
        a.stop().await;
    }
    let highest_id = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|r| r.0 + r.1 - 1)
        .max();
    report(
        &opts,
        highest_id,
        elapsed,
        &latency,
        &errors,
        subscriptions.as_ref(),
        &problems,
    );
    if !problems.is_empty() {
        bail!("{} violation(s), first: {}", problems.len(), problems[0]);
    }
    Ok(())
}

/// `connections` clients per server, each its own HTTP/2 connection, bound to that server.
fn connect(opts: &Options) -> anyhow::Result<Vec<Vec<Arc<Client>>>> {
    opts.servers
        .iter()
        .map(|addr| {
            (0..opts.connections)
                .map(|_| {
                    // A call that fails should count as an error soon, not stall its caller
                    // past the end of the run.
                    let mut c = Client::new([addr.as_str()])?
                        .with_deadline(CALL_DEADLINE)
                        .with_rpc_timeout(CALL_DEADLINE)?;
                    if let Some(tls) = &opts.tls {
                        c = c.with_tls(tls.clone())?;
                    }
                    Ok(Arc::new(c))
                })
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn caller(
    mode: Mode,
    count: u32,
    payload: usize,
    mut conn: Conn,
    me: Option<Identity>,
    group: String,
    end: tokio::time::Instant,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Tally {
    let mut t = Tally {
        latency: Histogram::new(3).ok(),
        ..Tally::default()
    };
    if mode == Mode::Send && me.is_none() {
        return t;
    }
    let mut seq = 1;
    let body = vec![b'x'; payload];
    while tokio::time::Instant::now() < end {
        let start = Instant::now();
        let call = async {
            match &mut conn {
                Conn::Sequencer(client) => match mode {
                    Mode::GetId => client.get_id("").await.map(|r| Some((r.id, 1))),
                    Mode::GetIds => client
                        .get_ids("", count)
                        .await
                        .map(|r| Some((r.first, u64::from(r.count)))),
                    Mode::Ping => client.ping().await.map(|_| None),
                    Mode::Send => {
                        let me = me.as_ref().expect("checked above");
                        client
                            .send(me, &group, seq, body.clone())
                            .await
                            .map(|_| None)
                    }
                }
                .map_err(|e| code_name(e.code())),
                Conn::Etcd(etcd) => match mode {
                    Mode::Ping => etcd.ping().await.map(|_| None),
                    _ => etcd.put().await.map(|revision| Some((revision, 1))),
                }
                .map_err(|s| code_name(s.code())),
                Conn::Redis(redis) => match mode {
                    Mode::Ping => redis.ping(CALL_DEADLINE).await.map(|_| None),
                    _ => redis.incr(CALL_DEADLINE).await.map(|n| Some((n, 1))),
                }
                .map_err(|e| e.name()),
            }
        };
        let res: Result<Option<(u64, u64)>, &'static str> =
            match tokio::time::timeout(CALL_LIMIT, call).await {
                Ok(res) => res,
                Err(_) => Err(code_name(Code::DeadlineExceeded)),
            };
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        match res {
            Ok(range) => {
                if let Some(h) = &mut t.latency {
                    let _ = h.record(us.max(1));
                }
                if let Some(r) = range {
                    t.ids.push(r);
                }
                seq += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => {
                *t.errors.entry(code).or_default() += 1;
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    t
}

/// Follows the group from its first delivery, checking that group_seq is dense and never
/// repeats, and resubscribes where it stopped if the stream breaks. Once the callers have
/// stopped (`finished` holds what they sent) it drains until the stream has been quiet for
/// QUIET, and for DRAIN_LIMIT at most.
async fn subscribe(
    client: Arc<Client>,
    me: Identity,
    group: String,
    mut finished: watch::Receiver<Option<u64>>,
) -> Deliveries {
    let mut d = Deliveries::default();
    let mut limit_rx = finished.clone();
    let limit = async move {
        let _ = limit_rx.wait_for(|f| f.is_some()).await;
        tokio::time::sleep(DRAIN_LIMIT).await;
    };
    let out_of_time = tokio::select! {
        _ = follow(&client, &me, &group, &mut finished, &mut d) => false,
        _ = limit => true,
    };
    if out_of_time {
        *d.errors
            .entry(code_name(Code::DeadlineExceeded))
            .or_default() += 1;
        d.cut_short.get_or_insert(code_name(Code::DeadlineExceeded));
    }
    d
}

/// A subscription that failed this way may work again: the server went away or did not
/// answer in time, or it cut a subscriber that fell behind.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
    )
}

async fn follow(
    client: &Client,
    me: &Identity,
    group: &str,
    finished: &mut watch::Receiver<Option<u64>>,
    d: &mut Deliveries,
) {
    let mut next = 1;
    loop {
        let opened = match tokio::time::timeout(CALL_LIMIT, client.subscribe(me, group, next)).await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) if !transient(e.code()) => {
                d.problems.push(format!("subscribe: {e}"));
                return;
            }
            Ok(Err(e)) => Err(code_name(e.code())),
            Err(_) => Err(code_name(Code::DeadlineExceeded)),
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(code) => {
                *d.errors.entry(code).or_default() += 1;
                // Once the callers have stopped, a server that cannot be reached ends it.
                if finished.borrow().is_some() {
                    d.cut_short = Some(code);
                    return;
                }
                tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
                continue;
            }
        };
        loop {
            let sent = *finished.borrow_and_update();
            tokio::select! {
                got = stream.message() => match got {
                    Ok(Some(delivery)) => {
                        if delivery.group_seq != next {
                            d.problems.push(format!(
                                "group_seq {} arrived where {next} was due",
                                delivery.group_seq
                            ));
                        }
                        next = delivery.group_seq + 1;
                        if delivery.kind == sequencer_client::pb::delivery::Kind::Message as i32 {
                            d.messages += 1;
                        }
                    }
                    Ok(None) => return,
                    Err(status) if transient(status.code()) => {
                        *d.errors.entry(code_name(status.code())).or_default() += 1;
                        break;
                    }
                    Err(status) => {
                        d.problems.push(format!("subscription broke: {status}"));
                        return;
                    }
                },
                changed = finished.changed(), if sent.is_none() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(QUIET), if sent.is_some() => {
                    if d.messages < sent.unwrap_or(0) {
                        // Short of what was acknowledged: a server that no longer answers
                        // explains it; one that answers and did not deliver is a violation.
                        let code = match tokio::time::timeout(CALL_LIMIT, client.ping()).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(code_name(e.code())),
                            Err(_) => Some(code_name(Code::DeadlineExceeded)),
                        };
                        if let Some(code) = code {
                            *d.errors.entry(code).or_default() += 1;
                            d.cut_short = Some(code);
                        }
                    }
                    return;
                }
            }
        }
    }
}

/// Sorts the ranges and describes every pair that shares an id.
fn overlaps(ranges: &mut [(u64, u64)]) -> Vec<String> {
    ranges.sort_unstable();
    ranges
        .windows(2)
        .filter(|w| w[0].0 + w[0].1 > w[1].0)
        .map(|w| {
            format!(
                "ids {}..{} and {}..{} overlap",
                w[0].0,
                w[0].0 + w[0].1 - 1,
                w[1].0,
                w[1].0 + w[1].1 - 1
            )
        })
        .collect()
}

fn progress_line(
    opts: &Options,
    started: Instant,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Option<indicatif::ProgressBar> {
    if opts.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let tick = bar.clone();
    tokio::spawn(async move {
        while !tick.is_finished() {
            let ops = done.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            tick.set_message(format!(
                "{:>5.1} s  {:>10.0} ops/s  {} errors",
                secs,
                ops as f64 / secs,
                failed.load(Ordering::Relaxed)
            ));
            tick.tick();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Some(bar)
}

/// Prints the run's figures; `highest_id` is the highest id (or etcd revision, or Redis value)
/// it was handed.
fn report(
    opts: &Options,
    highest_id: Option<u64>,
    elapsed: Duration,
    latency: &Histogram<u64>,
    errors: &BTreeMap<&'static str, u64>,
    subscriptions: Option<&Subscriptions>,
    problems: &[String],
) {
    let delivered = subscriptions.map(|s| s.delivered);
    let secs = elapsed.as_secs_f64();
    let ops = latency.len();
    let per_op = if opts.mode == Mode::GetIds {
        u64::from(opts.count)
    } else {
        1
    };
    let q = |p: f64| latency.value_at_quantile(p);
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|v| v.get_name().to_string()).unwrap_or_default()
    };
    let mode = name(clap::ValueEnum::to_possible_value(&opts.mode));
    let system = name(clap::ValueEnum::to_possible_value(&opts.system));
    if opts.json {
        println!(
            "{}",
            json!({
                "system": system,
                "mode": mode,
                "concurrency": opts.concurrency,
                "connections": opts.connections,
                "servers": opts.servers,
                "seconds": secs,
                "ops": ops,
                "ops_per_s": ops as f64 / secs,
                "ids_per_s": (ops * per_op) as f64 / secs,
                "highest_id": highest_id,
                "delivered_per_s": delivered.map(|d| d as f64 / secs),
                "latency_us": {
                    "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                    "max": latency.max(),
                },
                "errors": errors,
                "subscriber_errors": subscriptions.map(|s| &s.errors),
                "subscribers_cut_short": subscriptions.map(|s| s.cut_short),
                "violations": problems.len(),
            })
        );
        return;
    }
    println!(
        "{system} {mode}: {} callers on {} server(s) for {secs:.1} s",
        opts.concurrency,
        opts.servers.len()
    );
    println!("  ops        {ops} ({:.0}/s)", ops as f64 / secs);
    if opts.mode == Mode::GetIds {
        println!("  ids        {:.0}/s", (ops * per_op) as f64 / secs);
    }
    if let Some(d) = delivered {
        println!(
            "  delivered  {d} ({:.0} messages/s over all subscribers)",
            d as f64 / secs
        );
    }
    println!(
        "  latency    p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        latency.max()
    );
    let list = |errors: &BTreeMap<&'static str, u64>| {
        let all: Vec<String> = errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        all.join(", ")
    };
    if errors.is_empty() {
        println!("  errors     none");
    } else {
        println!("  errors     {}", list(errors));
    }
    if let Some(s) = subscriptions.filter(|s| !s.errors.is_empty()) {
        println!(
            "  subscribers  {} of {} cut short by their server (not checked); errors {}",
            s.cut_short,
            s.total,
            list(&s.errors)
        );
    }
    println!(
        "  checks     {}",
        if problems.is_empty() {
            "ok".to_string()
        } else {
            format!("{} violation(s)", problems.len())
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(system: System, mode: Mode, server: String) -> Options {
        Options {
            system,
            mode,
            concurrency: 4,
            duration: Duration::from_millis(300),
            count: 1,
            connections: 2,
            payload: 0,
            servers: vec![server],
            tls: None,
            json: true,
        }
    }

    #[tokio::test]
    async fn redis_runs_through_the_same_checks() {
        let good = redis::tests::fake_redis(false).await;
        run(options(System::Redis, Mode::GetId, good.clone()))
            .await
            .expect("unique INCR values pass");
        run(options(System::Redis, Mode::Ping, good.clone()))
            .await
            .expect("ping");
        let e = run(options(System::Redis, Mode::Send, good))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("get-id and ping only"), "{e}");
        let repeating = redis::tests::fake_redis(true).await;
        let e = run(options(System::Redis, Mode::GetId, repeating))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
    }

    #[test]
    fn overlapping_ranges_are_reported_and_adjacent_ones_are_not() {
        let mut ok = vec![(11, 10), (1, 10), (21, 1)];
        assert!(overlaps(&mut ok).is_empty());
        let mut bad = vec![(1, 10), (10, 5), (30, 1), (30, 1)];
        let found = overlaps(&mut bad);
        assert_eq!(found.len(), 2, "{found:?}");
    }
}
