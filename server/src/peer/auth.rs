//! Peer authentication: every peer RPC carries the cluster secret in one header, checked
//! before the message is even decoded, so a stranger's RPC changes nothing.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use std::sync::{Arc, OnceLock};

use crate::config::ClusterSecret;
use crate::error::Error;
use crate::raft::state_machine::StateReader;

/// The header that carries the secret.
pub const SECRET_HEADER: &str = "x-cluster-secret";
/// The header that carries the cluster's incarnation (`State::incarnation`), when it has one.
pub const INCARNATION_HEADER: &str = "x-cluster-incarnation";

/// This node's incarnation, from its applied state. Shared by every clone.
#[derive(Clone, Default)]
pub struct Incarnation(Arc<IncarnationInner>);

#[derive(Default)]
struct IncarnationInner {
    reader: OnceLock<StateReader>,
    /// Once the state has one it never changes (only a restore or a force, on a stopped
    /// node, makes one), so the peer RPCs of the hot path read it here, not under the
    /// state's lock.
    known: OnceLock<AsciiMetadataValue>,
}

impl Incarnation {
    /// Reads the incarnation from `reader` from now on.
    pub fn follow(&self, reader: StateReader) {
        let _ = self.0.reader.set(reader);
    }

    fn get(&self) -> Option<&AsciiMetadataValue> {
        if let Some(v) = self.0.known.get() {
            return Some(v);
        }
        let value = self
            .0
            .reader
            .get()?
            .read(|a| a.state.incarnation.clone())?
            .parse()
            .ok()?;
        Some(self.0.known.get_or_init(|| value))
    }
}

/// The peer listener's gate.
#[derive(Clone)]
pub struct RequireSecret {
    secret: Option<ClusterSecret>,
    incarnation: Incarnation,
}

impl RequireSecret {
    /// With no secret (a one-node cluster has no peers) every peer RPC is refused. A node
    /// whose cluster was rebuilt (`incarnation`) also refuses callers of another one.
    pub fn new(secret: Option<ClusterSecret>, incarnation: Incarnation) -> Self {
        Self {
            secret,
            incarnation,
        }
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req.metadata().get(SECRET_HEADER).map(|v| v.as_bytes());
        let refusal = match (&self.secret, presented) {
            (Some(secret), Some(p)) if secret.matches(p) => match self.incarnation.get() {
                Some(ours)
                    if req.metadata().get(INCARNATION_HEADER).map(|v| v.as_bytes())
                        != Some(ours.as_bytes()) =>
                {
                    "peer RPC from a node of another incarnation of this cluster (the cluster \
                     was restored or forced anew; wipe that node and let it --join)"
                }
                _ => return Ok(req),
            },
            (None, _) => "this node has no peers (no cluster_secret is configured)",
            (Some(_), None) => "peer RPC without the cluster secret",
            (Some(_), Some(_)) => "peer RPC with a wrong cluster secret",
        };
        tracing::debug!(remote = ?req.remote_addr(), refusal, "refused a peer RPC");
        Err(Error::PeerUnauthenticated(refusal.into()).into())
    }
}

/// Adds the secret, and the incarnation if there is one, to outgoing peer calls.
#[derive(Clone)]
pub struct SecretHeader(Option<AsciiMetadataValue>, Incarnation);

impl SecretHeader {
    pub fn new(secret: Option<&ClusterSecret>, incarnation: Incarnation) -> Result<Self, Error> {
        let value = secret
            .map(|s| {
                s.expose()
                    .parse()
                    .map_err(|_| Error::Internal("cluster_secret is not a valid header".into()))
            })
            .transpose()?;
        Ok(Self(value, incarnation))
    }

    pub fn stamp(&self, metadata: &mut MetadataMap) {
        if let Some(v) = &self.0 {
            metadata.insert(SECRET_HEADER, v.clone());
        }
        if let Some(v) = self.1.get() {
            metadata.insert(INCARNATION_HEADER, v.clone());
        }
    }
}
