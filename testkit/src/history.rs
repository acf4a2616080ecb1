//! A recorded history and the checkers over its id allocations. The chaos workload records
//! [`History`] (the whole-run checker is `crate::checker`); the failover tests record [`Op`]s.
//! Every instant comes from one monotonic clock.

use std::time::Instant;

use sequencer_client::ClientError;
use tonic::Code;

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A definite refusal, with its code: nothing happened.
    Failed(Code),
    /// Timed out or lost its connection: it may or may not have taken effect.
    Indeterminate,
}

impl Outcome {
    /// How a call that failed with `e` ended.
    pub fn of(e: &ClientError) -> Outcome {
        match e.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Outcome::Indeterminate
            }
            code => Outcome::Failed(code),
        }
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

/// One delivery a subscriber saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub group_seq: u64,
    pub sender: u64,
    pub sender_seq: u64,
    /// A message, not a membership event.
    pub message: bool,
}

/// Everything the workload recorded.
#[derive(Default)]
pub struct History {
    pub ids: Vec<IdOp>,
    pub sends: Vec<SendOp>,
    /// What each subscriber saw, in the order it saw it.
    pub subscribers: Vec<Vec<Seen>>,
    /// When each fault was injected.
    pub faults: Vec<Instant>,
    /// Senders the cluster removed (missed heartbeats): not a safety violation, but reported.
    pub removed: usize,
}

impl History {
    /// The highest id any id operation got; 0 if none got one.
    pub fn highest_id(&self) -> u64 {
        self.ids
            .iter()
            .filter(|o| o.first > 0)
            .map(|o| o.first + o.count - 1)
            .max()
            .unwrap_or(0)
    }
}

/// One successful allocation of the block `first..first+count`.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub invoke: Instant,
    pub complete: Instant,
    pub first: u64,
    pub count: u64,
}

impl Op {
    pub fn last(&self) -> u64 {
        self.first + self.count - 1
    }
}

/// Blocks that overlap, as pairs of (first, last); empty when every id is unique.
pub fn overlaps(ops: &[Op]) -> Vec<((u64, u64), (u64, u64))> {
    let mut blocks: Vec<(u64, u64)> = ops.iter().map(|o| (o.first, o.last())).collect();
    blocks.sort();
    blocks
        .windows(2)
        .filter(|w| w[1].0 <= w[0].1)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// The ids in 1..=max that no op received; empty when the history is dense from 1.
pub fn gaps(ops: &[Op]) -> Vec<(u64, u64)> {
    let mut blocks: Vec<(u64, u64)> = ops.iter().map(|o| (o.first, o.last())).collect();
    blocks.sort();
    let mut next = 1;
    let mut gaps = Vec::new();
    for (first, last) in blocks {
        if first > next {
            gaps.push((next, first - 1));
        }
        next = next.max(last + 1);
    }
    gaps
}

/// Pairs (a, b) where a completed before b was invoked, yet b got an id not above a's:
/// a real-time order violation. An O(n log n) sweep: ops sorted by completion, prefix maxima.
pub fn linearizability_violations(ops: &[Op]) -> Vec<(Op, Op)> {
    let mut by_complete: Vec<Op> = ops.to_vec();
    by_complete.sort_by_key(|o| o.complete);
    // prefix_max[i]: the op with the highest last id among by_complete[..=i].
    let mut prefix_max: Vec<Op> = Vec::with_capacity(by_complete.len());
    for o in &by_complete {
        let best = match prefix_max.last() {
            Some(p) if p.last() >= o.last() => *p,
            _ => *o,
        };
        prefix_max.push(best);
    }
    let mut violations = Vec::new();
    for b in ops {
        let done_before = by_complete.partition_point(|a| a.complete < b.invoke);
        if done_before > 0 {
            let a = prefix_max[done_before - 1];
            if a.last() >= b.first {
                violations.push((a, *b));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn op(t0: Instant, invoke: u64, complete: u64, first: u64, count: u64) -> Op {
        Op {
            invoke: t0 + Duration::from_millis(invoke),
            complete: t0 + Duration::from_millis(complete),
            first,
            count,
        }
    }

    #[test]
    fn detects_overlap_gap_and_order_violation() {
        let t0 = Instant::now();
        let good = [
            op(t0, 0, 10, 1, 2),
            op(t0, 5, 20, 3, 1),
            op(t0, 11, 12, 4, 1),
        ];
        assert!(overlaps(&good).is_empty());
        assert!(gaps(&good).is_empty());
        assert!(linearizability_violations(&good).is_empty());

        let overlapping = [op(t0, 0, 1, 1, 3), op(t0, 0, 1, 3, 1)];
        assert_eq!(overlaps(&overlapping), vec![((1, 3), (3, 3))]);

        let gappy = [op(t0, 0, 1, 1, 1), op(t0, 0, 1, 5, 1)];
        assert_eq!(gaps(&gappy), vec![(2, 4)]);

        // The second op starts after the first completed, yet got a smaller id.
        let stale = [op(t0, 0, 10, 7, 1), op(t0, 20, 30, 3, 1)];
        assert_eq!(linearizability_violations(&stale).len(), 1);
        // Concurrent ops may complete in either order.
        let concurrent = [op(t0, 0, 30, 7, 1), op(t0, 5, 10, 3, 1)];
        assert!(linearizability_violations(&concurrent).is_empty());
    }
}
