//! Id requests as a batch [`Plan`]: one `Allocate` entry per batch, one request per distinct
//! sequence with the counts summed; each waiter gets its consecutive slice of the range.

use std::collections::HashMap;

use crate::error::Error;
use crate::raft::NodeId;
use crate::state::{AllocRequest, Command, Reply};
use crate::write::batch::{Batcher, Plan};

/// Ids granted to one request.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub first: u64,
    pub primary: NodeId,
}

/// The batcher that serves GetId and GetIds.
pub type Allocator = Batcher<AllocPlan>;

/// How id requests batch.
pub struct AllocPlan {
    /// Stamped into each command, so every node refuses a new sequence alike.
    pub max_sequences: u32,
}

/// Where each waiter's slice lies: (index of its sequence's request, offset into that range).
pub type Slots = Vec<(usize, u64)>;

impl Plan for AllocPlan {
    type Req = AllocRequest;
    type Out = Grant;
    type Split = Slots;
    const WHAT: &'static str = "id requests";
    const KIND: &'static str = "ids";

    fn key(req: &AllocRequest) -> &str {
        &req.sequence
    }

    fn ids(req: &AllocRequest) -> u64 {
        req.count
    }

    fn command(&self, batch: Vec<AllocRequest>) -> (Command, Slots) {
        let (requests, slots) = plan(batch);
        let command = Command::Allocate {
            requests,
            max_sequences: self.max_sequences,
        };
        (command, slots)
    }

    fn answer(&self, slots: Slots, reply: &Reply, primary: NodeId) -> Vec<Result<Grant, Error>> {
        let Reply::Allocated(results) = reply else {
            let e = Error::Internal(format!("unexpected reply to Allocate: {reply:?}"));
            return slots.iter().map(|_| Err(e.clone())).collect();
        };
        slots
            .iter()
            .map(|&(i, offset)| match results.get(i) {
                Some(Ok(first)) => Ok(Grant {
                    first: first + offset,
                    primary,
                }),
                Some(Err(r)) => Err(Error::Rejected(r.clone())),
                None => Err(Error::Internal("reply shorter than the batch".into())),
            })
            .collect()
    }
}

/// One request per distinct sequence, summing the counts, in order of first appearance.
fn plan(batch: Vec<AllocRequest>) -> (Vec<AllocRequest>, Slots) {
    let mut requests: Vec<AllocRequest> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(batch.len());
    for r in batch {
        let i = *index.entry(r.sequence.clone()).or_insert_with(|| {
            requests.push(AllocRequest::new(r.sequence, 0));
            requests.len() - 1
        });
        slots.push((i, requests[i].count));
        requests[i].count += r.count;
    }
    (requests, slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    use AllocRequest as Req;

    #[test]
    fn plan_sums_per_sequence_and_slices_in_order() {
        let (requests, slots) = plan(vec![
            Req::new("a", 1),
            Req::new("b", 5),
            Req::new("a", 3),
            Req::new("a", 1),
        ]);
        assert_eq!(requests, vec![Req::new("a", 5), Req::new("b", 5)]);
        assert_eq!(slots, vec![(0, 0), (1, 0), (0, 1), (0, 4)]);
        let reply = Reply::Allocated(vec![Ok(10), Ok(1)]);
        let firsts: Vec<u64> = AllocPlan { max_sequences: 9 }
            .answer(slots, &reply, 1)
            .into_iter()
            .map(|g| g.unwrap().first)
            .collect();
        assert_eq!(firsts, vec![10, 1, 11, 14]);
    }
}
