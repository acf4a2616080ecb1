//! One node: opens its store, joins Raft, and serves the client and peer listeners until told
//! to stop. Listeners arrive already bound, so callers choose the ports (tests bind port 0).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use sequencer_proto::peer::peer_server::PeerServer;
use sequencer_proto::v1::cluster_server::ClusterServer;
use sequencer_proto::v1::messenger_server::MessengerServer;
use sequencer_proto::v1::sequencer_server::SequencerServer;
use sequencer_proto::v1::tracker_server::TrackerServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use crate::api::cluster::ClusterApi;
use crate::api::health::watch_primary_until;
use crate::api::messenger::MessengerApi;
use crate::api::sequencer::SequencerApi;
use crate::api::tracker::TrackerApi;
use crate::bootstrap;
use crate::config::Config;
use crate::disk::DiskGuard;
use crate::error::Error;
use crate::listener::Incoming;
use crate::peer::{PeerClients, PeerService, RequireSecret, PEER_MESSAGE_LIMIT};
use crate::raft::election::Election;
use crate::raft::network::Network;
use crate::raft::store::{open_store, DataDir};
use crate::raft::{raft_config, NodeId, Raft};
use crate::tls::TlsMaterial;
use crate::write::ids::{AllocPlan, Allocator};
use crate::write::liveness::{Liveness, LivenessTiming};
use crate::write::primary::Router;
use crate::write::proposer::Proposer;
use crate::write::sends::{SendBatcher, SendPlan};
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
    let bootstrap_peers = peers.clone();

    let raft = Raft::new(
        id,
        Arc::new(raft_config(&config)?),
        Network::new(peers.clone()),
        log,
        sm,
    )
    .await
    .map_err(|e| Error::Internal(format!("starting raft: {e}")))?;
    tracing::info!(
        node = id,
        dir = %dir.display(),
        nodes = config.nodes.len(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "node started"
    );

    // Two stops, in order: the client side first, the peer side once Raft has stopped.
    let stop_clients = CancellationToken::new();
    let stop_peers = CancellationToken::new();
    // Every task of the node but the listeners and batchers: each ends on a stop, or when
    // Raft does, and `run` waits for them all before it returns.
    let tasks = TaskTracker::new();
    // A start that fails half way (a `?` below) still stops every task spawned so far: they
    // hold Raft, whose own timer would go on campaigning.
    let _stop_on_exit = (
        stop_clients.clone().drop_guard(),
        stop_peers.clone().drop_guard(),
    );
    // The one route to the primary, for commands, read barriers and heartbeats.
    let router = Router::new(
        id,
        raft.clone(),
        peers.clone(),
        config.raft.election_timeout_max,
        config.batching.request_timeout,
    );
    let proposer = Proposer::new(
        router,
        raft.clone(),
        reader.clone(),
        config.batching.request_timeout,
        DiskGuard::new(&dir, config.disk_reserve_bytes),
    );
    // Batchers end once the client listener has stopped and dropped its handles.
    let mut batchers = JoinSet::new();
    let allocator = Allocator::start(
        AllocPlan {
            max_sequences: config.batching.max_sequences,
        },
        proposer.clone(),
        config.batching.queue_capacity,
        &mut batchers,
    );
    let sender = SendBatcher::start(
        SendPlan {
            limits: config.groups.limits,
        },
        proposer.clone(),
        config.batching.queue_capacity,
        &mut batchers,
    );
    let liveness = Liveness::new(
        raft.clone(),
        reader.clone(),
        proposer.clone(),
        LivenessTiming::of(&config),
    );
    tasks.spawn(
        liveness
            .clone()
            .run_detector(config.groups.limits, stop_peers.clone()),
    );

    let election = Election::new(id, raft.clone(), &config.raft, tasks.clone());
    // Stops with the client listener, so a stopping node starts no election.
    tasks.spawn(election.clone().run(stop_clients.clone()));

    let (reporter, health) = tonic_health::server::health_reporter();
    // NOT_SERVING as soon as the node starts to stop, before the listeners close.
    tasks.spawn(watch_primary_until(
        id,
        raft.clone(),
        reporter,
        stop_clients.clone().cancelled_owned(),
    ));
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
                config.batching.max_batch,
                config.batching.max_sequences,
            ))
            .max_decoding_message_size(small),
        )
        .add_service(
            TrackerServer::new(TrackerApi {
                proposer: proposer.clone(),
                reader: reader.clone(),
                liveness: liveness.clone(),
                limits: config.groups.limits,
                heartbeat_interval: config.groups.client_heartbeat,
                failure_timeout: config.groups.failure_timeout,
            })
            .max_decoding_message_size(small),
        )
        .add_service(
            MessengerServer::new(MessengerApi::new(
                sender,
                reader,
                proposer.clone(),
                config.groups.max_payload_bytes,
                crate::api::messenger::SubscriberLimits {
                    buffer: config.groups.subscriber_buffer,
                    buffer_bytes: config.groups.subscriber_buffer_bytes,
                    max: config.groups.max_subscribers,
                    max_per_client: config.groups.max_subscribers_per_client,
                },
                stop_clients.clone(),
                tasks.clone(),
            ))
            // A Send carries one payload of at most max_payload_bytes, plus its names.
            .max_decoding_message_size(config.groups.max_payload_bytes as usize + small),
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
        .serve_with_incoming_shutdown(
            incoming(listeners.client, "client", &config),
            stop_clients.clone().cancelled_owned(),
        );
    let peer_server = server_builder(&config, tls.as_ref().map(|t| t.peer_listener()))?
        .add_service(InterceptedService::new(
            PeerServer::new(PeerService {
                id,
                raft: raft.clone(),
                proposer,
                liveness,
                election,
                members: bootstrap::members(&config),
                stopping: stop_peers.clone(),
            })
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT),
            RequireSecret::new(config.cluster_secret.clone()),
        ))
        .serve_with_incoming_shutdown(
            incoming(listeners.peer, "peer", &config),
            stop_peers.clone().cancelled_owned(),
        );
    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);
    // Fresh nodes ask their peers first: only a unanimous first start bootstraps a cluster.
    tasks.spawn(bootstrap_task(
        id,
        raft.clone(),
        bootstrap_peers,
        bootstrap::members(&config),
        // A stopping node bootstraps nothing: it stops Raft next.
        stop_clients.clone(),
    ));

    let failed = tokio::select! {
        _ = shutdown => None,
        why = raft_failed(raft.clone()) => Some(why),
    };
    match &failed {
        None => tracing::info!(node = id, "shutting down"),
        Some(why) => tracing::error!(
            node = id,
            dir = %dir.display(),
            error = %why,
            "raft stopped; this node no longer serves and exits"
        ),
    }
    // Clients first: requests in flight still need the peer listener, to hear the entries they
    // wait for. Then Raft, then the peer listener, so this node starts no election on its way out.
    stop_clients.cancel();
    report(id, "client", client_task.await);
    while batchers.join_next().await.is_some() {}
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(node = id, error = %e, "raft shutdown");
    }
    // Raft appends nothing more: the next start has no journal to replay.
    if let Err(e) = journal.flush_journal().await {
        tracing::warn!(node = id, error = %e, "committing the journal to redb");
    }
    stop_peers.cancel();
    report(id, "peer", peer_task.await);
    tasks.close();
    tasks.wait().await;
    if let Some(why) = failed {
        // A supervisor restarts a node that exits; a node left up without Raft serves nothing.
        return Err(Error::RaftStopped(format!("{}: {why}", dir.display())));
    }
    tracing::info!(node = id, "stopped");
    Ok(())
}

/// Resolves when Raft stops other than by our own shutdown (a storage failure such as a full
/// disk), with the cause.
async fn raft_failed(raft: Raft) -> String {
    let mut metrics = raft.metrics();
    let fatal = match metrics.wait_for(|m| m.running_state.is_err()).await {
        Ok(m) => m.running_state.as_ref().err().map(|f| f.to_string()),
        Err(_) => None,
    };
    match fatal {
        // openraft's text leads with the operation and its log ids; say the cause first.
        Some(text) if text.contains("os error 28") => format!("no space left on device ({text})"),
        Some(text) => text,
        // The metrics sender is gone: Raft's core task ended.
        None => "raft's core task ended".into(),
    }
}

async fn bootstrap_task(
    id: NodeId,
    raft: Raft,
    peers: PeerClients,
    members: BTreeSet<NodeId>,
    stop: CancellationToken,
) {
    if let Err(e) = bootstrap::run(id, raft, peers, members, stop).await {
        tracing::error!(node = id, error = %e, "bootstrapping a new cluster failed");
    }
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
        .max_concurrent_streams(Some(config.transport.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.transport.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.transport.http2_keepalive_timeout)))
}

/// Accepts with a preface deadline and a cap on open connections (see `listener`).
fn incoming(listener: TcpListener, name: &'static str, config: &Config) -> Incoming {
    let limits = crate::listener::Limits {
        max_connections: config.transport.max_connections,
        preface_timeout: config.transport.connection_preface_timeout,
    };
    Incoming::new(listener, name, limits)
}
