//! `sequencer.v1.Messenger`: Send through the batcher to the primary; Subscribe from this
//! node's own applied state, woken by the state machine, never by asking the primary.

use std::sync::Arc;

use sequencer_proto::v1::messenger_server::Messenger;
use sequencer_proto::v1::{
    delivery, Delivery, SendRequest as PbSend, SendResponse, SubscribeRequest,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::checked_name;
use crate::error::Error;
use crate::proposer::Proposer;
use crate::raft::state_machine::StateReader;
use crate::sender::Sender;
use crate::state::groups::{hash_token, Delivery as StateDelivery, Kind};
use crate::state::{Rejected, SendRequest};

/// Deliveries read from the state per wake-up, so the read lock is held briefly.
const READ_CHUNK: usize = 256;

pub struct MessengerApi {
    sender: Sender,
    reader: StateReader,
    proposer: Proposer,
    max_payload_bytes: u32,
    subscriber_buffer: usize,
    /// Ends every subscription when the node stops.
    stop: watch::Receiver<bool>,
}

impl MessengerApi {
    pub fn new(
        sender: Sender,
        reader: StateReader,
        proposer: Proposer,
        max_payload_bytes: u32,
        subscriber_buffer: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            sender,
            reader,
            proposer,
            max_payload_bytes,
            subscriber_buffer: subscriber_buffer.max(2),
            stop,
        }
    }

    /// Membership as this node knows it; if that says no, catch up with the primary and ask again,
    /// since the Join may have been acknowledged by another server a moment ago.
    async fn check_member(
        &self,
        client_id: u64,
        token_hash: &str,
        group: &str,
    ) -> Result<(), Error> {
        let check = || {
            self.reader
                .read(|a| a.state.groups.check_member(client_id, token_hash, group))
        };
        if check().is_ok() {
            return Ok(());
        }
        self.proposer.read_barrier().await?;
        check().map_err(Error::from)
    }
}

type DeliveryStream = ReceiverStream<Result<Delivery, Status>>;

#[tonic::async_trait]
impl Messenger for MessengerApi {
    async fn send(&self, req: Request<PbSend>) -> Result<Response<SendResponse>, Status> {
        let req = req.into_inner();
        let group = checked_name(req.group, "group name")?;
        if req.sender_seq == 0 {
            return Err(Error::InvalidArgument("sender_seq starts at 1".into()).into());
        }
        if req.payload.len() > self.max_payload_bytes as usize {
            return Err(Error::InvalidArgument(format!(
                "payload of {} bytes is above {} (max_payload_bytes)",
                req.payload.len(),
                self.max_payload_bytes
            ))
            .into());
        }
        let sent = self
            .sender
            .submit(SendRequest {
                client_id: req.client_id,
                token_hash: hash_token(&req.token),
                group,
                sender_seq: req.sender_seq,
                payload: req.payload,
            })
            .await?;
        Ok(Response::new(SendResponse {
            group_seq: sent.group_seq,
            duplicate: sent.duplicate,
        }))
    }

    type SubscribeStream = DeliveryStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<DeliveryStream>, Status> {
        let req = req.into_inner();
        let group = checked_name(req.group, "group name")?;
        let token_hash = hash_token(&req.token);
        // Listen before reading, so nothing applied in between is missed.
        let wake = self.reader.watch_groups();
        self.check_member(req.client_id, &token_hash, &group)
            .await?;
        let (oldest, next_seq) = self
            .reader
            .read(|a| {
                a.state
                    .groups
                    .read(&group, u64::MAX, 0)
                    .map(|s| (s.oldest, s.next_seq))
            })
            .ok_or_else(|| Error::Rejected(Rejected::UnknownGroup(group.clone())))?;
        let from = if req.from_seq == 0 {
            next_seq
        } else {
            req.from_seq
        };
        if from < oldest {
            return Err(out_of_range(&group, from, oldest).into());
        }
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let feed = Feed {
            reader: self.reader.clone(),
            group,
            client_id: req.client_id,
            next: from,
            buffer: self.subscriber_buffer,
            tx,
        };
        tokio::spawn(feed.run(wake, self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn out_of_range(group: &str, from: u64, oldest: u64) -> Error {
    Error::OutOfRange(format!(
        "from_seq {from} is older than the oldest delivery group `{group}` retains ({oldest}; retain_messages)"
    ))
}

/// One subscription: copies deliveries from the applied state into the client's stream.
struct Feed {
    reader: StateReader,
    group: String,
    client_id: u64,
    next: u64,
    buffer: usize,
    tx: mpsc::Sender<Result<Delivery, Status>>,
}

enum Step {
    /// Read everything there is; wait for the group to grow.
    Wait,
    /// More to read right away.
    More,
    /// The stream is over (an error was sent, the subscriber left, or it went away).
    Done,
}

impl Feed {
    async fn run(
        mut self,
        mut wake: broadcast::Receiver<Arc<str>>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            match self.step() {
                Step::More => continue,
                Step::Done => return,
                Step::Wait => {}
            }
            // Sleep until this group (or, after a snapshot install, any group) grows.
            loop {
                tokio::select! {
                    woke = wake.recv() => match woke {
                        Ok(g) if g.is_empty() || *g == *self.group => break,
                        Ok(_) => continue,
                        // Missed wake-ups: just re-read the state.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = self.tx.closed() => return,
                    _ = stop.wait_for(|s| *s) => {
                        let _ = self.tx.try_send(Err(Status::unavailable("server shutting down; resubscribe elsewhere")));
                        return;
                    }
                }
            }
        }
    }

    fn step(&mut self) -> Step {
        let Some(slice) = self
            .reader
            .read(|a| a.state.groups.read(&self.group, self.next, READ_CHUNK))
        else {
            return Step::Done;
        };
        if self.next < slice.oldest {
            let e = out_of_range(&self.group, self.next, slice.oldest);
            let _ = self.tx.try_send(Err(e.into()));
            return Step::Done;
        }
        let full = slice.deliveries.len() == READ_CHUNK;
        for d in slice.deliveries {
            // Keep one slot for the error that tells a slow subscriber where to resume.
            if self.tx.capacity() <= 1 {
                let e = Error::SlowSubscriber(format!(
                    "subscriber too slow: {} deliveries queued (subscriber_buffer); resubscribe with from_seq {}",
                    self.buffer - 1,
                    self.next
                ));
                let _ = self.tx.try_send(Err(e.into()));
                return Step::Done;
            }
            let own_exit =
                d.sender_id == self.client_id && matches!(d.kind, Kind::Left | Kind::Failed);
            self.next = d.group_seq + 1;
            if self.tx.try_send(Ok(to_pb(d))).is_err() {
                return Step::Done;
            }
            if own_exit {
                return Step::Done;
            }
        }
        if full {
            Step::More
        } else {
            Step::Wait
        }
    }
}

fn to_pb(d: StateDelivery) -> Delivery {
    let kind = match d.kind {
        Kind::Message => delivery::Kind::Message,
        Kind::Joined => delivery::Kind::Joined,
        Kind::Left => delivery::Kind::Left,
        Kind::Failed => delivery::Kind::Failed,
    };
    Delivery {
        group_seq: d.group_seq,
        sender_id: d.sender_id,
        sender_name: d.sender_name,
        sender_seq: d.sender_seq,
        kind: kind as i32,
        payload: d.payload,
    }
}
