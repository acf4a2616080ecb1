//! The gauges that say how the node is now, read from its handles at each scrape rather than
//! kept up to date on every change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::raft::state_machine::StateReader;
use crate::raft::store::CommitIndex;
use crate::raft::{NodeId, Raft};

/// A number read at scrape time (a queue's depth, open subscriptions).
pub type Reading = Arc<dyn Fn() -> usize + Send + Sync>;

/// Where the scrape-time gauges come from.
#[derive(Clone)]
pub struct Sources {
    pub id: NodeId,
    pub raft: Raft,
    pub commit: CommitIndex,
    pub reader: StateReader,
    pub dir: PathBuf,
    /// Depth of each queue toward the primary, by kind.
    pub queues: Vec<(&'static str, Reading)>,
    pub queue_capacity: usize,
    pub subscribers: Reading,
}

impl Sources {
    /// Brings every scrape-time gauge up to date.
    pub async fn refresh(&self) {
        let g = super::get();
        {
            let m = self.raft.metrics();
            let m = m.borrow();
            let running = m.running_state.is_ok();
            let leader = m.current_leader.filter(|_| running);
            g.term.set(to_i64(m.current_term));
            g.is_primary.set(i64::from(leader == Some(self.id)));
            g.has_primary.set(i64::from(leader.is_some()));
            g.applied_index
                .set(to_i64(m.last_applied.map_or(0, |l| l.index)));
            let last = m.last_log_index.unwrap_or(0);
            g.last_log_index.set(to_i64(last));
            // Only the primary knows; members that left drop out of the family.
            let mut now = std::collections::BTreeSet::new();
            for (member, matched) in m.replication.iter().flatten() {
                if *member == self.id {
                    continue;
                }
                let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                let label = member.to_string();
                g.replication_lag
                    .with_label_values(&[label.as_str()])
                    .set(to_i64(lag));
                now.insert(label);
            }
            let mut lagging = g.lagging.lock().unwrap_or_else(|p| p.into_inner());
            for gone in lagging.difference(&now) {
                let _ = g.replication_lag.remove_label_values(&[gone.as_str()]);
            }
            *lagging = now;
        }
        g.commit_index.set(to_i64(self.commit.get().unwrap_or(0)));
        for (kind, depth) in &self.queues {
            g.queue_depth
                .with_label_values(&[kind])
                .set(to_i64(depth()));
        }
        g.queue_capacity.set(to_i64(self.queue_capacity));
        g.subscribers.set(to_i64((self.subscribers)()));
        let (sequences, (clients, groups), retained) = self.reader.read(|a| {
            let s = &a.state;
            (
                s.sequences.len(),
                s.groups.counts(),
                s.groups.retained_bytes(),
            )
        });
        g.sequences.set(to_i64(sequences));
        g.groups.set(to_i64(groups));
        g.clients.set(to_i64(clients));
        g.retained_bytes.set(to_i64(retained));
        // A walk of a few files, but off the async workers all the same.
        let dir = self.dir.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || dir_bytes(&dir)).await {
            g.data_dir_bytes.set(to_i64(bytes));
        }
    }
}

fn to_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Bytes of the regular files under `dir`; what cannot be read counts nothing.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
