//! Clients, groups, members, and each group's totally ordered stream of deliveries.
//!
//! Every change to a group appends a [`Delivery`] with the group's next `group_seq`, so
//! messages and membership events share one dense order. Tokens are stored as SHA-256 hashes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{valid_name, Rejected};

/// How many accepted (sender_seq, group_seq) pairs a sender keeps for answering retries.
const RECENT_SENDS: usize = 1024;

/// Limits stamped into each command by the node that took the request, so every node applies
/// the entry alike whatever its own config says. Keep them equal across the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimits {
    pub max_clients: u32,
    pub max_groups: u32,
    pub max_members_per_group: u32,
    pub retain_messages: u32,
    /// Payload bytes each group retains; the older deliveries go first.
    pub retain_bytes: u64,
    /// Payload bytes all groups together retain; the group retaining the most gives first.
    /// Entries logged by earlier versions carry none, and those versions kept no such bound.
    #[serde(default = "unbounded")]
    pub retain_total_bytes: u64,
}

fn unbounded() -> u64 {
    u64::MAX
}

/// What a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Message,
    Joined,
    Left,
    Failed,
}

/// One entry of a group's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub group_seq: u64,
    pub sender_id: u64,
    pub sender_name: String,
    /// 0 for membership events.
    pub sender_seq: u64,
    pub kind: Kind,
    #[serde(with = "super::b64")]
    pub payload: Vec<u8>,
}

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

/// The answer to one Send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub group_seq: u64,
    pub duplicate: bool,
}

/// One Send of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub client_id: u64,
    pub token_hash: String,
    pub group: String,
    pub sender_seq: u64,
    #[serde(with = "super::b64")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRecord {
    name: String,
    token_hash: String,
    groups: BTreeSet<String>,
    /// Groups holding this client's sender state; it outlives a leave and goes with the client.
    sent_to: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SenderState {
    next_sender_seq: u64,
    recent: VecDeque<(u64, u64)>,
}

impl Default for SenderState {
    fn default() -> Self {
        Self {
            next_sender_seq: 1,
            recent: VecDeque::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Group {
    next_seq: u64,
    members: BTreeMap<u64, Member>,
    senders: BTreeMap<u64, SenderState>,
    /// Shared, so that copying the state for a snapshot (under the lock that apply takes)
    /// copies pointers, not payloads.
    retained: VecDeque<Arc<Delivery>>,
    retained_bytes: u64,
}

impl Group {
    fn new() -> Self {
        Self {
            next_seq: 1,
            members: BTreeMap::new(),
            senders: BTreeMap::new(),
            retained: VecDeque::new(),
            retained_bytes: 0,
        }
    }

    /// Appends `d` as the next delivery, then trims the oldest beyond the retention limits.
    fn append(&mut self, mut d: Delivery, limits: &GroupLimits) -> u64 {
        d.group_seq = self.next_seq;
        self.next_seq += 1;
        self.retained_bytes += d.payload.len() as u64;
        self.retained.push_back(Arc::new(d));
        while self.retained.len() > limits.retain_messages as usize
            || self.retained_bytes > limits.retain_bytes
        {
            if !self.drop_oldest() {
                break;
            }
        }
        self.next_seq - 1
    }

    /// Drops the oldest retained delivery, but never the newest one; says whether it did.
    fn drop_oldest(&mut self) -> bool {
        if self.retained.len() < 2 {
            return false;
        }
        if let Some(old) = self.retained.pop_front() {
            self.retained_bytes -= old.payload.len() as u64;
        }
        true
    }

    fn event(&mut self, kind: Kind, client_id: u64, name: &str, limits: &GroupLimits) -> u64 {
        let d = Delivery {
            group_seq: 0,
            sender_id: client_id,
            sender_name: name.to_string(),
            sender_seq: 0,
            kind,
            payload: Vec::new(),
        };
        self.append(d, limits)
    }

    /// The oldest group_seq still retained (next_seq when nothing is).
    fn oldest(&self) -> u64 {
        self.retained
            .front()
            .map(|d| d.group_seq)
            .unwrap_or(self.next_seq)
    }
}

/// Groups whose streams grew while applying one command, for waking subscribers.
pub type Touched = Vec<String>;

/// The tracker's and messenger's replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredGroups")]
pub struct Groups {
    next_client_id: u64,
    clients: BTreeMap<u64, ClientRecord>,
    groups: BTreeMap<String, Group>,
    /// Derived from `groups`, so not stored: rebuilt when a snapshot is read.
    #[serde(skip_serializing)]
    retained: Retained,
}

/// The fields of [`Groups`] that snapshots hold.
#[derive(Deserialize)]
struct StoredGroups {
    next_client_id: u64,
    clients: BTreeMap<u64, ClientRecord>,
    groups: BTreeMap<String, Group>,
}

impl From<StoredGroups> for Groups {
    fn from(s: StoredGroups) -> Self {
        Self {
            retained: Retained::of(&s.groups),
            next_client_id: s.next_client_id,
            clients: s.clients,
            groups: s.groups,
        }
    }
}

/// Payload bytes retained over all groups, and the groups retaining any, ordered by how much.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Retained {
    total: u64,
    by_size: BTreeSet<(u64, String)>,
}

impl Retained {
    fn of(groups: &BTreeMap<String, Group>) -> Self {
        Self {
            total: groups.values().map(|g| g.retained_bytes).sum(),
            by_size: groups
                .iter()
                .filter(|(_, g)| g.retained_bytes > 0)
                .map(|(name, g)| (g.retained_bytes, name.clone()))
                .collect(),
        }
    }

    fn resize(&mut self, group: &str, before: u64, after: u64) {
        if before > 0 {
            self.by_size.remove(&(before, group.to_string()));
        }
        if after > 0 {
            self.by_size.insert((after, group.to_string()));
        }
        self.total = self.total - before + after;
    }
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            next_client_id: 1,
            clients: BTreeMap::new(),
            groups: BTreeMap::new(),
            retained: Retained::default(),
        }
    }
}

/// The stored form of a token: its SHA-256, hex.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a subscriber can read of a group at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub deliveries: Vec<Delivery>,
    pub oldest: u64,
    pub next_seq: u64,
}

impl Groups {
    /// Accounts for `group` retaining `before` bytes until now, then drops the oldest
    /// deliveries of the groups retaining the most until all of them fit
    /// `retain_total_bytes`. Each group keeps at least its newest delivery.
    fn retained_changed(&mut self, group: &str, before: u64, limits: &GroupLimits) {
        let after = self.groups.get(group).map_or(before, |g| g.retained_bytes);
        self.retained.resize(group, before, after);
        while self.retained.total > limits.retain_total_bytes {
            let groups = &self.groups;
            let victim = self
                .retained
                .by_size
                .iter()
                .rev()
                .find(|(_, name)| groups.get(name).is_some_and(|g| g.retained.len() > 1))
                .map(|(_, name)| name.clone());
            let Some(victim) = victim else { break };
            let Some(g) = self.groups.get_mut(&victim) else {
                break;
            };
            let before = g.retained_bytes;
            g.drop_oldest();
            let after = g.retained_bytes;
            self.retained.resize(&victim, before, after);
        }
    }

    /// Payload bytes all groups retain together.
    pub fn retained_bytes(&self) -> u64 {
        self.retained.total
    }

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

    pub fn send(
        &mut self,
        req: &SendRequest,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) -> Result<Sent, Rejected> {
        self.check_member(req.client_id, &req.token_hash, &req.group)?;
        let name = self.clients[&req.client_id].name.clone();
        let g = self.groups.get_mut(&req.group).expect("checked above");
        let sender = g.senders.entry(req.client_id).or_default();
        if req.sender_seq < sender.next_sender_seq {
            let original = sender.recent.iter().find(|(s, _)| *s == req.sender_seq);
            return match original {
                Some(&(_, group_seq)) => Ok(Sent {
                    group_seq,
                    duplicate: true,
                }),
                None => Err(Rejected::StaleRetry {
                    sender_seq: req.sender_seq,
                    kept: RECENT_SENDS,
                }),
            };
        }
        if req.sender_seq > sender.next_sender_seq {
            return Err(Rejected::SenderSeqGap {
                expected: sender.next_sender_seq,
                got: req.sender_seq,
            });
        }
        sender.next_sender_seq += 1;
        let d = Delivery {
            group_seq: 0,
            sender_id: req.client_id,
            sender_name: name,
            sender_seq: req.sender_seq,
            kind: Kind::Message,
            payload: req.payload.clone(),
        };
        let before = g.retained_bytes;
        let group_seq = g.append(d, limits);
        let sender = g.senders.get_mut(&req.client_id).expect("inserted above");
        sender.recent.push_back((req.sender_seq, group_seq));
        if sender.recent.len() > RECENT_SENDS {
            sender.recent.pop_front();
        }
        if let Some(c) = self.clients.get_mut(&req.client_id) {
            c.sent_to.insert(req.group.clone());
        }
        touched.push(req.group.clone());
        self.retained_changed(&req.group, before, limits);
        Ok(Sent {
            group_seq,
            duplicate: false,
        })
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

    /// Retained deliveries of `group` with group_seq >= `from`: at most `max` of them, and no
    /// more payload bytes than `max_bytes` beyond the first.
    pub fn read(&self, group: &str, from: u64, max: usize, max_bytes: usize) -> Option<Slice> {
        let g = self.groups.get(group)?;
        let oldest = g.oldest();
        let skip = from.saturating_sub(oldest) as usize;
        let mut bytes = 0;
        let deliveries = g
            .retained
            .iter()
            .skip(skip)
            .take(max)
            .take_while(|d| {
                let first = bytes == 0;
                bytes += d.payload.len().max(1);
                first || bytes <= max_bytes
            })
            .map(|d| Delivery::clone(d))
            .collect();
        Some(Slice {
            deliveries,
            oldest,
            next_seq: g.next_seq,
        })
    }

    /// Whether `client_id` is a member of `group` now.
    pub fn is_member(&self, client_id: u64, group: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.members.contains_key(&client_id))
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GroupLimits = GroupLimits {
        max_clients: 10,
        max_groups: 2,
        max_members_per_group: 2,
        retain_messages: 3,
        retain_bytes: 1 << 20,
        retain_total_bytes: 1 << 20,
    };

    fn send(
        g: &mut Groups,
        client_id: u64,
        token: &str,
        sender_seq: u64,
    ) -> Result<Sent, Rejected> {
        let req = SendRequest {
            client_id,
            token_hash: hash_token(token),
            group: "g".into(),
            sender_seq,
            payload: vec![sender_seq as u8],
        };
        g.send(&req, &LIMITS, &mut Vec::new())
    }

    #[test]
    fn membership_and_messages_share_one_dense_order() {
        let mut g = Groups::default();
        let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
        let b = g.register("bob", &hash_token("tb"), &LIMITS).unwrap();
        let j = g
            .join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        assert_eq!((j.next_seq, j.next_sender_seq), (2, 1));
        g.join(b, &hash_token("tb"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        assert_eq!(
            send(&mut g, a, "ta", 1),
            Ok(Sent {
                group_seq: 3,
                duplicate: false
            })
        );
        assert_eq!(
            send(&mut g, b, "tb", 1),
            Ok(Sent {
                group_seq: 4,
                duplicate: false
            })
        );
        // A retry is answered with the original seq and adds nothing.
        assert_eq!(
            send(&mut g, a, "ta", 1),
            Ok(Sent {
                group_seq: 3,
                duplicate: true
            })
        );
        assert_eq!(
            send(&mut g, a, "ta", 3),
            Err(Rejected::SenderSeqGap {
                expected: 2,
                got: 3
            })
        );
        g.fail(&[b], &LIMITS, &mut Vec::new());
        let slice = g.read("g", 1, 100, usize::MAX).unwrap();
        // Retention keeps the last 3 of 5 deliveries.
        assert_eq!(slice.oldest, 3);
        let kinds: Vec<_> = slice
            .deliveries
            .iter()
            .map(|d| (d.group_seq, d.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![(3, Kind::Message), (4, Kind::Message), (5, Kind::Failed)]
        );
        assert!(!g.has_client(b));
    }

    #[test]
    fn access_and_limits_are_enforced_and_refusals_change_nothing() {
        let mut g = Groups::default();
        let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
        let b = g.register("bob", &hash_token("tb"), &LIMITS).unwrap();
        let c = g.register("carol", &hash_token("tc"), &LIMITS).unwrap();
        g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        let before = g.clone();
        assert_eq!(send(&mut g, a, "wrong", 1), Err(Rejected::Unauthenticated));
        assert_eq!(
            send(&mut g, b, "tb", 1),
            Err(Rejected::NotMember("g".into()))
        );
        assert_eq!(
            g.leave(b, &hash_token("tb"), "nope", &LIMITS, &mut Vec::new()),
            Err(Rejected::UnknownGroup("nope".into()))
        );
        assert!(matches!(
            g.join(a, &hash_token("ta"), "bad name", &LIMITS, &mut Vec::new()),
            Err(Rejected::InvalidName(_))
        ));
        assert_eq!(g, before);
        g.join(b, &hash_token("tb"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        assert_eq!(
            g.join(c, &hash_token("tc"), "g", &LIMITS, &mut Vec::new()),
            Err(Rejected::TooManyMembers { max: 2 })
        );
        g.join(a, &hash_token("ta"), "h", &LIMITS, &mut Vec::new())
            .unwrap();
        assert_eq!(
            g.join(a, &hash_token("ta"), "i", &LIMITS, &mut Vec::new()),
            Err(Rejected::TooManyGroups { max: 2 })
        );
    }

    #[test]
    fn retention_also_counts_bytes() {
        let limits = GroupLimits {
            retain_messages: 100,
            retain_bytes: 10,
            ..LIMITS
        };
        let mut g = Groups::default();
        let a = g.register("alice", &hash_token("ta"), &limits).unwrap();
        g.join(a, &hash_token("ta"), "g", &limits, &mut Vec::new())
            .unwrap();
        for seq in 1..=4 {
            let req = SendRequest {
                client_id: a,
                token_hash: hash_token("ta"),
                group: "g".into(),
                sender_seq: seq,
                payload: vec![0; 4],
            };
            g.send(&req, &limits, &mut Vec::new()).unwrap();
        }
        // 16 payload bytes sent, 10 kept: the last two messages.
        let slice = g.read("g", 0, 100, usize::MAX).unwrap();
        assert_eq!(
            slice
                .deliveries
                .iter()
                .map(|d| d.group_seq)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
    }

    #[test]
    fn all_groups_together_keep_at_most_retain_total_bytes_the_largest_giving_first() {
        let limits = GroupLimits {
            max_groups: 3,
            retain_messages: 100,
            retain_bytes: 100,
            retain_total_bytes: 150,
            ..LIMITS
        };
        let mut g = Groups::default();
        let me = g.register("alice", &hash_token("ta"), &limits).unwrap();
        // Sender seqs count per group.
        let mut sender_seqs = BTreeMap::<String, u64>::new();
        let mut send_to = |g: &mut Groups, group: &str, bytes: usize| {
            let seq = sender_seqs.entry(group.to_string()).or_default();
            *seq += 1;
            let req = SendRequest {
                client_id: me,
                token_hash: hash_token("ta"),
                group: group.into(),
                sender_seq: *seq,
                payload: vec![0; bytes],
            };
            g.send(&req, &limits, &mut Vec::new()).unwrap();
        };
        let kept = |g: &Groups, group: &str| {
            let slice = g.read(group, 0, usize::MAX, usize::MAX).unwrap();
            let seqs: Vec<u64> = slice.deliveries.iter().map(|d| d.group_seq).collect();
            let bytes: usize = slice.deliveries.iter().map(|d| d.payload.len()).sum();
            (seqs, bytes)
        };
        for group in ["a", "b"] {
            g.join(me, &hash_token("ta"), group, &limits, &mut Vec::new())
                .unwrap();
        }
        for _ in 0..10 {
            send_to(&mut g, "a", 10);
        }
        assert_eq!(kept(&g, "a").1, 100);
        for _ in 0..6 {
            send_to(&mut g, "b", 10);
        }
        // 160 bytes sent; "a", retaining the most, gave its oldest message.
        assert_eq!(g.retained_bytes(), 150);
        // (group_seq 1 of each group is the join; "a" gave it too, being older.)
        assert_eq!(kept(&g, "a"), ((3..=11).collect(), 90));
        assert_eq!(kept(&g, "b"), ((1..=7).collect(), 60));
        // A subscriber starting from the dropped message is told where history begins.
        assert_eq!(g.read("a", 2, 10, usize::MAX).unwrap().oldest, 3);

        // The two even out; on a tie the later name gives first.
        for _ in 0..4 {
            send_to(&mut g, "b", 10);
        }
        assert_eq!(g.retained_bytes(), 150);
        assert_eq!(kept(&g, "a").1, 80);
        assert_eq!(kept(&g, "b").1, 70);

        // A snapshot read back counts the same.
        let reread: Groups =
            crate::raft::codec::decode(&crate::raft::codec::encode(&g).unwrap()).unwrap();
        assert_eq!(reread, g);
        assert_eq!(reread.retained_bytes(), 150);
    }

    #[test]
    fn limits_logged_before_the_total_existed_read_as_no_total() {
        let old = r#"{"max_clients":1,"max_groups":2,"max_members_per_group":3,"retain_messages":4,"retain_bytes":5}"#;
        let limits: GroupLimits = crate::raft::codec::decode(old.as_bytes()).unwrap();
        assert_eq!(limits.retain_total_bytes, u64::MAX);
        assert_eq!(limits.retain_bytes, 5);
    }

    #[test]
    fn every_group_keeps_its_newest_message_whatever_the_total() {
        let limits = GroupLimits {
            max_groups: 3,
            retain_messages: 100,
            retain_bytes: 100,
            retain_total_bytes: 100,
            ..LIMITS
        };
        let mut g = Groups::default();
        let me = g.register("alice", &hash_token("ta"), &limits).unwrap();
        for group in ["a", "b", "c"] {
            g.join(me, &hash_token("ta"), group, &limits, &mut Vec::new())
                .unwrap();
            let req = SendRequest {
                client_id: me,
                token_hash: hash_token("ta"),
                group: group.into(),
                sender_seq: 1,
                payload: vec![0; 100],
            };
            g.send(&req, &limits, &mut Vec::new()).unwrap();
        }
        // Over the total, but each group holds one message: nothing more goes.
        assert_eq!(g.retained_bytes(), 300);
        for group in ["a", "b", "c"] {
            let slice = g.read(group, 0, usize::MAX, usize::MAX).unwrap();
            assert_eq!(slice.deliveries.len(), 1, "{group}");
        }
    }

    #[test]
    fn a_retry_too_old_to_look_up_is_refused_not_misreported() {
        let mut g = Groups::default();
        let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
        g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        for seq in 1..=(RECENT_SENDS as u64 + 1) {
            send(&mut g, a, "ta", seq).unwrap();
        }
        assert!(matches!(
            send(&mut g, a, "ta", 1),
            Err(Rejected::StaleRetry { sender_seq: 1, .. })
        ));
        assert!(send(&mut g, a, "ta", 2).unwrap().duplicate);
    }

    #[test]
    fn leaving_keeps_the_sender_sequence() {
        let mut g = Groups::default();
        let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
        g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        send(&mut g, a, "ta", 1).unwrap();
        g.leave(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        let j = g
            .join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
            .unwrap();
        // A stale Send of seq 1 from before the leave cannot pass for a new message.
        assert_eq!(j.next_sender_seq, 2);
        assert!(send(&mut g, a, "ta", 1).unwrap().duplicate);
    }
}
