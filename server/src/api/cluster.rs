//! `sequencer.v1.Cluster`: how this node sees the cluster.

use std::time::Duration;

use sequencer_proto::v1::cluster_server::Cluster;
use sequencer_proto::v1::{NodeStatus, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use super::wire_id;
use crate::membership::Book;
use crate::peer::Progress;
use crate::raft::store::CommitIndex;
use crate::raft::{Member, NodeId, Raft};

/// How long Status waits for each peer's ping.
const PING_TIMEOUT: Duration = Duration::from_millis(300);

/// The Cluster service; the node builds it as a struct literal.
pub struct ClusterApi {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    pub(crate) commit: CommitIndex,
    pub(crate) book: Book,
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let m = self.raft.metrics().borrow().clone();
        // A node whose Raft has stopped serves nothing, whatever it last heard.
        let stopped = m.running_state.is_err();
        let leader = if stopped { None } else { m.current_leader };
        let view = self.book.view();
        // The members, then the config's entries the membership does not list (before the
        // first membership, a fresh node lists its config).
        let mut listed: Vec<(NodeId, Member, &str)> = view
            .members
            .iter()
            .map(|(id, member)| {
                let role = view.role(*id).map_or("learner", |r| r.name());
                (*id, self.book.addresses(*id, Some(member)), role)
            })
            .collect();
        for n in self.book.configured() {
            if !view.members.contains_key(&n.id) {
                let addrs = self.book.addresses(n.id, None);
                listed.push((n.id, addrs, NOT_A_MEMBER));
            }
        }
        listed.sort_by_key(|(id, _, _)| *id);
        let own = Progress {
            node: self.id,
            term: m.current_term,
            commit_index: self.commit.get().unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        };
        let pings = listed.iter().map(|(id, _, _)| async move {
            match self.book.peers().get(*id) {
                None if *id == self.id && !stopped => Some(own),
                None => None,
                Some(p) => p.ping(PING_TIMEOUT).await.ok(),
            }
        });
        let progress = futures::future::join_all(pings).await;
        // How far the primary has committed, as it reported just now.
        let primary_commit = listed
            .iter()
            .zip(&progress)
            .find(|((id, _, _), _)| leader == Some(*id))
            .and_then(|(_, p)| p.map(|p| p.commit_index));
        let nodes = listed
            .into_iter()
            .zip(progress)
            .map(|((id, member, role), progress)| NodeStatus {
                id: wire_id(id),
                addr: member.addr,
                peer_addr: member.peer_addr,
                reachable: progress.is_some(),
                primary: leader == Some(id),
                role: role.into(),
                term: progress.map(|p| p.term),
                commit_index: progress.map(|p| p.commit_index),
                applied_index: progress.map(|p| p.applied_index),
                lag: progress
                    .zip(primary_commit)
                    .map(|(p, commit)| commit.saturating_sub(p.applied_index)),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node_id: wire_id(self.id),
            primary: leader.map(wire_id).unwrap_or(0),
            term: m.current_term,
            commit_index: own.commit_index,
            applied_index: own.applied_index,
            nodes,
            role: if stopped {
                "stopped".into()
            } else {
                format!("{:?}", m.state).to_lowercase()
            },
        }))
    }
}

/// The role of a config entry the membership does not list.
pub const NOT_A_MEMBER: &str = "not a member";
