//! Sends, each taken once: a sender's `sender_seq` must come next, and a retry of one already
//! taken is answered with the `group_seq` it got, as long as the sender still remembers it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Delivery, GroupLimits, Groups, Kind, Touched};
use crate::state::Rejected;

/// How many accepted (sender_seq, group_seq) pairs a sender keeps for answering retries.
pub(super) const RECENT_SENDS: usize = 1024;

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
    #[serde(with = "crate::state::b64")]
    pub payload: Vec<u8>,
}

/// What a group keeps of one sender: the next sender_seq, and the recent ones with the
/// group_seq each got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SenderState {
    pub(super) next_sender_seq: u64,
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

impl Groups {
    pub fn send(
        &mut self,
        req: &SendRequest,
        limits: &GroupLimits,
        touched: &mut Touched,
    ) -> Result<Sent, Rejected> {
        self.check_member(req.client_id, &req.token_hash, &req.group)?;
        let name = self.clients[&req.client_id].name.clone();
        let Some(g) = self.groups.get_mut(&req.group) else {
            // check_member found it.
            return Err(Rejected::UnknownGroup(req.group.clone()));
        };
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
        // Looked up again (inserted above): the append needed the whole group.
        if let Some(sender) = g.senders.get_mut(&req.client_id) {
            sender.recent.push_back((req.sender_seq, group_seq));
            if sender.recent.len() > RECENT_SENDS {
                sender.recent.pop_front();
            }
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
}
