//! Health follows the primary: SERVING only while this node knows one and Raft runs, and never
//! again once the node starts shutting down. The same watcher tells the story at info level:
//! who is primary, and when that changes.

use std::future::Future;

use openraft::RaftMetrics;

use crate::raft::Member;
use sequencer_proto::v1::cluster_server::ClusterServer;
use sequencer_proto::v1::messenger_server::MessengerServer;
use sequencer_proto::v1::sequencer_server::SequencerServer;
use sequencer_proto::v1::tracker_server::TrackerServer;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::raft::{NodeId, Raft};

/// The service names health reports on, besides the whole server ("").
fn services() -> [&'static str; 5] {
    use tonic::server::NamedService;
    type Seq = SequencerServer<super::sequencer::SequencerApi>;
    type Clu = ClusterServer<super::cluster::ClusterApi>;
    type Tra = TrackerServer<super::tracker::TrackerApi>;
    type Mes = MessengerServer<super::messenger::MessengerApi>;
    [
        "",
        <Seq as NamedService>::NAME,
        <Clu as NamedService>::NAME,
        <Tra as NamedService>::NAME,
        <Mes as NamedService>::NAME,
    ]
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for s in services() {
        reporter.set_service_status(s, status).await;
    }
}

/// Runs until Raft stops or `shutdown` resolves (the node's first step out, before its
/// listeners drain); NOT_SERVING from then on, so balancers stop sending before the node goes.
pub async fn watch_primary_until(
    id: NodeId,
    raft: Raft,
    reporter: HealthReporter,
    shutdown: impl Future<Output = ()>,
) {
    follow(id, raft.metrics(), &reporter, shutdown).await;
}

type Metrics = watch::Receiver<RaftMetrics<NodeId, Member>>;

async fn follow(
    id: NodeId,
    metrics: Metrics,
    reporter: &HealthReporter,
    shutdown: impl Future<Output = ()>,
) {
    set_all(reporter, ServingStatus::NotServing).await;
    track(id, metrics, reporter, shutdown).await;
    // Whichever way tracking ended, this node serves no more.
    set_all(reporter, ServingStatus::NotServing).await;
}

/// Follows the metrics until Raft stops, its metrics end, or `shutdown` resolves.
async fn track(
    id: NodeId,
    mut metrics: Metrics,
    reporter: &HealthReporter,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut known: Option<Option<NodeId>> = None;
    let mut last_primary: Option<NodeId> = None;
    loop {
        let (leader, term, running) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term, m.running_state.clone())
        };
        if let Err(fatal) = running {
            // node.rs tells the story of a failure (and exits over it); here it only ends.
            tracing::debug!(node = id, error = %fatal, "raft stopped; health says not serving");
            return;
        }
        if known != Some(leader) {
            // A change is a new primary, as etcd counts leader changes: losing one and
            // electing the next is one change, not two.
            if leader.is_some() && leader != last_primary {
                crate::metrics::get().primary_changes.inc();
                last_primary = leader;
            }
            match leader {
                Some(p) if p == id => {
                    tracing::info!(node = id, term, "this node is now the primary")
                }
                Some(p) => tracing::info!(node = id, primary = p, term, "primary is node {p}"),
                None => tracing::info!(node = id, term, "no primary known; not serving"),
            }
            let status = if leader.is_some() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(reporter, status).await;
            known = Some(leader);
        }
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    // Raft's core ended without reporting why (it panicked).
                    tracing::error!(node = id, "raft metrics ended; this node no longer serves");
                    return;
                }
            }
            () = &mut shutdown => {
                tracing::info!(node = id, "shutting down; health says not serving");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::server::HealthService;

    use super::*;

    /// What Check says for every service (`None`: not registered yet).
    async fn statuses(health: &HealthService) -> Vec<Option<Wire>> {
        let mut out = Vec::new();
        for s in services() {
            let req = tonic::Request::new(HealthCheckRequest { service: s.into() });
            let status = health.check(req).await.ok().map(|r| r.into_inner().status);
            out.push(status.map(|s| Wire::try_from(s).unwrap()));
        }
        out
    }

    async fn all_not_serving(health: &HealthService) -> bool {
        statuses(health)
            .await
            .iter()
            .all(|s| *s == Some(Wire::NotServing))
    }

    async fn wait_for(health: &HealthService, want: Wire) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = statuses(health).await;
            if now.iter().all(|s| *s == Some(want)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health never said {want:?} for every service: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A watcher on metrics we control, SERVING with node 1 as primary.
    async fn serving(
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (
        watch::Sender<RaftMetrics<NodeId, Member>>,
        HealthService,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = watch::channel(RaftMetrics::new_initial(1));
        let reporter = HealthReporter::new();
        let health = HealthService::from_health_reporter(reporter.clone());
        let task = tokio::spawn(async move { follow(1, rx, &reporter, shutdown).await });
        wait_for(&health, Wire::NotServing).await;
        tx.send_modify(|m| m.current_leader = Some(1));
        wait_for(&health, Wire::Serving).await;
        (tx, health, task)
    }

    #[tokio::test]
    async fn health_says_not_serving_when_raft_metrics_end() {
        let (tx, health, task) = serving(std::future::pending()).await;
        // Raft's core died without a last word: its metrics sender is gone.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher ends with the metrics")
            .unwrap();
        assert!(all_not_serving(&health).await);
    }

    #[tokio::test]
    async fn health_says_not_serving_as_soon_as_the_node_shuts_down() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, health, task) = serving(async {
            let _ = stopped.await;
        })
        .await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher ends at shutdown")
            .unwrap();
        assert!(all_not_serving(&health).await);
        // Raft still runs and knows its primary, and health stays NOT_SERVING.
        tx.send_modify(|m| m.current_term += 1);
        assert!(all_not_serving(&health).await);
    }
}
