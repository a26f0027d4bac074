//! The basics of postbox, narrated (what the tour showed before it ran the
//! seed's programs):
//! - point-to-point queues with competing consumers and manual acknowledgements;
//! - a consumer crash, and the redelivery of what it held;
//! - backpressure, and typed errors;
//! - topic routing to subscribers;
//! - request-reply;
//! - retries that end in a dead-letter queue;
//! - streams: fan-out from one shared log, and backpressure from its slowest reader.
//!
//! Run it with `cargo run --release --example basics`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postbox::{Failure, Runtime};
use postbox_actors::rpc::{RemoteError, Request};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, Delivery, Envelope, ExchangeOptions, QueueOptions,
    RetryPolicy, TryPublishError,
};
use postbox_actors::{
    LayerExt, StreamDelivery, StreamOptions, StreamStart, SubscribeOptions, TryStreamPublishError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    item: String,
    poison: bool,
}

/// What a billing consumer reports for each order it finished.
struct Done {
    worker: String,
    order: u32,
    redelivered: bool,
    attempt: u32,
}

/// A billing service instance. The first time any instance meets the poison
/// order it panics while holding its unacknowledged deliveries.
struct Billing {
    name: String,
    poison_seen: Arc<AtomicBool>,
    done: mpsc::UnboundedSender<Done>,
}

impl Consumer for Billing {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let order: Order = delivery.decode()?;
        if order.poison && !self.poison_seen.swap(true, Ordering::SeqCst) {
            println!(
                "  💥 {} panics on order {} (holding its unacked deliveries)",
                self.name, order.id
            );
            panic!("billing bug triggered by order {}", order.id);
        }
        // Pretend to work, then acknowledge: only now is the order gone from the queue.
        tokio::time::sleep(Duration::from_millis(5)).await;
        delivery.ack().await?;
        let _ = self.done.send(Done {
            worker: self.name.clone(),
            order: order.id,
            redelivered: delivery.redelivered(),
            attempt: delivery.delivery_count(),
        });
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the crash report to one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        println!("     (the panic, \"{message}\", is contained by postbox)")
    }));

    println!("postbox basics\n==============\n");
    println!("1. A runtime: an actix system with one arbiter thread per core, started from");
    println!("   a plain #[tokio::main]. A broker on it, and a queue.");
    let rt = Runtime::new()?;
    let broker = Broker::new(&rt);
    broker
        .declare_queue("billing.orders", QueueOptions::default())
        .await?;
    println!(
        "   {} arbiters, queue 'billing.orders' declared\n",
        rt.arbiters()
    );

    println!("2. Two competing consumers, manual acks, prefetch 3: each order goes to exactly");
    println!("   one of them, and neither holds more than 3 unacknowledged orders.");
    let poison_seen = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for name in ["billing-a", "billing-b"] {
        let (seen, done) = (poison_seen.clone(), done_tx.clone());
        let consumer = broker
            .consume("billing.orders", ConsumeOptions::manual(3), move || {
                Billing {
                    name: name.to_string(),
                    poison_seen: seen.clone(),
                    done: done.clone(),
                }
            })
            .await?;
        consumers.push(consumer);
    }
    println!("   consumers registered\n");

    println!("3. Publish 12 orders; order 7 triggers a bug the first time it is processed.");
    for id in 1..=12 {
        let order = Order {
            id,
            item: format!("item-{id}"),
            poison: id == 7,
        };
        broker
            .publish(
                "billing.orders",
                Envelope::encode(&order)?.with_routing_key("order.created"),
            )
            .await?;
    }
    let mut finished = BTreeMap::new();
    while finished.len() < 12 {
        let done = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await?
            .ok_or("consumers stopped")?;
        let note = if done.redelivered {
            format!("  <- redelivered, attempt {}", done.attempt)
        } else {
            String::new()
        };
        println!("   order {:>2} billed by {}{note}", done.order, done.worker);
        finished.insert(done.order, done);
    }
    let redelivered = finished.values().filter(|d| d.redelivered).count();
    println!("\n   All 12 orders billed exactly once. The crashed consumer's unacknowledged");
    println!("   orders ({redelivered} of them) went back to the head of the queue, flagged as");
    println!("   redelivered, and its supervisor rebuilt it with fresh state.");
    let snapshot = broker.queue_stats("billing.orders").await?;
    let s = snapshot.stats;
    println!(
        "   queue stats: published {}, delivered {}, redelivered {}, acknowledged {}, ready {}, unacked {}",
        s.published, s.delivered, s.redelivered, s.acknowledged, s.ready, s.unacked
    );
    println!("   Each consumer's registration with the queue has an id; a crash ends it");
    println!("   (that is what requeues the deliveries it held) and the rebuilt consumer");
    println!("   registers anew, under a new id:");
    for (i, c) in consumers.iter().enumerate() {
        let stats = c.addr().stats();
        let id = c
            .consumer_id()
            .await
            .map_or("none".to_string(), |id| format!("#{id}"));
        println!(
            "   consumer {}: {} restart(s), {} failure(s), registered as {id}",
            i, stats.restarts, stats.failures
        );
    }

    println!("\n4. Backpressure: a queue with a 2-slot mailbox, draining on its own thread.");
    println!("   try_publish fails fast with Full whenever the mailbox is saturated; publish");
    println!("   would wait for room instead.");
    let small = broker
        .declare_queue("tiny", QueueOptions::default().mailbox(2))
        .await?;
    let mut accepted = 0;
    let mut refused = 0;
    for id in 0..1000u32 {
        match small.try_publish(Envelope::encode(&id)?) {
            Ok(()) => accepted += 1,
            Err(TryPublishError::Full { .. }) => refused += 1,
            Err(other) => return Err(other.into()),
        }
    }
    println!(
        "   1000 try_publish calls in a burst: {accepted} accepted, {refused} refused with Full\n"
    );

    println!("5. Mistakes are typed errors, and the queue keeps running:");
    if let Err(err) = broker.publish("no.such.queue", Envelope::new("x")).await {
        println!("   publish to an unknown queue -> {err}");
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    broker
        .declare_queue("audit", QueueOptions::default())
        .await?;
    let _auditor = broker
        .consume("audit", ConsumeOptions::manual(1), move || {
            let tx = tx.clone();
            move |d: Delivery| {
                let _ = tx.send(d);
                async { Ok(()) }
            }
        })
        .await?;
    broker.publish("audit", Envelope::new("entry")).await?;
    let delivery = rx.recv().await.ok_or("auditor stopped")?;
    delivery.ack().await?;
    if let Err(err) = delivery.ack().await {
        println!("   acking the same delivery twice -> {err}");
    }
    if let Err(err) = broker
        .declare_queue("bad\u{7}name", QueueOptions::default())
        .await
    {
        println!("   a queue name with a control character -> {err}");
    }

    println!("\n6. Publish/subscribe through a topic exchange: each subscriber gets its own");
    println!("   queue, and the patterns decide who hears what (`*` one word, `#` any number).");
    broker
        .declare_exchange("shop.events", ExchangeOptions::topic())
        .await?;
    let (heard_tx, mut heard) = mpsc::unbounded_channel::<(String, String)>();
    let mut subscriptions = Vec::new();
    for (who, pattern) in [
        ("email", "user.registered"),
        ("audit", "#"),
        ("stock", "order.*.created"),
    ] {
        let tx = heard_tx.clone();
        subscriptions.push(
            broker
                .subscribe("shop.events", pattern, ConsumeOptions::auto(), move || {
                    let tx = tx.clone();
                    move |d: Delivery| {
                        let _ = tx.send((who.to_string(), d.routing_key().to_string()));
                        async { Ok(()) }
                    }
                })
                .await?,
        );
    }
    for key in ["user.registered", "order.eu.created", "order.eu.paid"] {
        let reached = broker
            .publish_to("shop.events", key, Envelope::new("event"))
            .await?;
        println!("   published {key:<17} -> {reached} subscriber queue(s)");
    }
    let mut heard_by = BTreeMap::<String, Vec<String>>::new();
    for _ in 0..5 {
        let (who, key) = tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await?
            .ok_or("stopped")?;
        heard_by.entry(who).or_default().push(key);
    }
    for (who, keys) in &heard_by {
        println!("   {who:<5} heard {keys:?}");
    }

    println!("\n7. Request-reply: a report service answers on a queue; the client's request");
    println!("   carries a correlation id, a reply-to queue and its deadline.");
    broker
        .declare_queue("reports", QueueOptions::default())
        .await?;
    let _reports = broker
        .respond("reports", ConsumeOptions::manual(4), || {
            |req: Request| async move {
                let month: String = req.decode()?;
                if month.is_empty() {
                    return Err(RemoteError::new("which month?"));
                }
                Ok(Envelope::encode(&format!(
                    "sales report for {month}: 42 orders"
                ))?)
            }
        })
        .await?;
    let client = broker.requester().await?;
    let reply = client
        .request("reports", Envelope::encode("2026-11")?)
        .timeout(Duration::from_secs(2))
        .await?;
    println!("   reply: {:?}", reply.decode::<String>()?);
    if let Err(err) = client.request("reports", Envelope::encode("")?).await {
        println!("   a handler error comes back typed: {err}");
    }
    broker
        .declare_queue("nobody.listens", QueueOptions::default())
        .await?;
    if let Err(err) = client.request("nobody.listens", Envelope::new("?")).await {
        println!("   no consumer: fails at once instead of waiting 30 s: {err}");
    }

    println!("\n8. Retries and dead letters: a payment consumer fails; a retry policy tries 3");
    println!("   times with exponential backoff, then the message goes to the dead-letter");
    println!("   exchange with its death history.");
    broker
        .declare_exchange("payments.dlx", ExchangeOptions::fanout())
        .await?;
    broker
        .declare_queue("payments.dead", QueueOptions::default())
        .await?;
    broker
        .bind_queue("payments.dead", "payments.dlx", "")
        .await?;
    broker
        .declare_queue(
            "payments",
            QueueOptions::default().dead_letter_exchange("payments.dlx"),
        )
        .await?;
    let started = tokio::time::Instant::now();
    let policy = RetryPolicy::exponential(Duration::from_millis(50), Duration::from_secs(1), 3);
    let _payments = broker
        .consume(
            "payments",
            ConsumeOptions::manual(8),
            (move || {
                move |d: Delivery| {
                    println!(
                        "   attempt {} at {:>4} ms: payment gateway down",
                        d.delivery_count(),
                        started.elapsed().as_millis()
                    );
                    async { Err::<(), _>(Failure::msg("payment gateway down")) }
                }
            })
            .layer(policy),
        )
        .await?;
    let (dead_tx, mut dead) = mpsc::unbounded_channel();
    let _dead = broker
        .consume("payments.dead", ConsumeOptions::auto(), move || {
            let tx = dead_tx.clone();
            move |d: Delivery| {
                let _ = tx.send(d.into_message());
                async { Ok(()) }
            }
        })
        .await?;
    broker
        .publish("payments", Envelope::new("charge 10 EUR"))
        .await?;
    let dead_letter = tokio::time::timeout(Duration::from_secs(10), dead.recv())
        .await?
        .ok_or("stopped")?;
    for death in dead_letter.deaths() {
        println!(
            "   dead-lettered from {:?}, reason {}, {} time(s)",
            death.queue, death.reason, death.count
        );
    }

    println!("\n9. Streams: one shared log that every reader reads from its own position,");
    println!("   instead of a queue per subscriber. A reader that joins late can start from");
    println!("   the first record still kept.");
    let prices = broker
        .declare_stream("prices", StreamOptions::default().max_len(4))
        .await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(&'static str, u64, u32)>();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for (who, start) in [("chart", StreamStart::Next), ("slow", StreamStart::Next)] {
        let (tx, release) = (seen_tx.clone(), release.clone());
        readers.push(
            prices
                .subscribe(start, SubscribeOptions::default(), move || {
                    let (tx, release) = (tx.clone(), release.clone());
                    move |d: StreamDelivery| {
                        let _ = tx.send((who, d.offset(), d.decode::<u32>().unwrap_or(0)));
                        let mut release = release.clone();
                        async move {
                            // "slow" is stuck on its first record until released.
                            if who == "slow" {
                                release.wait_for(|go| *go).await.map_err(Failure::from)?;
                            }
                            Ok(())
                        }
                    }
                })
                .await?,
        );
    }
    let mut published = Vec::new();
    for price in [101u32, 102, 103, 104, 105, 106] {
        match prices.try_publish(Envelope::encode(&price)?) {
            Ok(offset) => published.push(format!("{price}@{offset}")),
            Err(TryStreamPublishError::Full { .. }) => {
                println!(
                    "   published {}; then {price} refused with Full: the log keeps 4 records",
                    published.join(" ")
                );
                println!("   and \"slow\" has not finished the first one (block overflow)");
                break;
            }
            Err(other) => return Err(other.into()),
        }
    }
    release_tx.send(true)?;
    // publish, unlike try_publish, waits for room instead of failing.
    let offset = prices.publish(Envelope::encode(&105u32)?).await?;
    println!(
        "   \"slow\" is released; 105 is published again with publish(), which waits for\n   room instead of failing: appended at offset {offset}"
    );
    let late = prices
        .subscribe(StreamStart::First, SubscribeOptions::default(), {
            let tx = seen_tx.clone();
            move || {
                let tx = tx.clone();
                move |d: StreamDelivery| {
                    let _ = tx.send(("late", d.offset(), d.decode::<u32>().unwrap_or(0)));
                    async { Ok(()) }
                }
            }
        })
        .await?;
    let mut by_reader = BTreeMap::<&str, Vec<String>>::new();
    // chart and slow see 5 records each; late sees the 4 still kept.
    for _ in 0..14 {
        let (who, offset, price) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await?
            .ok_or("stopped")?;
        by_reader
            .entry(who)
            .or_default()
            .push(format!("{price}@{offset}"));
    }
    for (who, got) in &by_reader {
        println!("   {who:<5} read {}", got.join(" "));
    }
    for reader in readers {
        reader.cancel().await;
    }
    late.cancel().await;

    println!("\nDone.");
    rt.shutdown();
    Ok(())
}
