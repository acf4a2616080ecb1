//! For operators and their tools: /metrics for Prometheus, /healthz for liveness probes and
//! /readyz for readiness probes and load balancers.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::time::Instant;

use super::HttpApi;

/// The Prometheus text exposition (format 0.0.4).
pub async fn metrics(State(api): State<Arc<HttpApi>>) -> Response {
    api.metrics.refresh().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::get().encode(),
    )
        .into_response()
}

/// 200 while the process serves; 503 once it has begun to stop or its Raft has failed.
pub async fn healthz(State(api): State<Arc<HttpApi>>) -> Response {
    let failed = match &api.raft.metrics().borrow().running_state {
        Err(fatal) => Some(fatal.to_string()),
        Ok(()) => None,
    };
    let reason = if api.stopping.is_cancelled() {
        "the node is shutting down".to_string()
    } else if let Some(fatal) = failed {
        format!("raft stopped: {fatal}")
    } else {
        return (StatusCode::OK, Json(json!({"status": "ok"}))).into_response();
    };
    unavailable("unavailable", reason)
}

/// 200 when this node knows a primary and has applied everything the primary had committed
/// when asked just now (a read barrier, as a linearizable read takes); else 503 with why.
pub async fn readyz(State(api): State<Arc<HttpApi>>) -> Response {
    const NOT_READY: &str = "not ready";
    if api.stopping.is_cancelled() {
        return unavailable(NOT_READY, "the node is shutting down".into());
    }
    if api.raft.metrics().borrow().current_leader.is_none() {
        return unavailable(NOT_READY, "no primary known".into());
    }
    let deadline = Instant::now() + api.ready_within;
    if let Err(e) = api.proposer.read_barrier_until(deadline).await {
        return unavailable(NOT_READY, e.to_string());
    }
    let (primary, applied) = {
        let m = api.raft.metrics();
        let m = m.borrow();
        (m.current_leader, m.last_applied.map_or(0, |l| l.index))
    };
    let body = json!({"status": "ready", "primary": primary, "applied_index": applied});
    (StatusCode::OK, Json(body)).into_response()
}

fn unavailable(status: &str, reason: String) -> Response {
    let body = Json(json!({"status": status, "reason": reason}));
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        body,
    )
        .into_response()
}
