//! The sequencer node: a Raft-replicated id allocator behind gRPC.
//!
//! A request reaches any node's public API ([`api`]). The node's batcher ([`allocator`]) turns
//! everything waiting into one command, the [`proposer`] gets it committed by the primary (the
//! Raft leader) directly or over the peer service ([`peer`]), every node applies it to the same
//! [`state`] through [`raft`], and the node answers once it has applied the entry itself.

pub mod allocator;
pub mod api;
pub mod batch;
pub mod bootstrap;
pub mod config;
pub mod datadir;
pub mod disk;
pub mod error;
pub mod listener;
pub mod liveness;
pub mod node;
pub mod peer;
pub mod proposer;
pub mod raft;
pub mod sender;
pub mod state;
pub mod summary;
pub mod tls;

pub use config::Config;
pub use error::Error;
pub use node::{run, Listeners};
