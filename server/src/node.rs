//! One node: opens its store, joins Raft, and serves the client and peer listeners until told
//! to stop. Listeners arrive already bound, so callers choose the ports (tests bind port 0).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use sequencer_proto::peer::peer_server::PeerServer;
use sequencer_proto::v1::cluster_server::ClusterServer;
use sequencer_proto::v1::messenger_server::MessengerServer;
use sequencer_proto::v1::sequencer_server::SequencerServer;
use sequencer_proto::v1::tracker_server::TrackerServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::allocator::{AllocPlan, Allocator};
use crate::api::cluster::ClusterApi;
use crate::api::health::watch_primary;
use crate::api::messenger::MessengerApi;
use crate::api::sequencer::SequencerApi;
use crate::api::tracker::TrackerApi;
use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::Error;
use crate::liveness::Liveness;
use crate::peer::{PeerClients, PeerService, RequireSecret, PEER_MESSAGE_LIMIT};
use crate::proposer::Proposer;
use crate::raft::election::Election;
use crate::raft::network::Network;
use crate::raft::{open_store, raft_config, NodeId, Raft};
use crate::sender::{SendPlan, Sender};
use crate::tls::TlsMaterial;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

/// The two bound listeners of a node.
pub struct Listeners {
    /// For clients: Sequencer, Cluster, health, reflection.
    pub client: TcpListener,
    /// For peers only: Raft and forwarding.
    pub peer: TcpListener,
}

/// Runs node `id` of `config` until `shutdown` resolves, then stops gracefully.
pub async fn run(
    config: Config,
    id: NodeId,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    if config.node(id).is_none() {
        return Err(Error::InvalidArgument(format!(
            "node {id} is not in the config"
        )));
    }
    let dir = config.node_dir(id);
    // Before touching the data dir: a node that cannot serve should leave no trace.
    let tls = TlsMaterial::load(&config, id)?;
    // Held until this function returns: nobody else may open this node's data meanwhile.
    let data = DataDir::lock(&dir)?;
    let (log, sm) = open_store(&data)?;
    sm.set_node_id(id);
    let reader = sm.reader();
    let commit = log.commit_index();
    let journal = log.clone();
    let peers = PeerClients::new(&config, id, tls.as_ref())?;

    let raft = Raft::new(
        id,
        Arc::new(raft_config(&config)?),
        Network::new(peers.clone()),
        log,
        sm,
    )
    .await
    .map_err(|e| Error::Internal(format!("starting raft: {e}")))?;
    initialize(&raft, &config).await?;
    tracing::info!(
        node = id,
        dir = %dir.display(),
        nodes = config.nodes.len(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "node started"
    );

    let (stop_clients, stop_clients_rx) = watch::channel(false);
    let (stop_peers, stop_peers_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let proposer = Proposer::new(
        id,
        raft.clone(),
        reader.clone(),
        peers.clone(),
        config.request_timeout,
        Duration::from_millis(config.election_timeout_max_ms),
    );
    // Batchers end once the client listener has stopped and dropped its handles.
    let mut batchers = JoinSet::new();
    let allocator = Allocator::start(
        AllocPlan {
            max_sequences: config.max_sequences,
        },
        proposer.clone(),
        config.queue_capacity,
        &mut batchers,
    );
    let sender = Sender::start(
        SendPlan {
            limits: config.group_limits,
        },
        proposer.clone(),
        config.queue_capacity,
        &mut batchers,
    );
    let liveness = Liveness::new(
        raft.clone(),
        reader.clone(),
        peers.clone(),
        proposer.clone(),
        config.failure_timeout,
        // A heartbeat that cannot reach the primary soon is better retried elsewhere.
        config.request_timeout.min(config.client_heartbeat / 2),
        Duration::from_millis(config.election_timeout_min_ms),
    );
    tasks.spawn(
        liveness
            .clone()
            .run_detector(config.group_limits, stop_peers_rx.clone()),
    );

    let election = Election::new(
        id,
        raft.clone(),
        Duration::from_millis(config.election_timeout_max_ms),
        Duration::from_millis(config.election_timeout_max_ms - config.election_timeout_min_ms),
    );
    // Stops with the client listener, so a stopping node starts no election.
    tasks.spawn(election.clone().run(stop_clients_rx.clone()));

    let (reporter, health) = tonic_health::server::health_reporter();
    tasks.spawn(watch_primary(id, raft.clone(), reporter));
    // grpcurl and other tools speak either reflection version; serve both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sequencer_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e| Error::Internal(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;

    let small = SMALL_REQUEST_LIMIT;
    let client_server = server_builder(&config, tls.as_ref().map(|t| t.client_listener()))?
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            SequencerServer::new(SequencerApi::new(
                id,
                allocator,
                reader.clone(),
                config.max_batch,
                config.max_sequences,
            ))
            .max_decoding_message_size(small),
        )
        .add_service(
            TrackerServer::new(TrackerApi::new(
                proposer.clone(),
                reader.clone(),
                liveness.clone(),
                config.group_limits,
                config.client_heartbeat,
                config.failure_timeout,
            ))
            .max_decoding_message_size(small),
        )
        .add_service(
            MessengerServer::new(MessengerApi::new(
                sender,
                reader,
                proposer.clone(),
                config.max_payload_bytes,
                config.subscriber_buffer,
                config.max_subscribers,
                stop_clients_rx.clone(),
            ))
            // A Send carries one payload of at most max_payload_bytes, plus its names.
            .max_decoding_message_size(config.max_payload_bytes as usize + small),
        )
        .add_service(
            ClusterServer::new(ClusterApi::new(
                id,
                raft.clone(),
                commit,
                peers,
                config.nodes.clone(),
            ))
            .max_decoding_message_size(small),
        )
        .serve_with_incoming_shutdown(incoming(listeners.client), stopped(stop_clients_rx));
    let peer_server = server_builder(&config, tls.as_ref().map(|t| t.peer_listener()))?
        .add_service(InterceptedService::new(
            PeerServer::new(PeerService::new(
                id,
                raft.clone(),
                proposer,
                liveness,
                election,
                stop_peers_rx.clone(),
            ))
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT),
            RequireSecret::new(config.cluster_secret.clone()),
        ))
        .serve_with_incoming_shutdown(incoming(listeners.peer), stopped(stop_peers_rx));
    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);

    shutdown.await;
    tracing::info!(node = id, "shutting down");
    // Clients first: requests in flight still need the peer listener, to hear the entries they
    // wait for. Then Raft, then the peer listener, so this node starts no election on its way out.
    let _ = stop_clients.send(true);
    report(id, "client", client_task.await);
    while batchers.join_next().await.is_some() {}
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(node = id, error = %e, "raft shutdown");
    }
    // Raft appends nothing more: the next start has no journal to replay.
    if let Err(e) = journal.flush_journal().await {
        tracing::warn!(node = id, error = %e, "committing the journal to redb");
    }
    let _ = stop_peers.send(true);
    report(id, "peer", peer_task.await);
    while tasks.join_next().await.is_some() {}
    tracing::info!(node = id, "stopped");
    Ok(())
}

fn report(
    id: NodeId,
    listener: &str,
    res: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) {
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(node = id, listener, error = %e, "server error"),
        Err(e) => tracing::warn!(node = id, listener, error = %e, "server task failed"),
    }
}

/// Bootstraps a fresh cluster. Every node does it with the same members; a node that already
/// has a log (a restart, or a peer got there first) is refused, which is fine.
async fn initialize(raft: &Raft, config: &Config) -> Result<(), Error> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| Error::Internal(format!("raft: {e}")))?;
    if initialized {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = config
        .nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(&n.peer_addr)))
        .collect();
    if let Err(e) = raft.initialize(members).await {
        tracing::debug!(error = %e, "initialize refused; the cluster already exists");
    }
    Ok(())
}

/// Largest request of a service without payloads: names and tokens only.
const SMALL_REQUEST_LIMIT: usize = 64 * 1024;

/// Both listeners: TLS if configured, streams per connection, and keepalive pings that drop
/// dead connections.
fn server_builder(config: &Config, tls: Option<ServerTlsConfig>) -> Result<Server, Error> {
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::Internal(format!("TLS: {e}")))?;
    }
    Ok(builder
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout)))
}

fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
