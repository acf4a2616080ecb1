//! `sequencer.v1.Cluster`: how this node sees the cluster.

use std::time::Duration;

use sequencer_proto::v1::cluster_server::Cluster;
use sequencer_proto::v1::{NodeStatus, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use super::wire_id;
use crate::config::NodeConfig;
use crate::peer::PeerClients;
use crate::raft::store::CommitIndex;
use crate::raft::{NodeId, Raft};

/// How long Status waits for each peer's ping.
const PING_TIMEOUT: Duration = Duration::from_millis(300);

pub struct ClusterApi {
    id: NodeId,
    raft: Raft,
    commit: CommitIndex,
    peers: PeerClients,
    nodes: Vec<NodeConfig>,
}

impl ClusterApi {
    pub fn new(
        id: NodeId,
        raft: Raft,
        commit: CommitIndex,
        peers: PeerClients,
        nodes: Vec<NodeConfig>,
    ) -> Self {
        Self {
            id,
            raft,
            commit,
            peers,
            nodes,
        }
    }
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
        let pings = self.nodes.iter().map(|n| async move {
            match self.peers.get(n.id) {
                None => n.id == self.id,
                Some(p) => p.ping(PING_TIMEOUT).await.is_ok(),
            }
        });
        let reachable = futures::future::join_all(pings).await;
        let nodes = self
            .nodes
            .iter()
            .zip(reachable)
            .map(|(n, reachable)| NodeStatus {
                id: wire_id(n.id),
                addr: n.addr.clone(),
                peer_addr: n.peer_addr.clone(),
                reachable,
                primary: leader == Some(n.id),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node_id: wire_id(self.id),
            primary: leader.map(wire_id).unwrap_or(0),
            term: m.current_term,
            commit_index: self.commit.get().unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            nodes,
            role: if stopped {
                "stopped".into()
            } else {
                format!("{:?}", m.state).to_lowercase()
            },
        }))
    }
}
