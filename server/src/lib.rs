//! The sequencer node: a Raft-replicated id allocator behind gRPC.
//!
//! A request reaches any node's public API ([`api`]). The write path ([`write`]) batches
//! everything waiting into one command and gets it committed by the primary (the Raft leader),
//! directly or over the peer service ([`peer`]); every node applies it to the same [`state`]
//! through [`raft`], and the node answers once it has applied the entry itself.

// Nothing from outside may panic the node: errors are values, unwraps are for tests.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub(crate) mod api;
pub mod backup;
pub(crate) mod bootstrap;
pub mod config;
pub(crate) mod disk;
pub mod error;
#[cfg(test)]
mod fuzz_test;
pub(crate) mod http;
pub(crate) mod listener;
pub(crate) mod membership;
pub mod metrics;
pub(crate) mod node;
pub(crate) mod peer;
pub mod raft;
pub mod state;
pub(crate) mod summary;
pub mod tls;
pub(crate) mod write;

pub use config::Config;
pub use error::Error;
pub use node::{run, Listeners};
/// The pid locks of data dirs, for the launcher.
pub use raft::store::datadir::{pid_lock_holder, take_pid_lock, Lock, LOCK_FILE};
