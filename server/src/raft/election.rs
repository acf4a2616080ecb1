//! When to campaign, in place of openraft 0.9's election timer.
//!
//! openraft 0.9 has no pre-vote, keeps one random election timeout per node for its whole life,
//! and a node refused once for a shorter log carries an extra `2 × election_timeout_max` of
//! back-off until its own timer next fires, which can be many failovers later. Measured, that
//! cost up to three seconds of unavailability after losing the primary.
//!
//! So this module drives elections itself (openraft's timer stays on as a fallback):
//! - a follower campaigns once it has heard no leader for the lease (`election_timeout_max`,
//!   the time openraft's voters refuse other candidates) plus a fresh random spread of up to
//!   `election_timeout_max - election_timeout_min`;
//! - a node that refuses a candidate while it has heard no leader for the lease campaigns at
//!   once, at a term above the candidate's, if it is the better candidate: a longer log, or an
//!   equal log and the lower id (so two equals never both escalate).
//!
//! Campaigning early is always safe in Raft; it only spends a term.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::RaftError;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::ServerState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RaftSettings;
use crate::raft::{NodeId, Raft};

/// At most this many terms are spent catching up with one candidate; the timer covers the rest.
const MAX_ROUNDS: u64 = 4;
/// How often the timer looks at the clock.
const TICK: Duration = Duration::from_millis(10);

/// Shared by the peer service, which reports what leaders and candidates say, and the timer.
#[derive(Clone)]
pub struct Election {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    lease: Duration,
    spread: Duration,
    /// Last sign of a live election or leader: a leader's message arriving or answered, a
    /// granted vote, our own campaign, or being the leader.
    activity: Mutex<Activity>,
    /// Leader messages being processed here: while one is, the leader is alive, however slow
    /// this node is (a snapshot install, a slow fsync).
    leader_in_flight: AtomicUsize,
    /// One more than the term this node had when it last asked Raft to campaign (0: never);
    /// it asks again only once Raft has moved past that term, so a stalled Raft never gets a
    /// queue of stale campaigns.
    campaigned_after_term: AtomicU64,
    /// The highest candidate term this node already escalated for, so it does it once.
    escalated_for: AtomicU64,
    /// Campaigns in flight, owned by the node.
    tasks: TaskTracker,
    /// Set once the node is stopping: it starts no election on its way out.
    stopping: AtomicBool,
    /// While the primary hands over to another voter: no campaign of ours until then, or
    /// until a primary other than `from` is seen.
    held: Mutex<Option<Hold>>,
}

#[derive(Clone, Copy)]
struct Hold {
    from: NodeId,
    until: Instant,
}

struct Activity {
    at: Instant,
    /// This round's random share of the wait.
    jitter: Duration,
}

/// Held while a leader's message is processed.
pub struct LeaderMessage<'a>(&'a Election);

impl Drop for LeaderMessage<'_> {
    fn drop(&mut self) {
        self.0.inner.leader_in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

impl Election {
    /// `lease` is openraft's leader lease (`election_timeout_max`); `spread` is
    /// `election_timeout_max - election_timeout_min`.
    /// The lease is `election_timeout_max`, the spread of campaigns the gap between the two
    /// election timeouts.
    pub fn new(id: NodeId, raft: Raft, timing: &RaftSettings, tasks: TaskTracker) -> Self {
        let lease = timing.election_timeout_max;
        let spread = timing.election_timeout_max - timing.election_timeout_min;
        Self {
            inner: Arc::new(Inner {
                id,
                raft,
                lease,
                spread,
                activity: Mutex::new(Activity {
                    at: Instant::now(),
                    // A node just started gives the leader a lease more to find it: its
                    // replication to a peer that was down backs off before retrying.
                    jitter: lease + random_below(spread),
                }),
                leader_in_flight: AtomicUsize::new(0),
                campaigned_after_term: AtomicU64::new(0),
                tasks,
                escalated_for: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                held: Mutex::new(None),
            }),
        }
    }

    /// The primary `from` hands over to another voter: campaign not (nor let openraft's timer)
    /// for `within`, or until another primary is seen, so that the target wins the votes
    /// once the voters' leases lapse.
    pub fn hold_for_handover(&self, from: NodeId, within: Duration) {
        let until = Instant::now() + within;
        *self.inner.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Hold { from, until });
        self.inner.raft.runtime_config().elect(false);
    }

    /// Ends a hold that is over: its time passed, or a primary other than the one handing
    /// over is seen.
    fn release_hold(&self, leader: Option<NodeId>) {
        let mut held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(hold) = *held else { return };
        let moved = leader.is_some_and(|l| l != hold.from);
        if moved || Instant::now() >= hold.until {
            *held = None;
            if !self.inner.stopping.load(Ordering::SeqCst) {
                self.inner.raft.runtime_config().elect(true);
            }
        }
    }

    fn holding(&self) -> bool {
        self.inner
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The target of a hand-over: campaign now, and again each lease while no primary is
    /// seen (with more than three voters the others grant only once their lease lapses).
    pub fn take_over(&self, from: NodeId, rounds: u32) {
        let raft = self.inner.raft.clone();
        let (id, lease) = (self.inner.id, self.inner.lease);
        self.touch();
        self.inner.tasks.spawn(async move {
            for _ in 0..rounds {
                if raft.trigger().elect().await.is_err() {
                    return;
                }
                let mut metrics = raft.metrics();
                let won = tokio::time::timeout(
                    lease + Duration::from_millis(50),
                    metrics.wait_for(|m| matches!(m.current_leader, Some(l) if l != from)),
                )
                .await;
                if won.is_ok() {
                    return;
                }
                tracing::info!(
                    node = id,
                    from,
                    "not elected yet in the hand-over; campaigning again"
                );
            }
        });
    }

    /// openraft's leader lease: `election_timeout_max`.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// This node was removed from the membership: it never campaigns again (it would only
    /// spend terms, since it never hears the membership that removed it).
    pub fn retire(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.raft.runtime_config().elect(false);
    }

    /// Call when an AppendEntries or InstallSnapshot arrives, before Raft processes it, with
    /// the term it was sent in; keep the guard until it is answered. A message from an older
    /// term (a deposed leader) is no sign of a live leader.
    pub fn leader_message(&self, term: u64) -> Option<LeaderMessage<'_>> {
        if term < self.inner.raft.metrics().borrow().current_term {
            return None;
        }
        self.inner.leader_in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Some(LeaderMessage(self))
    }

    /// Called after this node answered a vote request; may start a campaign in the background.
    pub fn vote_answered(
        &self,
        req: &VoteRequest<NodeId>,
        resp: &Result<VoteResponse<NodeId>, RaftError<NodeId>>,
    ) {
        let Ok(resp) = resp else { return };
        if resp.vote_granted {
            // Give the candidate we voted for time to win.
            self.touch();
            return;
        }
        if !self.silent() || self.is_leader() {
            return;
        }
        let me = Standing {
            id: self.inner.id,
            term: resp.vote.leader_id().term,
            last_log: resp.last_log_id,
        };
        let candidate = Standing {
            id: req.vote.leader_id().voted_for().unwrap_or(NodeId::MAX),
            term: req.vote.leader_id().term,
            last_log: req.last_log_id,
        };
        let rounds = rounds_to_outbid(&me, &candidate);
        if rounds == 0
            || self
                .inner
                .escalated_for
                .fetch_max(candidate.term, Ordering::SeqCst)
                >= candidate.term
        {
            return;
        }
        tracing::info!(
            node = self.inner.id,
            candidate = candidate.id,
            candidate_term = candidate.term,
            rounds,
            "refused a weaker candidate with no leader in sight; campaigning now"
        );
        self.campaign(rounds);
    }

    /// The election timer; ends when `stop` is cancelled or Raft has shut down.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => {
                    self.inner.stopping.store(true, Ordering::SeqCst);
                    return;
                }
            }
            let (state, term, leader) = {
                let m = self.inner.raft.metrics();
                let m = m.borrow();
                (m.state, m.current_term, m.current_leader)
            };
            self.release_hold(leader);
            match state {
                ServerState::Shutdown => return,
                ServerState::Leader => self.touch(),
                ServerState::Learner => {}
                ServerState::Follower | ServerState::Candidate => {
                    let settled =
                        term + 1 > self.inner.campaigned_after_term.load(Ordering::SeqCst);
                    if self.due() && settled {
                        tracing::info!(node = self.inner.id, term, "no leader heard; campaigning");
                        self.campaign(1);
                    }
                }
            }
        }
    }

    fn campaign(&self, rounds: u64) {
        if self.inner.stopping.load(Ordering::SeqCst) || self.holding() {
            return;
        }
        let term = self.inner.raft.metrics().borrow().current_term;
        self.inner
            .campaigned_after_term
            .fetch_max(term + 1, Ordering::SeqCst);
        self.touch();
        let raft = self.inner.raft.clone();
        // Owned by the node's tracker, which waits for it on the way out.
        self.inner.tasks.spawn(async move {
            for _ in 0..rounds {
                if raft.trigger().elect().await.is_err() {
                    return;
                }
            }
        });
    }

    fn touch(&self) {
        let mut a = self.activity();
        a.at = Instant::now();
        a.jitter = random_below(self.inner.spread);
    }

    /// No leader for a whole lease: openraft's voters no longer refuse candidates by lease.
    fn silent(&self) -> bool {
        self.inner.leader_in_flight.load(Ordering::SeqCst) == 0
            && self.activity().at.elapsed() > self.inner.lease
    }

    fn due(&self) -> bool {
        if self.inner.leader_in_flight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let a = self.activity();
        a.at.elapsed() > self.inner.lease + a.jitter
    }

    fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().state == ServerState::Leader
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.inner
            .activity
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn random_below(limit: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    // Without randomness every node would wait the same; a fixed share still elects.
    if getrandom::fill(&mut bytes).is_err() {
        return limit / 2;
    }
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(u64::from_le_bytes(bytes) % ms)
}

/// One side of a vote: who, at which term, with which last log id.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    pub id: NodeId,
    pub term: u64,
    pub last_log: Option<crate::raft::LogId>,
}

/// How many times `me` must call `elect` (each adds one to its term) to campaign above a
/// candidate it refused; 0 when `me` is not the better candidate.
pub fn rounds_to_outbid(me: &Standing, candidate: &Standing) -> u64 {
    let better = match me.last_log.cmp(&candidate.last_log) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => me.id < candidate.id,
        std::cmp::Ordering::Less => false,
    };
    if !better || me.term > candidate.term {
        return 0;
    }
    (candidate.term + 1 - me.term).min(MAX_ROUNDS)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;

    fn at(id: NodeId, term: u64, log: Option<(u64, u64)>) -> Standing {
        Standing {
            id,
            term,
            last_log: log.map(|(t, i)| LogId::new(CommittedLeaderId::new(t, 0), i)),
        }
    }

    #[test]
    fn a_longer_log_outbids_the_candidate_term() {
        // Candidate 2 went to term 6 with a log ending at 5-10; we are at term 5 ending 5-11.
        assert_eq!(
            rounds_to_outbid(&at(3, 5, Some((5, 11))), &at(2, 6, Some((5, 10)))),
            2
        );
    }

    #[test]
    fn a_shorter_log_never_campaigns() {
        assert_eq!(
            rounds_to_outbid(&at(1, 5, Some((5, 9))), &at(2, 6, Some((5, 10)))),
            0
        );
        assert_eq!(
            rounds_to_outbid(&at(1, 5, None), &at(2, 6, Some((1, 1)))),
            0
        );
    }

    #[test]
    fn equal_logs_escalate_only_from_the_lower_id() {
        let log = Some((5, 10));
        assert_eq!(rounds_to_outbid(&at(1, 6, log), &at(2, 6, log)), 1);
        assert_eq!(rounds_to_outbid(&at(2, 6, log), &at(1, 6, log)), 0);
    }

    #[test]
    fn a_stale_candidate_is_ignored_and_the_jump_is_capped() {
        assert_eq!(
            rounds_to_outbid(&at(3, 9, Some((5, 11))), &at(2, 6, Some((5, 10)))),
            0
        );
        assert_eq!(
            rounds_to_outbid(&at(3, 1, Some((5, 11))), &at(2, 60, Some((5, 10)))),
            MAX_ROUNDS
        );
    }
}
