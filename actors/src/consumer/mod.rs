//! Consumers: the [`Consumer`] trait users implement, the supervised actor
//! that registers it with a queue and feeds it deliveries (`actor`), what
//! happens when a handler fails ([`OnError`], [`RetryPolicy`]), layers
//! around consumers ([`Layer`]), key-ordered workers ([`KeyOrdered`]) and
//! pools of workers that grow and shrink ([`ConsumerPool`]).

#[cfg(feature = "actix")]
pub mod actix;
mod actor;
mod key_ordered;
mod layer;
mod pool;
mod retry;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytestring::ByteString;
use postbox::{AnyAddr, Backoff, ExitReason, Failure};

pub(crate) use actor::{Close, ConsumerActor, Drain, Flush, Registration, Shared, Terms};
pub use key_ordered::{KeyOrdered, KeyOrderedConsumer};
pub use layer::{Layer, LayerExt, Layered};
pub use pool::{ConsumerPool, PoolError, PoolOptions, PoolStats, PoolWatch};
pub use retry::{RetryPolicy, Retrying};

use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::delivery::Delivery;
use crate::supervision::Supervision;

/// What a consumer does with each delivery. Closures
/// `FnMut(Delivery) -> impl Future` are consumers too.
///
/// A consumer is an actor with a bounded mailbox. [`Broker::consume`] starts
/// it supervising itself (a [`postbox::RestartStrategy`]: no supervisor actor).
///
/// - **An `Err`** from `handle` is a failure of that delivery, not of the
///   consumer: the delivery is settled by the consumer's [`OnError`] policy
///   (default: requeued, as Spring AMQP does) and the consumer keeps running
///   with its state. (In auto-ack mode the delivery was settled when it was
///   handed over: it is lost, and counted.)
/// - **A panic** crashes the consumer: the queue requeues every delivery it had
///   not settled (flagged redelivered), and it is rebuilt from its
///   factory with fresh state, after a backoff that grows with consecutive
///   crashes (none for a first crash, then 10 ms doubling to 30 s). By default it never gives up: a
///   crash-looping consumer stays visible as such in its
///   [report](ConsumerHandle::report), and each crash is logged and told to the
///   broker's observers. With [`ConsumeOptions::restarts`] it gives up past a
///   limit, with an `error!` event.
///
/// [`Broker::consume`]: crate::Broker::consume
///
/// ```
/// use postbox_actors::{Consumer, Delivery};
/// use postbox::Failure;
///
/// struct Printer;
/// impl Consumer for Printer {
///     async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
///         let order: String = delivery.decode()?;
///         println!("order {order}");
///         delivery.ack().await?;
///         Ok(())
///     }
/// }
/// ```
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
/// kept for its restarts), or a factory with [layers](Layer).
pub trait ConsumerFactory<C: Consumer>: Send + Sync + 'static {
    /// A fresh consumer.
    fn build(&self) -> C;
}

impl<C: Consumer, F: Fn() -> C + Send + Sync + 'static> ConsumerFactory<C> for F {
    fn build(&self) -> C {
        self()
    }
}

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
    pub(crate) on_error: OnError,
    pub(crate) exclusive: bool,
}

/// What happens to a delivery whose handler returned `Err`. (A panic always
/// crashes the consumer, which is restarted; see [`Consumer`].)
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{ConsumeOptions, OnError, RetryPolicy};
/// let retrying = ConsumeOptions::manual(8)
///     .on_error(OnError::Retry(RetryPolicy::fixed(Duration::from_secs(1), 5)));
/// # let _ = retrying;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum OnError {
    /// Requeue it (a nack with requeue; it comes back flagged redelivered),
    /// and keep consuming. The default, as in Spring AMQP.
    #[default]
    Requeue,
    /// Reject it without requeue: it goes to the queue's dead-letter exchange,
    /// or is dropped (and counted) if the queue has none.
    DeadLetter,
    /// Requeue it after the policy's delay, and reject it once its attempts
    /// are spent.
    Retry(RetryPolicy),
    /// Fail the consumer as a panic does: every delivery it holds is requeued
    /// and it is restarted with fresh state.
    Restart,
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
            on_error: OnError::default(),
            exclusive: false,
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

    /// The only consumer of its queue (RabbitMQ's `exclusive` flag of
    /// `basic.consume`): [`Broker::consume`](crate::Broker::consume) fails
    /// with [`BrokerError::ExclusiveConsumer`](crate::BrokerError::ExclusiveConsumer)
    /// if the queue has consumers, and while it runs (restarts included) no
    /// other consumer may join. For a standby that takes over, use a queue
    /// with a [single active consumer](crate::QueueOptions::single_active_consumer).
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// The consumer's mailbox capacity (default: the prefetch, or 256).
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = Some(capacity.max(1));
        self
    }

    /// What happens to a delivery whose handler returns `Err` (default:
    /// requeued).
    pub fn on_error(mut self, policy: OnError) -> Self {
        self.on_error = policy;
        self
    }

    /// At most `max` restarts within `window`; past that the consumer stays
    /// down (an `error!` event says so). By default a consumer is restarted
    /// without limit, with backoff.
    pub fn restarts(mut self, max: usize, window: Duration) -> Self {
        self.supervision.max_restarts = max;
        self.supervision.window = window;
        self
    }

    /// Delay between restarts (default: none for a first crash, then 10 ms,
    /// doubling with each consecutive crash up to 30 s).
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

/// A running consumer started by [`Broker::consume`](crate::Broker::consume).
///
/// Dropping the handle does not stop the consumer (as with RabbitMQ, a consumer
/// runs until it is cancelled); [`cancel`](Self::cancel) and
/// [`close`](Self::close) do.
pub struct ConsumerHandle<C: Consumer> {
    pub(crate) queue: ByteString,
    pub(crate) addr: postbox::Addr<ConsumerActor<C>>,
    pub(crate) shared: Arc<Shared>,
}

impl<C: Consumer> std::fmt::Debug for ConsumerHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("queue", &self.queue)
            .field("actor", &self.addr.id())
            .finish()
    }
}

/// What a consumer has done, over all its restarts: see
/// [`ConsumerHandle::report`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Deliveries its handler handled (returned `Ok`).
    pub handled: u64,
    /// Deliveries its handler failed on (returned `Err`), each settled by the
    /// consumer's [`OnError`] policy.
    pub errors: u64,
    /// Crashes: panics, and errors under [`OnError::Restart`].
    pub crashes: u64,
    /// Restarts completed (one fewer than `crashes` while a restart waits
    /// for its backoff).
    pub restarts: u64,
    /// Three crashes or more within the last minute.
    pub crash_looping: bool,
    /// The last crash's failure.
    pub last_crash: Option<Failure>,
    /// Whether it is still running (false once it stopped for good: closed,
    /// cancelled and settled, its queue deleted, or past its restart limit).
    pub running: bool,
}

impl<C: Consumer> ConsumerHandle<C> {
    /// The queue it consumes from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The consumer actor (stable across its restarts): its identity, stats,
    /// and death watch.
    pub fn addr(&self) -> AnyAddr {
        self.addr.any()
    }

    /// Its current registration with the queue; `None` while restarting or after
    /// it stopped.
    pub async fn consumer_id(&self) -> Option<ConsumerId> {
        self.addr.ask(Registration).await.ok().flatten()
    }

    /// What it has done: handled, failed, crashed, restarted.
    pub fn report(&self) -> ConsumerReport {
        let stats = self.addr.stats();
        let (crashes, crash_looping, last_crash) = self.shared.crashes();
        ConsumerReport {
            handled: self.shared.handled.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            crashes,
            restarts: stats.restarts,
            crash_looping,
            last_crash,
            running: !self.addr.is_closed(),
        }
    }

    /// Cancels the consumer, as RabbitMQ's `basic.cancel`: the queue delivers
    /// nothing more to it, it handles what is already in its mailbox, and
    /// returns. The deliveries it still holds stay settleable (by the tasks
    /// its handler started, or by whoever holds them); once they are all
    /// settled its registration ends and it stops. If it crashes first, they
    /// are requeued. Returns how many it still held when the queue stopped
    /// delivering; [`terminated`](Self::terminated) resolves when it is gone.
    #[doc(alias = "basic_cancel")]
    pub async fn cancel(&self) -> usize {
        let held = self.addr.ask(Drain).await.unwrap_or(0);
        // Handled after every delivery the queue made before it stopped.
        let _ = self.addr.ask(Flush).await;
        held
    }

    /// Closes the consumer: it stops now, without handling what is still in
    /// its mailbox, and the queue requeues every delivery it had not settled
    /// (as when a RabbitMQ channel closes). Resolves once it is gone.
    pub async fn close(self) {
        let _ = self.addr.ask(Close).await;
        self.addr.stop();
        self.addr.terminated().await;
    }

    /// Resolves when the consumer is down for good (closed, cancelled and
    /// settled, its queue deleted, or restarted too often).
    pub async fn terminated(&self) -> ExitReason {
        self.addr.terminated().await
    }
}
