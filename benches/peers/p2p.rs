//! Scenarios 1 and 2: point-to-point, one producer to one queue.
//!
//! 1. One consumer, auto-ack. Baselines: a bounded `tokio::sync::mpsc` channel
//!    (capacity 1024, like a postbox queue's mailbox) with its receiver in a
//!    task, and a raw actix actor fed with `do_send`. The postbox actor layer
//!    alone (`Addr::send` to an actor) is shown too, to separate the cost of
//!    the actor hop from the cost of the broker.
//! 2. Manual acks, prefetch 256, two competing consumers; compared with
//!    scenario 1.
//!
//! The producer runs on the bench's driver thread in every case (postbox,
//! tokio and actix alike), and consumers on worker threads started afresh for
//! each trial.

use bytes::Bytes;
use postbox::{Actor, Context, Failure, Handler, Message};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueHandle, QueueOptions};
use tokio::sync::mpsc;

use crate::Config;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Done, leak, payload, throughput, timed, trials, worker_runtime};

pub const S1: &str = "1 point-to-point, 1→1, auto-ack";
pub const S2: &str = "2 point-to-point, manual ack, prefetch 256, 2 competing consumers";

pub const TOKIO_MPSC: &str = "tokio mpsc, bounded(1024)";
pub const ACTIX: &str = "actix actor, do_send";
pub const POSTBOX_ACTOR: &str = "postbox actor layer, Addr::send";
pub const POSTBOX_PUBLISH: &str = "postbox publish";
pub const POSTBOX_BATCH: &str = "postbox publish_batch(64)";
pub const S2_EACH: &str = "postbox publish, ack each";
pub const S2_BATCHED: &str = "postbox publish_batch(64), ack_multiple every 64";

/// Capacity of the bounded baselines: the default mailbox of a postbox queue.
const CAPACITY: usize = 1024;
/// Messages per `publish_batch`, and acks per `ack_multiple`.
const BATCH: usize = 64;

pub async fn scenario1(cfg: &Config, report: &mut Report) {
    println!("\n== {S1}");
    let n = cfg.count(1_000_000, 40_000);
    if cfg.wants(TOKIO_MPSC) {
        let rate = trials(cfg.reps, || tokio_mpsc(n)).await;
        report.push(Row::new(S1, TOKIO_MPSC).trials(rate).note("Bytes payload"));
    }
    if cfg.wants(ACTIX) {
        let rate = trials(cfg.reps, || actix_do_send(n)).await;
        report.push(
            Row::new(S1, ACTIX)
                .trials(rate)
                .vs(TOKIO_MPSC, Metric::Throughput)
                .note("unbounded: do_send ignores the mailbox capacity"),
        );
    }
    if cfg.wants(POSTBOX_ACTOR) {
        let rate = trials(cfg.reps, || postbox_actor(n)).await;
        report.push(
            Row::new(S1, POSTBOX_ACTOR)
                .trials(rate)
                .vs(TOKIO_MPSC, Metric::Throughput)
                .note("no broker: one actor, mailbox 1024"),
        );
    }
    if cfg.wants(POSTBOX_PUBLISH) {
        let rate = trials(cfg.reps, || {
            postbox_queue(n, 1, ConsumeOptions::auto(), Ack::Auto, 1)
        })
        .await;
        report.push(
            Row::new(S1, POSTBOX_PUBLISH)
                .trials(rate)
                .vs(TOKIO_MPSC, Metric::Throughput)
                .note("QueueHandle::publish, one Envelope per message"),
        );
    }
    if cfg.wants(POSTBOX_BATCH) {
        let rate = trials(cfg.reps, || {
            postbox_queue(n, 1, ConsumeOptions::auto(), Ack::Auto, BATCH)
        })
        .await;
        report.push(
            Row::new(S1, POSTBOX_BATCH)
                .trials(rate)
                .vs(TOKIO_MPSC, Metric::Throughput)
                .note("batched variant"),
        );
    }
}

pub async fn scenario2(cfg: &Config, report: &mut Report) {
    println!("\n== {S2}");
    let n = cfg.count(1_000_000, 40_000);
    let manual = || ConsumeOptions::manual(256);
    let cases: [(&str, usize, Ack, &str); 4] = [
        (S2_EACH, 1, Ack::Each, POSTBOX_PUBLISH),
        (
            "postbox publish, ack_multiple every 64",
            1,
            Ack::Multiple(BATCH as u64),
            POSTBOX_PUBLISH,
        ),
        (
            "postbox publish_batch(64), ack each",
            BATCH,
            Ack::Each,
            POSTBOX_BATCH,
        ),
        (
            S2_BATCHED,
            BATCH,
            Ack::Multiple(BATCH as u64),
            POSTBOX_BATCH,
        ),
    ];
    for (system, batch, ack, reference) in cases {
        if !cfg.wants(system) {
            continue;
        }
        let rate = trials(cfg.reps, || postbox_queue(n, 2, manual(), ack, batch)).await;
        report.push(
            Row::new(S2, system)
                .trials(rate)
                .vs_in(S1, reference, Metric::Throughput),
        );
    }
}

/// How consumers settle.
#[derive(Clone, Copy, Debug)]
pub enum Ack {
    /// Auto-ack: nothing to do.
    Auto,
    /// `ack()` every delivery.
    Each,
    /// `ack_multiple()` every k-th delivery of each consumer.
    Multiple(u64),
}

async fn tokio_mpsc(n: u64) -> f64 {
    let workers = worker_runtime();
    let done = leak(Done::new());
    let (tx, mut rx) = mpsc::channel::<Bytes>(CAPACITY);
    let consumer = workers.spawn(async move {
        while let Some(message) = rx.recv().await {
            drop(message);
            done.hit(1);
        }
    });
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (tx, p) = (&tx, &p);
        timed(async move {
            done.arm(k);
            for _ in 0..k {
                tx.send(p.clone()).await.expect("the receiver task runs");
            }
            done.wait().await;
        })
    })
    .await;
    drop(tx);
    consumer.await.expect("receiver task");
    workers.shutdown_background();
    rate
}

struct ActixSink {
    done: &'static Done,
}

impl actix::Actor for ActixSink {
    type Context = actix::Context<Self>;
}

struct ActixMessage(#[allow(dead_code)] Bytes);

impl actix::Message for ActixMessage {
    type Result = ();
}

impl actix::Handler<ActixMessage> for ActixSink {
    type Result = ();
    fn handle(&mut self, message: ActixMessage, _: &mut Self::Context) {
        drop(message);
        self.done.hit(1);
    }
}

async fn actix_do_send(n: u64) -> f64 {
    let threads = place::actix_threads();
    let done = leak(Done::new());
    let addr = <ActixSink as actix::Actor>::start_in_arbiter(&threads.arbiters[0], move |_| {
        ActixSink { done }
    });
    let p = payload();
    throughput(n / 10, n, 1, |k| {
        let (addr, p) = (&addr, &p);
        timed(async move {
            done.arm(k);
            for _ in 0..k {
                addr.do_send(ActixMessage(p.clone()));
            }
            done.wait().await;
        })
    })
    .await
}

struct Sink {
    done: &'static Done,
}

impl Actor for Sink {}

struct Push(#[allow(dead_code)] Bytes);

impl Message for Push {
    type Reply = ();
}

impl Handler<Push> for Sink {
    async fn handle(&mut self, message: Push, _: &mut Context<Self>) -> Result<(), Failure> {
        drop(message);
        self.done.hit(1);
        Ok(())
    }
}

pub async fn postbox_actor(n: u64) -> f64 {
    let rt = place::postbox_runtime().await;
    let done = leak(Done::new());
    let addr = rt
        .build(move || Some(Sink { done }))
        .mailbox(CAPACITY)
        .spawn();
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (addr, p) = (&addr, &p);
        timed(async move {
            done.arm(k);
            for _ in 0..k {
                addr.send(Push(p.clone())).await.expect("the sink runs");
            }
            done.wait().await;
        })
    })
    .await;
    rt.shutdown();
    rate
}

/// Starts `consumers` consumers on `queue` that count into `done` and settle
/// as `ack` says.
pub async fn consume(
    broker: &Broker,
    queue: &str,
    consumers: usize,
    options: ConsumeOptions,
    ack: Ack,
    done: &'static Done,
) {
    for _ in 0..consumers {
        let options = options.clone();
        // The handles are dropped: consumers run until the runtime shuts down.
        match ack {
            Ack::Auto => {
                broker
                    .consume(queue, options, move || {
                        move |delivery: Delivery| {
                            drop(delivery);
                            done.hit(1);
                            async { Ok::<(), Failure>(()) }
                        }
                    })
                    .await
                    .expect("consume");
            }
            Ack::Each => {
                broker
                    .consume(queue, options, move || {
                        move |delivery: Delivery| async move {
                            delivery.ack().await?;
                            done.hit(1);
                            Ok::<(), Failure>(())
                        }
                    })
                    .await
                    .expect("consume");
            }
            Ack::Multiple(every) => {
                broker
                    .consume(queue, options, move || {
                        let mut seen = 0u64;
                        move |delivery: Delivery| {
                            seen += 1;
                            let flush = seen.is_multiple_of(every);
                            async move {
                                // Settles this delivery and every earlier one this
                                // consumer holds; at most `every - 1` stay unsettled
                                // at the end of a round, well within the prefetch.
                                if flush {
                                    delivery.ack_multiple().await?;
                                }
                                done.hit(1);
                                Ok::<(), Failure>(())
                            }
                        }
                    })
                    .await
                    .expect("consume");
            }
        }
    }
}

/// Publishes `k` messages to `queue`, one at a time or in batches.
pub async fn publish(queue: &QueueHandle, p: &Bytes, k: u64, batch: usize) {
    if batch <= 1 {
        for _ in 0..k {
            queue
                .publish(Envelope::new(p.clone()))
                .await
                .expect("publish");
        }
        return;
    }
    let mut sent = 0u64;
    while sent < k {
        let m = (batch as u64).min(k - sent);
        let messages = (0..m).map(|_| Envelope::new(p.clone())).collect();
        queue.publish_batch(messages).await.expect("publish_batch");
        sent += m;
    }
}

/// One queue, `consumers` consumers, the publisher on the driver thread.
pub async fn postbox_queue(
    n: u64,
    consumers: usize,
    options: ConsumeOptions,
    ack: Ack,
    batch: usize,
) -> f64 {
    let rt = place::postbox_runtime().await;
    let broker = Broker::new(&rt);
    let queue = broker
        .declare_queue("bench", QueueOptions::default())
        .await
        .expect("declare the queue");
    let done = leak(Done::new());
    consume(&broker, "bench", consumers, options, ack, done).await;
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (queue, p) = (&queue, &p);
        timed(async move {
            done.arm(k);
            publish(queue, p, k, batch).await;
            done.wait().await;
        })
    })
    .await;
    rt.shutdown();
    rate
}
