//! When a node may bootstrap a new cluster: only when every node of the config answers that it
//! has never held any Raft state, and lists the same member ids. (Addresses may differ: each
//! node may reach its peers by names or proxies of its own.)
//!
//! `initialize` on fresh nodes forms a new, empty cluster that counts every sequence from 1
//! again. Run on fresh nodes that are only a majority of the config (a replaced disk beside
//! nodes that are down, a config grown from 3 to 5), it would hand out acknowledged ids a
//! second time. So a fresh node bootstraps only on a unanimous answer; once any node reports
//! a cluster's state, it never does, and waits for that cluster's primary to contact it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Error;
use crate::membership::join::Admission;
use crate::peer::messages::{self, Answer, MembersSeen, Probe, ProbeReply};
use crate::peer::PeerClients;
use crate::raft::{Member, NodeId, Raft};

/// The members a bootstrap uses: the ids of every node of the config. Only ids: each node
/// may reach its peers by names or proxies of its own.
pub fn members(config: &Config) -> BTreeSet<NodeId> {
    config.nodes.iter().map(|n| n.id).collect()
}

/// Whether this node has never held any Raft state: never voted or heard a leader, no log
/// entry or snapshot. Asked of Raft's core, which answers only once it has loaded the store:
/// its metrics start out empty, so a restarting node with state would read as fresh there.
/// A core that cannot answer counts as not fresh.
pub async fn is_fresh(raft: &Raft) -> bool {
    matches!(raft.is_initialized().await, Ok(false))
}

/// This node's answer to a peer's probe.
pub async fn answer(
    id: NodeId,
    raft: &Raft,
    started: &BTreeSet<NodeId>,
    mine: &BTreeSet<NodeId>,
    probe: &Probe,
) -> ProbeReply {
    let (answer, members) = if !is_fresh(raft).await {
        let view = crate::membership::View::of(raft);
        let seen = MembersSeen {
            index: view.index.unwrap_or(0),
            learners: view.learners(),
            voters: view.voters,
            started: started.clone(),
        };
        (Answer::HasState, Some(seen))
    } else if probe.members != *mine {
        (Answer::OtherMembers, None)
    } else {
        (Answer::Fresh, None)
    };
    ProbeReply {
        node: id,
        answer,
        members,
    }
}

/// How often a waiting node asks again.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why this node is not bootstrapping (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    Silent(Vec<NodeId>),
    Mismatch(Vec<NodeId>),
}

/// Bootstraps a new cluster once every configured node answers fresh; returns without doing
/// so if this node already has state, gets state meanwhile (a primary contacted it), or
/// learns that a peer has state. Ends when `stop` turns true.
pub async fn run(
    id: NodeId,
    raft: Raft,
    peers: PeerClients,
    members: BTreeSet<NodeId>,
    admission: &Admission,
    stop: CancellationToken,
) -> Result<(), Error> {
    if !is_fresh(&raft).await {
        admission.admit();
        return Ok(());
    }
    let mut logged: Option<Waiting> = None;
    loop {
        if !is_fresh(&raft).await {
            tracing::info!(
                node = id,
                "this node started with an empty data dir and now holds Raft state: a \
                 primary contacted it"
            );
            return Ok(());
        }
        let probe = Probe {
            members: members.clone(),
        };
        let asks = members.iter().filter(|p| **p != id).map(|p| {
            let probe = probe.clone();
            let peers = &peers;
            async move {
                let reply = match peers.get(*p) {
                    Some(client) => client
                        .call::<messages::Bootstrap>(&probe, PROBE_TIMEOUT)
                        .await
                        .ok(),
                    None => None,
                };
                // An answer from another node than the one asked is no answer of `p`'s.
                let answer = reply.as_ref().map(|r| {
                    if r.node == *p {
                        r.answer
                    } else {
                        Answer::OtherMembers
                    }
                });
                let seen = reply.and_then(|r| r.members);
                (*p, answer, seen)
            }
        });
        let answers = tokio::select! {
            answers = futures::future::join_all(asks) => answers,
            _ = stop.cancelled() => return Ok(()),
        };
        let with_state: Vec<NodeId> = answers
            .iter()
            .filter(|(_, a, _)| *a == Some(Answer::HasState))
            .map(|(p, _, _)| *p)
            .collect();
        // A peer that has just bootstrapped may not show its membership yet: ask again.
        let newest = answers
            .iter()
            .filter_map(|(_, _, seen)| seen.as_ref())
            .filter(|seen| !seen.voters.is_empty())
            .max_by_key(|seen| seen.index);
        if let Some(seen) = newest {
            as_member_of(id, seen)?;
            admission.admit();
            return Ok(());
        }
        if !with_state.is_empty() {
            // Peers too old to say their membership: wait for the primary, as before.
            admission.admit();
            tracing::info!(
                node = id,
                with_state = ?with_state,
                "not bootstrapping a new cluster: node {} already holds a cluster's state. This \
                 node has an empty data dir and waits for that cluster's primary to contact it, \
                 which it does if the cluster's membership lists this node. To start a new \
                 cluster on purpose, every node of the config must start with an empty data dir",
                with_state[0]
            );
            return Ok(());
        }
        let silent: Vec<NodeId> = answers
            .iter()
            .filter(|(_, a, _)| a.is_none())
            .map(|(p, _, _)| *p)
            .collect();
        let mismatch: Vec<NodeId> = answers
            .iter()
            .filter(|(_, a, _)| *a == Some(Answer::OtherMembers))
            .map(|(p, _, _)| *p)
            .collect();
        let waiting = if !silent.is_empty() {
            Some(Waiting::Silent(silent))
        } else if !mismatch.is_empty() {
            Some(Waiting::Mismatch(mismatch))
        } else {
            None
        };
        let Some(waiting) = waiting else {
            admission.admit();
            return initialize(id, &raft, &members).await;
        };
        if logged.as_ref() != Some(&waiting) {
            match &waiting {
                Waiting::Silent(nodes) => tracing::info!(
                    node = id,
                    silent = ?nodes,
                    "this node has an empty data dir; it bootstraps a new cluster only once \
                     every node of the config answers with an empty data dir too, and nodes \
                     {nodes:?} do not answer yet. Start them; if they hold the cluster's data, \
                     this node joins it once they are up"
                ),
                Waiting::Mismatch(nodes) => tracing::info!(
                    node = id,
                    mismatch = ?nodes,
                    "not bootstrapping a new cluster: nodes {nodes:?} list other node ids in \
                     their config, or their address reaches another node; give every node the \
                     same nodes list"
                ),
            }
            logged = Some(waiting);
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// A fresh node beside a cluster that exists: it may go on only as a learner the primary is
/// catching up. A voter with an empty data dir has lost its vote and its log, and voting
/// again could let a minority that lacks acknowledged entries elect a primary; a node the
/// membership does not list would only campaign forever.
fn as_member_of(id: NodeId, seen: &MembersSeen) -> Result<(), Error> {
    let member = seen.learners.contains(&id) || seen.voters.contains(&id);
    if member && (!seen.started.contains(&id) || seen.learners.contains(&id)) {
        tracing::info!(
            node = id,
            "this node has an empty data dir and is a member that never ran (or a learner): \
             it waits for the primary to catch it up"
        );
        return Ok(());
    }
    if seen.voters.contains(&id) {
        return Err(Error::Refused(format!(
            "node {id} has an empty data dir, but the cluster (voters {:?}) lists it as a \
             voter that has run: its vote and log are lost, so it must not vote again. Remove \
             it and join again (`client member remove {id}`, then `server --node {id} --join \
             HOST:PORT`), or start it with `--rejoin HOST:PORT`, which does both",
            seen.voters
        )));
    }
    Err(Error::Refused(format!(
        "node {id} has an empty data dir and the cluster of voters {:?} does not list it: \
         start it with `--join HOST:PORT` (any member's client address) to add it",
        seen.voters
    )))
}

/// Writes the first membership. Every node that got the unanimous answer does it; one that
/// has state meanwhile is refused, harmlessly. openraft gives every node's first entry the
/// same log id, and Raft takes entries with one log id to be the same, so each node must
/// write the very same entry: the member ids only, no addresses (each node's config may
/// reach its peers by other names; the peer network dials what the config says).
async fn initialize(id: NodeId, raft: &Raft, members: &BTreeSet<NodeId>) -> Result<(), Error> {
    let nodes: BTreeMap<NodeId, Member> =
        members.iter().map(|id| (*id, Member::default())).collect();
    match raft.initialize(nodes).await {
        Ok(()) => {
            tracing::info!(
                node = id,
                members = ?members,
                "bootstrapped a new cluster: every node of the config has an empty data dir"
            );
            Ok(())
        }
        Err(openraft::error::RaftError::APIError(e)) => {
            tracing::debug!(node = id, error = %e, "initialize refused; the cluster already exists");
            Ok(())
        }
        Err(e) => Err(Error::Internal(format!("bootstrapping raft: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::raft::network::Network;
    use crate::raft::raft_config;
    use crate::raft::store::{open_store, DataDir};

    async fn start(dir: &std::path::Path, config: &Config) -> (Raft, DataDir) {
        let data = DataDir::lock(dir).unwrap();
        let (log, sm) = open_store(&data).unwrap();
        let peers = PeerClients::new(config, 1, None).unwrap();
        let raft = Raft::new(
            1,
            Arc::new(raft_config(config).unwrap()),
            Network::new(peers),
            log,
            sm,
        )
        .await
        .unwrap();
        (raft, data)
    }

    // One thread: Raft's core, spawned by Raft::new, has not loaded the store yet when the
    // first answer is asked for, and its metrics still read as a node that never held state.
    #[tokio::test(flavor = "current_thread")]
    async fn a_restarted_node_with_state_never_answers_fresh_even_before_raft_has_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_json(r#"{"servers": 1}"#).unwrap();
        {
            let (raft, _data) = start(dir.path(), &config).await;
            assert!(is_fresh(&raft).await);
            initialize(1, &raft, &members(&config)).await.unwrap();
            raft.wait(Some(Duration::from_secs(10)))
                .current_leader(1, "leader")
                .await
                .unwrap();
            raft.shutdown().await.unwrap();
        }
        let (raft, _data) = start(dir.path(), &config).await;
        let probe = Probe {
            members: members(&config),
        };
        let reply = answer(1, &raft, &BTreeSet::new(), &members(&config), &probe).await;
        assert_eq!((reply.node, reply.answer), (1, Answer::HasState));
        raft.shutdown().await.unwrap();
    }
}
