//! Manual acknowledgements: an order processor that acks what it finished,
//! requeues what can succeed later, and dead-letters what never will.
//!
//! From section 5 of the seed tutorial (消息确认机制, "acknowledgements"): its
//! `OrderProcessor` listens on `order.process` with `ackMode = "MANUAL"`,
//! validates the order, updates the inventory and acks with `basicAck`; a
//! `BusinessException` nacks with requeue (`basicNack(tag, false, true)`),
//! any other exception nacks without requeue. Here:
//!
//! - **processed**: the consumer acks (`Delivery::ack`) once the order is
//!   done; only then does the queue forget it;
//! - **business errors**: a backordered item is not in stock yet, so the
//!   order is nacked with requeue (`Delivery::nack(true)`); it comes back,
//!   flagged redelivered, and succeeds once the stock has arrived (after
//!   `--stock-after` tries);
//! - **system errors**: a malformed order cannot be decoded, and never will
//!   be: it is rejected without requeue (`Delivery::reject(false)`), and the
//!   queue's dead-letter exchange (`orders.dlx`) routes it to `orders.dead`
//!   with its death history (reason `rejected`);
//! - **poison messages**: an order with a quantity of 0 hits a bug in the
//!   pricing code (a division by zero), which panics. The panic crashes the
//!   consumer: postbox requeues what it held and restarts it with fresh
//!   state, and the poison order comes back, crashes the next consumer, and
//!   so on, until the queue's delivery limit
//!   (`QueueOptions::delivery_limit`, RabbitMQ's `x-delivery-limit`) stops
//!   it: after its last delivery it is dead-lettered with reason
//!   `delivery_limit` instead of requeued.
//!
//! The consumers take one delivery at a time (prefetch 1, the classic
//! setting for work queues): a crashing consumer then holds nothing but the
//! order it crashed on, so no innocent order is redelivered because of it.
//!
//! It checks that every order is accounted for exactly once, as processed or
//! dead-lettered with the reason its kind calls for; that the counts match
//! the orders it generated; that each backordered order was requeued exactly
//! as often as it had to wait for stock; and that the poison orders crashed
//! the consumers exactly `--delivery-limit` times each, as the queue's own
//! statistics say too.
//!
//! Run it with
//! `cargo run --release --example manual_ack_orders -- --orders 40 --delivery-limit 4`.
//!
//! Flags (defaults in brackets):
//! - `--orders N`: orders to publish [40];
//! - `--backordered N`: orders whose item is not in stock yet [6];
//! - `--stock-after N`: tries a backordered order fails before its stock
//!   arrives [2] (with `N >= --delivery-limit` they end dead-lettered too);
//! - `--malformed N`: orders that cannot be decoded [4];
//! - `--poison N`: orders that crash the consumer every time [1];
//! - `--delivery-limit N`: deliveries of one message before it is
//!   dead-lettered instead of requeued [4];
//! - `--consumers N`: competing consumers [2];
//! - `--seed N`: where in the stream the special orders are [7].

#[path = "support/mod.rs"]
pub mod support;

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::{Backoff, Failure, Runtime, RuntimeHandle};
use postbox_actors::{
    Broker, ConsumeOptions, Consumer, ConsumerHandle, DeathReason, DeleteOptions, Delivery,
    Envelope, ExchangeOptions, MessageId, QueueOptions,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};

/// The seed's queue.
const QUEUE: &str = "order.process";
/// The dead-letter exchange and its queue.
const DLX: &str = "orders.dlx";
const DEAD: &str = "orders.dead";
/// Gives up waiting for the orders to settle after this long (a guard
/// against a hang: the checks count, they do not time).
const PATIENCE: Duration = Duration::from_secs(30);

/// An order, as published (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    sku: String,
    quantity: u32,
    total_cents: u64,
}

/// What each generated order is, and so what must become of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Backordered,
    Malformed,
    Poison,
}

/// How an order ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Processed,
    Dead(DeathReason),
}

/// The shop's state, shared by every consumer and surviving their restarts:
/// the warehouse, and what became of each order.
struct Shop {
    /// Backordered orders: how many more stock checks fail before their
    /// item arrives.
    backorders: Mutex<BTreeMap<u32, u32>>,
    /// Each order's outcomes (exactly one is the promise) and, for a
    /// processed one, the delivery that finished it.
    outcomes: Mutex<BTreeMap<u32, Vec<(Fate, u32)>>>,
    /// Business errors: nacks with requeue.
    requeued: AtomicU64,
    /// System errors: rejects without requeue.
    rejected: AtomicU64,
    /// Panics in the pricing code (poison orders), counted to compare with
    /// the consumers' own crash reports.
    crashes: AtomicU64,
    /// Dead letters that are not one of these orders' first death (there
    /// should be none).
    strangers: AtomicU64,
}

impl Shop {
    fn record(&self, order: u32, fate: Fate, delivery_count: u32) {
        self.outcomes
            .lock()
            .entry(order)
            .or_default()
            .push((fate, delivery_count));
    }

    /// The warehouse: reserves the order's items, unless they have not
    /// arrived yet (a business error: the order can succeed later).
    fn reserve(&self, order: &Order) -> Result<(), String> {
        let mut backorders = self.backorders.lock();
        match backorders.get_mut(&order.id) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(format!("{} is not in stock yet", order.sku))
            }
            _ => Ok(()),
        }
    }
}

/// The unit price. The bug: an order of quantity 0 divides by zero, which
/// panics, on every try.
fn unit_price(order: &Order) -> u64 {
    order.total_cents / u64::from(order.quantity)
}

/// The seed's `OrderProcessor`, with manual acknowledgements.
struct OrderProcessor {
    shop: Arc<Shop>,
}

impl Consumer for OrderProcessor {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let shop = &self.shop;
        // validateOrder: an order that cannot be decoded never will be. A
        // system error: reject without requeue, to the dead-letter exchange.
        let Ok(order) = delivery.decode::<Order>() else {
            delivery.reject(false).await?;
            shop.rejected.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        // The pricing code panics on a poison order: the consumer crashes,
        // postbox requeues the delivery and restarts the consumer.
        if order.quantity == 0 {
            // Counted here, to compare with the consumers' crash reports.
            shop.crashes.fetch_add(1, Ordering::Relaxed);
        }
        let _unit = unit_price(&order);
        // updateInventory: out of stock is a business error, requeued.
        if shop.reserve(&order).is_err() {
            // (On its last allowed delivery, the requeue dead-letters it.)
            delivery.nack(true).await?;
            shop.requeued.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // createPayment would go here. Done: ack, and only then count it.
        delivery.ack().await?;
        shop.record(order.id, Fate::Processed, delivery.delivery_count());
        Ok(())
    }
}

/// A small seeded generator (splitmix64), to place the special orders.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The kinds of `orders` orders, in a seeded order.
fn kinds(orders: usize, counts: [(Kind, usize); 3], seed: u64) -> Result<Vec<Kind>, String> {
    let special = counts
        .iter()
        .fold(0usize, |sum, (_, n)| sum.saturating_add(*n));
    if special > orders {
        return Err(format!(
            "{special} backordered, malformed and poison orders do not fit in --orders {orders}"
        ));
    }
    let mut kinds = vec![Kind::Plain; orders];
    let mut at = 0;
    for (kind, n) in counts {
        kinds[at..at + n].fill(kind);
        at += n;
    }
    let mut state = seed;
    for i in (1..orders).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        kinds.swap(i, j);
    }
    Ok(kinds)
}

/// The message for order `id` of `kind`.
fn message(id: u32, kind: Kind) -> Result<Envelope, Box<dyn Error>> {
    let order = Order {
        id,
        sku: format!("sku-{}", 100 + id % 17),
        quantity: if kind == Kind::Poison { 0 } else { 1 + id % 3 },
        total_cents: 1_000 + u64::from(id) * 25,
    };
    let envelope = if kind == Kind::Malformed {
        // Truncated JSON: what a buggy producer might send.
        let json = serde_json::to_string(&order)?;
        Envelope::new(json[..json.len() / 2].to_owned())
    } else {
        Envelope::encode(&order)?
    };
    Ok(envelope
        .with_id(MessageId::for_key(&format!("order-{id}")))
        .with_header("order-id", i64::from(id)))
}

/// Runs the example: publishes the orders, waits until each has an outcome,
/// and checks them.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let orders = flags.usize("orders", 40).max(1);
    let backordered = flags.usize("backordered", 6);
    let stock_after = flags.u32("stock-after", 2);
    let malformed = flags.usize("malformed", 4);
    let poison = flags.usize("poison", 1);
    let limit = flags.u32("delivery-limit", 4).max(1);
    let consumers = flags.usize("consumers", 2).max(1);
    let seed = flags.u64("seed", 7);
    let kinds = kinds(
        orders,
        [
            (Kind::Backordered, backordered),
            (Kind::Malformed, malformed),
            (Kind::Poison, poison),
        ],
        seed,
    )?;
    // What must become of each kind: a backordered order is delivered once
    // per failed stock check and once more; past the limit it is dead.
    let expected = |kind: Kind| match kind {
        Kind::Plain => Fate::Processed,
        Kind::Backordered if stock_after < limit => Fate::Processed,
        Kind::Backordered => Fate::Dead(DeathReason::DeliveryLimit),
        Kind::Malformed => Fate::Dead(DeathReason::Rejected),
        Kind::Poison => Fate::Dead(DeathReason::DeliveryLimit),
    };

    let broker = Broker::new(rt);
    broker
        .declare_exchange(DLX, ExchangeOptions::fanout())
        .await?;
    broker.declare_queue(DEAD, QueueOptions::default()).await?;
    broker.bind_queue(DEAD, DLX, "").await?;
    let queue = broker
        .declare_queue(
            QUEUE,
            QueueOptions::default()
                .dead_letter_exchange(DLX)
                .delivery_limit(limit),
        )
        .await?;

    let shop = Arc::new(Shop {
        backorders: Mutex::new(
            kinds
                .iter()
                .enumerate()
                .filter(|(_, k)| **k == Kind::Backordered)
                .map(|(id, _)| (id as u32, stock_after))
                .collect(),
        ),
        outcomes: Mutex::new(BTreeMap::new()),
        requeued: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        crashes: AtomicU64::new(0),
        strangers: AtomicU64::new(0),
    });

    // The dead-letter queue's consumer: records each order's death.
    let dead_letters = broker
        .consume(DEAD, ConsumeOptions::manual(16), {
            let shop = shop.clone();
            move || {
                let shop = shop.clone();
                move |d: Delivery| {
                    let shop = shop.clone();
                    async move {
                        let id = d.header("order-id").and_then(|v| v.as_int());
                        let death = d.first_death().map(|death| (death.reason, death.count));
                        match (id.and_then(|id| u32::try_from(id).ok()), death) {
                            (Some(id), Some((reason, 1))) => {
                                shop.record(id, Fate::Dead(reason), 0);
                            }
                            // Not one of ours, or dead more than once.
                            _ => {
                                shop.strangers.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        d.ack().await?;
                        Ok::<(), Failure>(())
                    }
                }
            }
        })
        .await?;
    // Prefetch 1: a crashing consumer holds only the order it crashed on.
    // Each poison delivery is a crash, and the default backoff (10 ms
    // doubling to 30 s, reset only after a minute without a crash) would
    // soon keep both consumers down for seconds: a short cap keeps the
    // queue moving while the delivery limit deals with the poison.
    let options = ConsumeOptions::manual(1).backoff(
        Backoff::exponential(Duration::from_millis(1), Duration::from_millis(50)).immediate(1),
    );
    let mut processors = Vec::new();
    for _ in 0..consumers {
        let shop = shop.clone();
        processors.push(
            broker
                .consume(QUEUE, options.clone(), move || OrderProcessor {
                    shop: shop.clone(),
                })
                .await?,
        );
    }

    let started = Instant::now();
    for (id, kind) in kinds.iter().enumerate() {
        queue.publish(message(id as u32, *kind)?).await?;
    }
    // Until every order has an outcome and both queues are idle.
    let settled = loop {
        let accounted = shop.outcomes.lock().values().map(Vec::len).sum::<usize>();
        let main = queue.snapshot().await?.stats;
        let dead = broker.queue_stats(DEAD).await?.stats;
        let idle = |s: &postbox_actors::QueueStats| s.ready + s.unacked + s.delayed == 0;
        if accounted >= orders && idle(&main) && idle(&dead) {
            break true;
        }
        if started.elapsed() > PATIENCE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();

    let stats = queue.snapshot().await?.stats;
    let reports: Vec<_> = processors.iter().map(ConsumerHandle::report).collect();
    let crashes: u64 = reports.iter().map(|r| r.crashes).sum();
    let restarts: u64 = reports.iter().map(|r| r.restarts).sum();
    let outcomes = shop.outcomes.lock().clone();

    // Tally against the generated orders.
    let mut misplaced = Vec::new();
    let mut processed_first = 0;
    let mut processed_later = 0;
    let mut dead_by_reason = BTreeMap::<&str, usize>::new();
    for (id, kind) in kinds.iter().enumerate() {
        let got = outcomes.get(&(id as u32)).map(Vec::as_slice).unwrap_or(&[]);
        match got {
            [(fate, count)] if *fate == expected(*kind) => match fate {
                Fate::Processed if *count == 1 => processed_first += 1,
                Fate::Processed => processed_later += 1,
                Fate::Dead(reason) => *dead_by_reason.entry(reason.as_str()).or_default() += 1,
            },
            _ => misplaced.push(format!("order {id} ({kind:?}): {got:?}")),
        }
    }
    let strangers = outcomes.keys().filter(|id| **id as usize >= orders).count() as u64
        + shop.strangers.load(Ordering::Relaxed);
    let count_of = |kind: Kind| kinds.iter().filter(|k| **k == kind).count() as u64;
    let backordered_ok = stock_after < limit;
    let processed = processed_first + processed_later;
    let expect_processed = count_of(Kind::Plain)
        + if backordered_ok {
            count_of(Kind::Backordered)
        } else {
            0
        };
    let expect_limit = count_of(Kind::Poison)
        + if backordered_ok {
            0
        } else {
            count_of(Kind::Backordered)
        };
    let got_reason = |r: DeathReason| *dead_by_reason.get(r.as_str()).unwrap_or(&0) as u64;
    // Each backordered order fails its stock check `stock_after` times (or
    // on each of its `limit` deliveries, if that is fewer).
    let expect_nacks = count_of(Kind::Backordered) * u64::from(stock_after.min(limit));
    // The queue requeued every nack but those past the limit, and every
    // poison crash but the last of each.
    let expect_requeues = expect_nacks - (expect_limit - count_of(Kind::Poison))
        + count_of(Kind::Poison) * u64::from(limit - 1);
    let requeued = shop.requeued.load(Ordering::Relaxed);
    let rejected = shop.rejected.load(Ordering::Relaxed);
    let poison_crashes = shop.crashes.load(Ordering::Relaxed);

    let mut summary = Summary::new(format!(
        "manual acknowledgements: {orders} orders, {consumers} consumers, delivery limit {limit}"
    ));
    summary
        .line(format!(
            "orders: {} plain, {} backordered (stock after {stock_after} tries), {} malformed, {} poison",
            count_of(Kind::Plain),
            count_of(Kind::Backordered),
            count_of(Kind::Malformed),
            count_of(Kind::Poison),
        ))
        .line(format!(
            "processed and acked: {processed} ({processed_first} at the first try, {processed_later} after requeues); {requeued} nacks with requeue (out of stock)",
        ))
        .line(format!(
            "dead-lettered to {DEAD}: {} rejected (malformed: reject without requeue), {} at the delivery limit",
            got_reason(DeathReason::Rejected),
            got_reason(DeathReason::DeliveryLimit),
        ))
        .line(format!(
            "poison: {poison_crashes} panics in the pricing code, {crashes} consumer crashes, {restarts} restarts from the factory",
        ))
        .line(format!(
            "{QUEUE}: published {}, delivered {}, acked {}, requeued {}, rejected {}, over the delivery limit {}; settled in {}",
            stats.published,
            stats.delivered,
            stats.acknowledged,
            stats.requeued,
            stats.rejected,
            stats.delivery_limit,
            secs(elapsed),
        ));
    if !settled {
        summary.line(format!(
            "gave up waiting after {}: {} of {orders} orders accounted for",
            secs(PATIENCE),
            outcomes.values().map(Vec::len).sum::<usize>()
        ));
    }
    for m in misplaced.iter().take(5) {
        summary.line(format!("unexpected: {m}"));
    }
    summary
        .check(
            format!(
                "every order accounted for exactly once, as processed or dead-lettered with its expected reason ({} misplaced)",
                misplaced.len() as u64 + strangers
            ),
            misplaced.is_empty() && strangers == 0,
        )
        .check(
            format!(
                "counts match the inputs: {processed} processed of {expect_processed}, {} rejected of {}, {} at the delivery limit of {expect_limit}",
                got_reason(DeathReason::Rejected),
                count_of(Kind::Malformed),
                got_reason(DeathReason::DeliveryLimit),
            ),
            processed as u64 == expect_processed
                && got_reason(DeathReason::Rejected) == count_of(Kind::Malformed)
                && got_reason(DeathReason::DeliveryLimit) == expect_limit
                && rejected == count_of(Kind::Malformed)
                && stats.rejected == rejected
                && stats.delivery_limit == expect_limit,
        )
        .check(
            format!(
                "business errors requeued exactly while out of stock: {requeued} nacks of {expect_nacks}"
            ),
            requeued == expect_nacks,
        )
        .check(
            format!(
                "each poison order crashed a consumer on each of its {limit} deliveries, then stopped at the limit: {crashes} crashes of {}",
                count_of(Kind::Poison) * u64::from(limit)
            ),
            crashes == count_of(Kind::Poison) * u64::from(limit)
                && poison_crashes == crashes
                && stats.acknowledged == processed as u64
                && stats.requeued == expect_requeues,
        );

    // Deleting the queues cancels their consumers.
    drop((processors, dead_letters));
    for name in [QUEUE, DEAD] {
        broker.delete_queue(name, DeleteOptions::default()).await?;
    }
    broker.delete_exchange(DLX, false).await?;
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    support::quiet_panics_from(file!());
    let flags = Flags::from_args();
    let rt = Runtime::new()?;
    let summary = run(&rt.handle(), &flags).await?;
    rt.shutdown();
    summary.exit()
}
