//! [`ConsumerActor`]: the supervised actor that hosts a [`Consumer`],
//! registers it with its queue, feeds it deliveries in batches, settles a
//! failed delivery by the consumer's [`OnError`] policy, and keeps what an
//! auto-ack consumer had not handled across its restarts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use postbox::{Actor, Context, Failure, Handler, Message};
use tracing::Instrument;

use crate::consumer::retry::settle_failed;
use crate::consumer::{ConsumeOptions, Consumer, OnError};
use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::actor::{Cancelled, DeliveryBatch, Sink, Subscribe};
use crate::queue::delivery::{Delivery, Link, LinkSlot, Outcome, Settler};
use crate::queue::handle::QueueHandle;

/// What the incarnations of one consumer share (it outlives each of them):
/// the auto-ack deliveries taken from the mailbox and not handled yet, the
/// counters, and whether the consumer was cancelled.
#[derive(Default)]
pub(crate) struct Shared {
    backlog: Mutex<VecDeque<Delivery>>,
    /// Cancelled or closed: a restarted incarnation does not register again.
    pub(crate) cancelled: AtomicBool,
    /// Deliveries whose handler returned `Ok`.
    pub(crate) handled: AtomicU64,
    /// Deliveries whose handler returned `Err` (settled by the `OnError` policy).
    pub(crate) errors: AtomicU64,
    /// Crashes: their number, when the recent ones happened, the last failure.
    crashes: Mutex<Crashes>,
}

#[derive(Default)]
struct Crashes {
    count: u64,
    recent: VecDeque<tokio::time::Instant>,
    last: Option<Failure>,
}

/// Crashes within this long make a consumer crash-looping, from the third.
const CRASH_LOOP_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
const CRASH_LOOP_CRASHES: usize = 3;

impl Shared {
    fn record_crash(&self, failure: Failure) {
        let now = tokio::time::Instant::now();
        let mut crashes = self.crashes.lock();
        crashes.count += 1;
        crashes.recent.push_back(now);
        while crashes.recent.len() > CRASH_LOOP_CRASHES {
            crashes.recent.pop_front();
        }
        crashes.last = Some(failure);
    }

    /// (crashes, crash-looping, last failure).
    pub(crate) fn crashes(&self) -> (u64, bool, Option<Failure>) {
        let crashes = self.crashes.lock();
        let looping = crashes.recent.len() >= CRASH_LOOP_CRASHES
            && crashes
                .recent
                .front()
                .is_some_and(|t| t.elapsed() < CRASH_LOOP_WINDOW);
        (crashes.count, looping, crashes.last.clone())
    }
}

impl Shared {
    /// The consumer stopped for good: nobody will handle what is left in its
    /// backlog, which counts as lost.
    pub(crate) fn abandon(&self) {
        let left = std::mem::take(&mut *self.backlog.lock());
        for delivery in left {
            delivery.lost();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// The auto-ack deliveries one handler call works through. Whatever way the
/// call ends (returns, fails, panics, or is dropped), what it did not reach
/// goes back to the backlog, ahead of anything there, and a delivery whose
/// handler did not return is counted as lost.
struct InHand<'a> {
    backlog: &'a Mutex<VecDeque<Delivery>>,
    rest: std::vec::IntoIter<Delivery>,
    /// The queue's loss counter, through the current registration.
    link: Option<&'a Arc<Link>>,
    /// A delivery is in its handler.
    handling: bool,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if self.handling
            && let Some(link) = self.link
        {
            link.lose_one();
        }
        if self.rest.len() > 0 {
            let mut backlog = self.backlog.lock();
            let mut rest: VecDeque<Delivery> = self.rest.by_ref().collect();
            rest.append(&mut backlog);
            *backlog = rest;
        }
    }
}

/// The actor that hosts a [`Consumer`]: registered with the queue by
/// whoever starts it (and by itself when it restarts), unregistered when it
/// stops; it drops deliveries made to an earlier registration (the queue
/// has requeued those).
///
/// A handler's `Err` settles that delivery by the consumer's [`OnError`]
/// policy and the consumer keeps running; a panic fails it (its unsettled
/// deliveries are requeued and it is restarted with fresh state). Auto-ack
/// deliveries come in batches, already settled: one whose handler fails is
/// lost (at most once, and counted), and after a panic the rest of its batch
/// waits in the shared backlog for the restarted incarnation, which handles
/// it first, in order.
pub(crate) struct ConsumerActor<C: Consumer> {
    consumer: C,
    queue: QueueHandle,
    terms: Terms,
    link: Option<Arc<Link>>,
    /// Where the first incarnation's registration, made by whoever started
    /// the consumer, leaves its link (until taken; later incarnations
    /// register themselves).
    slot: Option<LinkSlot>,
    shared: Arc<Shared>,
}

/// What an incarnation takes from its [`ConsumeOptions`]. The consumer's
/// factory keeps these for every restart, not the whole options (whose
/// supervision is the cell's): a queue with a consumer is mostly overhead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Terms {
    mode: AckMode,
    prefetch: u32,
    on_error: OnError,
    exclusive: bool,
}

impl From<&ConsumeOptions> for Terms {
    fn from(options: &ConsumeOptions) -> Self {
        Terms {
            mode: options.mode,
            prefetch: options.prefetch,
            on_error: options.on_error,
            exclusive: options.exclusive,
        }
    }
}

impl<C: Consumer> ConsumerActor<C> {
    /// Wraps `consumer` for `queue`, sharing `shared` with the other
    /// incarnations of the same consumer. The first incarnation is
    /// registered by the caller, who passes the registration's `slot`.
    pub(crate) fn new(
        queue: QueueHandle,
        terms: Terms,
        consumer: C,
        shared: Arc<Shared>,
        slot: LinkSlot,
    ) -> Self {
        ConsumerActor {
            consumer,
            queue,
            terms,
            link: None,
            slot: Some(slot),
            shared,
        }
    }

    /// The subscription of `me`'s incarnation `incarnation` to its queue.
    pub(crate) fn subscription(
        me: &postbox::Addr<Self>,
        terms: Terms,
        incarnation: u64,
        slot: Option<LinkSlot>,
    ) -> Subscribe {
        // Both recipients share one allocation of the address.
        let me = Arc::new(me.clone());
        Subscribe {
            sink: Sink::Batch {
                deliveries: me.clone().into(),
                cancelled: me.into(),
            },
            mode: terms.mode,
            prefetch: terms.prefetch,
            incarnation: Some(incarnation),
            exclusive: terms.exclusive,
            slot,
            claim: None,
        }
    }

    /// Takes the first registration's link once the queue has left it in
    /// the slot (it does so before delivering anything).
    fn adopt(&mut self) {
        if self.link.is_none()
            && let Some(link) = self.slot.as_ref().and_then(|slot| slot.get())
        {
            self.link = Some(link.clone());
            self.slot = None;
        }
    }

    /// As [`adopt`](Self::adopt), after the queue has handled a first
    /// registration sent without waiting, if it had not yet: for the
    /// handle's calls, which must see the registration `consume` made.
    async fn adopt_sent(&mut self) {
        self.adopt();
        if self.link.is_none() && self.slot.is_some() {
            self.queue.barrier().await;
            self.adopt();
        }
    }

    /// Handles auto-ack deliveries in order, without locking anything unless
    /// the handler fails (see [`InHand`]).
    async fn handle_auto(&mut self, batch: Vec<Delivery>) -> Result<(), Failure> {
        self.adopt();
        let ConsumerActor {
            consumer,
            link,
            shared,
            terms,
            ..
        } = self;
        let mut hand = InHand {
            backlog: &shared.backlog,
            rest: batch.into_iter(),
            link: link.as_ref(),
            handling: false,
        };
        let mut handled = Handled::new(&shared.handled);
        for delivery in hand.rest.by_ref() {
            hand.handling = true;
            let result = handle(consumer, delivery).await;
            hand.handling = false;
            match result {
                Ok(()) => handled.one(),
                Err(failure) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    // At most once: this one is lost, as RabbitMQ's auto-ack.
                    if let Some(link) = hand.link {
                        link.lose_one();
                    }
                    if terms.on_error == OnError::Restart {
                        return Err(failure);
                    }
                    tracing::warn!(%failure, "auto-ack handler failed: the delivery is lost");
                }
            }
        }
        Ok(())
    }

    /// Handles manual-ack deliveries in order; a failed one is settled by the
    /// `OnError` policy.
    async fn handle_manual(&mut self, batch: Vec<Delivery>) -> Result<(), Failure> {
        self.adopt();
        let Some(link) = self.link.clone() else {
            return Ok(());
        };
        let mut handled = Handled::new(&self.shared.handled);
        let mut batch = batch.into_iter();
        loop {
            // Not `for`: its `next()` temporary would be kept across the
            // await below, a second copy of every delivery.
            let Some(delivery) = batch.next() else { break };
            if delivery.consumer() != link.consumer
                || !link.is_active()
                || !link.is_current(delivery.tag())
            {
                // Made to an earlier registration of this actor, or to one
                // that has ended: the queue requeued it (or was deleted).
                tracing::trace!(queue = %delivery.queue(), tag = %delivery.tag(), "stale delivery skipped");
                continue;
            }
            let (tag, attempt, message_id) =
                (delivery.tag(), delivery.delivery_count(), delivery.id());
            match handle(&mut self.consumer, delivery).await {
                Ok(()) => handled.one(),
                Err(failure) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    let outcome = match self.terms.on_error {
                        OnError::Restart => return Err(failure),
                        OnError::Requeue => Outcome::Requeue,
                        OnError::DeadLetter => Outcome::Discard,
                        OnError::Retry(policy) => policy.outcome(attempt),
                    };
                    let settler = Settler {
                        tag,
                        link: link.clone(),
                        loc: 0,
                    };
                    // Boxed: the rare path must not grow every batch's future.
                    Box::pin(settle_failed(
                        &settler, outcome, attempt, message_id, &failure,
                    ))
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// Counts handled deliveries locally and adds them to the shared counter once
/// per batch (when dropped, however the batch ends).
struct Handled<'a> {
    total: &'a AtomicU64,
    n: u64,
}

impl<'a> Handled<'a> {
    fn new(total: &'a AtomicU64) -> Self {
        Handled { total, n: 0 }
    }

    fn one(&mut self) {
        self.n += 1;
    }
}

impl Drop for Handled<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.total.fetch_add(self.n, Ordering::Relaxed);
        }
    }
}

/// Runs the handler for one delivery inside a `consume` span. A plain
/// function, not an `async fn`: the handler's future is not moved once more
/// into a wrapper's state (a copy per delivery on the hot path).
#[inline(always)]
fn handle<C: Consumer>(
    consumer: &mut C,
    delivery: Delivery,
) -> impl Future<Output = Result<(), Failure>> + '_ {
    let span = tracing::debug_span!(
        "consume",
        queue = %delivery.queue(),
        message_id = %delivery.id(),
        correlation_id = delivery.correlation_id(),
        tag = %delivery.tag(),
        redelivered = delivery.redelivered(),
    );
    consumer.handle(delivery).instrument(span)
}

impl<C: Consumer> Actor for ConsumerActor<C> {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(me) = ctx
            .addr()
            .filter(|_| !self.shared.cancelled.load(Ordering::Acquire))
        else {
            // Cancelled (or closed) before this restart: stay down.
            ctx.stop();
            return Ok(());
        };
        // This incarnation's crash, if it crashes, is recorded for reports.
        let shared = self.shared.clone();
        ctx.any().on_exit(Some(ctx.incarnation()), move |reason| {
            if let postbox::ExitReason::Failed(failure) = reason {
                shared.record_crash(failure);
            }
        });
        if ctx.incarnation() == 1 {
            // Registered by whoever started it (`Broker::consume`), which
            // saves the first start a round trip to the queue.
            self.adopt();
            return Ok(());
        }
        self.slot = None;
        let subscription = Self::subscription(&me, self.terms, ctx.incarnation(), None);
        let link = self.queue.subscribe_as(subscription).await;
        match link {
            Ok(link) => self.link = Some(link),
            Err(err @ crate::error::BrokerError::ExclusiveConsumer { .. }) => {
                // A restart found the queue taken by an exclusive consumer,
                // or this one's exclusivity cannot be had: it stops.
                tracing::warn!(queue = %self.queue.name(), %err, "consumer refused");
                self.shared.cancelled.store(true, Ordering::Release);
                ctx.stop();
                return Ok(());
            }
            Err(err) => {
                // The queue is gone: nothing to consume, and restarting will not help.
                tracing::warn!(queue = %self.queue.name(), %err, "consumer stops: queue unavailable");
                self.consumer.cancelled().await;
                ctx.stop();
                return Ok(());
            }
        }
        // What an earlier incarnation left unhandled comes first.
        let left = std::mem::take(&mut *self.shared.backlog.lock());
        if !left.is_empty() {
            self.handle_auto(left.into()).await?;
        }
        Ok(())
    }

    // No `stopped` hook: the queue watches this incarnation, and ends its
    // registration when it ends, told whether it crashed.
}

impl<C: Consumer> Handler<Delivery> for ConsumerActor<C> {
    async fn handle(
        &mut self,
        delivery: Delivery,
        _ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        let batch = vec![delivery];
        match self.terms.mode {
            AckMode::Auto => self.handle_auto(batch).await,
            AckMode::Manual => self.handle_manual(batch).await,
        }
    }
}

/// Deliveries come in batches from the queue (one mailbox slot for up to 64);
/// each is handled in order, one at a time.
impl<C: Consumer> Handler<DeliveryBatch> for ConsumerActor<C> {
    async fn handle(
        &mut self,
        mut batch: DeliveryBatch,
        _ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        let batch = std::mem::take(&mut batch.0);
        match batch.first().map(Delivery::ack_mode) {
            Some(AckMode::Auto) => self.handle_auto(batch).await,
            Some(AckMode::Manual) => self.handle_manual(batch).await,
            None => Ok(()),
        }
    }
}

/// The queue ended this consumer's registration: the queue was deleted (the
/// consumer is told), or the consumer was cancelled and has settled what it
/// held. It stops for good.
impl<C: Consumer> Handler<Cancelled> for ConsumerActor<C> {
    async fn handle(&mut self, msg: Cancelled, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.link = None;
        self.slot = None;
        self.shared.cancelled.store(true, Ordering::Release);
        if msg.deleted {
            self.consumer.cancelled().await;
        }
        ctx.stop();
        Ok(())
    }
}

/// Cancel, as RabbitMQ's `basic.cancel`: the queue delivers nothing more; the
/// deliveries the consumer holds stay settleable, and the registration ends
/// once they are settled. Replies with how many it holds.
pub(crate) struct Drain;
impl Message for Drain {
    type Reply = usize;
}
impl<C: Consumer> Handler<Drain> for ConsumerActor<C> {
    async fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Result<usize, Failure> {
        self.shared.cancelled.store(true, Ordering::Release);
        self.adopt_sent().await;
        let Some(link) = &self.link else {
            ctx.stop();
            return Ok(0);
        };
        // Once the queue has processed this, every delivery it made to us is
        // in our mailbox, ahead of whatever is sent to us next.
        match self.queue.cancel(link.consumer).await {
            Some(held) => Ok(held),
            None => {
                ctx.stop();
                Ok(0)
            }
        }
    }
}

/// A marker: handled once everything sent before it was.
pub(crate) struct Flush;
impl Message for Flush {
    type Reply = ();
}
impl<C: Consumer> Handler<Flush> for ConsumerActor<C> {
    async fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Result<(), Failure> {
        Ok(())
    }
}

/// Close: unregister now (the queue requeues what the consumer holds) and
/// stop, without handling what is still in the mailbox.
pub(crate) struct Close;
impl Message for Close {
    type Reply = ();
}
impl<C: Consumer> Handler<Close> for ConsumerActor<C> {
    async fn handle(&mut self, _: Close, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.shared.cancelled.store(true, Ordering::Release);
        self.adopt_sent().await;
        if let Some(link) = self.link.take() {
            self.queue.unsubscribe_now(link.consumer).await;
        }
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
        self.adopt_sent().await;
        Ok(self.link.as_ref().map(|l| l.consumer))
    }
}
