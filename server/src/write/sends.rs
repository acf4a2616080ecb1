//! Sends as a batch [`Plan`]: every Send waiting on this node goes to the primary as ONE
//! `Send` entry, in arrival order, which keeps each sender's messages in sender_seq order.

use crate::error::Error;
use crate::raft::NodeId;
use crate::state::{Command, GroupLimits, Reply, SendRequest, Sent};
use crate::write::batch::{Batcher, Plan};

/// The batcher that serves Messenger.Send.
pub type SendBatcher = Batcher<SendPlan>;

pub struct SendPlan {
    pub limits: GroupLimits,
}

impl Plan for SendPlan {
    type Req = SendRequest;
    type Out = Sent;
    type Split = usize;
    const WHAT: &'static str = "messages";
    const KIND: &'static str = "sends";

    fn key(req: &SendRequest) -> &str {
        &req.group
    }

    fn size(req: &SendRequest) -> usize {
        req.payload.len()
    }

    fn command(&self, sends: Vec<SendRequest>) -> (Command, usize) {
        let n = sends.len();
        (
            Command::Send {
                sends,
                limits: self.limits,
            },
            n,
        )
    }

    fn answer(&self, n: usize, reply: &Reply, _primary: NodeId) -> Vec<Result<Sent, Error>> {
        match reply {
            Reply::Sent(results) => results
                .iter()
                .map(|r| r.clone().map_err(Error::Rejected))
                .collect(),
            other => {
                let e = Error::Internal(format!("unexpected reply to Send: {other:?}"));
                (0..n).map(|_| Err(e.clone())).collect()
            }
        }
    }
}
