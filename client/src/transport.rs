//! How the client reaches one server: a lazily connected channel, over TLS or not.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::ClientError;

/// How long to wait for a TCP (and TLS) connection before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How to reach servers over TLS: PEM bytes, already read.
#[derive(Clone, Default)]
pub struct Tls {
    /// The CA that signed the servers' certificates; without it, the public web roots.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and key, for servers that require one (`tls_client_auth`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never prints the key.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<certificate and key>"),
            )
            .finish()
    }
}

impl Tls {
    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        c = match &self.ca {
            Some(ca) => c.ca_certificate(Certificate::from_pem(ca)),
            None => c.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            c = c.identity(TlsIdentity::from_pem(cert, key));
        }
        c
    }
}

/// One server the client knows: its address as given, and a channel to it. Cloning shares the
/// channel's connection.
#[derive(Clone)]
pub(crate) struct Server {
    pub(crate) addr: String,
    pub(crate) channel: Channel,
}

impl Server {
    /// A channel to `addr` (`host:port`, or a URI) that connects on its first call.
    /// `rpc_timeout` bounds each request on it.
    pub(crate) fn new(
        addr: &str,
        rpc_timeout: Duration,
        tls: Option<&Tls>,
    ) -> Result<Server, ClientError> {
        Self::build(addr, Some(rpc_timeout), tls)
    }

    /// Like [`Server::new`], but with no timeout of the channel's own: for calls that each
    /// carry their deadline (grpc-timeout) and are cut off by the retry loop.
    pub(crate) fn untimed(addr: &str, tls: Option<&Tls>) -> Result<Server, ClientError> {
        Self::build(addr, None, tls)
    }

    fn build(
        addr: &str,
        rpc_timeout: Option<Duration>,
        tls: Option<&Tls>,
    ) -> Result<Server, ClientError> {
        let addr = addr.trim().to_string();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = if addr.contains("://") {
            addr.clone()
        } else {
            format!("{scheme}://{addr}")
        };
        let bad = |e: String| ClientError::BadAddress(addr.clone(), e);
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(timeout) = rpc_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.config())
                .map_err(|e| bad(format!("TLS: {e}")))?;
        }
        Ok(Server {
            channel: endpoint.connect_lazy(),
            addr,
        })
    }
}
