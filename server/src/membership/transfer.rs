//! Handing the primary to another voter, as etcd and raft-rs do with TimeoutNow: the primary
//! holds new writes, waits until the target has its last log index, and asks it to campaign
//! at once. The target's log is then as long as any, the old primary grants its vote (its own
//! leader lease has long expired: openraft refreshes it only when it elects), and with three
//! voters those two votes win. With more voters the others refuse any candidate until
//! `election_timeout_max` after they last heard the primary, so the target wins once that
//! lease runs out: slower, never stuck.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::book::{Book, Role, View};
use super::change::ChangeError;
use crate::peer::messages::{self, CampaignReply, CampaignRequest};
use crate::raft::election::Election;
use crate::raft::{NodeId, Raft};

/// Set while the primary is being handed over: the proposer holds new writes, which the one
/// route to the primary retries at whoever is primary next. Cheap to clone.
#[derive(Clone, Default)]
pub struct Handover(Arc<Mutex<Option<NodeId>>>);

impl Handover {
    /// The node the primary is being handed to, if a hand-over is under way.
    pub fn target(&self) -> Option<NodeId> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, to: NodeId) -> Held {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
        Held(self.clone())
    }
}

/// Releases the hold on writes when the hand-over ends, however it ends.
struct Held(Handover);

impl Drop for Held {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// How long a target may take to reach the primary's last index once writes are held.
const CATCH_UP: Duration = Duration::from_secs(2);
const PING: Duration = Duration::from_millis(300);

#[derive(Clone)]
pub struct Transfer {
    id: NodeId,
    raft: Raft,
    election: Election,
    book: Book,
    handover: Handover,
    /// How long the new primary may take to be elected: the voters' lease and a campaign.
    elect_within: Duration,
    /// openraft's leader lease (election_timeout_max).
    lease: Duration,
}

/// Beyond the lease, for clocks read at slightly different moments.
const LEASE_MARGIN: Duration = Duration::from_millis(20);

impl Transfer {
    pub fn new(
        id: NodeId,
        raft: Raft,
        election: Election,
        book: Book,
        handover: Handover,
        lease: Duration,
    ) -> Self {
        Self {
            id,
            raft,
            election,
            book,
            handover,
            elect_within: lease * 6,
            lease,
        }
    }

    /// Hands the primary to `to` (or the most up-to-date voter that answers); returns the new
    /// primary and how long writes were held.
    pub async fn hand_over(
        &self,
        view: &View,
        to: Option<NodeId>,
        deadline: Instant,
    ) -> Result<(NodeId, Duration), ChangeError> {
        let to = match to {
            Some(to) => self.check_target(view, to).await?,
            None => self.pick(view).await?,
        };
        let peer =
            self.book.peers().get(to).ok_or_else(|| {
                ChangeError::Precondition(format!("node {to} has no peer address"))
            })?;
        // A primary refuses any candidate for a lease after its own election, like every
        // voter after hearing from a primary: a hand-over just after an election waits it out.
        if let Some(since) = self.book.leader_since() {
            let ready = Instant::from_std(since) + self.lease + LEASE_MARGIN;
            if ready > deadline {
                return Err(ChangeError::Unavailable(
                    "this primary was elected a moment ago and cannot hand over before the \
                     deadline"
                        .into(),
                ));
            }
            tokio::time::sleep_until(ready).await;
        }
        let started = Instant::now();
        let _held = self.handover.hold(to);
        tracing::info!(node = self.id, to, "handing the primary over: writes held");
        let catch_up = deadline.min(started + CATCH_UP);
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout_at(catch_up, async {
            metrics
                .wait_for(|m| matched(m.replication.as_ref(), to) >= m.last_log_index.unwrap_or(0))
                .await
                .map(|_| ())
        })
        .await;
        if !matches!(caught_up, Ok(Ok(_))) {
            return Err(ChangeError::Unavailable(format!(
                "node {to} did not catch up with the primary within {} ms; the primary stays",
                CATCH_UP.as_millis()
            )));
        }
        // Every voter holds its own campaigns, this one too (it is a follower once it grants
        // the target its vote), and the target campaigns until it wins.
        self.election.hold_for_handover(self.id, self.elect_within);
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(PING * 3);
        let ask = CampaignRequest { from: self.id, to };
        let others = view.voters.iter().filter(|v| **v != self.id && **v != to);
        let holds = others.filter_map(|v| self.book.peers().get(*v)).map(|p| {
            let ask = ask.clone();
            async move { p.call::<messages::Campaign>(&ask, wait).await }
        });
        futures::future::join_all(holds).await;
        match peer.call::<messages::Campaign>(&ask, wait).await {
            Ok(CampaignReply::Started) => {}
            Ok(CampaignReply::Refused(why)) => {
                return Err(ChangeError::Precondition(format!(
                    "node {to} refused to campaign: {why}"
                )))
            }
            Err(e) => return Err(ChangeError::Unavailable(e.to_string())),
        }
        let elected = deadline.min(Instant::now() + self.elect_within);
        let moved = tokio::time::timeout_at(elected, async {
            metrics
                .wait_for(|m| matches!(m.current_leader, Some(l) if l != self.id))
                .await
                .map(|m| m.current_leader)
        })
        .await;
        match moved {
            Ok(Ok(leader)) => {
                let new = leader.unwrap_or(to);
                let took = started.elapsed();
                tracing::info!(
                    node = self.id,
                    to = new,
                    took_ms = took.as_millis() as u64,
                    "primary handed over"
                );
                Ok((new, took))
            }
            _ => Err(ChangeError::Unavailable(format!(
                "node {to} was asked to take over but no new primary was seen within {} ms",
                self.elect_within.as_millis()
            ))),
        }
    }

    async fn check_target(&self, view: &View, to: NodeId) -> Result<NodeId, ChangeError> {
        match view.role(to) {
            None => Err(ChangeError::NotFound(format!("node {to} is not a member"))),
            Some(Role::Learner) => Err(ChangeError::Precondition(format!(
                "node {to} is a learner: only a voter can be primary (promote it first)"
            ))),
            Some(Role::Voter) if to == self.id => Err(ChangeError::Precondition(format!(
                "node {to} is already the primary"
            ))),
            Some(Role::Voter) if !self.answers(to).await => Err(ChangeError::Precondition(
                format!("node {to} does not answer: it cannot take over"),
            )),
            Some(Role::Voter) => Ok(to),
        }
    }

    /// The voter with the longest log among those that answer.
    async fn pick(&self, view: &View) -> Result<NodeId, ChangeError> {
        let m = self.raft.metrics().borrow().clone();
        let mut best: Option<(u64, NodeId)> = None;
        for id in view.voters.iter().filter(|v| **v != self.id) {
            if !self.answers(*id).await {
                continue;
            }
            let have = matched(m.replication.as_ref(), *id);
            if best.is_none_or(|(b, _)| have > b) {
                best = Some((have, *id));
            }
        }
        best.map(|(_, id)| id).ok_or_else(|| {
            ChangeError::Precondition("no other voter answers: nobody can take over".into())
        })
    }

    async fn answers(&self, id: NodeId) -> bool {
        match self.book.peers().get(id) {
            Some(p) => p.ping(PING).await.is_ok(),
            None => false,
        }
    }
}

/// The last index the primary knows `id` holds.
fn matched(replication: Option<&BTreeMap<NodeId, Option<crate::raft::LogId>>>, id: NodeId) -> u64 {
    replication
        .and_then(|r| r.get(&id).cloned().flatten())
        .map_or(0, |l| l.index)
}

/// On a voter the primary hands over from: the target campaigns (until it wins), every
/// other voter holds its own campaigns meanwhile.
pub fn campaign(
    id: NodeId,
    raft: &Raft,
    election: &Election,
    req: &CampaignRequest,
    within: Duration,
) -> CampaignReply {
    let m = raft.metrics().borrow().clone();
    if req.to != id {
        election.hold_for_handover(req.from, within);
        return CampaignReply::Started;
    }
    if m.current_leader == Some(id) {
        return CampaignReply::Refused("it is the primary already".into());
    }
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == id)
    {
        return CampaignReply::Refused("it is not a voter".into());
    }
    tracing::info!(
        node = id,
        from = req.from,
        "asked to take over as primary: campaigning"
    );
    election.take_over(req.from, TAKE_OVER_ROUNDS);
    CampaignReply::Started
}

/// How many times a hand-over's target campaigns before it gives up.
const TAKE_OVER_ROUNDS: u32 = 6;
