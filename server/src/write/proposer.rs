//! Getting a command committed by the primary, from any node, through the one route to the
//! primary ([`Router`]). The caller then waits for the entry to be applied locally before it
//! answers its client, so every reply reflects state this node already holds. One deadline
//! covers the whole request: the forward, the retries and the wait for the local apply.

use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::primary::{peer_error, Router, Step};
use crate::disk::DiskGuard;
use crate::error::Error;
use crate::membership::transfer::Handover;
use crate::peer::messages::{self, Committed, ProposeOutcome, ReadIndexReply, ReadIndexRequest};
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, Raft};
use crate::state::{Command, Reply};

/// Beyond a request's deadline, how long a command committed just before it may take to be
/// applied here: the apply follows the commit within milliseconds, and a caller told
/// UNAVAILABLE for an entry that did commit has lost what it asked for.
const APPLY_GRACE: Duration = Duration::from_millis(100);

/// Less time than this left, and a command is not proposed at all: no round of fsyncs and
/// replication finishes in it.
const MIN_TIME_TO_COMMIT: Duration = Duration::from_millis(2);

/// Commits commands through the primary. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    router: Router,
    raft: Raft,
    /// This node's applied state, to wait for an index to be applied here.
    state: StateReader,
    timeout: Duration,
    /// Writes are refused while this node's disk is below its reserve.
    disk: DiskGuard,
    /// Set while this primary hands over: new writes wait for the next primary.
    handover: Handover,
}

impl Proposer {
    pub fn new(
        router: Router,
        raft: Raft,
        state: StateReader,
        timeout: Duration,
        disk: DiskGuard,
        handover: Handover,
    ) -> Self {
        Self {
            router,
            raft,
            state,
            timeout,
            disk,
            handover,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.router.id()
    }

    /// The route to the primary, shared with liveness.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// request_timeout_ms.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When a request arriving now must have its answer.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Commits `command` through whichever node is primary, before `deadline`.
    pub async fn propose(&self, command: Command, deadline: Instant) -> Result<Committed, Error> {
        // Every node appends every entry: one short of disk is refused here, not in Raft.
        self.disk.check()?;
        let command = &command;
        self.router
            .on_primary(
                "command",
                deadline,
                |deadline| self.propose_here(command.clone(), deadline),
                |peer, wait| async move {
                    match peer.call::<messages::Propose>(command, wait).await {
                        Ok(ProposeOutcome::Committed(c)) => Step::Done(c),
                        Ok(ProposeOutcome::NotPrimary { primary: p }) => Step::Retry(format!(
                            "node {} is no longer primary (it names {p:?})",
                            peer.target()
                        )),
                        Ok(ProposeOutcome::Failed(msg)) => Step::Fail(Error::Unavailable(msg)),
                        Ok(ProposeOutcome::Refused(msg)) => {
                            Step::Fail(Error::ResourceExhausted(msg))
                        }
                        Err(e) => peer_error(e),
                    }
                },
            )
            .await
    }

    /// Commits `command` only if this node is primary now; never forwards it. For verdicts
    /// that only the current primary may give.
    pub async fn propose_on_primary(
        &self,
        command: Command,
        deadline: Instant,
    ) -> Result<Committed, Error> {
        match self.propose_here(command, deadline).await {
            Step::Done(c) => Ok(c),
            Step::Retry(reason) => Err(Error::Unavailable(reason)),
            Step::Fail(e) => Err(e),
        }
    }

    /// Answers a forwarded command: commit it if this node is primary, before the forwarding
    /// node's `deadline`.
    pub async fn propose_forwarded(&self, command: Command, deadline: Instant) -> ProposeOutcome {
        match self.propose_here(command, deadline).await {
            Step::Done(c) => ProposeOutcome::Committed(c),
            Step::Retry(_) => ProposeOutcome::NotPrimary {
                primary: self.router.primary(),
            },
            Step::Fail(e @ Error::ResourceExhausted(_)) => ProposeOutcome::Refused(e.to_string()),
            Step::Fail(e) => ProposeOutcome::Failed(e.to_string()),
        }
    }

    /// Commits `command` and waits until this node has applied it; returns the reply.
    pub async fn commit(&self, command: Command) -> Result<Reply, Error> {
        let deadline = self.deadline();
        let committed = self.propose(command, deadline).await?;
        self.wait_applied(committed.index, deadline).await?;
        Ok(committed.reply)
    }

    /// Waits until this node has applied everything the primary had committed when this was
    /// called: after it, a local read sees every write acknowledged before.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        self.read_barrier_until(self.deadline()).await
    }

    /// [`read_barrier`](Self::read_barrier), within a deadline the caller already runs by.
    pub async fn read_barrier_until(&self, deadline: Instant) -> Result<(), Error> {
        let index = self
            .router
            .on_primary(
                "read_index",
                deadline,
                |deadline| async move {
                    match self.read_index_here(deadline).await {
                        Some(index) => Step::Done(index),
                        None => Step::Retry("the primary could not confirm its leadership".into()),
                    }
                },
                |peer, wait| async move {
                    match peer
                        .call::<messages::ReadIndex>(&ReadIndexRequest, wait)
                        .await
                    {
                        Ok(ReadIndexReply(Some(index))) => Step::Done(index),
                        Ok(ReadIndexReply(None)) => Step::Retry(format!(
                            "node {} could not confirm that it is primary",
                            peer.target()
                        )),
                        Err(e) => peer_error(e),
                    }
                },
            )
            .await?;
        self.wait_applied(index, deadline).await
    }

    /// On the primary: confirms leadership with a quorum before `deadline`, and returns the
    /// index a read must wait for: this node's last log index. Every acknowledged write is in
    /// the primary's log (Leader Completeness), while openraft's own read index can lag it:
    /// right after a restart the primary may not know the commit index yet (it is not
    /// persisted).
    pub async fn read_index_here(&self, deadline: Instant) -> Option<u64> {
        let read = timeout_at(deadline, self.raft.get_read_log_id()).await;
        match read {
            Ok(Ok((read_log_id, _))) => {
                let last = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
                Some(last.max(read_log_id.map(|l| l.index).unwrap_or(0)))
            }
            _ => None,
        }
    }

    /// Waits until this node has applied `index`, so its reply matches its own state; gives
    /// up at the request's `deadline` (plus [`APPLY_GRACE`]).
    pub async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), Error> {
        if timeout_at(deadline + APPLY_GRACE, self.state.applied(index))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if self.raft.metrics().borrow().running_state.is_err() {
            return Err(self.stopped());
        }
        Err(Error::Unavailable(format!(
            "node {} has not applied log index {index} by the request's deadline \
             (request_timeout_ms = {})",
            self.id(),
            self.timeout.as_millis()
        )))
    }

    /// Why Raft has stopped, as a request's error: our own graceful stop, or a failure (a
    /// full disk) that is named, since the node exits over it.
    fn stopped(&self) -> Error {
        match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => Error::ShuttingDown,
            Err(fatal) => Error::Unavailable(format!("node {} stopped: {fatal}", self.id())),
        }
    }

    async fn propose_here(&self, command: Command, deadline: Instant) -> Step<Committed> {
        if let Err(e) = self.disk.check() {
            return Step::Fail(e);
        }
        if let Some(to) = self.handover.target() {
            // Retried, here or by the forwarding node, at the next primary.
            return Step::Retry(format!("the primary is handing over to node {to}"));
        }
        // Raft takes the entry on the first poll, before any timer: one proposed with no
        // time left could commit after its caller was told it failed.
        if deadline.saturating_duration_since(Instant::now()) < MIN_TIME_TO_COMMIT {
            return Step::Fail(Error::Unavailable(
                "the request's deadline passed before it reached the primary".into(),
            ));
        }
        match timeout_at(deadline, self.raft.client_write(command)).await {
            Ok(Ok(resp)) => Step::Done(Committed {
                index: resp.log_id.index,
                primary: self.id(),
                reply: resp.data,
            }),
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(f) => Step::Retry(format!("primary moved to {:?}", f.leader_id)),
                None if e.fatal().is_some() => Step::Fail(self.stopped()),
                None => Step::Retry(e.to_string()),
            },
            Err(_) => Step::Fail(Error::Unavailable(format!(
                "no quorum: primary {} could not commit within the request's deadline \
                 (request_timeout_ms = {})",
                self.id(),
                self.timeout.as_millis()
            ))),
        }
    }
}
