//! The JSON API: each handler builds the gRPC request, calls the node's own service, and
//! writes its answer as JSON. Errors are the services' own statuses, turned into an HTTP
//! status by `error::http_status` and a body `{"error": {"code", "message"}}`.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::core::Metric;
use sequencer_proto::v1::cluster_server::Cluster;
use sequencer_proto::v1::sequencer_server::Sequencer;
use sequencer_proto::v1::tracker_server::Tracker;
use sequencer_proto::v1::{
    CurrentIdRequest, GetIdRequest, GetIdsRequest, ListGroupsRequest, StatusRequest,
};
use serde_json::{json, Value};
use tonic::{Request, Status};

use super::HttpApi;
use crate::error::{code_name, http_status, RETRY_AFTER};

type Answer = Result<Json<Value>, ApiError>;

/// A failed request: a gRPC status, as JSON.
#[derive(Debug)]
pub struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError(s)
    }
}

impl ApiError {
    fn invalid(message: String) -> Self {
        ApiError(Status::invalid_argument(message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status =
            StatusCode::from_u16(http_status(code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(json!({
            "error": {"code": code_name(code), "message": self.0.message()}
        }));
        let mut resp = (status, body).into_response();
        // The status says when its cause passes (queue full, no primary); a limit does not.
        if let Some(after) = self.0.metadata().get(RETRY_AFTER) {
            if let Ok(v) = header::HeaderValue::from_bytes(after.as_bytes()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// The sequence a path names; a bad one (say, broken percent-encoding) is a 400.
fn name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name)
        .map_err(|e| ApiError::invalid(format!("sequence name: {}", e.body_text())))
}

/// `POST /v1/sequences/{name}/next`: one id.
pub async fn next(
    State(api): State<Arc<HttpApi>>,
    path: Result<Path<String>, PathRejection>,
) -> Answer {
    let sequence = name(path)?;
    let r = api
        .sequencer
        .get_id(Request::new(GetIdRequest { sequence }))
        .await?
        .into_inner();
    Ok(Json(
        json!({"id": r.id, "served_by": r.served_by, "primary": r.primary}),
    ))
}

/// `POST /v1/sequences/{name}/ids?count=N`: a dense block of N ids.
pub async fn ids(
    State(api): State<Arc<HttpApi>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer {
    let sequence = name(path)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let mut count = None;
    for (key, raw) in query {
        if key != "count" {
            return Err(ApiError::invalid(format!(
                "unknown query parameter {:?}: only count is taken",
                key.chars().take(40).collect::<String>()
            )));
        }
        if count.is_some() {
            return Err(ApiError::invalid("count is given more than once".into()));
        }
        count = Some(raw.parse::<u32>().map_err(|_| {
            ApiError::invalid(format!(
                "count must be a whole number between 1 and max_batch, got {:?}",
                raw.chars().take(40).collect::<String>()
            ))
        })?);
    }
    let count =
        count.ok_or_else(|| ApiError::invalid("the query parameter count is required".into()))?;
    let r = api
        .sequencer
        .get_ids(Request::new(GetIdsRequest { sequence, count }))
        .await?
        .into_inner();
    Ok(Json(json!({
        "first": r.first,
        "count": r.count,
        "last": r.first + u64::from(r.count) - 1,
        "served_by": r.served_by,
        "primary": r.primary,
    })))
}

/// `GET /v1/sequences/{name}`: the current id as applied on this node.
pub async fn current(
    State(api): State<Arc<HttpApi>>,
    path: Result<Path<String>, PathRejection>,
) -> Answer {
    let sequence = name(path)?;
    let r = api
        .sequencer
        .current_id(Request::new(CurrentIdRequest {
            sequence: sequence.clone(),
        }))
        .await?
        .into_inner();
    Ok(Json(json!({
        "name": sequence,
        "id": r.id,
        "served_by": r.served_by,
        "applied_index": r.applied_index,
    })))
}

/// `GET /v1/cluster`: what Cluster.Status answers.
pub async fn cluster(State(api): State<Arc<HttpApi>>) -> Answer {
    let s = api
        .cluster
        .status(Request::new(StatusRequest {}))
        .await?
        .into_inner();
    let nodes: Vec<Value> = s
        .nodes
        .into_iter()
        .map(|n| {
            json!({
                "id": n.id,
                "addr": n.addr,
                "peer_addr": n.peer_addr,
                "reachable": n.reachable,
                "primary": n.primary,
                "role": n.role,
                "term": n.term,
                "commit_index": n.commit_index,
                "applied_index": n.applied_index,
                "lag": n.lag,
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": s.node_id,
        "primary": s.primary,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "role": s.role,
        "nodes": nodes,
    })))
}

/// `GET /v1/groups`: what Tracker.ListGroups answers.
pub async fn groups(State(api): State<Arc<HttpApi>>) -> Answer {
    let r = api
        .tracker
        .list_groups(Request::new(ListGroupsRequest {}))
        .await?
        .into_inner();
    let groups: Vec<Value> = r
        .groups
        .into_iter()
        .map(|g| json!({"name": g.name, "members": g.members, "next_seq": g.next_seq}))
        .collect();
    Ok(Json(json!({ "groups": groups })))
}

/// The id requests whose latency the page charts: both transports.
const ID_RPCS: [&str; 2] = [
    "sequencer.v1.Sequencer/GetId",
    "sequencer.v1.Sequencer/GetIds",
];
const ID_ROUTES: [&str; 2] = ["/v1/sequences/{name}/next", "/v1/sequences/{name}/ids"];

/// `GET /v1/stats`: the cluster's totals as applied here (the page turns them into rates),
/// and this node's id latency histogram (the page turns it into percentiles).
pub async fn stats(State(api): State<Arc<HttpApi>>) -> Answer {
    let (ids_total, messages_total) = api.reader.read(|a| {
        (
            a.state.sequences.issued_total(),
            a.state.groups.messages_total(),
        )
    });
    let m = crate::metrics::get();
    let histograms = ID_RPCS
        .iter()
        .map(|rpc| m.grpc_seconds.with_label_values(&[rpc]))
        .chain(
            ID_ROUTES
                .iter()
                .map(|route| m.http_seconds.with_label_values(&[route])),
        );
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut count, mut sum) = (0u64, 0f64);
    for h in histograms {
        let metric = h.metric();
        let h = metric.get_histogram();
        count += h.get_sample_count();
        sum += h.get_sample_sum();
        for (i, b) in h.get_bucket().iter().enumerate() {
            match buckets.get_mut(i) {
                Some(slot) => slot.1 += b.cumulative_count(),
                None => buckets.push((b.upper_bound(), b.cumulative_count())),
            }
        }
    }
    let buckets: Vec<Value> = buckets
        .into_iter()
        .map(|(le, count)| json!({"le": le, "count": count}))
        .collect();
    Ok(Json(json!({
        "node_id": api.id,
        "ids_total": ids_total,
        "messages_total": messages_total,
        "id_latency_seconds": {"buckets": buckets, "count": count, "sum": sum},
    })))
}

/// Any path no route serves.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError(Status::not_found(format!(
        "no route {method} {}",
        uri.path()
    )))
}

/// A route asked with a method it does not take.
pub async fn wrong_method(method: Method, uri: Uri) -> Response {
    let body = Json(json!({"error": {
        "code": "INVALID_ARGUMENT",
        "message": format!("{} does not take {method}", uri.path()),
    }}));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}
