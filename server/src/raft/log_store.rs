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
//! in memory after their append, since replication and apply read each one back at once.
//!
//! The log is never purged past the stored snapshot (in its own file, next to the log's).
//! openraft 0.9 issues the purge that follows a snapshot install without waiting for the state
//! machine to finish installing it; a crash in between left a purged log and no snapshot, and
//! openraft then refuses to start. So a purge waits for the stored snapshot to cover it, and
//! fails when the save of that snapshot failed.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::codec::{decode, encode};
use super::journal::{Journal, Rows};
use super::snapshot_file::{ReadError, Saved};
use super::{LogId, NodeId, TypeConfig, LOG_FILE};
use crate::error::Error;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged";
/// The journal generation whose records are not yet durable in redb.
const JOURNAL_GENERATION: &str = "journal_generation";
/// How long a purge waits for the state machine to store the snapshot that covers it.
const PURGE_WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Most entries, and most encoded bytes, kept in memory after their append.
const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 8 * 1024 * 1024;

/// The newest entries, as last appended: every entry is read back right after its append, to
/// replicate and to apply, and this spares each read a redb transaction and a decode.
/// Contiguous, and when not empty it ends at the last entry of the log.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        if let Some((last, _)) = self.entries.back() {
            if last.log_id.index + 1 != entry.log_id.index {
                self.clear();
            }
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops every entry from `index` on.
    fn truncate(&mut self, index: u64) {
        while matches!(self.entries.back(), Some((e, _)) if e.log_id.index >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops every entry up to `index`.
    fn purge(&mut self, index: u64) {
        while matches!(self.entries.front(), Some((e, _)) if e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// The entries `first..=last`, if all of them are here.
    fn get(&self, first: u64, last: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let (front, _) = self.entries.front()?;
        let (back, _) = self.entries.back()?;
        if first > last || first < front.log_id.index || last > back.log_id.index {
            return None;
        }
        let skip = (first - front.log_id.index) as usize;
        let take = (last - first + 1) as usize;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

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
    ) -> Result<Self, ReadError> {
        let redb_err = |e: redb::Error| ReadError::Io {
            path: dir.join(LOG_FILE).display().to_string(),
            source: std::io::Error::other(e),
        };
        let txn = db.begin_write().map_err(|e| redb_err(e.into()))?;
        txn.open_table(LOGS).map_err(|e| redb_err(e.into()))?;
        txn.open_table(META).map_err(|e| redb_err(e.into()))?;
        txn.commit().map_err(|e| redb_err(e.into()))?;
        let meta_err = |e| redb_err(redb::Error::Io(e));
        let generation: Option<u64> = meta_in(&db, JOURNAL_GENERATION).map_err(meta_err)?;
        let purged: Option<LogId> = meta_in(&db, LAST_PURGED).map_err(meta_err)?;
        let purged = purged.map(|l| l.index);
        let (mut journal, records) =
            Journal::open(dir, generation.unwrap_or(0), generation.is_some())?;
        let rows: Rows = records.into_iter().flatten().collect();
        let last = last_index(&db).map_err(redb_err)?.or(purged);
        let stored = |index| stored_row(&db, index).map_err(|e| e.to_string());
        check_follows(&rows, last, purged, stored).map_err(ReadError::Damaged)?;
        checkpoint(&db, &mut journal, |txn| insert_rows(txn, &rows)).map_err(redb_err)?;
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
    async fn wait_for_snapshot_covering(&self, upto: LogId) -> StResult<()> {
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
        Err(write_err(std::io::Error::other(format!(
            "refusing to purge the log up to index {}: {why}",
            upto.index
        ))))
    }

    /// The last purged log id, as stored.
    pub(super) fn last_purged(&self) -> Result<Option<LogId>, Error> {
        self.read_meta(LAST_PURGED)
            .map_err(|e| Error::Internal(format!("log store: {e}")))
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits every journaled append to redb durably, so the journal is empty: for a
    /// graceful stop, after which a start replays nothing.
    pub async fn flush_journal(&self) -> Result<(), Error> {
        self.write(|_| Ok(()))
            .await
            .map_err(|e| Error::Internal(format!("log store: {e}")))
    }

    /// A handle that reads the commit index this store last saw.
    pub fn commit_index(&self) -> CommitIndex {
        CommitIndex(self.committed.clone())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StResult<Option<T>> {
        meta_in(&self.db, key).map_err(read_err)
    }

    /// Commits what `f` writes durably, on the blocking pool.
    async fn write<F>(&self, f: F) -> Result<(), redb::Error>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    {
        let (db, journal) = (self.db.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || checkpoint(&db, &mut lock(&journal), f))
            .await
            .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?
    }

    /// Writes `entries` durably, then keeps them in memory.
    async fn append_durably(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<(), redb::Error> {
        let mut rows = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let bytes = encode(&entry).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
            appended.push((entry, bytes.len()));
            rows.push((index, bytes));
        }
        let (db, journal) = (self.db.clone(), self.journal.clone());
        tokio::task::spawn_blocking(move || {
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
        .await
        .map_err(|e| redb::Error::Io(std::io::Error::other(e)))??;
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
fn checkpoint<F>(db: &Database, journal: &mut Journal, f: F) -> Result<(), redb::Error>
where
    F: FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
{
    let next = journal.generation() + 1;
    let txn = db.begin_write()?;
    f(&txn)?;
    let bytes = encode(&next).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
    txn.open_table(META)?
        .insert(JOURNAL_GENERATION, bytes.as_slice())?;
    txn.commit()?;
    journal.restart(next);
    Ok(())
}

fn insert_rows(txn: &redb::WriteTransaction, rows: &[(u64, Vec<u8>)]) -> Result<(), redb::Error> {
    let mut table = txn.open_table(LOGS)?;
    for (index, bytes) in rows {
        table.insert(*index, bytes.as_slice())?;
    }
    Ok(())
}

fn meta_in<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> std::io::Result<Option<T>> {
    fn io(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
        std::io::Error::other(e)
    }
    let txn = db.begin_read().map_err(io)?;
    let table = txn.open_table(META).map_err(io)?;
    match table.get(key).map_err(io)? {
        Some(v) => Ok(Some(decode(v.value()).map_err(io)?)),
        None => Ok(None),
    }
}

/// The index of the last entry in the log table.
fn last_index(db: &Database) -> Result<Option<u64>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let last = table.last()?.map(|(k, _)| k.value());
    Ok(last)
}

/// The encoded entry at `index` in the log table.
fn stored_row(db: &Database, index: u64) -> Result<Option<Vec<u8>>, redb::Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOGS)?;
    let row = table.get(index)?.map(|v| v.value().to_vec());
    Ok(row)
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

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
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
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let mut entries = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            entries.push(decode(v.value()).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, v)) => Some(
                decode::<Entry<TypeConfig>>(v.value())
                    .map_err(read_err)?
                    .log_id,
            ),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StResult<()> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.write(move |txn| {
            txn.open_table(META)?.insert(VOTE, bytes.as_slice())?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE)
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
                Err(write_err(e))
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
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> StResult<()> {
        if self.purge_waits_for_snapshot {
            self.wait_for_snapshot_covering(log_id).await?;
        }
        tracing::debug!(upto = log_id.index, "purging log");
        self.recent().purge(log_id.index);
        let bytes = encode(&log_id).map_err(write_err)?;
        self.write(move |txn| {
            txn.open_table(META)?
                .insert(LAST_PURGED, bytes.as_slice())?;
            let mut table = txn.open_table(LOGS)?;
            table.retain_in::<u64, _>(..=log_id.index, |_, _| false)?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, SnapshotMeta, StoredMembership};

    use super::*;
    use crate::state::State;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// Writes `entries` straight into the log table, as appends would have left them.
    async fn put_entries(log: &LogStore, entries: Vec<Entry<TypeConfig>>) {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.log_id.index, encode(e).unwrap()))
            .collect();
        log.write(move |txn| {
            let mut t = txn.open_table(LOGS)?;
            for (i, bytes) in &rows {
                t.insert(*i, bytes.as_slice())?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }

    /// Installs an empty-state snapshot covering the log up to `index`, as the primary would.
    async fn install_snapshot_upto(sm: &mut super::super::state_machine::StateMachine, index: u64) {
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s-{index}"),
        };
        let bytes = encode(&State::default()).unwrap();
        sm.install_snapshot(&meta, Box::new(Cursor::new(bytes)))
            .await
            .unwrap();
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(LOGS).unwrap();
        table
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect()
    }

    /// The store's files as a kill -9 now would leave them, in a dir of their own.
    fn crash_copy(dir: &std::path::Path) -> tempfile::TempDir {
        use crate::raft::{JOURNAL_FILE, LOG_FILE, STORE_MARKER};
        let copy = tempfile::tempdir().unwrap();
        for name in [LOG_FILE, JOURNAL_FILE, STORE_MARKER] {
            std::fs::copy(dir.join(name), copy.path().join(name)).unwrap();
        }
        copy
    }

    /// The log indexes redb alone holds in `dir`, looked at in a copy: opening a file after a
    /// crash repairs it, and the store must see it unrepaired.
    fn redb_alone(dir: &std::path::Path) -> Vec<u64> {
        let probe = crash_copy(dir);
        let db = Database::create(probe.path().join(crate::raft::LOG_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(LOGS).unwrap();
        let keys = table
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        keys
    }

    /// Everything a node reads from its store at start, as comparable text.
    async fn contents(dir: &std::path::Path) -> Result<String, Error> {
        let data = crate::datadir::DataDir::lock(dir)?;
        let (mut log, mut sm) = crate::raft::open_store(&data)?;
        let vote = log
            .read_vote()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let state = log
            .get_log_state()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let entries = log
            .try_get_log_entries(..)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let snapshot = sm
            .get_current_snapshot()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map(|s| (s.meta, s.snapshot.into_inner()));
        Ok(format!(
            "{}|{}|{}|{}|{}",
            encode(&vote).unwrap_or_default().len(),
            String::from_utf8_lossy(&encode(&vote).unwrap_or_default()),
            String::from_utf8_lossy(
                &encode(&(state.last_purged_log_id, state.last_log_id)).unwrap_or_default()
            ),
            String::from_utf8_lossy(&encode(&entries).unwrap_or_default()),
            String::from_utf8_lossy(&encode(&snapshot).unwrap_or_default()),
        ))
    }

    #[tokio::test]
    async fn a_crash_keeps_the_journaled_appends_and_nothing_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (mut log, _sm) = crate::raft::open_store(&data).unwrap();
        let entry = |term, index| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        };
        log.append_durably((1..=5).map(|i| entry(1, i)))
            .await
            .unwrap();
        // A durable commit: the journal starts a new generation, so 3..=5 never come back.
        log.truncate(entry(1, 3).log_id).await.unwrap();
        log.append_durably([entry(2, 3)]).await.unwrap();
        log.append_durably([entry(2, 4)]).await.unwrap();

        // kill -9 now. redb alone rolls back to its last durable commit; the journal has the
        // rest.
        assert_eq!(redb_alone(dir.path()), vec![1, 2]);
        let crashed = crash_copy(dir.path());
        let data = crate::datadir::DataDir::lock(crashed.path()).unwrap();
        let (mut log, _sm) = crate::raft::open_store(&data).unwrap();
        let read = log.try_get_log_entries(1..=10).await.unwrap();
        let ids: Vec<LogId> = read.iter().map(|e| e.log_id).collect();
        let expected: Vec<LogId> = [entry(1, 1), entry(1, 2), entry(2, 3), entry(2, 4)]
            .iter()
            .map(|e| e.log_id)
            .collect();
        assert_eq!(ids, expected);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(entry(2, 4).log_id));
    }

    #[tokio::test]
    async fn after_a_flush_redb_alone_holds_every_append() {
        use crate::raft::JOURNAL_FILE;
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (log, _sm) = crate::raft::open_store(&data).unwrap();
        log.append_durably(blanks(1..=3)).await.unwrap();
        log.flush_journal().await.unwrap();
        // As a kill -9 would leave them, and without the journal's help.
        assert_eq!(redb_alone(dir.path()), vec![1, 2, 3]);
        // And the journal has nothing left to replay.
        let generation: u64 = log.read_meta(JOURNAL_GENERATION).unwrap().unwrap();
        let (_, records) =
            super::super::journal::Journal::open(dir.path(), generation, true).unwrap();
        assert!(records.is_empty());
        assert!(dir.path().join(JOURNAL_FILE).exists());
    }

    #[tokio::test]
    async fn an_append_too_big_for_the_journal_commits_redb_durably() {
        use crate::state::{AllocRequest, Command};
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (log, _sm) = crate::raft::open_store(&data).unwrap();
        log.append_durably(blanks(1..=2)).await.unwrap();
        let big = (3..=11).map(|i| Entry::<TypeConfig> {
            log_id: log_id(i),
            payload: EntryPayload::Normal(Command::Allocate {
                requests: vec![AllocRequest {
                    sequence: "s".repeat(1 << 20),
                    count: 1,
                }],
                max_sequences: 1,
            }),
        });
        log.append_durably(big).await.unwrap();
        log.append_durably(blanks(12..=12)).await.unwrap();
        // Up to the big append, durable in redb; the one after it, in the journal only.
        assert_eq!(redb_alone(dir.path()), (1..=11).collect::<Vec<_>>());
        let crashed = crash_copy(dir.path());
        let data = crate::datadir::DataDir::lock(crashed.path()).unwrap();
        let (mut log, _sm) = crate::raft::open_store(&data).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(12)));
    }

    #[test]
    fn journaled_rows_must_continue_the_log() {
        let rows = |indexes: &[u64]| {
            indexes
                .iter()
                .map(|&i| (i, format!("entry {i}").into_bytes()))
                .collect::<Vec<_>>()
        };
        // redb holds entries 1..=5 as the journal wrote them, and 6 otherwise.
        let stored = |index: u64| {
            Ok(match index {
                1..=5 => Some(format!("entry {index}").into_bytes()),
                6 => Some(b"another entry 6".to_vec()),
                _ => None,
            })
        };
        assert!(check_follows(&rows(&[2, 3]), Some(1), None, stored).is_ok());
        assert!(check_follows(&rows(&[1]), None, None, stored).is_ok());
        assert!(check_follows(&rows(&[7, 8]), Some(6), Some(6), stored).is_ok());
        // A clean close made the journaled tail durable in redb too.
        assert!(check_follows(&rows(&[4, 5, 6]), Some(5), None, stored).is_ok());
        for (rows, last, purged, why) in [
            (rows(&[3]), Some(1), None, "does not continue the log"),
            (rows(&[2, 4]), Some(1), None, "does not continue the log"),
            (rows(&[2]), None, None, "does not continue the log"),
            (rows(&[6]), Some(6), Some(6), "does not continue the log"),
            (rows(&[6, 7]), Some(6), None, "with other contents"),
        ] {
            let err = check_follows(&rows, last, purged, stored).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[tokio::test]
    async fn a_log_rewritten_under_the_journal_is_refused() {
        use crate::raft::LOG_FILE;
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (log, _sm) = crate::raft::open_store(&data).unwrap();
        log.append_durably(blanks(1..=3)).await.unwrap();
        let crashed = crash_copy(dir.path());
        // An earlier version, which knows no journal, ran after the crash and took other
        // entries 1..=3 from a new primary.
        {
            let db = redb::Database::create(crashed.path().join(LOG_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(LOGS).unwrap();
                for i in 1..=3u64 {
                    let entry = Entry::<TypeConfig> {
                        log_id: LogId::new(CommittedLeaderId::new(9, 2), i),
                        payload: EntryPayload::Blank,
                    };
                    table.insert(i, encode(&entry).unwrap().as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        match contents(crashed.path()).await {
            Err(Error::Corrupt(msg)) => {
                assert!(
                    msg.contains("raft.journal") && msg.contains("other contents"),
                    "{msg}"
                )
            }
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_lost_journal_is_refused_and_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
            let (log, _sm) = crate::raft::open_store(&data).unwrap();
            log.append_durably(blanks(1..=3)).await.unwrap();
        }
        std::fs::remove_file(dir.path().join(crate::raft::JOURNAL_FILE)).unwrap();
        for attempt in ["first", "second"] {
            match contents(dir.path()).await {
                Err(Error::Corrupt(msg)) => {
                    assert!(msg.contains("raft.journal"), "{attempt}: {msg}")
                }
                other => panic!("{attempt} start after the loss: {:?}", other.map(|_| ())),
            }
        }
    }

    #[tokio::test]
    async fn reads_give_the_entries_last_written_whether_from_memory_or_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (mut log, mut sm) = crate::raft::open_store(&data).unwrap();
        let entry = |term, index| Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        };
        let read = |log: &mut LogStore, range: std::ops::RangeInclusive<u64>| {
            let mut log = log.clone();
            async move {
                let entries = log.try_get_log_entries(range).await.unwrap();
                entries.iter().map(|e| e.log_id).collect::<Vec<_>>()
            }
        };
        let ids = |term, range: std::ops::RangeInclusive<u64>| {
            range
                .map(|i| LogId::new(CommittedLeaderId::new(term, 1), i))
                .collect::<Vec<_>>()
        };

        log.append_durably((1..=5).map(|i| entry(1, i)))
            .await
            .unwrap();
        assert_eq!(read(&mut log, 1..=5).await, ids(1, 1..=5));
        assert_eq!(read(&mut log, 3..=4).await, ids(1, 3..=4));

        // A follower's conflicting tail goes, from memory too.
        log.truncate(entry(1, 4).log_id).await.unwrap();
        assert_eq!(read(&mut log, 1..=5).await, ids(1, 1..=3));
        log.append_durably((4..=6).map(|i| entry(2, i)))
            .await
            .unwrap();
        let mut expected = ids(1, 1..=3);
        expected.extend(ids(2, 4..=6));
        assert_eq!(read(&mut log, 1..=6).await, expected);
        assert_eq!(read(&mut log, 4..=6).await, ids(2, 4..=6));

        // Purged entries are gone, from memory too.
        install_snapshot_upto(&mut sm, 2).await;
        log.purge(entry(1, 2).log_id).await.unwrap();
        assert_eq!(read(&mut log, 1..=6).await, expected[2..].to_vec());
        assert_eq!(read(&mut log, 3..=6).await, expected[2..].to_vec());

        // What was written is what a restart reads.
        drop((log, sm));
        drop(data);
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (mut log, _sm) = crate::raft::open_store(&data).unwrap();
        assert_eq!(read(&mut log, 3..=6).await, expected[2..].to_vec());
    }

    #[tokio::test]
    async fn a_store_that_went_missing_is_refused_and_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("raft.redb");
        {
            let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
            let (log, _sm) = crate::raft::open_store(&data).unwrap();
            log.write(|_| Ok(())).await.unwrap();
        }
        // A data dir from before the marker existed: opened as it is, and marked.
        std::fs::remove_file(dir.path().join(crate::raft::STORE_MARKER)).unwrap();
        let before = contents(dir.path()).await.unwrap();
        assert!(dir.path().join(crate::raft::STORE_MARKER).exists());
        assert_eq!(contents(dir.path()).await.unwrap(), before);

        std::fs::remove_file(&store).unwrap();
        for attempt in ["first", "second"] {
            match contents(dir.path()).await {
                Err(Error::Corrupt(msg)) => {
                    assert!(msg.contains("raft.redb"), "{attempt}: {msg}")
                }
                other => panic!("{attempt} start after the loss: {:?}", other.map(|_| ())),
            }
            assert!(!store.exists(), "{attempt}: a new empty store was made");
        }
    }

    #[tokio::test]
    async fn a_flipped_or_truncated_store_is_refused_or_reads_exactly_as_written() {
        use crate::raft::{JOURNAL_FILE, LOG_FILE, SNAPSHOT_FILE};
        use crate::state::{AllocRequest, Command};
        let dir = tempfile::tempdir().unwrap();
        let entries = |range: std::ops::RangeInclusive<u64>| {
            range
                .map(|i| Entry::<TypeConfig> {
                    log_id: log_id(i),
                    payload: EntryPayload::Normal(Command::Allocate {
                        requests: vec![AllocRequest {
                            sequence: format!("sequence-{}", i % 7),
                            count: i,
                        }],
                        max_sequences: 100,
                    }),
                })
                .collect::<Vec<_>>()
        };
        // The journal's last record, which a crash may have cut short: dropped, not refused
        // (the journal's own test covers it).
        let last_record = {
            let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
            let (mut log, mut sm) = crate::raft::open_store(&data).unwrap();
            put_entries(&log, entries(1..=400)).await;
            log.save_vote(&Vote::new_committed(7, 2)).await.unwrap();
            install_snapshot_upto(&mut sm, 100).await;
            // Appends since the last durable commit, left in the journal as by a crash.
            for first in (401..=440).step_by(8) {
                log.append_durably(entries(first..=first + 7))
                    .await
                    .unwrap();
            }
            let before = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
            log.append_durably(entries(441..=443)).await.unwrap();
            let after = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
            let changed: Vec<usize> = (0..after.len())
                .filter(|&i| before[i] != after[i])
                .collect();
            changed[0]..changed[changed.len() - 1] + 1
        };
        // Read before any open: an open commits the journal to redb and starts it over.
        let files = [LOG_FILE, SNAPSHOT_FILE, JOURNAL_FILE]
            .map(|name| (name, std::fs::read(dir.path().join(name)).unwrap()));
        let copy_of = |damaged: &str, bytes: &[u8]| {
            let copy = tempfile::tempdir().unwrap();
            for (name, file) in &files {
                let bytes = if *name == damaged { bytes } else { file };
                std::fs::write(copy.path().join(name), bytes).unwrap();
            }
            copy
        };
        let original = contents(copy_of("", &[]).path()).await.unwrap();
        assert!(
            original.contains(r#""index":443"#),
            "the journal was not replayed"
        );

        let mut refused = std::collections::HashMap::<&str, usize>::new();
        let mut intact = 0;
        // (file to damage, its damaged bytes, what was done, must it be refused)
        let mut cases: Vec<(&str, Vec<u8>, String, bool)> = Vec::new();
        for (name, file) in &files {
            let flips: Vec<usize> = match *name {
                // redb's pages are 4 KiB.
                LOG_FILE => (0..file.len())
                    .step_by(4096)
                    .flat_map(|page| [page + 40, page + 2100])
                    .collect(),
                // The live records, and what older generations and the zero fill left.
                JOURNAL_FILE => (0..last_record.start)
                    .step_by(44)
                    .chain((last_record.end..file.len()).step_by(1 << 20))
                    .collect(),
                // The snapshot file is a few hundred bytes here.
                _ => (0..file.len()).step_by(16).map(|at| at + 5).collect(),
            };
            for at in flips {
                if at + 4 > file.len() {
                    continue;
                }
                let mut bytes = file.clone();
                for b in &mut bytes[at..at + 4] {
                    *b ^= 0x5a;
                }
                cases.push((name, bytes, format!("{name}: bytes flipped at {at}"), false));
            }
            let lens = [0, 100, 4096, file.len() / 2, file.len() - 1];
            for len in lens.into_iter().filter(|&len| len < file.len()) {
                cases.push((
                    name,
                    file[..len].to_vec(),
                    format!("{name}: truncated to {len} bytes"),
                    true,
                ));
            }
        }
        for (damaged, bytes, what, must_refuse) in cases {
            let copy = copy_of(damaged, &bytes);
            match contents(copy.path()).await {
                Err(Error::Corrupt(msg)) => {
                    assert!(msg.contains(damaged), "{what}: unclear message {msg}");
                    // redb may have rewritten the file into a consistent older state: the
                    // next start must refuse it all the same.
                    match contents(copy.path()).await {
                        Err(Error::Corrupt(again)) => {
                            assert!(again.contains("earlier start"), "{what}: {again}")
                        }
                        other => panic!("{what}: refused once, then {:?}", other.map(|_| ())),
                    }
                    *refused.entry(damaged).or_default() += 1;
                }
                Err(e) => panic!("{what}: failed with something else than Corrupt: {e}"),
                // Free space: nothing that is read changed.
                Ok(read) => {
                    assert!(!must_refuse, "{what}: was not refused");
                    assert_eq!(read, original, "{what}: read back different contents");
                    intact += 1;
                }
            }
        }
        // The sweep must have hit live parts of every file, or it proves nothing.
        for (name, _) in &files {
            let n = refused.get(name).copied().unwrap_or_default();
            assert!(
                n > 10,
                "{name}: only {n} of the flips were noticed ({intact} harmless in all)"
            );
        }
    }

    fn blanks(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        indexes
            .map(|i| Entry::<TypeConfig> {
                log_id: log_id(i),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    /// A store with the log purged up to 6 behind a snapshot of 6, entries up to 10.
    async fn purged_store(dir: &std::path::Path) {
        let data = crate::datadir::DataDir::lock(dir).unwrap();
        let (mut log, mut sm) = crate::raft::open_store(&data).unwrap();
        put_entries(&log, blanks(1..=10)).await;
        install_snapshot_upto(&mut sm, 6).await;
        log.purge(log_id(6)).await.unwrap();
    }

    #[tokio::test]
    async fn a_snapshot_kept_in_the_log_file_moves_to_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        purged_store(dir.path()).await;
        let expected = contents(dir.path()).await.unwrap();
        // Back to the layout of earlier versions: the snapshot, as JSON, in a table of the
        // log's redb file.
        #[derive(serde::Serialize)]
        struct OldSnapshot<'a> {
            meta: &'a super::super::snapshot_file::Meta,
            data: &'a [u8],
        }
        const OLD: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
        let snapshot_file = dir.path().join(crate::raft::SNAPSHOT_FILE);
        let stored =
            super::super::snapshot_file::parse(&std::fs::read(&snapshot_file).unwrap()).unwrap();
        std::fs::remove_file(&snapshot_file).unwrap();
        {
            let old = encode(&OldSnapshot {
                meta: &stored.meta,
                data: &stored.data,
            })
            .unwrap();
            let last = encode(&stored.meta.last_log_id).unwrap();
            let db = Database::open(dir.path().join(crate::raft::LOG_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(OLD).unwrap();
                table.insert("current", old.as_slice()).unwrap();
                table.insert("last_log_id", last.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }

        for start in ["first", "second"] {
            assert_eq!(contents(dir.path()).await.unwrap(), expected, "{start}");
            let db = Database::open(dir.path().join(crate::raft::LOG_FILE)).unwrap();
            let txn = db.begin_read().unwrap();
            assert!(
                matches!(
                    txn.open_table(OLD),
                    Err(redb::TableError::TableDoesNotExist(_))
                ),
                "{start}: the old copy is still in the log file"
            );
        }
    }

    #[tokio::test]
    async fn a_lost_snapshot_is_refused_once_the_log_was_purged_behind_it() {
        // Not purged: the log still holds everything, and a start replays it.
        let dir = tempfile::tempdir().unwrap();
        {
            let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
            let (_log, mut sm) = crate::raft::open_store(&data).unwrap();
            install_snapshot_upto(&mut sm, 6).await;
        }
        std::fs::remove_file(dir.path().join(crate::raft::SNAPSHOT_FILE)).unwrap();
        contents(dir.path()).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        purged_store(dir.path()).await;
        std::fs::remove_file(dir.path().join(crate::raft::SNAPSHOT_FILE)).unwrap();
        match contents(dir.path()).await {
            Err(Error::Corrupt(msg)) => assert!(
                msg.contains(crate::raft::SNAPSHOT_FILE) && msg.contains("index 6"),
                "{msg}"
            ),
            other => panic!("started without the snapshot: {:?}", other.map(|_| ())),
        }
        match contents(dir.path()).await {
            Err(Error::Corrupt(msg)) => assert!(msg.contains("earlier start"), "{msg}"),
            other => panic!("refused once, then {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_purge_waiting_for_a_snapshot_that_failed_to_save_gives_up_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (log, mut sm) = crate::raft::open_store(&data).unwrap();
        put_entries(&log, blanks(1..=10)).await;
        // A save cannot create its temporary file where a directory stands.
        std::fs::create_dir(dir.path().join("snapshot.tmp")).unwrap();
        let snapshot = |index: u64| {
            let meta = SnapshotMeta {
                last_log_id: Some(log_id(index)),
                last_membership: StoredMembership::default(),
                snapshot_id: format!("s-{index}"),
            };
            (
                meta,
                Box::new(Cursor::new(encode(&State::default()).unwrap())),
            )
        };
        // Well under the 61 s a purge waits for a snapshot that is merely slow.
        let limit = Duration::from_secs(20);

        // The purge waits first, then the install fails.
        let mut purging = log.clone();
        let purge = tokio::spawn(async move { purging.purge(log_id(4)).await });
        let (meta, cursor) = snapshot(4);
        assert!(sm.install_snapshot(&meta, cursor).await.is_err());
        let res = tokio::time::timeout(limit, purge)
            .await
            .expect("the purge kept waiting for a snapshot that failed")
            .unwrap();
        let err = res.expect_err("purged with no snapshot stored").to_string();
        assert!(err.contains("failed to save"), "{err}");

        // The install fails first, then the purge comes.
        let (meta, cursor) = snapshot(6);
        assert!(sm.install_snapshot(&meta, cursor).await.is_err());
        let mut purging = log.clone();
        tokio::time::timeout(limit, purging.purge(log_id(5)))
            .await
            .expect("the purge kept waiting for a snapshot that failed")
            .expect_err("purged with no snapshot stored");
        assert_eq!(indexes(&log), (1..=10).collect::<Vec<_>>());

        // Once a covering snapshot is stored, the purge goes through.
        std::fs::remove_dir(dir.path().join("snapshot.tmp")).unwrap();
        install_snapshot_upto(&mut sm, 7).await;
        let mut purging = log.clone();
        purging.purge(log_id(5)).await.unwrap();
        assert_eq!(indexes(&log), (6..=10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_log_is_never_purged_past_the_stored_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::datadir::DataDir::lock(dir.path()).unwrap();
        let (log, mut sm) = crate::raft::open_store(&data).unwrap();
        put_entries(&log, blanks(1..=10)).await;

        // As after an install from the primary: the purge is issued before the snapshot is in.
        let mut purging = log.clone();
        let mut purge = tokio::spawn(async move { purging.purge(log_id(6)).await });
        let early = tokio::time::timeout(Duration::from_millis(300), &mut purge).await;
        assert!(early.is_err(), "purged with no snapshot stored");
        assert_eq!(indexes(&log), (1..=10).collect::<Vec<_>>());

        install_snapshot_upto(&mut sm, 6).await;
        tokio::time::timeout(Duration::from_secs(10), purge)
            .await
            .expect("purge still waiting after the snapshot was stored")
            .unwrap()
            .unwrap();
        assert_eq!(indexes(&log), (7..=10).collect::<Vec<_>>());
        let mut reader = log.clone();
        let state = reader.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(6)));
    }
}
