//! The HTTP listener's accept loop: HTTP/1.1 and HTTP/2 (hyper's auto builder), TLS when the
//! node has it, a cap on open connections, and deadlines on handshakes and request headers so
//! that an idle or slow caller cannot hold a connection open forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How the listener treats connections.
#[derive(Clone)]
pub struct Serving {
    pub tls: Option<Arc<ServerConfig>>,
    pub max_connections: usize,
    /// For a TLS handshake, for the first byte of the first request, and for each request's
    /// headers.
    pub header_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 pings on idle connections, and how long one may go unanswered.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// How long connections in flight may take to finish once the node stops.
const DRAIN: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `stop`, then lets open connections finish their requests
/// (up to [`DRAIN`]) and returns once every connection task has ended.
pub async fn serve(
    id: u64,
    listener: TcpListener,
    app: axum::Router,
    serving: Serving,
    stop: CancellationToken,
) {
    let tls = serving.tls.clone().map(TlsAcceptor::from);
    let open = Arc::new(Semaphore::new(serving.max_connections));
    let graceful = GracefulShutdown::new();
    // A JoinSet rather than a tracker: connections still open after the drain are aborted.
    let mut connections = JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(serving.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(serving.max_concurrent_streams)
        .keep_alive_interval(serving.keepalive_interval)
        .keep_alive_timeout(serving.keepalive_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of fds, say: back off rather than spin.
                    tracing::warn!(node = id, error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!(node = id, %peer, "http connection refused: max_connections reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let (tls, builder, watcher) = (tls.clone(), builder.clone(), graceful.watcher());
        let handshake = serving.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let stream = FirstByte::new(stream, handshake);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(node = id, %peer, error = %e, "http TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let stream = FirstByte::new(stream, handshake);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    // Idle keep-alive connections close now; those mid-request finish first.
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            node = id,
            "http connections still open after the drain; dropped"
        );
    }
    // They hold the node's handles (its batchers end only once every handle is gone).
    connections.shutdown().await;
}

/// A connection that must show which HTTP it speaks before a deadline. hyper-util reads until
/// it has the whole HTTP/2 preface or a byte that differs from it, and hyper's own header
/// timeout and HTTP/2 pings start only after that, so without this a caller that connects (or
/// finishes a TLS handshake) and sends nothing, or a few bytes of the preface, would hold its
/// place under the cap forever.
struct FirstByte<IO> {
    io: IO,
    /// Until the version is told.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read so far, while they match the preface.
    matched: usize,
}

/// What an HTTP/2 connection opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<IO> FirstByte<IO> {
    fn new(io: IO, within: Duration) -> Self {
        FirstByte {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            matched: 0,
        }
    }

    /// Follows the bytes read until they tell HTTP/1 from HTTP/2.
    fn saw(&mut self, bytes: &[u8]) {
        for b in bytes {
            if H2_PREFACE.get(self.matched) != Some(b) {
                self.deadline = None;
                return;
            }
            self.matched += 1;
            if self.matched == H2_PREFACE.len() {
                self.deadline = None;
                return;
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstByte<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if self.deadline.is_some() {
                    let new = buf.filled()[before..].to_vec();
                    self.saw(&new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let late = match self.deadline.as_mut() {
                    Some(d) => d.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if late {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within connection_preface_timeout_ms",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstByte<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
