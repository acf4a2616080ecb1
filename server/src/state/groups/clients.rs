//! Clients and membership: registering, tokens (kept as SHA-256 hashes, compared in constant
//! time), joining and leaving, and dropping a client that unregisters or fails.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Group, GroupLimits, Groups, Kind, Touched};
use crate::state::{valid_name, Rejected};

/// A member as listed by the tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub client_id: u64,
    pub name: String,
    pub joined_at_seq: u64,
}

/// The answer to a Join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub next_seq: u64,
    pub members: Vec<Member>,
    pub next_sender_seq: u64,
}

/// A registered client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ClientRecord {
    pub(super) name: String,
    token_hash: String,
    groups: BTreeSet<String>,
    /// Groups holding this client's sender state; it outlives a leave and goes with the client.
    pub(super) sent_to: BTreeSet<String>,
}

/// The stored form of a token: its SHA-256, hex.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Groups {
    fn authenticate(&self, client_id: u64, token_hash: &str) -> Result<&ClientRecord, Rejected> {
        match self.clients.get(&client_id) {
            // Constant time: how long a refusal takes says nothing about the stored hash.
            Some(c) if bool::from(c.token_hash.as_bytes().ct_eq(token_hash.as_bytes())) => Ok(c),
            _ => Err(Rejected::Unauthenticated),
        }
    }

    /// Whether `token_hash` belongs to `client_id`.
    pub fn check_token(&self, client_id: u64, token_hash: &str) -> Result<(), Rejected> {
        self.authenticate(client_id, token_hash).map(|_| ())
    }

    /// Whether `client_id` is a member of `group` (after authenticating it).
    pub fn check_member(
        &self,
        client_id: u64,
        token_hash: &str,
        group: &str,
    ) -> Result<(), Rejected> {
        self.authenticate(client_id, token_hash)?;
        let g = self
            .groups
            .get(group)
            .ok_or_else(|| Rejected::UnknownGroup(group.to_string()))?;
        if g.members.contains_key(&client_id) {
            Ok(())
        } else {
            Err(Rejected::NotMember(group.to_string()))
        }
    }

    pub fn register(
        &mut self,
        name: &str,
        token_hash: &str,
        limits: &GroupLimits,
    ) -> Result<u64, Rejected> {
        if !valid_name(name) {
            return Err(Rejected::InvalidName(name.to_string()));
        }
        if self.clients.len() >= limits.max_clients as usize {
            return Err(Rejected::TooManyClients {
                max: limits.max_clients,
            });
        }
        let id = self.next_client_id;
        self.next_client_id += 1;
        self.clients.insert(
            id,
            ClientRecord {
                name: name.to_string(),
                token_hash: token_hash.to_string(),
                groups: BTreeSet::new(),
                sent_to: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    pub fn join(
        &mut self,
        client_id: u64,
        token_hash: &str,
        group: &str,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) -> Result<Joined, Rejected> {
        let name = self.authenticate(client_id, token_hash)?.name.clone();
        if !valid_name(group) {
            return Err(Rejected::InvalidName(group.to_string()));
        }
        if !self.groups.contains_key(group) && self.groups.len() >= limits.max_groups as usize {
            return Err(Rejected::TooManyGroups {
                max: limits.max_groups,
            });
        }
        let g = self
            .groups
            .entry(group.to_string())
            .or_insert_with(Group::new);
        if !g.members.contains_key(&client_id) {
            if g.members.len() >= limits.max_members_per_group as usize {
                // The group may have just been created for this join; it stays, empty.
                return Err(Rejected::TooManyMembers {
                    max: limits.max_members_per_group,
                });
            }
            let before = g.retained_bytes;
            let at = g.event(Kind::Joined, client_id, &name, limits);
            g.members.insert(
                client_id,
                Member {
                    client_id,
                    name,
                    joined_at_seq: at,
                },
            );
            touched.push(group.to_string());
            if let Some(c) = self.clients.get_mut(&client_id) {
                c.groups.insert(group.to_string());
            }
            self.retained_changed(group, before, limits);
        }
        let g = &self.groups[group];
        Ok(Joined {
            next_seq: g.next_seq,
            members: g.members.values().cloned().collect(),
            next_sender_seq: g
                .senders
                .get(&client_id)
                .map(|s| s.next_sender_seq)
                .unwrap_or(1),
        })
    }

    pub fn leave(
        &mut self,
        client_id: u64,
        token_hash: &str,
        group: &str,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) -> Result<(), Rejected> {
        self.check_member(client_id, token_hash, group)?;
        self.remove_member(client_id, group, Kind::Left, limits, touched);
        Ok(())
    }

    pub fn unregister(
        &mut self,
        client_id: u64,
        token_hash: &str,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) -> Result<(), Rejected> {
        self.authenticate(client_id, token_hash)?;
        self.drop_client(client_id, Kind::Left, limits, touched);
        Ok(())
    }

    /// Removes clients that stopped sending heartbeats, with a FAILED event in each group.
    pub fn fail(&mut self, client_ids: &[u64], limits: &GroupLimits, touched: &mut Touched) {
        for &id in client_ids {
            self.drop_client(id, Kind::Failed, limits, touched);
        }
    }

    fn drop_client(
        &mut self,
        client_id: u64,
        kind: Kind,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) {
        let (groups, sent_to) = match self.clients.get(&client_id) {
            Some(c) => (c.groups.clone(), c.sent_to.clone()),
            None => return,
        };
        for group in sent_to {
            if let Some(g) = self.groups.get_mut(&group) {
                g.senders.remove(&client_id);
            }
        }
        for group in groups {
            self.remove_member(client_id, &group, kind, limits, touched);
        }
        self.clients.remove(&client_id);
    }

    fn remove_member(
        &mut self,
        client_id: u64,
        group: &str,
        kind: Kind,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let Some(member) = g.members.remove(&client_id) else {
            return;
        };
        // Sender state stays: a stale Send from before a leave cannot pass for a new one
        // after a rejoin.
        let before = g.retained_bytes;
        g.event(kind, client_id, &member.name, limits);
        touched.push(group.to_string());
        if let Some(c) = self.clients.get_mut(&client_id) {
            c.groups.remove(group);
        }
        self.retained_changed(group, before, limits);
    }

    /// Every group: (name, member count, next_seq).
    pub fn list(&self) -> Vec<(String, usize, u64)> {
        self.groups
            .iter()
            .map(|(n, g)| (n.clone(), g.members.len(), g.next_seq))
            .collect()
    }

    /// The members of `group`.
    pub fn members(&self, group: &str) -> Option<Vec<Member>> {
        self.groups
            .get(group)
            .map(|g| g.members.values().cloned().collect())
    }

    /// Whether `client_id` is a member of `group` now.
    pub fn is_member(&self, client_id: u64, group: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.members.contains_key(&client_id))
    }

    /// Registered clients and groups.
    pub fn counts(&self) -> (usize, usize) {
        (self.clients.len(), self.groups.len())
    }

    /// Messages the groups that exist now have sequenced.
    pub fn messages_total(&self) -> u64 {
        self.groups
            .values()
            .map(|g| g.next_seq.saturating_sub(1))
            .fold(0, u64::saturating_add)
    }

    /// Every registered client id.
    pub fn client_ids(&self) -> Vec<u64> {
        self.clients.keys().copied().collect()
    }

    /// Whether `client_id` is registered.
    pub fn has_client(&self, client_id: u64) -> bool {
        self.clients.contains_key(&client_id)
    }
}
