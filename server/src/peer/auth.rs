//! Peer authentication: every peer RPC carries the cluster secret in one header, checked
//! before the message is even decoded, so a stranger's RPC changes nothing.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::ClusterSecret;
use crate::error::Error;

/// The header that carries the secret.
pub const SECRET_HEADER: &str = "x-cluster-secret";

/// The peer listener's gate.
#[derive(Clone)]
pub struct RequireSecret {
    secret: Option<ClusterSecret>,
}

impl RequireSecret {
    /// With no secret (a one-node cluster has no peers) every peer RPC is refused.
    pub fn new(secret: Option<ClusterSecret>) -> Self {
        Self { secret }
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req.metadata().get(SECRET_HEADER).map(|v| v.as_bytes());
        let refusal = match (&self.secret, presented) {
            (Some(secret), Some(p)) if secret.matches(p) => return Ok(req),
            (None, _) => "this node has no peers (no cluster_secret is configured)",
            (Some(_), None) => "peer RPC without the cluster secret",
            (Some(_), Some(_)) => "peer RPC with a wrong cluster secret",
        };
        tracing::debug!(remote = ?req.remote_addr(), refusal, "refused a peer RPC");
        Err(Error::PeerUnauthenticated(refusal.into()).into())
    }
}

/// Adds the secret to outgoing peer calls.
#[derive(Clone)]
pub struct SecretHeader(Option<AsciiMetadataValue>);

impl SecretHeader {
    pub fn new(secret: Option<&ClusterSecret>) -> Result<Self, Error> {
        let value = secret
            .map(|s| {
                s.expose()
                    .parse()
                    .map_err(|_| Error::Internal("cluster_secret is not a valid header".into()))
            })
            .transpose()?;
        Ok(Self(value))
    }

    pub fn stamp(&self, metadata: &mut MetadataMap) {
        if let Some(v) = &self.0 {
            metadata.insert(SECRET_HEADER, v.clone());
        }
    }
}
