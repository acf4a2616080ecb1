//! Prometheus metrics. A node is a process, so the registry is the process's own: the parts
//! that count (the request layer, the batchers, the store) reach it through [`get`], and the
//! gauges that describe the node now (Raft, the state, queues) are read at each scrape from
//! the node's handles ([`scrape::Sources`]). Every label takes a bounded set of values: no
//! label names a sequence, a group or a client.

pub mod grpc;
pub mod scrape;

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::error::Error;
use crate::state::Rejected;

/// Every metric of this process.
pub struct Metrics {
    registry: Registry,
    /// gRPC calls by method and status code.
    pub grpc_requests: IntCounterVec,
    /// gRPC latency by method, until the response headers.
    pub grpc_seconds: HistogramVec,
    /// HTTP requests by route and status.
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    /// Ids this node handed to its callers.
    pub ids_issued: IntCounter,
    /// Messages this node streamed to its subscribers.
    pub messages_delivered: IntCounter,
    /// Requests per log entry, by kind (ids, sends).
    pub batch_requests: HistogramVec,
    /// Ids per log entry of id requests.
    pub batch_ids: Histogram,
    /// Calls passed to the primary on another node, by what they carried.
    pub forwards: IntCounterVec,
    /// Times this node saw a new primary (losing one and electing the next is one).
    pub primary_changes: IntCounter,
    /// Requests refused, by reason.
    pub refusals: IntCounterVec,
    pub journal_fsync_seconds: Histogram,
    pub redb_commit_seconds: Histogram,
    pub snapshots_built: IntCounter,
    pub snapshot_bytes: IntGauge,
    pub snapshot_seconds: Histogram,
    // Read at each scrape (see `scrape`).
    pub(crate) term: IntGauge,
    pub(crate) is_primary: IntGauge,
    pub(crate) has_primary: IntGauge,
    pub(crate) commit_index: IntGauge,
    pub(crate) applied_index: IntGauge,
    pub(crate) last_log_index: IntGauge,
    pub(crate) replication_lag: IntGaugeVec,
    /// The members `replication_lag` has series for, so that a member gone is removed rather
    /// than every series reset (a scrape running beside another would miss them).
    pub(crate) lagging: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) queue_capacity: IntGauge,
    pub(crate) subscribers: IntGauge,
    pub(crate) sequences: IntGauge,
    pub(crate) groups: IntGauge,
    pub(crate) clients: IntGauge,
    pub(crate) retained_bytes: IntGauge,
    pub(crate) data_dir_bytes: IntGauge,
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Request latencies: 100 µs to about 13 s.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.0001, 2.0, 18).unwrap_or_default()
}

/// Disk operations: 10 µs to about 5 s.
fn disk_buckets() -> Vec<f64> {
    exponential_buckets(0.00001, 2.0, 20).unwrap_or_default()
}

/// Requests or ids per entry: 1 to about a million.
fn size_buckets() -> Vec<f64> {
    exponential_buckets(1.0, 4.0, 11).unwrap_or_default()
}

impl Metrics {
    // Names, labels and buckets are constants: only a bug here fails, and the unit test below
    // builds them all.
    #[allow(clippy::expect_used)]
    fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            if let Err(e) = r.register(Box::new(m.clone())) {
                tracing::error!(error = %e, "registering a metric");
            }
            m
        }
        let counter =
            |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("metric"));
        let counters = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("metric"),
            )
        };
        let gauge =
            |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("metric"));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("metric"),
            )
        };
        let histograms = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            reg(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                    .expect("metric"),
            )
        };
        #[cfg(target_os = "linux")]
        if let Err(e) = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::error!(error = %e, "registering the process metrics");
        }
        Metrics {
            grpc_requests: counters(
                "sequencer_grpc_requests_total",
                "gRPC calls answered, by method and status code",
                &["rpc", "code"],
            ),
            grpc_seconds: histograms(
                "sequencer_grpc_request_duration_seconds",
                "gRPC call latency until the response starts, by method",
                &["rpc"],
                latency_buckets(),
            ),
            http_requests: counters(
                "sequencer_http_requests_total",
                "HTTP requests answered, by route and status",
                &["route", "status"],
            ),
            http_seconds: histograms(
                "sequencer_http_request_duration_seconds",
                "HTTP request latency, by route",
                &["route"],
                latency_buckets(),
            ),
            ids_issued: counter(
                "sequencer_ids_issued_total",
                "ids this node handed to its callers",
            ),
            messages_delivered: counter(
                "sequencer_messages_delivered_total",
                "deliveries (messages, joins and leaves) this node streamed to its subscribers",
            ),
            batch_requests: histograms(
                "sequencer_batch_requests",
                "requests carried by one log entry this node proposed or forwarded, by kind",
                &["kind"],
                size_buckets(),
            ),
            batch_ids: histogram(
                "sequencer_batch_ids",
                "ids carried by one log entry of id requests",
                size_buckets(),
            ),
            forwards: counters(
                "sequencer_forwards_total",
                "calls passed to the primary on another node, by what they carried",
                &["kind"],
            ),
            primary_changes: counter(
                "sequencer_primary_changes_total",
                "times this node saw a new primary",
            ),
            refusals: counters(
                "sequencer_refusals_total",
                "requests refused for load or limits, by reason",
                &["reason"],
            ),
            journal_fsync_seconds: histogram(
                "sequencer_journal_fsync_duration_seconds",
                "fsync of the Raft journal",
                disk_buckets(),
            ),
            redb_commit_seconds: histogram(
                "sequencer_redb_commit_duration_seconds",
                "durable commit of a redb transaction (the log, the vote)",
                disk_buckets(),
            ),
            snapshots_built: counter(
                "sequencer_snapshots_built_total",
                "snapshots this node built",
            ),
            snapshot_bytes: gauge(
                "sequencer_snapshot_size_bytes",
                "size of the last snapshot this node built or installed",
            ),
            snapshot_seconds: histogram(
                "sequencer_snapshot_build_duration_seconds",
                "time to encode and write a snapshot",
                disk_buckets(),
            ),
            term: gauge("sequencer_raft_term", "the Raft term this node is in"),
            is_primary: gauge(
                "sequencer_is_primary",
                "1 on the primary (the Raft leader), else 0",
            ),
            has_primary: gauge(
                "sequencer_has_primary",
                "1 when this node knows a primary, else 0",
            ),
            commit_index: gauge(
                "sequencer_raft_commit_index",
                "highest log index this node knows committed",
            ),
            applied_index: gauge(
                "sequencer_raft_applied_index",
                "highest log index this node applied",
            ),
            last_log_index: gauge(
                "sequencer_raft_last_log_index",
                "highest log index in this node's log",
            ),
            replication_lag: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "sequencer_replication_lag_entries",
                        "on the primary: log entries each member has yet to acknowledge",
                    ),
                    &["member"],
                )
                .expect("metric"),
            ),
            lagging: Default::default(),
            queue_depth: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "sequencer_queue_depth",
                        "requests queued on this node toward the primary, by kind",
                    ),
                    &["kind"],
                )
                .expect("metric"),
            ),
            queue_capacity: gauge(
                "sequencer_queue_capacity",
                "requests each queue toward the primary holds (queue_capacity)",
            ),
            subscribers: gauge(
                "sequencer_subscribers",
                "Subscribe streams open on this node",
            ),
            sequences: gauge("sequencer_sequences", "sequences in the applied state"),
            groups: gauge("sequencer_groups", "groups in the applied state"),
            clients: gauge(
                "sequencer_clients",
                "registered group clients in the applied state",
            ),
            retained_bytes: gauge(
                "sequencer_retained_bytes",
                "message payload bytes the groups retain",
            ),
            data_dir_bytes: gauge("sequencer_data_dir_bytes", "bytes of this node's data dir"),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// Counts a refused request, when `e` is a refusal for load or limits.
    pub fn refused(&self, e: &Error) {
        if let Some(reason) = refusal_reason(e) {
            self.refusals.with_label_values(&[reason]).inc();
        }
    }
}

/// Observes `elapsed` in seconds.
pub fn observe(h: &Histogram, elapsed: Duration) {
    h.observe(elapsed.as_secs_f64());
}

/// The reason label of a refusal; `None` for errors that are not one.
fn refusal_reason(e: &Error) -> Option<&'static str> {
    Some(match e {
        Error::Overloaded { .. } => "queue_full",
        Error::SlowSubscriber(_) => "slow_subscriber",
        Error::ResourceExhausted(_) => "limit",
        Error::Rejected(r) => match r {
            Rejected::TooManySequences { .. } => "max_sequences",
            Rejected::Exhausted { .. } => "sequence_exhausted",
            Rejected::TooManyClients { .. } => "max_clients",
            Rejected::TooManyGroups { .. } => "max_groups",
            Rejected::TooManyMembers { .. } => "max_members_per_group",
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes() {
        let m = Metrics::new();
        m.ids_issued.inc_by(3);
        m.grpc_requests.with_label_values(&["x/Y", "OK"]).inc();
        m.grpc_seconds.with_label_values(&["x/Y"]).observe(0.01);
        m.refused(&Error::Overloaded { queued: 1 });
        let text = m.encode();
        for name in [
            "sequencer_ids_issued_total 3",
            "sequencer_grpc_requests_total{code=\"OK\",rpc=\"x/Y\"} 1",
            "sequencer_grpc_request_duration_seconds_bucket{rpc=\"x/Y\",le=\"0.0128\"} 1",
            "sequencer_refusals_total{reason=\"queue_full\"} 1",
            "sequencer_journal_fsync_duration_seconds_count 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        // Every plain family registered (a name taken twice would be refused): the vectors
        // show only once a label set is used.
        let families = m.registry.gather();
        let plain = families
            .iter()
            .filter(|f| f.name().starts_with("sequencer_"));
        assert_eq!(plain.count(), 25, "{text}");
    }
}
