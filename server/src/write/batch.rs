//! Group commit: every node gathers the requests that arrive while its previous batch is in
//! flight and sends them to the primary as ONE log entry (the primary proposes it, a follower
//! forwards it). When the entry is applied here, each waiter gets its own answer. There is no
//! fixed delay: a batch is whatever queued up. A [`Plan`] says how one kind of request becomes
//! a command and how the reply splits back.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::Error;
use crate::peer::messages::Committed;
use crate::raft::NodeId;
use crate::state::{Command, Reply};
use crate::write::proposer::Proposer;

/// Most waiters served by one log entry.
const MAX_WAITERS_PER_BATCH: usize = 65_536;
/// Most distinct keys (sequences, groups) in one log entry, so entries stay small.
const MAX_KEYS_PER_BATCH: usize = 1_024;
/// Most payload bytes in one log entry (a single larger request still goes alone). openraft 0.9
/// gives each AppendEntries one heartbeat interval, follower fsync included, so entries stay
/// small; with `max_payload_entries` this also bounds a peer message.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// How one kind of request is batched.
pub trait Plan: Send + Sync + 'static {
    type Req: Send + 'static;
    type Out: Send + 'static;
    /// What the plan needs to split the reply, kept while the entry is in flight.
    type Split: Send + 'static;
    /// What the info log calls the requests.
    const WHAT: &'static str;
    /// The `kind` label of this batcher's metrics.
    const KIND: &'static str;

    /// The name a request is grouped by (a sequence, a group).
    fn key(req: &Self::Req) -> &str;
    /// The payload bytes a request adds to the entry.
    fn size(_req: &Self::Req) -> usize {
        0
    }
    /// The ids a request asks for, for the batch-size metric (0: not an id request).
    fn ids(_req: &Self::Req) -> u64 {
        0
    }
    /// The one command for the whole batch.
    fn command(&self, batch: Vec<Self::Req>) -> (Command, Self::Split);
    /// Each waiter's answer, in batch order.
    fn answer(
        &self,
        split: Self::Split,
        reply: &Reply,
        primary: NodeId,
    ) -> Vec<Result<Self::Out, Error>>;
}

/// What one log entry may hold.
#[derive(Debug, Clone, Copy)]
struct EntryLimits {
    waiters: usize,
    keys: usize,
    bytes: usize,
}

const ENTRY_LIMITS: EntryLimits = EntryLimits {
    waiters: MAX_WAITERS_PER_BATCH,
    keys: MAX_KEYS_PER_BATCH,
    bytes: MAX_BATCH_BYTES,
};

/// Fills one entry: `first`, then whatever `next` yields while the entry has room for it.
/// The first request that does not fit (a key too many, or bytes past the limit) is handed
/// back to open the next entry; `first` always goes, so one request larger than the byte
/// limit goes alone.
fn fill<T>(
    first: T,
    mut next: impl FnMut() -> Option<T>,
    key: impl Fn(&T) -> &str,
    size: impl Fn(&T) -> usize,
    limits: EntryLimits,
) -> (Vec<T>, Option<T>) {
    let mut keys: HashSet<String> = HashSet::from([key(&first).to_string()]);
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < limits.waiters {
        let Some(p) = next() else { break };
        let new_key = !keys.contains(key(&p));
        if (new_key && keys.len() == limits.keys) || bytes + size(&p) > limits.bytes {
            return (batch, Some(p));
        }
        if new_key {
            keys.insert(key(&p).to_string());
        }
        bytes += size(&p);
        batch.push(p);
    }
    (batch, None)
}

/// Splits a batch at `now` into the requests still worth proposing and those whose time ran
/// out in the queue; a caller that already gave up is dropped from both.
fn live<R, O>(batch: Batch<R, O>, now: Instant) -> (Batch<R, O>, Batch<R, O>) {
    batch
        .into_iter()
        .filter(|p| !p.reply.is_closed())
        .partition(|p| p.deadline > now)
}

type Batch<R, O> = Vec<Pending<R, O>>;

struct Pending<R, O> {
    req: R,
    /// Counted from arrival, so time spent queued behind a slow batch counts too.
    deadline: Instant,
    reply: oneshot::Sender<Result<O, Error>>,
}

/// The front of one batcher. Cheap to clone; the task stops when every clone is gone.
pub struct Batcher<P: Plan> {
    tx: mpsc::Sender<Pending<P::Req, P::Out>>,
    proposer: Proposer,
}

impl<P: Plan> Clone for Batcher<P> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            proposer: self.proposer.clone(),
        }
    }
}

impl<P: Plan> Batcher<P> {
    /// Starts the batching task on `tasks`, with a queue of `capacity` waiting requests.
    pub fn start(plan: P, proposer: Proposer, capacity: usize, tasks: &mut JoinSet<()>) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        tasks.spawn(run(Arc::new(plan), rx, proposer.clone()));
        Self { tx, proposer }
    }

    /// Queues `req` for the next batch and waits for its answer.
    pub async fn submit(&self, req: P::Req) -> Result<P::Out, Error> {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            req,
            deadline: self.proposer.deadline(),
            reply,
        };
        self.tx.try_send(pending).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                queued: self.tx.max_capacity(),
            },
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The depth of this batcher's queue, read at each scrape; 0 once the batcher has stopped.
    pub fn depth(&self) -> crate::metrics::scrape::Reading {
        let tx = self.tx.downgrade();
        std::sync::Arc::new(move || {
            tx.upgrade()
                .map_or(0, |tx| tx.max_capacity().saturating_sub(tx.capacity()))
        })
    }
}

async fn run<P: Plan>(
    plan: Arc<P>,
    mut rx: mpsc::Receiver<Pending<P::Req, P::Out>>,
    proposer: Proposer,
) {
    let mut replies = JoinSet::new();
    let mut forwarded = crate::summary::Summary::default();
    // A request that did not fit the previous batch opens the next one.
    let mut carry = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let (batch, next) = fill(
            first,
            || rx.try_recv().ok(),
            |p| P::key(&p.req),
            |p| P::size(&p.req),
            ENTRY_LIMITS,
        );
        carry = next;
        // A caller that gave up, or whose time ran out in the queue, would only waste the log.
        let (batch, expired) = live(batch, Instant::now());
        for p in expired {
            let _ = p.reply.send(Err(Error::Unavailable(
                "no batch reached the primary within request_timeout_ms".into(),
            )));
        }
        // Proposed by the oldest waiter's deadline; once committed, the entry is awaited here
        // until the newest one's, so a request that just arrived is not failed early.
        let Some(deadline) = batch.iter().map(|p| p.deadline).min() else {
            continue;
        };
        let apply_by = batch.iter().map(|p| p.deadline).max().unwrap_or(deadline);
        let (requests, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.req, p.reply)).unzip();
        let size = (requests.len(), requests.iter().map(P::ids).sum::<u64>());
        let (command, split) = plan.command(requests);
        match proposer.propose(command, deadline).await {
            Ok(committed) => {
                observe_batch::<P>(size);
                if committed.primary != proposer.id() {
                    tracing::debug!(
                        node = proposer.id(),
                        primary = committed.primary,
                        requests = waiters.len(),
                        index = committed.index,
                        "forwarded a batch of {} {} to the primary",
                        waiters.len(),
                        P::WHAT
                    );
                    if let Some(t) = forwarded.add(waiters.len() as u64, committed.index) {
                        tracing::info!(
                            node = proposer.id(),
                            primary = committed.primary,
                            batches = t.events,
                            requests = t.items,
                            first_index = t.first_index,
                            last_index = t.last_index,
                            "forwarded {} {} in {} batches to the primary",
                            t.items,
                            P::WHAT,
                            t.events
                        );
                    }
                }
                // Answer once applied here, while the next batch is already on its way.
                let (plan, proposer) = (plan.clone(), proposer.clone());
                replies.spawn(async move {
                    let ready = proposer.wait_applied(committed.index, apply_by).await;
                    answer(&*plan, waiters, split, committed, ready);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, waiters = waiters.len(), "batch failed");
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
        while replies.try_join_next().is_some() {}
    }
    while replies.join_next().await.is_some() {}
}

/// The batch-size metrics of one committed entry: its requests and ids.
fn observe_batch<P: Plan>((requests, ids): (usize, u64)) {
    let m = crate::metrics::get();
    m.batch_requests
        .with_label_values(&[P::KIND])
        .observe(requests as f64);
    if ids > 0 {
        m.batch_ids.observe(ids as f64);
    }
}

fn answer<P: Plan>(
    plan: &P,
    waiters: Vec<oneshot::Sender<Result<P::Out, Error>>>,
    split: P::Split,
    committed: Committed,
    ready: Result<(), Error>,
) {
    let answers = match ready {
        Ok(()) => plan.answer(split, &committed.reply, committed.primary),
        Err(e) => waiters.iter().map(|_| Err(e.clone())).collect(),
    };
    if answers.len() != waiters.len() {
        let e = Error::Internal(format!(
            "reply to {} {} has {} answers",
            waiters.len(),
            P::WHAT,
            answers.len()
        ));
        for w in waiters {
            let _ = w.send(Err(e.clone()));
        }
        return;
    }
    for (w, a) in waiters.into_iter().zip(answers) {
        let _ = w.send(a);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A request: its key and its payload bytes.
    type Req = (&'static str, usize);

    const SMALL: EntryLimits = EntryLimits {
        waiters: 4,
        keys: 2,
        bytes: 100,
    };

    #[test]
    fn fill_keeps_each_entry_within_its_limits_and_carries_the_first_misfit() {
        // (queue, expected batch length, expected carried-over request)
        let cases: &[(&[Req], usize, Option<Req>)] = &[
            (&[("a", 0)], 1, None),
            // Same key: only the waiter limit applies.
            (&[("a", 0), ("a", 0), ("a", 0), ("a", 0), ("a", 0)], 4, None),
            // A third distinct key opens the next entry; a repeat of a known key still fits.
            (
                &[("a", 0), ("b", 0), ("a", 0), ("c", 0), ("a", 0)],
                3,
                Some(("c", 0)),
            ),
            // Bytes: up to the limit exactly, then the next one is carried over.
            (&[("a", 60), ("a", 40), ("a", 1)], 2, Some(("a", 1))),
            (&[("a", 60), ("a", 41)], 1, Some(("a", 41))),
            // One request larger than the limit goes alone.
            (&[("a", 500), ("a", 1)], 1, Some(("a", 1))),
        ];
        for (queue, len, carried) in cases {
            let mut rest = queue[1..].iter().copied();
            let (batch, carry) = fill(queue[0], || rest.next(), |r| r.0, |r| r.1, SMALL);
            assert_eq!(batch.len(), *len, "{queue:?}");
            assert_eq!(batch[..], queue[..*len], "{queue:?}");
            assert_eq!(carry, *carried, "{queue:?}");
            // Nothing is read past the carried-over request.
            let read = len + usize::from(carry.is_some());
            assert_eq!(rest.count(), queue.len() - read, "{queue:?}");
        }
    }

    #[test]
    fn live_drops_expired_and_abandoned_requests() {
        let now = Instant::now();
        let pending = |deadline| {
            let (reply, rx) = oneshot::channel::<Result<(), Error>>();
            (
                Pending {
                    req: (),
                    deadline,
                    reply,
                },
                rx,
            )
        };
        let (fresh, _keep1) = pending(now + Duration::from_secs(1));
        let (late, mut told) = pending(now - Duration::from_millis(1));
        let (abandoned, gone) = pending(now + Duration::from_secs(1));
        drop(gone);
        let (ok, expired) = live(vec![fresh, late, abandoned], now);
        assert_eq!(ok.len(), 1);
        assert_eq!(expired.len(), 1);
        assert!(
            told.try_recv().is_err(),
            "live only sorts; run() answers the expired"
        );
    }
}
