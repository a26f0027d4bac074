//! Ordering: a queue with a single active consumer (RabbitMQ's
//! `x-single-active-consumer`) delivers to one consumer at a time, standbys
//! take over in registration order, and what the active one held comes
//! first, in order; an exclusive consumer is the only one a queue has.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Backoff, Failure, RuntimeHandle};
use postbox_actors::{Broker, BrokerError, ConsumeOptions, Delivery, QueueOptions};

mod common;
use common::{msg, settle};

/// What each consumer received, by name, in order.
type Log = Arc<Mutex<Vec<(&'static str, u32, bool)>>>;

/// A boxed consumer closure.
type Handler =
    Box<dyn FnMut(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Failure>>>>>;

/// A consumer named `name` that logs each delivery; it acks when `ack(n)`
/// says so, holds the others, and panics on the first delivery of `crash_at`.
fn logger(
    log: &Log,
    name: &'static str,
    ack: fn(u32) -> bool,
    crash_at: Option<u32>,
) -> impl Fn() -> Handler + Send + Sync + 'static {
    let log = log.clone();
    let crashed = Arc::new(AtomicU32::new(0));
    move || {
        let (log, crashed) = (log.clone(), crashed.clone());
        Box::new(move |d: Delivery| {
            let (log, crashed) = (log.clone(), crashed.clone());
            Box::pin(async move {
                let n: u32 = d.decode()?;
                log.lock().push((name, n, d.redelivered()));
                if Some(n) == crash_at && crashed.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("{name} crashes on {n}");
                }
                if ack(n) {
                    d.ack().await?;
                } else {
                    // Held: settled by a crash or a cancel later.
                    std::mem::forget(d);
                }
                Ok(())
            })
        })
    }
}

fn received(log: &Log, name: &str) -> Vec<u32> {
    log.lock()
        .iter()
        .filter(|(c, _, _)| *c == name)
        .map(|(_, n, _)| *n)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_consumer_receives_and_a_standby_takes_over_with_what_it_held_first() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("events", QueueOptions::default().single_active_consumer())
            .await
            .unwrap();
        let log: Log = Arc::default();
        let options = || {
            ConsumeOptions::manual(100)
                .backoff(Backoff::NONE)
                .restarts(0, Duration::from_secs(1))
        };
        // A acks 0..10, holds 10..15, and crashes on 15 (for good: no restarts).
        let a = broker
            .consume("events", options(), logger(&log, "a", |n| n < 10, Some(15)))
            .await
            .unwrap();
        let b = broker
            .consume("events", options(), logger(&log, "b", |_| true, None))
            .await
            .unwrap();
        let _c = broker
            .consume("events", options(), logger(&log, "c", |_| true, None))
            .await
            .unwrap();
        let snap = q.snapshot().await.unwrap();
        let active: Vec<bool> = snap.consumers.iter().map(|c| c.active).collect();
        assert_eq!(active, [true, false, false], "one active, two standing by");
        for n in 0..15 {
            q.publish(msg(n)).await.unwrap();
        }
        settle().await;
        assert_eq!(received(&log, "a"), (0..15).collect::<Vec<_>>());
        assert!(received(&log, "b").is_empty() && received(&log, "c").is_empty());
        // A crashes on 15 while holding 10..15: B takes over and gets
        // them first, in order, then 15 and the rest.
        for n in 15..20 {
            q.publish(msg(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.terminated().await;
        assert_eq!(received(&log, "b"), (10..20).collect::<Vec<_>>());
        let redelivered: Vec<bool> = log
            .lock()
            .iter()
            .filter(|(c, _, _)| *c == "b")
            .map(|(_, _, r)| *r)
            .collect();
        // 15..20 had reached A's mailbox too: all of them come back.
        assert!(redelivered.iter().all(|r| *r), "{redelivered:?}");
        assert!(received(&log, "c").is_empty(), "c still stands by");
        // B is cancelled: C takes over.
        b.cancel().await;
        q.publish(msg(20)).await.unwrap();
        settle().await;
        assert_eq!(received(&log, "c"), [20]);
        let snap = q.snapshot().await.unwrap();
        assert_eq!((snap.stats.ready, snap.stats.unacked), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_active_consumer_keeps_the_queue_until_it_settled_what_it_holds() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("events", QueueOptions::default().single_active_consumer())
            .await
            .unwrap();
        let log: Log = Arc::default();
        let held: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let h = held.clone();
        let a = broker
            .consume("events", ConsumeOptions::manual(10), move || {
                let h = h.clone();
                move |d: Delivery| {
                    h.lock().push(d);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .unwrap();
        let _b = broker
            .consume(
                "events",
                ConsumeOptions::manual(10),
                logger(&log, "b", |_| true, None),
            )
            .await
            .unwrap();
        for n in 0..3 {
            q.publish(msg(n)).await.unwrap();
        }
        settle().await;
        assert_eq!(held.lock().len(), 3);
        assert_eq!(a.cancel().await, 3, "cancelled holding three");
        q.publish(msg(3)).await.unwrap();
        settle().await;
        assert!(received(&log, "b").is_empty(), "b waits: a still settles");
        // A requeues what it held: B gets everything, in order.
        let held: Vec<Delivery> = held.lock().drain(..).collect();
        for d in held {
            let _ = d.nack(true).await;
        }
        settle().await;
        assert_eq!(received(&log, "b"), [0, 1, 2, 3]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_consumer_is_the_only_one_and_survives_its_restarts() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let log: Log = Arc::default();
        let exclusive = ConsumeOptions::manual(10)
            .exclusive()
            .backoff(Backoff::NONE);
        // Crashes on 1 once, and is restarted: still the only consumer.
        let only = broker
            .consume(
                "jobs",
                exclusive.clone(),
                logger(&log, "x", |_| true, Some(1)),
            )
            .await
            .unwrap();
        let refused = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(10),
                logger(&log, "y", |_| true, None),
            )
            .await;
        match refused {
            Err(BrokerError::ExclusiveConsumer { queue, consumers }) => {
                assert_eq!((queue.as_str(), consumers), ("jobs", 1));
            }
            other => panic!("{other:?}"),
        }
        for n in 0..4 {
            q.publish(msg(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            received(&log, "x"),
            [0, 1, 1, 2, 3],
            "1 again after the restart"
        );
        assert_eq!(only.report().restarts, 1);
        assert!(matches!(
            broker
                .consume(
                    "jobs",
                    ConsumeOptions::manual(10),
                    logger(&log, "y", |_| true, None)
                )
                .await,
            Err(BrokerError::ExclusiveConsumer { .. })
        ));
        // basic.get is not a consumer: it still works.
        q.publish(msg(9)).await.unwrap();
        settle().await;
        // Gone: others may consume; but an exclusive one cannot join them.
        only.close().await;
        let _y = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(10),
                logger(&log, "y", |_| true, None),
            )
            .await
            .unwrap();
        assert!(matches!(
            broker
                .consume("jobs", exclusive, logger(&log, "z", |_| true, None))
                .await,
            Err(BrokerError::ExclusiveConsumer { consumers: 1, .. })
        ));
    })
    .await;
}

/// 100 users × 1,000 events from 4 producers (25 users each, so that each
/// user's events have one publish order) through 4 partitions, with an
/// active consumer and a standby on each: handlers requeue 5% of
/// deliveries and crash on 2% (restarting), and every user's events are
/// processed exactly once each, in publish order.
#[tokio::test(start_paused = true)]
async fn per_user_order_through_partitions_across_nacks_and_crashes() {
    local(async {
        use postbox_actors::partition::PartitionKey;
        use postbox_actors::{Envelope, PartitionOptions};
        const USERS: u32 = 100;
        const EVENTS: u32 = 1_000;
        let broker = Broker::new(&RuntimeHandle::local());
        let events = broker
            .declare_partitioned(
                "events",
                PartitionOptions::new(4)
                    .key(PartitionKey::Header("user".into()))
                    .sequence(),
            )
            .await
            .unwrap();
        let processed: Arc<Mutex<Vec<Vec<u32>>>> =
            Arc::new(Mutex::new(vec![Vec::new(); USERS as usize]));
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(17)));
        let factory = {
            let (processed, rng) = (processed.clone(), rng.clone());
            move || {
                let (processed, rng) = (processed.clone(), rng.clone());
                move |d: Delivery| {
                    let (processed, rng) = (processed.clone(), rng.clone());
                    async move {
                        let (user, seq): (u32, u32) = d.decode()?;
                        let roll = rng.lock().u32(0..100);
                        if roll < 5 {
                            d.nack(true).await?;
                            return Ok(());
                        }
                        if roll < 7 {
                            panic!("crash on {user}/{seq}");
                        }
                        // Handling takes a while, more or less: two
                        // consumers of one partition would overtake each other.
                        let work = Duration::from_micros(u64::from(roll) * 20);
                        tokio::time::sleep(work).await;
                        // Numbered per user as published: 1 for event 0.
                        let numbered = d
                            .header(postbox_actors::partition::SEQUENCE_HEADER)
                            .and_then(|v| v.as_int());
                        assert_eq!(numbered, Some(i64::from(seq) + 1), "user {user}");
                        processed.lock()[user as usize].push(seq);
                        d.ack().await?;
                        Ok::<(), Failure>(())
                    }
                }
            }
        };
        // Prefetch 1: a requeued delivery is the next one its partition
        // delivers (with more in flight, those after it would overtake it).
        let options = ConsumeOptions::manual(1).backoff(Backoff::NONE);
        let active = events
            .consume(&broker, options.clone(), factory.clone())
            .await
            .unwrap();
        let standby = events.consume(&broker, options, factory).await.unwrap();
        assert_eq!((active.len(), standby.len()), (4, 4));
        let mut producers = Vec::new();
        for p in 0..4u32 {
            let events = events.clone();
            producers.push(tokio::task::spawn_local(async move {
                // A user's events in bursts of 10, users taking turns.
                for burst in 0..EVENTS / 10 {
                    for user in (p * 25)..(p * 25 + 25) {
                        for seq in burst * 10..burst * 10 + 10 {
                            let event = Envelope::encode(&(user, seq))
                                .unwrap()
                                .with_header("user", format!("user-{user}"));
                            events.publish(event).await.unwrap();
                        }
                    }
                }
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        for _ in 0..6000 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let done: usize = processed.lock().iter().map(Vec::len).sum();
            if done == (USERS * EVENTS) as usize {
                break;
            }
        }
        let processed = processed.lock().clone();
        for (user, seqs) in processed.iter().enumerate() {
            assert_eq!(*seqs, (0..EVENTS).collect::<Vec<_>>(), "user {user}");
        }
        // Each user's events all went to one partition.
        let crashes: u64 = active
            .iter()
            .chain(&standby)
            .map(|c| c.report().crashes)
            .sum();
        assert!(crashes > 0, "the test crashed consumers");
        // Bad input: no key, and no partitions.
        assert!(matches!(
            events.publish(Envelope::new("anonymous")).await,
            Err(BrokerError::NoPartitionKey { .. })
        ));
        assert!(matches!(
            broker
                .declare_partitioned("none", PartitionOptions::new(0))
                .await,
            Err(BrokerError::NoPartitions(_))
        ));
    })
    .await;
}

/// Runs `events` events for each of `keys` keys through one queue consumed
/// by a key-ordered consumer of `workers` workers whose handler takes
/// `work(roll)` and fails when `fails(roll)`; returns what each key
/// handled, in order, and how long it took (virtual time).
async fn key_ordered_run(
    workers: usize,
    keys: u32,
    events: u32,
    work: fn(u32) -> Duration,
    fails: fn(u32) -> bool,
) -> (Vec<Vec<u32>>, Duration) {
    use postbox_actors::partition::PartitionKey;
    use postbox_actors::{Envelope, KeyOrdered};
    let broker = Broker::new(&RuntimeHandle::local());
    let q = broker
        .declare_queue(&format!("work-{workers}"), QueueOptions::default())
        .await
        .unwrap();
    let handled: Arc<Mutex<Vec<Vec<u32>>>> = Arc::new(Mutex::new(vec![Vec::new(); keys as usize]));
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(5)));
    let handler = {
        let (handled, rng) = (handled.clone(), rng.clone());
        move || {
            let (handled, rng) = (handled.clone(), rng.clone());
            move |d: Delivery| {
                let (handled, rng) = (handled.clone(), rng.clone());
                async move {
                    let (key, seq): (u32, u32) = d.decode()?;
                    let roll = rng.lock().u32(0..100);
                    tokio::time::sleep(work(roll)).await;
                    if fails(roll) {
                        return Err(Failure::msg("declined, retried in place"));
                    }
                    handled.lock()[key as usize].push(seq);
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let factory = KeyOrdered::new(workers, PartitionKey::Header("key".into()), handler)
        .attempts(10, Duration::from_millis(1));
    let _c = broker
        .consume(q.name(), ConsumeOptions::manual(64), factory)
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    for seq in 0..events {
        for key in 0..keys {
            let m = Envelope::encode(&(key, seq))
                .unwrap()
                .with_header("key", format!("k{key}"));
            q.publish(m).await.unwrap();
        }
    }
    let total = (keys * events) as usize;
    while handled.lock().iter().map(Vec::len).sum::<usize>() < total {
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(start.elapsed() < Duration::from_secs(3600), "stuck");
    }
    let elapsed = start.elapsed();
    let snap = q.snapshot().await.unwrap();
    assert_eq!((snap.stats.ready, snap.stats.unacked), (0, 0));
    let handled = handled.lock().clone();
    (handled, elapsed)
}

#[tokio::test(start_paused = true)]
async fn key_ordered_consumption_keeps_each_keys_order_across_failures() {
    local(async {
        // 8 keys and a prefetch of 64: each key has several deliveries in
        // flight at once, which workers would overtake if keys were not
        // kept to one worker.
        let (handled, _) = key_ordered_run(
            4,
            8,
            200,
            |roll| Duration::from_micros(u64::from(roll) * 50),
            |roll| roll < 10,
        )
        .await;
        for (key, seqs) in handled.iter().enumerate() {
            assert_eq!(*seqs, (0..200).collect::<Vec<_>>(), "key {key}");
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn key_ordered_consumption_with_n_workers_takes_about_a_nth_of_the_time() {
    local(async {
        let work = |_| Duration::from_millis(10);
        let (_, one) = key_ordered_run(1, 100, 10, work, |_| false).await;
        let (handled, four) = key_ordered_run(4, 100, 10, work, |_| false).await;
        for seqs in &handled {
            assert_eq!(*seqs, (0..10).collect::<Vec<_>>());
        }
        let ratio = four.as_secs_f64() / one.as_secs_f64();
        assert!(
            (0.2..0.35).contains(&ratio),
            "4 workers took {ratio:.2} of 1 worker's time ({four:?} vs {one:?})"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn key_ordered_consumption_of_100_keys_by_1000_events_keeps_every_keys_order() {
    local(async {
        let (handled, _) = key_ordered_run(
            4,
            100,
            1_000,
            |roll| Duration::from_micros(u64::from(roll) * 10),
            |roll| roll < 5,
        )
        .await;
        for (key, seqs) in handled.iter().enumerate() {
            assert_eq!(*seqs, (0..1_000).collect::<Vec<_>>(), "key {key}");
        }
    })
    .await;
}

/// A crashing exclusive consumer's end reaches a busy queue (full mailbox)
/// from a task of its own, and may come after the restarted consumer's new
/// registration: the queue must not count the old one against it.
#[tokio::test(start_paused = true)]
async fn an_exclusive_consumer_restarts_on_a_busy_queue() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("busy", QueueOptions::default().mailbox(1))
            .await
            .unwrap();
        let log: Log = Arc::default();
        let only = broker
            .consume(
                "busy",
                ConsumeOptions::manual(10)
                    .exclusive()
                    .backoff(Backoff::NONE),
                logger(&log, "x", |_| true, Some(0)),
            )
            .await
            .unwrap();
        q.publish(msg(0)).await.unwrap();
        // Keep the queue's mailbox full while the consumer crashes.
        for _ in 0..8 {
            let q = q.clone();
            tokio::task::spawn_local(async move {
                let _ = q.snapshot().await;
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        q.publish(msg(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = only.report();
        assert!(report.running, "still running: {report:?}");
        assert_eq!(received(&log, "x"), [0, 0, 1]);
    })
    .await;
}

/// Durable partitions: persistent events published to a partitioned queue
/// of durable queues are all there after the broker reopens, each user's in
/// one partition, in publish order, and new events of a user go to the
/// same partition as before.
#[tokio::test]
async fn durable_partitions_keep_each_users_events_in_order_across_a_restart() {
    use postbox::Runtime;
    use postbox_actors::partition::PartitionKey;
    use postbox_actors::{AckMode, Envelope, PartitionOptions, StorageOptions};
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let open = || Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    let options = || {
        PartitionOptions::new(4)
            .key(PartitionKey::Header("user".into()))
            .queue(QueueOptions::default().durable())
    };
    let event = |user: u32, n: u32| {
        Envelope::encode(&(user, n))
            .unwrap()
            .with_header("user", format!("user-{user}"))
            .with_persistent(true)
    };
    let mut placed = Vec::new();
    {
        let broker = open();
        let events = broker
            .declare_partitioned("events", options())
            .await
            .unwrap();
        for n in 0..20 {
            for user in 0..10 {
                let p = events.publish(event(user, n)).await.unwrap();
                if n == 0 {
                    placed.push(p);
                }
            }
        }
    }
    let broker = open();
    let events = broker
        .declare_partitioned("events", options())
        .await
        .unwrap();
    for user in 0..10 {
        assert_eq!(
            events.publish(event(user, 20)).await.unwrap(),
            placed[user as usize]
        );
    }
    let mut seen = vec![Vec::new(); 10];
    for p in 0..4 {
        let queue = format!("events.{p}");
        while let Some((d, _)) = broker.get(&queue, AckMode::Auto).await.unwrap() {
            let (user, n): (u32, u32) = d.decode().unwrap();
            assert_eq!(placed[user as usize], p, "user {user} in its partition");
            seen[user as usize].push(n);
        }
    }
    for (user, events) in seen.iter().enumerate() {
        assert_eq!(*events, (0..=20).collect::<Vec<_>>(), "user {user}");
    }
    rt.shutdown();
}

/// Messages published to a queue by name without a routing key carry the
/// queue's name as their key (as through RabbitMQ's default exchange); a
/// key-ordered consumer keyed on the routing key counts that as no key,
/// so they spread over its workers instead of queueing on one.
#[tokio::test(start_paused = true)]
async fn keyless_messages_published_by_name_spread_over_the_workers() {
    use postbox_actors::partition::PartitionKey;
    use postbox_actors::{Envelope, KeyOrdered};
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("keyless", QueueOptions::default())
            .await
            .unwrap();
        let done = Arc::new(AtomicU32::new(0));
        let handler = {
            let done = done.clone();
            move || {
                let done = done.clone();
                move |d: Delivery| {
                    let done = done.clone();
                    async move {
                        assert_eq!(d.routing_key(), "keyless");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        d.ack().await?;
                        done.fetch_add(1, Ordering::Relaxed);
                        Ok::<(), Failure>(())
                    }
                }
            }
        };
        let factory = KeyOrdered::new(4, PartitionKey::RoutingKey, handler);
        let _c = broker
            .consume("keyless", ConsumeOptions::manual(64), factory)
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        for n in 0..40u32 {
            q.publish(Envelope::encode(&n).unwrap()).await.unwrap();
        }
        while done.load(Ordering::Relaxed) < 40 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // One worker would take 400 ms; four take about 100.
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(200), "{elapsed:?}");
    })
    .await;
}
