//! `sequencer.v1.Admin`: membership changes and primary hand-over. Every node takes these
//! calls, checks the caller's credential here, and passes the call along the one route to the
//! primary, which carries it out (`membership::change`).

use std::time::Duration;

use sequencer_proto::v1::admin_server::Admin;
use sequencer_proto::v1::{
    AddMemberRequest, AdminListRequest, AdminListResponse, BackupChunk, BackupRequest,
    BackupSummary, ClusterMember, MembershipResponse, PromoteMemberRequest, RemoveMemberRequest,
    TransferPrimaryRequest, TransferPrimaryResponse,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::wire_id;
use crate::config::ClusterSecret;
use crate::error::Error;
use crate::membership::{Call, ChangeError, Done, Listing, Membership};
use crate::peer::messages;
use crate::raft::state_machine::StateReader;
use crate::raft::{Member, NodeId};
use crate::write::primary::{peer_error, Router, Step};
use crate::write::proposer::Proposer;

/// The header that carries the admin token.
pub const ADMIN_TOKEN_HEADER: &str = "x-admin-token";
/// The header a joining node proves its cluster secret with.
pub const CLUSTER_SECRET_HEADER: &str = "x-cluster-secret";

/// A call's deadline when it names none; a learner catching up a large state takes a while.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// The longest any admin call may run.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// Who may change the membership.
#[derive(Clone)]
pub struct Credentials {
    pub admin_token: Option<ClusterSecret>,
    pub cluster_secret: Option<ClusterSecret>,
    /// A client certificate (verified by the TLS layer against tls_ca) vouches for the caller.
    pub client_auth: bool,
}

impl Credentials {
    /// Whether `req` may make a change. A node that proves the cluster secret is a peer, and
    /// could already do anything to Raft; a wrong secret is refused whatever else it carries,
    /// so a node of another cluster never joins this one.
    fn check<T>(&self, req: &Request<T>) -> Result<(), Error> {
        let header = |name| req.metadata().get(name).map(|v| v.as_bytes());
        if let Some(presented) = header(CLUSTER_SECRET_HEADER) {
            return match &self.cluster_secret {
                Some(s) if s.matches(presented) => Ok(()),
                _ => Err(Error::Unauthenticated(
                    "the caller's cluster secret differs from this cluster's".into(),
                )),
            };
        }
        let has_cert = req.peer_certs().is_some_and(|c| !c.is_empty());
        if self.client_auth && has_cert {
            return Ok(());
        }
        match (&self.admin_token, header(ADMIN_TOKEN_HEADER)) {
            (Some(t), Some(p)) if t.matches(p) => Ok(()),
            (Some(_), Some(_)) => Err(Error::Unauthenticated("wrong admin token".into())),
            (Some(_), None) => Err(Error::Unauthenticated(format!(
                "admin calls need the admin token in the {ADMIN_TOKEN_HEADER} header \
                 (`client` sends SEQUENCER_ADMIN_TOKEN, or data_dir/admin.token)"
            ))),
            (None, _) => Err(Error::PermissionDenied(
                "admin calls are off on this cluster: no admin_token is configured (config, \
                 SEQUENCER_ADMIN_TOKEN, or the launcher's data_dir/admin.token), and no client \
                 certificate vouches for the caller"
                    .into(),
            )),
        }
    }
}

pub struct AdminApi {
    pub router: Router,
    pub membership: Membership,
    pub credentials: Credentials,
    /// For backups: a read barrier, then this node's applied state.
    pub proposer: Proposer,
    pub reader: StateReader,
}

/// Bytes of a backup per streamed message.
const BACKUP_CHUNK: usize = 256 * 1024;

type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<BackupChunk, Status>> + Send>>;

impl AdminApi {
    async fn call<T>(&self, req: &Request<T>, call: Call) -> Result<Done, Status> {
        if call.changes() {
            self.credentials.check(req)?;
        }
        // A listing is a read: it answers within a request's time, not a change's.
        let wait = match call {
            Call::List => deadline_of(req).min(self.router.timeout()),
            _ => deadline_of(req),
        };
        let deadline = Instant::now() + wait;
        let call = &call;
        let membership = &self.membership;
        // A change may wait for a learner to catch up, or move the primary itself: the
        // forward runs by the call's deadline, whatever the primary does meanwhile.
        let done = self
            .router
            .patient(MAX_DEADLINE)
            .on_primary(
                "admin",
                deadline,
                |deadline| async move { step(membership.here(call, deadline).await) },
                |peer, wait| async move {
                    match peer.call::<messages::Admin>(call, wait).await {
                        Ok(outcome) => step(outcome),
                        Err(e) => peer_error(e),
                    }
                },
            )
            .await?;
        Ok(done)
    }

    async fn members<T>(
        &self,
        req: &Request<T>,
        call: Call,
    ) -> Result<Response<MembershipResponse>, Status> {
        match self.call(req, call).await? {
            Done::Members(listing) => Ok(Response::new(MembershipResponse {
                members: Some(listing_to_wire(listing)),
            })),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }
}

fn step(outcome: Result<Done, ChangeError>) -> Step<Done> {
    match outcome {
        Ok(done) => Step::Done(done),
        Err(ChangeError::NotPrimary) => Step::Retry("the primary moved".into()),
        Err(e) => Step::Fail(e.into()),
    }
}

/// The caller's grpc-timeout, or a minute, never over [`MAX_DEADLINE`], less a margin for
/// the answer to reach the caller in time: a "not yet" the caller never hears is no answer.
pub fn deadline_of<T>(req: &Request<T>) -> Duration {
    let t = crate::peer::grpc_timeout(req)
        .unwrap_or(DEFAULT_DEADLINE)
        .min(MAX_DEADLINE);
    t.saturating_sub(t / 20 + Duration::from_millis(20))
}

fn listing_to_wire(l: Listing) -> AdminListResponse {
    AdminListResponse {
        primary: wire_id(l.primary),
        members: l
            .members
            .into_iter()
            .map(|m| ClusterMember {
                id: wire_id(m.id),
                addr: m.member.addr,
                peer_addr: m.member.peer_addr,
                role: if m.voter { "voter" } else { "learner" }.into(),
                primary: m.primary,
                matched_index: m.matched,
                lag: m.lag,
            })
            .collect(),
        membership_index: l.index,
        changing: l.changing,
    }
}

fn id_of(id: u32) -> NodeId {
    NodeId::from(id)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    type BackupStream = BackupStream;

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<BackupStream>, Status> {
        self.credentials.check(&req)?;
        let id = self.router.id();
        let taken = crate::backup::take::take(id, &self.proposer, &self.reader).await?;
        let h = &taken.header;
        let summary = BackupSummary {
            index: h.index,
            sequences: h.sequences,
            groups: h.groups,
            bytes: taken.bytes.len() as u64,
            sha256: crate::backup::file::sha256_hex(&taken.bytes),
            served_by: wire_id(id),
            taken_at_ms: h.taken_at_ms,
        };
        let bytes = bytes::Bytes::from(taken.bytes);
        let count = bytes.len().div_ceil(BACKUP_CHUNK).max(1);
        let chunks = (0..count).map(move |i| {
            let end = ((i + 1) * BACKUP_CHUNK).min(bytes.len());
            Ok(BackupChunk {
                data: bytes.slice(i * BACKUP_CHUNK..end).to_vec(),
                summary: (i + 1 == count).then(|| summary.clone()),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn list_members(
        &self,
        req: Request<AdminListRequest>,
    ) -> Result<Response<AdminListResponse>, Status> {
        match self.call(&req, Call::List).await? {
            Done::Members(listing) => Ok(Response::new(listing_to_wire(listing))),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let r = req.get_ref();
        let call = Call::Add {
            id: id_of(r.id),
            member: Member {
                addr: r.addr.clone(),
                peer_addr: r.peer_addr.clone(),
            },
            learner_only: r.learner_only,
            // A node proves the cluster secret when it asks to join itself.
            by_itself: req.metadata().get(CLUSTER_SECRET_HEADER).is_some(),
        };
        self.members(&req, call).await
    }

    async fn promote_member(
        &self,
        req: Request<PromoteMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let id = id_of(req.get_ref().id);
        self.members(&req, Call::Promote { id }).await
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let (id, force) = (id_of(req.get_ref().id), req.get_ref().force);
        self.members(&req, Call::Remove { id, force }).await
    }

    async fn transfer_primary(
        &self,
        req: Request<TransferPrimaryRequest>,
    ) -> Result<Response<TransferPrimaryResponse>, Status> {
        let to = Some(id_of(req.get_ref().to)).filter(|id| *id != 0);
        match self.call(&req, Call::Transfer { to }).await? {
            Done::Transferred { from, to, took_ms } => Ok(Response::new(TransferPrimaryResponse {
                from: wire_id(from),
                to: wire_id(to),
                took_ms: u32::try_from(took_ms).unwrap_or(u32::MAX),
            })),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }
}
