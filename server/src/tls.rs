//! TLS on both listeners, and mutual TLS between peers, from PEM files named in the config.
//!
//! With `tls_cert`/`tls_key` set, node K serves both its listeners over TLS with its own
//! certificate (`{id}` in a path becomes K). Peers then also present that certificate when they
//! call each other, and the peer listener accepts only certificates signed by `tls_ca`: mutual
//! TLS. The client listener asks clients for one only with `tls_client_auth`.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::{Config, TlsFiles};
use crate::error::Error;
use crate::raft::NodeId;

/// One node's TLS material, read from disk.
#[derive(Clone)]
pub struct TlsMaterial {
    identity: Identity,
    ca: Option<Certificate>,
    client_auth: bool,
    /// connection_preface_timeout: a handshake must finish within it. Our listener's preface
    /// deadline is met by the first bytes of a handshake, so without this a client that starts
    /// one and stalls would hold its connection forever.
    handshake_timeout: Duration,
}

impl TlsMaterial {
    /// Reads node `id`'s files; `None` when TLS is off.
    pub fn load(config: &Config, id: NodeId) -> Result<Option<Self>, Error> {
        let Some(files) = &config.tls else {
            return Ok(None);
        };
        let read = |key: &str, path: PathBuf| {
            std::fs::read(&path).map_err(|e| {
                Error::Internal(format!("key `{key}`: cannot read {}: {e}", path.display()))
            })
        };
        let TlsFiles {
            cert,
            key,
            ca,
            client_auth,
        } = files;
        let identity = Identity::from_pem(
            read("tls_cert", for_node(cert, id))?,
            read("tls_key", for_node(key, id))?,
        );
        let ca = match ca {
            Some(ca) => Some(Certificate::from_pem(read("tls_ca", for_node(ca, id))?)),
            None => None,
        };
        let material = Self {
            identity,
            ca,
            client_auth: *client_auth,
            handshake_timeout: config.transport.connection_preface_timeout,
        };
        // tonic parses the PEM only when a listener or channel is built; do it now, so a bad
        // file stops the node before it touches its data dir.
        tonic::transport::Server::builder()
            .tls_config(material.peer_listener())
            .map_err(|e| {
                Error::Internal(format!(
                    "keys `tls_cert`/`tls_key`/`tls_ca`: not a usable certificate, key and CA: {e}"
                ))
            })?;
        Ok(Some(material))
    }

    /// The client listener: this node's certificate; client certificates only if asked for.
    pub fn client_listener(&self) -> ServerTlsConfig {
        let c = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(self.handshake_timeout);
        match (&self.ca, self.client_auth) {
            (Some(ca), true) => c.client_ca_root(ca.clone()),
            _ => c,
        }
    }

    /// The peer listener: only callers with a certificate from the cluster's CA.
    pub fn peer_listener(&self) -> ServerTlsConfig {
        let c = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(self.handshake_timeout);
        match &self.ca {
            Some(ca) => c.client_ca_root(ca.clone()),
            None => c,
        }
    }

    /// Calls to a peer (or, from the launcher, to a node): verify it against the CA, and show
    /// this node's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let c = ClientTlsConfig::new().identity(self.identity.clone());
        match &self.ca {
            Some(ca) => c.ca_certificate(ca.clone()),
            None => c.with_webpki_roots(),
        }
    }
}

/// `path` with `{id}` replaced by the node id.
fn for_node(path: &str, id: NodeId) -> PathBuf {
    PathBuf::from(path.replace("{id}", &id.to_string()))
}

/// An endpoint for `addr`, over TLS when `tls` is given.
pub fn endpoint(addr: &str, tls: Option<&TlsMaterial>) -> Result<Endpoint, Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let bad = |e: String| Error::Internal(format!("address {addr}: {e}"));
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(e.to_string()))?;
    match tls {
        Some(t) => endpoint
            .tls_config(t.client())
            .map_err(|e| bad(format!("TLS: {e}"))),
        None => Ok(endpoint),
    }
}
