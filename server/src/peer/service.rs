//! The peer service: Raft RPCs into openraft, and commands forwarded to the primary.

use sequencer_proto::peer::peer_server::Peer;
use sequencer_proto::peer::{PingRequest, PingResponse, RaftMessage};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::messages::{self, Message};
use crate::bootstrap;
use crate::membership::join::Admission;
use crate::membership::{transfer, Membership};
use crate::raft::codec::{decode, encode};
use crate::raft::election::Election;
use crate::raft::state_machine::StateReader;
use crate::raft::store::LogStore;
use crate::raft::{NodeId, Raft};
use crate::write::liveness::Liveness;
use crate::write::proposer::Proposer;

/// Serves one node's peer address. Never registered on the client listener. Built as a
/// struct literal by the node, which owns every part.
pub struct PeerService {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    pub(crate) proposer: Proposer,
    pub(crate) liveness: Liveness,
    pub(crate) election: Election,
    pub(crate) membership: Membership,
    /// This node's applied state: which members have announced that they started.
    pub(crate) reader: StateReader,
    /// The log, for announcements not applied yet.
    pub(crate) log: LogStore,
    /// Raft traffic is refused until a fresh node knows it may take part.
    pub(crate) admission: Admission,
    /// The members this node would bootstrap with, to compare with a fresh peer's.
    pub(crate) members: std::collections::BTreeSet<NodeId>,
    /// Turns true when the peer listener stops: open streams end then, or a graceful stop
    /// would wait for them forever.
    pub(crate) stopping: CancellationToken,
}

impl PeerService {
    /// The members that announced they run: applied here, or in the log beyond what is
    /// applied (counted even if never committed: a node that tried to announce has run).
    async fn started(&self) -> std::collections::BTreeSet<NodeId> {
        use openraft::storage::RaftLogReader;
        let mut started = self.reader.read(|a| a.state.started.clone());
        let m = self.raft.metrics().borrow().clone();
        let from = m.last_applied.map_or(0, |l| l.index + 1);
        if let Some(to) = m.last_log_index.filter(|to| *to >= from) {
            let mut log = self.log.clone();
            if let Ok(entries) = log.try_get_log_entries(from..=to).await {
                for e in entries {
                    if let openraft::EntryPayload::Normal(crate::state::Command::Started { node }) =
                        e.payload
                    {
                        started.insert(node);
                    }
                }
            }
        }
        started
    }

    /// Refuses Raft traffic while a fresh node has not yet found out whether it may join.
    fn admitted(&self) -> Result<(), Status> {
        if self.admission.admitted() {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "node {} has an empty data dir and does not yet know whether it may take part",
            self.id
        )))
    }

    /// A forwarded call's deadline: the forwarding node's, which its grpc-timeout carries,
    /// and never later than one of our own requests'.
    fn deadline<T>(&self, req: &Request<T>) -> Instant {
        let ours = self.proposer.timeout();
        Instant::now() + grpc_timeout(req).map_or(ours, |t| t.min(ours))
    }
}

/// The request of `M`, or INVALID_ARGUMENT: nothing else is from one of ours.
fn parse<M: Message>(req: Request<RaftMessage>) -> Result<M::Req, Status> {
    parse_bytes::<M>(&req.into_inner().data)
}

fn parse_bytes<M: Message>(data: &[u8]) -> Result<M::Req, Status> {
    decode(data).map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

/// The reply of `M`.
fn reply<M: Message>(value: &M::Resp) -> Result<Response<RaftMessage>, Status> {
    let data = encode(value).map_err(|e| Status::internal(format!("encoding reply: {e}")))?;
    Ok(Response::new(RaftMessage { data }))
}

/// Hands one AppendEntries to Raft and encodes its answer.
async fn append_entries(raft: &Raft, election: &Election, data: &[u8]) -> Result<Vec<u8>, Status> {
    let req = parse_bytes::<messages::AppendEntries>(data)?;
    let _leader = election.leader_message(req.vote.leader_id().term);
    let resp: <messages::AppendEntries as Message>::Resp = raft.append_entries(req).await;
    encode(&resp).map_err(|e| Status::internal(format!("encoding reply: {e}")))
}

/// The time left that a call's `grpc-timeout` header gives (gRPC's `<digits><unit>` form).
pub(crate) fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let value = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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
        // Once admitted, a node stays so: checking at the stream's start covers its messages.
        self.admitted()?;
        // One message at a time, in order: each answer follows its request on the stream.
        let state = (
            req.into_inner(),
            self.raft.clone(),
            self.election.clone(),
            self.stopping.clone(),
        );
        let answers = futures::stream::unfold(state, |state| async move {
            let (mut incoming, raft, election, stopping) = state;
            let next = tokio::select! {
                next = incoming.message() => next,
                _ = stopping.cancelled() => return None,
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
        self.admitted()?;
        let req = parse::<messages::Vote>(req)?;
        let resp = self.raft.vote(req.clone()).await;
        self.election.vote_answered(&req, &resp);
        reply::<messages::Vote>(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admitted()?;
        let req = parse::<messages::InstallSnapshot>(req)?;
        let _leader = self.election.leader_message(req.vote.leader_id().term);
        reply::<messages::InstallSnapshot>(&self.raft.install_snapshot(req).await)
    }

    async fn propose(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let deadline = self.deadline(&req);
        let command = parse::<messages::Propose>(req)?;
        reply::<messages::Propose>(&self.proposer.propose_forwarded(command, deadline).await)
    }

    async fn heartbeat(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let deadline = self.deadline(&req);
        let msg = parse::<messages::Heartbeat>(req)?;
        reply::<messages::Heartbeat>(&self.liveness.heartbeat_here(&msg, deadline).await)
    }

    async fn read_index(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let deadline = self.deadline(&req);
        parse::<messages::ReadIndex>(req)?;
        let index = self.proposer.read_index_here(deadline).await;
        reply::<messages::ReadIndex>(&messages::ReadIndexReply(index))
    }

    async fn bootstrap(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let probe = parse::<messages::Bootstrap>(req)?;
        let started = self.started().await;
        let answer = bootstrap::answer(self.id, &self.raft, &started, &self.members, &probe).await;
        reply::<messages::Bootstrap>(&answer)
    }

    async fn admin(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        // The forwarding node checked the caller; the secret proves the forwarding node.
        let deadline = Instant::now() + crate::api::admin::deadline_of(&req);
        let call = parse::<messages::Admin>(req)?;
        reply::<messages::Admin>(&self.membership.here(&call, deadline).await)
    }

    async fn campaign(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = parse::<messages::Campaign>(req)?;
        let within = self.election.lease() * 6;
        let answer = transfer::campaign(self.id, &self.raft, &self.election, &req, within);
        reply::<messages::Campaign>(&answer)
    }

    async fn removed(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let notice = parse::<messages::Removed>(req)?;
        tracing::warn!(
            node = self.id,
            by = notice.by,
            index = notice.index,
            "this node was removed from the cluster: it no longer campaigns, and serves \
             nothing; stop it (its data dir is of no further use)"
        );
        self.election.retire();
        reply::<messages::Removed>(&())
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        // Status counts a peer reachable by its ping: not one whose Raft has stopped.
        let (stopped, term, applied) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let applied = m.last_applied.map_or(0, |l| l.index);
            (m.running_state.is_err(), m.current_term, applied)
        };
        if stopped {
            return Err(Status::unavailable(format!(
                "node {}: raft stopped",
                self.id
            )));
        }
        Ok(Response::new(PingResponse {
            node_id: u32::try_from(self.id).unwrap_or(u32::MAX),
            term,
            commit_index: self.log.commit_index().get().unwrap_or(0),
            applied_index: applied,
        }))
    }
}
