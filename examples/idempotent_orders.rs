//! Duplicate consumption: every order is charged exactly once, although the
//! producer publishes some orders twice and consumers crash after charging.
//!
//! From section 6 of the seed tutorial (重复消费处理, "duplicate
//! consumption"): its `IdempotentOrderService` claims each message in Redis
//! (`setIfAbsent(lockKey, "processing", 5 min)`), checks that the order does
//! not exist yet, and relies on the database's unique constraint as the last
//! guard ("Redis for speed, the database as the last guard"). Duplicates come
//! from two places, and postbox stops each where it arises:
//!
//! - **producer retries**: a producer that lost a confirm publishes the same
//!   order again. Each order's message id is derived from the order id
//!   (`MessageId::for_key`), so the retry carries the same id, and the
//!   queue's duplicate window (`QueueOptions::dedup(DedupWindow::new(..))`)
//!   refuses it with `BrokerError::Duplicate`, which the producer counts as
//!   success. A window is bounded: when the producer restarts and replays
//!   the oldest orders of its outbox, their ids are past the window
//!   (`--window` ids), and those duplicates reach the consumers;
//! - **crashes after processing**: a consumer charges the order and then
//!   crashes before its ack, so the queue redelivers the order. The consumers
//!   run behind the idempotency layer (`postbox_actors::idempotency::Idempotent`,
//!   keyed by the order id): it claims the order before the handler runs,
//!   records it done once the handler succeeded and only then acks. A
//!   duplicate (a replay, a redelivery) finds the order done and is acked
//!   without running the handler. Unlike the seed's `finally { delete(lockKey) }`,
//!   which frees the key for the next duplicate, the claim becomes a record.
//!
//! Which stores run depends on the environment (the summary says which):
//!
//! - **claims**: Redis (`RedisStore`) when `REDIS_URL` is set, else memory
//!   (`MemoryStore`);
//! - **charges**: with `POSTGRES_URL` set, the charge is a row inserted in
//!   PostgreSQL by the transactional inbox (`PostgresStore::inbox`): the
//!   order's key and the charge commit in one transaction, the seed's
//!   database guard. A consumer then crashes *between* its insert and the
//!   commit: the transaction rolls back with the crash, and the redelivery
//!   charges once. Without it, charges are kept in memory, and a consumer
//!   crashes after the layer recorded the order done, before its ack (the
//!   one place a crash after a side effect is safe without a transaction):
//!   the redelivery is skipped.
//!
//! It checks that every order was charged exactly once (counting the
//! charges: in memory, or the rows in PostgreSQL), that every retry was
//! refused by the window (as the queue's statistics say too), that every
//! duplicate that reached the consumers was skipped, and that the planned
//! crashes happened.
//!
//! Run it with `cargo run --release --example idempotent_orders -- --orders 200`,
//! or against servers:
//! `REDIS_URL=redis://127.0.0.1:6379 POSTGRES_URL="host=127.0.0.1 user=postgres dbname=test" cargo run --release --example idempotent_orders`.
//!
//! Flags (defaults in brackets):
//! - `--orders N`: orders to publish [200];
//! - `--retry-pct N`: percent of orders the producer publishes twice at once [20];
//! - `--window N`: message ids the queue's duplicate window remembers [50];
//! - `--replays N`: oldest orders the producer replays after "restarting" [20];
//! - `--crash-pct N`: percent of orders whose consumer crashes after charging [10];
//! - `--consumers N`: competing consumers [3];
//! - `--seed N`: which orders are retried and crashed on [5];
//! - `--memory`: use the memory stores even if `REDIS_URL`/`POSTGRES_URL` are set.

#[path = "support/mod.rs"]
pub mod support;

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::{Backoff, Failure, Runtime, RuntimeHandle};
use postbox_actors::idempotency::postgres::tokio_postgres::{self, NoTls, Transaction};
use postbox_actors::idempotency::postgres::{PostgresOptions, PostgresStore};
use postbox_actors::idempotency::redis::RedisStore;
use postbox_actors::idempotency::{
    Claim, ClaimToken, IdempotencyError, IdempotencyStats, IdempotencyStore, Idempotent,
    MemoryStore,
};
use postbox_actors::testkit::CrashAfterRecord;
use postbox_actors::{
    Broker, BrokerError, ConsumeOptions, ConsumerReport, DedupWindow, DeleteOptions, Delivery,
    Envelope, LayerExt, MessageId, QueueOptions,
};
use serde::{Deserialize, Serialize};
use support::{Flags, Summary, secs};

/// The seed's queue.
const QUEUE: &str = "order.create";
/// The idempotency keys' namespace: keys are `orders:{order id}`.
const NAMESPACE: &str = "orders";
/// How long a done order is remembered (in Redis, the keys then expire).
const RETAIN: Duration = Duration::from_secs(600);
/// Gives up waiting for the queue to drain after this long (a guard against
/// a hang: the checks count, they do not time).
const PATIENCE: Duration = Duration::from_secs(30);

/// The seed's `OrderMessage` (its message id is the envelope's).
#[derive(Debug, Serialize, Deserialize)]
struct OrderMessage {
    order_id: String,
    user_id: u32,
    amount_cents: u64,
}

/// The order id a delivery is about: the idempotency key.
fn order_id(d: &Delivery) -> Option<String> {
    d.header("order-id")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// Where the idempotency layer claims orders: Redis or memory.
enum Claims {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl IdempotencyStore for Claims {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        match self {
            Claims::Memory(s) => s.claim(key, token, lease).await,
            Claims::Redis(s) => s.claim(key, token, lease).await,
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        match self {
            Claims::Memory(s) => s.complete(key, token, retain).await,
            Claims::Redis(s) => s.complete(key, token, retain).await,
        }
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        match self {
            Claims::Memory(s) => s.release(key, token).await,
            Claims::Redis(s) => s.release(key, token).await,
        }
    }
}

/// The crashes to inject: the orders (ids) whose consumer crashes once
/// after charging, and how many did.
#[derive(Default)]
struct Crashes {
    planned: Mutex<HashSet<String>>,
    done: AtomicU64,
}

impl Crashes {
    /// Crashes the consumer (a panic: postbox requeues what it held and
    /// restarts it) if `order` is planned to, the first time only.
    fn maybe_crash(&self, order: &str, when: &str) {
        if self.take(order) {
            panic!("simulated crash of the consumer of {order} {when}");
        }
    }

    /// Whether `order` is planned to crash its consumer now (the first
    /// time only); counts the crash.
    fn take(&self, order: &str) -> bool {
        let planned = self.planned.lock().remove(order);
        if planned {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        planned
    }
}

/// Where charges go: memory, or rows in PostgreSQL through the
/// transactional inbox.
enum Ledger {
    Memory(Arc<Mutex<HashMap<String, u64>>>),
    Postgres {
        store: PostgresStore,
        admin: tokio_postgres::Client,
        charges: String,
    },
}

impl Ledger {
    /// How many times each order was charged.
    async fn charges(&self) -> Result<HashMap<String, u64>, Box<dyn Error>> {
        match self {
            Ledger::Memory(charges) => Ok(charges.lock().clone()),
            Ledger::Postgres { admin, charges, .. } => {
                let sql = format!("SELECT order_id, count(*) FROM {charges} GROUP BY order_id");
                let rows = admin.query(&sql, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                    .collect())
            }
        }
    }

    /// Drops the example's tables.
    async fn clean_up(&self) -> Result<(), Box<dyn Error>> {
        if let Ledger::Postgres {
            store,
            admin,
            charges,
        } = self
        {
            let sql = format!("DROP TABLE IF EXISTS {charges}, {}", store.table());
            admin.batch_execute(&sql).await?;
        }
        Ok(())
    }
}

/// Connects to PostgreSQL at `url`: the inbox store on a table of its own,
/// a client for the example's own SQL, and a charges table (no unique
/// constraint: a double charge would show as two rows).
async fn postgres(url: &str, run: &str) -> Result<Ledger, Box<dyn Error>> {
    let inbox = format!("postbox_example_inbox_{run}");
    let charges = format!("postbox_example_charges_{run}");
    let (admin, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "CREATE TABLE {charges} (order_id text NOT NULL, amount_cents bigint NOT NULL)"
        ))
        .await?;
    let store = PostgresStore::connect_with(url, PostgresOptions::new().table(&inbox)?).await?;
    Ok(Ledger::Postgres {
        store,
        admin,
        charges,
    })
}

/// A small seeded generator (splitmix64), for the retries and crashes.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs the example: publishes the orders (with retries and replays),
/// waits until the queue is drained, and checks the charges.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let orders = flags.usize("orders", 200).max(1);
    let retry_pct = flags.u64("retry-pct", 20).min(100);
    let window = flags.usize("window", 50).max(1);
    let replays = flags.usize("replays", 20).min(orders);
    let crash_pct = flags.u64("crash-pct", 10).min(100);
    let consumers = flags.usize("consumers", 3).max(1);
    let seed = flags.u64("seed", 5);
    let memory_only = flags.switch("memory");
    let run_id = MessageId::new().as_uuid().simple().to_string()[..12].to_owned();

    // The stores: servers if configured and reachable, memory otherwise.
    let mut notes = Vec::new();
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !memory_only && !v.is_empty())
    };
    let claims = match env("REDIS_URL") {
        Some(url) => match RedisStore::connect(&url).await {
            Ok(store) => {
                notes.push("claims in Redis (RedisStore, REDIS_URL)".to_owned());
                Claims::Redis(store.prefix(format!("postbox-example:{run_id}:")))
            }
            Err(err) => {
                notes.push(format!("REDIS_URL unusable ({err}): claims in memory"));
                Claims::Memory(MemoryStore::new(orders * 2))
            }
        },
        None => {
            notes.push("claims in memory (MemoryStore; set REDIS_URL for Redis)".to_owned());
            Claims::Memory(MemoryStore::new(orders * 2))
        }
    };
    let ledger = match env("POSTGRES_URL") {
        Some(url) => match postgres(&url, &run_id).await {
            Ok(ledger) => {
                notes.push(
                    "charges in PostgreSQL, by the transactional inbox (POSTGRES_URL)".to_owned(),
                );
                ledger
            }
            Err(err) => {
                notes.push(format!("POSTGRES_URL unusable ({err}): charges in memory"));
                Ledger::Memory(Arc::default())
            }
        },
        None => {
            notes.push(
                "charges in memory (set POSTGRES_URL for the transactional inbox)".to_owned(),
            );
            Ledger::Memory(Arc::default())
        }
    };
    let transactional = matches!(ledger, Ledger::Postgres { .. });

    // Which orders the producer retries, and which crash their consumer.
    let mut state = seed;
    let mut retried = Vec::new();
    let crashes = Arc::new(Crashes::default());
    for i in 0..orders {
        if splitmix(&mut state) % 100 < retry_pct {
            retried.push(i);
        }
        if splitmix(&mut state) % 100 < crash_pct {
            crashes.planned.lock().insert(format!("order-{i}"));
        }
    }
    let planned_crashes = crashes.planned.lock().len() as u64;

    let broker = Broker::new(rt);
    let dedup = DedupWindow::new(Duration::from_secs(300)).max_ids(window);
    let queue = broker
        .declare_queue(QUEUE, QueueOptions::default().dedup(dedup))
        .await?;

    // The idempotency layer. With the transactional inbox, the crashes are
    // the inbox handler's, and the claim store does not crash.
    let layer_crashes = if transactional {
        Arc::default()
    } else {
        crashes.clone()
    };
    // The consumer crashes right after the layer recorded a planned order
    // done, before the ack: what a process that dies there looks like to the
    // queue.
    let claims = CrashAfterRecord::new(claims, move |key: &str| {
        let order = key.strip_prefix(NAMESPACE).unwrap_or(key);
        layer_crashes.take(order.trim_start_matches(':'))
    });
    let layer = Idempotent::by_key(claims, order_id)
        .namespace(NAMESPACE)
        .lease(Duration::from_secs(30))
        .retain(RETAIN)
        .busy_retry(Duration::from_millis(10));
    // A crash requeues what the consumer held and restarts it; a short
    // backoff cap keeps a run with many crashes quick (the default doubles
    // to 30 s over a minute of crashes).
    let options = ConsumeOptions::manual(8).backoff(
        Backoff::exponential(Duration::from_millis(1), Duration::from_millis(50)).immediate(1),
    );
    let attempts = Arc::new(AtomicU64::new(0));
    let mut reports: Vec<Box<dyn Fn() -> ConsumerReport>> = Vec::new();
    let mut inbox_stats: Option<Box<dyn Fn() -> IdempotencyStats>> = None;
    match &ledger {
        Ledger::Memory(charges) => {
            let charge = {
                let (charges, attempts) = (charges.clone(), attempts.clone());
                move || {
                    let (charges, attempts) = (charges.clone(), attempts.clone());
                    move |d: Delivery| {
                        let (charges, attempts) = (charges.clone(), attempts.clone());
                        async move {
                            let order: OrderMessage = d.decode()?;
                            // The side effect: charge the customer.
                            attempts.fetch_add(1, Ordering::Relaxed);
                            *charges.lock().entry(order.order_id).or_default() += 1;
                            // The layer records the order done, then acks.
                            Ok::<(), Failure>(())
                        }
                    }
                }
            };
            for _ in 0..consumers {
                let consumer = broker
                    .consume(QUEUE, options.clone(), charge.clone().layer(layer.clone()))
                    .await?;
                reports.push(Box::new(move || consumer.report()));
            }
        }
        Ledger::Postgres { store, charges, .. } => {
            let insert = format!("INSERT INTO {charges} (order_id, amount_cents) VALUES ($1, $2)");
            let inbox = store
                .inbox({
                    let (crashes, attempts) = (crashes.clone(), attempts.clone());
                    async move |d: &Delivery, tx: &Transaction<'_>| -> Result<(), Failure> {
                        let order: OrderMessage = d.decode()?;
                        // The side effect, in the transaction that records the key.
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let amount = i64::try_from(order.amount_cents)?;
                        tx.execute(&insert, &[&order.order_id, &amount]).await?;
                        // A crash here rolls back the charge with the key.
                        crashes.maybe_crash(&order.order_id, "after charging, before the commit");
                        Ok(())
                    }
                })
                .by_key(order_id)
                .namespace(NAMESPACE)
                .retain(RETAIN)
                .busy_retry(Duration::from_millis(10));
            for _ in 0..consumers {
                let consumer = broker
                    .consume(QUEUE, options.clone(), inbox.clone().layer(layer.clone()))
                    .await?;
                reports.push(Box::new(move || consumer.report()));
            }
            inbox_stats = Some(Box::new(move || inbox.stats()));
        }
    }

    // The producer: each order once, some retried at once (a lost confirm),
    // then the oldest few replayed (a restart that resends its outbox).
    let started = Instant::now();
    let message = |i: usize| -> Result<Envelope, Box<dyn Error>> {
        let order = OrderMessage {
            order_id: format!("order-{i}"),
            user_id: 1 + (i as u32 % 37),
            amount_cents: 500 + 10 * i as u64,
        };
        Ok(Envelope::encode(&order)?
            .with_id(MessageId::for_key(&order.order_id))
            .with_header("order-id", order.order_id))
    };
    let mut refused = 0u64;
    let mut retries_passed = 0u64;
    let mut retried = retried.into_iter().peekable();
    for i in 0..orders {
        queue.publish(message(i)?).await?;
        if retried.next_if_eq(&i).is_some() {
            match queue.publish(message(i)?).await {
                // Already accepted: the producer counts it as published.
                Err(BrokerError::Duplicate(_)) => refused += 1,
                Ok(()) => retries_passed += 1,
                Err(other) => return Err(other.into()),
            }
        }
    }
    let retries = refused + retries_passed;
    let (mut replays_passed, mut replays_refused) = (0u64, 0u64);
    for i in 0..replays {
        match queue.publish(message(i)?).await {
            Ok(()) => replays_passed += 1,
            Err(BrokerError::Duplicate(_)) => replays_refused += 1,
            Err(other) => return Err(other.into()),
        }
    }

    // Until the queue is drained: every delivery settled.
    let drained = loop {
        let s = queue.snapshot().await?.stats;
        if s.ready + s.unacked + s.delayed == 0 && s.acknowledged >= s.published {
            break true;
        }
        if started.elapsed() > PATIENCE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    let stats = queue.snapshot().await?.stats;
    let charged = ledger.charges().await?;
    let layer_stats = layer.stats();
    let inbox = inbox_stats.as_ref().map(|s| s());
    let crashed: u64 = reports.iter().map(|r| r().crashes).sum();
    let crashes_done = crashes.done.load(Ordering::Relaxed);

    let once = (0..orders)
        .filter(|i| charged.get(&format!("order-{i}")) == Some(&1))
        .count();
    let twice = charged.values().filter(|n| **n > 1).count();
    let strangers = charged
        .keys()
        .filter(|k| {
            k.strip_prefix("order-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_none_or(|n| n >= orders)
        })
        .count();
    let never = (0..orders)
        .filter(|i| !charged.contains_key(&format!("order-{i}")))
        .count();
    let skipped = layer_stats.skipped + inbox.map_or(0, |s| s.skipped);
    // Duplicates that reached the consumers: the replays past the window,
    // and (without a transaction) the redeliveries after a crash.
    let expect_skipped = replays_passed + if transactional { 0 } else { crashes_done };

    let mut summary = Summary::new(format!(
        "idempotent consumers: {orders} orders, {consumers} consumers"
    ));
    summary
        .line(notes.join("; "))
        .line(format!(
            "producer: {orders} orders, {retries} retried at once ({refused} refused as duplicates by the window of {window} ids), {replays} replayed after a restart ({replays_passed} got past the window)",
        ))
        .line(if transactional {
            format!(
                "consumers: {crashed} crashes after charging, before the commit: {} charges inserted, {} rolled back with their crash",
                attempts.load(Ordering::Relaxed),
                inbox.map_or(0, |s| s.released),
            )
        } else {
            format!(
                "consumers: {crashed} crashes after recording an order done, before the ack: each redelivered, and skipped"
            )
        })
        .line(format!(
            "idempotency layer: {} claimed, {} recorded done{}, {} duplicates skipped, {} requeued while another consumer held the order, {} claims released",
            layer_stats.claimed,
            layer_stats.completed,
            if transactional {
                String::new()
            } else {
                format!(" (and {crashes_done} more, each just before its crash)")
            },
            skipped,
            layer_stats.busy + inbox.map_or(0, |s| s.busy),
            layer_stats.released,
        ))
        .line(format!(
            "{QUEUE}: published {}, delivered {}, redelivered {}, acked {}; drained in {}",
            stats.published,
            stats.delivered,
            stats.redelivered,
            stats.acknowledged,
            secs(elapsed),
        ));
    if !drained {
        summary.line(format!(
            "gave up waiting after {}: {} ready, {} unacked",
            secs(PATIENCE),
            stats.ready,
            stats.unacked
        ));
    }
    summary
        .check(
            format!(
                "every order charged exactly once: {once} of {orders} ({twice} more than once, {never} never, {strangers} unknown)"
            ),
            once == orders && twice == 0 && strangers == 0,
        )
        .check(
            format!(
                "every producer retry refused by the duplicate window: {refused} of {retries} (the queue counted {} duplicates, with {replays_refused} replays refused)",
                stats.duplicates
            ),
            retries_passed == 0 && stats.duplicates == refused + replays_refused,
        )
        .check(
            format!(
                "every duplicate that reached the consumers skipped, not charged: {skipped} of {expect_skipped}"
            ),
            skipped == expect_skipped,
        )
        .check(
            format!(
                "the planned crashes happened and the consumers restarted: {crashed} of {planned_crashes}"
            ),
            crashed == planned_crashes
                && crashes_done == planned_crashes
                && (!transactional
                    || inbox.is_some_and(|s| s.released == planned_crashes)
                        && attempts.load(Ordering::Relaxed) == orders as u64 + planned_crashes),
        );

    // Deleting the queue cancels its consumers.
    broker.delete_queue(QUEUE, DeleteOptions::default()).await?;
    ledger.clean_up().await?;
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
