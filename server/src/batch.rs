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
use crate::proposer::{Committed, Proposer};
use crate::raft::NodeId;
use crate::state::{Command, Reply};

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

    /// The name a request is grouped by (a sequence, a group).
    fn key(req: &Self::Req) -> &str;
    /// The payload bytes a request adds to the entry.
    fn size(_req: &Self::Req) -> usize {
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
        let mut keys: HashSet<String> = HashSet::from([P::key(&first.req).to_string()]);
        let mut bytes = P::size(&first.req);
        let mut batch = vec![first];
        while batch.len() < MAX_WAITERS_PER_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            let new_key = !keys.contains(P::key(&p.req));
            if (new_key && keys.len() == MAX_KEYS_PER_BATCH)
                || bytes + P::size(&p.req) > MAX_BATCH_BYTES
            {
                carry = Some(p);
                break;
            }
            if new_key {
                keys.insert(P::key(&p.req).to_string());
            }
            bytes += P::size(&p.req);
            batch.push(p);
        }
        // A caller that gave up, or whose time ran out in the queue, would only waste the log.
        let now = Instant::now();
        let (batch, expired): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .filter(|p| !p.reply.is_closed())
            .partition(|p| p.deadline > now);
        for p in expired {
            let _ = p.reply.send(Err(Error::Unavailable(
                "no batch reached the primary within request_timeout_ms".into(),
            )));
        }
        let Some(deadline) = batch.iter().map(|p| p.deadline).min() else {
            continue;
        };
        let (requests, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.req, p.reply)).unzip();
        let (command, split) = plan.command(requests);
        match proposer.propose(command, deadline).await {
            Ok(committed) => {
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
                    let ready = proposer.wait_applied(committed.index).await;
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
