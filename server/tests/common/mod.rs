//! What the integration tests that call the peer service directly share.

use sequencer_proto::peer::peer_client::PeerClient;
use sequencer_proto::peer::RaftMessage;
use sequencer_server::state::{AllocRequest, Command};
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

/// A plaintext client of the peer service at `addr`.
pub async fn peer_client(addr: &str) -> PeerClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PeerClient::new(ch)
}

/// A peer message carrying `data`, with the cluster secret if given.
pub fn message(data: &[u8], secret: Option<&str>) -> Request<RaftMessage> {
    let mut req = Request::new(RaftMessage {
        data: data.to_vec(),
    });
    if let Some(s) = secret {
        req.metadata_mut()
            .insert("x-cluster-secret", s.parse().unwrap());
    }
    req
}

/// A forwarded command that takes `count` ids of "default", encoded as a peer sends it.
pub fn allocate(count: u64) -> Vec<u8> {
    serde_json::to_vec(&Command::Allocate {
        requests: vec![AllocRequest {
            sequence: "default".into(),
            count,
        }],
        max_sequences: 10_000,
    })
    .unwrap()
}
