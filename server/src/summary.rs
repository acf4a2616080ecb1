//! Info lines that tell the story without riding the hot path: counts are summed as work
//! happens and said at most once per interval. Per-item lines stay at debug.

use std::time::{Duration, Instant};

/// How often a busy node says what it did.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Running totals since the last line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Entries or batches.
    pub events: u64,
    /// Requests (or ids) they carried.
    pub items: u64,
    /// Lowest and highest log index among them.
    pub first_index: u64,
    pub last_index: u64,
}

/// Collects totals and hands them out when a line is due.
#[derive(Debug)]
pub struct Summary {
    since: Instant,
    totals: Totals,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            totals: Totals::default(),
        }
    }
}

impl Summary {
    /// Counts one event of `items` at `index`; returns the totals when a line is due.
    pub fn add(&mut self, items: u64, index: u64) -> Option<Totals> {
        let t = &mut self.totals;
        if t.events == 0 {
            t.first_index = index;
        }
        t.events += 1;
        t.items += items;
        t.first_index = t.first_index.min(index);
        t.last_index = t.last_index.max(index);
        if self.since.elapsed() < INTERVAL {
            return None;
        }
        self.since = Instant::now();
        Some(std::mem::take(&mut self.totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_said_and_the_next_ones_wait_for_the_interval() {
        let mut s = Summary {
            since: Instant::now() - INTERVAL,
            totals: Totals::default(),
        };
        let first = s.add(3, 10).expect("a line is due");
        assert_eq!(
            (
                first.events,
                first.items,
                first.first_index,
                first.last_index
            ),
            (1, 3, 10, 10)
        );
        assert_eq!(s.add(2, 12), None);
        assert_eq!(s.add(5, 11), None);
        s.since -= INTERVAL;
        let next = s.add(1, 13).expect("due again");
        assert_eq!(
            (next.events, next.items, next.first_index, next.last_index),
            (3, 8, 11, 13)
        );
    }
}
