//! Idempotent consumers with the stores that need no server (memory, disk,
//! and the two in tiers): duplicates from producer retries and from crashes
//! run the side effect once, concurrent claims of one key have one winner,
//! and a crashed claimant's claim is released.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use postbox::testkit::local;
use postbox::{Backoff, Failure, Runtime};
use postbox_actors::idempotency::{
    Claim, ClaimToken, DiskStore, IdempotencyError, IdempotencyStore, Idempotent, MemoryStore,
    Tiered,
};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, LayerExt, QueueOptions};

mod common;
use common::orders::exactly_once_orders;

const ORDERS: u32 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_three_times_with_crashes_memory_store() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let storm = exactly_once_orders(
        &rt.handle(),
        "orders-memory",
        MemoryStore::new(100_000),
        ORDERS,
        1,
    )
    .await;
    assert!(storm.panics > 0 && storm.errors > 0, "{storm:?}");
    assert!(storm.stats.released > 0, "{storm:?}");
    rt.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_three_times_with_crashes_disk_store() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let storm = exactly_once_orders(&rt.handle(), "orders-disk", store, ORDERS, 2).await;
    assert!(storm.panics > 0 && storm.errors > 0, "{storm:?}");
    rt.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_three_times_with_crashes_tiered_store() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    // A fast tier too small to remember much: the guard catches the rest.
    let store = Tiered::new(MemoryStore::new(64), DiskStore::open(dir.path()).unwrap());
    let storm = exactly_once_orders(&rt.handle(), "orders-tiered", store, ORDERS, 3).await;
    assert!(storm.panics > 0, "{storm:?}");
    rt.shutdown();
}

#[tokio::test]
async fn done_keys_survive_a_restart_of_the_disk_store() {
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(30);
    {
        let store = DiskStore::open(dir.path()).unwrap();
        // A second store on the same directory is refused while it is open.
        assert!(matches!(
            DiskStore::open(dir.path()),
            Err(IdempotencyError::Unavailable { .. })
        ));
        for i in 0..1000 {
            let key = format!("order-{i}");
            let t = ClaimToken::new();
            assert_eq!(
                store.claim(&key, t, lease).await,
                Ok(Claim::Acquired { expired: false })
            );
            if i % 2 == 0 {
                assert_eq!(
                    store.complete(&key, t, Duration::from_secs(3600)).await,
                    Ok(true)
                );
            }
            // Odd keys stay claimed: the process "dies" with them.
        }
    }
    let store = DiskStore::open(dir.path()).unwrap();
    for i in 0..1000 {
        let key = format!("order-{i}");
        let expected = if i % 2 == 0 {
            Claim::Done
        } else {
            Claim::Acquired { expired: false }
        };
        assert_eq!(
            store.claim(&key, ClaimToken::new(), lease).await,
            Ok(expected),
            "{key}"
        );
    }
}

#[tokio::test]
async fn a_torn_or_damaged_disk_log_loses_only_what_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(30);
    {
        let store = DiskStore::open(dir.path()).unwrap();
        for i in 0..10 {
            let key = format!("k{i}");
            let t = ClaimToken::new();
            store.claim(&key, t, lease).await.unwrap();
            store
                .complete(&key, t, Duration::from_secs(3600))
                .await
                .unwrap();
        }
    }
    let log = dir.path().join("idempotency.log");
    let mut data = std::fs::read(&log).unwrap();
    let record = (data.len() - 24) / 10;
    // Damage the third record's key, and tear the last one in half.
    data[24 + 2 * record + record - 1] ^= 0xff;
    data.truncate(data.len() - record / 2);
    std::fs::write(&log, &data).unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    let mut done = Vec::new();
    for i in 0..10 {
        if store
            .claim(&format!("k{i}"), ClaimToken::new(), lease)
            .await
            == Ok(Claim::Done)
        {
            done.push(i);
        }
    }
    assert_eq!(done, [0, 1, 3, 4, 5, 6, 7, 8]);
    drop(store);
    // Not an idempotency log: a typed error, not a panic.
    std::fs::write(&log, b"garbage that is not a store file").unwrap();
    assert!(matches!(
        DiskStore::open(dir.path()),
        Err(IdempotencyError::Unavailable { .. })
    ));
}

#[test]
fn concurrent_claims_of_one_key_from_many_threads_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new(1_000));
    let disk = Arc::new(DiskStore::open(dir.path()).unwrap());
    for round in 0..50 {
        let key = format!("key-{round}");
        let winners = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let (memory, disk, key) = (memory.clone(), disk.clone(), key.clone());
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            let lease = Duration::from_secs(60);
                            let token = ClaimToken::new();
                            let won = if t % 2 == 0 {
                                memory.claim(&key, token, lease).await
                            } else {
                                disk.claim(&key, token, lease).await
                            };
                            (t % 2, matches!(won, Ok(Claim::Acquired { .. })))
                        })
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for store in 0..2 {
            let n = winners.iter().filter(|(s, w)| *s == store && *w).count();
            assert_eq!(n, 1, "round {round}, store {store}: {winners:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_crashed_claimants_claim_is_released_and_the_redelivery_runs() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        broker
            .declare_queue("pay", QueueOptions::default())
            .await
            .unwrap();
        let store = Arc::new(MemoryStore::new(100));
        let layer = Idempotent::by_key(store.clone(), |d: &Delivery| {
            d.header("order")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let handler = move || {
            let runs = r.clone();
            move |d: Delivery| {
                let runs = runs.clone();
                async move {
                    // The first run crashes mid-way, the second succeeds.
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("crash while charging");
                    }
                    assert!(d.redelivered());
                    Ok::<(), Failure>(())
                }
            }
        };
        let options = ConsumeOptions::manual(4).backoff(Backoff::NONE);
        let _consumer = broker
            .consume("pay", options, handler.layer(layer.clone()))
            .await
            .unwrap();
        broker
            .publish("pay", Envelope::new("charge").with_header("order", "o-1"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "rerun after the crash, not stuck behind its claim"
        );
        let stats = layer.stats();
        assert_eq!(
            (stats.claimed, stats.released, stats.completed),
            (2, 1, 1),
            "{stats:?}"
        );
        // A later duplicate (another message id, same order) is skipped.
        broker
            .publish(
                "pay",
                Envelope::new("charge again").with_header("order", "o-1"),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(layer.stats().skipped, 1);
        let snap = broker.queue("pay").unwrap().snapshot().await.unwrap();
        assert_eq!(
            (snap.stats.ready, snap.stats.unacked),
            (0, 0),
            "everything acked"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_without_a_key_or_with_a_failing_store_is_never_acked_unprocessed() {
    local(async {
        /// A store whose server is down.
        struct Down;
        impl IdempotencyStore for Down {
            async fn claim(
                &self,
                _: &str,
                _: ClaimToken,
                _: Duration,
            ) -> Result<Claim, IdempotencyError> {
                Err(IdempotencyError::unavailable("down", "connection refused"))
            }
            async fn complete(
                &self,
                _: &str,
                _: ClaimToken,
                _: Duration,
            ) -> Result<bool, IdempotencyError> {
                Err(IdempotencyError::unavailable("down", "connection refused"))
            }
            async fn release(&self, _: &str, _: ClaimToken) -> Result<bool, IdempotencyError> {
                Err(IdempotencyError::unavailable("down", "connection refused"))
            }
        }
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        let dlq = broker
            .declare_queue("dlq", QueueOptions::default())
            .await
            .unwrap();
        broker
            .declare_queue(
                "work",
                QueueOptions::default()
                    .dead_letter_exchange("")
                    .dead_letter_routing_key("dlq"),
            )
            .await
            .unwrap();
        let ran = Arc::new(AtomicU32::new(0));
        let r = ran.clone();
        let handler = move || {
            let ran = r.clone();
            move |_d: Delivery| {
                let ran = ran.clone();
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), Failure>(())
                }
            }
        };
        let options = ConsumeOptions::manual(4).on_error(postbox_actors::OnError::DeadLetter);
        let down = Idempotent::by_message_id(Down);
        let _c = broker
            .consume("work", options.clone(), handler.clone().layer(down.clone()))
            .await
            .unwrap();
        broker.publish("work", Envelope::new("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0, "not run without a claim");
        assert_eq!(
            dlq.snapshot().await.unwrap().stats.ready,
            1,
            "dead-lettered by the error policy, not acked"
        );
        assert_eq!(down.stats().store_errors, 1);
        _c.close().await;
        // No key in the message: the same.
        let keyed = Idempotent::by_key(MemoryStore::new(10), |d: &Delivery| {
            d.header("order")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
        let _c = broker
            .consume("work", options, handler.layer(keyed))
            .await
            .unwrap();
        broker
            .publish("work", Envelope::new("no key"))
            .await
            .unwrap();
        broker
            .publish("work", Envelope::new("empty key").with_header("order", ""))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(dlq.snapshot().await.unwrap().stats.ready, 3);
    })
    .await;
}
