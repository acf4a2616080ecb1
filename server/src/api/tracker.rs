//! `sequencer.v1.Tracker`: clients, groups, members and heartbeats.

use std::time::Duration;

use sequencer_proto::v1::tracker_server::Tracker;
use sequencer_proto::v1::{
    GroupInfo, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, ListGroupsRequest, ListGroupsResponse, ListMembersRequest, ListMembersResponse,
    Member, RegisterRequest, RegisterResponse, UnregisterRequest, UnregisterResponse,
};
use tonic::{Request, Response, Status};

use super::checked_name;
use crate::error::Error;
use crate::raft::state_machine::StateReader;
use crate::state::groups::hash_token;
use crate::state::{Command, GroupLimits, Reply};
use crate::write::liveness::Liveness;
use crate::write::proposer::Proposer;

/// The Tracker service; the node builds it as a struct literal.
pub struct TrackerApi {
    pub(crate) proposer: Proposer,
    pub(crate) reader: StateReader,
    pub(crate) liveness: Liveness,
    pub(crate) limits: GroupLimits,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) failure_timeout: Duration,
}

impl TrackerApi {
    /// Commits a command whose reply is only success or refusal.
    async fn commit_done(&self, cmd: Command) -> Result<(), Status> {
        match self.proposer.commit(cmd).await? {
            Reply::Done(res) => Ok(res.map_err(Error::from)?),
            other => Err(unexpected(other)),
        }
    }

    /// A Join (`join`) or a Leave, its fields checked.
    fn group_change(
        &self,
        join: bool,
        client_id: u64,
        token: &str,
        group: String,
    ) -> Result<Command, Status> {
        let group = checked_name(group, "group name")?;
        let token_hash = hash_token(token);
        Ok(Command::group_change(
            join,
            client_id,
            token_hash,
            group,
            self.limits,
        ))
    }
}

/// A fresh 128-bit secret, hex.
fn new_token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("no randomness for a token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn unexpected(reply: Reply) -> Status {
    Error::Internal(format!("unexpected reply: {reply:?}")).into()
}

fn members(list: Vec<crate::state::groups::Member>) -> Vec<Member> {
    list.into_iter()
        .map(|m| Member {
            client_id: m.client_id,
            name: m.name,
            joined_at_seq: m.joined_at_seq,
        })
        .collect()
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// What every Tracker RPC returns.
type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Tracker for TrackerApi {
    async fn register(&self, req: Request<RegisterRequest>) -> Answer<RegisterResponse> {
        let name = checked_name(req.into_inner().name, "client name")?;
        let token = new_token()?;
        let cmd = Command::Register {
            name,
            token_hash: hash_token(&token),
            limits: self.limits,
        };
        match self.proposer.commit(cmd).await? {
            Reply::Registered(res) => Ok(Response::new(RegisterResponse {
                client_id: res.map_err(Error::from)?,
                token,
                heartbeat_interval_ms: millis(self.heartbeat_interval),
                failure_timeout_ms: millis(self.failure_timeout),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn join(&self, req: Request<JoinRequest>) -> Answer<JoinResponse> {
        let req = req.into_inner();
        let cmd = self.group_change(true, req.client_id, &req.token, req.group)?;
        match self.proposer.commit(cmd).await? {
            Reply::Joined(res) => {
                let j = res.map_err(Error::from)?;
                Ok(Response::new(JoinResponse {
                    next_seq: j.next_seq,
                    members: members(j.members),
                    next_sender_seq: j.next_sender_seq,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Answer<LeaveResponse> {
        let req = req.into_inner();
        let cmd = self.group_change(false, req.client_id, &req.token, req.group)?;
        self.commit_done(cmd)
            .await
            .map(|()| Response::new(LeaveResponse {}))
    }

    async fn unregister(&self, req: Request<UnregisterRequest>) -> Answer<UnregisterResponse> {
        let UnregisterRequest { client_id, token } = req.into_inner();
        let token_hash = hash_token(&token);
        let cmd = Command::Unregister {
            client_id,
            token_hash,
            limits: self.limits,
        };
        self.commit_done(cmd)
            .await
            .map(|()| Response::new(UnregisterResponse {}))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Answer<HeartbeatResponse> {
        let req = req.into_inner();
        self.liveness
            .heartbeat(req.client_id, hash_token(&req.token))
            .await?;
        Ok(Response::new(HeartbeatResponse {
            heartbeat_interval_ms: millis(self.heartbeat_interval),
        }))
    }

    async fn list_groups(&self, _req: Request<ListGroupsRequest>) -> Answer<ListGroupsResponse> {
        let groups = self.reader.read(|a| a.state.groups.list());
        Ok(Response::new(ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|(name, members, next_seq)| GroupInfo {
                    name,
                    members: u32::try_from(members).unwrap_or(u32::MAX),
                    next_seq,
                })
                .collect(),
        }))
    }

    async fn list_members(&self, req: Request<ListMembersRequest>) -> Answer<ListMembersResponse> {
        let group = checked_name(req.into_inner().group, "group name")?;
        match self.reader.read(|a| a.state.groups.members(&group)) {
            Some(list) => Ok(Response::new(ListMembersResponse {
                members: members(list),
            })),
            None => Err(Error::Rejected(crate::state::Rejected::UnknownGroup(group)).into()),
        }
    }
}
