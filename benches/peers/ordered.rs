//! Scenario 10: ordered consumption against the unpartitioned queue. One
//! publisher, manual acks (each delivery acked by its handler), 1,000 keys
//! (a header): a plain queue with one consumer (the baseline: everything in
//! order, one at a time), a partitioned queue of 4 partitions with one
//! consumer each (single active consumers), and one queue consumed by a
//! key-ordered consumer of 4 workers.

use postbox::Failure;
use postbox_actors::partition::PartitionKey;
use postbox_actors::{
    Broker, ConsumeOptions, Delivery, Envelope, KeyOrdered, PartitionOptions, QueueOptions,
};

use crate::Config;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Done, leak, payload, throughput, timed, trials};

pub const S10: &str = "10 ordered consumption, 1,000 keys, manual ack";
pub const PLAIN: &str = "postbox queue, 1 consumer (prefetch 256)";
pub const PARTITIONED: &str = "postbox 4 partitions, 1 consumer each (prefetch 256)";
pub const KEY_ORDERED: &str = "postbox KeyOrdered, 4 workers (prefetch 256)";

const KEYS: u64 = 1_000;

pub async fn scenario10(cfg: &Config, report: &mut Report) {
    println!("\n== {S10}");
    let n = cfg.count(500_000, 20_000);
    if cfg.wants(PLAIN) {
        let rate = trials(cfg.reps, || run(n, Shape::Plain)).await;
        report.push(Row::new(S10, PLAIN).trials(rate));
    }
    if cfg.wants(PARTITIONED) {
        let rate = trials(cfg.reps, || run(n, Shape::Partitioned)).await;
        report.push(
            Row::new(S10, PARTITIONED)
                .trials(rate)
                .vs(PLAIN, Metric::Throughput),
        );
    }
    if cfg.wants(KEY_ORDERED) {
        let rate = trials(cfg.reps, || run(n, Shape::KeyOrdered)).await;
        report.push(
            Row::new(S10, KEY_ORDERED)
                .trials(rate)
                .vs(PLAIN, Metric::Throughput),
        );
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Plain,
    Partitioned,
    KeyOrdered,
}

async fn run(n: u64, shape: Shape) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let done = leak(Done::new());
    let handler = move || {
        move |d: Delivery| async move {
            d.ack().await?;
            done.hit(1);
            Ok::<(), Failure>(())
        }
    };
    let options = ConsumeOptions::manual(256);
    let key = PartitionKey::Header("key".into());
    let keys: Vec<String> = (0..KEYS).map(|k| format!("key-{k}")).collect();
    let p = payload();
    let message =
        |i: u64| Envelope::new(p.clone()).with_header("key", keys[(i % KEYS) as usize].clone());
    let rate = match shape {
        Shape::Plain | Shape::KeyOrdered => {
            let queue = broker
                .declare_queue("bench", QueueOptions::default())
                .await
                .expect("declare the queue");
            if let Shape::Plain = shape {
                broker
                    .consume("bench", options, handler)
                    .await
                    .expect("consume");
            } else {
                let factory = KeyOrdered::new(4, key, handler);
                broker
                    .consume("bench", options, factory)
                    .await
                    .expect("consume");
            }
            throughput(n / 10, n, 1, |k| {
                let (queue, message) = (&queue, &message);
                timed(async move {
                    done.arm(k);
                    for i in 0..k {
                        queue.publish(message(i)).await.expect("publish");
                    }
                    done.wait().await;
                })
            })
            .await
        }
        Shape::Partitioned => {
            let events = broker
                .declare_partitioned("bench", PartitionOptions::new(4).key(key))
                .await
                .expect("declare the partitions");
            events
                .consume(&broker, options, handler)
                .await
                .expect("consume");
            throughput(n / 10, n, 1, |k| {
                let (events, message) = (&events, &message);
                timed(async move {
                    done.arm(k);
                    for i in 0..k {
                        events.publish(message(i)).await.expect("publish");
                    }
                    done.wait().await;
                })
            })
            .await
        }
    };
    rt.shutdown();
    rate
}
