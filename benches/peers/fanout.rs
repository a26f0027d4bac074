//! Scenario 3: fan-out, one producer to 10 subscribers; each message must reach
//! every subscriber. `msgs/s` counts published messages (each is delivered 10
//! times).
//!
//! postbox: a fanout exchange and 10 `Broker::subscribe` subscriptions
//! (auto-ack), published to with `publish_to`; and a stream (one shared log,
//! block overflow with 1024 records retained, so the producer is paced by the
//! slowest subscriber as broadcast's is) with 10 subscribers starting at
//! `StreamStart::Next`, published to with `StreamHandle::publish`; and the same
//! stream bound to a fanout exchange, published to with `publish_to` (what
//! routing adds to the stream's fan-out). Baseline: a
//! `tokio::sync::broadcast` channel of capacity 1024 with 10 receiver tasks.
//! broadcast never makes its sender wait (a slow receiver loses messages
//! instead), so the producer is paced by the slowest receiver: it waits while
//! more than 1024 − 128 messages are unread by someone. No receiver ever lags.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use postbox::Failure;
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, ExchangeOptions};
use postbox_actors::{StreamDelivery, StreamOptions, StreamStart, SubscribeOptions};
use tokio::sync::{Notify, broadcast};

use crate::Config;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{FanIn, leak, payload, throughput, timed, trials, worker_runtime};

pub const S3: &str = "3 fan-out 1→10";
pub const BROADCAST: &str = "tokio broadcast(1024)";
pub const POSTBOX_FANOUT: &str = "postbox fanout exchange, publish_to";
pub const POSTBOX_STREAM: &str = "postbox stream, publish";
pub const POSTBOX_EXCHANGE_STREAM: &str = "postbox fanout exchange → stream, publish_to";
pub const SUBSCRIBERS: usize = 10;

const CAPACITY: usize = 1024;

pub async fn scenario3(cfg: &Config, report: &mut Report) {
    println!("\n== {S3}");
    let n = cfg.count(200_000, 10_000);
    if cfg.wants(BROADCAST) {
        let rate = trials(cfg.reps, || tokio_broadcast(n)).await;
        report.push(
            Row::new(S3, BROADCAST)
                .trials(rate)
                .note("paced by the slowest receiver, never lags"),
        );
    }
    if cfg.wants(POSTBOX_FANOUT) {
        let rate = trials(cfg.reps, || postbox_fanout(n)).await;
        report.push(
            Row::new(S3, POSTBOX_FANOUT)
                .trials(rate)
                .vs(BROADCAST, Metric::Throughput)
                .note("10 subscriptions, auto-ack"),
        );
    }
    if cfg.wants(POSTBOX_STREAM) {
        let rate = trials(cfg.reps, || postbox_stream(n)).await;
        report.push(
            Row::new(S3, POSTBOX_STREAM)
                .trials(rate)
                .vs(BROADCAST, Metric::Throughput)
                .note("one shared log of 1024, block overflow, 10 subscribers"),
        );
    }
    if cfg.wants(POSTBOX_EXCHANGE_STREAM) {
        let rate = trials(cfg.reps, || postbox_exchange_stream(n)).await;
        report.push(
            Row::new(S3, POSTBOX_EXCHANGE_STREAM)
                .trials(rate)
                .vs(BROADCAST, Metric::Throughput)
                .note("the same stream, bound to a fanout exchange"),
        );
    }
}

/// How far each broadcast receiver has read, for pacing the sender.
struct Pace {
    read: Vec<Padded>,
    notify: Notify,
}

#[repr(align(128))]
struct Padded(AtomicU64);

/// Receivers publish their progress every this many messages.
const PACE_STEP: u64 = 64;

impl Pace {
    fn min_read(&self) -> u64 {
        self.read
            .iter()
            .map(|r| r.0.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }
}

async fn tokio_broadcast(n: u64) -> f64 {
    let workers = worker_runtime();
    let (tx, _) = broadcast::channel::<Bytes>(CAPACITY);
    let fan = leak(FanIn::new());
    let pace = leak(Pace {
        read: (0..SUBSCRIBERS)
            .map(|_| Padded(AtomicU64::new(0)))
            .collect(),
        notify: Notify::new(),
    });
    let mut receivers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut rx = tx.subscribe();
        receivers.push(workers.spawn(async move {
            let mut seen = 0u64;
            loop {
                match rx.recv().await {
                    Ok(message) => {
                        drop(message);
                        seen += 1;
                        if seen.is_multiple_of(PACE_STEP) {
                            pace.read[i].0.store(seen, Ordering::Release);
                            pace.notify.notify_one();
                        }
                        fan.seen(seen);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        panic!("broadcast receiver lagged by {k}: pacing is broken")
                    }
                }
            }
        }));
    }
    let p = payload();
    let window = (CAPACITY as u64) - 2 * PACE_STEP;
    let total = Cell::new(0u64);
    let rate = throughput(n / 10, n, 1, |k| {
        let (tx, p, total) = (&tx, &p, &total);
        timed(async move {
            let mut sent = total.get();
            fan.arm(sent + k, SUBSCRIBERS as u64);
            let mut slowest = pace.min_read();
            for _ in 0..k {
                while sent - slowest >= window {
                    slowest = pace.min_read();
                    if sent - slowest >= window {
                        pace.notify.notified().await;
                    }
                }
                tx.send(p.clone()).expect("receivers are subscribed");
                sent += 1;
            }
            total.set(sent);
            fan.wait().await;
        })
    })
    .await;
    drop(tx);
    for r in receivers {
        r.await.expect("receiver task");
    }
    workers.shutdown_background();
    rate
}

async fn postbox_fanout(n: u64) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    broker
        .declare_exchange("fan", ExchangeOptions::fanout())
        .await
        .expect("declare the exchange");
    let fan = leak(FanIn::new());
    let mut subscriptions = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let subscription = broker
            .subscribe("fan", "", ConsumeOptions::auto(), move || {
                let mut seen = 0u64;
                move |delivery: Delivery| {
                    drop(delivery);
                    seen += 1;
                    fan.seen(seen);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .expect("subscribe");
        subscriptions.push(subscription);
    }
    let p = payload();
    let total = Cell::new(0u64);
    let rate = throughput(n / 10, n, 1, |k| {
        let (broker, p, total) = (&broker, &p, &total);
        timed(async move {
            total.set(total.get() + k);
            fan.arm(total.get(), SUBSCRIBERS as u64);
            for _ in 0..k {
                let reached = broker
                    .publish_to("fan", "", Envelope::new(p.clone()))
                    .await
                    .expect("publish_to");
                debug_assert_eq!(reached, SUBSCRIBERS);
            }
            fan.wait().await;
        })
    })
    .await;
    drop(subscriptions);
    rt.shutdown();
    rate
}

async fn postbox_stream(n: u64) -> f64 {
    stream_with(n, false).await
}

async fn postbox_exchange_stream(n: u64) -> f64 {
    stream_with(n, true).await
}

/// One stream with 10 subscribers, published to directly or, `through_exchange`,
/// through a fanout exchange it is bound to.
async fn stream_with(n: u64, through_exchange: bool) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let stream = broker
        .declare_stream("fan", StreamOptions::default().max_len(CAPACITY))
        .await
        .expect("declare the stream");
    if through_exchange {
        broker
            .declare_exchange("fan", ExchangeOptions::fanout())
            .await
            .expect("declare the exchange");
        broker
            .bind_stream("fan", "fan", "")
            .await
            .expect("bind the stream");
    }
    let fan = leak(FanIn::new());
    let mut subscriptions = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let subscription = stream
            .subscribe(StreamStart::Next, SubscribeOptions::default(), move || {
                let mut seen = 0u64;
                move |delivery: StreamDelivery| {
                    drop(delivery);
                    seen += 1;
                    fan.seen(seen);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .expect("subscribe");
        subscriptions.push(subscription);
    }
    let p = payload();
    let total = Cell::new(0u64);
    let rate = throughput(n / 10, n, 1, |k| {
        let (broker, stream, p, total) = (&broker, &stream, &p, &total);
        timed(async move {
            total.set(total.get() + k);
            fan.arm(total.get(), SUBSCRIBERS as u64);
            for _ in 0..k {
                if through_exchange {
                    let reached = broker
                        .publish_to("fan", "", Envelope::new(p.clone()))
                        .await
                        .expect("publish_to");
                    debug_assert_eq!(reached, 1);
                } else {
                    stream
                        .publish(Envelope::new(p.clone()))
                        .await
                        .expect("publish");
                }
            }
            fan.wait().await;
        })
    })
    .await;
    drop(subscriptions);
    rt.shutdown();
    rate
}
