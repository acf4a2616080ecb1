//! The peer service: Raft RPCs into openraft, and commands forwarded to the primary.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use sequencer_proto::peer::peer_server::Peer;
use sequencer_proto::peer::{PingRequest, PingResponse, RaftMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::bootstrap;
use crate::liveness::{HeartbeatMsg, Liveness};
use crate::proposer::Proposer;
use crate::raft::codec::{decode, encode};
use crate::raft::election::Election;
use crate::raft::{NodeId, Raft, TypeConfig};
use crate::state::Command;

/// Serves one node's peer address. Never registered on the client listener.
pub struct PeerService {
    id: NodeId,
    raft: Raft,
    proposer: Proposer,
    liveness: Liveness,
    election: Election,
    /// The members this node would bootstrap with, to compare with a fresh peer's.
    members: std::collections::BTreeMap<NodeId, String>,
    /// Turns true when the peer listener stops: open streams end then, or a graceful stop
    /// would wait for them forever.
    stopping: watch::Receiver<bool>,
}

impl PeerService {
    pub fn new(
        id: NodeId,
        raft: Raft,
        proposer: Proposer,
        liveness: Liveness,
        election: Election,
        members: std::collections::BTreeMap<NodeId, String>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            id,
            raft,
            proposer,
            liveness,
            election,
            members,
            stopping,
        }
    }
}

fn parse<T: DeserializeOwned>(req: Request<RaftMessage>) -> Result<T, Status> {
    parse_bytes(&req.into_inner().data)
}

fn parse_bytes<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    decode(data).map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let data = encode(value).map_err(|e| Status::internal(format!("encoding reply: {e}")))?;
    Ok(Response::new(RaftMessage { data }))
}

/// Hands one AppendEntries to Raft and encodes its answer.
async fn append_entries(raft: &Raft, election: &Election, data: &[u8]) -> Result<Vec<u8>, Status> {
    let req: AppendEntriesRequest<TypeConfig> = parse_bytes(data)?;
    let _leader = election.leader_message(req.vote.leader_id().term);
    let resp = raft.append_entries(req).await;
    encode(&resp).map_err(|e| Status::internal(format!("encoding reply: {e}")))
}

/// The answers on a peer stream.
pub(super) type RaftMessageStream = Pin<Box<dyn Stream<Item = Result<RaftMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type AppendEntriesStreamStream = RaftMessageStream;

    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        // One message at a time, in order: each answer follows its request on the stream.
        let state = (
            req.into_inner(),
            self.raft.clone(),
            self.election.clone(),
            self.stopping.clone(),
        );
        let answers = futures::stream::unfold(state, |state| async move {
            let (mut incoming, raft, election, mut stopping) = state;
            let next = tokio::select! {
                next = incoming.message() => next,
                _ = stopping.wait_for(|s| *s) => return None,
            };
            let answer = match next {
                Ok(Some(msg)) => append_entries(&raft, &election, &msg.data)
                    .await
                    .map(|data| RaftMessage { data }),
                Ok(None) => return None,
                Err(status) => Err(status),
            };
            Some((answer, (incoming, raft, election, stopping)))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: VoteRequest<NodeId> = parse(req)?;
        let resp = self.raft.vote(req.clone()).await;
        self.election.vote_answered(&req, &resp);
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = parse(req)?;
        let _leader = self.election.leader_message(req.vote.leader_id().term);
        reply(&self.raft.install_snapshot(req).await)
    }

    async fn propose(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let command: Command = parse(req)?;
        reply(&self.proposer.propose_forwarded(command).await)
    }

    async fn heartbeat(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg: HeartbeatMsg = parse(req)?;
        reply(&self.liveness.heartbeat_here(&msg).await)
    }

    async fn read_index(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        // It carries nothing, but anything else is not from one of ours.
        parse::<()>(req)?;
        reply(&self.proposer.read_index_here().await)
    }

    async fn bootstrap(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let probe: bootstrap::Probe = parse(req)?;
        reply(&bootstrap::answer(self.id, &self.raft, &self.members, &probe).await)
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        // Status counts a peer reachable by its ping: not one whose Raft has stopped.
        if self.raft.metrics().borrow().running_state.is_err() {
            return Err(Status::unavailable(format!(
                "node {}: raft stopped",
                self.id
            )));
        }
        Ok(Response::new(PingResponse {
            node_id: u32::try_from(self.id).unwrap_or(u32::MAX),
        }))
    }
}
