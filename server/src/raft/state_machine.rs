//! openraft's view of our state machine: applies committed entries to [`State`], builds and
//! installs snapshots, and keeps the latest snapshot durable in its own file
//! (`store/snapshot_file.rs`).
//!
//! The applied state itself lives in memory. After a restart it is rebuilt from the persisted
//! snapshot, and openraft replays the log entries that follow it.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageError,
    StoredMembership,
};
use tokio::sync::{broadcast, watch};

use super::codec::{decode, encode};
use super::store::snapshot_file::{Meta, SnapshotFile, StoredSnapshot};
use super::store::StoreError;
use super::{LogId, Member, NodeId, TypeConfig};
use crate::state::{Command, Reply, State};

type StResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, Member>;

/// The state as of a log position.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: Membership,
    pub state: State,
}

struct Inner {
    file: SnapshotFile,
    applied: RwLock<Applied>,
    /// Names of groups whose streams grew; "" after a snapshot install (anything may have).
    grown: broadcast::Sender<Arc<str>>,
    /// The last applied index, published as soon as `applied` holds it. Waiting on this
    /// rather than on openraft's metrics wakes a waiter only when the index moves, and
    /// saves the metrics copy each wake-up costs there.
    applied_index: watch::Sender<Option<u64>>,
    snapshots_built: AtomicU64,
    node_id: AtomicU64,
    /// Ids handed out since the last info line.
    applied_summary: Mutex<crate::summary::Summary>,
}

/// The state machine store. Clones share the state.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

/// A read-only handle on the applied state, for local reads such as CurrentId.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<Inner>,
}

impl StateReader {
    /// Runs `f` on the applied state. Holds a lock only for the call: keep `f` short.
    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.inner.applied.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Wake-ups for subscribers: the name of each group whose stream grew, as it is applied.
    pub fn watch_groups(&self) -> broadcast::Receiver<Arc<str>> {
        self.inner.grown.subscribe()
    }

    /// Resolves once this node has applied log index `index`.
    pub async fn applied(&self, index: u64) {
        let mut rx = self.inner.applied_index.subscribe();
        // The sender lives in `inner`, which `self` holds: the wait cannot see it closed.
        let _ = rx.wait_for(|applied| *applied >= Some(index)).await;
    }
}

/// Wake-ups buffered per subscriber; one that falls further behind re-reads the state.
const WAKEUP_BUFFER: usize = 4096;

impl StateMachine {
    /// The state machine over `file`, starting from `stored`, the snapshot read from it.
    pub(super) fn open(
        file: SnapshotFile,
        stored: Option<StoredSnapshot>,
    ) -> Result<Self, StoreError> {
        let sm = Self {
            inner: Arc::new(Inner {
                file,
                applied: RwLock::default(),
                grown: broadcast::channel(WAKEUP_BUFFER).0,
                applied_index: watch::channel(None).0,
                snapshots_built: AtomicU64::new(0),
                node_id: AtomicU64::new(0),
                applied_summary: Mutex::default(),
            }),
        };
        if let Some(stored) = stored {
            let state: State =
                decode(&stored.data).map_err(StoreError::codec("decoding the stored snapshot"))?;
            sm.inner
                .applied_index
                .send_replace(stored.meta.last_log_id.map(|l| l.index));
            *sm.write_applied() = Applied {
                last_applied: stored.meta.last_log_id,
                membership: stored.meta.last_membership,
                state,
            };
        }
        Ok(sm)
    }

    /// Tags this node's log lines with its id.
    pub fn set_node_id(&self, id: NodeId) {
        self.inner.node_id.store(id, Ordering::Relaxed);
    }

    /// A read handle for the API layer.
    pub fn reader(&self) -> StateReader {
        StateReader {
            inner: self.inner.clone(),
        }
    }

    fn write_applied(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.inner
            .applied
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn load_snapshot(&self) -> StResult<Option<StoredSnapshot>> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.file.load())
            .await
            .map_err(StoreError::from)
            .and_then(|r| r)
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }

    /// Writes the snapshot durably, unless the stored one is at least as new: a build that
    /// started before an install from the primary must not overwrite the installed snapshot.
    /// Hands `stored` back once saved.
    async fn save_snapshot(&self, stored: StoredSnapshot) -> StResult<StoredSnapshot> {
        let sig = Some(stored.meta.signature());
        let last = stored.meta.last_log_id;
        let inner = self.inner.clone();
        let res = tokio::task::spawn_blocking(move || {
            inner
                .file
                .save(&stored.meta, &stored.data)
                .map(|wrote| (wrote, stored))
        })
        .await
        .map_err(StoreError::from)
        .and_then(|r| r);
        match res {
            Ok((true, stored)) => Ok(stored),
            Ok((false, stored)) => {
                tracing::debug!(?last, "a newer snapshot is already stored; kept it");
                Ok(stored)
            }
            Err(e) => Err(e.into_raft(ErrorSubject::Snapshot(sig), ErrorVerb::Write)),
        }
    }
}

impl StateMachine {
    /// At most one info line a second about the ids applied here.
    fn summarize(&self, node: NodeId, ids: u64, index: u64) {
        let due = self
            .inner
            .applied_summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(ids, index);
        if let Some(t) = due {
            tracing::info!(
                node,
                ids = t.items,
                entries = t.events,
                first_index = t.first_index,
                last_index = t.last_index,
                "applied {} ids in {} log entries",
                t.items,
                t.events
            );
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StResult<Snapshot<TypeConfig>> {
        // Copy under the lock, encode and write outside it, so applying is not held up. Both
        // take CPU in proportion to the state, so they run off the async workers (a node may
        // have only one).
        let read_state = |e: StoreError| e.into_raft(ErrorSubject::StateMachine, ErrorVerb::Read);
        let started = std::time::Instant::now();
        let inner = self.inner.clone();
        let (applied, data) = tokio::task::spawn_blocking(move || {
            let applied = inner
                .applied
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let data = encode(&applied.state);
            (applied, data)
        })
        .await
        .map_err(|e| read_state(e.into()))?;
        let data = data
            .map_err(StoreError::codec("encoding the state"))
            .map_err(read_state)?;
        let n = self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match applied.last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id.term, l.index),
            None => format!("none-{n}"),
        };
        let meta = Meta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
            snapshot_id,
        };
        let StoredSnapshot { meta, data } =
            self.save_snapshot(StoredSnapshot { meta, data }).await?;
        let metrics = crate::metrics::get();
        metrics.snapshots_built.inc();
        crate::metrics::observe(&metrics.snapshot_seconds, started.elapsed());
        tracing::info!(
            node = self.inner.node_id.load(Ordering::Relaxed),
            index = meta.last_log_id.map(|l| l.index),
            bytes = data.len(),
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StResult<(Option<LogId>, Membership)> {
        let a = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let node = self.inner.node_id.load(Ordering::Relaxed);
        let mut replies = Vec::new();
        let mut touched = Vec::new();
        let mut applied = self.write_applied();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Reply::None,
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Reply::None
                }
                EntryPayload::Normal(cmd) => {
                    let reply =
                        applied
                            .state
                            .apply(&cmd, entry.log_id.leader_id.term, &mut touched);
                    let ids = log_applied(node, entry.log_id.index, &cmd, &reply);
                    if ids > 0 {
                        self.summarize(node, ids, entry.log_id.index);
                    }
                    reply
                }
            };
            replies.push(reply);
        }
        let last = applied.last_applied.map(|l| l.index);
        drop(applied);
        self.inner.applied_index.send_replace(last);
        touched.dedup();
        for group in touched {
            // No receiver is fine: nobody subscribes to that group here.
            let _ = self.inner.grown.send(Arc::from(group));
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StResult<()> {
        let read_snapshot = |e: StoreError| {
            e.into_raft(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
            )
        };
        let data = snapshot.into_inner();
        let (state, data) = tokio::task::spawn_blocking(move || (decode::<State>(&data), data))
            .await
            .map_err(|e| read_snapshot(e.into()))?;
        let state = state
            .map_err(StoreError::codec("decoding the snapshot"))
            .map_err(read_snapshot)?;
        self.save_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        *self.write_applied() = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        self.inner
            .applied_index
            .send_replace(meta.last_log_id.map(|l| l.index));
        let _ = self.inner.grown.send(Arc::from(""));
        tracing::info!(
            node = self.inner.node_id.load(Ordering::Relaxed),
            index = meta.last_log_id.map(|l| l.index),
            "installed snapshot from primary"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot<TypeConfig>>> {
        let stored = self.load_snapshot().await?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// A debug line per range applied; returns how many ids the entry handed out.
fn log_applied(node: NodeId, index: u64, cmd: &Command, reply: &Reply) -> u64 {
    let (Command::Allocate { requests, .. }, Reply::Allocated(results)) = (cmd, reply) else {
        return 0;
    };
    let mut ids = 0;
    for (req, res) in requests.iter().zip(results) {
        match res {
            Ok(first) => {
                ids += req.count;
                tracing::debug!(
                node,
                index,
                sequence = %req.sequence,
                first = *first,
                last = *first + req.count - 1,
                "applied ids {}..{}",
                first,
                *first + req.count - 1
                )
            }
            Err(e) => {
                tracing::debug!(node, index, sequence = %req.sequence, error = %e, "refused allocation")
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::raft::store::{open_store, DataDir};

    fn stored(index: u64) -> StoredSnapshot {
        let last = LogId::new(CommittedLeaderId::new(1, 1), index);
        StoredSnapshot {
            meta: Meta {
                last_log_id: Some(last),
                last_membership: StoredMembership::new(Some(last), Membership::default()),
                snapshot_id: format!("s-{index}"),
            },
            data: encode(&State::default()).unwrap(),
        }
    }

    #[tokio::test]
    async fn a_wait_for_an_index_ends_when_that_index_is_applied() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::lock(dir.path()).unwrap();
        let (_, mut sm) = open_store(&data).unwrap();
        let reader = sm.reader();
        let blank = |index| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        };
        let mut wait = Box::pin(reader.applied(2));
        assert!((&mut wait).now_or_never().is_none(), "nothing applied yet");
        sm.apply(vec![blank(1)]).await.unwrap();
        assert!(
            (&mut wait).now_or_never().is_none(),
            "index 1 is not index 2"
        );
        sm.apply(vec![blank(2)]).await.unwrap();
        assert!(wait.now_or_never().is_some(), "index 2 is applied");
        assert!(
            reader.applied(1).now_or_never().is_some(),
            "an older index is done at once"
        );
        let snapshot = stored(5);
        let mut wait = Box::pin(reader.applied(5));
        assert!((&mut wait).now_or_never().is_none());
        sm.install_snapshot(&snapshot.meta, Box::new(Cursor::new(snapshot.data)))
            .await
            .unwrap();
        assert!(
            wait.now_or_never().is_some(),
            "a snapshot install moves the index too"
        );
    }

    #[tokio::test]
    async fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::lock(dir.path()).unwrap();
        let (_, sm) = open_store(&data).unwrap();
        sm.save_snapshot(stored(500)).await.unwrap();
        sm.save_snapshot(stored(100)).await.unwrap();
        let kept = sm.load_snapshot().await.unwrap().unwrap();
        assert_eq!(kept.meta.last_log_id.map(|l| l.index), Some(500));
        sm.save_snapshot(stored(600)).await.unwrap();
        let kept = sm.load_snapshot().await.unwrap().unwrap();
        assert_eq!(kept.meta.last_log_id.map(|l| l.index), Some(600));
    }
}
