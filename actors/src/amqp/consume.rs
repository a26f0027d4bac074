//! Consuming from RabbitMQ: [`RemoteQueue`] (what a
//! [`QueueHandle`](crate::QueueHandle) holds for a RabbitMQ queue), one
//! channel per consumer registration, and [`Settle`], which applies a
//! link's settlements on that channel.
//!
//! A registration keeps one [`Link`] across reconnections, so the consumer
//! actor never sees it change. Delivery tags are RabbitMQ's, with the
//! session's generation in the top 16 bits: a tag of a lost channel can
//! never settle a delivery of the new one (its deliveries were requeued by
//! RabbitMQ and come again, flagged redelivered).
//!
//! The consumer actor's incarnation is watched: when it crashes or stops,
//! the link is closed first (so late settlements fail with `ConsumerGone`)
//! and then the channel, and RabbitMQ requeues what it held, as an embedded
//! queue does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::FieldTable;
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use super::connection::{Remote, Session};
use super::convert::{envelope, short};
use super::topology::{Subject, refusal};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::queue::ack::{AckMode, ConsumerId, DeliveryTag};
use crate::queue::actor::{Cancelled, DeliveryBatch, QueueSnapshot, Sink, Subscribe};
use crate::queue::delivery::{
    ApplySettlements, Delivery, Link, LinkTarget, Outcome, PendingSettle,
};
use crate::queue::handle::RemoteOps;
use futures::future::BoxFuture;

/// Bits of a delivery tag that hold RabbitMQ's tag; the generation is above.
const TAG_BITS: u32 = crate::queue::delivery::GENERATION_SHIFT;
use crate::queue::delivery::GENERATION_MASK;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// Deliveries handed to the consumer actor in one mailbox slot, at most.
const BATCH: usize = 64;

/// A queue on RabbitMQ, as a [`QueueHandle`](crate::QueueHandle) holds it.
#[derive(Clone)]
pub(crate) struct RemoteQueue {
    name: ByteString,
    remote: Arc<Remote>,
    /// As of the declaration, plus this process's registrations since.
    consumers: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RemoteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteQueue")
            .field("name", &self.name)
            .field("remote", &self.remote)
            .finish()
    }
}

impl From<RemoteQueue> for crate::queue::handle::QueueHandle {
    fn from(queue: RemoteQueue) -> Self {
        let ops: Arc<dyn RemoteOps> = Arc::new(queue);
        ops.into()
    }
}

impl RemoteOps for RemoteQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn is_live(&self) -> bool {
        !self.remote.is_closed()
    }

    fn consumer_count(&self) -> usize {
        self.consumers.load(Ordering::Relaxed)
    }

    fn gone(&self) -> BrokerError {
        if self.remote.is_closed() {
            BrokerError::Stopped
        } else {
            BrokerError::QueueNotFound(self.name.to_string())
        }
    }

    fn publish(&self, message: Envelope) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(
            self.remote
                .publish_to_queue(&self.name, message, self.remote.max_message_bytes),
        )
    }

    fn publish_batch(&self, messages: Vec<Envelope>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(
            self.remote
                .publish_batch(&self.name, messages, self.remote.max_message_bytes),
        )
    }

    fn get(&self, mode: AckMode) -> BoxFuture<'_, Result<Option<(Delivery, usize)>, BrokerError>> {
        Box::pin(self.fetch(mode))
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<QueueSnapshot, BrokerError>> {
        Box::pin(async {
            let snapshot = self.remote.queue_snapshot(&self.name).await?;
            self.consumers
                .store(snapshot.stats.consumers, Ordering::Relaxed);
            Ok(snapshot)
        })
    }

    fn subscribe(&self, subscribe: Subscribe) -> BoxFuture<'_, Result<Arc<Link>, BrokerError>> {
        Box::pin(self.register(subscribe))
    }

    fn cancel(&self, consumer: ConsumerId) -> BoxFuture<'_, Option<usize>> {
        let registered = self.remote.registration(consumer);
        let timeout = self.remote.options.timeout;
        Box::pin(async move {
            let registered = registered?;
            let mut cancelled = registered.settle.cancelled.subscribe();
            registered.settle.cancel.notify_one();
            // A barrier, as embedded: once RabbitMQ has confirmed the
            // cancel, nothing more is delivered, and what it held is known.
            let _ = tokio::time::timeout(timeout, cancelled.wait_for(|c| *c)).await;
            Some(registered.link.outstanding())
        })
    }

    fn unsubscribe(&self, consumer: ConsumerId) -> BoxFuture<'_, ()> {
        let registered = self.remote.registration(consumer);
        let timeout = self.remote.options.timeout;
        Box::pin(async move {
            let Some(registered) = registered else { return };
            registered.end_now();
            // Returns once RabbitMQ has the channel closed (what it held
            // requeued), as an embedded queue requeues before answering.
            let mut done = registered.settle.done.subscribe();
            let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
        })
    }
}

impl RemoteQueue {
    /// A handle on queue `name`, which had `consumers` when last asked.
    pub(crate) fn new(remote: &Arc<Remote>, name: &str, consumers: usize) -> Self {
        RemoteQueue {
            name: name.into(),
            remote: remote.clone(),
            consumers: Arc::new(AtomicUsize::new(consumers)),
        }
    }

    /// `basic.get` on a channel of its own: a manual delivery keeps the
    /// channel until it is dropped, which requeues it if unsettled.
    async fn fetch(&self, mode: AckMode) -> Result<Option<(Delivery, usize)>, BrokerError> {
        let remote = &self.remote;
        let name = &*self.name;
        let queue = short(name, "a queue name")?;
        remote
            .timed("basic.get", async {
                let channel = remote.own_channel(Subject::Queue(name)).await?;
                let got = channel
                    .basic_get(
                        queue,
                        BasicGetOptions {
                            no_ack: mode == AckMode::Auto,
                        },
                    )
                    .await
                    .map_err(|e| refusal(remote, &e, Subject::Queue(name)));
                let got = match got {
                    Ok(Some(got)) => got,
                    other => {
                        let _ = channel.close(200, "done".into()).await;
                        return other.map(|_| None);
                    }
                };
                let left = got.message_count as usize;
                let d = got.delivery;
                let mut message = envelope(
                    d.data,
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                    d.redelivered,
                    &d.properties,
                );
                remote.count_delivery(&mut message);
                // The channel is this delivery's alone: epoch 1.
                let settle = Arc::new(Settle::new(remote.clone(), 1, channel));
                let link = Arc::new(Link::new(
                    ConsumerId(remote.consumer_id()),
                    self.name.clone(),
                    LinkTarget::Remote(settle.clone() as Arc<dyn ApplySettlements>),
                    mode,
                    Arc::default(),
                ));
                let tag = DeliveryTag(tag_of(1, d.delivery_tag));
                link.reset(1);
                link.track([tag]);
                let guard = Box::new(CloseOnDrop {
                    link: link.clone(),
                    settle,
                });
                Ok(Some((
                    Delivery::guarded(message, tag, link, 0, guard),
                    left,
                )))
            })
            .await
    }

    /// Registers a consumer: a channel with the prefetch, `basic.consume`,
    /// and a task that hands its deliveries to `sink` (and consumes again
    /// after a reconnection) until the consumer goes.
    async fn register(&self, subscribe: Subscribe) -> Result<Arc<Link>, BrokerError> {
        let Subscribe {
            sink,
            mode,
            prefetch,
            incarnation,
            exclusive,
            slot,
            // Never claimed: a RabbitMQ registration is always awaited.
            claim: _,
        } = subscribe;
        let Some(watched) = sink.any() else {
            return Err(BrokerError::unsupported("a consumer without an actor"));
        };
        let remote = self.remote.clone();
        let session = remote.session().await?;
        let settle = Arc::new(Settle::new(remote.clone(), 0, None));
        let link = Arc::new(Link::new(
            ConsumerId(remote.consumer_id()),
            self.name.clone(),
            LinkTarget::Remote(settle.clone() as Arc<dyn ApplySettlements>),
            mode,
            Arc::default(),
        ));
        let registration = Registration {
            remote,
            queue: self.name.clone(),
            link: link.clone(),
            settle,
            sink,
            mode,
            prefetch,
            exclusive,
            consumers: self.consumers.clone(),
            epoch: std::sync::atomic::AtomicU64::new(0),
        };
        let (started_tx, started_rx) = oneshot::channel();
        let registered = Registered {
            settle: registration.settle.clone(),
            link: link.clone(),
        };
        registration
            .remote
            .register(link.consumer, registered.clone());
        watched.on_exit(incarnation, move |_| registered.end_now());
        if let Some(slot) = slot {
            let _ = slot.set(link.clone());
        }
        tokio::spawn(registration.run(session, started_tx));
        match started_rx.await {
            Ok(Ok(())) => Ok(link),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(self.gone()),
        }
    }
}

/// Closes a `basic.get` delivery's channel when the delivery is dropped;
/// unsettled, RabbitMQ requeues it.
struct CloseOnDrop {
    link: Arc<Link>,
    settle: Arc<Settle>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let (link, settle) = (self.link.clone(), self.settle.clone());
        // Ended at once (a later settlement is `ConsumerGone`); what was
        // settled before goes out before the channel closes.
        let accepted = link.close();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                settle.finish(&link, accepted).await;
                settle.close("done").await;
            });
        }
    }
}

/// `tag` of channel `epoch`, as postbox numbers it (the epoch in the top
/// 16 bits, wrapping).
fn tag_of(epoch: u64, tag: u64) -> u64 {
    ((epoch & GENERATION_MASK) << TAG_BITS) | (tag & TAG_MASK)
}

/// Applies one link's settlements on its channel, in order; and the signals
/// that end its registration.
pub(crate) struct Settle {
    remote: Arc<Remote>,
    /// The channel deliveries came on, and its epoch (see [`tag_of`]).
    channel: Arc<Mutex<Option<(u64, lapin::Channel)>>>,
    /// One drain at a time, so settlements reach RabbitMQ in order; also
    /// held to close the channel, so that no settlement follows the close
    /// (RabbitMQ closes the whole connection on a frame after a close).
    applying: Arc<tokio::sync::Mutex<()>>,
    /// A registration's own task sends its settlements (woken by this), so
    /// that a consumer's ack does not wait for the frame to be written.
    background: std::sync::atomic::AtomicBool,
    wake: Notify,
    /// The consumer actor's incarnation ended, or the registration was
    /// closed: close the channel (RabbitMQ requeues what it held).
    stop: Arc<Notify>,
    /// `basic.cancel`: deliver nothing more, end once settled.
    cancel: Notify,
    /// Settled: wakes a cancelled registration waiting for its last ack.
    settled: Notify,
    /// Settlements accepted before the registration ended, to send before
    /// the channel closes.
    last: Mutex<Vec<PendingSettle>>,
    /// Deliveries nacked with a delay, unacknowledged at RabbitMQ until
    /// their nack goes: no `multiple` ack may cover them.
    delayed: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    /// The registration is over: its channel is closed.
    done: tokio::sync::watch::Sender<bool>,
    /// RabbitMQ confirmed its `basic.cancel` (or the registration ended).
    cancelled: tokio::sync::watch::Sender<bool>,
}

/// A running registration, as the broker's registry keeps it.
#[derive(Clone)]
pub(crate) struct Registered {
    settle: Arc<Settle>,
    link: Arc<Link>,
}

impl Registered {
    /// Ends the registration at once: later settlements fail with
    /// `ConsumerGone`; those accepted before are sent, then the channel is
    /// closed and RabbitMQ requeues the rest.
    fn end_now(&self) {
        let accepted = self.link.close();
        self.settle.last.lock().extend(accepted);
        self.settle.stop.notify_one();
    }
}

impl Settle {
    fn new(remote: Arc<Remote>, epoch: u64, channel: impl Into<Option<lapin::Channel>>) -> Self {
        Settle {
            remote,
            channel: Arc::new(Mutex::new(channel.into().map(|c| (epoch, c)))),
            applying: Arc::default(),
            background: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
            stop: Arc::new(Notify::new()),
            cancel: Notify::new(),
            settled: Notify::new(),
            last: Mutex::default(),
            delayed: Arc::default(),
            done: tokio::sync::watch::Sender::new(false),
            cancelled: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Closes the channel, never while a settlement is being sent, and
    /// taken first, so that none is sent after.
    async fn close(&self, reason: &str) {
        let _one = self.applying.lock().await;
        let channel = self.channel.lock().take();
        if let Some((_, channel)) = channel {
            let _ = channel.close(200, reason.into()).await;
        }
    }

    /// Sends what `close` returned (and anything still pending), in order.
    async fn finish(&self, link: &Link, accepted: Vec<PendingSettle>) {
        self.last.lock().extend(accepted);
        self.send(link).await;
    }

    /// Sends the link's recorded settlements to RabbitMQ. Those for a
    /// channel that is gone are dropped: RabbitMQ requeued their deliveries.
    async fn send(&self, link: &Link) {
        let _one = self.applying.lock().await;
        let (drained, oldest, active) = link.drain_with_oldest();
        let mut pending = std::mem::take(&mut *self.last.lock());
        pending.extend(drained);
        let current = self.channel.lock().clone();
        let Some((epoch, channel)) = current else {
            return;
        };
        pending.retain(|p| p.tag.0 >> TAG_BITS == epoch & GENERATION_MASK);
        let merged = merged_ack(&pending, oldest, active, &self.delayed.lock());
        if let Some(newest) = merged {
            let options = BasicAckOptions { multiple: true };
            if let Err(err) = channel.basic_ack(newest.0 & TAG_MASK, options).await {
                tracing::debug!(error = %self.remote.scrub(&err), "acks not sent: the channel is gone, RabbitMQ requeues");
            }
            self.settled.notify_one();
            return;
        }
        for PendingSettle {
            tag,
            multiple,
            outcome,
        } in pending
        {
            let amqp_tag = tag.0 & TAG_MASK;
            let nack = move |requeue| BasicNackOptions { multiple, requeue };
            let sent = match outcome {
                Outcome::Ack => {
                    channel
                        .basic_ack(amqp_tag, BasicAckOptions { multiple })
                        .await
                }
                Outcome::Requeue => channel.basic_nack(amqp_tag, nack(true)).await,
                Outcome::Discard => channel.basic_nack(amqp_tag, nack(false)).await,
                Outcome::RequeueAfter(delay) => {
                    // Held (unacknowledged) until the delay has passed, then
                    // requeued; if the consumer goes first, RabbitMQ
                    // requeues it at once. Sent in turn with the other
                    // settlements and the close, on the channel it came on
                    // if that is still the current one.
                    self.delayed.lock().insert(tag.0);
                    let (slot, applying, delayed) = (
                        self.channel.clone(),
                        self.applying.clone(),
                        self.delayed.clone(),
                    );
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _one = applying.lock().await;
                        let current = slot.lock().clone();
                        if let Some((_, channel)) = current.filter(|(now, _)| *now == epoch) {
                            let _ = channel.basic_nack(amqp_tag, nack(true)).await;
                        }
                        delayed.lock().remove(&tag.0);
                    });
                    Ok(())
                }
            };
            if let Err(err) = sent {
                tracing::debug!(error = %self.remote.scrub(&err), "settlement not sent: the channel is gone, RabbitMQ requeues");
            }
        }
        self.settled.notify_one();
    }
}

impl ApplySettlements for Settle {
    fn apply<'a>(&'a self, link: &'a Link) -> BoxFuture<'a, ()> {
        if self.background.load(Ordering::Acquire) {
            self.wake.notify_one();
            return Box::pin(std::future::ready(()));
        }
        Box::pin(self.send(link))
    }

    fn snapshot<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueSnapshot, BrokerError>> {
        Box::pin(self.remote.queue_snapshot(queue))
    }
}

/// The one ack with `multiple` that can stand for `pending`, if any: a run
/// of two or more plain acks is one frame up to the newest of them when
/// nothing older is held, neither here (`oldest_held`, read with the
/// drain) nor at RabbitMQ (a `delayed` nack still to come), and the
/// registration is on (once it ended, what it held is no longer counted).
fn merged_ack(
    pending: &[PendingSettle],
    oldest_held: Option<DeliveryTag>,
    active: bool,
    delayed: &std::collections::BTreeSet<u64>,
) -> Option<DeliveryTag> {
    let newest = pending.iter().map(|p| p.tag).max()?;
    let plain_acks = pending
        .iter()
        .all(|p| p.outcome == Outcome::Ack && !p.multiple);
    (active
        && pending.len() > 1
        && plain_acks
        && oldest_held.is_none_or(|oldest| oldest > newest)
        && delayed.range(..=newest.0).next().is_none())
    .then_some(newest)
}

/// One consumer registration's task.
struct Registration {
    remote: Arc<Remote>,
    queue: ByteString,
    link: Arc<Link>,
    settle: Arc<Settle>,
    sink: Sink,
    mode: AckMode,
    prefetch: u32,
    exclusive: bool,
    consumers: Arc<AtomicUsize>,
    /// Channels opened so far: each one's deliveries carry its number.
    epoch: std::sync::atomic::AtomicU64,
}

/// How a channel's consumption ended.
enum Ended {
    /// The consumer went, or was closed: done.
    Stopped,
    /// Cancelled: wait for its deliveries to be settled, then done.
    Cancelled,
    /// RabbitMQ cancelled it (the queue was deleted): done, the consumer
    /// is told.
    Deleted,
    /// The channel or the connection was lost: consume again.
    Lost,
}

/// The pause before consuming again after a channel was lost on a live
/// connection (RabbitMQ closed it: a consumer timeout, a refused ack).
const REOPEN_PAUSE: Duration = Duration::from_millis(100);

impl Registration {
    async fn run(
        self,
        mut session: Arc<Session>,
        started: oneshot::Sender<Result<(), BrokerError>>,
    ) {
        // This registration's settlements go out from their own task.
        let acker = {
            let (settle, link) = (self.settle.clone(), self.link.clone());
            settle.background.store(true, Ordering::Release);
            tokio::spawn(async move {
                // Until the registration ends (not aborted: a drained batch
                // is always sent).
                while settle.background.load(Ordering::Acquire) {
                    settle.wake.notified().await;
                    settle.send(&link).await;
                }
            })
        };
        self.consumers.fetch_add(1, Ordering::Relaxed);
        let mut started = Some(started);
        // The current lapin consumer, kept until its channel is closed:
        // dropped while lapin counts it active, lapin sends a `basic.cancel`
        // of its own from its internal task, which could follow our
        // `channel.close`, and RabbitMQ closes the whole connection on a
        // frame for a channel it has closed. Dropped after the close,
        // lapin has cancelled it and sends nothing.
        let mut current: Option<lapin::Consumer> = None;
        loop {
            if !self.link.is_active() {
                break;
            }
            let consumer = match self.open(&session).await {
                Ok(consumer) => consumer,
                Err(err) => {
                    if let Some(started) = started.take() {
                        let _ = started.send(Err(err));
                        break;
                    }
                    if matches!(
                        err,
                        BrokerError::QueueNotFound(_)
                            | BrokerError::ExclusiveConsumer { .. }
                            | BrokerError::Stopped
                    ) {
                        // The queue went while the connection was down.
                        tracing::warn!(queue = %self.queue, %err, "consuming again failed: the consumer stops");
                        self.tell_cancelled(true).await;
                        break;
                    }
                    // Passing trouble (a timeout, a flapping connection):
                    // again, on the next connection or after a pause.
                    tracing::debug!(queue = %self.queue, %err, "consuming again failed; retrying");
                    match self.next_session(&session).await {
                        Some(next) => session = next,
                        None => break,
                    }
                    continue;
                }
            };
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            // A consumer replaced here was on a lost channel: lapin has
            // forgotten that channel and sends nothing for it.
            let consumer = current.insert(consumer);
            match self.pump(consumer).await {
                Ended::Lost => {
                    // What it held is requeued by RabbitMQ: settling it now
                    // is `ConsumerGone`.
                    let epoch = self.epoch.load(Ordering::Relaxed);
                    self.link.reset(epoch + 1);
                    *self.settle.channel.lock() = None;
                    match self.next_session(&session).await {
                        Some(next) => session = next,
                        None => break,
                    }
                }
                Ended::Stopped => break,
                Ended::Deleted => {
                    self.tell_cancelled(true).await;
                    break;
                }
                Ended::Cancelled => {
                    loop {
                        if self.link.outstanding() == 0 {
                            break;
                        }
                        tokio::select! {
                            () = self.settle.settled.notified() => {}
                            () = self.settle.stop.notified() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    self.tell_cancelled(false).await;
                    break;
                }
            }
        }
        let accepted = self.link.close();
        self.settle.last.lock().extend(accepted);
        // What was settled before the end reaches RabbitMQ first.
        self.settle.background.store(false, Ordering::Release);
        self.settle.wake.notify_one();
        let _ = acker.await;
        self.settle.send(&self.link).await;
        self.settle.close("consumer gone").await;
        drop(current);
        self.settle.done.send_replace(true);
        self.settle.cancelled.send_replace(true);
        self.consumers.fetch_sub(1, Ordering::Relaxed);
        self.remote.unregister(self.link.consumer);
    }

    /// The session to consume on next: this one after a pause if it is
    /// still up (RabbitMQ closed only the channel), else the next; `None`
    /// if the consumer is stopped meanwhile or the broker closed.
    async fn next_session(&self, session: &Arc<Session>) -> Option<Arc<Session>> {
        let wait = async {
            if session.connection.status().connected() {
                tokio::time::sleep(REOPEN_PAUSE).await;
                if session.connection.status().connected() {
                    return Some(session.clone());
                }
            }
            self.remote.next_session(session.generation).await
        };
        tokio::select! {
            next = wait => next.filter(|_| self.link.is_active()),
            () = self.settle.stop.notified() => None,
        }
    }

    /// A channel with the prefetch, consuming the queue.
    async fn open(&self, session: &Session) -> Result<lapin::Consumer, BrokerError> {
        let remote = &self.remote;
        let name = &*self.queue;
        let subject = Subject::Queue(name);
        remote
            .timed("basic.consume", async {
                let channel = remote.channel_on(session, subject).await?;
                if self.mode == AckMode::Manual {
                    let prefetch = u16::try_from(self.prefetch).unwrap_or(u16::MAX);
                    channel
                        .basic_qos(prefetch, BasicQosOptions::default())
                        .await
                        .map_err(|e| refusal(remote, &e, subject))?;
                }
                let consumer = channel
                    .basic_consume(
                        short(name, "a queue name")?,
                        format!("postbox-{}", self.link.consumer.0).into(),
                        BasicConsumeOptions {
                            no_ack: self.mode == AckMode::Auto,
                            exclusive: self.exclusive,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| refusal(remote, &e, subject))?;
                // A new channel numbers its deliveries from 1 again: its
                // epoch tells them from an earlier channel's.
                let epoch = (self.epoch.fetch_add(1, Ordering::Relaxed) + 1) & GENERATION_MASK;
                let epoch = epoch.max(1);
                self.epoch.store(epoch, Ordering::Relaxed);
                *self.settle.channel.lock() = Some((epoch, channel));
                self.link.reset(epoch);
                Ok(consumer)
            })
            .await
    }

    /// Hands deliveries to the consumer actor, in batches of what is
    /// already there, until the channel ends or the consumer goes.
    async fn pump(&self, consumer: &mut lapin::Consumer) -> Ended {
        let epoch = self.epoch.load(Ordering::Relaxed);
        loop {
            let first = tokio::select! {
                biased;
                () = self.settle.stop.notified() => return Ended::Stopped,
                () = self.settle.cancel.notified() => {
                    self.cancel_now(consumer).await;
                    return Ended::Cancelled;
                }
                next = consumer.next() => next,
            };
            let mut batch = Vec::new();
            let mut next = first;
            loop {
                match next {
                    Some(Ok(d)) => {
                        let tag = DeliveryTag(tag_of(epoch, d.delivery_tag));
                        let mut message = envelope(
                            d.data,
                            d.exchange.as_str(),
                            d.routing_key.as_str(),
                            d.redelivered,
                            &d.properties,
                        );
                        self.remote.count_delivery(&mut message);
                        batch.push(Delivery::new(message, tag, self.link.clone(), 0));
                    }
                    Some(Err(err)) => {
                        tracing::debug!(queue = %self.queue, error = %self.remote.scrub(&err), "consumer channel lost");
                        return Ended::Lost;
                    }
                    None => {
                        let connected = self
                            .settle
                            .channel
                            .lock()
                            .as_ref()
                            .is_some_and(|(_, c)| c.status().connected());
                        return if connected {
                            Ended::Deleted
                        } else {
                            Ended::Lost
                        };
                    }
                }
                if batch.len() >= BATCH {
                    break;
                }
                match futures::FutureExt::now_or_never(consumer.next()) {
                    Some(more) => next = more,
                    None => break,
                }
            }
            if self.mode == AckMode::Manual {
                self.link.track(batch.iter().map(Delivery::tag));
            }
            // A cancel while the consumer's mailbox is full is answered at
            // once (the consumer may be waiting on it), and the batch is
            // still handed over: it was delivered.
            let handing = self.hand_over(batch);
            tokio::pin!(handing);
            let mut cancelling = false;
            loop {
                tokio::select! {
                    biased;
                    () = self.settle.stop.notified() => return Ended::Stopped,
                    () = self.settle.cancel.notified(), if !cancelling => {
                        self.cancel_now(consumer).await;
                        cancelling = true;
                    }
                    handed = &mut handing => {
                        if !handed {
                            return Ended::Stopped;
                        }
                        if cancelling {
                            return Ended::Cancelled;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// `basic.cancel`, answered once RabbitMQ confirms it (`cancel-ok`):
    /// nothing more is delivered after.
    async fn cancel_now(&self, consumer: &lapin::Consumer) {
        let channel = self.settle.channel.lock().clone();
        if let Some((_, channel)) = channel {
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
        }
        self.settle.cancelled.send_replace(true);
    }

    /// Sends a batch to the consumer actor, waiting while its mailbox is
    /// full; false if it is gone.
    async fn hand_over(&self, batch: Vec<Delivery>) -> bool {
        match &self.sink {
            Sink::Batch { deliveries, .. } => deliveries.send(DeliveryBatch(batch)).await.is_ok(),
            Sink::One(sink) => {
                for delivery in batch {
                    if sink.send(delivery).await.is_err() {
                        return false;
                    }
                }
                true
            }
            Sink::Fetch => false,
        }
    }

    async fn tell_cancelled(&self, deleted: bool) {
        if let Sink::Batch { cancelled, .. } = &self.sink {
            let _ = cancelled.send(Cancelled { deleted }).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ack(tag: u64) -> PendingSettle {
        PendingSettle {
            tag: DeliveryTag(tag),
            multiple: false,
            outcome: Outcome::Ack,
        }
    }

    #[test]
    fn a_run_of_acks_is_one_multiple_ack_only_when_it_covers_nothing_else() {
        let none = BTreeSet::new();
        let run = [ack(2), ack(3), ack(4)];
        // Nothing older held: one frame up to 4.
        assert_eq!(merged_ack(&run, None, true, &none), Some(DeliveryTag(4)));
        assert_eq!(
            merged_ack(&run, Some(DeliveryTag(5)), true, &none),
            Some(DeliveryTag(4))
        );
        // 1 still held: it would be acked too.
        assert_eq!(merged_ack(&run, Some(DeliveryTag(1)), true, &none), None);
        // The registration ended: what it held is no longer counted.
        assert_eq!(merged_ack(&run, None, false, &none), None);
        // 1 was nacked with a delay: unacknowledged at RabbitMQ until then.
        assert_eq!(merged_ack(&run, None, true, &BTreeSet::from([1])), None);
        assert_eq!(
            merged_ack(&run, None, true, &BTreeSet::from([9])),
            Some(DeliveryTag(4))
        );
        // Anything but plain acks, or a single one, goes as it is.
        let mut mixed = run.to_vec();
        mixed[1].outcome = Outcome::Requeue;
        assert_eq!(merged_ack(&mixed, None, true, &none), None);
        let mut multiple = run.to_vec();
        multiple[2].multiple = true;
        assert_eq!(merged_ack(&multiple, None, true, &none), None);
        assert_eq!(merged_ack(&[ack(2)], None, true, &none), None);
        assert_eq!(merged_ack(&[], None, true, &none), None);
    }
}
