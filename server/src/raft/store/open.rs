//! Opening the store, and the checks a start runs before the node serves any of it: redb's
//! full integrity check of the log's file, the snapshot file's checksum, the journal against
//! the log, and the log against the snapshot. A refusal leaves the `DAMAGED` marker, so a
//! later start refuses too; the `STORE` marker tells a lost store from one never made.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::journal::JOURNAL_FILE;
use super::log_store::{LogStore, LOG_FILE};
use super::snapshot_file::{move_snapshot, SnapshotFile, SNAPSHOT_FILE};
use super::{DataDir, StoreError};
use crate::raft::state_machine::StateMachine;

/// Left in a data dir whose store was refused at start, so that later starts refuse it too.
pub(crate) const DAMAGED: &str = "DAMAGED";

/// Kept next to `raft.redb` once the store exists. A start that finds it without the store
/// knows the store was lost (deleted, or the disk under it replaced), not never made: a node
/// that forgot its vote could vote twice in one term.
pub(crate) const STORE_MARKER: &str = "STORE";

/// Opens (or creates) the node's store in its locked data dir (the log's redb file, its
/// journal and the snapshot file) and returns its log store and state machine.
pub fn open_store(dir: &DataDir) -> Result<(LogStore, StateMachine), StoreError> {
    let marker = dir.path().join(DAMAGED);
    if let Ok(why) = std::fs::read_to_string(&marker) {
        return Err(StoreError::RefusedBefore {
            dir: dir.path().to_path_buf(),
            why: why.trim().to_string(),
        });
    }
    let opened = open_checked_store(dir);
    if let Err(StoreError::Damaged { path, why }) = &opened {
        // redb may already have rewritten a damaged file into a consistent older state; the
        // marker keeps the next start from serving it.
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let _ = std::fs::write(&marker, format!("{file}: {why}\n"));
    }
    opened
}

fn open_checked_store(dir: &DataDir) -> Result<(LogStore, StateMachine), StoreError> {
    let damaged = |file: &str, why: String| StoreError::Damaged {
        path: dir.path().join(file),
        why,
    };
    let store_marker = dir.path().join(STORE_MARKER);
    let made_before = store_marker.exists();
    if made_before && !dir.path().join(LOG_FILE).exists() {
        return Err(damaged(
            LOG_FILE,
            format!(
                "is missing, though {} says this node kept its store here (its vote and log \
                 are gone)",
                store_marker.display()
            ),
        ));
    }
    let log_db = Arc::new(open_checked(dir, LOG_FILE)?);
    dir.protect(LOG_FILE)?;
    if !made_before {
        mark_store(dir.path(), &store_marker)?;
        dir.protect(STORE_MARKER)?;
    }
    let (file, mut stored) = SnapshotFile::open(dir.path())?;
    if move_snapshot(&log_db, &file)? {
        stored = file.load()?;
    }
    let log = LogStore::open(log_db, dir.path(), file.saved())?;
    dir.protect(JOURNAL_FILE)?;
    let sm = StateMachine::open(file, stored)?;
    // The purge guard keeps this from happening while the files are intact.
    let purged = log.last_purged()?.map(|l| l.index);
    let covered = sm.reader().read(|a| a.last_applied.map(|l| l.index));
    if purged > covered {
        return Err(damaged(
            SNAPSHOT_FILE,
            format!(
                "holds no snapshot of the log up to index {}, which {LOG_FILE} has purged (the \
                 snapshot was lost)",
                purged.unwrap_or_default()
            ),
        ));
    }
    Ok((log, sm))
}

/// Opens or creates a redb file and checks every page of it.
fn open_checked(dir: &DataDir, name: &str) -> Result<redb::Database, StoreError> {
    let path = dir.path().join(name);
    let damaged = |why: String| StoreError::Damaged {
        path: path.clone(),
        why,
    };
    // redb would take an empty file for a new database: a node that forgot its vote and log.
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
        return Err(damaged("is empty".into()));
    }
    // redb checks page checksums only when it recovers from a crash; a byte flipped on a disk
    // or by hand is found only by walking every page. A repair here could have rolled back to
    // an older commit, which may hold a vote or log entries this node already acknowledged.
    // Some damage makes redb panic rather than return an error; that is a refusal too.
    let opened = std::panic::catch_unwind(|| {
        let mut db = redb::Database::create(&path).map_err(|e| e.to_string())?;
        match db.check_integrity() {
            Ok(true) => Ok(db),
            Ok(false) => Err("failed its integrity check (redb repaired it, possibly by \
                              dropping recent commits)"
                .to_string()),
            Err(e) => Err(format!("failed its integrity check: {e}")),
        }
    });
    match opened {
        Ok(result) => result.map_err(damaged),
        Err(_) => Err(damaged("redb could not read it (it panicked)".into())),
    }
}

/// Writes the store marker durably, with the directory entries of it and of the store.
fn mark_store(dir: &Path, marker: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        what: "writing",
        path: marker.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(marker).map_err(io)?;
    file.write_all(b"raft.redb was created in this dir; a start without it is refused\n")
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::File::open(dir)?.sync_all())
        .map_err(io)
}
