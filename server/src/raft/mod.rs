//! Replication, kept in its place: openraft's type config, the redb log store, the state
//! machine adapter with its snapshots, and the network that carries Raft over the peer service.
//!
//! Nothing here knows protobuf types; the peer module wraps our serde types in bytes.

// openraft's StorageError is large, and its traits make us return it.
#![allow(clippy::result_large_err)]

pub mod election;
#[cfg(test)]
mod fuzz_test;
mod journal;
pub mod log_store;
pub mod network;
mod snapshot_file;
pub mod state_machine;
#[cfg(test)]
mod suite_test;

use std::io::Cursor;
use std::sync::Arc;

use openraft::SnapshotPolicy;

use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::Error;
use crate::state::{Command, Reply};

openraft::declare_raft_types!(
    /// Our Raft: commands and replies from `state`, u64 node ids, openraft's `BasicNode`
    /// (holding the peer address) and in-memory snapshot cursors.
    pub TypeConfig:
        D = Command,
        R = Reply,
);

/// Node ids are the `id`s of config.json.
pub type NodeId = u64;
/// The Raft handle every part of the node shares.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;

/// Left in a data dir whose store was refused at start, so that later starts refuse it too.
pub const DAMAGED: &str = "DAMAGED";

/// The log and the vote. Every append commits here, and redb lets one write transaction run at
/// a time.
pub const LOG_FILE: &str = "raft.redb";
/// The log's journal: appends are durable once written and synced here, before redb holds
/// them durably.
pub const JOURNAL_FILE: &str = "raft.journal";
/// The latest snapshot, a plain file of its own: in the log's redb file, writing a large
/// snapshot held redb's one writer, and every append waited behind it.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

/// Kept next to `raft.redb` once the store exists. A start that finds it without the store
/// knows the store was lost (deleted, or the disk under it replaced), not never made: a node
/// that forgot its vote could vote twice in one term.
pub const STORE_MARKER: &str = "STORE";

/// Opens (or creates) the node's store in its locked data dir (the log's redb file and the
/// snapshot file) and returns its log store and state machine.
pub fn open_store(
    dir: &DataDir,
) -> Result<(log_store::LogStore, state_machine::StateMachine), Error> {
    let marker = dir.path().join(DAMAGED);
    let corrupt = |file: &str, why: String| {
        // redb may already have rewritten a damaged file into a consistent older state; the
        // marker keeps the next start from serving it.
        let _ = std::fs::write(&marker, format!("{file}: {why}\n"));
        Error::Corrupt(format!(
            "{}: {why}; refusing to start rather than serve lost or stale state (to resync this \
             node from its peers, move its data dir away while the others have a quorum)",
            dir.path().join(file).display()
        ))
    };
    if let Ok(why) = std::fs::read_to_string(&marker) {
        return Err(Error::Corrupt(format!(
            "{}: refused at an earlier start ({}; see {}); refusing to start rather than serve \
             lost or stale state (to resync this node from its peers, move its data dir away \
             while the others have a quorum)",
            dir.path().display(),
            why.trim(),
            marker.display()
        )));
    }
    let store_marker = dir.path().join(STORE_MARKER);
    let made_before = store_marker.exists();
    if made_before && !dir.path().join(LOG_FILE).exists() {
        return Err(corrupt(
            LOG_FILE,
            format!(
                "is missing, though {} says this node kept its store here (its vote and log \
                 are gone)",
                store_marker.display()
            ),
        ));
    }
    let log_db = Arc::new(open_checked(dir, LOG_FILE).map_err(|why| corrupt(LOG_FILE, why))?);
    dir.protect(LOG_FILE)?;
    if !made_before {
        mark_store(dir.path(), &store_marker)?;
        dir.protect(STORE_MARKER)?;
    }
    let snapshot_err = |e: snapshot_file::ReadError| match e {
        snapshot_file::ReadError::Damaged(why) => corrupt(SNAPSHOT_FILE, why),
        e => Error::Internal(e.to_string()),
    };
    let (file, mut stored) = snapshot_file::SnapshotFile::open(dir.path()).map_err(snapshot_err)?;
    if state_machine::move_snapshot(&log_db, &file)? {
        stored = file.load().map_err(snapshot_err)?;
    }
    let log = log_store::LogStore::open(log_db, dir.path(), file.saved()).map_err(|e| match e {
        snapshot_file::ReadError::Damaged(why) => corrupt(JOURNAL_FILE, why),
        e => Error::Internal(e.to_string()),
    })?;
    dir.protect(JOURNAL_FILE)?;
    let sm = state_machine::StateMachine::open(file, stored)?;
    // The purge guard keeps this from happening while the files are intact.
    let purged = log.last_purged()?.map(|l| l.index);
    let covered = sm.reader().read(|a| a.last_applied.map(|l| l.index));
    if purged > covered {
        return Err(corrupt(
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
fn open_checked(dir: &DataDir, name: &str) -> Result<redb::Database, String> {
    let path = dir.path().join(name);
    // redb would take an empty file for a new database: a node that forgot its vote and log.
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
        return Err("is empty".into());
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
        Ok(result) => result,
        Err(_) => Err("redb could not read it (it panicked)".into()),
    }
}

/// Writes the store marker durably, with the directory entries of it and of the store.
fn mark_store(dir: &std::path::Path, marker: &std::path::Path) -> Result<(), Error> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Internal(format!("writing {}: {e}", marker.display()));
    let mut file = std::fs::File::create(marker).map_err(io)?;
    file.write_all(b"raft.redb was created in this dir; a start without it is refused\n")
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::File::open(dir)?.sync_all())
        .map_err(io)
}

/// openraft's settings, from ours.
pub fn raft_config(config: &Config) -> Result<openraft::Config, Error> {
    let c = openraft::Config {
        cluster_name: "sequencer".into(),
        heartbeat_interval: config.heartbeat_interval_ms,
        election_timeout_min: config.election_timeout_min_ms,
        election_timeout_max: config.election_timeout_max_ms,
        // The 200 ms default resends large snapshots forever on a slow disk.
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: config.logs_to_keep,
        // openraft 0.9 gives an AppendEntries one heartbeat interval, so a catch-up round stays
        // a few MiB: an entry carries at most about max(MAX_BATCH_BYTES, max_payload_bytes)
        // of payload (1 MiB, 1.4 MiB encoded) and 1,024 names.
        max_payload_entries: 4,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| Error::Internal(format!("raft config: {e}")))
}

/// serde encoding shared by the log, the snapshots and the peer wire.
pub mod codec {
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(value)
    }

    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
