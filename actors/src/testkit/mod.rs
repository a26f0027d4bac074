//! Test helpers for messaging: a broker that records its traffic, a consumer
//! that hands deliveries to the test, and fault injection for consumers.
//!
//! They build on [`postbox::testkit`] (probes, virtual time, the deterministic
//! single-threaded mode), and are meant to be used the same way: inside
//! [`postbox::testkit::run`] or `#[tokio::test(start_paused = true)]` with
//! [`postbox::testkit::local`], with the broker on
//! [`RuntimeHandle::local()`](postbox::RuntimeHandle::local). Consumer timers
//! (supervisor backoff, the faults' delays) then run on the paused clock.
//!
//! - [`TestBroker`]: a [`Broker`](crate::Broker) (it derefs to one) that records
//!   every publish, delivery, settlement and dead letter; query them by queue
//!   ([`published_to`](TestBroker::published_to),
//!   [`deliveries`](TestBroker::deliveries),
//!   [`settlements`](TestBroker::settlements),
//!   [`dead_letters`](TestBroker::dead_letters)) or wait for them
//!   ([`expect_published`](TestBroker::expect_published),
//!   [`wait_for`](TestBroker::wait_for)).
//! - [`DeliveryProbe`]: a consumer whose deliveries go to the test, which
//!   acks, nacks or holds them itself.
//! - [`FaultPlan`]: crash before or after the ack, duplicate, delay or slow
//!   down the deliveries of any consumer, in one line.
//!
//! ```
//! use std::time::Duration;
//! use postbox::{RuntimeHandle, testkit};
//! use postbox_actors::testkit::{FaultPlan, TestBroker};
//! use postbox_actors::{LayerExt, ConsumeOptions, Delivery, QueueOptions};
//!
//! testkit::run(async {
//!     let broker = TestBroker::new(&RuntimeHandle::local());
//!     broker.declare_queue("q", QueueOptions::default()).await.unwrap();
//!     let acking = || |d: Delivery| async move { d.ack().await?; Ok(()) };
//!     let plan = FaultPlan::new().crash_after_ack(1);
//!     let _c = broker.consume("q", ConsumeOptions::manual(1), acking.layer(plan.clone())).await.unwrap();
//!
//!     broker.publish_json("q", "once").await.unwrap();
//!     // Virtual time: this passes at once, and everything has happened by then.
//!     tokio::time::sleep(Duration::from_secs(5)).await;
//!     // The consumer crashed after acking: it was restarted, and the message was
//!     // delivered once and acked once.
//!     assert_eq!(plan.stats().crashes_after_ack, 1);
//!     assert_eq!(broker.deliveries("q").len(), 1);
//!     assert_eq!(broker.settlements("q").len(), 1);
//!     assert_eq!(broker.queue_stats("q").await.unwrap().stats.consumers, 1);
//! });
//! ```

mod capture;
mod fault;
mod probe;

pub use crate::store::DiskFaults;
pub use capture::{DeadLettered, Delivered, Event, Events, Published, Settled, TestBroker};
pub use fault::{CrashAfterRecord, FaultPlan, FaultStats, Faulty};
pub use probe::{DeliveryProbe, ProbeConsumer};
