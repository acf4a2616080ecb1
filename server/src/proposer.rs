//! Getting a command committed by the primary, from any node.
//!
//! On the primary a command goes straight into Raft. Anywhere else it is forwarded over the
//! peer service to the node this node believes is primary, and retried across elections until
//! the request deadline. The caller then waits for the entry to be applied locally before it
//! answers its client, so every reply reflects state this node already holds.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{timeout_at, Instant};

use crate::disk::DiskGuard;
use crate::error::Error;
use crate::peer::{PeerClients, PeerError, PeerRpc};
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, Raft};
use crate::state::{Command, Reply};

/// Pause between attempts while the primary is unknown or moving.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// A command committed and applied on the primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    /// Its log index; wait for it locally before answering.
    pub index: u64,
    /// The primary that committed it.
    pub primary: NodeId,
    /// What the state machine replied.
    pub reply: Reply,
}

/// The answer to a forwarded command, as it travels back from the primary.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeOutcome {
    Committed(Committed),
    /// The receiver is not the primary (any more).
    NotPrimary {
        primary: Option<NodeId>,
    },
    /// The primary could not commit it in time.
    Failed(String),
    /// The primary refuses writes: its disk is below the reserve.
    Refused(String),
}

/// Why one attempt failed: worth another try, or final.
enum Attempt {
    Retry(String),
    Final(Error),
}

/// Routes commands to the primary. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    id: NodeId,
    raft: Raft,
    /// This node's applied state, to wait for an index to be applied here.
    state: StateReader,
    peers: PeerClients,
    timeout: Duration,
    /// Longest wait for one forward: a primary silent for an election timeout may be gone, so
    /// look again at who is primary (a retry at worst burns ids; Sends are idempotent).
    forward_cap: Duration,
    /// Writes are refused while this node's disk is below its reserve.
    disk: DiskGuard,
}

impl Proposer {
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: StateReader,
        peers: PeerClients,
        timeout: Duration,
        forward_cap: Duration,
        disk: DiskGuard,
    ) -> Self {
        Self {
            id,
            raft,
            state,
            peers,
            timeout,
            forward_cap,
            disk,
        }
    }

    /// Why Raft has stopped, as a request's error: our own graceful stop, or a failure (a
    /// full disk) that is named, since the node exits over it.
    fn stopped(&self) -> Error {
        match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => Error::ShuttingDown,
            Err(fatal) => Error::Unavailable(format!("node {} stopped: {fatal}", self.id)),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// When a request arriving now must have its answer.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Commits `command` through whichever node is primary, before `deadline`.
    pub async fn propose(&self, command: Command, deadline: Instant) -> Result<Committed, Error> {
        // Every node appends every entry: one short of disk is refused here, not in Raft.
        self.disk.check()?;
        loop {
            let primary = self.raft.metrics().borrow().current_leader;
            let attempt = match primary {
                Some(p) if p == self.id => self.propose_here(command.clone(), deadline).await,
                Some(p) => self.forward(p, &command, deadline).await,
                None => Err(Attempt::Retry("no primary elected".into())),
            };
            let reason = match attempt {
                Ok(c) => return Ok(c),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => reason,
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(Error::Unavailable(format!(
                    "{reason} (gave up after request_timeout_ms = {})",
                    self.timeout.as_millis()
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Commits `command` only if this node is primary now; never forwards it. For verdicts
    /// that only the current primary may give.
    pub async fn propose_on_primary(
        &self,
        command: Command,
        deadline: Instant,
    ) -> Result<Committed, Error> {
        match self.propose_here(command, deadline).await {
            Ok(c) => Ok(c),
            Err(Attempt::Retry(reason)) => Err(Error::Unavailable(reason)),
            Err(Attempt::Final(e)) => Err(e),
        }
    }

    /// Answers a forwarded command: commit it if this node is primary.
    pub async fn propose_forwarded(&self, command: Command) -> ProposeOutcome {
        match self
            .propose_here(command, Instant::now() + self.timeout)
            .await
        {
            Ok(c) => ProposeOutcome::Committed(c),
            Err(Attempt::Retry(_)) => ProposeOutcome::NotPrimary {
                primary: self.raft.metrics().borrow().current_leader,
            },
            Err(Attempt::Final(e @ Error::ResourceExhausted(_))) => {
                ProposeOutcome::Refused(e.to_string())
            }
            Err(Attempt::Final(e)) => ProposeOutcome::Failed(e.to_string()),
        }
    }

    /// Commits `command` and waits until this node has applied it; returns the reply.
    pub async fn commit(&self, command: Command) -> Result<Reply, Error> {
        let committed = self.propose(command, self.deadline()).await?;
        self.wait_applied(committed.index).await?;
        Ok(committed.reply)
    }

    /// Waits until this node has applied everything the primary had committed when this was
    /// called: after it, a local read sees every write acknowledged before.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        let deadline = self.deadline();
        loop {
            let primary = self.raft.metrics().borrow().current_leader;
            let index = match primary {
                Some(p) if p == self.id => self.read_index_here().await,
                Some(p) => match self.peers.get(p) {
                    Some(peer) => {
                        let left = deadline
                            .saturating_duration_since(Instant::now())
                            .min(self.forward_cap);
                        tokio::select! {
                            index = peer.call::<_, Option<u64>>(PeerRpc::ReadIndex, &(), left) => {
                                index.ok().flatten()
                            }
                            _ = self.primary_moves_from(p) => None,
                        }
                    }
                    None => None,
                },
                None => None,
            };
            if let Some(index) = index {
                return self.wait_applied(index).await;
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(Error::Unavailable(
                    "no primary confirmed a read index".into(),
                ));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// On the primary: confirms leadership with a quorum, and returns the index a read must
    /// wait for: this node's last log index. Every acknowledged write is in the primary's log
    /// (Leader Completeness), while openraft's own read index can lag it: right after a restart
    /// the primary may not know the commit index yet (it is not persisted).
    pub async fn read_index_here(&self) -> Option<u64> {
        let read = timeout_at(self.deadline(), self.raft.get_read_log_id()).await;
        match read {
            Ok(Ok((read_log_id, _))) => {
                let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
                Some(last.max(read_log_id.map(|l| l.index).unwrap_or(0)))
            }
            _ => None,
        }
    }

    /// Waits until this node has applied `index`, so its reply matches its own state.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        if tokio::time::timeout(self.timeout, self.state.applied(index))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if self.raft.metrics().borrow().running_state.is_err() {
            return Err(self.stopped());
        }
        Err(Error::Unavailable(format!(
            "node {} has not applied log index {index} within {} ms",
            self.id,
            self.timeout.as_millis()
        )))
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

    async fn propose_here(
        &self,
        command: Command,
        deadline: Instant,
    ) -> Result<Committed, Attempt> {
        self.disk.check().map_err(Attempt::Final)?;
        match timeout_at(deadline, self.raft.client_write(command)).await {
            Ok(Ok(resp)) => Ok(Committed {
                index: resp.log_id.index,
                primary: self.id,
                reply: resp.data,
            }),
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(f) => Err(Attempt::Retry(format!(
                    "primary moved to {:?}",
                    f.leader_id
                ))),
                None if e.fatal().is_some() => Err(Attempt::Final(self.stopped())),
                None => Err(Attempt::Retry(e.to_string())),
            },
            Err(_) => Err(Attempt::Final(Error::Unavailable(format!(
                "no quorum: primary {} could not commit within {} ms",
                self.id,
                self.timeout.as_millis()
            )))),
        }
    }

    async fn forward(
        &self,
        primary: NodeId,
        command: &Command,
        deadline: Instant,
    ) -> Result<Committed, Attempt> {
        let Some(peer) = self.peers.get(primary) else {
            return Err(Attempt::Final(Error::Internal(format!(
                "primary {primary} is not in the config"
            ))));
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .min(self.forward_cap);
        let outcome = tokio::select! {
            outcome = peer.call::<_, ProposeOutcome>(PeerRpc::Propose, command, remaining) => outcome,
            to = self.primary_moves_from(primary) => {
                return Err(Attempt::Retry(format!(
                    "primary moved from {primary} to {to} during the forward"
                )))
            }
        };
        match outcome {
            Ok(ProposeOutcome::Committed(c)) => Ok(c),
            Ok(ProposeOutcome::NotPrimary { primary: p }) => Err(Attempt::Retry(format!(
                "node {primary} is no longer primary (it names {p:?})"
            ))),
            Ok(ProposeOutcome::Failed(msg)) => Err(Attempt::Final(Error::Unavailable(msg))),
            Ok(ProposeOutcome::Refused(msg)) => Err(Attempt::Final(Error::ResourceExhausted(msg))),
            Err(e @ PeerError::Unreachable(..)) => Err(Attempt::Retry(e.to_string())),
            Err(e) => Err(Attempt::Final(Error::Internal(e.to_string()))),
        }
    }
}
