//! [`DeliveryProbe`]: a consumer that hands each [`Delivery`] to the test, which
//! then settles it (or not) itself.
//!
//! It is a [`TestProbe<Delivery>`] plus a consumer factory for
//! [`Broker::consume`](crate::Broker::consume): the consumer forwards every
//! delivery to the probe and returns at once, leaving the delivery unsettled.
//! Everything a `TestProbe` offers (`receive_n`, `expect_msg_matching`, ...)
//! is available through `Deref`.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use postbox::testkit::{ProbeError, TestProbe};
use postbox::{Failure, Recipient, RuntimeHandle};

use crate::consumer::Consumer;
use crate::queue::delivery::Delivery;

/// The consumer built by [`DeliveryProbe::consumer`]: forwards each delivery to
/// the probe.
#[derive(Debug)]
pub struct ProbeConsumer {
    sink: Recipient<Delivery>,
}

impl Consumer for ProbeConsumer {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        // A dropped probe cannot settle anything: fail, so the queue requeues.
        self.sink
            .send(delivery)
            .await
            .map_err(|_| Failure::msg("the delivery probe has stopped"))
    }
}

/// Receives deliveries from a queue for the test to inspect and settle.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use postbox::{RuntimeHandle, testkit};
/// use postbox_actors::testkit::DeliveryProbe;
/// use postbox_actors::{Broker, ConsumeOptions, QueueOptions};
///
/// testkit::run(async {
///     let rt = RuntimeHandle::local();
///     let broker = Broker::new(&rt);
///     broker.declare_queue("jobs", QueueOptions::default()).await.unwrap();
///     let mut probe = DeliveryProbe::new(&rt);
///     let _consumer = broker
///         .consume("jobs", ConsumeOptions::manual(4), probe.consumer())
///         .await
///         .unwrap();
///
///     broker.publish_json("jobs", "build").await.unwrap();
///     let second = Duration::from_secs(1);
///     let first = probe.expect_delivery(second).await;
///     assert!(!first.redelivered());
///     first.nack(true).await.unwrap(); // requeue: it comes back, flagged
///
///     let again = probe.expect_delivery(second).await;
///     assert_eq!((again.id(), again.redelivered()), (first.id(), true));
///     again.ack().await.unwrap();
///     probe.expect_no_delivery(second).await;
/// });
/// ```
#[derive(Debug)]
pub struct DeliveryProbe {
    probe: TestProbe<Delivery>,
}

impl DeliveryProbe {
    /// Spawns the probe on `runtime` (inside [`postbox::testkit::run`] or
    /// [`local`](postbox::testkit::local) for a local handle).
    pub fn new(runtime: &RuntimeHandle) -> DeliveryProbe {
        DeliveryProbe {
            probe: TestProbe::new(runtime),
        }
    }

    /// A consumer factory for [`Broker::consume`](crate::Broker::consume) whose
    /// consumers forward every delivery to this probe. Several consumers may
    /// share one probe.
    pub fn consumer(&self) -> impl Fn() -> ProbeConsumer + Send + Sync + 'static {
        let sink = self.probe.recipient();
        move || ProbeConsumer { sink: sink.clone() }
    }

    /// Waits up to `timeout` for the next delivery.
    ///
    /// # Errors
    ///
    /// As [`TestProbe::try_expect_msg`].
    pub async fn try_expect_delivery(&mut self, timeout: Duration) -> Result<Delivery, ProbeError> {
        self.probe.try_expect_msg(timeout).await
    }

    /// Waits up to `timeout` for the next delivery and returns it, unsettled.
    ///
    /// # Panics
    ///
    /// If none arrives in time.
    pub async fn expect_delivery(&mut self, timeout: Duration) -> Delivery {
        self.probe.expect_msg(timeout).await
    }

    /// Checks that no delivery arrives within `duration`.
    ///
    /// # Panics
    ///
    /// If one does, showing it.
    pub async fn expect_no_delivery(&mut self, duration: Duration) {
        self.probe.expect_no_msg(duration).await
    }
}

impl Deref for DeliveryProbe {
    type Target = TestProbe<Delivery>;
    fn deref(&self) -> &TestProbe<Delivery> {
        &self.probe
    }
}

impl DerefMut for DeliveryProbe {
    fn deref_mut(&mut self) -> &mut TestProbe<Delivery> {
        &mut self.probe
    }
}
