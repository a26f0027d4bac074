//! The messaging test kit, exercised: deterministic local mode with a
//! broker, the recording broker, the delivery probe, and each injected
//! consumer fault. (The actor-layer test kit's tests are in the core crate's
//! `tests/testkit.rs`.)

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::{self, ProbeErrorKind, TestProbe};
use postbox::{Failure, Message, Recipient, RuntimeHandle};
use postbox_actors::testkit::{DeliveryProbe, Event, FaultPlan, FaultStats, TestBroker};
use postbox_actors::{
    AckError, Broker, ConsumeOptions, Consumer, DeathReason, Delivery, LayerExt, OnError, Outcome,
    QueueOptions,
};
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- determinism

/// One run of a scenario with timers, competing consumers and restarts; returns
/// who handled what, when.
async fn scenario() -> Vec<(u64, u32, bool, Duration)> {
    let rt = RuntimeHandle::local();
    let broker = Broker::new(&rt);
    broker
        .declare_queue("jobs", QueueOptions::default())
        .await
        .unwrap();
    let trace = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let plan = FaultPlan::new().crash_before_ack(7);
    let mut consumers = Vec::new();
    for pace in 1..=3u64 {
        let trace = trace.clone();
        let consumer = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(2),
                (move || {
                    let trace = trace.clone();
                    move |d: Delivery| {
                        let trace = trace.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(10 * pace)).await;
                            let n: u32 = d.decode()?;
                            trace.lock().push((
                                d.consumer().0,
                                n,
                                d.redelivered(),
                                start.elapsed(),
                            ));
                            d.ack().await?;
                            Ok(())
                        }
                    }
                })
                .layer(plan.clone()),
            )
            .await
            .unwrap();
        consumers.push(consumer);
    }
    for n in 0..30 {
        broker.publish_json("jobs", &n).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    trace.lock().clone()
}

#[test]
fn local_mode_is_deterministic() {
    let first = testkit::run(scenario());
    let mut handled: Vec<u32> = first.iter().map(|t| t.1).collect();
    handled.sort_unstable();
    assert_eq!(handled, (0..30).collect::<Vec<_>>(), "each message once");
    assert!(first.iter().any(|t| t.2), "the crash caused redeliveries");
    let consumers: std::collections::BTreeSet<u64> = first.iter().map(|t| t.0).collect();
    assert!(consumers.len() >= 3, "all consumers worked: {consumers:?}");
    for _ in 0..2 {
        assert_eq!(
            testkit::run(scenario()),
            first,
            "same interleaving, same times"
        );
    }
}

// ---------------------------------------------------------------- broker capture

#[tokio::test(start_paused = true)]
async fn the_test_broker_records_publishes_deliveries_and_settlements() {
    testkit::local(async {
        let rt = RuntimeHandle::local();
        let broker = TestBroker::new(&rt);
        broker
            .declare_queue("a", QueueOptions::default())
            .await
            .unwrap();
        broker
            .declare_queue("b", QueueOptions::default())
            .await
            .unwrap();
        let mut probe = DeliveryProbe::new(&rt);
        let _c = broker
            .consume("a", ConsumeOptions::manual(4), probe.consumer())
            .await
            .unwrap();

        broker.publish_json("a", &1).await.unwrap();
        broker.publish_json("a", &2).await.unwrap();
        let to_b = postbox_actors::Envelope::encode(&3)
            .unwrap()
            .with_routing_key("b.key");
        broker.publish("b", to_b).await.unwrap();

        let p1 = broker.expect_published("a", SEC).await;
        let p2 = broker.expect_published("a", SEC).await;
        assert_eq!(
            (p1.decode::<u32>().unwrap(), p2.decode::<u32>().unwrap()),
            (1, 2)
        );
        let p3 = broker.expect_published("b", SEC).await;
        assert_eq!(
            (p3.routing_key(), p3.payload().as_ref()),
            ("b.key", &b"3"[..])
        );
        let err = broker.try_expect_published("a", SEC).await.unwrap_err();
        assert_eq!(err.kind(), ProbeErrorKind::Timeout);
        assert!(
            err.to_string().starts_with(
                "expect_published: timeout (1s) waiting for publish #3 to \"a\"; recorded instead:"
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!(
                "published to \"b\": {} (1 bytes, key \"b.key\")",
                p3.id()
            )),
            "{err}"
        );

        // The test settles: ack 1, requeue 2, then reject its redelivery.
        let d1 = probe.expect_delivery(SEC).await;
        let d2 = probe.expect_delivery(SEC).await;
        d1.ack().await.unwrap();
        d2.nack(true).await.unwrap();
        let d2again = probe.expect_delivery(SEC).await;
        assert_eq!((d2again.id(), d2again.redelivered()), (p2.id(), true));
        d2again.reject(false).await.unwrap();
        broker
            .wait_for(|e| e.settlements("a").len() == 3, SEC)
            .await;
        probe.expect_no_delivery(SEC).await;

        assert_eq!(broker.published_to("a").len(), 2);
        let deliveries = broker.deliveries("a");
        let seen: Vec<_> = deliveries
            .iter()
            .map(|d| {
                (
                    d.tag.0,
                    d.message.id(),
                    d.message.redelivered(),
                    d.message.delivery_count(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, p1.id(), false, 1),
                (2, p2.id(), false, 1),
                (3, p2.id(), true, 2)
            ]
        );
        assert!(deliveries.iter().all(|d| d.consumer == d1.consumer()));
        let settled: Vec<_> = broker
            .settlements("a")
            .iter()
            .map(|s| (s.tag.0, s.outcome, s.message_id, s.multiple))
            .collect();
        assert_eq!(
            settled,
            [
                (1, Outcome::Ack, Some(p1.id()), false),
                (2, Outcome::Requeue, Some(p2.id()), false),
                (3, Outcome::Discard, Some(p2.id()), false),
            ]
        );
        // The whole record of queue "a", in order.
        let kinds: Vec<&str> = broker
            .events()
            .iter()
            .filter(|e| e.queue() == "a")
            .map(|e| match e {
                Event::Published(_) => "published",
                Event::Delivered(_) => "delivered",
                Event::Settled(_) => "settled",
                Event::DeadLettered(_) => "dead-lettered",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            // Both publishes were waiting in the queue's mailbox, so it took them in
            // and then dispatched both (it dispatches when its mailbox drains).
            [
                "published",
                "published",
                "delivered",
                "delivered",
                "settled",
                "settled",
                "delivered",
                "settled",
                "dead-lettered"
            ]
        );
        // The rejected message left the queue (dropped: no dead-letter exchange).
        let dead = broker.dead_letters("a");
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].message.id(), dead[0].reason, dead[0].routed),
            (p2.id(), DeathReason::Rejected, false)
        );
        assert!(broker.deliveries("b").is_empty());

        let err = broker
            .try_wait_for(|e| e.settlements("b").len() == 1, SEC)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "wait_for: condition not met within 1s; recorded: \n  published to \"a\""
            ),
            "{err}"
        );

        broker.clear();
        assert!(broker.events().is_empty());
        // After clear, expect_published starts again from the next publish.
        broker.publish_json("a", &4).await.unwrap();
        let p4 = broker.expect_published("a", SEC).await;
        assert_eq!(p4.decode::<u32>().unwrap(), 4);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_test_broker_can_attach_to_an_existing_broker() {
    testkit::local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        broker.publish_json("q", &"before").await.unwrap();
        // Let the queue handle the first publish before the tap attaches.
        broker.queue_stats("q").await.unwrap();
        let tap = TestBroker::attach(&broker);
        broker.publish_json("q", &"after").await.unwrap();
        let seen = tap.expect_published("q", SEC).await;
        assert_eq!(seen.decode::<String>().unwrap(), "after");
        assert_eq!(tap.published_to("q").len(), 1);
        drop(tap);
        broker.publish_json("q", &"untapped").await.unwrap();
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 3);
    })
    .await;
}

#[test]
fn message_ttls_run_on_virtual_time_and_dead_letters_are_recorded() {
    testkit::run(async {
        let rt = RuntimeHandle::local();
        let broker = TestBroker::new(&rt);
        let ttl = QueueOptions::default().message_ttl(Duration::from_secs(30));
        broker.declare_queue("short", ttl).await.unwrap();
        let start = Instant::now();
        broker.publish_json("short", &1).await.unwrap();
        broker
            .wait_for(|e| !e.dead_letters("short").is_empty(), 60 * SEC)
            .await;
        assert_eq!(start.elapsed(), 30 * SEC);
        let expired = broker.dead_letters("short");
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].message.decode::<u32>().unwrap(), 1);
        assert_eq!(
            (expired[0].reason, expired[0].routed),
            (DeathReason::Expired, false)
        );

        // A rejected delivery is a dead letter too (dropped: no dead-letter exchange).
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let mut probe = DeliveryProbe::new(&rt);
        let _c = broker
            .consume("q", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        broker.publish_json("q", &2).await.unwrap();
        let d = probe.expect_delivery(SEC).await;
        d.reject(false).await.unwrap();
        broker
            .wait_for(|e| e.dead_letters("q").len() == 1, SEC)
            .await;
        let rejected = &broker.dead_letters("q")[0];
        assert_eq!(
            (rejected.message.id(), rejected.reason, rejected.routed),
            (d.id(), DeathReason::Rejected, false)
        );
        let last = broker.events().last().map(ToString::to_string);
        assert_eq!(
            last.as_deref(),
            Some(format!("dead-lettered from \"q\" (rejected, dropped): {}", d.id()).as_str())
        );
    });
}

// ---------------------------------------------------------------- faults

/// What the inner consumer saw of one delivery.
#[derive(Debug, PartialEq)]
struct Seen {
    n: u32,
    tag: u64,
    redelivered: bool,
    count: u32,
    at: Duration,
    ack: Result<(), AckError>,
}
impl Message for Seen {
    type Reply = ();
}

/// Reports each delivery to a probe, then acks it; `strict` propagates ack
/// errors (and so fails on a duplicate), otherwise they are only reported.
struct Reporter {
    out: Recipient<Seen>,
    start: Instant,
    strict: bool,
}

impl Consumer for Reporter {
    async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
        let ack = d.ack().await;
        let seen = Seen {
            n: d.decode()?,
            tag: d.tag().0,
            redelivered: d.redelivered(),
            count: d.delivery_count(),
            at: self.start.elapsed(),
            ack: ack.clone(),
        };
        let _ = self.out.send(seen).await;
        if self.strict {
            ack?;
        }
        Ok(())
    }
}

fn reporter(
    probe: &TestProbe<Seen>,
    strict: bool,
) -> impl Fn() -> Reporter + Send + Sync + 'static {
    let out = probe.recipient();
    let start = Instant::now();
    move || Reporter {
        out: out.clone(),
        start,
        strict,
    }
}

/// `(n, redelivered, delivery count)` of each, for compact assertions.
fn brief(seen: &[Seen]) -> Vec<(u32, bool, u32)> {
    seen.iter().map(|s| (s.n, s.redelivered, s.count)).collect()
}

async fn setup() -> (TestBroker, TestProbe<Seen>) {
    let rt = RuntimeHandle::local();
    let broker = TestBroker::new(&rt);
    broker
        .declare_queue("q", QueueOptions::default())
        .await
        .unwrap();
    (broker, TestProbe::new(&rt))
}

#[tokio::test(start_paused = true)]
async fn crash_before_ack_requeues_and_redelivers_flagged() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let plan = FaultPlan::new().crash_before_ack(3);
        let consumer = broker
            .consume(
                "q",
                ConsumeOptions::manual(8),
                reporter(&seen, true).layer(plan.clone()),
            )
            .await
            .unwrap();
        for n in 1..=5 {
            broker.publish_json("q", &n).await.unwrap();
        }
        let got = seen.receive_n(5, 5 * SEC).await;
        // 3 crashed the consumer before it was handled; 4 and 5 were held by
        // it. All three come back, flagged, to the restarted consumer at once:
        // a first crash restarts without a backoff.
        assert_eq!(
            brief(&got),
            [
                (1, false, 1),
                (2, false, 1),
                (3, true, 2),
                (4, true, 2),
                (5, true, 2)
            ]
        );
        assert_eq!(got[2].at - got[1].at, Duration::ZERO);
        seen.expect_no_msg(5 * SEC).await;
        assert_eq!(
            plan.stats(),
            FaultStats {
                deliveries: 6,
                crashes_before_ack: 1,
                ..FaultStats::default()
            }
        );
        assert_eq!(consumer.addr().stats().restarts, 1);
        assert_eq!(broker.deliveries("q").len(), 8);
        assert!(
            broker
                .settlements("q")
                .iter()
                .all(|s| s.outcome == Outcome::Ack)
        );
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!(
            (
                stats.acknowledged,
                stats.requeued,
                stats.redelivered,
                stats.unacked
            ),
            (5, 3, 3, 0)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn crash_after_ack_is_not_redelivered() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let plan = FaultPlan::new().crash_after_ack(2);
        let consumer = broker
            .consume(
                "q",
                ConsumeOptions::manual(8),
                reporter(&seen, true).layer(plan.clone()),
            )
            .await
            .unwrap();
        for n in 1..=3 {
            broker.publish_json("q", &n).await.unwrap();
        }
        let got = seen.receive_n(3, 5 * SEC).await;
        // 2 was acked before the crash: it stays acked. 3, held unacked by the
        // crashed consumer, is redelivered.
        assert_eq!(brief(&got), [(1, false, 1), (2, false, 1), (3, true, 2)]);
        assert!(got.iter().all(|s| s.ack.is_ok()));
        seen.expect_no_msg(5 * SEC).await;
        assert_eq!(
            plan.stats(),
            FaultStats {
                deliveries: 3,
                crashes_after_ack: 1,
                ..FaultStats::default()
            }
        );
        assert_eq!(consumer.addr().stats().restarts, 1);
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!(
            (
                stats.delivered,
                stats.acknowledged,
                stats.requeued,
                stats.unacked
            ),
            (4, 3, 1, 0)
        );
        let redelivered: Vec<u32> = broker
            .deliveries("q")
            .iter()
            .filter(|d| d.message.redelivered())
            .map(|d| d.message.decode().unwrap())
            .collect();
        assert_eq!(redelivered, [3]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_reaches_the_consumer_twice_and_its_second_ack_is_refused() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let plan = FaultPlan::new().duplicate(2);
        let consumer = broker
            .consume(
                "q",
                ConsumeOptions::manual(8),
                reporter(&seen, false).layer(plan.clone()),
            )
            .await
            .unwrap();
        for n in 1..=3 {
            broker.publish_json("q", &n).await.unwrap();
        }
        let got = seen.receive_n(4, 5 * SEC).await;
        let summary: Vec<(u32, u64, bool)> =
            got.iter().map(|s| (s.n, s.tag, s.ack.is_ok())).collect();
        assert_eq!(
            summary,
            [(1, 1, true), (2, 2, true), (2, 2, false), (3, 3, true)]
        );
        assert!(matches!(got[2].ack, Err(AckError::AlreadySettled { .. })));
        assert!(!got[2].redelivered, "the same delivery, not a redelivery");
        seen.expect_no_msg(5 * SEC).await;
        assert_eq!(plan.stats().duplicates, 1);
        assert_eq!(plan.stats().deliveries, 3);
        // The tolerant consumer did not crash; the queue saw each message once.
        assert_eq!(consumer.addr().stats().restarts, 0);
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.delivered, stats.acknowledged), (3, 3));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_propagates_the_duplicate_ack_error_crashes() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let plan = FaultPlan::new().duplicate(1);
        let consumer = broker
            .consume(
                "q",
                // Errors crash the consumer (by default they only settle the
                // failed delivery, and it was settled already).
                ConsumeOptions::manual(8).on_error(OnError::Restart),
                reporter(&seen, true).layer(plan.clone()),
            )
            .await
            .unwrap();
        broker.publish_json("q", &1).await.unwrap();
        broker.publish_json("q", &2).await.unwrap();
        let got = seen.receive_n(3, 5 * SEC).await;
        // The copy's ack error fails the consumer; 2, which it held, comes back.
        assert_eq!(brief(&got), [(1, false, 1), (1, false, 1), (2, true, 2)]);
        seen.expect_no_msg(5 * SEC).await;
        assert_eq!(consumer.addr().stats().restarts, 1);
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.acknowledged, stats.requeued), (2, 1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_delayed_delivery_holds_up_the_ones_behind_it() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let plan = FaultPlan::new().delay(2, 3 * SEC);
        let _c = broker
            .consume(
                "q",
                ConsumeOptions::manual(8),
                reporter(&seen, true).layer(plan.clone()),
            )
            .await
            .unwrap();
        for n in 1..=3 {
            broker.publish_json("q", &n).await.unwrap();
        }
        let got = seen.receive_n(3, 5 * SEC).await;
        let at: Vec<(u32, Duration)> = got.iter().map(|s| (s.n, s.at)).collect();
        assert_eq!(at, [(1, Duration::ZERO), (2, 3 * SEC), (3, 3 * SEC)]);
        assert_eq!(plan.stats().delays, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_observed_in_virtual_time() {
    testkit::local(async {
        let (broker, mut seen) = setup().await;
        let start = Instant::now();
        let plan = FaultPlan::new().slow(Duration::from_millis(100));
        let _c = broker
            .consume(
                "q",
                ConsumeOptions::manual(8),
                reporter(&seen, true).layer(plan.clone()),
            )
            .await
            .unwrap();
        for n in 1..=5 {
            broker.publish_json("q", &n).await.unwrap();
        }
        // Midway, two are acked and three are still held by the consumer.
        tokio::time::sleep_until(start + Duration::from_millis(250)).await;
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.acknowledged, stats.unacked), (2, 3));

        let got = seen.receive_n(5, 5 * SEC).await;
        let at: Vec<u128> = got.iter().map(|s| s.at.as_millis()).collect();
        assert_eq!(at, [100, 200, 300, 400, 500]);
        assert_eq!(plan.stats().deliveries, 5);
    })
    .await;
}
