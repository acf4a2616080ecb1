//! A small HTTP/1.1 client for tests of a node's HTTP listener: one request per connection,
//! plain or over TLS (trusting the test cluster's CA), the whole answer read into memory.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// An answer: status, headers, body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "HTTP {} body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `method` on `http://addr{path}` (or `https://` with `ca`, a PEM CA to trust).
pub async fn request(
    method: &str,
    addr: &str,
    path: &str,
    ca: Option<&[u8]>,
) -> anyhow::Result<Answer> {
    tokio::time::timeout(REQUEST_TIMEOUT, send(method, addr, path, ca))
        .await
        .with_context(|| format!("{method} {addr}{path}: no answer in {REQUEST_TIMEOUT:?}"))?
}

/// GET `path` on a plain-HTTP node.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Answer> {
    request("GET", addr, path, None).await
}

/// POST `path` (no body) on a plain-HTTP node.
pub async fn post(addr: &str, path: &str) -> anyhow::Result<Answer> {
    request("POST", addr, path, None).await
}

async fn send(method: &str, addr: &str, path: &str, ca: Option<&[u8]>) -> anyhow::Result<Answer> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr)
        .body(Full::new(Bytes::new()))?;
    let resp = match ca {
        None => exchange(TokioIo::new(tcp), req).await?,
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca) {
                roots.add(cert?)?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
            let name = rustls::pki_types::ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            exchange(TokioIo::new(tls), req).await?
        }
    };
    Ok(resp)
}

async fn exchange<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> anyhow::Result<Answer>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok(Answer {
        status,
        headers,
        body,
    })
}
