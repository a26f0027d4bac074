//! Scenario 12: postbox's broker API on RabbitMQ (feature `amqp`) against
//! raw `lapin` doing the same work, when `AMQP_URL` is set: what the layer
//! costs.
//!
//! - publish: confirmed publishes to a queue by name, 256 in flight. postbox:
//!   `Broker::publish` (`mandatory`, publisher confirms, a message id and a
//!   timestamp on every message). lapin: `basic_publish` with the same
//!   properties and flag on a confirm-mode channel, each confirm awaited.
//! - consume: a queue filled beforehand, drained by one consumer with manual
//!   acks and prefetch 256. postbox: a supervised consumer actor acking each
//!   delivery. lapin: a consumer stream acking each delivery, 256 acks in
//!   flight.
//! - rpc: request-reply round trips through direct reply-to, one at a time:
//!   postbox's `Requester` and an auto-ack `Responder`, against scenario 4's
//!   raw lapin row (which must run too: `--only 4,12`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use postbox::Runtime;
use postbox_actors::rpc::Request;
use postbox_actors::{
    Broker, ConsumeOptions, DeleteOptions, Delivery, Envelope, MessageId, QueueOptions,
};

use crate::Config;
use crate::rabbit::RABBIT_RPC_CONFIRMS;
use crate::report::{Metric, Report, Row};
use crate::rpc::S4;
use crate::util::{Done, Latencies, leak, payload, throughput, timed};

pub const S12: &str = "12 postbox on RabbitMQ vs raw lapin";
pub const REMOTE_PUBLISH: &str = "postbox on RabbitMQ, publish (confirmed), 256 in flight";
pub const LAPIN_PUBLISH: &str = "lapin, publish + confirm, 256 in flight";
pub const REMOTE_CONSUME: &str = "postbox on RabbitMQ, consume, manual ack, prefetch 256";
pub const LAPIN_CONSUME: &str = "lapin, consume, manual ack, prefetch 256";
pub const REMOTE_RPC: &str = "postbox on RabbitMQ, rpc Requester→Responder";

/// Publishes in flight at once (as the raw RabbitMQ rows).
const IN_FLIGHT: usize = 256;

fn name(what: &str) -> String {
    format!(
        "postbox-bench.{}.remote.{what}.{}",
        std::process::id(),
        MessageId::new().0.simple()
    )
}

/// What postbox puts on every message: a message id and a timestamp.
fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_message_id(MessageId::new().to_string().into())
        .with_timestamp(1_700_000_000)
}

pub async fn scenario12(cfg: &Config, report: &mut Report) {
    let Some(url) = cfg.amqp.clone() else {
        return;
    };
    println!("\n== {S12}");
    let rt = Runtime::new().expect("a postbox runtime");
    let broker = match Broker::connect(&rt, &url).await {
        Ok(broker) => broker,
        Err(err) => {
            println!("skipped: {err}");
            return;
        }
    };
    let n = cfg.count(50_000, 2_000);
    let p = payload();

    if cfg.wants(REMOTE_PUBLISH) {
        let queue = name("publish");
        broker
            .declare_queue(&queue, QueueOptions::default())
            .await
            .expect("declare");
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (broker, queue, p) = (&broker, &queue, &p);
            async move {
                let elapsed = timed(async {
                    futures::stream::iter(0..k)
                        .map(|_| broker.publish(queue, Envelope::new(p.clone())))
                        .buffer_unordered(IN_FLIGHT)
                        .for_each(|r| {
                            r.expect("publish");
                            async {}
                        })
                        .await;
                })
                .await;
                broker.purge_queue(queue).await.expect("purge");
                elapsed
            }
        })
        .await;
        let _ = broker.delete_queue(&queue, DeleteOptions::default()).await;
        report.push(
            Row::new(S12, REMOTE_PUBLISH)
                .rate(rate)
                .vs(LAPIN_PUBLISH, Metric::Throughput)
                .note("mandatory, confirmed, message id and timestamp"),
        );
    }

    let lapin = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("a lapin connection");
    if cfg.wants(LAPIN_PUBLISH) {
        let queue = name("publish-raw");
        broker
            .declare_queue(&queue, QueueOptions::default())
            .await
            .expect("declare");
        let ch = lapin.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (ch, queue, p, broker) = (&ch, &queue, &p, &broker);
            async move {
                let elapsed = timed(async {
                    futures::stream::iter(0..k)
                        .map(|_| async {
                            let confirm = ch
                                .basic_publish(
                                    "".into(),
                                    queue.as_str().into(),
                                    BasicPublishOptions {
                                        mandatory: true,
                                        ..BasicPublishOptions::default()
                                    },
                                    p,
                                    properties(),
                                )
                                .await
                                .expect("basic.publish");
                            let confirmed = confirm.await.expect("a confirm");
                            assert!(matches!(confirmed, Confirmation::Ack(None)));
                        })
                        .buffer_unordered(IN_FLIGHT)
                        .for_each(|()| async {})
                        .await;
                })
                .await;
                broker.purge_queue(queue).await.expect("purge");
                elapsed
            }
        })
        .await;
        let _ = broker.delete_queue(&queue, DeleteOptions::default()).await;
        let _ = ch.close(200, "done".into()).await;
        report.push(Row::new(S12, LAPIN_PUBLISH).rate(rate));
    }

    if cfg.wants(REMOTE_CONSUME) {
        let queue = name("consume");
        let handle = broker
            .declare_queue(&queue, QueueOptions::default())
            .await
            .expect("declare");
        let done = leak(Done::new());
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (broker, handle, queue, p) = (&broker, &handle, &queue, &p);
            async move {
                fill(handle, p, k).await;
                done.arm(k);
                let start = Instant::now();
                let consumer = broker
                    .consume(queue, ConsumeOptions::manual(256), move || {
                        move |d: Delivery| async move {
                            d.ack().await?;
                            done.hit(1);
                            Ok(())
                        }
                    })
                    .await
                    .expect("consume");
                done.wait().await;
                let elapsed = start.elapsed();
                consumer.close().await;
                elapsed
            }
        })
        .await;
        let _ = broker.delete_queue(&queue, DeleteOptions::default()).await;
        report.push(
            Row::new(S12, REMOTE_CONSUME)
                .rate(rate)
                .vs(LAPIN_CONSUME, Metric::Throughput)
                .note("a supervised consumer actor, each delivery acked"),
        );
    }

    if cfg.wants(LAPIN_CONSUME) {
        let queue = name("consume-raw");
        let handle = broker
            .declare_queue(&queue, QueueOptions::default())
            .await
            .expect("declare");
        let rate = throughput(n / 10, n, cfg.reps.min(3), |k| {
            let (lapin, handle, queue, p) = (&lapin, &handle, &queue, &p);
            async move {
                fill(handle, p, k).await;
                let ch = lapin.create_channel().await.expect("channel");
                ch.basic_qos(256, BasicQosOptions::default())
                    .await
                    .expect("qos");
                let start = Instant::now();
                let deliveries = ch
                    .basic_consume(
                        queue.as_str().into(),
                        "bench".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .expect("basic.consume");
                deliveries
                    .take(k as usize)
                    .map(|d| async move {
                        let d = d.expect("a delivery");
                        d.ack(BasicAckOptions::default()).await.expect("ack");
                    })
                    .buffered(IN_FLIGHT)
                    .for_each(|()| async {})
                    .await;
                let elapsed = start.elapsed();
                let _ = ch.close(200, "done".into()).await;
                elapsed
            }
        })
        .await;
        let _ = broker.delete_queue(&queue, DeleteOptions::default()).await;
        report.push(Row::new(S12, LAPIN_CONSUME).rate(rate));
    }

    if cfg.wants(REMOTE_RPC) {
        let rounds = cfg.count(20_000, 1_000) as usize;
        let queue = name("rpc");
        broker
            .declare_queue(&queue, QueueOptions::default())
            .await
            .expect("declare");
        let _responder = broker
            .respond(&queue, ConsumeOptions::auto(), || {
                |req: Request| async move { Ok(Envelope::new(req.payload().clone())) }
            })
            .await
            .expect("respond");
        let client = broker.requester().await.expect("requester");
        let warmup = rounds / 10;
        let mut samples = Vec::with_capacity(rounds);
        let mut start = Instant::now();
        for i in 0..warmup + rounds {
            if i == warmup {
                start = Instant::now();
            }
            let t = Instant::now();
            let reply = client
                .request(queue.as_str(), Envelope::new(p.clone()))
                .timeout(Duration::from_secs(10))
                .await
                .expect("a reply");
            assert_eq!(reply.payload().len(), p.len());
            if i >= warmup {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        let l = Latencies::new(samples, start.elapsed());
        let _ = broker.delete_queue(&queue, DeleteOptions::default()).await;
        report.push(
            Row::new(S12, REMOTE_RPC)
                .rate(l.rate())
                .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                .vs_in(S4, RABBIT_RPC_CONFIRMS, Metric::P50)
                .note("publisher confirms on requests and replies, as the lapin row it is set against"),
        );
    }
    let _ = lapin.close(200, "done".into()).await;
    rt.shutdown();
}

/// Puts `k` messages in the queue (in batches of 1,000, confirmed).
async fn fill(handle: &postbox_actors::QueueHandle, p: &bytes::Bytes, k: u64) {
    let mut left = k;
    while left > 0 {
        let batch = left.min(1_000);
        handle
            .publish_batch((0..batch).map(|_| Envelope::new(p.clone())).collect())
            .await
            .expect("fill");
        left -= batch;
    }
}
