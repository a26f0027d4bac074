//! Consumer pools that grow and shrink (`ConsumerPool`, Spring AMQP's
//! `concurrency = "5-10"`): a backlog adds workers up to the maximum, one
//! step at a time and a cooldown apart, and idle workers are retired down to
//! the minimum; while the pool scales, each key's events are handled in
//! order, each exactly once, across handler errors and panics. All in
//! paused time: the timings asserted are virtual.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::partition::PartitionKey;
use postbox_actors::{
    Broker, ConsumerPool, Delivery, Envelope, PoolError, PoolOptions, PoolWatch, QueueHandle,
    QueueOptions,
};
use tokio::time::Instant;

/// 5 to 10 workers, with the rules sped up: a check every 100 ms, a step
/// up after 2 checks under pressure and 200 ms after the last, a worker
/// retired after 500 ms idle and 500 ms after the last.
fn quick(min: usize, max: usize) -> PoolOptions {
    PoolOptions::new(min, max)
        .unwrap()
        .check_interval(Duration::from_millis(100))
        .consecutive_active_trigger(2)
        .consecutive_idle_trigger(5)
        .start_consumer_min_interval(Duration::from_millis(200))
        .stop_consumer_min_interval(Duration::from_millis(500))
}

/// What the pool reported over time.
#[derive(Debug, Default)]
struct Seen {
    /// Every worker count as it changed, with when (virtual time since
    /// recording started).
    steps: Vec<(Duration, usize)>,
    /// The most retired workers seen still finishing what they held.
    retiring: usize,
}

type Trajectory = Arc<Mutex<Seen>>;

fn record(watch: &PoolWatch) -> Trajectory {
    let log: Trajectory = Arc::new(Mutex::new(Seen {
        steps: vec![(Duration::ZERO, watch.workers())],
        retiring: 0,
    }));
    let start = Instant::now();
    let mut rx = watch.subscribe();
    let out = log.clone();
    // The pool publishes at most one step per check, and this runs between
    // checks: it sees every count.
    tokio::task::spawn_local(async move {
        while rx.changed().await.is_ok() {
            let stats = *rx.borrow_and_update();
            let mut log = out.lock();
            log.retiring = log.retiring.max(stats.retiring);
            if log.steps.last().map(|&(_, w)| w) != Some(stats.workers) {
                log.steps.push((start.elapsed(), stats.workers));
            }
        }
    });
    log
}

fn counts(trajectory: &Trajectory) -> Vec<usize> {
    trajectory.lock().steps.iter().map(|&(_, w)| w).collect()
}

/// How many times the pool went from `min` all the way to `max` and back,
/// one worker per step.
fn cycles(workers: &[usize], min: usize, max: usize) -> usize {
    assert!(
        workers.windows(2).all(|w| w[0].abs_diff(w[1]) == 1),
        "one step at a time: {workers:?}"
    );
    let mut cycles = 0;
    let mut at_max = false;
    for &w in workers {
        if w == max {
            at_max = true;
        } else if w == min && at_max {
            at_max = false;
            cycles += 1;
        }
    }
    cycles
}

/// Waits (virtual time) until `done`, failing past `limit`.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(start.elapsed() < limit, "not done within {limit:?}");
    }
}

/// What the handlers did: each key's events in the order handled, and how
/// many times each event was handled (returned `Ok`) and tried.
#[derive(Default)]
struct Book {
    handled: HashMap<u32, Vec<u32>>,
    done: HashMap<(u32, u32), u32>,
    tries: HashMap<(u32, u32), u32>,
    errors: u32,
    panics: u32,
}

type Shared = Arc<Mutex<Book>>;

/// A boxed consumer closure.
type Handler =
    Box<dyn FnMut(Delivery) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Failure>>>>>;

impl Book {
    fn total(&self) -> usize {
        self.handled.values().map(Vec::len).sum()
    }
}

/// An event `seq` of key `key`, with the key in a header.
fn event(key: u32, seq: u32) -> Envelope {
    Envelope::encode(&(key, seq))
        .unwrap()
        .with_header("key", format!("k{key}"))
}

/// A handler factory: each event takes `work(key, seq)`; on its first try
/// it returns `Err` when `fault(key, seq) == 1` and panics when it is 2.
fn handler(
    book: &Shared,
    work: fn(u32, u32) -> Duration,
    fault: fn(u32, u32) -> u8,
) -> impl Fn() -> Handler + Send + Sync + 'static {
    let book = book.clone();
    move || {
        let book = book.clone();
        Box::new(move |d: Delivery| {
            let book = book.clone();
            Box::pin(async move {
                let (key, seq): (u32, u32) = d.decode()?;
                let tries = {
                    let mut book = book.lock();
                    let tries = book.tries.entry((key, seq)).or_default();
                    *tries += 1;
                    *tries
                };
                tokio::time::sleep(work(key, seq)).await;
                if tries == 1 {
                    match fault(key, seq) {
                        1 => {
                            book.lock().errors += 1;
                            return Err(Failure::msg("declined once"));
                        }
                        2 => {
                            book.lock().panics += 1;
                            panic!("handler panics on {key}/{seq}");
                        }
                        _ => {}
                    }
                }
                {
                    let mut book = book.lock();
                    book.handled.entry(key).or_default().push(seq);
                    *book.done.entry((key, seq)).or_default() += 1;
                }
                d.ack().await?;
                Ok(())
            })
        })
    }
}

/// Each of `keys` keys' events `0..events` handled once, in order; the
/// queue empty, nothing rejected or sent back.
async fn assert_each_once_in_order(book: &Shared, q: &QueueHandle, keys: u32, events: u32) {
    {
        let book = book.lock();
        for key in 0..keys {
            assert_eq!(
                book.handled
                    .get(&key)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                (0..events).collect::<Vec<_>>(),
                "key {key}"
            );
        }
        assert_eq!(book.done.len(), (keys * events) as usize);
        assert!(
            book.done.values().all(|&n| n == 1),
            "an event handled twice"
        );
    }
    let snap = q.snapshot().await.unwrap();
    assert_eq!((snap.stats.ready, snap.stats.unacked), (0, 0));
    assert_eq!(snap.stats.published, u64::from(keys * events));
    assert_eq!(snap.stats.acknowledged, u64::from(keys * events));
    assert_eq!(
        (
            snap.stats.rejected,
            snap.stats.requeued,
            snap.stats.redelivered
        ),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_pool_grows_to_its_maximum_under_a_backlog_and_shrinks_back_when_idle() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let book = Shared::default();
        // No key: every message its own.
        let pool = ConsumerPool::new(
            quick(5, 10),
            handler(&book, |_, _| Duration::from_millis(10), |_, _| 0),
        );
        let watch = pool.watch();
        let options = pool.consume_options();
        let _consumer = broker.consume("jobs", options, pool).await.unwrap();
        assert_eq!(watch.workers(), 5);
        let trajectory = record(&watch);
        // 3,000 jobs of 10 ms: 6 s for 5 workers.
        for n in 0..3_000 {
            q.publish(event(n, 0)).await.unwrap();
        }
        let start = Instant::now();
        until(Duration::from_secs(60), || book.lock().total() == 3_000).await;
        let drained = start.elapsed();
        until(Duration::from_secs(60), || watch.workers() == 5).await;
        // Idle at the minimum: no more steps.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let workers = counts(&trajectory);
        assert_eq!(
            workers,
            [5, 6, 7, 8, 9, 10, 9, 8, 7, 6, 5],
            "one worker per step, up to the maximum and back"
        );
        let stats = watch.stats();
        assert_eq!((stats.scaled_up, stats.scaled_down, stats.peak), (5, 5, 10));
        assert_eq!((stats.min, stats.max, stats.retiring), (5, 10, 0));
        assert_eq!(stats.waiting, 0);
        // Steps up at least the start interval apart, down the stop one.
        let steps = trajectory.lock().steps.clone();
        for pair in steps[1..6].windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_millis(200),
                "{steps:?}"
            );
        }
        for pair in steps[6..].windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_millis(500),
                "{steps:?}"
            );
        }
        // 3.3 s: faster than 5 workers alone (6 s), not faster than 10 (3 s).
        assert!(
            drained > Duration::from_secs(3) && drained < Duration::from_secs(4),
            "drained in {drained:?}"
        );
        assert!(book.lock().done.values().all(|&n| n == 1));
        let snap = q.snapshot().await.unwrap();
        assert_eq!((snap.stats.ready, snap.stats.unacked), (0, 0));
        assert_eq!(snap.consumers.len(), 1, "one registration throughout");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_default_rules_step_up_every_10_s_and_down_every_60_s() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let book = Shared::default();
        let options: PoolOptions = "5-10".parse().unwrap();
        assert_eq!(options.idle_time(), Duration::from_secs(10));
        let pool = ConsumerPool::new(
            options,
            handler(&book, |_, _| Duration::from_millis(100), |_, _| 0),
        );
        let watch = pool.watch();
        let consume = pool.consume_options();
        let _consumer = broker.consume("jobs", consume, pool).await.unwrap();
        let trajectory = record(&watch);
        for n in 0..5_000 {
            q.publish(event(n, 0)).await.unwrap();
        }
        until(Duration::from_secs(600), || {
            book.lock().total() == 5_000 && watch.workers() == 5
        })
        .await;
        let steps = trajectory.lock().steps.clone();
        let workers: Vec<usize> = steps.iter().map(|&(_, w)| w).collect();
        assert_eq!(workers, [5, 6, 7, 8, 9, 10, 9, 8, 7, 6, 5], "{steps:?}");
        // The first step after 3 checks (3 s) of backlog; then 10 s apart.
        assert_eq!(steps[1].0, Duration::from_secs(3), "{steps:?}");
        for pair in steps[1..6].windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(10), "{steps:?}");
        }
        // Down 60 s apart, the first once a worker has been idle for 10 s.
        for pair in steps[6..].windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(60), "{steps:?}");
        }
        assert!(book.lock().done.values().all(|&n| n == 1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_message_that_waits_too_long_adds_a_worker_without_a_backlog() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("slow", QueueOptions::default())
            .await
            .unwrap();
        let book = Shared::default();
        // A prefetch of 1 per worker, and 10 s jobs: 3 jobs are never a
        // backlog (10 per worker), but the third waits.
        let options = quick(1, 2).prefetch_per_worker(1);
        let pool = ConsumerPool::new(
            options,
            handler(&book, |_, _| Duration::from_secs(10), |_, _| 0),
        );
        let watch = pool.watch();
        let consume = pool.consume_options();
        let _consumer = broker.consume("slow", consume, pool).await.unwrap();
        let start = Instant::now();
        for n in 0..3 {
            q.publish(event(n, 0)).await.unwrap();
        }
        until(Duration::from_secs(60), || watch.workers() == 2).await;
        let grew = start.elapsed();
        // After 5 s (the default `max_wait`) and 2 checks.
        assert!(
            grew > Duration::from_secs(5) && grew < Duration::from_secs(6),
            "{grew:?}"
        );
        assert!(watch.stats().oldest_wait > Some(Duration::from_secs(5)));
        until(Duration::from_secs(60), || book.lock().total() == 3).await;
        // The first worker runs jobs 0 then 1 (held behind it); job 2, in
        // the queue until job 0 is acked, runs beside job 1 on the new
        // worker: 20 s rather than 30.
        let took = start.elapsed();
        assert!(took < Duration::from_secs(21), "{took:?}");
        assert_eq!(watch.stats().scaled_up, 1);
    })
    .await;
}

/// Publishes `keys` keys × `events` events, round by round (event `seq` of
/// every key), pausing after the rounds `pause` says: bursts that make the
/// pool grow and lulls that let it shrink, while events keep coming.
async fn publish_in_waves(q: &QueueHandle, keys: u32, events: u32, pause: fn(u32) -> Duration) {
    for seq in 0..events {
        for key in 0..keys {
            q.publish(event(key, seq)).await.unwrap();
        }
        tokio::time::sleep(pause(seq)).await;
    }
}

/// Work of 1 to 10 ms, varying by event: workers overtake each other.
fn varied(key: u32, seq: u32) -> Duration {
    Duration::from_millis(u64::from((key * 7 + seq * 13) % 10 + 1))
}

/// Bursts of 20 rounds, then 20 rounds 400 ms apart (a light load, at
/// which the pool shrinks).
fn waves(seq: u32) -> Duration {
    if (seq / 20).is_multiple_of(2) {
        Duration::ZERO
    } else {
        Duration::from_millis(400)
    }
}

#[tokio::test(start_paused = true)]
async fn keys_keep_their_order_while_the_pool_grows_and_shrinks() {
    local(async {
        const KEYS: u32 = 100;
        const EVENTS: u32 = 100;
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("events", QueueOptions::default())
            .await
            .unwrap();
        let book = Shared::default();
        let pool = ConsumerPool::new(quick(5, 10), handler(&book, varied, |_, _| 0))
            .key(PartitionKey::Header("key".into()));
        let watch = pool.watch();
        let consume = pool.consume_options();
        let _consumer = broker.consume("events", consume, pool).await.unwrap();
        let trajectory = record(&watch);
        publish_in_waves(&q, KEYS, EVENTS, waves).await;
        until(Duration::from_secs(600), || {
            book.lock().total() == (KEYS * EVENTS) as usize
        })
        .await;
        until(Duration::from_secs(60), || watch.workers() == 5).await;
        assert_each_once_in_order(&book, &q, KEYS, EVENTS).await;
        // Each burst took the pool to 10 workers, each lull back to 5
        // (three times here), with events handled across every step.
        let workers = counts(&trajectory);
        assert!(cycles(&workers, 5, 10) >= 2, "{workers:?}");
        let stats = watch.stats();
        assert_eq!(stats.scaled_up, stats.scaled_down);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn handler_errors_and_panics_while_the_pool_scales_keep_order_and_lose_nothing() {
    local(async {
        const KEYS: u32 = 100;
        const EVENTS: u32 = 100;
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("events", QueueOptions::default())
            .await
            .unwrap();
        let book = Shared::default();
        // 5% of events fail their first try, 3% panic on it: retried in
        // place, behind nothing of their key.
        let fault = |key: u32, seq: u32| match (key * 31 + seq * 17) % 100 {
            0..5 => 1,
            5..8 => 2,
            _ => 0,
        };
        let pool = ConsumerPool::new(quick(5, 10), handler(&book, varied, fault))
            .key(PartitionKey::Header("key".into()))
            .attempts(3, Duration::from_millis(5));
        let watch = pool.watch();
        let consume = pool.consume_options();
        let consumer = broker.consume("events", consume, pool).await.unwrap();
        let trajectory = record(&watch);
        publish_in_waves(&q, KEYS, EVENTS, waves).await;
        until(Duration::from_secs(600), || {
            book.lock().total() == (KEYS * EVENTS) as usize
        })
        .await;
        until(Duration::from_secs(60), || watch.workers() == 5).await;
        assert_each_once_in_order(&book, &q, KEYS, EVENTS).await;
        {
            let book = book.lock();
            assert!(
                book.errors > 100 && book.panics > 100,
                "{} errors, {} panics",
                book.errors,
                book.panics
            );
            let retried = book.tries.values().filter(|&&t| t == 2).count();
            assert_eq!(retried, (book.errors + book.panics) as usize);
        }
        // Panics were caught by the pool: the consumer never crashed.
        assert_eq!(consumer.report().crashes, 0);
        let workers = counts(&trajectory);
        assert!(cycles(&workers, 5, 10) >= 2, "{workers:?}");
    })
    .await;
}

#[test]
fn bad_sizes_are_typed_errors() {
    assert_eq!(
        PoolOptions::new(10, 5).unwrap_err(),
        PoolError::MinAboveMax { min: 10, max: 5 }
    );
    assert_eq!(
        PoolOptions::new(5, 0).unwrap_err(),
        PoolError::NoWorkers { min: 5, max: 0 }
    );
    assert_eq!(
        PoolOptions::new(0, 4).unwrap_err(),
        PoolError::NoWorkers { min: 0, max: 4 }
    );
    let err = "5-ten".parse::<PoolOptions>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad consumer pool concurrency \"5-ten\": expected \"N\" or \"MIN-MAX\""
    );
    assert_eq!(
        PoolOptions::new(10, 5).unwrap_err().to_string(),
        "a consumer pool's minimum (10) is above its maximum (5)"
    );
    // "N" is a fixed pool: it never grows.
    let fixed: PoolOptions = "3".parse().unwrap();
    assert_eq!((fixed.min(), fixed.max()), (3, 3));
}

/// A job for the retirement test: key, number, and how long it takes.
fn job(key: &str, seq: u32, ms: u64) -> Envelope {
    Envelope::encode(&(key, seq, ms))
        .unwrap()
        .with_header("key", key)
}

/// A retired worker that still holds a key's delivery takes no new key,
/// gets that key's next delivery (which must not overtake the one it
/// holds), finishes both and ends. Every time below is virtual and exact:
/// the pool checks at 100 ms, 200 ms... after the first delivery.
#[tokio::test(start_paused = true)]
async fn a_retired_worker_finishes_its_keys_in_order_and_takes_no_new_key() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let q = broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        // (key, seq) → (started, ended), in ms since the first publish.
        type Log = Arc<Mutex<HashMap<(String, u32), (u64, u64)>>>;
        let log: Log = Arc::default();
        let t0 = Instant::now();
        let handler = {
            let log = log.clone();
            move || {
                let log = log.clone();
                move |d: Delivery| {
                    let log = log.clone();
                    async move {
                        let (key, seq, ms): (String, u32, u64) = d.decode()?;
                        let started = t0.elapsed().as_millis() as u64;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let ended = t0.elapsed().as_millis() as u64;
                        log.lock().insert((key, seq), (started, ended));
                        d.ack().await?;
                        Ok::<(), Failure>(())
                    }
                }
            }
        };
        // Steps as soon as a check allows: up when a message waited over
        // 50 ms, down after a check with a worker's worth of idleness.
        let options = PoolOptions::new(1, 2)
            .unwrap()
            .check_interval(Duration::from_millis(100))
            .consecutive_active_trigger(1)
            .consecutive_idle_trigger(1)
            .start_consumer_min_interval(Duration::ZERO)
            .stop_consumer_min_interval(Duration::ZERO)
            .backlog_per_worker(1_000)
            .max_wait(Duration::from_millis(50))
            .prefetch_per_worker(3);
        let pool = ConsumerPool::new(options, handler).key(PartitionKey::Header("key".into()));
        let watch = pool.watch();
        let consume = pool.consume_options();
        let _consumer = broker.consume("jobs", consume, pool).await.unwrap();
        let at = |ms: u64| tokio::time::sleep_until(t0 + Duration::from_millis(ms));
        // One worker: p0 p1 p2 q0, 310 ms each; q0 waits behind key p.
        for seq in 0..3 {
            q.publish(job("p", seq, 310)).await.unwrap();
        }
        q.publish(job("q", 0, 310)).await.unwrap();
        at(150).await;
        // At 100 ms q0 had waited too long: a second worker, which takes r0.
        assert_eq!(watch.workers(), 2);
        q.publish(job("r", 0, 1_090)).await.unwrap();
        // Both workers end at 1,240 ms; idle 55 ms each, they take a0 (on
        // the first) and c0 (on the second).
        at(1_295).await;
        q.publish(job("a", 0, 1_000)).await.unwrap();
        q.publish(job("c", 0, 100)).await.unwrap();
        at(1_350).await;
        // At 1,300 ms, 110 ms of idleness in 100: one worker retired, the
        // first, holding a0.
        let stats = watch.stats();
        assert_eq!(
            (stats.workers, stats.retiring, stats.scaled_down),
            (1, 1, 1),
            "{stats:?}"
        );
        // e0, a new key, goes to the active worker (the retiring one holds
        // as much); a1 follows a0 on the retiring worker.
        q.publish(job("e", 0, 100)).await.unwrap();
        q.publish(job("a", 1, 100)).await.unwrap();
        at(2_450).await;
        let log = log.lock().clone();
        let run = |key: &str, seq: u32| log[&(key.to_string(), seq)];
        assert_eq!(run("q", 0), (930, 1_240));
        assert_eq!(run("r", 0), (150, 1_240));
        assert_eq!(run("a", 0), (1_295, 2_295));
        assert_eq!(run("c", 0), (1_295, 1_395));
        assert_eq!(run("e", 0), (1_395, 1_495), "behind c0, not a0");
        assert_eq!(run("a", 1), (2_295, 2_395), "after a0, on its worker");
        // The retired worker ended once it had handled a1.
        let stats = watch.stats();
        assert_eq!((stats.workers, stats.retiring), (1, 0), "{stats:?}");
        let snap = q.snapshot().await.unwrap();
        assert_eq!((snap.stats.ready, snap.stats.unacked), (0, 0));
        assert_eq!(snap.stats.acknowledged, 9);
    })
    .await;
}

/// A backlog that waits in front of a full `block` queue counts: the queue
/// holds only its bound (4) and the pool its prefetch (4), yet 200 jobs are
/// waiting, and the pool grows to its maximum. (Counting only what the
/// queue and the pool hold, it stopped at 2 workers of 4.)
#[tokio::test(start_paused = true)]
async fn publishes_waiting_for_a_full_block_queue_count_as_backlog() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let bounded = QueueOptions::default()
            .max_length(4)
            .overflow(postbox_actors::Overflow::Block);
        let q = broker.declare_queue("jobs", bounded).await.unwrap();
        let book = Shared::default();
        let options = quick(1, 4)
            .backlog_per_worker(4)
            .prefetch_per_worker(1)
            .max_wait(Duration::from_secs(3_600));
        let pool = ConsumerPool::new(
            options,
            handler(&book, |_, _| Duration::from_millis(100), |_, _| 0),
        );
        let watch = pool.watch();
        let consume = pool.consume_options();
        let _consumer = broker.consume("jobs", consume, pool).await.unwrap();
        let trajectory = record(&watch);
        let publisher = {
            let q = q.clone();
            tokio::task::spawn_local(async move {
                for n in 0..200 {
                    q.publish(event(n, 0)).await.unwrap();
                }
            })
        };
        until(Duration::from_secs(60), || book.lock().total() == 200).await;
        publisher.await.unwrap();
        assert_eq!(watch.stats().peak, 4, "{:?}", trajectory.lock().steps);
        assert_each_once_in_order(&book, &q, 200, 1).await;
    })
    .await;
}
