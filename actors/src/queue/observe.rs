//! Observing a broker: an [`Observer`] sees every publish, delivery and
//! settlement on every queue. It is how the test kit captures traffic, and
//! where metrics and monitoring hook in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use postbox::Failure;

use crate::envelope::DeathReason;
use crate::envelope::Envelope;
use crate::queue::ack::{ConsumerId, DeliveryTag};
use crate::queue::delivery::Outcome;

/// Callbacks for broker traffic; every method has an empty default.
///
/// Observers are called on the queue's own thread, in the queue's order of
/// events, so they must be quick and must not block. With no observer
/// registered, the cost is one relaxed atomic load per event.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use postbox_actors::{Envelope, Observer};
///
/// #[derive(Default)]
/// struct Count(AtomicU64);
/// impl Observer for Count {
///     fn published(&self, _queue: &str, _message: &Envelope) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
/// # let _ = Arc::new(Count::default());
/// ```
pub trait Observer: Send + Sync + 'static {
    /// A message was enqueued on `queue`.
    fn published(&self, queue: &str, message: &Envelope) {
        let _ = (queue, message);
    }

    /// Whether this observer wants [`published`](Self::published): a queue
    /// keeps a copy of each message for it (a few refcounts) while any
    /// registered observer does. An observer that ignores publishes says
    /// false and spares every publish that copy.
    fn observes_publishes(&self) -> bool {
        true
    }

    /// A message was handed to a consumer (`message` carries the delivery count
    /// and redelivered flag of this delivery).
    fn delivered(&self, queue: &str, consumer: ConsumerId, tag: DeliveryTag, message: &Envelope) {
        let _ = (queue, consumer, tag, message);
    }

    /// A message left `queue` for `reason`; `routed` tells whether the
    /// dead-letter exchange took it (false: dropped).
    fn dead_lettered(&self, queue: &str, message: &Envelope, reason: DeathReason, routed: bool) {
        let _ = (queue, message, reason, routed);
    }

    /// The queue cancelled a consumer's registration because the queue is
    /// going away (deleted, or its exclusive owner stopped): RabbitMQ's
    /// `basic.cancel` from the broker. The consumer stops for good.
    fn consumer_cancelled(&self, queue: &str, consumer: ConsumerId) {
        let _ = (queue, consumer);
    }

    /// A consumer crashed (a panic, or an error under
    /// [`OnError::Restart`](crate::OnError::Restart)): its registration
    /// ended, what it held is requeued, and it restarts
    /// (`restarts`: how many times it was restarted before this crash).
    fn consumer_failed(&self, queue: &str, consumer: ConsumerId, failure: &Failure, restarts: u64) {
        let _ = (queue, consumer, failure, restarts);
    }

    /// A consumer settled a delivery (`multiple`: and every earlier one it held).
    fn settled(
        &self,
        queue: &str,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        outcome: Outcome,
    ) {
        let _ = (queue, consumer, tag, multiple, outcome);
    }
}

type List = Vec<(u64, Arc<dyn Observer>)>;

/// The observers of one broker, shared with its queues (one pointer in
/// each: a broker may have a million queues).
#[derive(Clone, Default)]
pub(crate) struct Observers(Arc<ObserverList>);

#[derive(Default)]
struct ObserverList {
    enabled: AtomicBool,
    /// Whether any observer wants `published` events.
    publishes: AtomicBool,
    list: RwLock<List>,
    next: AtomicU64,
}

impl Observers {
    /// Calls `f` for each observer; nearly free when there are none.
    #[inline]
    pub(crate) fn each(&self, f: impl FnMut(&dyn Observer)) {
        if self.0.enabled.load(Ordering::Relaxed) {
            self.call(f);
        }
    }

    /// Whether any observer is registered.
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    /// Whether any registered observer wants `published` events.
    #[inline]
    pub(crate) fn wants_publishes(&self) -> bool {
        self.0.publishes.load(Ordering::Relaxed)
    }

    #[cold]
    fn call(&self, mut f: impl FnMut(&dyn Observer)) {
        for (_, observer) in self.0.list.read().iter() {
            f(observer.as_ref());
        }
    }

    pub(crate) fn add(&self, observer: Arc<dyn Observer>) -> ObserverGuard {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let mut list = self.0.list.write();
        if observer.observes_publishes() {
            self.0.publishes.store(true, Ordering::Relaxed);
        }
        list.push((id, observer));
        self.0.enabled.store(true, Ordering::Relaxed);
        ObserverGuard {
            observers: self.clone(),
            id,
        }
    }
}

/// Keeps an observer registered; dropping it unregisters the observer.
#[must_use = "the observer is unregistered when this guard is dropped"]
pub struct ObserverGuard {
    observers: Observers,
    id: u64,
}

impl std::fmt::Debug for ObserverGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserverGuard")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for ObserverGuard {
    fn drop(&mut self) {
        let mut list = self.observers.0.list.write();
        list.retain(|(id, _)| *id != self.id);
        self.observers
            .0
            .enabled
            .store(!list.is_empty(), Ordering::Relaxed);
        self.observers.0.publishes.store(
            list.iter().any(|(_, o)| o.observes_publishes()),
            Ordering::Relaxed,
        );
    }
}
