//! The accept loop of both listeners, in place of tonic's `TcpIncoming`, which keeps every
//! socket it accepts for as long as the peer likes and retries a failing `accept` at once.
//!
//! Here a connection must send its HTTP/2 preface within `connection_preface_timeout` (HTTP/2
//! keepalive only starts once the preface is in), a listener holds at most `max_connections`
//! open (one more is reset at once), and an `accept` that fails for want of descriptors or
//! memory is logged (rate-limited) and retried after a growing pause instead of in a busy loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What a client sends first: the 24-byte HTTP/2 preface and the 9-byte header of its SETTINGS
/// frame. With TLS this counts the start of the handshake instead (which tonic bounds itself).
pub const PREFACE_BYTES: usize = 24 + 9;

/// Pauses after an `accept` failure that is not about one connection (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM): the condition lasts, so retrying at once only burns a core.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Refused connections handled in one poll before letting other tasks run.
const REFUSALS_PER_POLL: usize = 64;

/// How often a repeated warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Per-listener limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections; one more is closed at once.
    pub max_connections: usize,
    /// How long a new connection has for its first [`PREFACE_BYTES`] bytes.
    pub preface_timeout: Duration,
}

/// The connections of one listener, as tonic's `serve_with_incoming*` takes them.
pub struct Incoming {
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    /// One permit per open connection; each [`Conn`] holds its own.
    open: Arc<Semaphore>,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    refused_warn: RateLimit,
    failed_warn: RateLimit,
}

impl Incoming {
    /// Accepts on `listener`; `name` ("client", "peer") labels its log lines.
    pub fn new(listener: TcpListener, name: &'static str, limits: Limits) -> Self {
        let permits = limits.max_connections.min(Semaphore::MAX_PERMITS);
        Self {
            listener,
            name,
            limits,
            open: Arc::new(Semaphore::new(permits)),
            backoff: FIRST_BACKOFF,
            pause: None,
            refused_warn: RateLimit::default(),
            failed_warn: RateLimit::default(),
        }
    }

    /// A connection to serve, or `None` if it was refused.
    fn admit(&mut self, stream: TcpStream, remote: SocketAddr) -> Option<Conn> {
        let listener = self.name;
        let Ok(permit) = self.open.clone().try_acquire_owned() else {
            // A reset, not a FIN: the client learns at once, and no TIME_WAIT is left here.
            let _ = stream.set_zero_linger();
            drop(stream);
            tracing::debug!(listener, %remote, "connection refused (max_connections)");
            if let Some(suppressed) = self.refused_warn.check() {
                tracing::warn!(
                    listener,
                    max_connections = self.limits.max_connections,
                    suppressed,
                    "refusing connections: this listener already holds max_connections"
                );
            }
            return None;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(listener, %remote, error = %e, "setting TCP_NODELAY");
        }
        tracing::debug!(listener, %remote, "connection accepted");
        Some(Conn {
            stream,
            preface: Some(Preface {
                deadline: Box::pin(tokio::time::sleep(self.limits.preface_timeout)),
                missing: PREFACE_BYTES,
            }),
            listener,
            remote,
            _permit: permit,
        })
    }

    /// Handles an `accept` error; sets up a pause unless it concerned one connection only.
    fn failed(&mut self, e: io::Error) {
        use io::ErrorKind::*;
        let listener = self.name;
        if matches!(
            e.kind(),
            ConnectionAborted
                | ConnectionReset
                | Interrupted
                | TimedOut
                | NetworkDown
                | NetworkUnreachable
                | HostUnreachable
        ) {
            tracing::debug!(listener, error = %e, "accept: connection gone before it was taken");
            return;
        }
        if let Some(suppressed) = self.failed_warn.check() {
            tracing::warn!(
                listener,
                error = %e,
                suppressed,
                backoff_ms = self.backoff.as_millis() as u64,
                "accept failed; pausing before the next try"
            );
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut refused = 0;
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, remote)) => {
                    this.backoff = FIRST_BACKOFF;
                    if let Some(conn) = this.admit(stream, remote) {
                        return Poll::Ready(Some(Ok(conn)));
                    }
                    refused += 1;
                    if refused >= REFUSALS_PER_POLL {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Err(e) => this.failed(e),
            }
        }
    }
}

/// One accepted connection: a TCP stream with a deadline for its first bytes, holding its
/// place among the listener's `max_connections` until dropped.
pub struct Conn {
    stream: TcpStream,
    /// Until the preface is in.
    preface: Option<Preface>,
    listener: &'static str,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

struct Preface {
    deadline: Pin<Box<Sleep>>,
    missing: usize,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(preface) = &mut this.preface else {
            return res;
        };
        match &res {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                preface.missing = preface.missing.saturating_sub(read);
                if preface.missing == 0 {
                    this.preface = None;
                }
                res
            }
            Poll::Ready(Err(_)) => res,
            Poll::Pending => {
                // Polling the deadline registers this task with the timer too.
                if preface.deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        listener = this.listener,
                        remote = %this.remote,
                        missing = preface.missing,
                        "closing a connection that sent no HTTP/2 preface in time \
                         (connection_preface_timeout)"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within connection_preface_timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    // The same as for a plain TcpStream, so `Request::remote_addr` keeps working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        tracing::debug!(listener = self.listener, remote = %self.remote, "connection closed");
    }
}

/// Lets a repeated warning through at most once per [`WARN_EVERY`], counting the rest.
#[derive(Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(suppressed since the last one)` if a warning may be logged now.
    fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn bound(limits: Limits) -> (Incoming, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (Incoming::new(l, "test", limits), addr)
    }

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_suppress() {
        let mut r = RateLimit::default();
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        r.last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(r.check(), Some(2));
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_reads_at_the_deadline_and_a_prefaced_one_does_not() {
        let limits = Limits {
            max_connections: 8,
            preface_timeout: Duration::from_millis(200),
        };
        let (mut incoming, addr) = bound(limits).await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut prefaced = incoming.next().await.unwrap().unwrap();

        let started = Instant::now();
        let mut buf = [0u8; 64];
        let e = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(150));

        talker.write_all(&[0u8; PREFACE_BYTES]).await.unwrap();
        prefaced
            .read_exact(&mut buf[..PREFACE_BYTES])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(prefaced.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn one_past_the_cap_is_reset_and_a_closed_one_frees_its_place() {
        let limits = Limits {
            max_connections: 1,
            preface_timeout: Duration::from_secs(60),
        };
        let (mut incoming, addr) = bound(limits).await;
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = incoming.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        // Both are refused inside this poll, which then waits for another connection.
        let next = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(next.is_err(), "a connection past the cap was served");
        let mut buf = [0u8; 1];
        for s in [&mut second, &mut third] {
            assert!(matches!(s.read(&mut buf).await, Ok(0) | Err(_)));
        }
        drop(held);
        let _fourth = TcpStream::connect(addr).await.unwrap();
        let admitted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(admitted, Ok(Some(Ok(_)))));
    }
}
