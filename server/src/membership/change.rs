//! Membership changes, carried out on the primary: list, add, promote, remove, transfer.
//! Every node takes the call and passes it along the one route to the primary; the primary
//! checks it against the membership in force, runs at most one change at a time, and goes
//! through openraft (`add_learner`, then `change_membership`, which is joint consensus).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::book::{Book, Role, View};
use super::transfer::Transfer;
use crate::peer::messages::{self, RemovedNotice};
use crate::raft::state_machine::StateReader;
use crate::raft::{Member, NodeId, Raft};

/// What an operator asks of the membership.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    List,
    Add {
        id: NodeId,
        member: Member,
        learner_only: bool,
        /// Asked by the node itself (`--join`): a member that never ran, at the same
        /// addresses, carries on from where it is rather than being refused.
        #[serde(default)]
        by_itself: bool,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
        force: bool,
    },
    Transfer {
        to: Option<NodeId>,
    },
}

impl Call {
    /// Whether the call changes anything (and so needs the admin credential).
    pub fn changes(&self) -> bool {
        !matches!(self, Call::List)
    }

    fn describe(&self) -> String {
        match self {
            Call::List => "listing the members".into(),
            Call::Add { id, .. } => format!("adding node {id}"),
            Call::Promote { id } => format!("promoting node {id}"),
            Call::Remove { id, .. } => format!("removing node {id}"),
            Call::Transfer { to: Some(to) } => format!("handing the primary to node {to}"),
            Call::Transfer { to: None } => "handing the primary over".into(),
        }
    }
}

/// One member as the primary sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed {
    pub id: NodeId,
    /// Where it is reached, as the primary would dial it.
    pub member: Member,
    pub voter: bool,
    pub primary: bool,
    /// The last log index the primary knows it holds.
    pub matched: u64,
    /// Entries behind the primary's last log index.
    pub lag: u64,
}

/// The membership in force, from the primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub primary: NodeId,
    pub members: Vec<Listed>,
    pub index: u64,
    pub changing: bool,
}

/// What a call came to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Done {
    Members(Listing),
    Transferred {
        from: NodeId,
        to: NodeId,
        took_ms: u64,
    },
}

/// Why a call changed nothing (or, for `Unavailable`, may not have finished).
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    /// This node is not the primary (any more): the route tries the one that is.
    #[error("not the primary")]
    NotPrimary,
    #[error("{0}")]
    Unavailable(String),
}

/// The primary's side of membership changes. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    id: NodeId,
    raft: Raft,
    book: Book,
    transfer: Transfer,
    /// The change running now, named for whoever asks for a second one.
    busy: Arc<Mutex<Option<Holder>>>,
    /// How long a ping may take when counting who is reachable.
    ping_timeout: Duration,
    /// The applied state: which members have run.
    started: StateReader,
}

/// Releases the one-change-at-a-time slot.
struct Busy(Arc<Mutex<Option<Holder>>>);

/// What holds the change slot.
struct Holder {
    what: String,
    /// The primary's own upkeep (`tend`): short, so a call waits for it rather than fail.
    upkeep: bool,
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A learner counts as caught up within this many entries of the primary's last index: under
/// load a few entries are always in flight.
const CAUGHT_UP_LAG: u64 = 16;
/// Longest a call waits for the primary's own upkeep to free the change slot.
const UPKEEP_WAIT: Duration = Duration::from_secs(3);
/// How often the primary looks for a change left half done or addresses missing.
const TEND_EVERY: Duration = Duration::from_millis(300);
/// How long finishing a half-done change may take.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often progress is looked at while waiting for a learner.
const POLL: Duration = Duration::from_millis(20);

impl Membership {
    pub fn new(
        id: NodeId,
        raft: Raft,
        book: Book,
        transfer: Transfer,
        started: StateReader,
    ) -> Self {
        Self {
            id,
            raft,
            book,
            transfer,
            busy: Arc::default(),
            ping_timeout: Duration::from_millis(300),
            started,
        }
    }

    /// Carries out `call` if this node is the primary, by `deadline`.
    pub async fn here(&self, call: &Call, deadline: Instant) -> Result<Done, ChangeError> {
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(ChangeError::NotPrimary);
        }
        if let Call::List = call {
            return Ok(Done::Members(self.listing()));
        }
        let _busy = self.take_slot(call, deadline).await?;
        // The wait for the slot may have outlasted this node's term.
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(ChangeError::NotPrimary);
        }
        let view = self.book.view();
        if view.joint {
            return Err(ChangeError::Precondition(
                "a membership change is half done (joint configuration); it finishes or is \
                 undone by the next primary: try again in a moment"
                    .into(),
            ));
        }
        tracing::info!(node = self.id, change = %call.describe(), "membership change");
        match call {
            Call::List => Ok(Done::Members(self.listing())),
            Call::Add {
                id,
                member,
                learner_only,
                by_itself,
            } => {
                let again_ok = *by_itself;
                self.add(&view, *id, member, (*learner_only, again_ok), deadline)
                    .await
            }
            Call::Promote { id } => self.promote(&view, *id, deadline).await,
            Call::Remove { id, force } => self.remove(&view, *id, *force, deadline).await,
            Call::Transfer { to } => {
                let (to, took) = self.transfer.hand_over(&view, *to, deadline).await?;
                Ok(Done::Transferred {
                    from: self.id,
                    to,
                    took_ms: took.as_millis() as u64,
                })
            }
        }
    }

    /// The slot for `call`; behind the primary's own upkeep (writing the first membership's
    /// addresses, say, right after a bootstrap) it waits its turn, up to [`UPKEEP_WAIT`].
    async fn take_slot(&self, call: &Call, deadline: Instant) -> Result<Busy, ChangeError> {
        let give_up = deadline.min(Instant::now() + UPKEEP_WAIT);
        loop {
            match self.take_slot_for(call.describe(), false) {
                Err((_, true)) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(e),
                Ok(busy) => return Ok(busy),
            }
        }
    }

    /// The slot, or why not and whether upkeep holds it.
    fn take_slot_for(&self, what: String, upkeep: bool) -> Result<Busy, (ChangeError, bool)> {
        let mut slot = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.as_ref() {
            let e = ChangeError::Precondition(format!(
                "another membership change is in progress: {}",
                running.what
            ));
            return Err((e, running.upkeep));
        }
        *slot = Some(Holder { what, upkeep });
        Ok(Busy(self.busy.clone()))
    }

    /// Runs on every node; acts while it is primary and no change runs here. In openraft 0.9
    /// only the call that began a change proposes its second step, so a primary that died
    /// between the two leaves the membership joint, and no change could run again: the next
    /// primary finishes it, moving to the newer config. It also writes in the addresses the
    /// first membership lacks.
    pub async fn tend(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(TEND_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A joint config seen at two ticks in a row is not one a change here is moving on.
        let mut joint_seen: Option<u64> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if self.raft.metrics().borrow().current_leader != Some(self.id) {
                joint_seen = None;
                continue;
            }
            let view = self.book.view();
            if view.joint {
                if joint_seen == view.index {
                    self.finish(&view).await;
                }
                joint_seen = view.index;
                continue;
            }
            joint_seen = None;
            if view.members.values().any(|m| !m.has_addresses()) {
                if let Ok(_busy) = self.take_slot_for("writing members' addresses".into(), true) {
                    self.book.fill_addresses(&view).await;
                }
            }
        }
    }

    async fn finish(&self, view: &View) {
        let Ok(_busy) = self.take_slot_for("finishing a change left half done".into(), true) else {
            return;
        };
        if !view.voters.contains(&self.id) {
            // Elected by the old half, which the new one drops: a voter of the new half
            // takes over and finishes it.
            let deadline = Instant::now() + FINISH_TIMEOUT;
            if let Err(e) = self.transfer.hand_over(view, None, deadline).await {
                tracing::warn!(node = self.id, error = %e, "handing over a half-done change");
            }
            return;
        }
        tracing::info!(
            node = self.id,
            index = view.index,
            voters = ?view.voters,
            "finishing the membership change a previous primary left half done"
        );
        let change = ChangeMembers::ReplaceAllVoters(view.voters.clone());
        let deadline = Instant::now() + FINISH_TIMEOUT;
        match self
            .write(deadline, self.raft.change_membership(change, false))
            .await
        {
            Ok(done) => {
                // Voters of the old half that the new one drops never hear of it: tell them.
                let after = self.book.view();
                for id in view
                    .members
                    .keys()
                    .filter(|id| !after.members.contains_key(id))
                {
                    self.tell_removed(*id, done.log_id.index).await;
                }
            }
            Err(e) => {
                tracing::warn!(node = self.id, error = %e, "finishing the half-done membership change")
            }
        }
    }

    async fn add(
        &self,
        view: &View,
        id: NodeId,
        member: &Member,
        (learner_only, again_ok): (bool, bool),
        deadline: Instant,
    ) -> Result<Done, ChangeError> {
        if id == 0 {
            return Err(ChangeError::Invalid("node ids start at 1".into()));
        }
        for (what, addr) in [("addr", &member.addr), ("peer_addr", &member.peer_addr)] {
            crate::config::check_addr(addr)
                .map_err(|e| ChangeError::Invalid(format!("{what}: {e}")))?;
        }
        match view.role(id) {
            // The same node asking again, one that never ran: a join whose answer was lost,
            // or a node added from the operator's side that starts with --join. Carry on
            // from where it is.
            Some(role) if again_ok && self.same_and_never_ran(view, id, member) => {
                if role == Role::Voter || learner_only {
                    return Ok(Done::Members(self.listing()));
                }
            }
            Some(role) => {
                return Err(ChangeError::AlreadyExists(format!(
                    "node {id} is already a {}",
                    role.name()
                )))
            }
            None => {
                self.check_new_addresses(view, member)?;
                self.write(deadline, self.raft.add_learner(id, member.clone(), false))
                    .await?;
                tracing::info!(node = self.id, member = id, %member, "added as a learner");
            }
        }
        if learner_only {
            return Ok(Done::Members(self.listing()));
        }
        self.caught_up(id, deadline).await.map_err(|lag| {
            let behind = match lag {
                u64::MAX => "has not answered the primary yet".to_string(),
                lag => format!("is still {lag} entries behind"),
            };
            ChangeError::Unavailable(format!(
                "node {id} was added as a learner but {behind} at the deadline; it stays a \
                 learner: promote it with `client member promote {id}` once it has caught up"
            ))
        })?;
        self.promote_now(id, deadline).await
    }

    fn same_and_never_ran(&self, view: &View, id: NodeId, member: &Member) -> bool {
        let ran = self.started.read(|a| a.state.started.contains(&id));
        view.members.get(&id) == Some(member) && !ran
    }

    /// A new member's addresses are its own: no other member's, and not one for both.
    fn check_new_addresses(&self, view: &View, member: &Member) -> Result<(), ChangeError> {
        for (other, m) in &view.members {
            let known = self.book.addresses(*other, Some(m));
            let taken = [&known.addr, &known.peer_addr, &m.addr, &m.peer_addr];
            for addr in [&member.addr, &member.peer_addr] {
                if taken.contains(&addr) {
                    return Err(ChangeError::AlreadyExists(format!(
                        "address {addr} is already node {other}'s"
                    )));
                }
            }
        }
        if member.addr == member.peer_addr {
            return Err(ChangeError::Invalid(
                "addr and peer_addr must differ: clients and peers use separate listeners".into(),
            ));
        }
        Ok(())
    }

    async fn promote(
        &self,
        view: &View,
        id: NodeId,
        deadline: Instant,
    ) -> Result<Done, ChangeError> {
        match view.role(id) {
            None => return Err(not_a_member(id)),
            Some(Role::Voter) => {
                return Err(ChangeError::Precondition(format!(
                    "node {id} is already a voter"
                )))
            }
            Some(Role::Learner) => {}
        }
        self.caught_up(id, deadline).await.map_err(|lag| {
            ChangeError::Precondition(match lag {
                u64::MAX => format!(
                    "node {id} has not answered the primary yet: a voter that does not run \
                     would count against every quorum"
                ),
                lag => format!(
                    "node {id} is {lag} entries behind the primary; it is promoted once it has \
                     caught up, so that it does not slow every commit"
                ),
            })
        })?;
        self.promote_now(id, deadline).await
    }

    async fn promote_now(&self, id: NodeId, deadline: Instant) -> Result<Done, ChangeError> {
        let ids = BTreeSet::from([id]);
        self.write(
            deadline,
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(ids), false),
        )
        .await?;
        tracing::info!(node = self.id, member = id, "promoted to voter");
        Ok(Done::Members(self.listing()))
    }

    async fn remove(
        &self,
        view: &View,
        id: NodeId,
        force: bool,
        deadline: Instant,
    ) -> Result<Done, ChangeError> {
        let change = match view.role(id) {
            None => return Err(not_a_member(id)),
            Some(Role::Learner) => ChangeMembers::RemoveNodes(BTreeSet::from([id])),
            Some(Role::Voter) => {
                let left: BTreeSet<NodeId> =
                    view.voters.iter().filter(|v| **v != id).copied().collect();
                if left.is_empty() {
                    return Err(ChangeError::Precondition(format!(
                        "node {id} is the last voter: a cluster needs one"
                    )));
                }
                if id == self.id {
                    // The primary hands over first; the route then retries the removal at
                    // the new primary.
                    self.transfer.hand_over(view, None, deadline).await?;
                    return Err(ChangeError::NotPrimary);
                }
                let reachable = self.reachable(&left).await;
                let quorum = left.len() / 2 + 1;
                if reachable.len() < quorum && !force {
                    return Err(ChangeError::Precondition(format!(
                        "removing node {id} leaves voters {left:?}, of which only {reachable:?} \
                         answer now: fewer than the {quorum} a quorum needs, so the cluster \
                         would stop. Bring voters back first, or pass --force"
                    )));
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            }
        };
        let peer = self.book.peers().get(id);
        let removed = self
            .write(deadline, self.raft.change_membership(change, false))
            .await?;
        tracing::info!(node = self.id, member = id, "removed from the membership");
        // It never hears the membership without it (nothing is sent to a non-member), so
        // it would campaign on forever: tell it, if it answers.
        if let Some(peer) = peer {
            self.notify_removed(&peer, id, removed.log_id.index).await;
        }
        Ok(Done::Members(self.listing()))
    }

    async fn tell_removed(&self, id: NodeId, index: u64) {
        // Its client may be gone with its membership: dial it from the config if need be.
        let peer = self.book.peers().get(id).or_else(|| {
            let addr = self.book.addresses(id, None).peer_addr;
            (!addr.is_empty() && self.book.peers().add(id, &addr).is_ok())
                .then(|| self.book.peers().get(id))
                .flatten()
        });
        if let Some(peer) = peer {
            self.notify_removed(&peer, id, index).await;
        }
    }

    async fn notify_removed(&self, peer: &crate::peer::PeerClient, id: NodeId, index: u64) {
        let notice = RemovedNotice { by: self.id, index };
        if let Err(e) = peer
            .call::<messages::Removed>(&notice, self.ping_timeout)
            .await
        {
            tracing::info!(node = self.id, member = id, error = %e, "could not tell the removed node");
        }
    }

    /// The voters among `ids` that answer a ping now (this node counts itself).
    async fn reachable(&self, ids: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let pings = ids.iter().map(|id| async move {
            if *id == self.id {
                return Some(*id);
            }
            let peer = self.book.peers().get(*id)?;
            peer.ping(self.ping_timeout).await.ok().map(|_| *id)
        });
        futures::future::join_all(pings)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Waits until `id` holds the primary's last log index; the lag left at `deadline` if not.
    async fn caught_up(&self, id: NodeId, deadline: Instant) -> Result<(), u64> {
        loop {
            let lag = self.lag(id);
            if lag <= CAUGHT_UP_LAG {
                return Ok(());
            }
            if Instant::now() + POLL >= deadline {
                return Err(lag);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Entries `id` is behind the primary; `u64::MAX` if it has acknowledged nothing yet (a
    /// node nobody runs must never pass for caught up).
    fn lag(&self, id: NodeId) -> u64 {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten());
        match matched {
            Some(l) => last.saturating_sub(l.index),
            None => u64::MAX,
        }
    }

    /// One membership write, by `deadline`.
    async fn write<T>(
        &self,
        deadline: Instant,
        write: impl std::future::Future<
            Output = Result<T, RaftError<NodeId, ClientWriteError<NodeId, Member>>>,
        >,
    ) -> Result<T, ChangeError> {
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(ChangeError::NotPrimary)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(match e {
                    ChangeMembershipError::LearnerNotFound(_) => {
                        ChangeError::NotFound(e.to_string())
                    }
                    // Also a primary just elected, until it commits an entry of its term.
                    ChangeMembershipError::InProgress(_) => ChangeError::Precondition(format!(
                        "another membership change is in progress; try again in a moment ({e})"
                    )),
                    _ => ChangeError::Precondition(e.to_string()),
                })
            }
            Ok(Err(e)) => Err(ChangeError::Unavailable(format!("membership change: {e}"))),
            Err(_) => Err(ChangeError::Unavailable(
                "the membership change did not commit by the deadline; `client member list` \
                 shows whether it took effect"
                    .into(),
            )),
        }
    }

    /// The membership in force with each member's progress, as this (primary) node sees it.
    pub fn listing(&self) -> Listing {
        let view = self.book.view();
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let replication: BTreeMap<NodeId, u64> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        let members = view
            .members
            .iter()
            .map(|(id, member)| {
                let matched = if *id == self.id {
                    last
                } else {
                    replication.get(id).copied().unwrap_or(0)
                };
                Listed {
                    id: *id,
                    member: self.book.addresses(*id, Some(member)),
                    voter: view.voters.contains(id),
                    primary: m.current_leader == Some(*id),
                    matched,
                    lag: last.saturating_sub(matched),
                }
            })
            .collect();
        Listing {
            primary: self.id,
            members,
            index: view.index.unwrap_or(0),
            changing: view.joint,
        }
    }
}

fn not_a_member(id: NodeId) -> ChangeError {
    ChangeError::NotFound(format!("node {id} is not a member"))
}
