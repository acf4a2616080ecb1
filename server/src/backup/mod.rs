//! Backups of the replicated state, and what is built from one: a backup file's format
//! (`file`), taking a copy on a running node (`take`), writing one on a schedule (`schedule`), and fresh data dirs for a new cluster
//! from a backup (`restore`).

pub mod file;
pub mod recover;
pub mod restore;
pub mod schedule;
pub mod take;

pub use file::{Backup, BackupError, Header};
