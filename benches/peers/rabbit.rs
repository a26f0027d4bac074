//! RabbitMQ through `lapin`, as a peer in scenarios 1, 3, 4 and 5 when
//! `AMQP_URL` is set.
//!
//! Publishers and consumers use separate connections (as separate services
//! would). Every queue and exchange gets a unique name
//! (`postbox-bench.<pid>.<what>.<n>`) and is deleted at the end of its case.
//!
//! - 1: one non-durable queue, one `no_ack` consumer, publishes without
//!   confirms, 256 in flight (see [`IN_FLIGHT`]).
//! - 3: a fanout exchange with 10 exclusive queues, one `no_ack` consumer (on
//!   its own channel) each; publishes as in 1.
//! - 4: direct reply-to: the requester consumes `amq.rabbitmq.reply-to` and
//!   publishes requests with that `reply_to` and a correlation id; the
//!   responder consumes the request queue and publishes each reply to its
//!   `reply_to`. Measured twice: plain, and with both channels in confirm
//!   mode (confirms not awaited), as postbox's requester and responder run.
//! - 5: a durable queue, persistent messages (`delivery_mode` 2), publisher
//!   confirms: batch 1 waits for each confirm, batch 64 publishes 64 and waits
//!   for all of their confirms. With 64 publishers: 64 channels on the
//!   publishing connection, each in confirm mode, each publishing and
//!   awaiting its own confirm before the next (as postbox's 64 publishers).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::Config;
use crate::durable::{S5, ceiling, postbox_publishers};
use crate::fanout::{BROADCAST, S3, SUBSCRIBERS};
use crate::p2p::{S1, TOKIO_MPSC};
use crate::report::{Metric, Report, Row};
use crate::rpc::{ACTIX_ACROSS, S4};
use crate::util::{Done, FanIn, Latencies, leak, payload, sample, throughput, timed};

pub const RABBIT_P2P: &str = "RabbitMQ (lapin), no-ack consumer";
pub const RABBIT_FANOUT: &str = "RabbitMQ (lapin), fanout exchange";
pub const RABBIT_RPC: &str = "RabbitMQ (lapin), direct reply-to";
/// As [`RABBIT_RPC`], with publisher confirms on both channels, as postbox
/// has them: the like-for-like peer of postbox's rpc on RabbitMQ.
pub const RABBIT_RPC_CONFIRMS: &str = "RabbitMQ (lapin), direct reply-to, publisher confirms";

pub fn rabbit_durable(batch: usize) -> String {
    format!("RabbitMQ (lapin) durable, persistent + confirms, batch {batch}")
}

/// Concurrent publishers of the group-commit row.
pub const RABBIT_PUBLISHERS: usize = 64;

pub fn rabbit_publishers(publishers: usize) -> String {
    format!("RabbitMQ (lapin) durable, {publishers} publishers (channels), confirm each")
}

pub struct Rabbit {
    publisher: Connection,
    consumer: Connection,
    next: AtomicU64,
}

fn transient() -> QueueDeclareOptions {
    QueueDeclareOptions {
        auto_delete: true,
        ..QueueDeclareOptions::default()
    }
}

fn no_ack() -> BasicConsumeOptions {
    BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    }
}

/// Publishes in flight at once. lapin resolves a `basic_publish` only once its
/// frames are written to the socket, so awaiting each one in turn costs a
/// round trip through lapin's I/O task per message; keeping a window in
/// flight lets RabbitMQ go as fast as it can (frames still leave in order).
const IN_FLIGHT: usize = 256;

/// Publishes `k` copies of `payload` with `properties`, `IN_FLIGHT` at a time.
async fn publish_many(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: &BasicProperties,
    k: u64,
) {
    futures::stream::iter(0..k)
        .map(|_| {
            channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                properties.clone(),
            )
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|published| {
            published.expect("basic.publish");
            async {}
        })
        .await;
}

impl Rabbit {
    pub async fn connect(url: &str) -> Result<Rabbit, lapin::Error> {
        let publisher = Connection::connect(url, ConnectionProperties::default()).await?;
        let consumer = Connection::connect(url, ConnectionProperties::default()).await?;
        Ok(Rabbit {
            publisher,
            consumer,
            next: AtomicU64::new(0),
        })
    }

    pub async fn close(self) {
        let _ = self.publisher.close(200, "bench done".into()).await;
        let _ = self.consumer.close(200, "bench done".into()).await;
    }

    fn name(&self, what: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("postbox-bench.{}.{what}.{n}", std::process::id())
    }

    async fn channels(&self) -> (Channel, Channel) {
        let p = self.publisher.create_channel().await.expect("AMQP channel");
        let c = self.consumer.create_channel().await.expect("AMQP channel");
        (p, c)
    }

    pub async fn scenario1(&self, cfg: &Config, report: &mut Report) {
        if !cfg.wants(RABBIT_P2P) {
            return;
        }
        let n = cfg.count(200_000, 5_000);
        let queue = self.name("p2p");
        let (pch, cch) = self.channels().await;
        cch.queue_declare(queue.as_str().into(), transient(), FieldTable::default())
            .await
            .expect("queue.declare");
        let done = leak(Done::new());
        let mut deliveries = cch
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                no_ack(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let consumer = tokio::spawn(async move {
            while let Some(delivery) = deliveries.next().await {
                if delivery.is_err() {
                    break;
                }
                done.hit(1);
            }
        });
        let p = payload();
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (pch, p, queue) = (&pch, &p, &queue);
            timed(async move {
                done.arm(k);
                publish_many(pch, "", queue, p, &BasicProperties::default(), k).await;
                done.wait().await;
            })
        })
        .await;
        pch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("queue.delete");
        let _ = cch.close(200, "done".into()).await;
        let _ = pch.close(200, "done".into()).await;
        let _ = consumer.await;
        report.push(
            Row::new(S1, RABBIT_P2P)
                .rate(rate)
                .vs(TOKIO_MPSC, Metric::Throughput)
                .note("non-durable queue, no confirms, 256 publishes in flight"),
        );
    }

    pub async fn scenario3(&self, cfg: &Config, report: &mut Report) {
        if !cfg.wants(RABBIT_FANOUT) {
            return;
        }
        let n = cfg.count(50_000, 2_000);
        let exchange = self.name("fanout");
        let pch = self.publisher.create_channel().await.expect("AMQP channel");
        pch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
        let fan = leak(FanIn::new());
        let mut channels = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let ch = self.consumer.create_channel().await.expect("AMQP channel");
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            let queue = ch
                .queue_declare("".into(), exclusive, FieldTable::default())
                .await
                .expect("queue.declare");
            ch.queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue.bind");
            let mut deliveries = ch
                .basic_consume(
                    queue.name().clone(),
                    "bench".into(),
                    no_ack(),
                    FieldTable::default(),
                )
                .await
                .expect("basic.consume");
            tasks.push(tokio::spawn(async move {
                let mut seen = 0u64;
                while let Some(delivery) = deliveries.next().await {
                    if delivery.is_err() {
                        break;
                    }
                    seen += 1;
                    fan.seen(seen);
                }
            }));
            channels.push(ch);
        }
        let p = payload();
        let total = Cell::new(0u64);
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (pch, p, exchange, total) = (&pch, &p, &exchange, &total);
            timed(async move {
                total.set(total.get() + k);
                fan.arm(total.get(), SUBSCRIBERS as u64);
                publish_many(pch, exchange, "", p, &BasicProperties::default(), k).await;
                fan.wait().await;
            })
        })
        .await;
        for ch in channels {
            // Exclusive, auto-delete queues go with their channel's consumer.
            let _ = ch.close(200, "done".into()).await;
        }
        pch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("exchange.delete");
        let _ = pch.close(200, "done".into()).await;
        for t in tasks {
            let _ = t.await;
        }
        report.push(
            Row::new(S3, RABBIT_FANOUT)
                .rate(rate)
                .vs(BROADCAST, Metric::Throughput)
                .note("10 exclusive queues, no-ack consumers"),
        );
    }

    pub async fn scenario4(&self, cfg: &Config, report: &mut Report) {
        if cfg.wants(RABBIT_RPC) {
            let l = self.round_trips(cfg, false).await;
            report.push(
                Row::new(S4, RABBIT_RPC)
                    .rate(l.rate())
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .vs(ACTIX_ACROSS, Metric::P50),
            );
        }
        if cfg.wants(RABBIT_RPC_CONFIRMS) {
            let l = self.round_trips(cfg, true).await;
            report.push(
                Row::new(S4, RABBIT_RPC_CONFIRMS)
                    .rate(l.rate())
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .vs(RABBIT_RPC, Metric::P50)
                    .note("both channels in confirm mode, confirms not awaited"),
            );
        }
    }

    /// Direct reply-to round trips, one at a time; with `confirms`, both
    /// channels in confirm mode (as postbox's requester and responder).
    async fn round_trips(&self, cfg: &Config, confirms: bool) -> Latencies {
        let n = cfg.count(20_000, 1_000) as usize;
        let queue = self.name("rpc");
        let (qch, rch) = self.channels().await;
        if confirms {
            for channel in [&qch, &rch] {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirm.select");
            }
        }
        rch.queue_declare(queue.as_str().into(), transient(), FieldTable::default())
            .await
            .expect("queue.declare");
        let mut requests = rch
            .basic_consume(
                queue.as_str().into(),
                "responder".into(),
                no_ack(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let responder_channel = rch.clone();
        let responder = tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let Some(reply_to) = request.properties.reply_to().clone() else {
                    continue;
                };
                let mut properties = BasicProperties::default();
                if let Some(id) = request.properties.correlation_id().clone() {
                    properties = properties.with_correlation_id(id);
                }
                let sent = responder_channel
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &request.data,
                        properties,
                    )
                    .await;
                if sent.is_err() {
                    break;
                }
            }
        });
        // Direct reply-to: consume the pseudo-queue before publishing with it.
        let mut replies = qch
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "requester".into(),
                no_ack(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume amq.rabbitmq.reply-to");
        let p = payload();
        let warmup = n / 10;
        let mut samples = Vec::with_capacity(n);
        let mut start = Instant::now();
        for i in 0..warmup + n {
            if i == warmup {
                start = Instant::now();
            }
            let t = Instant::now();
            let properties = BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(i.to_string().into());
            qch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &p,
                properties,
            )
            .await
            .expect("basic.publish");
            let reply = replies
                .next()
                .await
                .expect("a reply")
                .expect("a reply delivery");
            assert_eq!(reply.data.len(), p.len());
            if i >= warmup {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        let elapsed = start.elapsed();
        rch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("queue.delete");
        let _ = rch.close(200, "done".into()).await;
        let _ = qch.close(200, "done".into()).await;
        let _ = responder.await;
        Latencies::new(samples, elapsed)
    }

    pub async fn scenario5(&self, cfg: &Config, report: &mut Report) {
        for batch in crate::durable::BATCHES {
            if !cfg.wants(&rabbit_durable(batch)) {
                continue;
            }
            let rounds = cfg.count(if batch == 1 { 2_000 } else { 300 }, 50) as usize;
            let queue = self.name("durable");
            let pch = self.publisher.create_channel().await.expect("AMQP channel");
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            pch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
                .await
                .expect("queue.declare");
            pch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            let p = payload();
            let persistent = BasicProperties::default().with_delivery_mode(2);
            let (samples, elapsed) = sample(rounds / 10, rounds, || {
                let (pch, p, queue, persistent) = (&pch, &p, &queue, &persistent);
                async move {
                    if batch == 1 {
                        let confirm = pch
                            .basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                BasicPublishOptions::default(),
                                p,
                                persistent.clone(),
                            )
                            .await
                            .expect("basic.publish")
                            .await
                            .expect("a publisher confirm");
                        assert!(confirm.is_ack(), "RabbitMQ nacked a publish");
                    } else {
                        // The confirms are awaited below, for the whole batch.
                        publish_many(pch, "", queue, p, persistent, batch as u64).await;
                        let returned = pch.wait_for_confirms().await.expect("publisher confirms");
                        assert!(returned.is_empty());
                    }
                }
            })
            .await;
            pch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .expect("queue.delete");
            let _ = pch.close(200, "done".into()).await;
            let l = Latencies::new(samples, elapsed);
            report.push(
                Row::new(S5, rabbit_durable(batch))
                    .rate(l.rate() * batch as f64)
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .vs(&ceiling(batch), Metric::Throughput)
                    .note("p50/p99 per batch"),
            );
        }
        self.durable_publishers(cfg, report).await;
    }

    /// 64 channels in confirm mode, each publishing a persistent message and
    /// awaiting its confirm before the next.
    async fn durable_publishers(&self, cfg: &Config, report: &mut Report) {
        let publishers = RABBIT_PUBLISHERS;
        let system = rabbit_publishers(publishers);
        if !cfg.wants(&system) {
            return;
        }
        let per = publishers as u64;
        let n = cfg.count(20_000, 1_280) / per * per;
        let warmup = (n / 10 / per).max(1) * per;
        let queue = self.name("durable");
        let mut channels = Vec::with_capacity(publishers);
        for _ in 0..publishers {
            let ch = self.publisher.create_channel().await.expect("AMQP channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            channels.push(ch);
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channels[0]
            .queue_declare(queue.as_str().into(), durable, FieldTable::default())
            .await
            .expect("queue.declare");
        let p = payload();
        let rate = throughput(warmup, n, cfg.reps.min(3), |k| {
            let (channels, p, queue) = (&channels, &p, &queue);
            timed(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for ch in channels {
                    let (ch, p, queue) = (ch.clone(), p.clone(), queue.clone());
                    tasks.spawn(async move {
                        let persistent = BasicProperties::default().with_delivery_mode(2);
                        for _ in 0..k / per {
                            let confirm = ch
                                .basic_publish(
                                    "".into(),
                                    queue.as_str().into(),
                                    BasicPublishOptions::default(),
                                    &p,
                                    persistent.clone(),
                                )
                                .await
                                .expect("basic.publish")
                                .await
                                .expect("a publisher confirm");
                            assert!(confirm.is_ack(), "RabbitMQ nacked a publish");
                        }
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done.expect("a publisher task");
                }
            })
        })
        .await;
        channels[0]
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("queue.delete");
        for ch in channels {
            let _ = ch.close(200, "done".into()).await;
        }
        report.push(
            Row::new(S5, system)
                .rate(rate)
                .vs(&postbox_publishers(publishers), Metric::Throughput)
                .note(
                    "64 channels on one connection, each in confirm mode awaiting its own \
                     confirm, one durable queue, persistent messages: like postbox's 64 \
                     publishers with SyncPolicy::Always (RabbitMQ fsyncs before confirming)",
                ),
        );
    }
}
