//! One node: opens its store, joins Raft, and serves the client and peer listeners until told
//! to stop. Listeners arrive already bound, so callers choose the ports (tests bind port 0).

use std::future::Future;
use std::sync::Arc;

use sequencer_proto::peer::peer_server::PeerServer;
use sequencer_proto::v1::admin_server::AdminServer;
use sequencer_proto::v1::cluster_server::ClusterServer;
use sequencer_proto::v1::messenger_server::MessengerServer;
use sequencer_proto::v1::sequencer_server::SequencerServer;
use sequencer_proto::v1::tracker_server::TrackerServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use crate::api::admin::{AdminApi, Credentials};
use crate::api::cluster::ClusterApi;
use crate::api::health::watch_primary_until;
use crate::api::messenger::MessengerApi;
use crate::api::sequencer::SequencerApi;
use crate::api::tracker::TrackerApi;
use crate::bootstrap;
use crate::config::{Config, Entry};
use crate::disk::DiskGuard;
use crate::error::Error;
use crate::http::HttpApi;
use crate::listener::Incoming;
use crate::membership::join::Admission;
use crate::membership::transfer::{Handover, Transfer};
use crate::membership::{join, Book, Membership};
use crate::metrics::grpc::GrpcMetricsLayer;
use crate::metrics::scrape::Sources;
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

/// The bound listeners of a node.
pub struct Listeners {
    /// For clients: Sequencer, Cluster, health, reflection.
    pub client: TcpListener,
    /// For peers only: Raft and forwarding.
    pub peer: TcpListener,
    /// HTTP: the JSON API, /metrics, the probes, the status page; `None`: no HTTP.
    pub http: Option<TcpListener>,
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
    let http_tls = tls.as_ref().map(|t| t.http_listener()).transpose()?;
    // Held until this function returns: nobody else may open this node's data meanwhile.
    let data = DataDir::lock(&dir)?;
    let (log, sm) = open_store(&data)?;
    sm.set_node_id(id);
    let reader = sm.reader();
    let commit = log.commit_index();
    let journal = log.clone();
    let peers = PeerClients::new(&config, id, tls.as_ref())?;
    peers.incarnation().follow(reader.clone());
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
    let handover = Handover::default();
    let proposer = Proposer::new(
        router.clone(),
        raft.clone(),
        reader.clone(),
        config.batching.request_timeout,
        DiskGuard::new(&dir, config.disk_reserve_bytes),
        handover.clone(),
    );
    // The membership after bootstrap: the peer clients follow it, and the primary carries
    // out membership changes and hand-overs.
    let book = Book::new(id, raft.clone(), peers.clone(), &config);
    tasks.spawn(book.clone().run(stop_peers.clone()));
    let election = Election::new(id, raft.clone(), &config.raft, tasks.clone());
    let transfer = Transfer::new(
        id,
        raft.clone(),
        election.clone(),
        book.clone(),
        handover,
        config.raft.election_timeout_max,
    );
    let membership = Membership::new(
        id,
        raft.clone(),
        book.clone(),
        transfer.clone(),
        reader.clone(),
    );
    tasks.spawn(membership.clone().tend(stop_clients.clone()));
    let admission = Admission::default();
    // A node that holds Raft state takes part at once; only a fresh one waits to be told.
    if !bootstrap::is_fresh(&raft).await {
        admission.admit();
    }
    let (proposer_for_announce, reader_for_announce) = (proposer.clone(), reader.clone());
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

    if let Some(schedule) = config.backups.clone() {
        tasks.spawn(crate::backup::schedule::run(
            id,
            raft.clone(),
            proposer.clone(),
            reader.clone(),
            schedule,
            stop_clients.clone(),
        ));
    }
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

    // The services, shared by the gRPC listener and the HTTP one, which calls them.
    let queues = vec![("ids", allocator.depth()), ("sends", sender.depth())];
    let sequencer_api = Arc::new(SequencerApi::new(
        id,
        allocator,
        reader.clone(),
        config.batching.max_batch,
        config.batching.max_sequences,
    ));
    let tracker_api = Arc::new(TrackerApi {
        proposer: proposer.clone(),
        reader: reader.clone(),
        liveness: liveness.clone(),
        limits: config.groups.limits,
        heartbeat_interval: config.groups.client_heartbeat,
        failure_timeout: config.groups.failure_timeout,
    });
    let messenger_api = MessengerApi::new(
        sender,
        reader.clone(),
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
    );
    let cluster_api = Arc::new(ClusterApi {
        id,
        raft: raft.clone(),
        commit: commit.clone(),
        book: book.clone(),
    });
    // Cancelled as soon as the node decides to stop: the probes fail from then on.
    let stopping = CancellationToken::new();
    // Spawned with the other listeners, once nothing more can fail.
    let http = listeners.http.map(|listener| {
        let api = Arc::new(HttpApi {
            id,
            sequencer: sequencer_api.clone(),
            cluster: cluster_api.clone(),
            tracker: tracker_api.clone(),
            proposer: proposer.clone(),
            reader: reader.clone(),
            raft: raft.clone(),
            metrics: Sources {
                id,
                raft: raft.clone(),
                commit: commit.clone(),
                reader: reader.clone(),
                dir: dir.clone(),
                queues,
                queue_capacity: config.batching.queue_capacity,
                subscribers: messenger_api.open_subscriptions(),
            },
            stopping: stopping.clone(),
            ready_within: config.batching.request_timeout.min(READY_WITHIN),
        });
        let serving = crate::http::Serving {
            tls: http_tls,
            max_connections: config.transport.max_connections,
            header_timeout: config.transport.connection_preface_timeout,
            max_concurrent_streams: config.transport.max_concurrent_streams,
            keepalive_interval: config.transport.http2_keepalive_interval,
            keepalive_timeout: config.transport.http2_keepalive_timeout,
        };
        (listener, crate::http::router(api), serving)
    });
    let small = SMALL_REQUEST_LIMIT;
    let client_server = server_builder(&config, tls.as_ref().map(|t| t.client_listener()))?
        .layer(GrpcMetricsLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            SequencerServer::from_arc(sequencer_api.clone()).max_decoding_message_size(small),
        )
        .add_service(TrackerServer::from_arc(tracker_api.clone()).max_decoding_message_size(small))
        .add_service(
            MessengerServer::new(messenger_api)
                // A Send carries one payload of at most max_payload_bytes, plus its names.
                .max_decoding_message_size(config.groups.max_payload_bytes as usize + small),
        )
        .add_service(ClusterServer::from_arc(cluster_api.clone()).max_decoding_message_size(small))
        .add_service(
            AdminServer::new(AdminApi {
                proposer: proposer.clone(),
                reader: reader.clone(),
                router,
                membership: membership.clone(),
                credentials: Credentials {
                    admin_token: config.admin_token.clone(),
                    cluster_secret: config.cluster_secret.clone(),
                    client_auth: config.tls.as_ref().is_some_and(|t| t.client_auth),
                },
            })
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
                membership,
                reader: reader.clone(),
                log: journal.clone(),
                admission: admission.clone(),
                members: bootstrap::members(&config),
                stopping: stop_peers.clone(),
            })
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT),
            RequireSecret::new(config.cluster_secret.clone(), peers.incarnation().clone()),
        ))
        .serve_with_incoming_shutdown(
            incoming(listeners.peer, "peer", &config),
            stop_peers.clone().cancelled_owned(),
        );
    // The servers hold the services now; the batchers end once the servers drop them.
    drop((sequencer_api, tracker_api, cluster_api));
    let client_task = tokio::spawn(client_server);
    let http_task = http.map(|(listener, router, serving)| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(node = id, %addr, tls = serving.tls.is_some(), "serving HTTP");
        }
        let stop = stop_clients.clone();
        tokio::spawn(crate::http::serve(id, listener, router, serving, stop))
    });
    let peer_task = tokio::spawn(peer_server);
    // How a fresh node enters: only a unanimous first start bootstraps a cluster, and a
    // node joins one that exists only when asked to. A refusal stops the node.
    let (refuse, refused) = tokio::sync::oneshot::channel();
    tasks.spawn(entry_task(
        id,
        config.clone(),
        tls.clone(),
        raft.clone(),
        bootstrap_peers,
        admission,
        // A stopping node bootstraps nothing: it stops Raft next.
        stop_clients.clone(),
        refuse,
    ));
    tasks.spawn(join::announce_started(
        id,
        raft.clone(),
        proposer_for_announce,
        reader_for_announce,
        stop_clients.clone(),
    ));

    let stopped = tokio::select! {
        _ = shutdown => Stop::Asked,
        why = raft_failed(raft.clone()) => Stop::RaftFailed(why),
        Ok(why) = refused => Stop::Refused(why),
    };
    stopping.cancel();
    match &stopped {
        Stop::Asked => {
            tracing::info!(node = id, "shutting down");
            hand_over_before_stopping(id, &raft, &transfer, &book).await;
        }
        Stop::RaftFailed(why) => tracing::error!(
            node = id,
            dir = %dir.display(),
            error = %why,
            "raft stopped; this node no longer serves and exits"
        ),
        Stop::Refused(why) => tracing::error!(node = id, error = %why, "refusing to start"),
    }
    // Clients first: requests in flight still need the peer listener, to hear the entries they
    // wait for. Then Raft, then the peer listener, so this node starts no election on its way out.
    stop_clients.cancel();
    report(id, "client", client_task.await);
    // Its handlers hold the batchers' handles too.
    if let Some(task) = http_task {
        if let Err(e) = task.await {
            tracing::warn!(node = id, error = %e, "http server task failed");
        }
    }
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
    match stopped {
        // A supervisor restarts a node that exits; a node left up without Raft serves nothing.
        Stop::RaftFailed(why) => {
            return Err(Error::RaftStopped(format!("{}: {why}", dir.display())))
        }
        Stop::Refused(why) => return Err(Error::Refused(why)),
        Stop::Asked => {}
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

/// Why the node stops.
enum Stop {
    Asked,
    RaftFailed(String),
    Refused(String),
}

/// A primary asked to stop hands over first, so that stopping it costs no election.
async fn hand_over_before_stopping(id: NodeId, raft: &Raft, transfer: &Transfer, book: &Book) {
    if raft.metrics().borrow().current_leader != Some(id) {
        return;
    }
    let view = book.view();
    if view.voters.len() < 2 {
        return;
    }
    let deadline = tokio::time::Instant::now() + HAND_OVER_ON_STOP;
    match transfer.hand_over(&view, None, deadline).await {
        Ok((to, took)) => tracing::info!(
            node = id,
            to,
            took_ms = took.as_millis() as u64,
            "handed the primary over before stopping"
        ),
        Err(e) => {
            tracing::warn!(node = id, error = %e, "could not hand the primary over; stopping anyway")
        }
    }
}

/// How long a stopping primary tries to hand over.
const HAND_OVER_ON_STOP: std::time::Duration = std::time::Duration::from_secs(3);

#[allow(clippy::too_many_arguments)]
async fn entry_task(
    id: NodeId,
    config: Config,
    tls: Option<TlsMaterial>,
    raft: Raft,
    peers: PeerClients,
    admission: Admission,
    stop: CancellationToken,
    refuse: tokio::sync::oneshot::Sender<String>,
) {
    let tls = tls.as_ref();
    let res = match &config.entry {
        Entry::Bootstrap => {
            let members = bootstrap::members(&config);
            bootstrap::run(id, raft, peers, members, &admission, stop).await
        }
        Entry::Join(via) => {
            join::run(id, &config, tls, &raft, (via, false), &admission, stop).await
        }
        Entry::Rejoin(via) => {
            join::run(id, &config, tls, &raft, (via, true), &admission, stop).await
        }
    };
    match res {
        Ok(()) => {}
        Err(Error::Refused(why)) => {
            let _ = refuse.send(why);
        }
        Err(e) => tracing::error!(node = id, error = %e, "entering the cluster failed"),
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

/// Longest a readiness probe waits to hear from the primary (less if request_timeout_ms is).
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

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
