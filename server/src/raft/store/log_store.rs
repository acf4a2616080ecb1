//! The Raft log and vote on redb.
//!
//! An append is durable once its record in the journal (`journal.rs`) is synced; it is then
//! committed to redb without a sync, readable at once, and made durable by the next durable
//! commit. Every other write (vote, truncate, purge) commits with `Durability::Immediate`
//! (fsync) before it is reported done, which makes every earlier commit durable too, and the
//! journal starts over with it. openraft counts an append as persisted, and a vote as cast,
//! only then. At start the journal's appends are committed again, durably.
//!
//! redb and the journal block, so they run on the blocking pool. The newest entries also stay
//! in memory after their append (`cache.rs`), since replication and apply read each one back
//! at once.
//!
//! The log is never purged past the stored snapshot (in its own file, next to the log's).
//! openraft 0.9 issues the purge that follows a snapshot install without waiting for the state
//! machine to finish installing it; a crash in between left a purged log and no snapshot, and
//! openraft then refuses to start. So a purge waits for the stored snapshot to cover it, and
//! fails when the save of that snapshot failed.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::cache::Recent;
use super::journal::{Journal, Rows, JOURNAL_FILE};
use super::snapshot_file::Saved;
use super::StoreError;
use crate::raft::codec::{decode, encode};
use crate::raft::{LogId, NodeId, TypeConfig};

/// The log and the vote. Every append commits here, and redb lets one write transaction run at
/// a time.
pub(crate) const LOG_FILE: &str = "raft.redb";

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged";
/// The journal generation whose records are not yet durable in redb.
const JOURNAL_GENERATION: &str = "journal_generation";
/// How long a purge waits for the state machine to store the snapshot that covers it.
const PURGE_WAIT_LIMIT: Duration = Duration::from_secs(60);

/// The log store. Clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// What the snapshot file holds, for the purge guard.
    snapshot: watch::Receiver<Saved>,
    /// Last committed index + 1 (0: none), as openraft last told us; for Cluster.Status.
    committed: Arc<AtomicU64>,
    /// Off only for openraft's storage suite, which purges with no snapshot at all.
    purge_waits_for_snapshot: bool,
    recent: Arc<Mutex<Recent>>,
    /// Held by every write, on the blocking pool, so appends and durable commits take turns.
    journal: Arc<Mutex<Journal>>,
}

type StResult<T> = Result<T, StorageError<NodeId>>;

impl LogStore {
    /// Opens the log of the data dir `dir` and commits what its journal holds durably, so the
    /// journal starts empty. Blocks.
    pub(super) fn open(
        db: Arc<Database>,
        dir: &Path,
        snapshot: watch::Receiver<Saved>,
    ) -> Result<Self, StoreError> {
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        let generation: Option<u64> = meta_in(&db, JOURNAL_GENERATION)?;
        let purged: Option<LogId> = meta_in(&db, LAST_PURGED)?;
        let purged = purged.map(|l| l.index);
        let (mut journal, records) =
            Journal::open(dir, generation.unwrap_or(0), generation.is_some())?;
        let rows: Rows = records.into_iter().flatten().collect();
        let last = last_index(&db)?.or(purged);
        let stored = |index| stored_row(&db, index).map_err(|e| e.to_string());
        check_follows(&rows, last, purged, stored).map_err(|why| StoreError::Damaged {
            path: dir.join(JOURNAL_FILE),
            why,
        })?;
        checkpoint(&db, &mut journal, |txn| insert_rows(txn, &rows))?;
        if let (Some((first, _)), Some((last, _))) = (rows.first(), rows.last()) {
            tracing::info!(first, last, "committed the journal's log entries to redb");
        }
        Ok(Self {
            db,
            snapshot,
            committed: Arc::new(AtomicU64::new(0)),
            purge_waits_for_snapshot: true,
            recent: Arc::default(),
            journal: Arc::new(Mutex::new(journal)),
        })
    }

    #[cfg(test)]
    pub(super) fn without_purge_guard(mut self) -> Self {
        self.purge_waits_for_snapshot = false;
        self
    }

    /// Waits until the stored snapshot covers `upto`, so a crash never leaves a purged log
    /// without the snapshot that replaces it.
    async fn wait_for_snapshot_covering(&self, upto: LogId) -> Result<(), StoreError> {
        let at_or_past = |l: Option<LogId>| l.map(|l| l.index) >= Some(upto.index);
        let mut saved = self.snapshot.clone();
        // Done once a snapshot covering the purge is stored, or its save failed (the node is
        // about to stop on that error).
        let done = saved.wait_for(|s| at_or_past(s.covers) || at_or_past(s.failed));
        tokio::pin!(done);
        let warn_after = Duration::from_secs(1);
        // Copied out of the watch's guard, which must not live across the next wait.
        let first = tokio::time::timeout(warn_after, &mut done)
            .await
            .map(|res| res.map(|s| *s));
        let res = match first {
            Ok(res) => Ok(res),
            Err(_) => {
                tracing::warn!(
                    upto = upto.index,
                    "purge waiting for the snapshot to be stored"
                );
                tokio::time::timeout(PURGE_WAIT_LIMIT - warn_after, done)
                    .await
                    .map(|res| res.map(|s| *s))
            }
        };
        let why = match res {
            Ok(Ok(s)) if at_or_past(s.covers) => return Ok(()),
            Ok(Ok(_)) => "the snapshot covering it failed to save".to_string(),
            Ok(Err(_)) => "the snapshot store closed while the purge waited".to_string(),
            Err(_) => format!(
                "no snapshot covering it was stored within {} s",
                PURGE_WAIT_LIMIT.as_secs()
            ),
        };
        Err(StoreError::PurgeRefused {
            upto: upto.index,
            why,
        })
    }

    /// The last purged log id, as stored.
    pub(super) fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        self.read_meta(LAST_PURGED)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits every journaled append to redb durably, so the journal is empty: for a
    /// graceful stop, after which a start replays nothing.
    pub async fn flush_journal(&self) -> Result<(), StoreError> {
        self.write(|_| Ok(())).await
    }

    /// A handle that reads the commit index this store last saw.
    pub fn commit_index(&self) -> CommitIndex {
        CommitIndex(self.committed.clone())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        meta_in(&self.db, key)
    }

    /// Commits what `f` writes durably, on the blocking pool.
    async fn write<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    {
        let (db, journal) = (self.db.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || checkpoint(&db, &mut lock(&journal), f)).await?
    }

    /// Writes `entries` durably, then keeps them in memory.
    async fn append_durably(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let bytes = encode(&entry).map_err(StoreError::codec("encoding a log entry"))?;
            appended.push((entry, bytes.len()));
            rows.push((index, bytes));
        }
        let (db, journal) = (self.db.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let mut journal = lock(&journal);
            if !journal.append(&rows)? {
                return checkpoint(&db, &mut journal, |txn| insert_rows(txn, &rows));
            }
            // Durable already; redb makes the rows readable, and durable at its next sync.
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::None)?;
            insert_rows(&txn, &rows)?;
            txn.commit()?;
            Ok(())
        })
        .await??;
        let mut recent = self.recent();
        for (entry, size) in appended {
            recent.push(entry, size);
        }
        Ok(())
    }
}

fn lock(journal: &Mutex<Journal>) -> std::sync::MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits what `f` writes with `Durability::Immediate`. That makes every earlier commit
/// durable too, so in the same transaction the journal moves to a new generation. Blocks.
fn checkpoint<F>(db: &Database, journal: &mut Journal, f: F) -> Result<(), StoreError>
where
    F: FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
{
    let next = journal.generation() + 1;
    let txn = db.begin_write()?;
    f(&txn)?;
    let bytes = encode(&next).map_err(StoreError::codec("encoding the journal generation"))?;
    txn.open_table(META)?
        .insert(JOURNAL_GENERATION, bytes.as_slice())?;
    let commit = std::time::Instant::now();
    txn.commit()?;
    crate::metrics::observe(&crate::metrics::get().redb_commit_seconds, commit.elapsed());
    journal.restart(next);
    Ok(())
}

fn insert_rows(txn: &redb::WriteTransaction, rows: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
    let mut table = txn.open_table(LOGS)?;
    for (index, bytes) in rows {
        table.insert(*index, bytes.as_slice())?;
    }
    Ok(())
}

fn meta_in<T: serde::de::DeserializeOwned>(
    db: &Database,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    match table.get(key)? {
        Some(v) => Ok(Some(
            decode(v.value()).map_err(StoreError::codec("decoding a value of the meta table"))?,
        )),
        None => Ok(None),
    }
}

/// The index of the last entry in the log table.
fn last_index(db: &Database) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let last = table.last()?.map(|(k, _)| k.value());
    Ok(last)
}

/// The encoded entry at `index` in the log table.
fn stored_row(db: &Database, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let row = table.get(index)?.map(|v| v.value().to_vec());
    Ok(row)
}

/// The entries of the log table in `range`.
fn read_range(
    db: &Database,
    range: (Bound<u64>, Bound<u64>),
) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let mut entries = Vec::new();
    for item in table.range::<u64>(range)? {
        let (_, v) = item?;
        entries.push(decode(v.value()).map_err(StoreError::codec("decoding a log entry"))?);
    }
    Ok(entries)
}

/// The log id of the last entry in the log table.
fn last_log_id(db: &Database) -> Result<Option<LogId>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let last = match table.last()? {
        Some((_, v)) => Some(
            decode::<Entry<TypeConfig>>(v.value())
                .map_err(StoreError::codec("decoding a log entry"))?
                .log_id,
        ),
        None => None,
    };
    Ok(last)
}

/// Checks that journaled rows continue a log ending at `last` with no hole, past the purge,
/// and that a row redb already holds durably is the same: within one generation an append
/// only repeats an entry that a clean close made durable. Another version of the server, run
/// on this data dir after a crash, could have replaced the log's tail under the journal.
fn check_follows(
    rows: &[(u64, Vec<u8>)],
    last: Option<u64>,
    purged: Option<u64>,
    stored: impl Fn(u64) -> Result<Option<Vec<u8>>, String>,
) -> Result<(), String> {
    let durable = last;
    let mut last = last.unwrap_or(0);
    for (index, bytes) in rows {
        let index = *index;
        if index > last + 1 || Some(index) <= purged {
            return Err(format!(
                "holds log index {index}, which does not continue the log in {LOG_FILE} (last \
                 index {last}, purged up to {})",
                purged.unwrap_or(0)
            ));
        }
        if Some(index) <= durable && stored(index)?.as_ref() != Some(bytes) {
            return Err(format!(
                "holds log index {index}, which {LOG_FILE} holds with other contents (was the \
                 data dir used by another version after a crash?)"
            ));
        }
        last = last.max(index);
    }
    Ok(())
}

/// The commit index as last reported by openraft (not persisted; for status only).
#[derive(Clone)]
pub struct CommitIndex(Arc<AtomicU64>);

impl CommitIndex {
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n - 1),
        }
    }
}

fn read_logs(e: StoreError) -> StorageError<NodeId> {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Read)
}

fn write_logs(e: StoreError) -> StorageError<NodeId> {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Write)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&n) => Bound::Included(n),
            Bound::Excluded(&n) => Bound::Excluded(n),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&n) => Bound::Included(n),
            Bound::Excluded(&n) => Bound::Excluded(n),
            Bound::Unbounded => Bound::Unbounded,
        };
        let first = match start {
            Bound::Included(n) => Some(n),
            Bound::Excluded(n) => n.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let last = match end {
            Bound::Included(n) => Some(n),
            Bound::Excluded(n) => n.checked_sub(1),
            Bound::Unbounded => None,
        };
        if let (Some(first), Some(last)) = (first, last) {
            if let Some(entries) = self.recent().get(first, last) {
                return Ok(entries);
            }
        }
        read_range(&self.db, (start, end)).map_err(read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED).map_err(read_logs)?;
        let last = last_log_id(&self.db).map_err(read_logs)?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StResult<()> {
        let write_vote = |e: StoreError| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write);
        let bytes = encode(vote)
            .map_err(StoreError::codec("encoding the vote"))
            .map_err(write_vote)?;
        self.write(move |txn| {
            txn.open_table(META)?.insert(VOTE, bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(write_vote)
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE)
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StResult<()> {
        let v = committed.map(|c| c.index + 1).unwrap_or(0);
        self.committed.store(v, Ordering::Relaxed);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Only once the transaction is fsynced is the append durable.
        match self.append_durably(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> StResult<()> {
        tracing::debug!(from = log_id.index, "truncating log");
        // Forget them first: a failed truncate must not leave them readable from memory.
        self.recent().truncate(log_id.index);
        self.write(move |txn| {
            let mut table = txn.open_table(LOGS)?;
            table.retain_in::<u64, _>(log_id.index.., |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> StResult<()> {
        if self.purge_waits_for_snapshot {
            self.wait_for_snapshot_covering(log_id)
                .await
                .map_err(write_logs)?;
        }
        tracing::debug!(upto = log_id.index, "purging log");
        self.recent().purge(log_id.index);
        let bytes = encode(&log_id)
            .map_err(StoreError::codec("encoding the purged log id"))
            .map_err(write_logs)?;
        self.write(move |txn| {
            txn.open_table(META)?
                .insert(LAST_PURGED, bytes.as_slice())?;
            let mut table = txn.open_table(LOGS)?;
            table.retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_logs)
    }
}

#[cfg(test)]
#[path = "log_store_tests.rs"]
mod tests;
