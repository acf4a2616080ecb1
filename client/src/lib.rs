//! Client library for the sequencer cluster.
//!
//! A [`Client`] knows several servers. Each call goes to the server that answered last; when a
//! server is down or has no primary (UNAVAILABLE), the call moves on to the next one, cycling
//! with a short backoff until the client's deadline. Any server will do: followers forward to
//! the primary. Other errors (bad input, limits) come back at once.
//!
//! Primary discovery saves that forwarding hop: [`Client::discover_primary`] learns which of
//! the client's servers is which node, and from then on every id response (which names the
//! primary) steers the next call to the primary.
//!
//! Admin calls (membership changes, primary hand-over) carry the token given to
//! [`Client::with_admin_token`], and may take up to [`ADMIN_DEADLINE`] unless
//! [`Client::with_deadline`] says otherwise.
//!
//! The library's modules: `client` (the RPCs), `retry` (one attempt, and the loop over
//! servers), `transport` (channels, TLS), `keep_alive` (heartbeats), `config` (config.json),
//! `error`. The other files of `src/` belong to the `client` binary.

// A library must not panic on what a server or a user hands it.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod client;
mod config;
mod error;
mod keep_alive;
mod retry;
mod transport;

pub use client::{Client, Identity, ADMIN_DEADLINE};
pub use config::{addrs_from_config, data_dir_from_config, node_hosts_from_config};
pub use error::{code_name, ClientError};
pub use keep_alive::KeepAlive;
pub use sequencer_proto::v1 as pb;
pub use transport::Tls;
