//! Real sequencer clusters for integration tests: one process of the real `server` binary per
//! node, on free loopback ports, each with its own data dir in a temp folder.
//!
//! - `ports`: free ports; `builder`: a cluster's settings and its start; `cluster`: the running
//!   [`Cluster`] (kill, restart, pause, partition, its clients, dirs and logs); `waits`: until
//!   it agrees on a primary, has applied a value, holds a snapshot; `proxy`: the
//!   fault-injecting proxy on each peer link.
//! - `fixtures`: for tests that start `server` themselves; `checks`: error and health checks;
//!   [`http`]: requests to a node's HTTP listener.
//! - [`members`]: Admin calls and waits on the Raft membership; `grow`: nodes added to a
//!   cluster with proxies get proxied links too.
//! - [`workload`]: the chaos workload, which records a [`history::History`]; [`history`]: what
//!   is recorded, and the id checkers; [`checker`]: the checker over a whole chaos run.

mod builder;
pub mod checker;
mod checks;
mod cluster;
mod fixtures;
mod grow;
pub mod history;
pub mod http;
pub mod members;
mod ports;
pub mod proxy;
mod waits;
pub mod workload;

pub use builder::Builder;
pub use checks::{assert_code, health, ServingStatus};
pub use cluster::{Cluster, Node, StoredSnapshot, READY_TIMEOUT};
pub use fixtures::{gen_certs, member, nodes_config, sibling_binary};
pub use ports::free_ports;
