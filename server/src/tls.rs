//! TLS on both listeners, and mutual TLS between peers, from PEM files named in the config.
//!
//! With `tls_cert`/`tls_key` set, node K serves both its listeners over TLS with its own
//! certificate (`{id}` in a path becomes K). Peers then also present that certificate when they
//! call each other, and the peer listener accepts only certificates signed by `tls_ca`: mutual
//! TLS. The client listener asks clients for one only with `tls_client_auth`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::{Config, TlsFiles};
use crate::error::Error;
use crate::raft::NodeId;

/// One node's TLS material, read from disk.
#[derive(Clone)]
pub struct TlsMaterial {
    identity: Identity,
    ca: Option<Certificate>,
    /// The same files as PEM, for the HTTP listener's rustls config.
    pem: Pem,
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
        let pem = Pem {
            cert: read("tls_cert", for_node(cert, id))?,
            key: read("tls_key", for_node(key, id))?,
            ca: match ca {
                Some(ca) => Some(read("tls_ca", for_node(ca, id))?),
                None => None,
            },
        };
        let identity = Identity::from_pem(&pem.cert, &pem.key);
        let ca = pem.ca.as_ref().map(Certificate::from_pem);
        let material = Self {
            identity,
            ca,
            pem,
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

    /// The HTTP listener: as the client listener (its certificate, client certificates only
    /// with `tls_client_auth`), for HTTP/2 and HTTP/1.1.
    pub fn http_listener(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: String| {
            Error::Internal(format!("TLS for the HTTP listener: {what}: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(&self.pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("tls_cert", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.pem.key)
            .map_err(|e| bad("tls_key", e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", e.to_string()))?;
        let builder = match (&self.pem.ca, self.client_auth) {
            (Some(ca), true) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| bad("tls_ca", e.to_string()))?;
                    roots.add(cert).map_err(|e| bad("tls_ca", e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("tls_ca", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("tls_cert/tls_key", e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// How long a TLS handshake may take (connection_preface_timeout).
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
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

/// A node's PEM files as read.
#[derive(Clone)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
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
