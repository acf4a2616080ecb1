//! Batching of id requests: every node gathers the requests that arrive while its previous
//! batch is in flight and sends them to the primary as ONE `Allocate` log entry (the primary
//! proposes it, a follower forwards it). When the entry is applied, each waiter gets its own
//! consecutive slice of the range. There is no fixed delay: a batch is whatever queued up.

use std::collections::{HashMap, HashSet};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::Error;
use crate::proposer::{Committed, Proposer};
use crate::state::{AllocRequest, Command, Reply};

/// Most waiters served by one log entry.
const MAX_WAITERS_PER_BATCH: usize = 65_536;
/// Most distinct sequences in one log entry, which keeps entries small whatever names arrive.
const MAX_SEQUENCES_PER_BATCH: usize = 1_024;

/// Ids granted to one request.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub first: u64,
    pub primary: u64,
}

struct Pending {
    sequence: String,
    count: u64,
    /// Counted from arrival, so time spent queued behind a slow batch counts too.
    deadline: Instant,
    reply: oneshot::Sender<Result<Grant, Error>>,
}

/// The front of this node's batcher. Cheap to clone; the batcher stops when every clone is gone.
#[derive(Clone)]
pub struct Allocator {
    tx: mpsc::Sender<Pending>,
    proposer: Proposer,
}

impl Allocator {
    /// Starts the batcher task on `tasks`, with a queue of `capacity` waiting requests.
    pub fn start(
        proposer: Proposer,
        capacity: usize,
        max_sequences: u32,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        tasks.spawn(run(rx, proposer.clone(), max_sequences));
        Self { tx, proposer }
    }

    /// `count` consecutive ids of `sequence`. The name and count must already be valid.
    pub async fn allocate(&self, sequence: String, count: u64) -> Result<Grant, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Pending {
                sequence,
                count,
                deadline: self.proposer.deadline(),
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                    queued: self.tx.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
            })?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

async fn run(mut rx: mpsc::Receiver<Pending>, proposer: Proposer, max_sequences: u32) {
    let mut replies = JoinSet::new();
    // A request that did not fit the previous batch opens the next one.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let mut names: HashSet<String> = HashSet::from([first.sequence.clone()]);
        let mut batch = vec![first];
        while batch.len() < MAX_WAITERS_PER_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            if !names.contains(&p.sequence) {
                if names.len() == MAX_SEQUENCES_PER_BATCH {
                    carry = Some(p);
                    break;
                }
                names.insert(p.sequence.clone());
            }
            batch.push(p);
        }
        // A caller that gave up, or whose time ran out in the queue, would only burn ids.
        let now = Instant::now();
        let (live, expired): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .filter(|p| !p.reply.is_closed())
            .partition(|p| p.deadline > now);
        for p in expired {
            let _ = p.reply.send(Err(Error::Unavailable(
                "no batch reached the primary within request_timeout_ms".into(),
            )));
        }
        let batch = live;
        if batch.is_empty() {
            continue;
        }
        let (requests, slots) = plan(&batch);
        let command = Command::Allocate {
            requests,
            max_sequences,
        };
        let deadline = batch
            .iter()
            .map(|p| p.deadline)
            .min()
            .unwrap_or_else(|| proposer.deadline());
        match proposer.propose(command, deadline).await {
            Ok(committed) => {
                if committed.primary != proposer.id() {
                    tracing::info!(
                        node = proposer.id(),
                        primary = committed.primary,
                        requests = batch.len(),
                        index = committed.index,
                        "forwarded a batch of {} requests to the primary",
                        batch.len()
                    );
                }
                // Answer once applied here, while the next batch is already on its way.
                let proposer = proposer.clone();
                replies.spawn(async move {
                    let ready = proposer.wait_applied(committed.index).await;
                    answer(batch, &slots, committed, ready);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, waiters = batch.len(), "batch failed");
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
        while replies.try_join_next().is_some() {}
    }
    while replies.join_next().await.is_some() {}
}

/// Where each waiter's slice lies: (index of its sequence's request, offset into that range).
type Slots = Vec<(usize, u64)>;

/// One request per distinct sequence, summing the counts, in order of first appearance.
fn plan(batch: &[Pending]) -> (Vec<AllocRequest>, Slots) {
    let mut requests: Vec<AllocRequest> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(batch.len());
    for p in batch {
        let i = *index.entry(p.sequence.as_str()).or_insert_with(|| {
            requests.push(AllocRequest {
                sequence: p.sequence.clone(),
                count: 0,
            });
            requests.len() - 1
        });
        slots.push((i, requests[i].count));
        requests[i].count += p.count;
    }
    (requests, slots)
}

fn answer(batch: Vec<Pending>, slots: &Slots, committed: Committed, ready: Result<(), Error>) {
    let results = match (&committed.reply, ready) {
        (_, Err(e)) => Err(e),
        (Reply::Allocated(results), Ok(())) => Ok(results),
        (other, Ok(())) => Err(Error::Internal(format!(
            "unexpected reply to Allocate: {other:?}"
        ))),
    };
    for (p, &(i, offset)) in batch.into_iter().zip(slots) {
        let res = match &results {
            Err(e) => Err(e.clone()),
            Ok(results) => match results.get(i) {
                Some(Ok(first)) => Ok(Grant {
                    first: first + offset,
                    primary: committed.primary,
                }),
                Some(Err(r)) => Err(Error::Rejected(r.clone())),
                None => Err(Error::Internal("reply shorter than the batch".into())),
            },
        };
        tracing::debug!(sequence = %p.sequence, count = p.count, ok = res.is_ok(), "answered");
        let _ = p.reply.send(res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(sequence: &str, count: u64) -> Pending {
        Pending {
            sequence: sequence.into(),
            count,
            deadline: Instant::now(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn plan_sums_per_sequence_and_slices_in_order() {
        let batch = vec![
            pending("a", 1),
            pending("b", 5),
            pending("a", 3),
            pending("a", 1),
        ];
        let (requests, slots) = plan(&batch);
        assert_eq!(
            requests,
            vec![
                AllocRequest {
                    sequence: "a".into(),
                    count: 5
                },
                AllocRequest {
                    sequence: "b".into(),
                    count: 5
                },
            ]
        );
        assert_eq!(slots, vec![(0, 0), (1, 0), (0, 1), (0, 4)]);
    }
}
