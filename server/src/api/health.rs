//! Health follows the primary: SERVING only while this node knows one. The same watcher tells
//! the story at info level: who is primary, and when that changes.

use sequencer_proto::v1::cluster_server::ClusterServer;
use sequencer_proto::v1::messenger_server::MessengerServer;
use sequencer_proto::v1::sequencer_server::SequencerServer;
use sequencer_proto::v1::tracker_server::TrackerServer;
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

/// Runs until Raft stops.
pub async fn watch_primary(id: NodeId, raft: Raft, reporter: HealthReporter) {
    set_all(&reporter, ServingStatus::NotServing).await;
    let mut metrics = raft.metrics();
    let mut known: Option<Option<NodeId>> = None;
    loop {
        let (leader, term, running) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term, m.running_state.clone())
        };
        if let Err(fatal) = running {
            // Stopped is our own graceful shutdown; anything else (a storage failure) is not.
            if !matches!(fatal, openraft::error::Fatal::Stopped) {
                tracing::error!(node = id, error = %fatal, "raft stopped; this node no longer serves");
            }
            set_all(&reporter, ServingStatus::NotServing).await;
            return;
        }
        if known != Some(leader) {
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
            set_all(&reporter, status).await;
            known = Some(leader);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
