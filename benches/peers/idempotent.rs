//! Scenario 9: the consume path with the idempotency layer, against the
//! same consumer without it. Manual acks, prefetch 256, two competing
//! consumers, one publisher (as scenario 2's "ack each" row); every message
//! has a fresh id, so each one is claimed, recorded done and acked by the
//! layer. With `REDIS_URL` set, a row with the Redis store too (one round
//! trip to claim and one to record, per message).

use std::time::Duration;

use postbox::Failure;
use postbox_actors::idempotency::redis::RedisStore;
use postbox_actors::idempotency::{IdempotencyStore, Idempotent, MemoryStore};
use postbox_actors::{Broker, ConsumeOptions, Delivery, LayerExt, MessageId, QueueOptions};

use crate::Config;
use crate::p2p::{Ack, consume, publish};
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Done, leak, payload, throughput, timed, trials};

pub const S9: &str = "9 idempotent consumers, manual ack, prefetch 256, 2 consumers";
pub const PLAIN: &str = "postbox consumer, ack each (no layer)";
pub const MEMORY: &str = "postbox + Idempotent(MemoryStore, 100,000 keys)";
pub const MEMORY_SMALL: &str = "postbox + Idempotent(MemoryStore, 10,000 keys)";
pub const REDIS: &str = "postbox + Idempotent(RedisStore)";

pub async fn scenario9(cfg: &Config, report: &mut Report) {
    println!("\n== {S9}");
    let n = cfg.count(1_000_000, 40_000);
    if cfg.wants(PLAIN) {
        let rate = trials(cfg.reps, || plain(n)).await;
        report.push(Row::new(S9, PLAIN).trials(rate));
    }
    // Full after the warm-up: every new key evicts the oldest. The store's
    // cost is memory latency (a lookup and an eviction in a table larger
    // than the caches), so its size shows.
    for (system, keys) in [(MEMORY, 100_000), (MEMORY_SMALL, 10_000)] {
        if !cfg.wants(system) {
            continue;
        }
        let rate = trials(cfg.reps, || layered(n, MemoryStore::new(keys))).await;
        report.push(
            Row::new(S9, system)
                .trials(rate)
                .vs(PLAIN, Metric::Throughput),
        );
    }
    if cfg.wants(REDIS) {
        redis_row(cfg, report).await;
    }
}

async fn redis_row(cfg: &Config, report: &mut Report) {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        println!("  {REDIS}: skipped, REDIS_URL is not set");
        return;
    };
    // Fewer messages: each costs two round trips to the server.
    let n = cfg.count(100_000, 10_000);
    let failed = std::cell::RefCell::new(None);
    let rate = trials(cfg.reps, || {
        let url = url.clone();
        let failed = &failed;
        async move {
            match RedisStore::connect(&url).await {
                // A fresh prefix per trial; the keys expire a minute later.
                Ok(store) => {
                    let store = store.prefix(format!("postbox:bench:{}:", MessageId::new()));
                    layered(n, store).await
                }
                Err(err) => {
                    *failed.borrow_mut() = Some(err.to_string());
                    0.0
                }
            }
        }
    })
    .await;
    if let Some(err) = failed.into_inner() {
        println!("  {REDIS}: skipped, {err}");
        return;
    }
    report.push(
        Row::new(S9, REDIS)
            .trials(rate)
            .vs(PLAIN, Metric::Throughput)
            .note("a claim and a record per message, each a round trip to Redis on loopback"),
    );
}

async fn plain(n: u64) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let queue = broker
        .declare_queue("bench", QueueOptions::default())
        .await
        .expect("declare the queue");
    let done = leak(Done::new());
    consume(
        &broker,
        "bench",
        2,
        ConsumeOptions::manual(256),
        Ack::Each,
        done,
    )
    .await;
    let rate = round(&queue, done, n).await;
    rt.shutdown();
    rate
}

async fn layered<S: IdempotencyStore>(n: u64, store: S) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let queue = broker
        .declare_queue("bench", QueueOptions::default())
        .await
        .expect("declare the queue");
    let done = leak(Done::new());
    let layer = Idempotent::by_message_id(store)
        .lease(Duration::from_secs(60))
        .retain(Duration::from_secs(60));
    for _ in 0..2 {
        // The layer records each key and acks; the handler only counts.
        let handler = move || {
            move |_delivery: Delivery| {
                done.hit(1);
                async { Ok::<(), Failure>(()) }
            }
        };
        broker
            .consume(
                "bench",
                ConsumeOptions::manual(256),
                handler.layer(layer.clone()),
            )
            .await
            .expect("consume");
    }
    let rate = round(&queue, done, n).await;
    let stats = layer.stats();
    assert_eq!(
        stats.skipped, 0,
        "fresh ids are never duplicates: {stats:?}"
    );
    rt.shutdown();
    rate
}

async fn round(queue: &postbox_actors::QueueHandle, done: &'static Done, n: u64) -> f64 {
    let p = payload();
    throughput(n / 10, n, 1, |k| {
        let p = &p;
        timed(async move {
            done.arm(k);
            publish(queue, p, k, 1).await;
            done.wait().await;
        })
    })
    .await
}
