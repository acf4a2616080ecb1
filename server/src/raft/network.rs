//! openraft's network: Raft RPCs sent through the peer clients.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{Member, NodeId, TypeConfig};
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
    /// Looked up again while `client` is `None`: the peer may be dialed later.
    peers: PeerClients,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        // A member added a moment ago may not be dialed yet (the address book follows the
        // applied membership): dial what the membership says.
        if self.peers.get(target).is_none() && !node.peer_addr.is_empty() {
            if let Err(e) = self.peers.add(target, &node.peer_addr) {
                tracing::warn!(member = target, error = %e, "bad peer address in the membership");
            }
        }
        let client = self.peers.get(target);
        Connection {
            target,
            appends: client.as_ref().map(PeerClient::append_stream),
            client,
            peers: self.peers.clone(),
        }
    }
}

impl Connection {
    /// The client, looked up again if the peer was not dialed when this connection began.
    fn refresh(&mut self) {
        if self.client.is_none() {
            self.client = self.peers.get(self.target);
            self.appends = self.client.as_ref().map(PeerClient::append_stream);
        }
    }

    async fn send<M, Resp, E>(
        &self,
        req: &M::Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
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

    fn not_in_config<E: std::error::Error>(&self) -> RPCError<NodeId, Member, E> {
        let e = std::io::Error::other(format!("node {} is not in the config", self.target));
        RPCError::Unreachable(Unreachable::new(&e))
    }

    /// The peer returns openraft's own Result, so remote Raft errors survive the trip.
    fn answer<Resp, E: std::error::Error>(
        &self,
        res: Result<Result<Resp, RaftError<NodeId, E>>, PeerError>,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>> {
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
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.refresh();
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
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.refresh();
        self.send::<messages::InstallSnapshot, _, _>(&req, &option)
            .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.refresh();
        self.send::<messages::Vote, _, _>(&req, &option).await
    }
}
