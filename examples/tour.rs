//! A narrated tour of postbox: point-to-point queues with competing consumers,
//! manual acknowledgements, a consumer crash and the redelivery of what it held,
//! backpressure, and typed errors.
//!
//! Run it with `cargo run --release --example tour`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postbox::{Failure, Runtime};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, Delivery, Envelope, QueueOptions, TryPublishError,
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
        println!("     (contained by postbox: {info})")
    }));

    println!("postbox tour\n============\n");
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
    for (i, c) in consumers.iter().enumerate() {
        let stats = c.addr().stats();
        println!(
            "   consumer {}: restarts {}, failures {}, current registration {:?}",
            i,
            stats.restarts,
            stats.failures,
            c.consumer_id().await
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

    println!("\nDone.");
    rt.shutdown();
    Ok(())
}
