//! The membership as this node has applied it, and the peer clients kept in step with it.
//!
//! Where a member is reached: at the addresses the membership carries, so a node added or
//! re-added at run time is found by nodes whose config.json never heard of it, or names it
//! at an old address; at this node's config entry while the membership has none (the first
//! membership holds ids only). With `peer_addresses: "config"` the config's entry comes first:
//! for a host that reaches its peers by names or proxies of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NodeConfig};
use crate::peer::PeerClients;
use crate::raft::{Member, NodeId, Raft};

/// A member's part in the membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Voter,
    Learner,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
        }
    }
}

/// The membership in force on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The log index of the membership entry; `None` before the first one.
    pub index: Option<u64>,
    /// Voters of the newest config (in a joint config, the one being moved to).
    pub voters: BTreeSet<NodeId>,
    /// Voters and learners, as the membership names them.
    pub members: BTreeMap<NodeId, Member>,
    /// A change half done: the membership is joint (old and new voters both decide).
    pub joint: bool,
}

impl View {
    pub fn of(raft: &Raft) -> View {
        let m = raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let configs = membership.get_joint_config();
        View {
            index: m.log_id().map(|l| l.index),
            voters: configs.last().cloned().unwrap_or_default(),
            members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            joint: configs.len() > 1,
        }
    }

    pub fn role(&self, id: NodeId) -> Option<Role> {
        if self.voters.contains(&id) {
            Some(Role::Voter)
        } else if self.members.contains_key(&id) {
            Some(Role::Learner)
        } else {
            None
        }
    }

    pub fn learners(&self) -> BTreeSet<NodeId> {
        self.members
            .keys()
            .filter(|id| !self.voters.contains(id))
            .copied()
            .collect()
    }
}

/// This node's view of the membership and its address book. Cheap to clone.
#[derive(Clone)]
pub struct Book {
    id: NodeId,
    raft: Raft,
    peers: PeerClients,
    config: Arc<BTreeMap<NodeId, NodeConfig>>,
    /// `peer_addresses: "config"`: this node's config entries come before the membership's.
    config_first: bool,
    /// When this node last became primary (`None` while it is not).
    leader_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How long the primary gives the entry that fills in members' addresses.
const FILL_TIMEOUT: Duration = Duration::from_secs(5);

impl Book {
    pub fn new(id: NodeId, raft: Raft, peers: PeerClients, config: &Config) -> Self {
        let nodes = config.nodes.iter().map(|n| (n.id, n.clone())).collect();
        Self {
            id,
            raft,
            peers,
            config: Arc::new(nodes),
            config_first: config.peers_from_config,
            leader_since: Arc::default(),
        }
    }

    /// When this node became primary, if it is.
    pub fn leader_since(&self) -> Option<std::time::Instant> {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self) -> View {
        View::of(&self.raft)
    }

    /// The peer clients this book keeps in step with the membership.
    pub fn peers(&self) -> &PeerClients {
        &self.peers
    }

    /// Where node `id` is reached: the membership's addresses, or this node's config entry
    /// for `id` where the membership has none yet (the first membership holds ids only) or
    /// where `peer_addresses` is "config" (empty where neither knows).
    pub fn addresses(&self, id: NodeId, member: Option<&Member>) -> Member {
        let configured = self.config.get(&id).map(|n| Member {
            addr: n.addr.clone(),
            peer_addr: n.peer_addr.clone(),
        });
        let known = member.filter(|m| m.has_addresses()).cloned();
        let (first, then) = match self.config_first {
            true => (configured, known),
            false => (known, configured),
        };
        first.or(then).unwrap_or_default()
    }

    /// The config's entries, for the ones the membership does not list.
    pub fn configured(&self) -> impl Iterator<Item = &NodeConfig> {
        self.config.values()
    }

    /// Follows the applied membership until `stop`: dials members it has not dialed, forgets
    /// removed ones, and on the primary fills in addresses the membership lacks.
    pub async fn run(self, stop: CancellationToken) {
        let mut metrics = self.raft.metrics();
        // What PeerClients::new dialed: every other node of the config.
        let mut dialed: HashMap<NodeId, String> = self
            .config
            .values()
            .filter(|n| n.id != self.id)
            .map(|n| (n.id, n.peer_addr.clone()))
            .collect();
        let mut seen: Option<View> = None;
        loop {
            let view = self.view();
            if view.index.is_some() && seen.as_ref() != Some(&view) {
                self.follow(&view, &mut dialed, seen.as_ref());
                seen = Some(view.clone());
            }
            let leader = metrics.borrow().current_leader == Some(self.id);
            {
                let mut since = self.leader_since.lock().unwrap_or_else(|p| p.into_inner());
                match (leader, since.is_some()) {
                    (true, false) => *since = Some(std::time::Instant::now()),
                    (false, true) => *since = None,
                    _ => {}
                }
            }

            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    fn follow(&self, view: &View, dialed: &mut HashMap<NodeId, String>, before: Option<&View>) {
        tracing::info!(
            node = self.id,
            index = view.index,
            voters = ?view.voters,
            learners = ?view.learners(),
            joint = view.joint,
            "membership"
        );
        for (id, member) in view.members.iter().filter(|(id, _)| **id != self.id) {
            let peer_addr = self.addresses(*id, Some(member)).peer_addr;
            if peer_addr.is_empty() {
                tracing::warn!(
                    node = self.id,
                    member = id,
                    "no peer address known for member"
                );
                continue;
            }
            if dialed.get(id) != Some(&peer_addr) {
                match self.peers.add(*id, &peer_addr) {
                    Ok(()) => {
                        tracing::info!(node = self.id, member = id, %peer_addr, "dialing member");
                        dialed.insert(*id, peer_addr);
                    }
                    Err(e) => {
                        tracing::warn!(node = self.id, member = id, error = %e, "bad peer address")
                    }
                }
            }
        }
        let gone: Vec<NodeId> = dialed
            .keys()
            .filter(|id| !view.members.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.peers.remove(id);
            dialed.remove(&id);
            tracing::info!(
                node = self.id,
                member = id,
                "no longer a member; not dialed"
            );
        }
        let was_member = before.is_some_and(|b| b.members.contains_key(&self.id));
        if was_member && !view.members.contains_key(&self.id) {
            tracing::warn!(
                node = self.id,
                "this node is no longer a member of the cluster: it serves nothing and can \
                 be stopped (its data dir is of no further use)"
            );
        }
    }

    /// The first membership holds ids only; the primary writes in the addresses its config
    /// has for them, so that nodes whose config lacks a member can still reach it.
    pub(super) async fn fill_addresses(&self, view: &View) {
        let missing: BTreeMap<NodeId, Member> = view
            .members
            .iter()
            .filter(|(_, m)| !m.has_addresses())
            .map(|(id, m)| (*id, self.addresses(*id, Some(m))))
            .filter(|(_, m)| m.has_addresses())
            .collect();
        if missing.is_empty() || view.joint {
            return;
        }
        let ids: Vec<NodeId> = missing.keys().copied().collect();
        let write = self
            .raft
            .change_membership(ChangeMembers::SetNodes(missing), true);
        match tokio::time::timeout(FILL_TIMEOUT, write).await {
            Ok(Ok(_)) => {
                tracing::info!(node = self.id, members = ?ids, "wrote members' addresses into the membership")
            }
            Ok(Err(e)) => tracing::debug!(node = self.id, error = %e, "filling in addresses"),
            Err(_) => tracing::debug!(node = self.id, "filling in addresses timed out"),
        }
    }
}
