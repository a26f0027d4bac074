//! The PostgreSQL idempotency store and the transactional inbox against a
//! real server: `POSTGRES_URL`, or `host=127.0.0.1 user=postgres
//! dbname=test`. The store: the storm of 10,000 orders published three times
//! with crashes, one winner among concurrent claims, an expired claim taken
//! over, an unreachable, silent or blocked server as a typed error within
//! the timeout, bad keys and table names refused, the password never shown.
//! The inbox: 10,000 orders three times with handler errors and panics
//! between the handler's own insert and the commit, every order charged once;
//! two consumers with one key at once run the handler once; a failing
//! database never acks. Each test uses tables of its own and drops them.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postbox::{Backoff, Failure, Runtime};
use postbox_actors::idempotency::postgres::{PostgresOptions, PostgresStore, TransactionalInbox};
use postbox_actors::idempotency::{
    Claim, ClaimToken, IdempotencyError, IdempotencyStats, IdempotencyStore, MAX_KEY_LEN,
};
use postbox_actors::{
    Broker, ConsumeOptions, Delivery, Envelope, MessageId, OnError, QueueOptions,
};
use tokio_postgres::{Client, NoTls, Transaction};

mod common;
use common::orders::exactly_once_orders;

fn url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".to_owned())
}

/// A table name no other test run shares.
fn unique(name: &str) -> String {
    format!(
        "postbox_test_{name}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A plain connection, for the tests' own SQL.
async fn admin() -> Client {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn drop_tables(tables: &[&str]) {
    let admin = admin().await;
    for table in tables {
        admin
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
            .unwrap();
    }
}

async fn store(table: &str) -> PostgresStore {
    PostgresStore::connect_with(&url(), PostgresOptions::new().table(table).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_three_times_with_crashes_postgres_store() {
    let table = unique("storm");
    let rt = Runtime::with_arbiters(2).unwrap();
    let queue = format!("orders-postgres-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let storm = exactly_once_orders(&rt.handle(), &queue, store(&table).await, 10_000, 21).await;
    eprintln!("postgres storm: {storm:?} in {:?}", started.elapsed());
    assert!(storm.panics > 0 && storm.errors > 0, "{storm:?}");
    assert!(storm.stats.released > 0, "{storm:?}");
    rt.shutdown();
    let done: i64 = admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {table} WHERE done"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 10_000);
    drop_tables(&[&table]).await;
}

#[test]
fn concurrent_claims_of_one_key_from_many_threads_have_one_winner() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = unique("race");
    let store = Arc::new(rt.block_on(store(&table)));
    for round in 0..50 {
        let key = format!("key-{round}");
        let outcomes: Vec<Claim> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (store, key) = (store.clone(), key.clone());
                    s.spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(store.claim(&key, ClaimToken::new(), Duration::from_secs(60)))
                            .unwrap()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let winners = outcomes
            .iter()
            .filter(|c| matches!(c, Claim::Acquired { .. }))
            .count();
        assert_eq!(winners, 1, "round {round}: {outcomes:?}");
    }
    // Concurrent claims of an *expired* claim: one takes it over.
    rt.block_on(async {
        let lease = Duration::from_millis(50);
        assert!(matches!(
            store.claim("stale", ClaimToken::new(), lease).await,
            Ok(Claim::Acquired { .. })
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .claim("stale", ClaimToken::new(), Duration::from_secs(60))
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap().unwrap());
        }
        let took_over = outcomes
            .iter()
            .filter(|c| **c == Claim::Acquired { expired: true })
            .count();
        let busy = outcomes.iter().filter(|c| **c == Claim::Busy).count();
        assert_eq!((took_over, busy), (1, 15), "{outcomes:?}");
    });
    rt.block_on(drop_tables(&[&table]));
}

#[tokio::test]
async fn an_expired_claim_is_taken_over_and_the_old_token_can_neither_complete_nor_release() {
    let table = unique("expiry");
    let store = store(&table).await;
    let (a, b, c) = (ClaimToken::new(), ClaimToken::new(), ClaimToken::new());
    // Real time on the server's clock: wide margins, so that a loaded machine
    // does not see a lease run out between two calls.
    let short = Duration::from_secs(1);
    let long = Duration::from_secs(60);
    assert_eq!(
        store.claim("k", a, short).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.claim("k", b, long).await, Ok(Claim::Busy));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // a's lease ran out (by the database's clock): b takes over, and says so.
    assert_eq!(
        store.claim("k", b, long).await,
        Ok(Claim::Acquired { expired: true })
    );
    assert_eq!(store.release("k", a).await, Ok(false));
    assert_eq!(store.complete("k", a, long).await, Ok(false));
    assert_eq!(
        store.claim("k", c, long).await,
        Ok(Claim::Busy),
        "b still holds it"
    );
    assert_eq!(
        store.complete("k", b, Duration::from_secs(1)).await,
        Ok(true)
    );
    assert_eq!(store.claim("k", c, long).await, Ok(Claim::Done));
    assert_eq!(store.release("k", b).await, Ok(false));
    assert_eq!(store.complete("k", c, long).await, Ok(false));
    // The retention ends: free again, and not an expired *claim*.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        store.claim("k", c, long).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.release("k", c).await, Ok(true));
    assert_eq!(
        store.claim("k", a, long).await,
        Ok(Claim::Acquired { expired: false })
    );
    // Completing a key nobody holds records it.
    assert_eq!(store.complete("other", a, long).await, Ok(true));
    assert_eq!(store.claim("other", b, long).await, Ok(Claim::Done));
    // Purging removes only what expired.
    assert_eq!(
        store.complete("brief", a, Duration::from_millis(50)).await,
        Ok(true)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.purge_expired().await, Ok(1));
    assert_eq!(store.claim("other", b, long).await, Ok(Claim::Done));
    drop_tables(&[&table]).await;
}

#[tokio::test]
async fn bad_keys_and_table_names_are_typed_errors() {
    let table = unique("keys");
    let store = store(&table).await;
    let t = ClaimToken::new();
    let lease = Duration::from_secs(1);
    let long = "x".repeat(MAX_KEY_LEN + 1);
    assert_eq!(
        store.claim("", t, lease).await,
        Err(IdempotencyError::EmptyKey)
    );
    assert_eq!(
        store.complete("", t, lease).await,
        Err(IdempotencyError::EmptyKey)
    );
    assert_eq!(store.release("", t).await, Err(IdempotencyError::EmptyKey));
    let too_long = IdempotencyError::KeyTooLong {
        len: MAX_KEY_LEN + 1,
        limit: MAX_KEY_LEN,
    };
    assert_eq!(store.claim(&long, t, lease).await, Err(too_long.clone()));
    assert_eq!(store.complete(&long, t, lease).await, Err(too_long.clone()));
    assert_eq!(store.release(&long, t).await, Err(too_long));
    // Any text is a key: quotes and SQL are data.
    let sql = "'); DROP TABLE users; --".to_owned() + &"é".repeat(200);
    assert_eq!(
        store.claim(&sql, t, lease).await,
        Ok(Claim::Acquired { expired: false })
    );
    assert_eq!(store.complete(&sql, t, lease).await, Ok(true));
    assert_eq!(store.claim(&sql, t, lease).await, Ok(Claim::Done));
    // Table names: plain SQL identifiers only.
    for bad in [
        "",
        "Inbox",
        "inbox; drop table x",
        "a.b.c",
        "1st",
        "in box",
        "\"x\"",
    ] {
        let refused = PostgresOptions::new().table(bad).unwrap_err();
        assert_eq!(refused.name(), bad);
    }
    assert!(PostgresOptions::new().table("public.postbox_inbox").is_ok());
    // A table that is not an inbox table: refused when connecting.
    let other = unique("other");
    admin()
        .await
        .batch_execute(&format!("CREATE TABLE {other} (id int)"))
        .await
        .unwrap();
    match PostgresStore::connect_with(&url(), PostgresOptions::new().table(&other).unwrap()).await {
        Err(IdempotencyError::Unavailable {
            store: "postgres",
            message,
        }) => {
            assert!(message.contains(&other), "{message}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    drop_tables(&[&table, &other]).await;
}

fn unavailable_message(result: Result<PostgresStore, IdempotencyError>) -> String {
    match result {
        Err(IdempotencyError::Unavailable {
            store: "postgres",
            message,
        }) => message,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_silent_or_blocked_server_is_a_typed_error_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let options = PostgresOptions::new().timeout(timeout);
    // Nothing listens: refused.
    let started = Instant::now();
    let refused = PostgresStore::connect_with(
        "host=127.0.0.1 port=1 user=postgres password=s3cr3t-pa55 dbname=test",
        options.clone(),
    )
    .await;
    let message = unavailable_message(refused);
    assert!(!message.contains("s3cr3t-pa55"), "{message}");
    assert!(
        started.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    eprintln!("refused: {message}");
    // Something listens and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let hung = PostgresStore::connect_with(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=test"),
        PostgresOptions::new().timeout(timeout),
    )
    .await;
    let message = unavailable_message(hung);
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    eprintln!("silent: {message}");
    drop(silent);
    // Not a connection string.
    unavailable_message(PostgresStore::connect("port=notaport").await);
    // A statement blocked by another transaction's row lock: the timeout,
    // and the store goes on.
    let table = unique("blocked");
    let store = PostgresStore::connect_with(
        &url(),
        PostgresOptions::new()
            .table(&table)
            .unwrap()
            .timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let mut admin = admin().await;
    let tx = admin.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {table} (key, done, expires_at) VALUES ('held', true, now() + interval '1 hour')"),
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    let blocked = store
        .claim("held", ClaimToken::new(), Duration::from_secs(60))
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(&blocked, Err(IdempotencyError::Unavailable { store: "postgres", message }) if message.contains("within")),
        "{blocked:?}"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    // The timed-out statement was cancelled on the server, not left
    // waiting to take effect once the lock is free.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND position($1 in query) > 0",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the blocked claim still waits on the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.rollback().await.unwrap();
    assert_eq!(
        store
            .claim("held", ClaimToken::new(), Duration::from_secs(60))
            .await,
        Ok(Claim::Acquired { expired: false })
    );
    drop_tables(&[&table]).await;
}

#[tokio::test]
async fn the_password_never_shows_in_debug_output_or_errors() {
    let table = unique("secret");
    // Trust authentication ignores the password: the store connects.
    let with_password = format!("{} password=hunter2-s3cr3t", url());
    let store = PostgresStore::connect_with(
        &with_password,
        PostgresOptions::new().table(&table).unwrap(),
    )
    .await
    .unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.contains("hunter2-s3cr3t"), "{shown}");
    assert!(shown.contains(&table), "{shown}");
    // An error mentioning it (a database that does not exist): scrubbed.
    let missing = PostgresStore::connect(
        "host=127.0.0.1 user=postgres password=hunter2-s3cr3t dbname=hunter2-s3cr3t",
    )
    .await;
    let message = unavailable_message(missing);
    assert!(!message.contains("hunter2-s3cr3t"), "{message}");
    drop_tables(&[&table]).await;
}

/// The inbox tests' setup: an inbox table, an `orders_charged` table, a
/// broker with a queue.
struct Shop {
    rt: Runtime,
    broker: Broker,
    queue: String,
    store: PostgresStore,
    inbox_table: String,
    charged: Arc<str>,
}

impl Shop {
    async fn open(name: &str, queue_options: QueueOptions) -> Shop {
        let rt = Runtime::with_arbiters(2).unwrap();
        let inbox_table = unique(&format!("{name}_inbox"));
        let charged = unique(&format!("{name}_charged"));
        admin()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {charged} (order_id bigint NOT NULL, charged_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .unwrap();
        let store = store(&inbox_table).await;
        let broker = Broker::new(&rt.handle());
        let queue = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        broker.declare_queue(&queue, queue_options).await.unwrap();
        Shop {
            rt,
            broker,
            queue,
            store,
            inbox_table,
            charged: Arc::from(charged),
        }
    }

    /// (rows, distinct orders) charged.
    async fn charged(&self) -> (i64, i64) {
        let row = admin()
            .await
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT order_id) FROM {}",
                    self.charged
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Waits until the queue is empty and `done` holds.
    async fn drained(&self, done: impl Fn() -> bool, within: Duration) {
        let queue = self.broker.queue(&self.queue).unwrap();
        let deadline = Instant::now() + within;
        loop {
            let snap = queue.snapshot().await.unwrap();
            if done() && snap.stats.ready == 0 && snap.stats.unacked == 0 && snap.stats.delayed == 0
            {
                return;
            }
            assert!(Instant::now() < deadline, "not drained: {:?}", snap.stats);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(self) {
        self.broker
            .delete_queue(&self.queue, Default::default())
            .await
            .ok();
        self.rt.shutdown();
        drop_tables(&[&self.inbox_table, &self.charged]).await;
    }
}

fn options() -> ConsumeOptions {
    ConsumeOptions::manual(16)
        .restarts(usize::MAX, Duration::from_secs(1))
        .backoff(Backoff::NONE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_inbox_charges_ten_thousand_orders_published_three_times_once_despite_errors_and_panics()
 {
    const ORDERS: u32 = 10_000;
    let shop = Shop::open("tx_storm", QueueOptions::default()).await;
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(31)));
    let (errors, panics) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let inbox = shop.store.inbox({
        let (rng, errors, panics, charged) = (
            rng.clone(),
            errors.clone(),
            panics.clone(),
            shop.charged.clone(),
        );
        async move |d: &Delivery, tx: &Transaction<'_>| -> Result<(), Failure> {
            let order: u32 = d.decode()?;
            tx.execute(
                &format!("INSERT INTO {charged} (order_id) VALUES ($1)"),
                &[&i64::from(order)],
            )
            .await?;
            // After the side effect, before the commit: a failure or a crash
            // must take the side effect back with the key.
            let roll = rng.lock().u32(0..100);
            if roll < 5 {
                errors.fetch_add(1, Ordering::Relaxed);
                return Err(Failure::msg(format!("declined {order}")));
            }
            if roll < 8 {
                panics.fetch_add(1, Ordering::Relaxed);
                panic!("crash after charging {order}, before the commit");
            }
            Ok(())
        }
    });
    let mut consumers = Vec::new();
    for _ in 0..4 {
        consumers.push(
            shop.broker
                .consume(&shop.queue, options(), inbox.clone())
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let queue = shop.broker.queue(&shop.queue).unwrap();
    let ids: Vec<MessageId> = (0..ORDERS).map(|_| MessageId::new()).collect();
    for _round in 0..3 {
        for (order, id) in ids.iter().enumerate() {
            queue
                .publish(Envelope::encode(&(order as u32)).unwrap().with_id(*id))
                .await
                .unwrap();
        }
    }
    shop.drained(
        || inbox.stats().completed >= u64::from(ORDERS),
        Duration::from_secs(300),
    )
    .await;
    let stats = inbox.stats();
    eprintln!(
        "transactional inbox storm: {stats:?}, {} errors, {} panics, in {:?}",
        errors.load(Ordering::Relaxed),
        panics.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert_eq!(
        shop.charged().await,
        (i64::from(ORDERS), i64::from(ORDERS)),
        "each order charged once"
    );
    assert_eq!(stats.completed, u64::from(ORDERS), "{stats:?}");
    assert!(stats.skipped >= 2 * u64::from(ORDERS), "{stats:?}");
    assert!(errors.load(Ordering::Relaxed) > 0 && panics.load(Ordering::Relaxed) > 0);
    // Every failure and crash rolled back (and was counted so).
    assert_eq!(
        stats.released,
        errors.load(Ordering::Relaxed) + panics.load(Ordering::Relaxed),
        "{stats:?}"
    );
    assert_eq!(stats.claimed, stats.completed + stats.released, "{stats:?}");
    assert_eq!(stats.store_errors, 0, "{stats:?}");
    let done: i64 = admin()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {} WHERE done", shop.inbox_table),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, i64::from(ORDERS));
    for consumer in consumers {
        consumer.close().await;
    }
    shop.close().await;
}

/// A handler for the concurrency tests: charges the order in the delivery's
/// `order` header, says it entered, then waits for the test's go-ahead and
/// fails if told so.
#[derive(Clone)]
struct Gate {
    entered: tokio::sync::mpsc::UnboundedSender<String>,
    go: Arc<tokio::sync::Semaphore>,
    runs: Arc<AtomicU32>,
    fail_first: bool,
}

fn gated(
    shop: &Shop,
    gate: Gate,
) -> TransactionalInbox<
    impl AsyncFnMut(&Delivery, &Transaction<'_>) -> Result<(), Failure> + Clone + Send + Sync + 'static,
> {
    let charged = shop.charged.clone();
    shop.store
        .inbox(
            async move |d: &Delivery, tx: &Transaction<'_>| -> Result<(), Failure> {
                let run = gate.runs.fetch_add(1, Ordering::SeqCst);
                let order = d
                    .header("order")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                tx.execute(&format!("INSERT INTO {charged} (order_id) VALUES (1)"), &[])
                    .await?;
                gate.entered.send(order).ok();
                gate.go.acquire().await.unwrap().forget();
                if gate.fail_first && run == 0 {
                    return Err(Failure::msg("the first run fails"));
                }
                Ok(())
            },
        )
        .by_key(|d: &Delivery| {
            d.header("order")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
}

/// Waits until a backend of this database waits on a lock in a statement on
/// `table`: the second consumer's insert, behind the first one's
/// uncommitted key.
async fn a_backend_waits_on_a_lock(table: &str) {
    let admin = admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 AND position($1 in query) > 0",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no consumer waits on the key's lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish_twice(shop: &Shop, order: &str) {
    for _ in 0..2 {
        shop.broker
            .publish(
                &shop.queue,
                Envelope::new("charge").with_header("order", order),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_one_key_at_once_run_the_handler_once() {
    let shop = Shop::open("tx_race", QueueOptions::default()).await;
    for fail_first in [false, true] {
        let (entered, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
        let go = Arc::new(tokio::sync::Semaphore::new(0));
        let runs = Arc::new(AtomicU32::new(0));
        let inbox = gated(
            &shop,
            Gate {
                entered,
                go: go.clone(),
                runs: runs.clone(),
                fail_first,
            },
        );
        // Prefetch 1 each: the two copies go to the two consumers at once.
        let options = ConsumeOptions::manual(1).backoff(Backoff::NONE);
        let a = shop
            .broker
            .consume(&shop.queue, options.clone(), inbox.clone())
            .await
            .unwrap();
        let b = shop
            .broker
            .consume(&shop.queue, options, inbox.clone())
            .await
            .unwrap();
        let order = format!("order-{fail_first}");
        publish_twice(&shop, &order).await;
        // One handler runs; the other consumer's insert waits behind its
        // uncommitted key.
        let first = tokio::time::timeout(Duration::from_secs(10), entered_rx.recv())
            .await
            .unwrap();
        assert_eq!(first.as_deref(), Some(order.as_str()));
        a_backend_waits_on_a_lock(&shop.inbox_table).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        go.add_permits(1);
        if fail_first {
            // The first rolled back: the waiting one inserts and runs.
            let second = tokio::time::timeout(Duration::from_secs(10), entered_rx.recv())
                .await
                .unwrap();
            assert_eq!(second.as_deref(), Some(order.as_str()));
            go.add_permits(1);
        }
        let expect = |s: IdempotencyStats| s.completed == 1 && s.skipped == 1;
        shop.drained(|| expect(inbox.stats()), Duration::from_secs(20))
            .await;
        let stats = inbox.stats();
        let want_runs = if fail_first { 2 } else { 1 };
        assert_eq!(runs.load(Ordering::SeqCst), want_runs, "{stats:?}");
        assert_eq!(stats.released, u64::from(fail_first), "{stats:?}");
        a.close().await;
        b.close().await;
    }
    assert_eq!(shop.charged().await, (2, 1), "one charge per order");
    shop.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_waits_for_a_key_at_most_its_wait_then_requeues() {
    let shop = Shop::open("tx_wait", QueueOptions::default()).await;
    let (entered, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let runs = Arc::new(AtomicU32::new(0));
    let inbox = gated(
        &shop,
        Gate {
            entered,
            go: go.clone(),
            runs: runs.clone(),
            fail_first: false,
        },
    )
    .wait(Duration::from_millis(200))
    .busy_retry(Duration::from_millis(50));
    let options = ConsumeOptions::manual(1).backoff(Backoff::NONE);
    let a = shop
        .broker
        .consume(&shop.queue, options.clone(), inbox.clone())
        .await
        .unwrap();
    let b = shop
        .broker
        .consume(&shop.queue, options, inbox.clone())
        .await
        .unwrap();
    publish_twice(&shop, "slow").await;
    tokio::time::timeout(Duration::from_secs(10), entered_rx.recv())
        .await
        .unwrap();
    // The other copy gives up waiting, is requeued, tries again...
    let deadline = Instant::now() + Duration::from_secs(10);
    while inbox.stats().busy < 2 {
        assert!(Instant::now() < deadline, "{:?}", inbox.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    go.add_permits(1);
    // ...and is a duplicate once the first committed.
    shop.drained(|| inbox.stats().skipped == 1, Duration::from_secs(20))
        .await;
    let stats = inbox.stats();
    assert_eq!(
        (stats.completed, runs.load(Ordering::SeqCst)),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(
        stats.store_errors, 0,
        "lock timeouts are not store errors: {stats:?}"
    );
    a.close().await;
    b.close().await;
    assert_eq!(shop.charged().await, (1, 1));
    shop.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_database_never_acks_unprocessed_and_keyless_deliveries_fail() {
    let shop = Shop::open(
        "tx_down",
        QueueOptions::default()
            .dead_letter_exchange("")
            .dead_letter_routing_key("dlq"),
    )
    .await;
    let dlq = shop
        .broker
        .declare_queue("dlq", QueueOptions::default())
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let inbox = shop
        .store
        .inbox({
            let runs = runs.clone();
            async move |_d: &Delivery, _tx: &Transaction<'_>| -> Result<(), Failure> {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .by_key(|d: &Delivery| {
            d.header("order")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
    let options = ConsumeOptions::manual(4).on_error(OnError::DeadLetter);
    let consumer = shop
        .broker
        .consume(&shop.queue, options, inbox.clone())
        .await
        .unwrap();
    // No key, an empty key: the error policy, not run.
    shop.broker
        .publish(&shop.queue, Envelope::new("no key"))
        .await
        .unwrap();
    shop.broker
        .publish(&shop.queue, Envelope::new("empty").with_header("order", ""))
        .await
        .unwrap();
    // The inbox table is gone: the database fails every delivery.
    drop_tables(&[&shop.inbox_table]).await;
    shop.broker
        .publish(
            &shop.queue,
            Envelope::new("charge").with_header("order", "o-1"),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dlq.snapshot().await.unwrap().stats.ready < 3 {
        assert!(Instant::now() < deadline, "{:?}", inbox.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "never run without its key recorded"
    );
    let stats = inbox.stats();
    assert_eq!(
        (stats.store_errors, stats.completed, stats.skipped),
        (1, 0, 0),
        "{stats:?}"
    );
    consumer.close().await;
    shop.broker
        .delete_queue("dlq", Default::default())
        .await
        .ok();
    shop.close().await;
}
