//! Consumers: the [`Consumer`] trait users implement, and [`ConsumerActor`], the
//! supervised actor that registers it with a queue and feeds it deliveries.
//!
//! A consumer is an actor with a bounded mailbox. [`Broker::consume`] puts it
//! under a supervisor of its own: if its handler panics or returns an error,
//! the queue requeues the deliveries it had not settled (flagged redelivered),
//! and the supervisor rebuilds it from its factory with fresh state, within a
//! restart limit. When the limit is passed, that consumer stays down, the queue
//! keeps its messages for the other consumers, and the error is logged.
//!
//! [`Broker::consume`]: crate::Broker::consume
//!
//! ```
//! use postbox_actors::{Consumer, Delivery};
//! use postbox::Failure;
//!
//! struct Printer;
//! impl Consumer for Printer {
//!     async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
//!         let order: String = delivery.decode()?;
//!         println!("order {order}");
//!         delivery.ack().await?;
//!         Ok(())
//!     }
//! }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use postbox::{
    Actor, Addr, Backoff, Context, ExitReason, Failure, Handler, Message, Supervisor,
    SupervisorSpec,
};
use tracing::Instrument;

use crate::delivery::{Delivery, Link};
use crate::queue::actor::{Cancelled, DeliveryBatch, Sink, Unsubscribe};
use crate::queue::handle::QueueHandle;
use crate::queue::state::{AckMode, ConsumerId};

/// What a consumer does with each delivery.
///
/// Returning `Err` (or panicking) fails the consumer: its unsettled deliveries
/// are requeued and it is restarted. Closures `FnMut(Delivery) -> impl Future`
/// are consumers too.
pub trait Consumer: 'static {
    /// Handles one delivery. In manual-ack mode, settle it (`ack`, `nack`,
    /// `reject`) here or later; until then it counts against the prefetch.
    fn handle(&mut self, delivery: Delivery) -> impl Future<Output = Result<(), Failure>>;

    /// Called when the broker cancels this consumer because its queue went
    /// away (deleted, or its exclusive owner stopped): RabbitMQ's
    /// `basic.cancel` from the broker. Deliveries already in the consumer's
    /// mailbox have been handled (manual-ack ones that can no longer be
    /// settled are skipped); after this the consumer stops for good and its
    /// handle's [`terminated`](ConsumerHandle::terminated) resolves.
    /// The default does nothing.
    fn cancelled(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}

impl<F, Fut> Consumer for F
where
    F: FnMut(Delivery) -> Fut + 'static,
    Fut: Future<Output = Result<(), Failure>>,
{
    fn handle(&mut self, delivery: Delivery) -> impl Future<Output = Result<(), Failure>> {
        self(delivery)
    }
}

/// Builds a consumer, at start and again after each crash: any
/// `Fn() -> C + Send + Sync + 'static` (it is sent to the consumer's thread and
/// kept by its supervisor).
pub trait ConsumerFactory<C: Consumer>: Fn() -> C + Send + Sync + 'static {}

impl<C: Consumer, F: Fn() -> C + Send + Sync + 'static> ConsumerFactory<C> for F {}

/// How a consumer receives and is supervised.
///
/// ```
/// use postbox_actors::ConsumeOptions;
/// use std::time::Duration;
/// let manual = ConsumeOptions::manual(32).restarts(10, Duration::from_secs(60));
/// let auto = ConsumeOptions::auto().mailbox(1024);
/// # let _ = (manual, auto);
/// ```
#[derive(Clone, Debug)]
pub struct ConsumeOptions {
    pub(crate) mode: AckMode,
    pub(crate) prefetch: u32,
    pub(crate) mailbox: Option<usize>,
    pub(crate) supervision: Supervision,
}

/// How a consumer, or a stream subscriber, is restarted after it fails: at
/// most `max_restarts` within `window`, `backoff` apart (default: 5 in 10 s,
/// 10 ms to 1 s). Each gets a supervisor of its own built from this.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Supervision {
    pub(crate) max_restarts: usize,
    pub(crate) window: Duration,
    pub(crate) backoff: Backoff,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            max_restarts: 5,
            window: Duration::from_secs(10),
            backoff: Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1)),
        }
    }
}

impl Supervision {
    /// A supervisor named `name` with these limits; add the child and spawn it.
    pub(crate) fn spec(&self, name: impl Into<Arc<str>>) -> SupervisorSpec {
        SupervisorSpec::new(name)
            .intensity(self.max_restarts, self.window)
            .backoff(self.backoff)
            // It exists for its one child: when that stops for good (cancelled,
            // or its queue or stream went away), so does the supervisor.
            .auto_shutdown(true)
    }
}

impl Default for ConsumeOptions {
    /// Manual acknowledgements with a prefetch of 64.
    fn default() -> Self {
        ConsumeOptions::manual(64)
    }
}

impl ConsumeOptions {
    /// Manual acknowledgements; at most `prefetch` unsettled deliveries at a time
    /// (0: no limit but the mailbox).
    pub fn manual(prefetch: u32) -> Self {
        ConsumeOptions {
            mode: AckMode::Manual,
            prefetch,
            mailbox: None,
            supervision: Supervision::default(),
        }
    }

    /// Automatic acknowledgement: a delivery is settled when the queue dispatches
    /// it (at-most-once: what a consumer has not handled when it crashes is lost).
    pub fn auto() -> Self {
        ConsumeOptions {
            mode: AckMode::Auto,
            prefetch: 0,
            ..ConsumeOptions::manual(0)
        }
    }

    /// The consumer's mailbox capacity (default: the prefetch, or 256).
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = Some(capacity.max(1));
        self
    }

    /// At most `max` restarts within `window`; past that the consumer stays down.
    pub fn restarts(mut self, max: usize, window: Duration) -> Self {
        self.supervision.max_restarts = max;
        self.supervision.window = window;
        self
    }

    /// Delay between restarts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.supervision.backoff = backoff;
        self
    }

    /// The acknowledgement mode.
    pub fn ack_mode(&self) -> AckMode {
        self.mode
    }

    pub(crate) fn mailbox_capacity(&self) -> usize {
        self.mailbox.unwrap_or(match (self.mode, self.prefetch) {
            (AckMode::Manual, p) if p > 0 => p as usize,
            _ => postbox::DEFAULT_MAILBOX,
        })
    }
}

/// The actor that hosts a [`Consumer`]: registers with the queue when it
/// starts, unregisters when it stops, and drops deliveries made to an earlier
/// registration (the queue has requeued those).
///
/// Auto-ack deliveries come in batches, already settled. If the handler fails
/// on one, that one is lost (at-most-once, and counted), and the rest of its
/// batch waits in a backlog that outlives the incarnation: the restarted
/// consumer handles it first, in order. What is still waiting when the
/// consumer stops for good is counted as lost.
pub struct ConsumerActor<C: Consumer> {
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
    /// Wraps `consumer` for `queue`; spawn it under any supervisor.
    pub fn new(queue: QueueHandle, options: &ConsumeOptions, consumer: C) -> Self {
        Self::with_backlog(queue, options, consumer, Arc::default())
    }

    /// As [`new`](Self::new), sharing `backlog` with the other incarnations of
    /// the same consumer.
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
            let result = self.handle_one(delivery).await;
            if let Err(failure) = result {
                // At most once: this one is lost (counted when `hand` drops);
                // the rest wait for the next incarnation.
                return Err(failure);
            }
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

/// A running consumer started by [`Broker::consume`](crate::Broker::consume).
///
/// Dropping the handle does not stop the consumer (as with RabbitMQ, a consumer
/// runs until it is cancelled); [`cancel`](Self::cancel) does.
pub struct ConsumerHandle<C: Consumer> {
    pub(crate) queue: ByteString,
    pub(crate) addr: Addr<ConsumerActor<C>>,
    pub(crate) supervisor: Supervisor,
}

impl<C: Consumer> ConsumerHandle<C> {
    /// The queue it consumes from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The consumer actor's address (stable across its restarts).
    pub fn addr(&self) -> &Addr<ConsumerActor<C>> {
        &self.addr
    }

    /// Its current registration with the queue; `None` while restarting or after
    /// it stopped.
    pub async fn consumer_id(&self) -> Option<ConsumerId> {
        self.addr.ask(Registration).await.ok().flatten()
    }

    /// Stops the consumer gracefully, as RabbitMQ's `basic.cancel` does: the
    /// queue stops delivering to it and requeues the manual-ack deliveries it has
    /// not settled, it handles the auto-ack deliveries already in its mailbox,
    /// and then it stops (and is not restarted).
    pub async fn cancel(self) {
        if self.addr.ask(Drain).await.is_ok() {
            self.addr.terminated().await;
        }
        self.supervisor.stop();
        self.supervisor.terminated().await;
    }

    /// Resolves when the consumer is down for good (cancelled, or restarted too
    /// often).
    pub async fn terminated(&self) -> ExitReason {
        self.supervisor.terminated().await
    }
}
