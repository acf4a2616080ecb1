//! Client liveness: heartbeats reach the primary (from any node) and live only in its memory;
//! the primary's detector writes the removal of silent clients into the log as a `Fail`.
//!
//! A node that becomes primary gives every client two full timeouts (one to find the new
//! primary), so a failover never removes a client that was heartbeating to the old primary. A primary accepts heartbeats only
//! while a quorum confirmed its leadership recently (a lease shorter than an election), so a
//! deposed primary that has not noticed yet cannot swallow them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::primary::{peer_error, Router, Step};
use crate::config::Config;
use crate::error::Error;
use crate::peer::messages::{self, HeartbeatMsg, HeartbeatOutcome};
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, Raft};
use crate::state::{Command, GroupLimits};
use crate::write::proposer::Proposer;

/// The durations liveness runs by.
#[derive(Debug, Clone, Copy)]
pub struct LivenessTiming {
    /// Silence after which the primary removes a client.
    pub failure_timeout: Duration,
    /// How long one heartbeat may take to reach the primary: less than a client's interval.
    pub heartbeat_deadline: Duration,
    /// How long a quorum's confirmation lasts: less than the shortest election timeout.
    pub lease: Duration,
}

impl LivenessTiming {
    pub fn of(config: &Config) -> Self {
        Self {
            failure_timeout: config.groups.failure_timeout,
            // A heartbeat that cannot reach the primary soon is better retried elsewhere.
            heartbeat_deadline: config
                .batching
                .request_timeout
                .min(config.groups.client_heartbeat / 2),
            lease: config.raft.election_timeout_min,
        }
    }
}

/// What the primary's answer to a heartbeat means for the route.
fn heartbeat_step(outcome: HeartbeatOutcome) -> Step<()> {
    match outcome {
        HeartbeatOutcome::Accepted => Step::Done(()),
        HeartbeatOutcome::NotPrimary => Step::Retry("no primary to take the heartbeat".into()),
        HeartbeatOutcome::Rejected(r) => Step::Fail(r.into()),
    }
}

/// Heartbeats and the failure detector of one node. Cheap to clone.
#[derive(Clone)]
pub struct Liveness {
    id: NodeId,
    raft: Raft,
    reader: StateReader,
    router: Router,
    proposer: Proposer,
    /// Last heartbeat per client, kept only while this node is primary.
    seen: Arc<Mutex<HashMap<u64, Instant>>>,
    /// When a quorum last confirmed this node as primary.
    confirmed: Arc<Mutex<Option<Instant>>>,
    /// How long a confirmation lasts: less than the shortest election timeout.
    lease: Duration,
    failure_timeout: Duration,
    /// How long one heartbeat may take to reach the primary: less than a client's interval.
    heartbeat_deadline: Duration,
}

impl Liveness {
    pub fn new(
        raft: Raft,
        reader: StateReader,
        proposer: Proposer,
        timing: LivenessTiming,
    ) -> Self {
        let LivenessTiming {
            failure_timeout,
            heartbeat_deadline,
            lease,
        } = timing;
        Self {
            id: proposer.id(),
            raft,
            reader,
            router: proposer.router().clone(),
            proposer,
            seen: Arc::default(),
            confirmed: Arc::default(),
            lease,
            failure_timeout,
            heartbeat_deadline,
        }
    }

    fn lease_valid(&self) -> bool {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        confirmed.is_some_and(|t| t.elapsed() < self.lease)
    }

    /// Records a heartbeat, passing it to the primary if this node is not.
    pub async fn heartbeat(&self, client_id: u64, token_hash: String) -> Result<(), Error> {
        let deadline = Instant::now() + self.heartbeat_deadline;
        let msg = &HeartbeatMsg {
            client_id,
            token_hash,
        };
        self.router
            .on_primary(
                "heartbeat",
                deadline,
                |deadline| async move { heartbeat_step(self.heartbeat_here(msg, deadline).await) },
                |peer, wait| async move {
                    match peer.call::<messages::Heartbeat>(msg, wait).await {
                        Ok(outcome) => heartbeat_step(outcome),
                        Err(e) => peer_error(e),
                    }
                },
            )
            .await
    }

    /// On the primary: authenticates the client and records the heartbeat, by `deadline`.
    pub async fn heartbeat_here(&self, msg: &HeartbeatMsg, deadline: Instant) -> HeartbeatOutcome {
        if self.raft.metrics().borrow().current_leader != Some(self.id) || !self.lease_valid() {
            return HeartbeatOutcome::NotPrimary;
        }
        let check = || {
            self.reader
                .read(|a| a.state.groups.check_token(msg.client_id, &msg.token_hash))
        };
        let mut res = check();
        if res.is_err() {
            // A registration committed elsewhere may not be applied here yet.
            if self.proposer.read_barrier_until(deadline).await.is_err() {
                return HeartbeatOutcome::NotPrimary;
            }
            res = check();
        }
        match res {
            Ok(()) => {
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(msg.client_id, Instant::now());
                HeartbeatOutcome::Accepted
            }
            Err(r) => HeartbeatOutcome::Rejected(r),
        }
    }

    /// The failure detector; runs on every node and acts only while it is primary.
    pub async fn run_detector(self, limits: GroupLimits, stop: CancellationToken) {
        // Often enough to renew the lease before it lapses.
        let every = (self.failure_timeout / 4)
            .min(self.lease / 2)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut leading_term = None;
        loop {
            tokio::select! {
                _ = sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let (leader, term) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.current_term)
            };
            if leader != Some(self.id) {
                leading_term = None;
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
                *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = None;
                continue;
            }
            let had_lease = self.lease_valid();
            let asked = Instant::now();
            if let Ok(Ok(_)) = tokio::time::timeout(self.lease, self.raft.get_read_log_id()).await {
                *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked);
            }
            if !self.lease_valid() {
                // No quorum behind us: judge nobody, and start afresh once it is back.
                leading_term = None;
                continue;
            }
            let now = Instant::now();
            let clients = self.reader.read(|a| a.state.groups.client_ids());
            let expired: Vec<u64> = {
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if leading_term != Some(term) || !had_lease {
                    // New primary, or heartbeats were refused for a while: every client gets
                    // a full timeout, and one more to find this primary, from now.
                    seen.clear();
                    for id in &clients {
                        seen.insert(*id, now + self.failure_timeout);
                    }
                    leading_term = Some(term);
                }
                seen.retain(|id, _| clients.binary_search(id).is_ok());
                clients
                    .iter()
                    .filter(|id| {
                        now.duration_since(*seen.entry(**id).or_insert(now)) > self.failure_timeout
                    })
                    .copied()
                    .collect()
            };
            if expired.is_empty() {
                continue;
            }
            tracing::info!(node = self.id, clients = ?expired, "removing clients that stopped sending heartbeats");
            let cmd = Command::Fail {
                client_ids: expired,
                term,
                limits,
            };
            // Never forwarded: only this term's primary may remove anyone.
            if let Err(e) = self
                .proposer
                .propose_on_primary(cmd, Instant::now() + self.lease)
                .await
            {
                tracing::warn!(node = self.id, error = %e, "could not record failed clients; will retry");
            }
        }
    }
}
