//! Order processing: competing consumers on a durable queue, and a broker
//! restart halfway through that loses no order and repeats no acknowledged
//! one.
//!
//! From section 2 of the seed tutorial (点对点模式, "point-to-point"): an
//! `OrderProducer` sends each order to the `order.process` queue, and several
//! `OrderConsumer` instances compete for it, so that each order is processed
//! by exactly one of them ("避免重复扣款": no order charged twice). Here:
//!
//! - the broker is opened on a data directory (`Broker::open`, a temporary
//!   directory), the queue is declared durable and the orders are published
//!   persistent, in confirmed batches (`publish_batch` returns once they are
//!   on disk);
//! - `--consumers` supervised consumers with manual acks and a prefetch
//!   compete for the queue: each does the seed's three steps (check stock,
//!   price, create the order record: `--work-ms`), then acknowledges;
//! - once half of the orders are acknowledged, the broker is restarted as a
//!   process dies: acknowledgements stop getting out (an order being
//!   processed at that moment has its record created but is never acked),
//!   `QueueHandle::sync` makes every acknowledgement so far durable (acks
//!   are written lazily otherwise), and the broker's runtime is shut down
//!   with the consumers in the middle of their work and deliveries in their
//!   prefetch. The broker is then opened again on the same directory, on
//!   the program's runtime, and new consumers process the rest.
//!
//! It checks that the reopened broker recovered exactly the orders not
//! acknowledged before the restart, that every order was processed (none
//! lost) and acknowledged exactly once, that no order acknowledged before the
//! restart was delivered after it, and that the only orders processed twice
//! are those processed but not yet acknowledged at the restart, which came
//! back flagged redelivered (at-least-once: the restart fell between their
//! side effect and their ack; the `duplicates` patterns of the README make
//! those exactly-once too).
//!
//! Run it with
//! `cargo run --release --example order_processing -- --orders 2000 --consumers 3`.
//!
//! Flags (defaults in brackets):
//! - `--orders N`: orders to publish [2000];
//! - `--consumers N`: competing consumers [3];
//! - `--prefetch N`: unacknowledged orders each consumer may hold [10];
//! - `--work-ms N`: time to process one order [1].

// `support::secs` is not reachable from outside: the lint would fail clippy.
#[path = "support/mod.rs"]
pub mod support;

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, ConsumerHandle, DeleteOptions, Delivery, Envelope,
    QueueOptions, StorageOptions,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};
use tokio::sync::{RwLock, watch};

/// The seed's queue.
const QUEUE: &str = "order.process";
/// Orders per confirmed batch (one disk sync each).
const BATCH: usize = 100;
/// How long the example waits for its consumers before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    customer: u32,
    cents: u64,
}

/// What happened to one order, in each of the broker's two lives.
#[derive(Clone, Copy, Debug, Default)]
struct Fate {
    /// Times its order record was created (the side effect).
    processed: [u32; 2],
    /// Times it was acknowledged.
    acked: [u32; 2],
    /// Delivered after the restart flagged redelivered.
    redelivered: bool,
}

/// The orders' fates, and who processed how many.
struct Shop {
    fates: Mutex<Vec<Fate>>,
    by_consumer: Mutex<Vec<u32>>,
    /// Orders acknowledged in each life, for whoever waits on progress.
    acked: watch::Sender<[usize; 2]>,
    /// Consumers caught between an order's record and its ack by the restart.
    caught: watch::Sender<usize>,
}

impl Shop {
    fn new(orders: usize, consumers: usize) -> Self {
        Shop {
            fates: Mutex::new(vec![Fate::default(); orders]),
            by_consumer: Mutex::new(vec![0; consumers]),
            acked: watch::channel([0, 0]).0,
            caught: watch::channel(0).0,
        }
    }

    fn processed(&self, life: usize, consumer: usize, order: u32, redelivered: bool) {
        if let Some(fate) = self.fates.lock().get_mut(order as usize) {
            fate.processed[life] += 1;
            fate.redelivered |= life == 1 && redelivered;
        }
        if let Some(n) = self.by_consumer.lock().get_mut(consumer) {
            *n += 1;
        }
    }

    fn acked(&self, life: usize, order: u32) {
        if let Some(fate) = self.fates.lock().get_mut(order as usize) {
            fate.acked[life] += 1;
        }
        self.acked.send_modify(|acked| acked[life] += 1);
    }
}

/// The seed's `OrderConsumer`: processes an order, then acknowledges it.
#[derive(Clone)]
struct OrderConsumer {
    shop: Arc<Shop>,
    /// 0 before the restart, 1 after.
    life: usize,
    consumer: usize,
    work: Duration,
    /// Before the restart: whether acknowledgements still get out. Once the
    /// restart has begun they do not, as when a process dies between an
    /// order's side effect and its ack.
    acks_open: Option<Arc<RwLock<bool>>>,
}

impl Consumer for OrderConsumer {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let order: Order = delivery.decode()?;
        // 1. check stock, 2. compute the price, 3. create the order record.
        tokio::time::sleep(self.work).await;
        self.shop
            .processed(self.life, self.consumer, order.id, delivery.redelivered());
        let _acking = match &self.acks_open {
            Some(open) => {
                let open = open.read().await;
                if !*open {
                    // The process is going down: this order's ack never gets
                    // out. Wait for the end with the delivery unacknowledged.
                    drop(open);
                    self.shop.caught.send_modify(|n| *n += 1);
                    return std::future::pending().await;
                }
                Some(open)
            }
            None => None,
        };
        delivery.ack().await?;
        self.shop.acked(self.life, order.id);
        Ok(())
    }
}

/// Starts `n` competing consumers, consumer `i` built by `make(i)`.
async fn start_consumers(
    broker: &Broker,
    n: usize,
    options: &ConsumeOptions,
    make: impl Fn(usize) -> OrderConsumer,
) -> Result<Vec<ConsumerHandle<OrderConsumer>>, Box<dyn Error>> {
    let mut consumers = Vec::with_capacity(n);
    for i in 0..n {
        let consumer = make(i);
        // The factory builds the consumer at start and again after a crash.
        consumers.push(
            broker
                .consume(QUEUE, options.clone(), move || consumer.clone())
                .await?,
        );
    }
    Ok(consumers)
}

/// Waits until `done` holds for the counts of acknowledged orders.
async fn wait_acked(
    shop: &Shop,
    what: &str,
    done: impl FnMut(&[usize; 2]) -> bool,
) -> Result<(), Box<dyn Error>> {
    let mut acked = shop.acked.subscribe();
    match tokio::time::timeout(PATIENCE, acked.wait_for(done)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(format!("{what}: not done within {PATIENCE:?}").into()),
    }
}

/// Runs the example: publishes, consumes half, restarts the broker, consumes
/// the rest, and checks that every order was processed and acked once.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let n = flags.usize("orders", 2000).min(u32::MAX as usize);
    let consumers = flags.usize("consumers", 3).max(1);
    let prefetch = flags.u32("prefetch", 10).max(1);
    let work = flags.millis("work-ms", Duration::from_millis(1));
    let mut summary = Summary::new(format!(
        "order_processing: {n} orders, {consumers} competing consumers, a durable queue, a broker restart"
    ));
    let dir = tempfile::TempDir::new()?;
    let shop = Arc::new(Shop::new(n, consumers));
    let options = ConsumeOptions::manual(prefetch);

    // First life: a runtime of its own, which stands for the first process.
    let first = Runtime::new()?;
    let broker = Broker::open(&first, StorageOptions::new(dir.path()))?;
    let queue = broker
        .declare_queue(QUEUE, QueueOptions::default().durable())
        .await?;
    let started = Instant::now();
    let mut batches = 0;
    for from in (0..n).step_by(BATCH) {
        let mut batch = Vec::with_capacity(BATCH);
        for id in from..(from + BATCH).min(n) {
            let id = id as u32;
            let order = Order {
                id,
                customer: id % 97,
                cents: 500 + u64::from(id % 50) * 125,
            };
            batch.push(Envelope::encode(&order)?.with_persistent(true));
        }
        queue.publish_batch(batch).await?;
        batches += 1;
    }
    summary.line(format!(
        "published {n} persistent orders to the durable queue '{QUEUE}' in {} ({batches} confirmed batches)",
        secs(started.elapsed())
    ));

    let acks_open = Arc::new(RwLock::new(true));
    let first_consumers = start_consumers(&broker, consumers, &options, |i| OrderConsumer {
        shop: shop.clone(),
        life: 0,
        consumer: i,
        work,
        acks_open: Some(acks_open.clone()),
    })
    .await?;
    let started = Instant::now();
    wait_acked(&shop, "the first half", |acked| acked[0] >= n / 2).await?;

    // The restart. From here on no acknowledgement gets out (the write lock
    // waits for the acks under way). Each consumer holding deliveries
    // finishes the order in hand, and is caught before its ack: the worst
    // moment for the process to die.
    *acks_open.write().await = false;
    let holding = queue
        .snapshot()
        .await?
        .consumers
        .iter()
        .filter(|c| c.unacked > 0)
        .count();
    let mut caught = shop.caught.subscribe();
    tokio::time::timeout(PATIENCE, caught.wait_for(|n| *n >= holding))
        .await
        .map_err(|_| "consumers not caught before their acks")??;
    // Every acknowledgement made so far is made durable (they are written
    // lazily otherwise), then the process dies with the consumers in the
    // middle of their work.
    queue.sync().await?;
    let at_restart = queue.snapshot().await?.stats;
    let first_life = started.elapsed();
    drop((first_consumers, queue, broker));
    first.shutdown();
    let acked_before = shop.acked.borrow()[0];
    let (in_hand, in_prefetch) = {
        let fates = shop.fates.lock();
        let in_hand = fates
            .iter()
            .filter(|f| f.processed[0] > 0 && f.acked[0] == 0)
            .count();
        (in_hand, at_restart.unacked.saturating_sub(in_hand))
    };
    summary.line(format!(
        "first life: {acked_before} orders processed and acked in {}; restarted with {} ready, \
         {in_hand} processed but not acked, {in_prefetch} waiting in the consumers' prefetch",
        secs(first_life),
        at_restart.ready
    ));

    // Second life: the same directory, on the program's runtime.
    let started = Instant::now();
    let broker = Broker::open(rt, StorageOptions::new(dir.path()))?;
    let queue = broker.queue(QUEUE)?;
    let recovered = queue.snapshot().await?.stats.ready;
    let reopened = started.elapsed();
    let second_consumers = start_consumers(&broker, consumers, &options, |i| OrderConsumer {
        shop: shop.clone(),
        life: 1,
        consumer: i,
        work,
        acks_open: None,
    })
    .await?;
    wait_acked(&shop, "the rest", |acked| acked[1] >= recovered).await?;
    let second_life = started.elapsed();
    let at_end = queue.snapshot().await?.stats;
    for consumer in &second_consumers {
        consumer.cancel().await;
    }
    for consumer in &second_consumers {
        consumer.terminated().await;
    }
    drop(queue);
    // Tidy up: the data directory is temporary.
    broker.delete_queue(QUEUE, DeleteOptions::default()).await?;
    drop(broker);

    let fates = shop.fates.lock().clone();
    let by_consumer = shop.by_consumer.lock().clone();
    let redelivered = fates.iter().filter(|f| f.redelivered).count();
    summary.line(format!(
        "second life: reopened in {}, recovered {recovered} orders, all processed in {}; \
         {redelivered} of them came back flagged redelivered",
        secs(reopened),
        secs(second_life)
    ));
    summary.line(format!(
        "orders processed per consumer (both lives): {by_consumer:?}"
    ));

    let processed = |f: &Fate| f.processed[0] + f.processed[1];
    let twice: Vec<&Fate> = fates.iter().filter(|f| processed(f) == 2).collect();
    summary.line(format!(
        "processed once: {}; twice: {} (processed, then the restart came before the ack)",
        fates.iter().filter(|f| processed(f) == 1).count(),
        twice.len()
    ));
    summary.check(
        format!(
            "the reopened broker recovered exactly the orders not acked before the restart ({recovered} = {n} - {acked_before})"
        ),
        recovered == n - acked_before,
    );
    summary.check(
        "every order published was processed (none lost)",
        fates.iter().all(|f| processed(f) >= 1),
    );
    summary.check(
        "every order was acknowledged exactly once",
        fates.iter().all(|f| f.acked[0] + f.acked[1] == 1),
    );
    summary.check(
        "no order acknowledged before the restart was processed after it",
        fates.iter().all(|f| f.acked[0] == 0 || f.processed[1] == 0),
    );
    summary.check(
        format!(
            "the orders processed twice are exactly the {in_hand} processed but not acked at the restart, each redelivered",
            ),
        fates.iter().all(|f| processed(f) <= 2)
            && twice.len() == in_hand
            && twice
                .iter()
                .all(|f| f.processed == [1, 1] && f.acked == [0, 1] && f.redelivered),
    );
    summary.check(
        "the queue is empty at the end",
        at_end.ready == 0 && at_end.unacked == 0,
    );
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let flags = Flags::from_args();
    let rt = Runtime::new()?;
    let summary = run(&rt.handle(), &flags).await?;
    rt.shutdown();
    summary.exit()
}
