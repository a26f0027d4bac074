//! Rate limits, in paused time (exact, and independent of the machine's
//! speed): throttled publishers that wait or fail fast, one limit or one per
//! key, and the consumer layer that spaces out a handler's deliveries or puts
//! off a busy key's.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::partition::PartitionKey;
use postbox_actors::{
    Broker, BrokerError, ConsumeOptions, DeleteOptions, Delivery, Envelope, ExchangeOptions,
    LayerExt, QueueOptions, RateLimit, RateLimited, Throttle, ThrottleError, Throttled,
};
use tokio::time::Instant;

mod common;
use common::{msg, settle};

/// How long each rate is measured over.
const RUN: Duration = Duration::from_secs(10);

/// Whether `count` is within 5% of `expected`.
fn within_5_percent(count: u64, expected: u64) -> bool {
    count.abs_diff(expected) * 20 <= expected
}

async fn ready(broker: &Broker, queue: &str) -> usize {
    broker
        .queue(queue)
        .unwrap()
        .snapshot()
        .await
        .unwrap()
        .stats
        .ready
}

#[tokio::test(start_paused = true)]
async fn a_waiting_publisher_keeps_to_its_rate() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let orders = broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        let producer = Throttled::new(orders, RateLimit::per_second(100));
        let start = Instant::now();
        let (mut published, mut after_first_second) = (0u64, 0u64);
        // Bounded, so that a broken limit fails instead of looping forever
        // in a clock that never moves.
        while start.elapsed() < RUN && published < 100_000 {
            producer.publish(msg(published as u32)).await.unwrap();
            published += 1;
            if start.elapsed() < Duration::from_secs(1) {
                after_first_second = published;
            }
        }
        assert!(within_5_percent(published, 1_000), "{published} in 10 s");
        // The default burst (6) goes at once; then one every 10 ms.
        assert_eq!(after_first_second, 6 + 99);
        assert_eq!(published - after_first_second, 900 + 1);
        assert_eq!(ready(&broker, "orders").await, published as usize);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_fast_publisher_is_refused_over_its_rate() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let orders = broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        let producer = Throttled::new(
            orders,
            Throttle::new(RateLimit::per_second(100)).fail_fast(),
        );
        let (mut published, mut refused) = (0u64, 0u64);
        // One attempt a millisecond: ten times the rate.
        for n in 0..10_000u32 {
            match producer.publish(msg(n)).await {
                Ok(()) => published += 1,
                Err(ThrottleError::RateLimited(limited)) => {
                    refused += 1;
                    assert!(
                        limited.retry_after > Duration::ZERO
                            && limited.retry_after <= Duration::from_millis(10),
                        "{limited:?}"
                    );
                }
                Err(err) => panic!("{err}"),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(within_5_percent(published, 1_000), "{published} in 10 s");
        // Exactly: the burst of 6 in the first 6 ms, then one every 10 ms.
        assert_eq!(published, 6 + 999);
        assert_eq!(published + refused, 10_000);
        // Refusals published nothing.
        assert_eq!(ready(&broker, "orders").await, published as usize);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn fail_fast_says_when_to_retry() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let orders = broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        let limit = RateLimit::per_second(10).burst(1);
        let producer = Throttled::new(orders, Throttle::new(limit).fail_fast());
        producer.publish(msg(1)).await.unwrap();
        let refused = producer.publish(msg(2)).await.unwrap_err();
        assert_eq!(refused.retry_after(), Some(Duration::from_millis(100)));
        assert!(matches!(
            refused,
            ThrottleError::RateLimited(RateLimited { retry_after, .. })
                if retry_after == Duration::from_millis(100)
        ));
        tokio::time::sleep(Duration::from_millis(40)).await;
        let refused = producer.publish(msg(2)).await.unwrap_err();
        assert_eq!(refused.retry_after(), Some(Duration::from_millis(60)));
        // Retrying when told to succeeds.
        tokio::time::sleep(Duration::from_millis(60)).await;
        producer.publish(msg(2)).await.unwrap();
        assert_eq!(ready(&broker, "orders").await, 2);

        // The broker's own refusals come through as they are.
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker
            .delete_queue("orders", DeleteOptions::default())
            .await
            .unwrap();
        let gone = producer.publish(msg(3)).await.unwrap_err();
        assert_eq!(
            gone,
            ThrottleError::Publish(BrokerError::QueueNotFound("orders".into()))
        );
        assert_eq!(gone.retry_after(), None);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn per_key_limits_give_each_key_its_own_rate() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("events", QueueOptions::default())
            .await
            .unwrap();
        let per_user = RateLimit::per_second(50)
            .burst(1)
            .per_key(PartitionKey::Header("user".into()));
        let producer = Throttled::new(broker.clone(), per_user);
        let start = Instant::now();
        // Two busy users publishing as fast as they may, at once, and a
        // quiet one under the limit.
        let busy = |user: &'static str| {
            let producer = producer.clone();
            tokio::task::spawn_local(async move {
                let mut sent = 0u64;
                while start.elapsed() < RUN && sent < 100_000 {
                    let event = Envelope::new("e").with_header("user", user);
                    producer.publish("events", event).await.unwrap();
                    sent += 1;
                }
                sent
            })
        };
        let (ann, bob) = (busy("ann"), busy("bob"));
        let quiet = {
            let producer = producer.clone();
            tokio::task::spawn_local(async move {
                let mut waited = Duration::ZERO;
                for _ in 0..100 {
                    let before = Instant::now();
                    let event = Envelope::new("e").with_header("user", "cyd");
                    producer.publish("events", event).await.unwrap();
                    waited += before.elapsed();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                waited
            })
        };
        let (ann, bob, quiet_waited) =
            (ann.await.unwrap(), bob.await.unwrap(), quiet.await.unwrap());
        // Each busy user had 50/s of its own, not half of a shared 50/s.
        assert!(within_5_percent(ann, 500), "ann: {ann}");
        assert!(within_5_percent(bob, 500), "bob: {bob}");
        assert_eq!(quiet_waited, Duration::ZERO, "the quiet user never waited");
        assert_eq!(ready(&broker, "events").await, (ann + bob + 100) as usize);
        assert_eq!(producer.throttle().limiter().tracked_keys(), 3);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_keyed_fail_fast_publisher_through_an_exchange_refuses_only_the_busy_key() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("jobs", ExchangeOptions::direct())
            .await
            .unwrap();
        for key in ["resize", "encode"] {
            broker
                .declare_queue(key, QueueOptions::default())
                .await
                .unwrap();
            broker.bind_queue(key, "jobs", key).await.unwrap();
        }
        let per_kind = RateLimit::per_second(2).per_key(PartitionKey::RoutingKey);
        let producer = Throttled::new(broker.clone(), Throttle::new(per_kind).fail_fast());
        // The routing key given to publish_to is the key, whatever the
        // message carried.
        let job = || Envelope::new("job").with_routing_key("ignored");
        assert_eq!(
            producer.publish_to("jobs", "resize", job()).await.unwrap(),
            1
        );
        let refused = producer
            .publish_to("jobs", "resize", job())
            .await
            .unwrap_err();
        assert_eq!(refused.retry_after(), Some(Duration::from_millis(500)));
        assert_eq!(
            producer.publish_to("jobs", "encode", job()).await.unwrap(),
            1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            producer.publish_to("jobs", "resize", job()).await.unwrap(),
            1
        );
        assert_eq!(ready(&broker, "resize").await, 2);
        assert_eq!(ready(&broker, "encode").await, 1);
    })
    .await;
}

/// When each delivery reached the handler (ms since the start), by value.
type Log = Arc<Mutex<Vec<(String, u32, u64, bool)>>>;

/// A boxed consumer closure.
type Handler =
    Box<dyn FnMut(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Failure>>>>>;

/// A consumer that logs (user header, value, ms since `start`, redelivered)
/// and acks.
fn logger(log: &Log, start: Instant) -> impl Fn() -> Handler + Send + Sync + Clone + 'static {
    let log = log.clone();
    move || {
        let log = log.clone();
        Box::new(move |d: Delivery| {
            let log = log.clone();
            Box::pin(async move {
                let user = d
                    .header("user")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let n: u32 = d.decode()?;
                let at = start.elapsed().as_millis() as u64;
                log.lock().push((user, n, at, d.redelivered()));
                d.ack().await?;
                Ok(())
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_throttled_consumer_handles_at_its_rate() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("work", QueueOptions::default())
            .await
            .unwrap();
        for n in 0..2_000 {
            q.publish(msg(n)).await.unwrap();
        }
        let log: Log = Arc::default();
        let start = Instant::now();
        let throttle = Throttle::new(RateLimit::per_second(50).burst(1));
        let _consumer = broker
            .consume(
                "work",
                ConsumeOptions::manual(16),
                logger(&log, start).layer(throttle),
            )
            .await
            .unwrap();
        tokio::time::sleep(RUN).await;
        settle().await;
        let log = log.lock().clone();
        let handled = log.iter().filter(|e| e.2 < RUN.as_millis() as u64).count() as u64;
        assert!(within_5_percent(handled, 500), "{handled} in 10 s");
        // Evenly spaced, in queue order, none put off.
        for (pair, i) in log.windows(2).zip(0..) {
            assert!(pair[1].2 - pair[0].2 >= 20, "{i}: {pair:?}");
            assert_eq!(pair[1].1, pair[0].1 + 1);
        }
        assert!(log.iter().all(|e| !e.3));
        // The rest wait in the queue, or in the consumer's hands.
        let stats = q.snapshot().await.unwrap().stats;
        assert_eq!(stats.acknowledged, log.len() as u64);
        assert_eq!(stats.ready + stats.unacked + log.len(), 2_000);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_consumer_failing_fast_per_key_puts_off_a_busy_key_and_serves_the_others() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("events", QueueOptions::default())
            .await
            .unwrap();
        // 60 events of a busy user, then 10 of a quiet one, behind them.
        for n in 0..60 {
            q.publish(msg(n).with_header("user", "hot")).await.unwrap();
        }
        for n in 0..10 {
            q.publish(msg(n).with_header("user", "cold")).await.unwrap();
        }
        let per_user = RateLimit::per_second(10)
            .burst(1)
            .per_key(PartitionKey::Header("user".into()));
        let log: Log = Arc::default();
        let start = Instant::now();
        let _consumer = broker
            .consume(
                "events",
                ConsumeOptions::manual(100),
                logger(&log, start).layer(Throttle::new(per_user).fail_fast()),
            )
            .await
            .unwrap();
        let of = |log: &[(String, u32, u64, bool)], user: &str| -> Vec<(u32, u64, bool)> {
            log.iter()
                .filter(|e| e.0 == user)
                .map(|e| (e.1, e.2, e.3))
                .collect()
        };

        tokio::time::sleep(Duration::from_secs(1)).await;
        let early = log.lock().clone();
        // The quiet user's events did not wait behind the busy one's: all
        // ten were handled within the first second, at its own 10/s.
        let cold = of(&early, "cold");
        assert_eq!(cold.len(), 10, "{cold:?}");
        let hot = of(&early, "hot");
        assert!(hot.len() <= 11, "{}", hot.len());

        tokio::time::sleep(Duration::from_secs(6)).await;
        let log = log.lock().clone();
        for user in ["hot", "cold"] {
            let events = of(&log, user);
            // Every event handled exactly once.
            let mut values: Vec<u32> = events.iter().map(|e| e.0).collect();
            values.sort_unstable();
            let expected = if user == "hot" { 60 } else { 10 };
            assert_eq!(values, (0..expected).collect::<Vec<_>>(), "{user}");
            // No two within the key's interval.
            for pair in events.windows(2) {
                assert!(pair[1].1 - pair[0].1 >= 100, "{user}: {pair:?}");
            }
            // Put off, not waited for: all but the first came back.
            assert!(events[1..].iter().all(|e| e.2), "{user}");
        }
        let hot = of(&log, "hot");
        let in_five_seconds = hot.iter().filter(|e| e.1 < 5_000).count() as u64;
        assert!(within_5_percent(in_five_seconds, 50), "{in_five_seconds}");
        assert_eq!(ready(&broker, "events").await, 0);
    })
    .await;
}
