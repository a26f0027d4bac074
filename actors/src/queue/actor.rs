//! The queue actor: drives a [`QueueState`] from messages and pushes its
//! dispatches to consumer actors.
//!
//! Flow control is end to end. Publishers wait when the queue's mailbox is full.
//! The queue never waits on a consumer: it hands deliveries over with `try_send`,
//! and a consumer whose mailbox is full is marked blocked (no more dispatches to
//! it) while a small task waits for room and then unblocks it. A manual-ack
//! consumer is further bounded by its prefetch; an auto-ack consumer by its
//! mailbox only, and its deliveries are settled once they are in that mailbox.
//!
//! Consumers are watched: when a consumer's incarnation ends (stop, error or
//! panic), its registration ends and every delivery it had not settled is
//! requeued at its original position.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytestring::ByteString;
use postbox::{
    Actor, ActorId, AnyAddr, Context, Failure, Handler, Message, Recipient, TrySendError,
};

use crate::delivery::{Delivery, Link, Outcome, PendingSettle};
use crate::envelope::Envelope;
use crate::observe::Observers;
use crate::queue::state::{
    AckMode, ConsumerId, ConsumerStats, DeliveryTag, QueueState, QueueStats,
};

/// A queue's counters and consumers at one moment.
#[derive(Clone, Debug)]
pub struct QueueSnapshot {
    /// The queue's name.
    pub name: ByteString,
    /// Message counts and counters.
    pub stats: QueueStats,
    /// One entry per registered consumer.
    pub consumers: Vec<ConsumerStats>,
}

struct Registered {
    sink: Recipient<Delivery>,
    link: Arc<Link>,
}

/// The actor that owns one queue. Reach it through the
/// [`Broker`](crate::Broker) or a [`QueueHandle`](crate::QueueHandle).
pub struct QueueActor {
    name: ByteString,
    state: QueueState,
    consumers: HashMap<ConsumerId, Registered>,
    next_consumer: u64,
    observers: Observers,
    on_stop: Option<OnStop>,
    consumer_count: Arc<AtomicUsize>,
}

/// Called once when the queue actor stops: removes it from the topology.
pub(crate) type OnStop = Box<dyn FnOnce(&str, ActorId) + Send>;

impl QueueActor {
    pub(crate) fn new(
        name: ByteString,
        observers: Observers,
        on_stop: OnStop,
        consumer_count: Arc<AtomicUsize>,
    ) -> Self {
        QueueActor {
            name,
            state: QueueState::new(),
            consumers: HashMap::new(),
            next_consumer: 1,
            observers,
            on_stop: Some(on_stop),
            consumer_count,
        }
    }

    fn publish(&mut self, message: Envelope) {
        self.observers.each(|o| o.published(&self.name, &message));
        self.state.publish(message);
    }

    /// Hands ready messages to eligible consumers until one of the two runs out.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while let Some(d) = self.state.next_delivery() {
            let Some(reg) = self.consumers.get(&d.consumer) else {
                // Unreachable by construction (registrations mirror the state);
                // put the message back rather than lose it.
                let _ = self.state.nack(d.consumer, d.tag, false, true);
                let _ = self.state.remove_consumer(d.consumer);
                continue;
            };
            self.observers
                .each(|o| o.delivered(&self.name, d.consumer, d.tag, &d.message));
            let auto = reg.link.mode == AckMode::Auto;
            if !auto {
                reg.link.track(d.tag);
            }
            let delivery = Delivery::new(d.message, d.tag, reg.link.clone());
            match reg.sink.try_send(delivery) {
                Ok(()) => {
                    if auto {
                        let _ = self.state.ack(d.consumer, d.tag, false);
                    }
                }
                Err(TrySendError::Full(delivery)) => {
                    let _ = self.state.set_blocked(d.consumer, true);
                    let sink = reg.sink.clone();
                    let me = ctx.addr();
                    let (consumer, tag) = (d.consumer, d.tag);
                    ctx.spawn(async move {
                        let delivered = sink.send(delivery).await.is_ok();
                        if let Some(me) = me {
                            let _ = me
                                .send(Handoff {
                                    consumer,
                                    tag,
                                    delivered,
                                })
                                .await;
                        }
                    });
                }
                Err(TrySendError::Closed(_)) => self.remove(d.consumer),
            }
        }
    }

    /// Ends a registration: applies the settlements it recorded, then requeues
    /// everything else it held.
    fn remove(&mut self, consumer: ConsumerId) {
        let Some(reg) = self.consumers.remove(&consumer) else {
            return;
        };
        self.consumer_count
            .store(self.consumers.len(), Ordering::Relaxed);
        let pending = reg.link.close();
        self.apply(consumer, pending);
        match self.state.remove_consumer(consumer) {
            Ok(requeued) if requeued > 0 => {
                tracing::debug!(queue = %self.name, %consumer, requeued, "consumer gone: deliveries requeued");
            }
            _ => {}
        }
    }

    fn apply(&mut self, consumer: ConsumerId, pending: Vec<PendingSettle>) {
        for p in pending {
            self.observers
                .each(|o| o.settled(&self.name, consumer, p.tag, p.multiple, p.outcome));
            let result = match p.outcome {
                Outcome::Ack => self.state.ack(consumer, p.tag, p.multiple),
                Outcome::Requeue => self.state.nack(consumer, p.tag, p.multiple, true),
                Outcome::Discard => self.state.nack(consumer, p.tag, p.multiple, false),
            };
            if let Err(err) = result {
                // The link validated it; a mismatch here is a bug, not a user error.
                tracing::error!(queue = %self.name, %consumer, %err, "settlement refused by the queue state");
            }
        }
    }

    fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            name: self.name.clone(),
            stats: self.state.stats(),
            consumers: self.state.consumers().collect(),
        }
    }
}

impl Actor for QueueActor {
    async fn stopped(&mut self, ctx: &mut Context<Self>) {
        // Consumers learn that their registrations ended (settling now fails).
        for (_, reg) in self.consumers.drain() {
            reg.link.close();
        }
        self.consumer_count.store(0, Ordering::Relaxed);
        if let Some(on_stop) = self.on_stop.take() {
            on_stop(&self.name, ctx.id());
        }
    }
}

/// Delete the queue when `owner` stops for good.
pub(crate) struct TieTo(pub(crate) AnyAddr);
impl Message for TieTo {
    type Reply = ();
}
impl Handler<TieTo> for QueueActor {
    async fn handle(
        &mut self,
        TieTo(owner): TieTo,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        ctx.watch(&owner, Some(u64::MAX), |_| OwnerGone);
        Ok(())
    }
}

/// The actor this queue is tied to has stopped for good.
struct OwnerGone;
impl Message for OwnerGone {
    type Reply = ();
}
impl Handler<OwnerGone> for QueueActor {
    async fn handle(&mut self, _: OwnerGone, ctx: &mut Context<Self>) -> Result<(), Failure> {
        tracing::debug!(queue = %self.name, "owner gone: exclusive queue deleted");
        ctx.stop();
        Ok(())
    }
}

/// Enqueue one message.
pub(crate) struct Publish(pub(crate) Envelope);
impl Message for Publish {
    type Reply = ();
}
impl Handler<Publish> for QueueActor {
    async fn handle(
        &mut self,
        Publish(message): Publish,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        tracing::trace!(queue = %self.name, message_id = %message.id(), correlation_id = message.correlation_id(), "enqueue");
        self.publish(message);
        self.dispatch(ctx);
        Ok(())
    }
}

/// Enqueue several messages with one mailbox slot.
pub(crate) struct PublishBatch(pub(crate) Vec<Envelope>);
impl Message for PublishBatch {
    type Reply = ();
}
impl Handler<PublishBatch> for QueueActor {
    async fn handle(
        &mut self,
        PublishBatch(batch): PublishBatch,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        for message in batch {
            self.publish(message);
        }
        self.dispatch(ctx);
        Ok(())
    }
}

/// Register a consumer; replies with its link.
pub(crate) struct Subscribe {
    pub(crate) sink: Recipient<Delivery>,
    pub(crate) mode: AckMode,
    pub(crate) prefetch: u32,
    /// The consumer actor's incarnation the registration is tied to.
    pub(crate) incarnation: Option<u64>,
}
impl Message for Subscribe {
    type Reply = Option<Arc<Link>>;
}
impl Handler<Subscribe> for QueueActor {
    async fn handle(
        &mut self,
        msg: Subscribe,
        ctx: &mut Context<Self>,
    ) -> Result<Option<Arc<Link>>, Failure> {
        let Some(me) = ctx.addr() else {
            return Ok(None);
        };
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        // The state always tracks deliveries; auto-ack ones are settled on hand-off.
        let prefetch = if msg.mode == AckMode::Auto {
            0
        } else {
            msg.prefetch
        };
        self.state.add_consumer(id, AckMode::Manual, prefetch)?;
        let link = Arc::new(Link::new(id, self.name.clone(), me, msg.mode));
        ctx.watch(&msg.sink.any(), msg.incarnation, move |_| Unsubscribe(id));
        self.consumers.insert(
            id,
            Registered {
                sink: msg.sink,
                link: link.clone(),
            },
        );
        self.consumer_count
            .store(self.consumers.len(), Ordering::Relaxed);
        tracing::debug!(queue = %self.name, consumer = %id, mode = ?msg.mode, prefetch, "consumer registered");
        self.dispatch(ctx);
        Ok(Some(link))
    }
}

/// End a registration: the consumer is stopping, or its watched incarnation ended.
pub(crate) struct Unsubscribe(pub(crate) ConsumerId);
impl Message for Unsubscribe {
    type Reply = ();
}
impl Handler<Unsubscribe> for QueueActor {
    async fn handle(
        &mut self,
        Unsubscribe(id): Unsubscribe,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        self.remove(id);
        self.dispatch(ctx);
        Ok(())
    }
}

/// A consumer recorded settlements on its link.
pub(crate) struct Settle(pub(crate) ConsumerId);
impl Message for Settle {
    type Reply = ();
}
impl Handler<Settle> for QueueActor {
    async fn handle(&mut self, Settle(id): Settle, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(reg) = self.consumers.get(&id) else {
            return Ok(());
        };
        let pending = reg.link.drain();
        self.apply(id, pending);
        self.dispatch(ctx);
        Ok(())
    }
}

/// A delayed hand-off to a full consumer mailbox finished.
struct Handoff {
    consumer: ConsumerId,
    tag: DeliveryTag,
    delivered: bool,
}
impl Message for Handoff {
    type Reply = ();
}
impl Handler<Handoff> for QueueActor {
    async fn handle(&mut self, msg: Handoff, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(reg) = self.consumers.get(&msg.consumer) else {
            return Ok(());
        };
        if !msg.delivered {
            self.remove(msg.consumer);
        } else {
            if reg.link.mode == AckMode::Auto {
                let _ = self.state.ack(msg.consumer, msg.tag, false);
            }
            let _ = self.state.set_blocked(msg.consumer, false);
        }
        self.dispatch(ctx);
        Ok(())
    }
}

/// Drop every ready message; replies with how many.
pub(crate) struct Purge;
impl Message for Purge {
    type Reply = usize;
}
impl Handler<Purge> for QueueActor {
    async fn handle(&mut self, _: Purge, _: &mut Context<Self>) -> Result<usize, Failure> {
        Ok(self.state.purge())
    }
}

/// Read the counters.
pub(crate) struct Snapshot;
impl Message for Snapshot {
    type Reply = QueueSnapshot;
}
impl Handler<Snapshot> for QueueActor {
    async fn handle(
        &mut self,
        _: Snapshot,
        _: &mut Context<Self>,
    ) -> Result<QueueSnapshot, Failure> {
        Ok(self.snapshot())
    }
}

/// Delete the queue, if the conditions hold; replies with the snapshot at deletion
/// or the snapshot that made it refuse.
pub(crate) struct Delete {
    pub(crate) if_unused: bool,
    pub(crate) if_empty: bool,
}
impl Message for Delete {
    type Reply = Result<QueueSnapshot, QueueSnapshot>;
}
impl Handler<Delete> for QueueActor {
    async fn handle(
        &mut self,
        msg: Delete,
        ctx: &mut Context<Self>,
    ) -> Result<Result<QueueSnapshot, QueueSnapshot>, Failure> {
        let snapshot = self.snapshot();
        if (msg.if_unused && !self.consumers.is_empty()) || (msg.if_empty && !self.state.is_empty())
        {
            return Ok(Err(snapshot));
        }
        ctx.stop();
        Ok(Ok(snapshot))
    }
}
