//! openraft's network: Raft RPCs sent through the peer clients.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use super::{NodeId, TypeConfig};
use crate::peer::messages::{self, Unary};
use crate::peer::{AppendStream, PeerClient, PeerClients, PeerError};

/// Hands openraft a connection per target, all sharing the peer channels.
pub struct Network {
    peers: PeerClients,
}

impl Network {
    pub fn new(peers: PeerClients) -> Self {
        Self { peers }
    }
}

/// A connection to one peer.
pub struct Connection {
    target: NodeId,
    client: Option<PeerClient>,
    /// AppendEntries go over a stream; openraft sends them one at a time per connection.
    appends: Option<AppendStream>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        let client = self.peers.get(target);
        Connection {
            target,
            appends: client.as_ref().map(PeerClient::append_stream),
            client,
        }
    }
}

impl Connection {
    async fn send<M, Resp, E>(
        &self,
        req: &M::Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        M: Unary<Resp = Result<Resp, RaftError<NodeId, E>>>,
        E: std::error::Error,
    {
        let Some(client) = &self.client else {
            return Err(self.not_in_config());
        };
        let res = client.call::<M>(req, option.hard_ttl()).await;
        self.answer(res)
    }

    fn not_in_config<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        let e = std::io::Error::other(format!("node {} is not in the config", self.target));
        RPCError::Unreachable(Unreachable::new(&e))
    }

    /// The peer returns openraft's own Result, so remote Raft errors survive the trip.
    fn answer<Resp, E: std::error::Error>(
        &self,
        res: Result<Result<Resp, RaftError<NodeId, E>>, PeerError>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let res = res.map_err(|e| match e {
            PeerError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        })?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let Some(appends) = self.appends.as_mut() else {
            return Err(self.not_in_config());
        };
        let res = appends
            .call::<messages::AppendEntries>(&req, option.hard_ttl())
            .await;
        self.answer(res)
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send::<messages::InstallSnapshot, _, _>(&req, &option)
            .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send::<messages::Vote, _, _>(&req, &option).await
    }
}
