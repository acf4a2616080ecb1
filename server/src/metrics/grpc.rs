//! A tower layer on the client listener that counts every gRPC call by method and status
//! code, and times it until its response starts. A unary error is answered "trailers-only",
//! its code in the headers; otherwise the code arrives in the trailers, read as the body ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use tower::{Layer, Service};

use super::get;

/// Counts and times the calls of the services it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/').to_string();
        let start = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            let code = resp.headers().get("grpc-status").map(code_of);
            // A method no service has is answered UNIMPLEMENTED: count those under one
            // label, so that no caller can mint label values.
            let rpc = if code == Some(tonic::Code::Unimplemented) {
                "unknown".to_string()
            } else {
                path
            };
            get()
                .grpc_seconds
                .with_label_values(&[rpc.as_str()])
                .observe(start.elapsed().as_secs_f64());
            let pending = match code {
                Some(code) => {
                    count(&rpc, code);
                    None
                }
                None => Some(rpc),
            };
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(
                parts,
                Counted {
                    inner: body,
                    pending,
                },
            ))
        })
    }
}

/// A response body that counts its call when its trailers (or its end) arrive.
pub struct Counted<B> {
    inner: B,
    /// The method, until the call is counted.
    pending: Option<String>,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .map_or(tonic::Code::Unknown, code_of);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(tonic::Code::Unknown),
            Poll::Ready(None) => self.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Counted<B> {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(rpc) = self.pending.take() {
            count(&rpc, code);
        }
    }
}

impl<B> Drop for Counted<B> {
    /// A stream the caller dropped (a Subscribe that ended) never sent trailers.
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

fn count(rpc: &str, code: tonic::Code) {
    get()
        .grpc_requests
        .with_label_values(&[rpc, crate::error::code_name(code)])
        .inc();
}

fn code_of(v: &http::HeaderValue) -> tonic::Code {
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from_i32)
}
