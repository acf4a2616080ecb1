//! The HTTP face of a node, on its own listener (`http_addr`): a JSON API over the same gRPC
//! services (`api`), the operator endpoints /metrics, /healthz and /readyz (`ops`), and the
//! status page with its assets and the OpenAPI document (`page`). `serve` is the listener.

mod api;
mod ops;
mod page;
mod serve;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::api::cluster::ClusterApi;
use crate::api::sequencer::SequencerApi;
use crate::api::tracker::TrackerApi;
use crate::metrics::scrape::Sources;
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, Raft};
use crate::write::proposer::Proposer;

pub use serve::{serve, Serving};

/// What the HTTP handlers call: the node's own gRPC services, so that a request over HTTP
/// takes the same path, with the same checks, as one over gRPC.
pub struct HttpApi {
    pub id: NodeId,
    pub sequencer: Arc<SequencerApi>,
    pub cluster: Arc<ClusterApi>,
    pub tracker: Arc<TrackerApi>,
    pub proposer: Proposer,
    pub reader: StateReader,
    pub raft: Raft,
    pub metrics: Sources,
    /// Cancelled when the node starts to stop: the probes fail from then on.
    pub stopping: CancellationToken,
    /// How long /readyz may take to hear from the primary.
    pub ready_within: Duration,
}

/// Every route.
pub fn router(api: Arc<HttpApi>) -> axum::Router {
    axum::Router::new()
        .route("/v1/sequences/{name}/next", post(api::next))
        .route("/v1/sequences/{name}/ids", post(api::ids))
        .route("/v1/sequences/{name}", get(api::current))
        .route("/v1/cluster", get(api::cluster))
        .route("/v1/groups", get(api::groups))
        .route("/v1/stats", get(api::stats))
        .route("/v1/openapi.json", get(page::openapi))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/", get(page::index))
        .route("/assets/{file}", get(page::asset))
        .fallback(api::no_route)
        .method_not_allowed_fallback(api::wrong_method)
        .layer(axum::middleware::from_fn(count))
        .with_state(api)
}

/// Counts and times each request by its route (the template, never the path itself, so the
/// label set stays bounded) and status.
async fn count(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let m = crate::metrics::get();
    m.http_seconds
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}
