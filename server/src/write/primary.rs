//! The one route to the primary. Every call that must reach the primary (a command to commit,
//! a read barrier, a client heartbeat) comes here: it runs on this node if it is primary, is
//! forwarded to the primary otherwise, and is tried again across elections until the request's
//! deadline. One place decides what is worth another try, so every caller behaves alike:
//!
//! - no primary known, or the primary is not among this node's peers (yet): try again;
//! - the primary moves while a forward is in flight: drop the call and try the new one;
//! - a peer that cannot be reached, or that says it is no longer primary: try again;
//! - any other peer error is final;
//! - each forward waits at most one election timeout, since a primary silent for that long
//!   may be gone; retries pause [`RETRY_PAUSE`]; at the deadline the call is `UNAVAILABLE`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::peer::{PeerClient, PeerClients, PeerError};
use crate::raft::{NodeId, Raft};

/// Pause between attempts while the primary is unknown or moving.
pub const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// What one attempt came to.
pub enum Step<T> {
    Done(T),
    /// Worth another try, for this reason (the last one is what the caller is told).
    Retry(String),
    Fail(Error),
}

/// A peer call that failed, as a step: the same for every caller.
pub fn peer_error<T>(e: PeerError) -> Step<T> {
    match e {
        PeerError::Unreachable(..) => Step::Retry(e.to_string()),
        PeerError::Status(..) | PeerError::Codec(..) => Step::Fail(Error::Internal(e.to_string())),
    }
}

/// Finds the primary and routes calls to it. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    id: NodeId,
    raft: Raft,
    peers: PeerClients,
    /// How long one forward may wait: the longest election timeout.
    forward_cap: Duration,
    /// request_timeout_ms, named when a call gives up.
    timeout: Duration,
    /// Drop a forward in flight when the primary moves (see [`Router::patient`]).
    follow_moves: bool,
}

impl Router {
    pub fn new(
        id: NodeId,
        raft: Raft,
        peers: PeerClients,
        forward_cap: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            id,
            raft,
            peers,
            forward_cap,
            timeout,
            follow_moves: true,
        }
    }

    /// The same route for calls that may rightly take long on the primary and may move it
    /// themselves (a learner catching up, a hand-over): one forward may take `cap`, and is
    /// not dropped when the primary moves, since its answer says what happened.
    pub fn patient(&self, cap: Duration) -> Router {
        Router {
            forward_cap: cap,
            follow_moves: false,
            ..self.clone()
        }
    }

    /// request_timeout_ms.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The primary this node knows of now.
    pub fn primary(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Runs `here(deadline)` if this node is primary, or `there(primary, wait)` against the
    /// primary, until one of them is done or fails, or `deadline` passes. `kind` labels the
    /// forwards metric: what the call carries.
    pub async fn on_primary<T, H, HF, F, FF>(
        &self,
        kind: &'static str,
        deadline: Instant,
        here: H,
        there: F,
    ) -> Result<T, Error>
    where
        H: Fn(Instant) -> HF,
        HF: Future<Output = Step<T>>,
        F: Fn(PeerClient, Duration) -> FF,
        FF: Future<Output = Step<T>>,
    {
        let started = Instant::now();
        let mut reason = "the request's deadline passed before it was sent".to_string();
        loop {
            // Checked before each attempt: one begun past the deadline might still commit
            // after its caller was told it failed.
            if Instant::now() >= deadline {
                return Err(self.gave_up(&reason, started));
            }
            let step = match self.primary() {
                Some(p) if p == self.id => here(deadline).await,
                Some(p) => match self.peers.get(p) {
                    Some(peer) => {
                        crate::metrics::get()
                            .forwards
                            .with_label_values(&[kind])
                            .inc();
                        let wait = deadline
                            .saturating_duration_since(Instant::now())
                            .min(self.forward_cap);
                        tokio::select! {
                            // An answer that is in wins over a move seen at the same time.
                            biased;
                            step = there(peer, wait) => step,
                            to = self.primary_moves_from(p), if self.follow_moves => Step::Retry(format!(
                                "primary moved from node {p} to node {to} during the call"
                            )),
                        }
                    }
                    None => Step::Retry(format!("primary {p} is not among this node's peers")),
                },
                None => Step::Retry("no primary elected".into()),
            };
            reason = match step {
                Step::Done(v) => return Ok(v),
                Step::Fail(e) => return Err(e),
                Step::Retry(reason) => reason,
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(self.gave_up(&reason, started));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    fn gave_up(&self, reason: &str, started: Instant) -> Error {
        Error::Unavailable(format!(
            "{reason} (gave up after {} ms; request_timeout_ms = {})",
            started.elapsed().as_millis(),
            self.timeout.as_millis()
        ))
    }

    /// Resolves once this node sees a primary other than `from`, naming it. A call in flight
    /// to a deposed primary (crashed, frozen or cut off) is then dropped at once rather than
    /// held to `forward_cap`; its retry is as safe as one after a timeout.
    async fn primary_moves_from(&self, from: NodeId) -> NodeId {
        let mut metrics = self.raft.metrics();
        let moved = metrics
            .wait_for(|m| matches!(m.current_leader, Some(l) if l != from))
            .await
            .map(|m| m.current_leader);
        match moved {
            Ok(Some(to)) => to,
            // Raft has stopped; the call's own timeout ends the wait.
            _ => std::future::pending().await,
        }
    }
}
