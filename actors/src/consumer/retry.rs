//! Consumer retry policies: when a handler fails, try the delivery again later,
//! with fixed or exponential backoff and jitter, up to a number of attempts;
//! then reject it, so it goes to the queue's dead-letter exchange. This is what
//! MassTransit's and Spring's retry interceptors do.

use std::time::Duration;

use postbox::Failure;

use crate::consumer::{Consumer, Layer};
use crate::queue::ack::AckMode;
use crate::queue::delivery::{AckError, Delivery, MAX_REQUEUE_DELAY, Outcome, Settler};

/// How long to wait between attempts, and how many to make.
///
/// Retries are delayed redeliveries ([`Delivery::nack_after`]): the message
/// leaves its consumer, waits in the queue (as `delayed`), and comes back at its
/// original position, to this consumer or another. An attempt is a delivery, so
/// the count survives consumer restarts and is the message's delivery count.
/// Only handler *errors* are retried. A panic crashes the consumer as usual, and
/// the message is requeued at once; bound those with the queue's delivery limit.
///
/// A policy is a consumer [`Layer`]: stack it on any consumer factory.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{Delivery, LayerExt, RetryPolicy};
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(10), 5)
///     .jitter(0.2);
/// let handler = || |d: Delivery| async move {
///     let _order: String = d.decode()?;
///     d.ack().await?;
///     Ok(())
/// };
/// let factory = handler.layer(policy);
/// # let _ = factory;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    factor: f64,
    jitter: f64,
}

impl RetryPolicy {
    /// The same delay before every retry; `max_attempts` counts the first try.
    /// Delays are capped at [`MAX_REQUEUE_DELAY`].
    pub fn fixed(delay: Duration, max_attempts: u32) -> Self {
        let delay = delay.min(MAX_REQUEUE_DELAY);
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            initial: delay,
            max: delay,
            factor: 1.0,
            jitter: 0.0,
        }
    }

    /// Delays of `initial`, doubling each attempt, capped at `max` (and at
    /// [`MAX_REQUEUE_DELAY`]).
    pub fn exponential(initial: Duration, max: Duration, max_attempts: u32) -> Self {
        let initial = initial.min(MAX_REQUEUE_DELAY);
        let max = max.min(MAX_REQUEUE_DELAY);
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            initial,
            max: max.max(initial),
            factor: 2.0,
            jitter: 0.0,
        }
    }

    /// The growth factor of exponential backoff (default 2).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// Randomly shortens each delay by up to this fraction (0 to 1), so that
    /// many consumers failing together do not retry in lockstep.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// How many attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before retrying after failed attempt `attempt` (from 1),
    /// before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exponent);
        Duration::try_from_secs_f64(secs).map_or(self.max, |d| d.min(self.max))
    }

    /// The delay before retrying after failed attempt `attempt`, with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt);
        if self.jitter == 0.0 {
            return base;
        }
        base.mul_f64(1.0 - self.jitter * fastrand::f64())
    }
}

impl<C: Consumer> Layer<C> for RetryPolicy {
    type Consumer = Retrying<C>;

    fn layer(&self, inner: C) -> Retrying<C> {
        Retrying {
            inner,
            policy: *self,
        }
    }
}

/// A consumer with a [`RetryPolicy`] (needs manual acknowledgements).
#[derive(Debug)]
pub struct Retrying<C> {
    inner: C,
    policy: RetryPolicy,
}

impl RetryPolicy {
    /// How a delivery whose handler failed on attempt `attempt` (its delivery
    /// count) is settled: requeued after the policy's delay, or rejected
    /// (dead-lettered) once its attempts are spent.
    pub(crate) fn outcome(&self, attempt: u32) -> Outcome {
        if attempt >= self.max_attempts {
            Outcome::Discard
        } else {
            Outcome::RequeueAfter(self.delay(attempt))
        }
    }
}

/// Settles a delivery whose handler failed with `failure` as `outcome` says,
/// unless the handler settled it itself (its decision stands) or its
/// registration has ended (the queue requeued it). Shared by the retry layer
/// and the consumers' [`OnError`](crate::OnError) policies.
pub(crate) async fn settle_failed(
    settler: &Settler,
    outcome: Outcome,
    attempt: u32,
    message_id: crate::envelope::MessageId,
    failure: &Failure,
) -> Result<(), AckError> {
    let what = match outcome {
        Outcome::Discard => "rejected",
        Outcome::Requeue => "requeued",
        Outcome::RequeueAfter(_) => "will retry",
        Outcome::Ack => "acknowledged",
    };
    tracing::warn!(%message_id, attempt, %failure, ?outcome, "handler failed: {what}");
    match settler.settle(outcome, false).await {
        Ok(_) | Err(AckError::AlreadySettled { .. } | AckError::ConsumerGone { .. }) => Ok(()),
        Err(err) => Err(err),
    }
}

impl<C: Consumer> Consumer for Retrying<C> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        if delivery.ack_mode() == AckMode::Auto {
            // Settled on delivery: nothing can be retried.
            return self.inner.handle(delivery).await;
        }
        let settler = delivery.settler();
        let attempt = delivery.delivery_count();
        let message_id = delivery.id();
        let Err(failure) = self.inner.handle(delivery).await else {
            return Ok(());
        };
        let outcome = self.policy.outcome(attempt);
        Ok(settle_failed(&settler, outcome, attempt, message_id, &failure).await?)
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1), 10);
        let delays: Vec<u128> = (1..=6).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(1));
        let huge = RetryPolicy::exponential(Duration::MAX, Duration::MAX, 3);
        assert_eq!(huge.base_delay(2), MAX_REQUEUE_DELAY);
        let f = RetryPolicy::fixed(Duration::from_millis(250), 3);
        assert_eq!(f.base_delay(1), f.base_delay(3));
        let j = p.jitter(0.5);
        for a in 1..=6 {
            let d = j.delay(a);
            assert!(d <= j.base_delay(a) && d >= j.base_delay(a) / 2, "{d:?}");
        }
    }
}
