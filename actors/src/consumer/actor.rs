//! [`ConsumerActor`]: the supervised actor that hosts a [`Consumer`],
//! registers it with its queue, feeds it deliveries in batches, and keeps
//! what an auto-ack consumer had not handled across its restarts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use postbox::{Actor, Context, Failure, Handler, Message};
use tracing::Instrument;

use crate::consumer::{ConsumeOptions, Consumer};
use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::actor::{Cancelled, DeliveryBatch, Sink, Unsubscribe};
use crate::queue::delivery::{Delivery, Link};
use crate::queue::handle::QueueHandle;

/// The actor that hosts a [`Consumer`]: registers with the queue when it
/// starts, unregisters when it stops, and drops deliveries made to an earlier
/// registration (the queue has requeued those).
///
/// Auto-ack deliveries come in batches, already settled. If the handler fails
/// on one, that one is lost (at-most-once, and counted), and the rest of its
/// batch waits in a backlog that outlives the incarnation: the restarted
/// consumer handles it first, in order. What is still waiting when the
/// consumer stops for good is counted as lost.
pub(crate) struct ConsumerActor<C: Consumer> {
    consumer: C,
    queue: QueueHandle,
    mode: AckMode,
    prefetch: u32,
    link: Option<Arc<Link>>,
    backlog: Arc<parking_lot::Mutex<Backlog>>,
}

/// Auto-ack deliveries a consumer took from its mailbox and did not get to
/// handle before its incarnation ended; shared by its incarnations.
#[derive(Default)]
pub(crate) struct Backlog(VecDeque<Delivery>);

impl Drop for Backlog {
    /// The consumer stopped for good: nobody will handle these.
    fn drop(&mut self) {
        for delivery in self.0.drain(..) {
            delivery.lost();
        }
    }
}

/// The auto-ack deliveries one handler call works through. Whatever way the
/// call ends (returns, fails, panics, or is dropped), what it did not reach
/// goes back to the backlog, ahead of anything there, and a delivery whose
/// handler did not return is counted as lost.
struct InHand<'a> {
    backlog: &'a parking_lot::Mutex<Backlog>,
    rest: VecDeque<Delivery>,
    /// The registration of the deliveries (their queue's loss counter).
    link: Option<Arc<Link>>,
    /// A delivery is in its handler.
    handling: bool,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if self.handling
            && let Some(link) = &self.link
        {
            link.lose_one();
        }
        if !self.rest.is_empty() {
            let mut backlog = self.backlog.lock();
            let mut rest = std::mem::take(&mut self.rest);
            rest.append(&mut backlog.0);
            backlog.0 = rest;
        }
    }
}

impl<C: Consumer> ConsumerActor<C> {
    /// Wraps `consumer` for `queue`, sharing `backlog` with the other
    /// incarnations of the same consumer.
    pub(crate) fn with_backlog(
        queue: QueueHandle,
        options: &ConsumeOptions,
        consumer: C,
        backlog: Arc<parking_lot::Mutex<Backlog>>,
    ) -> Self {
        ConsumerActor {
            consumer,
            queue,
            mode: options.mode,
            prefetch: options.prefetch,
            link: None,
            backlog,
        }
    }

    /// Handles auto-ack deliveries in order, the backlog's first.
    async fn handle_auto(&mut self, batch: Vec<Delivery>) -> Result<(), Failure> {
        let backlog = self.backlog.clone();
        let mut rest = std::mem::take(&mut backlog.lock().0);
        rest.extend(batch);
        let mut hand = InHand {
            backlog: &backlog,
            link: rest.front().map(|d| d.link().clone()),
            rest,
            handling: false,
        };
        while let Some(delivery) = hand.rest.pop_front() {
            hand.handling = true;
            // On failure, at most once: this one is lost (counted when `hand`
            // drops), and the rest wait for the next incarnation.
            self.handle_one(delivery).await?;
            hand.handling = false;
        }
        Ok(())
    }
}

impl<C: Consumer> Actor for ConsumerActor<C> {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(me) = ctx.addr() else {
            ctx.stop();
            return Ok(());
        };
        let link = self
            .queue
            .subscribe_as(
                Sink::Batch {
                    deliveries: me.recipient(),
                    cancelled: me.recipient(),
                },
                self.mode,
                self.prefetch,
                Some(ctx.incarnation()),
            )
            .await;
        match link {
            Ok(link) => self.link = Some(link),
            Err(err) => {
                // The queue is gone: nothing to consume, and restarting will not help.
                tracing::warn!(queue = %self.queue.name(), %err, "consumer stops: queue unavailable");
                self.consumer.cancelled().await;
                ctx.stop();
                return Ok(());
            }
        }
        // What an earlier incarnation left unhandled comes first.
        if !self.backlog.lock().0.is_empty() {
            self.handle_auto(Vec::new()).await?;
        }
        Ok(())
    }

    async fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(link) = self.link.take() {
            let _ = self.queue.addr.send(Unsubscribe(link.consumer)).await;
        }
    }
}

impl<C: Consumer> ConsumerActor<C> {
    async fn handle_one(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let current = self.link.as_ref().map(|l| l.consumer);
        if delivery.ack_mode() == AckMode::Manual
            && (Some(delivery.consumer()) != current || !delivery.is_live())
        {
            // Made to an earlier registration of this actor, or one that has
            // ended: the queue requeued it (or was deleted with it).
            tracing::trace!(queue = %delivery.queue(), tag = %delivery.tag(), "stale delivery skipped");
            return Ok(());
        }
        let span = tracing::debug_span!(
            "consume",
            queue = %delivery.queue(),
            message_id = %delivery.id(),
            correlation_id = delivery.correlation_id(),
            tag = %delivery.tag(),
            redelivered = delivery.redelivered(),
        );
        self.consumer.handle(delivery).instrument(span).await
    }
}

impl<C: Consumer> Handler<Delivery> for ConsumerActor<C> {
    async fn handle(
        &mut self,
        delivery: Delivery,
        _ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        self.handle_one(delivery).await
    }
}

/// Deliveries come in batches from the queue (one mailbox slot for up to 64);
/// each is handled in order, one at a time. If the consumer fails, the rest of
/// a manual-ack batch is requeued by the queue (the registration ends with the
/// incarnation); the rest of an auto-ack batch waits in the backlog for the
/// restarted incarnation.
impl<C: Consumer> Handler<DeliveryBatch> for ConsumerActor<C> {
    async fn handle(
        &mut self,
        mut batch: DeliveryBatch,
        _ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        let batch = std::mem::take(&mut batch.0);
        if batch.first().is_some_and(|d| d.ack_mode() == AckMode::Auto) {
            return self.handle_auto(batch).await;
        }
        for delivery in batch {
            self.handle_one(delivery).await?;
        }
        Ok(())
    }
}

/// The queue cancelled this consumer (it was deleted): tell the consumer, and
/// stop for good (the supervisor goes too).
impl<C: Consumer> Handler<Cancelled> for ConsumerActor<C> {
    async fn handle(&mut self, _: Cancelled, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.link = None;
        self.consumer.cancelled().await;
        ctx.stop();
        Ok(())
    }
}

/// Graceful cancel, step 1: unregister (no more deliveries; unsettled manual
/// ones are requeued), then stop once what is already in the mailbox is handled.
pub(crate) struct Drain;
impl Message for Drain {
    type Reply = ();
}
impl<C: Consumer> Handler<Drain> for ConsumerActor<C> {
    async fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Result<(), Failure> {
        if let Some(link) = self.link.take() {
            // Wait until the queue has processed it: every delivery it made to us
            // is then in our mailbox, ahead of the stop below.
            let _ = self.queue.addr.ask(Unsubscribe(link.consumer)).await;
        }
        ctx.notify_later(StopNow, Duration::ZERO);
        Ok(())
    }
}

/// Graceful cancel, step 2.
struct StopNow;
impl Message for StopNow {
    type Reply = ();
}
impl<C: Consumer> Handler<StopNow> for ConsumerActor<C> {
    async fn handle(&mut self, _: StopNow, ctx: &mut Context<Self>) -> Result<(), Failure> {
        ctx.stop();
        Ok(())
    }
}

/// Which registration a consumer actor holds right now.
pub(crate) struct Registration;
impl Message for Registration {
    type Reply = Option<ConsumerId>;
}
impl<C: Consumer> Handler<Registration> for ConsumerActor<C> {
    async fn handle(
        &mut self,
        _: Registration,
        _: &mut Context<Self>,
    ) -> Result<Option<ConsumerId>, Failure> {
        Ok(self.link.as_ref().map(|l| l.consumer))
    }
}
