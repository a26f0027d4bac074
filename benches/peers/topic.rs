//! Scenario 6: routing through a topic exchange with 10,000 bindings.
//!
//! Ten queues, each with one auto-ack consumer. Binding `i` is
//! `shard<i>.*.events` to queue `i % 10`; message `m` is published with
//! `publish_to` and routing key `shard<m % bindings>.eu.events`, so each
//! message matches exactly one binding (a `*` wildcard included) and every
//! queue gets the same share. The same exchange with 10 bindings is the
//! reference: the ratio shows what 1,000 times more bindings cost.

use std::cell::Cell;

use postbox::Failure;
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, ExchangeOptions, QueueOptions};

use crate::Config;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{FanIn, leak, payload, thousands, throughput, timed, trials};

pub const S6: &str = "6 topic exchange routing";
const QUEUES: usize = 10;

fn system(bindings: usize) -> String {
    format!(
        "postbox publish_to, topic, {} bindings",
        thousands(bindings as u64)
    )
}

pub async fn scenario6(cfg: &Config, report: &mut Report) {
    println!("\n== {S6}");
    let n = cfg.count(500_000, 20_000);
    for bindings in [10, 10_000] {
        if !cfg.wants(&system(bindings)) {
            continue;
        }
        let rate = trials(cfg.reps, || postbox_topic(n, bindings)).await;
        let mut row = Row::new(S6, system(bindings))
            .trials(rate)
            .note("10 queues, 1 consumer each, 1 match per message");
        if bindings != 10 {
            row = row.vs(&system(10), Metric::Throughput);
        }
        report.push(row);
    }
}

async fn postbox_topic(n: u64, bindings: usize) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    broker
        .declare_exchange("events", ExchangeOptions::topic())
        .await
        .expect("declare the exchange");
    let fan = leak(FanIn::new());
    for q in 0..QUEUES {
        let name = format!("shard-queue-{q}");
        broker
            .declare_queue(&name, QueueOptions::default())
            .await
            .expect("declare a queue");
        broker
            .consume(&name, ConsumeOptions::auto(), move || {
                let mut seen = 0u64;
                move |delivery: Delivery| {
                    drop(delivery);
                    seen += 1;
                    fan.seen(seen);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .expect("consume");
    }
    for i in 0..bindings {
        broker
            .bind_queue(
                &format!("shard-queue-{}", i % QUEUES),
                "events",
                &format!("shard{i}.*.events"),
            )
            .await
            .expect("bind");
    }
    let keys: Vec<String> = (0..bindings)
        .map(|i| format!("shard{i}.eu.events"))
        .collect();
    let p = payload();
    let total = Cell::new(0u64);
    // Rounds are multiples of the queue count, so every queue gets k / 10.
    let n = n - n % QUEUES as u64;
    let warmup = n / 10 - (n / 10) % QUEUES as u64;
    let rate = throughput(warmup, n, 1, |k| {
        let (broker, p, keys, total) = (&broker, &p, &keys, &total);
        timed(async move {
            let first = total.get();
            total.set(first + k);
            fan.arm(total.get() / QUEUES as u64, QUEUES as u64);
            for m in first..first + k {
                let key = &keys[(m % keys.len() as u64) as usize];
                let reached = broker
                    .publish_to("events", key, Envelope::new(p.clone()))
                    .await
                    .expect("publish_to");
                debug_assert_eq!(reached, 1);
            }
            fan.wait().await;
        })
    })
    .await;
    rt.shutdown();
    rate
}
