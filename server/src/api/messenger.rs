//! `sequencer.v1.Messenger`: Send through the batcher to the primary; Subscribe from this
//! node's own applied state, woken by the state machine, never by asking the primary.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use sequencer_proto::v1::messenger_server::Messenger;
use sequencer_proto::v1::{
    delivery, Delivery, SendRequest as PbSend, SendResponse, SubscribeRequest,
};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::checked_name;
use crate::error::Error;
use crate::raft::state_machine::StateReader;
use crate::state::groups::{hash_token, Delivery as StateDelivery, Kind};
use crate::state::{Rejected, SendRequest};
use crate::write::proposer::Proposer;
use crate::write::sends::SendBatcher;

/// Deliveries (and payload bytes) read from the state at a time, so the read lock is held
/// briefly.
const READ_CHUNK: usize = 256;
const READ_CHUNK_BYTES: usize = 1024 * 1024;
/// A subscriber whose buffer stays full this long is cut off as too slow.
const SLOW_SUBSCRIBER_GRACE: Duration = Duration::from_secs(1);

/// What subscribers may hold on this node.
#[derive(Debug, Clone, Copy)]
pub struct SubscriberLimits {
    /// Deliveries queued per subscriber (subscriber_buffer).
    pub buffer: usize,
    /// Payload bytes queued per subscriber and not yet taken by the transport
    /// (subscriber_buffer_bytes).
    pub buffer_bytes: usize,
    /// Open subscriptions on this node (max_subscribers).
    pub max: usize,
    /// Open subscriptions of one client_id on this node (max_subscribers_per_client).
    pub max_per_client: usize,
}

pub struct MessengerApi {
    sender: SendBatcher,
    reader: StateReader,
    proposer: Proposer,
    max_payload_bytes: u32,
    limits: SubscriberLimits,
    /// One permit per open subscription (max_subscribers).
    subscribers: Arc<Semaphore>,
    /// Open subscriptions per client_id (max_subscribers_per_client).
    per_client: Arc<Mutex<HashMap<u64, usize>>>,
    /// Ends every subscription when the node stops.
    stop: CancellationToken,
    /// Owns every subscription's feed; the node waits for them on its way out.
    feeds: TaskTracker,
}

impl MessengerApi {
    pub fn new(
        sender: SendBatcher,
        reader: StateReader,
        proposer: Proposer,
        max_payload_bytes: u32,
        limits: SubscriberLimits,
        stop: CancellationToken,
        feeds: TaskTracker,
    ) -> Self {
        let limits = SubscriberLimits {
            buffer: limits.buffer.max(2),
            // At least one payload fits (config ensures it), and a Semaphore has a ceiling.
            buffer_bytes: limits
                .buffer_bytes
                .max(max_payload_bytes as usize)
                .clamp(1, Semaphore::MAX_PERMITS),
            ..limits
        };
        Self {
            sender,
            reader,
            proposer,
            max_payload_bytes,
            subscribers: Arc::new(Semaphore::new(limits.max)),
            per_client: Arc::default(),
            limits,
            stop,
            feeds,
        }
    }

    /// Open subscriptions on this node, read at each metrics scrape.
    pub fn open_subscriptions(&self) -> crate::metrics::scrape::Reading {
        let (permits, max) = (self.subscribers.clone(), self.limits.max);
        Arc::new(move || max.saturating_sub(permits.available_permits()))
    }

    /// A place for one more subscription of `client_id`, or why not.
    fn client_place(&self, client_id: u64) -> Result<ClientPlace, Error> {
        let mut open = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(client_id).or_insert(0);
        if *n >= self.limits.max_per_client {
            return Err(Error::ResourceExhausted(format!(
                "client {client_id} already has {} open subscriptions on this node, the most \
                 one client may hold (max_subscribers_per_client); close one first",
                self.limits.max_per_client
            )));
        }
        *n += 1;
        Ok(ClientPlace {
            open: self.per_client.clone(),
            client_id,
        })
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

/// One queued item, with the share of subscriber_buffer_bytes it holds until the transport
/// takes it.
type Queued = (Result<Delivery, Status>, Option<OwnedSemaphorePermit>);

/// A subscriber's deliveries as tonic takes them: each gives its bytes back as it goes.
pub struct DeliveryStream(mpsc::Receiver<Queued>);

impl Stream for DeliveryStream {
    type Item = Result<Delivery, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|q| q.map(|(item, _bytes)| item))
    }
}

/// One open subscription of a client, counted until dropped.
struct ClientPlace {
    open: Arc<Mutex<HashMap<u64, usize>>>,
    client_id: u64,
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client_id);
            }
        }
    }
}

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
        let mut bounds = self.bounds(&group)?;
        if req.from_seq > bounds.1 {
            // This node may lag the one the subscriber last read from.
            self.proposer.read_barrier().await?;
            bounds = self.bounds(&group)?;
        }
        let (oldest, next_seq) = bounds;
        let from = if req.from_seq == 0 {
            next_seq
        } else {
            req.from_seq
        };
        if from < oldest {
            return Err(out_of_range(&group, from, oldest).into());
        }
        if from > next_seq {
            return Err(Error::OutOfRange(format!(
                "from_seq {from} is beyond the end of group `{group}` (its next group_seq is {next_seq})"
            ))
            .into());
        }
        let place = self.client_place(req.client_id)?;
        let Ok(permit) = self.subscribers.clone().try_acquire_owned() else {
            return Err(Error::ResourceExhausted(format!(
                "this node already serves {} subscriptions (max_subscribers); subscribe on \
                 another server or later",
                self.limits.max
            ))
            .into());
        };
        let (tx, rx) = mpsc::channel(self.limits.buffer);
        let feed = Feed {
            _permit: permit,
            _place: place,
            reader: self.reader.clone(),
            group,
            client_id: req.client_id,
            next: from,
            limits: self.limits,
            bytes: Arc::new(Semaphore::new(self.limits.buffer_bytes)),
            tx,
        };
        self.feeds.spawn(feed.run(wake, self.stop.clone()));
        Ok(Response::new(DeliveryStream(rx)))
    }
}

impl MessengerApi {
    /// (oldest retained, next group_seq) of `group` as applied here.
    fn bounds(&self, group: &str) -> Result<(u64, u64), Error> {
        self.reader
            .read(|a| {
                a.state
                    .groups
                    .read(group, u64::MAX, 0, 0)
                    .map(|s| (s.oldest, s.next_seq))
            })
            .ok_or_else(|| Error::Rejected(Rejected::UnknownGroup(group.to_string())))
    }
}

fn out_of_range(group: &str, from: u64, oldest: u64) -> Error {
    Error::OutOfRange(format!(
        "from_seq {from} is older than the oldest delivery group `{group}` retains ({oldest}; retain_messages, retain_bytes, retain_total_bytes)"
    ))
}

/// One subscription: copies deliveries from the applied state into the client's stream.
struct Feed {
    /// Released when the feed ends.
    _permit: OwnedSemaphorePermit,
    _place: ClientPlace,
    reader: StateReader,
    group: String,
    client_id: u64,
    next: u64,
    limits: SubscriberLimits,
    /// subscriber_buffer_bytes: each queued delivery holds its payload's worth until the
    /// transport takes it, whatever window the client grants.
    bytes: Arc<Semaphore>,
    tx: mpsc::Sender<Queued>,
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
    async fn run(mut self, mut wake: broadcast::Receiver<Arc<str>>, stop: CancellationToken) {
        loop {
            match self.step().await {
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
                    _ = stop.cancelled() => {
                        let _ = self.tx.try_send((Err(Status::unavailable("server shutting down; resubscribe elsewhere")), None));
                        return;
                    }
                }
            }
        }
    }

    async fn step(&mut self) -> Step {
        // No more than the byte budget in hand at once, on top of what is queued.
        let chunk_bytes = READ_CHUNK_BYTES.min(self.limits.buffer_bytes);
        let Some(slice) = self.reader.read(|a| {
            a.state
                .groups
                .read(&self.group, self.next, READ_CHUNK, chunk_bytes)
        }) else {
            return Step::Done;
        };
        if self.next < slice.oldest {
            let e = out_of_range(&self.group, self.next, slice.oldest);
            let _ = self.tx.try_send((Err(e.into()), None));
            return Step::Done;
        }
        let more = slice
            .deliveries
            .last()
            .is_some_and(|d| d.group_seq + 1 < slice.next_seq);
        for d in slice.deliveries {
            let Some((permit, bytes)) = self.room_for(&d).await else {
                return Step::Done;
            };
            let own_exit =
                d.sender_id == self.client_id && matches!(d.kind, Kind::Left | Kind::Failed);
            let seq = d.group_seq;
            permit.send((Ok(to_pb(d)), Some(bytes)));
            crate::metrics::get().messages_delivered.inc();
            self.next = seq + 1;
            // The stream ends with this client's last leave; an old one replayed from before a
            // rejoin does not end it.
            if own_exit
                && !self
                    .reader
                    .read(|a| a.state.groups.is_member(self.client_id, &self.group))
            {
                return Step::Done;
            }
        }
        if more {
            Step::More
        } else {
            Step::Wait
        }
    }

    /// Waits for a queue slot and `d`'s bytes; `None` once the stream is over: the subscriber
    /// went away, or stayed too slow for the grace period and was told where to resume.
    async fn room_for(
        &self,
        d: &StateDelivery,
    ) -> Option<(mpsc::Permit<'_, Queued>, OwnedSemaphorePermit)> {
        let deadline = tokio::time::Instant::now() + SLOW_SUBSCRIBER_GRACE;
        let grace = SLOW_SUBSCRIBER_GRACE.as_millis();
        // Room for this delivery and one more, so the last slot is always free for the error
        // that tells a slow subscriber where to resume.
        let mut permits = match tokio::time::timeout_at(deadline, self.tx.reserve_many(2)).await {
            Ok(Ok(permits)) => permits,
            Ok(Err(_)) => return None,
            Err(_) => {
                let e = Error::SlowSubscriber(format!(
                    "subscriber too slow: {} deliveries queued for {grace} ms \
                     (subscriber_buffer); resubscribe with from_seq {}",
                    self.limits.buffer - 1,
                    self.next
                ));
                let _ = self.tx.try_send((Err(e.into()), None));
                return None;
            }
        };
        let (Some(permit), Some(spare)) = (permits.next(), permits.next()) else {
            return None;
        };
        let cost = (d.payload.len() + d.sender_name.len())
            .clamp(1, self.limits.buffer_bytes)
            .min(u32::MAX as usize) as u32;
        match tokio::time::timeout_at(deadline, self.bytes.clone().acquire_many_owned(cost)).await {
            Ok(Ok(bytes)) => Some((permit, bytes)),
            Ok(Err(_)) => None,
            Err(_) => {
                let e = Error::SlowSubscriber(format!(
                    "subscriber too slow: {} payload bytes queued for {grace} ms \
                     (subscriber_buffer_bytes); resubscribe with from_seq {}",
                    self.limits
                        .buffer_bytes
                        .saturating_sub(self.bytes.available_permits()),
                    self.next
                ));
                spare.send((Err(e.into()), None));
                None
            }
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
