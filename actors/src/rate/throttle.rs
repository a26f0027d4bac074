//! Throttles: a [`RateLimiter`] in front of a publisher ([`Throttled`]
//! queue handles and brokers) or of a consumer's handler (the [`Throttle`]
//! layer), waiting for permits or failing fast.

use std::time::Duration;

use postbox::Failure;

use crate::broker::Broker;
use crate::consumer::{Consumer, Layer};
use crate::envelope::Envelope;
use crate::error::{BrokerError, PublishError};
use crate::queue::ack::AckMode;
use crate::queue::delivery::{AckError, Delivery, MAX_REQUEUE_DELAY};
use crate::queue::handle::QueueHandle;
use crate::rate::{RateLimit, RateLimited, RateLimiter};

/// A [`RateLimiter`] and what to do over its limit: wait for a permit (the
/// default) or fail fast.
///
/// In front of a publisher ([`Throttled::new`]), failing fast is a
/// [`ThrottleError::RateLimited`] from the publish, and nothing is
/// published. As a consumer [`Layer`], a delivery waits for a permit before
/// its handler runs; failing fast, a delivery over the limit is instead
/// requeued for when its permit is due ([`Delivery::nack_after`]), without
/// running the handler (the consumer's report counts it as handled), so
/// that the consumer goes on with others (other keys, with a keyed limiter). That is a delayed redelivery: the message
/// keeps its place in the queue, comes back flagged redelivered, its
/// delivery count goes up (a queue's delivery limit counts it), and it may
/// reach another consumer. Deliveries in auto-ack mode, already settled,
/// always wait.
///
/// The limit belongs to the limiter: every publisher or consumer given
/// clones of one `Throttle` shares it, a consumer's restarts included. For a
/// limit per consumer, give each its own.
///
/// ```
/// use postbox_actors::{Delivery, LayerExt, RateLimit, Throttle};
/// use postbox_actors::partition::PartitionKey;
///
/// let handler = || |d: Delivery| async move {
///     d.ack().await?;
///     Ok::<(), postbox::Failure>(())
/// };
/// // At most 50 deliveries a second into this consumer's handler.
/// let steady = handler.layer(Throttle::new(RateLimit::per_second(50)));
/// // At most 5 a second per user; a user over it is put off, not waited for.
/// let per_user = RateLimit::per_second(5).per_key(PartitionKey::Header("user".into()));
/// let fair = handler.layer(Throttle::new(per_user).fail_fast());
/// # let _ = (steady, fair);
/// ```
#[derive(Clone, Debug)]
pub struct Throttle {
    limiter: RateLimiter,
    fail_fast: bool,
}

impl Throttle {
    /// A throttle that waits for permits.
    pub fn new(limiter: impl Into<RateLimiter>) -> Self {
        Throttle {
            limiter: limiter.into(),
            fail_fast: false,
        }
    }

    /// Fails fast over the limit instead of waiting.
    pub fn fail_fast(mut self) -> Self {
        self.fail_fast = true;
        self
    }

    /// Whether it fails fast.
    pub fn is_fail_fast(&self) -> bool {
        self.fail_fast
    }

    /// The limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Takes a permit for `message`: waits for one, or, failing fast, takes
    /// one available now or says when one is due.
    pub async fn admit(&self, message: &Envelope) -> Result<(), RateLimited> {
        if self.fail_fast {
            self.limiter.check(message)
        } else {
            self.limiter.until_ready(message).await;
            Ok(())
        }
    }
}

impl From<RateLimit> for Throttle {
    /// A waiting throttle with a limiter of its own.
    fn from(limit: RateLimit) -> Self {
        Throttle::new(limit)
    }
}

impl From<RateLimiter> for Throttle {
    /// A waiting throttle on `limiter`.
    fn from(limiter: RateLimiter) -> Self {
        Throttle::new(limiter)
    }
}

/// Why a [`Throttled`] publish failed: refused by the rate limit (failing
/// fast), or by the broker.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ThrottleError<E> {
    /// Over the limit: nothing was published.
    #[error(transparent)]
    RateLimited(RateLimited),
    /// The publish itself failed ([`BrokerError`] or [`PublishError`]).
    #[error(transparent)]
    Publish(#[from] E),
}

impl<E> ThrottleError<E> {
    /// When the next permit is due, if the rate limit refused.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ThrottleError::RateLimited(limited) => Some(limited.retry_after),
            ThrottleError::Publish(_) => None,
        }
    }
}

/// A publisher (a [`QueueHandle`] or a [`Broker`]) or a consumer behind a
/// [`Throttle`].
///
/// A producer of at most 100 messages a second:
///
/// ```
/// use postbox_actors::{Broker, Envelope, QueueOptions, RateLimit, Throttled};
/// # postbox::testkit::run(async {
/// # let broker = Broker::new(&postbox::RuntimeHandle::local());
/// let orders = broker.declare_queue("orders", QueueOptions::default()).await?;
/// let producer = Throttled::new(orders, RateLimit::per_second(100));
/// for n in 0..250u32 {
///     producer.publish(Envelope::encode(&n)?).await?; // waits for its permit
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// Clones share the throttle's limiter; so do wrappers made from clones of
/// one [`RateLimiter`] (a limit per queue, over all its publishers).
#[derive(Clone, Debug)]
pub struct Throttled<T> {
    inner: T,
    throttle: Throttle,
}

impl<T> Throttled<T> {
    /// `inner` behind `throttle` (a [`RateLimit`] or a [`RateLimiter`] for
    /// a waiting one).
    pub fn new(inner: T, throttle: impl Into<Throttle>) -> Self {
        Throttled {
            inner,
            throttle: throttle.into(),
        }
    }

    /// The publisher or consumer it wraps.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Unwraps it.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Its throttle.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }
}

impl Throttled<QueueHandle> {
    /// [`QueueHandle::publish`] once a permit is taken.
    pub async fn publish(&self, message: Envelope) -> Result<(), ThrottleError<BrokerError>> {
        self.throttle
            .admit(&message)
            .await
            .map_err(ThrottleError::RateLimited)?;
        Ok(self.inner.publish(message).await?)
    }
}

impl Throttled<Broker> {
    /// [`Broker::publish`] (to a queue by name) once a permit is taken.
    pub async fn publish(
        &self,
        queue: &str,
        message: Envelope,
    ) -> Result<(), ThrottleError<BrokerError>> {
        self.throttle
            .admit(&message)
            .await
            .map_err(ThrottleError::RateLimited)?;
        Ok(self.inner.publish(queue, message).await?)
    }

    /// [`Broker::publish_to`] (through an exchange) once a permit is taken.
    /// A limiter keyed by routing key sees `routing_key`.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
    ) -> Result<usize, ThrottleError<PublishError>> {
        // The broker sets it too; the key must be known before.
        let message = if message.routing_key() == routing_key {
            message
        } else {
            message.with_routing_key(routing_key)
        };
        self.throttle
            .admit(&message)
            .await
            .map_err(ThrottleError::RateLimited)?;
        Ok(self
            .inner
            .publish_to(exchange, routing_key, message)
            .await?)
    }
}

impl<C: Consumer> Layer<C> for Throttle {
    type Consumer = Throttled<C>;

    fn layer(&self, inner: C) -> Throttled<C> {
        Throttled {
            inner,
            throttle: self.clone(),
        }
    }
}

impl<C: Consumer> Consumer for Throttled<C> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let limiter = &self.throttle.limiter;
        if !self.throttle.fail_fast || delivery.ack_mode() == AckMode::Auto {
            limiter.until_ready(&delivery).await;
            return self.inner.handle(delivery).await;
        }
        let Err(limited) = limiter.check(&delivery) else {
            return self.inner.handle(delivery).await;
        };
        // Put off, not failed: the handler did not run, and the consumer's
        // error policy has nothing to settle.
        let delay = limited.retry_after.min(MAX_REQUEUE_DELAY);
        tracing::trace!(message_id = %delivery.id(), ?delay, "rate limited: requeued for later");
        match delivery.nack_after(delay).await {
            // Gone: the queue requeued it already.
            Ok(()) | Err(AckError::ConsumerGone { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }
}
