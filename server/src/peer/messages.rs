//! Every message between nodes, each request paired with its reply in the type system. A call
//! names one [`Message`]: the client encodes its `Req` and decodes its `Resp`, the service
//! decodes the `Req` and encodes the `Resp`, so a mismatched pair fails to compile rather than
//! to decode at run time. They travel as serde bytes inside `RaftMessage`; nothing here is
//! protobuf.

use std::collections::BTreeSet;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::membership::{Call, ChangeError, Done};
use crate::raft::{NodeId, TypeConfig};
use crate::state::{Command, Rejected, Reply};

/// A request type and the reply it gets.
pub trait Message {
    type Req: Serialize + DeserializeOwned + Send + Sync;
    type Resp: Serialize + DeserializeOwned + Send;
}

/// A [`Message`] sent as one unary call of the peer service.
pub trait Unary: Message {
    const RPC: PeerRpc;
}

/// The unary RPCs of the peer service.
#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    Vote,
    InstallSnapshot,
    Propose,
    Heartbeat,
    ReadIndex,
    Bootstrap,
    Admin,
    Campaign,
    Removed,
}

macro_rules! message {
    ($(#[$doc:meta])* $name:ident: $req:ty => $resp:ty $(, unary $rpc:ident)?) => {
        $(#[$doc])*
        pub struct $name;
        impl Message for $name {
            type Req = $req;
            type Resp = $resp;
        }
        $(impl Unary for $name {
            const RPC: PeerRpc = PeerRpc::$rpc;
        })?
    };
}

message!(
    /// Raft's AppendEntries, on the long-lived stream of a leader-to-follower link. The peer
    /// returns openraft's own Result, so remote Raft errors survive the trip.
    AppendEntries: AppendEntriesRequest<TypeConfig> => Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>
);
message!(
    /// Raft's RequestVote.
    Vote: VoteRequest<NodeId> => Result<VoteResponse<NodeId>, RaftError<NodeId>>, unary Vote
);
message!(
    /// Raft's InstallSnapshot, one chunk.
    InstallSnapshot: InstallSnapshotRequest<TypeConfig>
        => Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    unary InstallSnapshot
);
message!(
    /// A command handed to the primary to propose.
    Propose: Command => ProposeOutcome, unary Propose
);
message!(
    /// A client heartbeat passed on to the primary.
    Heartbeat: HeartbeatMsg => HeartbeatOutcome, unary Heartbeat
);
message!(
    /// The primary confirms its leadership with a quorum and names the index a read waits for.
    ReadIndex: ReadIndexRequest => ReadIndexReply, unary ReadIndex
);
message!(
    /// A fresh node asks whether this one ever held Raft state, before it bootstraps.
    Bootstrap: Probe => ProbeReply, unary Bootstrap
);

message!(
    /// A membership call (list, add, promote, remove, transfer) passed on to the primary.
    Admin: Call => AdminOutcome, unary Admin
);
message!(
    /// The primary hands over: the target campaigns at once (Raft's TimeoutNow).
    Campaign: CampaignRequest => CampaignReply, unary Campaign
);

message!(
    /// The primary tells a node it removed: it stops campaigning.
    Removed: RemovedNotice => (), unary Removed
);

/// Sent by the primary to a node it removed from the membership.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemovedNotice {
    pub by: NodeId,
    /// The log index of the membership without it.
    pub index: u64,
}

/// The primary's answer to a forwarded membership call.
pub type AdminOutcome = Result<Done, ChangeError>;

/// Sent by the primary to the voter it hands over to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignRequest {
    pub from: NodeId,
    /// The voter taking over; every other voter holds its own campaigns meanwhile.
    pub to: NodeId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CampaignReply {
    Started,
    Refused(String),
}

/// A command committed and applied on the primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    /// Its log index; wait for it locally before answering.
    pub index: u64,
    /// The primary that committed it.
    pub primary: NodeId,
    /// What the state machine replied.
    pub reply: Reply,
}

/// The answer to a forwarded command.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeOutcome {
    Committed(Committed),
    /// The receiver is not the primary (any more).
    NotPrimary {
        primary: Option<NodeId>,
    },
    /// The primary could not commit it in time.
    Failed(String),
    /// The primary refuses writes: its disk is below the reserve.
    Refused(String),
}

/// A heartbeat as it travels to the primary.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatMsg {
    pub client_id: u64,
    pub token_hash: String,
}

/// The primary's answer to a forwarded heartbeat.
#[derive(Debug, Serialize, Deserialize)]
pub enum HeartbeatOutcome {
    Accepted,
    NotPrimary,
    Rejected(Rejected),
}

/// A ReadIndex carries nothing (it encodes as `null`); anything else is not from one of ours.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadIndexRequest;

/// The index a read must wait for, or `None` if the receiver could not confirm that it is
/// primary.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReadIndexReply(pub Option<u64>);

/// Asked of every configured peer by a fresh node before it bootstraps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// The ids of the members the asking node would bootstrap with.
    pub members: BTreeSet<NodeId>,
}

/// A peer's answer to a [`Probe`], naming who gives it: two ids of a config that reach the
/// same node (a typo, an alias) must not count as two fresh nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReply {
    pub node: NodeId,
    pub answer: Answer,
    /// With `HasState`: the membership the answering node has applied, so that a fresh node
    /// learns whether it is (still) a member.
    #[serde(default)]
    pub members: Option<MembersSeen>,
}

/// A membership as one node has applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersSeen {
    pub index: u64,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Members that have run and announced it: in the applied state, or in an entry of the
    /// log not applied yet (a restarted node replays its log only once a primary is known).
    #[serde(default)]
    pub started: BTreeSet<NodeId>,
}

/// Whether the answering node is fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// No vote, no log, no snapshot, and the same member ids in its config.
    Fresh,
    /// It holds Raft state: a cluster exists (or existed) with it in it.
    HasState,
    /// Fresh, but its config lists other member ids.
    OtherMembers,
}
