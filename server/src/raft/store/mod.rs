//! The node's storage, all in its data dir: the lock on the dir (`datadir.rs`), the Raft log
//! and vote in `raft.redb` (`log_store.rs`, with its newest entries in memory, `cache.rs`),
//! the journal `raft.journal` that makes an append durable first (`journal.rs`), the latest
//! snapshot `snapshot.bin` (`snapshot_file.rs`), and the checks a start runs before serving
//! any of it (`open.rs`). Every part fails with one [`StoreError`] (`error.rs`).

mod cache;
pub(crate) mod datadir;
mod error;
mod journal;
mod log_store;
mod open;
pub(crate) mod snapshot_file;
#[cfg(test)]
mod suite_test;

pub use datadir::DataDir;
pub use error::StoreError;
pub use log_store::{CommitIndex, LogStore};
pub use open::open_store;
