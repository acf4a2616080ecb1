//! A group's stream: each delivery appended with the next `group_seq`, the oldest trimmed past
//! the group's own bounds, and what a subscriber reads from it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Group, GroupLimits, Groups};

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
    #[serde(with = "crate::state::b64")]
    pub payload: Vec<u8>,
}

/// What a subscriber can read of a group at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub deliveries: Vec<Delivery>,
    pub oldest: u64,
    pub next_seq: u64,
}

impl Group {
    /// Appends `d` as the next delivery, then trims the oldest beyond the retention limits.
    pub(super) fn append(&mut self, mut d: Delivery, limits: &GroupLimits) -> u64 {
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
    pub(super) fn drop_oldest(&mut self) -> bool {
        if self.retained.len() < 2 {
            return false;
        }
        if let Some(old) = self.retained.pop_front() {
            self.retained_bytes -= old.payload.len() as u64;
        }
        true
    }

    pub(super) fn event(
        &mut self,
        kind: Kind,
        client_id: u64,
        name: &str,
        limits: &GroupLimits,
    ) -> u64 {
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

impl Groups {
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
}
