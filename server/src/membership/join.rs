//! A node with an empty data dir entering a cluster that exists. `--join HOST:PORT` asks the
//! cluster at that client address to add this node: the primary makes it a learner, waits
//! until it has caught up (by log or snapshot), then makes it a voter. `--rejoin` first
//! removes the node's old self, whose vote was lost with its disk. Neither ever bootstraps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sequencer_proto::v1::admin_client::AdminClient;
use sequencer_proto::v1::{AddMemberRequest, RemoveMemberRequest};
use tokio_util::sync::CancellationToken;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Request};

use crate::api::admin::{ADMIN_TOKEN_HEADER, CLUSTER_SECRET_HEADER, MAX_DEADLINE};
use crate::bootstrap::is_fresh;
use crate::config::Config;
use crate::error::Error;
use crate::raft::{NodeId, Raft};
use crate::tls::TlsMaterial;

/// Whether this node takes Raft traffic yet. A node with an empty data dir does not until it
/// knows it may: otherwise the primary would refill the log of a voter that lost its disk, and
/// it would vote again as if it had never forgotten anything. Cheap to clone.
#[derive(Clone, Default)]
pub struct Admission(Arc<AtomicBool>);

impl Admission {
    pub fn admit(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn admitted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Once this node is a member with the membership applied, it announces that it runs (as an
/// etcd member publishes itself), so that an empty data dir under its id is refused later.
pub async fn announce_started(
    id: NodeId,
    raft: Raft,
    proposer: crate::write::proposer::Proposer,
    reader: crate::raft::state_machine::StateReader,
    stop: CancellationToken,
) {
    let mut metrics = raft.metrics();
    loop {
        let started = reader.read(|a| a.state.started.contains(&id));
        if started {
            return;
        }
        let member = super::View::of(&raft).members.contains_key(&id);
        let leader_known = metrics.borrow().current_leader.is_some();
        if member && leader_known {
            let cmd = crate::state::Command::Started { node: id };
            match proposer.commit(cmd).await {
                Ok(_) => {
                    tracing::info!(node = id, "announced this node as a started member");
                    return;
                }
                Err(e) => tracing::debug!(node = id, error = %e, "announcing this node"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        // As soon as this node is a member and a primary is known.
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Pause between tries while the cluster has no primary or does not answer.
const RETRY: Duration = Duration::from_millis(500);

/// Joins the cluster at `via` (after removing this node's old self if `rejoin`). Returns
/// `Refused` with one line to print when the cluster will not have this node.
pub async fn run(
    id: NodeId,
    config: &Config,
    tls: Option<&TlsMaterial>,
    raft: &Raft,
    (via, rejoin): (&str, bool),
    admission: &Admission,
    stop: CancellationToken,
) -> Result<(), Error> {
    if !is_fresh(raft).await {
        admission.admit();
        tracing::info!(
            node = id,
            "this node holds the cluster's state already: nothing to join"
        );
        return Ok(());
    }
    let Some(me) = config.node(id) else {
        return Err(Error::Refused(format!("node {id} is not in the config")));
    };
    let endpoint = crate::tls::endpoint(via, tls)?.connect_timeout(Duration::from_secs(2));
    let admin = AdminClient::new(endpoint.connect_lazy());
    let credentials = Credentials::of(config)?;
    if rejoin {
        tracing::info!(
            node = id,
            via,
            "rejoining: removing this node's old self first"
        );
        // Until its old self is removed, the primary would take this node for it.
        let remove = RemoveMemberRequest {
            id: crate::api::wire_id(id),
            force: false,
        };
        let res = until_answered(&stop, || {
            let mut admin = admin.clone();
            let req = credentials.request(remove);
            async move { admin.remove_member(req).await.map(|_| ()) }
        })
        .await;
        match res {
            Ok(()) => tracing::info!(
                node = id,
                "removed this node's old self from the membership"
            ),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(refused(id, via, "remove its old self", &s)),
        }
    }
    // From here the primary replicates to this node only as the learner it adds.
    admission.admit();
    tracing::info!(node = id, via, "asking the cluster to add this node");
    let add = AddMemberRequest {
        id: crate::api::wire_id(id),
        addr: me.addr.clone(),
        peer_addr: me.peer_addr.clone(),
        learner_only: false,
    };
    let res = until_answered(&stop, || {
        let mut admin = admin.clone();
        let req = credentials.request(add.clone());
        async move { admin.add_member(req).await.map(|_| ()) }
    })
    .await;
    match res {
        Ok(()) => {
            tracing::info!(node = id, via, "joined the cluster as a voter");
            Ok(())
        }
        Err(s)
            if s.code() == Code::AlreadyExists && s.message().contains(&format!("node {id} ")) =>
        {
            Err(Error::Refused(format!(
                "node {id} has an empty data dir but the cluster at {via} already lists it as \
                 a member: start it with `--rejoin {via}` to remove its old self and join again"
            )))
        }
        Err(s) => Err(refused(id, via, "add it", &s)),
    }
}

/// Retries `call` while the cluster cannot answer (no primary, a node restarting).
async fn until_answered<F, Fut>(stop: &CancellationToken, mut call: F) -> Result<(), tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let give_up = tokio::time::Instant::now() + MAX_DEADLINE;
    loop {
        let res = tokio::select! {
            res = call() => res,
            _ = stop.cancelled() => return Err(tonic::Status::cancelled("the node is stopping")),
        };
        // Another change runs (nodes joining together): one at a time, so wait our turn.
        let busy = s_busy(&res);
        match res {
            Err(s)
                if (s.code() == Code::Unavailable || busy)
                    && tokio::time::Instant::now() < give_up =>
            {
                tracing::info!(error = %s.message(), "the cluster cannot take this yet; trying again");
                tokio::time::sleep(RETRY).await;
            }
            other => return other,
        }
    }
}

/// Refused only because another membership change is under way.
fn s_busy(res: &Result<(), tonic::Status>) -> bool {
    matches!(res, Err(s) if s.code() == Code::FailedPrecondition
        && (s.message().contains("in progress") || s.message().contains("half done")))
}

fn refused(id: NodeId, via: &str, what: &str, s: &tonic::Status) -> Error {
    Error::Refused(format!(
        "node {id}: the cluster at {via} did not {what}: {} ({:?})",
        s.message(),
        s.code()
    ))
}

/// The headers a joining node sends: its cluster secret, and the admin token if it has one.
struct Credentials {
    secret: Option<AsciiMetadataValue>,
    token: Option<AsciiMetadataValue>,
}

impl Credentials {
    fn of(config: &Config) -> Result<Self, Error> {
        let header = |s: Option<&crate::config::ClusterSecret>| {
            s.map(|s| {
                s.expose()
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| Error::Internal("a secret is not a valid header".into()))
            })
            .transpose()
        };
        Ok(Self {
            secret: header(config.cluster_secret.as_ref())?,
            token: header(config.admin_token.as_ref())?,
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(MAX_DEADLINE);
        if let Some(s) = &self.secret {
            req.metadata_mut().insert(CLUSTER_SECRET_HEADER, s.clone());
        }
        if let Some(t) = &self.token {
            req.metadata_mut().insert(ADMIN_TOKEN_HEADER, t.clone());
        }
        req
    }
}
