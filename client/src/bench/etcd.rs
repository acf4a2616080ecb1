//! `client bench --system etcd`: etcd's Put (get-id: the response's header.revision is the
//! id, as etcd hands out one revision per write) and Maintenance.Status (ping), over the same
//! kind of shared HTTP/2 connections our own callers use.

use std::time::Duration;

use sequencer_proto::etcd::kv_client::KvClient;
use sequencer_proto::etcd::maintenance_client::MaintenanceClient;
use sequencer_proto::etcd::{PutRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint};

/// One caller's handle on an etcd member.
#[derive(Clone)]
pub struct Conn {
    kv: KvClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
    key: Vec<u8>,
}

impl Conn {
    /// A lazily connected channel to the member at `addr` (host:port, plaintext).
    pub fn new(addr: &str, key: &str, deadline: Duration) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .timeout(deadline)
            .connect_lazy();
        Ok(Self {
            kv: KvClient::new(channel.clone()),
            maintenance: MaintenanceClient::new(channel),
            key: key.as_bytes().to_vec(),
        })
    }

    /// A Put; the revision it created.
    pub async fn put(&mut self) -> Result<u64, tonic::Status> {
        let resp = self
            .kv
            .put(PutRequest {
                key: self.key.clone(),
                value: b"x".to_vec(),
            })
            .await?
            .into_inner();
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        u64::try_from(revision)
            .ok()
            .filter(|r| *r > 0)
            .ok_or_else(|| tonic::Status::internal(format!("put returned revision {revision}")))
    }

    pub async fn ping(&mut self) -> Result<(), tonic::Status> {
        self.maintenance.status(StatusRequest {}).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sequencer_proto::etcd::kv_server::{Kv, KvServer};
    use sequencer_proto::etcd::maintenance_server::{Maintenance, MaintenanceServer};
    use sequencer_proto::etcd::{PutResponse, ResponseHeader, StatusResponse};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use tonic::{Request, Response, Status};

    /// Answers like an etcd member: every Put makes a new revision.
    #[derive(Clone, Default)]
    struct FakeEtcd {
        revision: Arc<AtomicI64>,
    }

    #[tonic::async_trait]
    impl Kv for FakeEtcd {
        async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            if req.get_ref().key.is_empty() {
                return Err(Status::invalid_argument("etcdserver: key is not provided"));
            }
            let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Response::new(PutResponse {
                header: Some(ResponseHeader {
                    revision,
                    ..Default::default()
                }),
            }))
        }
    }

    #[tonic::async_trait]
    impl Maintenance for FakeEtcd {
        async fn status(
            &self,
            _req: Request<StatusRequest>,
        ) -> Result<Response<StatusResponse>, Status> {
            Ok(Response::new(StatusResponse {
                header: None,
                version: "3.5.0".into(),
            }))
        }
    }

    #[tokio::test]
    async fn put_takes_the_revision_and_errors_keep_their_code() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fake = FakeEtcd::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(fake.clone()))
                .add_service(MaintenanceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let t = Duration::from_secs(5);
        let mut a = Conn::new(&addr, "bench", t).unwrap();
        let mut b = Conn::new(&addr, "bench", t).unwrap();
        a.ping().await.unwrap();
        assert_eq!(a.put().await.unwrap(), 1);
        assert_eq!(b.put().await.unwrap(), 2);
        let mut keyless = Conn::new(&addr, "", t).unwrap();
        assert_eq!(
            keyless.put().await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut nobody = Conn::new("127.0.0.1:1", "bench", t).unwrap();
        assert_eq!(
            nobody.ping().await.unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }
}
