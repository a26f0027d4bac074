//! Fault injection for consumers under test: [`FaultPlan`] says what goes
//! wrong and on which delivery; [`Faulty`] is the consumer wrapper that does it.
//!
//! Deliveries are numbered from 1 in the order the wrapped consumers are handed
//! them. The numbering, and the record of which faults fired, live in the plan
//! and are shared by every consumer it wraps, including the ones the
//! supervisor rebuilds after a crash. So `crash_before_ack(3)` crashes once, on
//! the third delivery, and its redelivery is counted as a new delivery (the
//! fourth, unless another consumer of the plan got one first). To crash
//! again, add another rule:
//! `.crash_before_ack(3).crash_before_ack(5)`.
//!
//! A crash is a panic, so the default panic hook prints it in the test's
//! output: "postbox testkit: injected crash before handling delivery #3
//! (queue "q", tag 3)". That line is expected, not a failure.
//!
//! For one delivery, the faults apply in this order: `slow`, `delay`,
//! `crash_before_ack`; then the inner consumer handles it; then `duplicate`
//! hands it over again; then `crash_after_ack`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postbox::Failure;

use crate::consumer::{Consumer, Layer};
use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore};
use crate::queue::delivery::Delivery;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    CrashBeforeAck,
    CrashAfterAck,
    Duplicate,
    Delay(Duration),
}

#[derive(Default)]
struct Counters {
    deliveries: AtomicU64,
    crashes_before_ack: AtomicU64,
    crashes_after_ack: AtomicU64,
    duplicates: AtomicU64,
    delays: AtomicU64,
}

/// What a [`FaultPlan`] has done so far (see [`FaultPlan::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Deliveries handed to the wrapped consumers (duplicates not included).
    pub deliveries: u64,
    /// Crashes injected before the inner consumer saw a delivery.
    pub crashes_before_ack: u64,
    /// Crashes injected after the inner consumer handled a delivery.
    pub crashes_after_ack: u64,
    /// Deliveries handed to the inner consumer a second time.
    pub duplicates: u64,
    /// Deliveries held back by `delay` (`slow` not included).
    pub delays: u64,
}

/// The faults to inject into a consumer, built up with one call per fault,
/// then stacked on a consumer factory as a [`Layer`](crate::Layer).
///
/// Cloning a plan shares its counters. A crash is a panic in the consumer's
/// handler: the consumer restarts (after its backoff) and the
/// queue requeues what it had not settled, as with a real crash.
///
/// # Example
///
/// Crash before the second delivery is handled: it is requeued and redelivered,
/// flagged, to the rebuilt consumer.
///
/// ```
/// use std::time::Duration;
/// use postbox::{RuntimeHandle, testkit::{self, TestProbe}};
/// use postbox_actors::testkit::FaultPlan;
/// use postbox_actors::{Broker, ConsumeOptions, Delivery, LayerExt, QueueOptions};
///
/// #[derive(Debug, PartialEq)]
/// struct Seen(u32, bool);
/// impl postbox::Message for Seen { type Reply = (); }
///
/// testkit::run(async {
///     let rt = RuntimeHandle::local();
///     let broker = Broker::new(&rt);
///     broker.declare_queue("q", QueueOptions::default()).await.unwrap();
///     let mut seen = TestProbe::<Seen>::new(&rt);
///     let out = seen.recipient();
///
///     let plan = FaultPlan::new().crash_before_ack(2);
///     let _c = broker
///         .consume("q", ConsumeOptions::manual(1), (move || {
///             let out = out.clone();
///             move |d: Delivery| {
///                 let out = out.clone();
///                 async move {
///                     let _ = out.send(Seen(d.decode()?, d.redelivered())).await;
///                     d.ack().await?;
///                     Ok(())
///                 }
///             }
///         }).layer(plan.clone()))
///         .await
///         .unwrap();
///
///     for n in 1..=3 {
///         broker.publish_json("q", &n).await.unwrap();
///     }
///     let all = seen.receive_n(3, Duration::from_secs(5)).await;
///     assert_eq!(all, [Seen(1, false), Seen(2, true), Seen(3, false)]);
///     assert_eq!(plan.stats().crashes_before_ack, 1);
///     assert_eq!(plan.stats().deliveries, 4); // 1, 2 (crash), 2 again, 3
/// });
/// ```
#[derive(Clone, Default)]
pub struct FaultPlan {
    rules: Vec<(u64, Fault)>,
    slow: Option<Duration>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPlan")
            .field("rules", &self.rules)
            .field("slow", &self.slow)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultPlan {
    /// A plan with no faults yet.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// On the `n`-th delivery, panic before the inner consumer sees it. The
    /// delivery was not settled, so the queue requeues it (with everything
    /// else the consumer held) and redelivers it flagged `redelivered`.
    pub fn crash_before_ack(self, n: u64) -> FaultPlan {
        self.rule(n, Fault::CrashBeforeAck)
    }

    /// On the `n`-th delivery, let the inner consumer handle it, then panic once
    /// its handler returns. If the handler acked it, the ack stands: the
    /// delivery is not redelivered (deliveries the consumer still held are).
    pub fn crash_after_ack(self, n: u64) -> FaultPlan {
        self.rule(n, Fault::CrashAfterAck)
    }

    /// Hand the `n`-th delivery to the inner consumer twice, like an
    /// at-least-once duplicate. Both are the same delivery: the first
    /// settlement applies, and settling the copy fails with
    /// [`AckError::AlreadySettled`](crate::AckError::AlreadySettled) (a handler
    /// that propagates that error with `?` fails, and is restarted).
    pub fn duplicate(self, n: u64) -> FaultPlan {
        self.rule(n, Fault::Duplicate)
    }

    /// Hold the `n`-th delivery back for `d` before the inner consumer handles
    /// it. The consumer handles one delivery at a time, so the ones after it
    /// wait too.
    pub fn delay(self, n: u64, d: Duration) -> FaultPlan {
        self.rule(n, Fault::Delay(d))
    }

    /// Make every delivery take `d` longer: wait `d` before the inner consumer
    /// handles it.
    pub fn slow(mut self, d: Duration) -> FaultPlan {
        self.slow = Some(d);
        self
    }

    fn rule(mut self, n: u64, fault: Fault) -> FaultPlan {
        self.rules.push((n, fault));
        self
    }

    /// What the plan has done so far.
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        FaultStats {
            deliveries: c.deliveries.load(Ordering::SeqCst),
            crashes_before_ack: c.crashes_before_ack.load(Ordering::SeqCst),
            crashes_after_ack: c.crashes_after_ack.load(Ordering::SeqCst),
            duplicates: c.duplicates.load(Ordering::SeqCst),
            delays: c.delays.load(Ordering::SeqCst),
        }
    }
}

/// A plan is a consumer [`Layer`]: stack it on the factory of the consumer
/// under test.
///
/// ```
/// # use postbox::{RuntimeHandle, testkit};
/// # use postbox_actors::{Broker, ConsumeOptions, Delivery, LayerExt, QueueOptions, testkit::FaultPlan};
/// # testkit::run(async {
/// # let broker = Broker::new(&RuntimeHandle::local());
/// # broker.declare_queue("q", QueueOptions::default()).await.unwrap();
/// # let my_consumer = || |d: Delivery| async move { d.ack().await?; Ok(()) };
/// let plan = FaultPlan::new().crash_after_ack(3).slow(std::time::Duration::from_millis(5));
/// let consumer = broker.consume("q", ConsumeOptions::manual(8), my_consumer.layer(plan.clone())).await;
/// # assert!(consumer.is_ok());
/// # });
/// ```
///
/// Every consumer the layered factory builds, first or rebuilt, shares this
/// plan's numbering and counters (so do consumers of other factories layered
/// with the same plan or its clones).
impl<C: Consumer> Layer<C> for FaultPlan {
    type Consumer = Faulty<C>;

    fn layer(&self, inner: C) -> Faulty<C> {
        Faulty {
            inner,
            plan: Arc::new(self.clone()),
        }
    }
}

/// A consumer with faults injected by a [`FaultPlan`] (its [`Layer`]).
pub struct Faulty<C: Consumer> {
    inner: C,
    plan: Arc<FaultPlan>,
}

impl<C: Consumer> std::fmt::Debug for Faulty<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty").field("plan", &self.plan).finish()
    }
}

impl<C: Consumer> Faulty<C> {
    /// The wrapped consumer.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C: Consumer> Consumer for Faulty<C> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let c = &self.plan.counters;
        let n = c.deliveries.fetch_add(1, Ordering::SeqCst) + 1;
        let has = |fault: Fault| self.plan.rules.contains(&(n, fault));
        if let Some(d) = self.plan.slow {
            tokio::time::sleep(d).await;
        }
        for &(_, fault) in self.plan.rules.iter().filter(|(at, _)| *at == n) {
            if let Fault::Delay(d) = fault {
                c.delays.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(d).await;
            }
        }
        let at = format!(
            "delivery #{n} (queue {:?}, tag {})",
            delivery.queue(),
            delivery.tag()
        );
        if has(Fault::CrashBeforeAck) {
            c.crashes_before_ack.fetch_add(1, Ordering::SeqCst);
            panic!("postbox testkit: injected crash before handling {at}");
        }
        let copy = has(Fault::Duplicate).then(|| delivery.duplicate());
        self.inner.handle(delivery).await?;
        if let Some(copy) = copy {
            c.duplicates.fetch_add(1, Ordering::SeqCst);
            self.inner.handle(copy).await?;
        }
        if has(Fault::CrashAfterAck) {
            c.crashes_after_ack.fetch_add(1, Ordering::SeqCst);
            panic!("postbox testkit: injected crash after handling {at}");
        }
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.inner.cancelled().await
    }
}

/// An idempotency store that crashes its consumer right after recording a
/// key done, before the layer acks the delivery, whenever `crash(key)` says
/// so: the one moment [`FaultPlan`] cannot reach (it injects faults around
/// a consumer, and a crash inside the handler releases the claim). The
/// redelivery must find the key done and skip the side effect.
///
/// ```
/// use postbox_actors::idempotency::MemoryStore;
/// use postbox_actors::testkit::CrashAfterRecord;
/// // Crash after recording order 7, every time it is recorded.
/// let store = CrashAfterRecord::new(MemoryStore::new(10_000), |key: &str| key.ends_with(":7"));
/// # let _ = store;
/// ```
pub struct CrashAfterRecord<S> {
    inner: S,
    crash: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl<S> CrashAfterRecord<S> {
    /// Wraps `inner`; `crash` is asked after each key it records done.
    pub fn new(inner: S, crash: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        CrashAfterRecord {
            inner,
            crash: Box::new(crash),
        }
    }
}

impl<S> std::fmt::Debug for CrashAfterRecord<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashAfterRecord").finish_non_exhaustive()
    }
}

impl<S: IdempotencyStore> IdempotencyStore for CrashAfterRecord<S> {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        self.inner.claim(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        let done = self.inner.complete(key, token, retain).await?;
        if (self.crash)(key) {
            panic!("postbox testkit: injected crash after recording {key}, before the ack");
        }
        Ok(done)
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        self.inner.release(key, token).await
    }
}
