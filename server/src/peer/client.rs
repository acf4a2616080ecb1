//! Outgoing peer calls: one lazily connected channel per peer, reused for every call.

use std::collections::HashMap;
use std::time::Duration;

use sequencer_proto::peer::peer_client::PeerClient as GrpcPeerClient;
use sequencer_proto::peer::{PingRequest, RaftMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::auth::SecretHeader;
use super::PEER_MESSAGE_LIMIT;
use crate::config::Config;
use crate::raft::codec::{decode, encode};
use crate::raft::NodeId;
use crate::tls::TlsMaterial;

/// Which peer RPC to call.
#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Propose,
    Heartbeat,
    ReadIndex,
}

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection, or it broke: the peer may be down.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The peer answered with an error status.
    #[error("peer {0} refused: {1}")]
    Status(NodeId, tonic::Status),
    /// The bytes did not decode.
    #[error("peer {0} sent an undecodable message: {1}")]
    Codec(NodeId, String),
}

/// A client for one peer.
#[derive(Clone)]
pub struct PeerClient {
    target: NodeId,
    grpc: GrpcPeerClient<Channel>,
    secret: SecretHeader,
}

impl PeerClient {
    /// Sends `req` and decodes the answer, waiting at most `timeout`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: PeerRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let data = encode(req).map_err(|e| PeerError::Codec(self.target, e.to_string()))?;
        let mut request = tonic::Request::new(RaftMessage { data });
        request.set_timeout(timeout);
        self.secret.stamp(request.metadata_mut());
        let mut grpc = self.grpc.clone();
        let res = match rpc {
            PeerRpc::AppendEntries => grpc.append_entries(request).await,
            PeerRpc::Vote => grpc.vote(request).await,
            PeerRpc::InstallSnapshot => grpc.install_snapshot(request).await,
            PeerRpc::Propose => grpc.propose(request).await,
            PeerRpc::Heartbeat => grpc.heartbeat(request).await,
            PeerRpc::ReadIndex => grpc.read_index(request).await,
        };
        let msg = res.map_err(|s| self.status_error(s))?.into_inner();
        decode(&msg.data).map_err(|e| PeerError::Codec(self.target, e.to_string()))
    }

    /// Whether the peer answers at all within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<NodeId, PeerError> {
        let mut request = tonic::Request::new(PingRequest {});
        request.set_timeout(timeout);
        self.secret.stamp(request.metadata_mut());
        let mut grpc = self.grpc.clone();
        let resp = grpc.ping(request).await.map_err(|s| self.status_error(s))?;
        Ok(NodeId::from(resp.into_inner().node_id))
    }

    fn status_error(&self, s: tonic::Status) -> PeerError {
        match s.code() {
            // tonic reports connect failures as UNAVAILABLE and a connection reset mid-call (a
            // peer killed) as UNKNOWN. Our peers never send UNKNOWN themselves.
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled => {
                PeerError::Unreachable(self.target, s.message().to_string())
            }
            _ => PeerError::Status(self.target, s),
        }
    }
}

/// A client for every other node of the config.
#[derive(Clone)]
pub struct PeerClients {
    clients: HashMap<NodeId, PeerClient>,
}

impl PeerClients {
    /// Builds lazy channels; nothing connects until the first call.
    pub fn new(
        config: &Config,
        self_id: NodeId,
        tls: Option<&TlsMaterial>,
    ) -> Result<Self, crate::error::Error> {
        let mut clients = HashMap::new();
        let secret = SecretHeader::new(config.cluster_secret.as_ref())?;
        for n in config.nodes.iter().filter(|n| n.id != self_id) {
            let endpoint = crate::tls::endpoint(&n.peer_addr, tls)?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            let grpc = GrpcPeerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(PEER_MESSAGE_LIMIT)
                .max_encoding_message_size(PEER_MESSAGE_LIMIT);
            clients.insert(
                n.id,
                PeerClient {
                    target: n.id,
                    grpc,
                    secret: secret.clone(),
                },
            );
        }
        Ok(Self { clients })
    }

    /// The client for `id`, if it is a peer of this node.
    pub fn get(&self, id: NodeId) -> Option<&PeerClient> {
        self.clients.get(&id)
    }
}
