//! Outgoing peer calls: one lazily connected channel per peer, reused for every call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sequencer_proto::peer::peer_client::PeerClient as GrpcPeerClient;
use sequencer_proto::peer::{PingRequest, RaftMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use super::auth::{Incarnation, SecretHeader};
use super::messages::{Message, PeerRpc, Unary};
use super::PEER_MESSAGE_LIMIT;
use crate::config::Config;
use crate::raft::codec::{decode, encode};
use crate::raft::NodeId;
use crate::tls::TlsMaterial;

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

/// What a peer's ping says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub node: NodeId,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
}

impl PeerClient {
    /// Sends `req` as `M` and decodes its reply, waiting at most `timeout`.
    pub async fn call<M: Unary>(
        &self,
        req: &M::Req,
        timeout: Duration,
    ) -> Result<M::Resp, PeerError> {
        let data = encode(req).map_err(|e| PeerError::Codec(self.target, e.to_string()))?;
        let mut request = tonic::Request::new(RaftMessage { data });
        request.set_timeout(timeout);
        self.secret.stamp(request.metadata_mut());
        let mut grpc = self.grpc.clone();
        let res = match M::RPC {
            PeerRpc::Vote => grpc.vote(request).await,
            PeerRpc::InstallSnapshot => grpc.install_snapshot(request).await,
            PeerRpc::Propose => grpc.propose(request).await,
            PeerRpc::Heartbeat => grpc.heartbeat(request).await,
            PeerRpc::ReadIndex => grpc.read_index(request).await,
            PeerRpc::Bootstrap => grpc.bootstrap(request).await,
            PeerRpc::Admin => grpc.admin(request).await,
            PeerRpc::Campaign => grpc.campaign(request).await,
            PeerRpc::Removed => grpc.removed(request).await,
        };
        let msg = res.map_err(|s| self.status_error(s))?.into_inner();
        decode(&msg.data).map_err(|e| PeerError::Codec(self.target, e.to_string()))
    }

    /// The node this client calls.
    pub fn target(&self) -> NodeId {
        self.target
    }

    /// Whether the peer answers at all within `timeout`, and how far it is.
    pub async fn ping(&self, timeout: Duration) -> Result<Progress, PeerError> {
        let mut request = tonic::Request::new(PingRequest {});
        request.set_timeout(timeout);
        self.secret.stamp(request.metadata_mut());
        let mut grpc = self.grpc.clone();
        let resp = grpc.ping(request).await.map_err(|s| self.status_error(s))?;
        let r = resp.into_inner();
        Ok(Progress {
            node: NodeId::from(r.node_id),
            term: r.term,
            commit_index: r.commit_index,
            applied_index: r.applied_index,
        })
    }

    /// A stream of AppendEntries to this peer, opened on its first message.
    pub fn append_stream(&self) -> AppendStream {
        AppendStream {
            client: self.clone(),
            open: None,
        }
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

/// AppendEntries over one long-lived stream, one message in flight: each answer is the next
/// message back. After any failure or timeout the stream is dropped, so a late answer can
/// never be taken for the next one, and the next call opens a fresh stream.
pub struct AppendStream {
    client: PeerClient,
    open: Option<(mpsc::Sender<RaftMessage>, Streaming<RaftMessage>)>,
}

impl AppendStream {
    /// Sends `req` as `M` and waits at most `timeout` for its reply.
    pub async fn call<M: Message>(
        &mut self,
        req: &M::Req,
        timeout: Duration,
    ) -> Result<M::Resp, PeerError> {
        let target = self.client.target;
        let data = encode(req).map_err(|e| PeerError::Codec(target, e.to_string()))?;
        let res = match tokio::time::timeout(timeout, self.exchange(data)).await {
            Ok(res) => res,
            Err(_) => Err(PeerError::Unreachable(
                target,
                format!("no answer within {} ms", timeout.as_millis()),
            )),
        };
        if res.is_err() {
            self.open = None;
        }
        decode(&res?).map_err(|e| PeerError::Codec(target, e.to_string()))
    }

    async fn exchange(&mut self, data: Vec<u8>) -> Result<Vec<u8>, PeerError> {
        let target = self.client.target;
        let closed = || PeerError::Unreachable(target, "append stream closed".into());
        let msg = RaftMessage { data };
        let answers = match self.open.as_mut() {
            Some((tx, answers)) => {
                tx.send(msg).await.map_err(|_| closed())?;
                answers
            }
            None => {
                // Room for the one message in flight, queued before the stream opens.
                let (tx, rx) = mpsc::channel(1);
                tx.try_send(msg).map_err(|_| closed())?;
                let mut request = tonic::Request::new(ReceiverStream::new(rx));
                self.client.secret.stamp(request.metadata_mut());
                let mut grpc = self.client.grpc.clone();
                let answers = grpc
                    .append_entries_stream(request)
                    .await
                    .map_err(|s| self.client.status_error(s))?
                    .into_inner();
                &mut self.open.insert((tx, answers)).1
            }
        };
        match answers.message().await {
            Ok(Some(msg)) => Ok(msg.data),
            Ok(None) => Err(closed()),
            Err(s) => Err(self.client.status_error(s)),
        }
    }
}

/// A client for every other node of the config.
/// The clients of every peer, shared by every part of the node. Cheap to clone. A peer can
/// be added or removed while the node runs (a membership change), and every route to the
/// primary looks it up at each attempt.
#[derive(Clone)]
pub struct PeerClients {
    clients: Arc<RwLock<HashMap<NodeId, PeerClient>>>,
    secret: SecretHeader,
    incarnation: Incarnation,
    tls: Option<TlsMaterial>,
}

impl PeerClients {
    /// A client for every other node of the config. Channels are lazy: nothing connects
    /// until the first call.
    pub fn new(
        config: &Config,
        self_id: NodeId,
        tls: Option<&TlsMaterial>,
    ) -> Result<Self, crate::error::Error> {
        let incarnation = Incarnation::default();
        let peers = Self {
            clients: Arc::default(),
            secret: SecretHeader::new(config.cluster_secret.as_ref(), incarnation.clone())?,
            incarnation,
            tls: tls.cloned(),
        };
        for n in config.nodes.iter().filter(|n| n.id != self_id) {
            peers.add(n.id, &n.peer_addr)?;
        }
        Ok(peers)
    }

    /// Adds (or readdresses) peer `id` at `peer_addr`; calls in flight to an older address
    /// finish on their own channel.
    pub fn add(&self, id: NodeId, peer_addr: &str) -> Result<(), crate::error::Error> {
        let endpoint = crate::tls::endpoint(peer_addr, self.tls.as_ref())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let grpc = GrpcPeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        let client = PeerClient {
            target: id,
            grpc,
            secret: self.secret.clone(),
        };
        self.clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, client);
        Ok(())
    }

    /// What every call carries of this node's incarnation; the node points it at its state.
    pub fn incarnation(&self) -> &Incarnation {
        &self.incarnation
    }

    /// Forgets peer `id`.
    pub fn remove(&self, id: NodeId) {
        self.clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// The client for `id`, if it is a peer of this node now.
    pub fn get(&self, id: NodeId) -> Option<PeerClient> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sequencer_proto::peer::peer_server::{Peer, PeerServer};
    use sequencer_proto::peer::PingResponse;
    use tokio::sync::Notify;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::peer::service::RaftMessageStream as Answers;

    /// Answers each streamed string with itself; holds "hold" back until released. Stands in
    /// for a peer only to test this transport; the real peer is in every cluster test.
    #[derive(Clone, Default)]
    struct Echo {
        streams: Arc<AtomicUsize>,
        release: Arc<Notify>,
    }

    #[tonic::async_trait]
    impl Peer for Echo {
        type AppendEntriesStreamStream = Answers;

        async fn append_entries_stream(
            &self,
            req: Request<Streaming<RaftMessage>>,
        ) -> Result<Response<Answers>, Status> {
            self.streams.fetch_add(1, Ordering::SeqCst);
            let state = (req.into_inner(), self.release.clone());
            let answers = futures::stream::unfold(state, |(mut incoming, release)| async move {
                let msg = incoming.message().await.ok().flatten()?;
                if decode::<String>(&msg.data).ok()? == "hold" {
                    release.notified().await;
                }
                Some((Ok(msg), (incoming, release)))
            });
            Ok(Response::new(Box::pin(answers)))
        }
        async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn propose(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn heartbeat(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn read_index(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn bootstrap(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn admin(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn removed(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn campaign(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    async fn serve(echo: Echo) -> PeerClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(echo))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        PeerClient {
            target: 2,
            grpc: GrpcPeerClient::new(channel),
            secret: SecretHeader::new(None, Incarnation::default()).unwrap(),
        }
    }

    const PATIENT: Duration = Duration::from_secs(10);

    /// Strings each way: what the echo peer answers.
    struct Words;
    impl Message for Words {
        type Req = String;
        type Resp = String;
    }

    #[tokio::test]
    async fn appends_share_one_stream_and_each_gets_its_own_answer() {
        let echo = Echo::default();
        let mut stream = serve(echo.clone()).await.append_stream();
        for word in ["a", "b", "c"] {
            let answer = stream
                .call::<Words>(&word.to_string(), PATIENT)
                .await
                .unwrap();
            assert_eq!(answer, word);
        }
        assert_eq!(
            echo.streams.load(Ordering::SeqCst),
            1,
            "one stream for every call"
        );
    }

    #[tokio::test]
    async fn a_late_answer_is_never_taken_for_the_next_call() {
        let echo = Echo::default();
        let mut stream = serve(echo.clone()).await.append_stream();
        let held = stream
            .call::<Words>(&"hold".to_string(), Duration::from_millis(100))
            .await;
        assert!(matches!(held, Err(PeerError::Unreachable(..))), "{held:?}");
        // The old stream may now deliver "hold"; the next call must not see it.
        echo.release.notify_one();
        let answer = stream
            .call::<Words>(&"next".to_string(), PATIENT)
            .await
            .unwrap();
        assert_eq!(answer, "next");
        assert_eq!(
            echo.streams.load(Ordering::SeqCst),
            2,
            "a fresh stream after the timeout"
        );
    }
}
