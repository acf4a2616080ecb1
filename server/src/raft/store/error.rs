//! The store's one error type, and the one place each it becomes openraft's `StorageError`
//! and our [`Error`].
//!
//! `Damaged` is what the checks at start refuse: the node stops rather than serve lost or
//! stale state. Everything else is a failure to read or write.

use std::path::PathBuf;

use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use super::log_store::LOG_FILE;
use super::open::DAMAGED;
use crate::error::Error;
use crate::raft::NodeId;

/// Why the store (data dir, log, journal, snapshot file) failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file of the store is missing, cut short or damaged, or holds what the others
    /// contradict.
    #[error("{}: {why}", .path.display())]
    Damaged { path: PathBuf, why: String },
    /// An earlier start refused this data dir and left the `DAMAGED` marker.
    #[error(
        "{}: refused at an earlier start ({why}; see {})",
        .dir.display(),
        .dir.join(DAMAGED).display()
    )]
    RefusedBefore { dir: PathBuf, why: String },
    /// Another process holds the data dir's lock.
    #[error(
        "data dir {} is in use by another process (pid {holder}); one data dir, one node",
        .dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
    /// A file operation failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// redb failed (the log's file is the only redb file).
    #[error("{file}: {0}", file = LOG_FILE)]
    Redb(#[from] redb::Error),
    /// A value did not encode, or stored bytes did not decode.
    #[error("{what}: {source}")]
    Codec {
        what: &'static str,
        source: serde_json::Error,
    },
    /// The purge guard refused: the stored snapshot does not cover the purge.
    #[error("refusing to purge the log up to index {upto}: {why}")]
    PurgeRefused { upto: u64, why: String },
    /// A task on the blocking pool panicked or was cancelled.
    #[error("a blocking store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

// Each redb call returns an error type of its own; all of them are a `redb::Error`.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl StoreError {
    /// For `map_err`: `what` did not encode or decode.
    pub(crate) fn codec(what: &'static str) -> impl FnOnce(serde_json::Error) -> StoreError {
        move |source| StoreError::Codec { what, source }
    }

    /// openraft's form of this error, met while doing `verb` to `subject`. openraft stops Raft
    /// on it.
    pub(crate) fn into_raft(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError<NodeId> {
        StorageIOError::new(subject, verb, &self).into()
    }
}

const REFUSAL: &str = "refusing to start rather than serve lost or stale state (to resync this \
                       node from its peers, move its data dir away while the others have a quorum)";

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Damaged { .. } | StoreError::RefusedBefore { .. } => {
                Error::Corrupt(format!("{e}; {REFUSAL}"))
            }
            e => Error::Internal(e.to_string()),
        }
    }
}
