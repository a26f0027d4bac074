//! Consumers: the [`Consumer`] trait users implement, and [`ConsumerActor`], the
//! supervised actor that registers it with a queue and feeds it deliveries.

mod actor;
mod layer;

use std::future::Future;
use std::time::Duration;

use bytestring::ByteString;
use postbox::{AnyAddr, Backoff, ExitReason, Failure, Supervisor};

pub(crate) use actor::{ConsumerActor, Drain, Registration};
pub use layer::{Layer, LayerExt, Layered};

use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::delivery::Delivery;
use crate::supervision::Supervision;

/// What a consumer does with each delivery.
///
/// Returning `Err` (or panicking) fails the consumer: its unsettled deliveries
/// are requeued and it is restarted. Closures `FnMut(Delivery) -> impl Future`
/// are consumers too.
///
/// A consumer is an actor with a bounded mailbox. [`Broker::consume`] puts it
/// under a supervisor of its own: if its handler panics or returns an error,
/// the queue requeues the deliveries it had not settled (flagged redelivered),
/// and the supervisor rebuilds it from its factory with fresh state, within a
/// restart limit. When the limit is passed, that consumer stays down, the queue
/// keeps its messages for the other consumers, and the error is logged.
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
/// kept by its supervisor), or a factory with [layers](Layer).
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

/// A running consumer started by [`Broker::consume`](crate::Broker::consume).
///
/// Dropping the handle does not stop the consumer (as with RabbitMQ, a consumer
/// runs until it is cancelled); [`cancel`](Self::cancel) does.
pub struct ConsumerHandle<C: Consumer> {
    pub(crate) queue: ByteString,
    pub(crate) addr: postbox::Addr<ConsumerActor<C>>,
    pub(crate) supervisor: Supervisor,
}

impl<C: Consumer> std::fmt::Debug for ConsumerHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("queue", &self.queue)
            .field("actor", &self.addr.id())
            .finish()
    }
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

    /// Stops the consumer gracefully, as RabbitMQ's `basic.cancel` does: the
    /// queue stops delivering to it and requeues the manual-ack deliveries it has
    /// not settled, it handles the auto-ack deliveries already in its mailbox,
    /// and then it stops (and is not restarted).
    #[doc(alias = "basic_cancel")]
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
