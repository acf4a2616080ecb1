//! The cluster's Raft membership as tests see it: one-attempt Admin calls ([`Admin`]), and
//! waits until every running member agrees on the voters and learners, and until a member has
//! caught up with the primary. Each wait polls with a deadline and fails at once if a node it
//! counts on has exited.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::bail;
use sequencer_client::pb::admin_client::AdminClient;
use sequencer_client::pb::{
    AddMemberRequest, AdminListRequest, AdminListResponse, MembershipResponse,
    PromoteMemberRequest, RemoveMemberRequest, TransferPrimaryRequest, TransferPrimaryResponse,
};
use serde_json::Value;
use tokio::time::{sleep, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::{Cluster, READY_TIMEOUT};

/// Voters and learners, each sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl Roles {
    pub fn new(voters: &[u64], learners: &[u64]) -> Roles {
        let sorted = |ids: &[u64]| {
            let set: BTreeSet<u64> = ids.iter().copied().collect();
            set.into_iter().collect()
        };
        Roles {
            voters: sorted(voters),
            learners: sorted(learners),
        }
    }

    /// The roles a ListMembers answer names.
    pub fn of_listing(list: &AdminListResponse) -> Roles {
        let with = |role: &str| -> Vec<u64> {
            list.members
                .iter()
                .filter(|m| m.role == role)
                .map(|m| u64::from(m.id))
                .collect()
        };
        Roles::new(&with("voter"), &with("learner"))
    }

    /// Every member.
    pub fn members(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.voters.iter().chain(&self.learners).copied().collect();
        all.sort();
        all
    }
}

/// Admin calls to one node, one attempt each (a call cut off is not sent again), with the
/// cluster's admin token. Plaintext.
#[derive(Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
    token: Option<String>,
    timeout: Duration,
}

impl Admin {
    /// How long each call may take (default 60 s: a learner may take a while to catch up).
    pub fn with_timeout(mut self, timeout: Duration) -> Admin {
        self.timeout = timeout;
        self
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.timeout);
        if let Some(t) = &self.token {
            req.metadata_mut()
                .insert("x-admin-token", t.parse().expect("an ASCII admin token"));
        }
        req
    }

    pub async fn list(&mut self) -> Result<AdminListResponse, Status> {
        let req = self.req(AdminListRequest {});
        self.client.list_members(req).await.map(|r| r.into_inner())
    }

    pub async fn add(
        &mut self,
        id: u64,
        addr: &str,
        peer_addr: &str,
        learner_only: bool,
    ) -> Result<AdminListResponse, Status> {
        let req = self.req(AddMemberRequest {
            id: id as u32,
            addr: addr.into(),
            peer_addr: peer_addr.into(),
            learner_only,
        });
        members(self.client.add_member(req).await)
    }

    pub async fn promote(&mut self, id: u64) -> Result<AdminListResponse, Status> {
        let req = self.req(PromoteMemberRequest { id: id as u32 });
        members(self.client.promote_member(req).await)
    }

    pub async fn remove(&mut self, id: u64, force: bool) -> Result<AdminListResponse, Status> {
        let req = self.req(RemoveMemberRequest {
            id: id as u32,
            force,
        });
        members(self.client.remove_member(req).await)
    }

    /// Hands the primary to `to` (0: the most up-to-date voter).
    pub async fn transfer(&mut self, to: u64) -> Result<TransferPrimaryResponse, Status> {
        let req = self.req(TransferPrimaryRequest { to: to as u32 });
        self.client
            .transfer_primary(req)
            .await
            .map(|r| r.into_inner())
    }
}

fn members(
    resp: Result<tonic::Response<MembershipResponse>, Status>,
) -> Result<AdminListResponse, Status> {
    Ok(resp?.into_inner().members.unwrap_or_default())
}

/// How a member looks to the primary.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The primary's last log index.
    pub primary_last: u64,
    /// The last index the primary knows the member holds.
    pub matched: u64,
}

impl Cluster {
    /// The `admin_token` of the nodes' config, if there is one.
    pub fn admin_token(&self) -> Option<String> {
        let config: Value = serde_json::from_slice(&std::fs::read(&self.config_path).ok()?).ok()?;
        config.get("admin_token")?.as_str().map(String::from)
    }

    /// Admin calls to node `id` with the cluster's admin token. Nothing connects until the
    /// first call.
    pub fn admin(&self, id: u64) -> Admin {
        let channel = Endpoint::from_shared(format!("http://{}", self.node(id).addr))
            .expect("a valid address")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        Admin {
            client: AdminClient::new(channel),
            token: self.admin_token(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Waits until every running member answers ListMembers with these voters and learners
    /// and no change half done, and its own Status (the membership it has applied) names the
    /// same; returns one of the listings.
    pub async fn wait_members(
        &mut self,
        voters: &[u64],
        learners: &[u64],
    ) -> anyhow::Result<AdminListResponse> {
        let want = Roles::new(voters, learners);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let running = self.running();
            let ask: Vec<u64> = want
                .members()
                .into_iter()
                .filter(|id| running.contains(id))
                .collect();
            let seen = self.memberships(&ask).await;
            let agreed = !seen.is_empty()
                && seen.iter().all(|s| match s {
                    Seen::Answered {
                        listing, applied, ..
                    } => {
                        Roles::of_listing(listing) == want && !listing.changing && *applied == want
                    }
                    Seen::Failed { .. } => false,
                });
            if agreed {
                if let Some(Seen::Answered { listing, .. }) = seen.first() {
                    return Ok(listing.clone());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the members never agreed on {want:?} within {READY_TIMEOUT:?}: {}\n{}",
                    describe(&seen),
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to `within` until every running node among `ask` answers ListMembers with the
    /// same voters and learners and no change half done, and its own Status names those too:
    /// the cluster settled on one membership, whichever. Returns it.
    pub async fn wait_settled(&mut self, ask: &[u64], within: Duration) -> anyhow::Result<Roles> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive()?;
            let running = self.running();
            let ask: Vec<u64> = ask
                .iter()
                .copied()
                .filter(|id| running.contains(id))
                .collect();
            let seen = self.memberships(&ask).await;
            let mut agreed: Option<Roles> = None;
            let mut settled = !seen.is_empty();
            for s in &seen {
                match s {
                    Seen::Answered {
                        listing, applied, ..
                    } if !listing.changing => {
                        let roles = Roles::of_listing(listing);
                        if roles != *applied || agreed.as_ref().is_some_and(|a| *a != roles) {
                            settled = false;
                        }
                        agreed = Some(roles);
                    }
                    _ => settled = false,
                }
            }
            if let (true, Some(roles)) = (settled, agreed) {
                return Ok(roles);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the membership did not settle within {within:?}: {}\n{}",
                    describe(&seen),
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// What node `id` says about the membership: the primary's listing through it, and the
    /// roles its own Status names (as it has applied the membership).
    pub async fn membership_seen_by(&self, id: u64) -> Result<(AdminListResponse, Roles), String> {
        let mut admin = self.admin(id).with_timeout(Duration::from_secs(2));
        let listing = admin.list().await.map_err(|e| e.to_string())?;
        let status = self
            .client_for(id)
            .with_deadline(Duration::from_secs(2))
            .status()
            .await
            .map_err(|e| e.to_string())?;
        let with = |role: &str| -> Vec<u64> {
            status
                .nodes
                .iter()
                .filter(|n| n.role == role)
                .map(|n| u64::from(n.id))
                .collect()
        };
        Ok((listing, Roles::new(&with("voter"), &with("learner"))))
    }

    async fn memberships(&self, ask: &[u64]) -> Vec<Seen> {
        let mut seen = Vec::new();
        for &id in ask {
            seen.push(match self.membership_seen_by(id).await {
                Ok((listing, applied)) => Seen::Answered {
                    id,
                    listing,
                    applied,
                },
                Err(error) => Seen::Failed { id, error },
            });
        }
        seen
    }

    /// How far member `id` is, as the primary sees it (asked through node `via`).
    pub async fn progress(&self, via: u64, id: u64) -> anyhow::Result<Progress> {
        let mut admin = self.admin(via).with_timeout(Duration::from_secs(2));
        let listing = admin.list().await?;
        let primary_last = listing
            .members
            .iter()
            .find(|m| m.primary)
            .map(|m| m.matched_index);
        let matched = listing
            .members
            .iter()
            .find(|m| u64::from(m.id) == id)
            .map(|m| m.matched_index);
        match (primary_last, matched) {
            (Some(primary_last), Some(matched)) => Ok(Progress {
                primary_last,
                matched,
            }),
            _ => bail!("the listing names no primary or no node {id}: {listing:?}"),
        }
    }

    /// Waits until member `id` holds and has applied every entry the primary had when this was
    /// called (asked through node `via`).
    pub async fn wait_caught_up(&mut self, via: u64, id: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut target = None;
        loop {
            self.check_alive()?;
            let progress = self.progress(via, id).await;
            if let Ok(p) = &progress {
                let target = *target.get_or_insert(p.primary_last);
                let applied = self
                    .client_for(id)
                    .with_deadline(Duration::from_secs(1))
                    .status()
                    .await
                    .map(|s| s.applied_index)
                    .unwrap_or(0);
                if p.matched >= target && applied >= target {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not catch up with index {target:?} within {READY_TIMEOUT:?}: \
                     {progress:?}\n{}",
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What one node said about the membership.
enum Seen {
    Answered {
        id: u64,
        listing: AdminListResponse,
        applied: Roles,
    },
    Failed {
        id: u64,
        error: String,
    },
}

fn describe(seen: &[Seen]) -> String {
    let lines: Vec<String> = seen
        .iter()
        .map(|s| match s {
            Seen::Answered {
                id,
                listing,
                applied,
            } => format!(
                "node {id}: primary {} lists {:?} (changing: {}, index {}), applied {:?}",
                listing.primary,
                Roles::of_listing(listing),
                listing.changing,
                listing.membership_index,
                applied
            ),
            Seen::Failed { id, error } => format!("node {id}: {error}"),
        })
        .collect();
    if lines.is_empty() {
        "no running member to ask".into()
    } else {
        lines.join("; ")
    }
}
