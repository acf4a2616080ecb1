//! The checker over a whole chaos [`History`]: ids unique and in real-time order, one group
//! order that every subscriber saw, FIFO per sender, nothing acknowledged lost, nothing
//! invented or repeated; and how long each fault left the cluster without a successful id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::history::{linearizability_violations, overlaps, History, Op, Outcome, Seen};

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
    pub failed_codes: BTreeMap<String, usize>,
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
    let mut order: BTreeMap<u64, Seen> = BTreeMap::new();
    for seen in &h.subscribers {
        for w in seen.windows(2) {
            if w[1].group_seq != w[0].group_seq + 1 {
                r.gaps += 1;
                r.details.push(format!(
                    "a subscriber jumped from group_seq {} to {}",
                    w[0].group_seq, w[1].group_seq
                ));
            }
        }
        for &d in seen {
            if let Some(prev) = order.insert(d.group_seq, d) {
                if prev != d {
                    r.reordered += 1;
                    r.details.push(format!(
                        "group_seq {}: {prev:?} on one subscriber, {d:?} on another",
                        d.group_seq
                    ));
                }
            }
        }
    }
    let attempted: HashSet<(u64, u64)> = h.sends.iter().map(|s| (s.sender, s.sender_seq)).collect();
    let mut delivered: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last_seq: HashMap<u64, u64> = HashMap::new();
    for (&seq, d) in &order {
        let (sender, sender_seq) = (d.sender, d.sender_seq);
        if !d.message {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{IdOp, SendOp};

    fn id(t0: Instant, invoke: u64, complete: u64, first: u64) -> IdOp {
        IdOp {
            node: 1,
            invoke: t0 + Duration::from_millis(invoke),
            complete: t0 + Duration::from_millis(complete),
            outcome: Outcome::Ok,
            first,
            count: 1,
        }
    }

    fn sent(t0: Instant, sender_seq: u64, group_seq: u64) -> SendOp {
        SendOp {
            sender: 9,
            sender_seq,
            invoke: t0,
            complete: t0,
            outcome: Outcome::Ok,
            group_seq,
        }
    }

    fn seen(group_seq: u64, sender_seq: u64) -> Seen {
        Seen {
            group_seq,
            sender: 9,
            sender_seq,
            message: true,
        }
    }

    /// Two ids in order, two acknowledged messages both subscribers saw where acknowledged.
    fn clean(t0: Instant) -> History {
        History {
            ids: vec![id(t0, 0, 10, 1), id(t0, 20, 30, 2)],
            sends: vec![sent(t0, 1, 1), sent(t0, 2, 2)],
            subscribers: vec![vec![seen(1, 1), seen(2, 2)]; 2],
            faults: vec![t0],
            removed: 0,
        }
    }

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let t0 = Instant::now();
        let r = check(&clean(t0));
        assert!(r.is_safe(), "{:?}", r.details);
        assert_eq!((r.ops, r.ok, r.faults), (4, 4, 1));
        // The first id invoked after the fault completed 10 ms after it.
        assert_eq!(r.recovery_ms, vec![10]);
    }

    #[test]
    fn each_violation_is_counted_where_it_belongs() {
        let t0 = Instant::now();
        let mut dup = clean(t0);
        dup.ids.push(id(t0, 40, 50, 2));
        let r = check(&dup);
        // Handed out twice, and not above the id that completed before it began.
        assert_eq!((r.dup, r.nonlinear), (1, 1), "{:?}", r.details);

        let mut lost = clean(t0);
        lost.sends.push(sent(t0, 3, 3));
        assert_eq!(check(&lost).lost, 1);

        let mut gap = clean(t0);
        gap.subscribers[1] = vec![seen(1, 1), seen(3, 2)];
        let r = check(&gap);
        assert_eq!(r.gaps, 1, "{:?}", r.details);

        let mut reordered = clean(t0);
        reordered.subscribers[1] = vec![seen(1, 2), seen(2, 1)];
        assert!(check(&reordered).reordered > 0);

        let mut phantom = clean(t0);
        phantom.subscribers[0].push(seen(3, 7));
        assert_eq!(check(&phantom).phantom, 1);
    }
}
