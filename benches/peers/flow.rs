//! Scenario 11: flow control and monitoring, each against a plain queue of
//! scenario 1's shape (one publisher, one auto-ack consumer):
//! - a priority queue (maximum 10, priorities 0 to 9 in turn);
//! - the same plain queue with a monitor sampling every second and a
//!   Prometheus recorder installed (the cost of metrics);
//! - `block` overflow (limit 1,000) with a consumer ten times slower than
//!   the publisher (manual acks, prefetch 100): the publisher's share of
//!   time spent waiting, and the resident memory it adds, against the same
//!   queue with no limit, whose backlog grows instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postbox::Failure;
use postbox_actors::monitor::{MonitorOptions, prometheus};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, Overflow, QueueOptions};

use crate::Config;
use crate::p2p::{Ack, consume};
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Done, leak, live_rss, payload, throughput, timed, trials};

pub const S11: &str = "11 flow control and monitoring, 1→1";
pub const PLAIN: &str = "postbox queue";
pub const PRIORITY: &str = "postbox priority queue (max 10, priorities 0-9)";
pub const MONITORED: &str = "postbox queue, monitor (1 s) + Prometheus recorder";
pub const BLOCK: &str = "postbox block (max 1,000), consumer 10x slower, prefetch 100";
pub const UNBOUNDED: &str = "postbox no limit, consumer 10x slower, prefetch 100";

pub async fn scenario11(cfg: &Config, report: &mut Report) {
    println!("\n== {S11}");
    let n = cfg.count(1_000_000, 40_000);
    if cfg.wants(PLAIN) {
        let rate = trials(cfg.reps, || queue(n, Shape::Plain)).await;
        report.push(Row::new(S11, PLAIN).trials(rate).note("scenario 1's shape"));
    }
    if cfg.wants(PRIORITY) {
        let rate = trials(cfg.reps, || queue(n, Shape::Priority)).await;
        report.push(
            Row::new(S11, PRIORITY)
                .trials(rate)
                .vs(PLAIN, Metric::Throughput),
        );
    }
    let slow = cfg.count(200_000, 20_000);
    for (system, limit) in [(BLOCK, Some(1_000)), (UNBOUNDED, None)] {
        if cfg.wants(system) {
            let run = slow_consumer(slow, limit).await;
            let per_message = run.rss_growth as f64 / slow as f64;
            report.push(
                Row::new(S11, system)
                    .rate(run.rate)
                    .bytes(per_message)
                    .note(format!(
                        "publisher waited {:.0}% of the time; +{:.1} MiB resident for {} messages",
                        run.waiting * 100.0,
                        run.rss_growth as f64 / (1024.0 * 1024.0),
                        slow
                    )),
            );
        }
    }
    // Last: the recorder stays installed for the rest of the process.
    if cfg.wants(MONITORED) {
        if let Err(err) = prometheus::install() {
            println!("  (a metrics recorder was installed already: {err})");
        }
        let rate = trials(cfg.reps, || queue(n, Shape::Monitored)).await;
        report.push(
            Row::new(S11, MONITORED)
                .trials(rate)
                .vs(PLAIN, Metric::Throughput),
        );
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Plain,
    Priority,
    Monitored,
}

async fn queue(n: u64, shape: Shape) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let options = match shape {
        Shape::Priority => QueueOptions::default().max_priority(10),
        Shape::Plain | Shape::Monitored => QueueOptions::default(),
    };
    let queue = broker
        .declare_queue("bench", options)
        .await
        .expect("declare the queue");
    let monitor = matches!(shape, Shape::Monitored)
        .then(|| broker.monitor(MonitorOptions::default().interval(Duration::from_secs(1))));
    let done = leak(Done::new());
    consume(&broker, "bench", 1, ConsumeOptions::auto(), Ack::Auto, done).await;
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (queue, p) = (&queue, &p);
        timed(async move {
            done.arm(k);
            for i in 0..k {
                let m = Envelope::new(p.clone());
                let m = match shape {
                    Shape::Priority => m.with_priority((i % 10) as u8),
                    _ => m,
                };
                queue.publish(m).await.expect("publish");
            }
            done.wait().await;
        })
    })
    .await;
    drop(monitor);
    rt.shutdown();
    rate
}

struct SlowRun {
    /// Messages per second (the consumer's pace).
    rate: f64,
    /// The publisher's share of the round spent inside `publish`.
    waiting: f64,
    /// Resident memory added by the round (peak sampled during it).
    rss_growth: u64,
}

/// One publisher, one consumer (manual acks, prefetch 100: what it does not
/// hold stays ready in the queue) that spends about ten times as long per
/// message as the publisher does (a spin, measured first), `n` messages.
async fn slow_consumer(n: u64, limit: Option<usize>) -> SlowRun {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let mut options = QueueOptions::default();
    if let Some(limit) = limit {
        options = options.max_length(limit).overflow(Overflow::Block);
    }
    let queue = broker
        .declare_queue("bench", options)
        .await
        .expect("declare the queue");
    let p = payload();
    // The publisher's cost per message, alone (into a queue nobody reads).
    let probe = broker
        .declare_queue("probe", QueueOptions::default())
        .await
        .expect("declare the probe");
    let started = Instant::now();
    for _ in 0..10_000 {
        probe
            .publish(Envelope::new(p.clone()))
            .await
            .expect("publish");
    }
    let per_publish = started.elapsed() / 10_000;
    broker.delete_queue("probe", Default::default()).await.ok();
    // Ten slices of a tenth each, yielding between them: the consumer
    // shares its thread with the queue (two cores), which must still take
    // publishes while the consumer works.
    let slice = per_publish;
    let done = leak(Done::new());
    broker
        .consume("bench", ConsumeOptions::manual(100), move || {
            move |delivery: Delivery| async move {
                delivery.ack().await?;
                for _ in 0..10 {
                    let until = Instant::now() + slice;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
                done.hit(1);
                Ok::<(), Failure>(())
            }
        })
        .await
        .expect("consume");
    let before = live_rss();
    let peak = leak(std::sync::atomic::AtomicU64::new(before));
    let sampling = leak(AtomicBool::new(true));
    let sampler = std::thread::spawn(move || {
        while sampling.load(Ordering::Relaxed) {
            peak.fetch_max(crate::util::rss_bytes(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    done.arm(n);
    let mut waited = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        queue
            .publish(Envelope::new(p.clone()))
            .await
            .expect("publish");
        waited += t.elapsed();
    }
    done.wait().await;
    let elapsed = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let run = SlowRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        waiting: waited.as_secs_f64() / elapsed.as_secs_f64(),
        rss_growth: peak.load(Ordering::Relaxed).saturating_sub(before),
    };
    rt.shutdown();
    run
}
