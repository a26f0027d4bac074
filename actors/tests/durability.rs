//! Durable queues on a data directory: what survives reopening (and what
//! does not), recovery of unacknowledged deliveries, deletions, bad files,
//! injected I/O failures, group commit, and disk space following the
//! backlog. The kill -9 test is in `crash.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use postbox::Runtime;
use postbox_actors::testkit::DiskFaults;
use postbox_actors::{
    AckMode, Broker, BrokerError, DeleteOptions, Envelope, PublishError, QueueOptions,
    StorageOptions, StoreError, SyncPolicy,
};

fn durable() -> QueueOptions {
    QueueOptions::default().durable()
}

fn persistent(n: u32) -> Envelope {
    common::msg(n).with_persistent(true)
}

/// Every ready message of `queue`, fetched with manual acks and requeued
/// (dropped unsettled), as (number, delivery count, redelivered).
async fn contents(broker: &Broker, queue: &str) -> Vec<(u32, u32, bool)> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    while let Some((d, _)) = broker.get(queue, AckMode::Manual).await.unwrap() {
        out.push((
            d.decode::<u32>().unwrap(),
            d.delivery_count(),
            d.redelivered(),
        ));
        held.push(d);
    }
    drop(held);
    out
}

fn open(rt: &Runtime, dir: &std::path::Path) -> Broker {
    Broker::open(rt, StorageOptions::new(dir)).expect("open the data directory")
}

#[tokio::test]
async fn persistent_messages_of_durable_queues_survive_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("orders", durable()).await.unwrap();
        broker
            .declare_queue("scratch", QueueOptions::default())
            .await
            .unwrap();
        for n in 0..100 {
            broker.publish("orders", persistent(n)).await.unwrap();
            broker.publish("scratch", persistent(n)).await.unwrap();
        }
        // Transient messages in a durable queue live in memory only.
        broker.publish("orders", common::msg(1000)).await.unwrap();
        let stats = broker.storage_stats().unwrap();
        assert_eq!(stats.live_messages, 100);
        assert!(stats.syncs >= 1 && stats.confirms == 100, "{stats:?}");
        // Per queue: its persisted messages, and the shared log's counters.
        let orders = broker.queue_stats("orders").await.unwrap();
        assert_eq!((orders.stats.ready, orders.stats.persisted), (101, 100));
        let log = orders.storage.expect("a durable queue's storage");
        assert!(log.bytes_on_disk > 100 * 40 && log.segments == 1, "{log:?}");
        let scratch = broker.queue_stats("scratch").await.unwrap();
        assert!(scratch.storage.is_none() && scratch.stats.persisted == 0);
    }
    let broker = open(&rt, dir.path());
    assert_eq!(broker.queue_names(), ["orders"]);
    let got = contents(&broker, "orders").await;
    let numbers: Vec<u32> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        numbers,
        (0..100).collect::<Vec<_>>(),
        "all of them, in order"
    );
    assert!(
        got.iter().all(|g| g.1 == 1 && !g.2),
        "never delivered before"
    );
    rt.shutdown();
}

#[tokio::test]
async fn unacknowledged_deliveries_come_back_redelivered_and_acked_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("q", durable()).await.unwrap();
        for n in 0..6 {
            broker.publish("q", persistent(n)).await.unwrap();
        }
        // 0 and 1 acknowledged; 2 delivered twice (requeued once) and held;
        // 3 held; 4 and 5 never delivered.
        for _ in 0..2 {
            let (d, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
            d.ack().await.unwrap();
        }
        let (d, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
        d.nack(true).await.unwrap();
        let (_held2, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
        let (_held3, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
        // Acks are written lazily; a confirmed publish after them makes them
        // durable too (the log is written in order).
        broker.declare_queue("other", durable()).await.unwrap();
        broker.publish("other", persistent(99)).await.unwrap();
        // The broker goes away with 2 and 3 unsettled: a crash, as far as
        // they are concerned.
        std::mem::forget(_held2);
        std::mem::forget(_held3);
    }
    let broker = open(&rt, dir.path());
    assert_eq!(
        contents(&broker, "q").await,
        [(2, 3, true), (3, 2, true), (4, 1, false), (5, 1, false)],
        "(number, delivery count now, redelivered)"
    );
    rt.shutdown();
}

#[tokio::test]
async fn deleted_queues_stay_deleted_and_a_new_one_of_that_name_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("q", durable()).await.unwrap();
        broker.publish("q", persistent(1)).await.unwrap();
        broker
            .delete_queue("q", DeleteOptions::default())
            .await
            .unwrap();
        broker.declare_queue("q", durable()).await.unwrap();
        broker.publish("q", persistent(2)).await.unwrap();
        broker.declare_queue("gone", durable()).await.unwrap();
        broker.publish("gone", persistent(3)).await.unwrap();
        broker
            .delete_queue("gone", DeleteOptions::default())
            .await
            .unwrap();
    }
    let broker = open(&rt, dir.path());
    assert_eq!(broker.queue_names(), ["q"]);
    assert_eq!(contents(&broker, "q").await, [(2, 1, false)]);
    // Redeclaring with other options is refused, as before the restart.
    assert!(matches!(
        broker.declare_queue("q", QueueOptions::default()).await,
        Err(BrokerError::QueueMismatch { .. })
    ));
    rt.shutdown();
}

#[tokio::test]
async fn a_second_broker_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let first = open(&rt, dir.path());
    match Broker::open(&rt, StorageOptions::new(dir.path())) {
        Err(BrokerError::Storage(StoreError::Locked { .. })) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    // Free again once the first is gone.
    let _second = open(&rt, dir.path());
    rt.shutdown();
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    common::seg_files(&dir.join("log"))
}

#[tokio::test]
async fn damaged_records_are_skipped_and_torn_tails_cut() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("q", durable()).await.unwrap();
        for n in 0..10 {
            broker.publish("q", persistent(n)).await.unwrap();
        }
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let mut data = std::fs::read(&files[0]).unwrap();
    let len = data.len();
    // A flipped bit in the middle (inside message 4 or so), and half a
    // record of garbage at the end.
    data[len / 2] ^= 0x10;
    data.extend_from_slice(&[0xab; 20]);
    std::fs::write(&files[0], &data).unwrap();
    let broker = open(&rt, dir.path());
    let got: Vec<u32> = contents(&broker, "q").await.iter().map(|g| g.0).collect();
    assert_eq!(got.len(), 9, "one message lost to the damage: {got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(broker.storage_stats().unwrap().damaged_records, 1);
    drop(broker);
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().len(),
        len as u64,
        "the torn tail was cut"
    );
    rt.shutdown();
}

#[tokio::test]
async fn an_unknown_format_version_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("q", durable()).await.unwrap();
        broker.publish("q", persistent(1)).await.unwrap();
    }
    common::assert_unknown_version_refused(&rt, dir.path(), &segment_files(dir.path())[0]);
    rt.shutdown();
}

#[tokio::test]
async fn io_failures_fail_the_publish_and_lose_nothing_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let mut confirmed = Vec::new();
    {
        let faults = DiskFaults::new();
        let broker =
            Broker::open(&rt, StorageOptions::new(dir.path()).faults(faults.clone())).unwrap();
        broker.declare_queue("q", durable()).await.unwrap();
        broker.publish("q", persistent(0)).await.unwrap();
        confirmed.push(0);
        // A failed write: that publish fails, the next ones succeed.
        let faults = faults.fail_write(1);
        let err = broker.publish("q", persistent(1)).await.unwrap_err();
        assert!(
            matches!(err, BrokerError::Storage(StoreError::Io { .. })),
            "{err}"
        );
        broker.publish("q", persistent(2)).await.unwrap();
        confirmed.push(2);
        // A full disk: refused while full, fine once there is room again.
        let faults = faults.disk_full_after(0);
        let err = broker.publish("q", persistent(3)).await.unwrap_err();
        assert!(
            matches!(&err, BrokerError::Storage(e) if e.is_disk_full()),
            "{err}"
        );
        faults.free();
        broker.publish("q", persistent(4)).await.unwrap();
        confirmed.push(4);
        // A failed sync: nothing more can be confirmed, but the broker keeps
        // serving what does not need the disk.
        let _faults = faults.fail_sync(1);
        assert!(broker.publish("q", persistent(5)).await.is_err());
        assert!(broker.publish("q", persistent(6)).await.is_err());
        assert!(broker.storage_stats().unwrap().failed.is_some());
        broker.publish("q", common::msg(7)).await.unwrap();
        // 1, 3 and 5 reached the queue before their writes or sync failed;
        // 6 was refused at once (the store had failed), so it did not.
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 7);
    }
    let broker = open(&rt, dir.path());
    let got: Vec<u32> = contents(&broker, "q").await.iter().map(|g| g.0).collect();
    for n in &confirmed {
        assert!(got.contains(n), "confirmed {n} lost: {got:?}");
    }
    // What failed may or may not be there (it reached the queue); nothing
    // else is.
    assert!(got.iter().all(|n| *n < 7), "{got:?}");
    rt.shutdown();
}

#[tokio::test]
async fn concurrent_publishers_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let broker = open(&rt, dir.path());
    for q in 0..4 {
        broker
            .declare_queue(&format!("q{q}"), durable())
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for p in 0..64u32 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u32 {
                let q = format!("q{}", (p + i) % 4);
                broker.publish(&q, persistent(p * 100 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = broker.storage_stats().unwrap();
    assert_eq!(stats.confirms, 64 * 20);
    assert!(
        stats.syncs < stats.confirms / 4,
        "{} syncs for {} confirms: publishes do not share syncs",
        stats.syncs,
        stats.confirms
    );
    drop(broker);
    rt.shutdown();
}

#[tokio::test]
async fn disk_use_follows_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let options = StorageOptions::new(dir.path()).segment_bytes(4096);
    let broker = Broker::open(&rt, options.clone()).unwrap();
    broker.declare_queue("q", durable()).await.unwrap();
    let payload = "x".repeat(200);
    let batch = |from: u32| -> Vec<Envelope> {
        (from..from + 50)
            .map(|n| Envelope::new(format!("{n}:{payload}")).with_persistent(true))
            .collect()
    };
    // One old message stays while thousands pass through.
    broker.publish("q", persistent(0)).await.unwrap();
    let (old, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
    for round in 0..40u32 {
        broker
            .queue("q")
            .unwrap()
            .publish_batch(batch(round * 50))
            .await
            .unwrap();
        while let Some((d, _)) = broker.get("q", AckMode::Manual).await.unwrap() {
            d.ack().await.unwrap();
        }
        // A confirmed publish makes the acks durable, and lets the writer
        // tidy up.
        broker.publish("q", persistent(1)).await.unwrap();
        let (d, _) = broker.get("q", AckMode::Manual).await.unwrap().unwrap();
        d.ack().await.unwrap();
    }
    broker.publish("q", persistent(2)).await.unwrap();
    let stats = broker.storage_stats().unwrap();
    assert!(stats.segments_deleted > 10, "{stats:?}");
    assert!(stats.compactions >= 1, "{stats:?}");
    assert!(
        stats.bytes_on_disk < 6 * 4096,
        "{} bytes on disk for a backlog of 2 messages: {stats:?}",
        stats.bytes_on_disk
    );
    drop(old);
    drop(broker);
    // What is left reads back.
    let broker = Broker::open(&rt, options).unwrap();
    let got: Vec<u32> = contents(&broker, "q").await.iter().map(|g| g.0).collect();
    assert_eq!(got, [0, 2]);
    rt.shutdown();
}

#[tokio::test]
async fn the_interval_and_never_policies_confirm_without_waiting_for_a_sync() {
    for policy in [
        SyncPolicy::Interval(Duration::from_millis(50)),
        SyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::with_arbiters(1).unwrap();
        {
            let broker = Broker::open(&rt, StorageOptions::new(dir.path()).sync(policy)).unwrap();
            broker.declare_queue("q", durable()).await.unwrap();
            for n in 0..50 {
                broker.publish("q", persistent(n)).await.unwrap();
            }
            let stats = broker.storage_stats().unwrap();
            assert_eq!(stats.confirms, 50);
            assert!(stats.syncs < 50, "{policy:?}: {stats:?}");
        }
        // Closing syncs: everything is there.
        let broker = open(&rt, dir.path());
        assert_eq!(contents(&broker, "q").await.len(), 50, "{policy:?}");
        drop(broker);
        rt.shutdown();
    }
}

#[tokio::test]
async fn an_in_memory_broker_accepts_durable_queues_and_persistent_messages() {
    let rt = Runtime::with_arbiters(1).unwrap();
    let broker = Broker::new(&rt);
    broker.declare_queue("q", durable()).await.unwrap();
    broker.publish("q", persistent(1)).await.unwrap();
    assert!(broker.storage_stats().is_none());
    assert_eq!(contents(&broker, "q").await, [(1, 1, false)]);
    let _ = Arc::new(());
    rt.shutdown();
}

#[tokio::test]
async fn durable_exchanges_and_bindings_come_back_and_transient_ones_do_not() {
    use postbox_actors::{ExchangeOptions, HeadersMatch};
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        broker.declare_queue("orders", durable()).await.unwrap();
        broker.declare_queue("pdfs", durable()).await.unwrap();
        broker
            .declare_queue("scratch", QueueOptions::default())
            .await
            .unwrap();
        let events = ExchangeOptions::topic()
            .durable()
            .alternate_exchange("unrouted");
        broker.declare_exchange("events", events).await.unwrap();
        broker
            .declare_exchange("relay", ExchangeOptions::fanout().durable())
            .await
            .unwrap();
        broker
            .declare_exchange("docs", ExchangeOptions::headers().durable())
            .await
            .unwrap();
        broker
            .declare_exchange("flash", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker
            .bind_queue("orders", "events", "order.*")
            .await
            .unwrap();
        broker
            .bind_queue("orders", "events", "legacy.#")
            .await
            .unwrap();
        broker
            .unbind_queue("orders", "events", "legacy.#")
            .await
            .unwrap();
        broker
            .bind_exchange("relay", "events", "audit.#")
            .await
            .unwrap();
        broker.bind_queue("orders", "relay", "").await.unwrap();
        broker
            .bind_queue("pdfs", "docs", HeadersMatch::all([("format", "pdf")]))
            .await
            .unwrap();
        // A transient end makes a transient binding.
        broker
            .bind_queue("scratch", "events", "order.*")
            .await
            .unwrap();
        broker.bind_queue("orders", "flash", "").await.unwrap();
    }
    let broker = open(&rt, dir.path());
    assert!(
        broker.bindings("flash").is_err(),
        "a transient exchange is gone"
    );
    let keys: Vec<(String, String)> = broker
        .bindings("events")
        .unwrap()
        .into_iter()
        .map(|b| (format!("{:?}", b.destination), b.key.to_string()))
        .collect();
    assert_eq!(
        keys,
        [
            ("Queue(\"orders\")".to_string(), "order.*".to_string()),
            ("Exchange(\"relay\")".to_string(), "audit.#".to_string()),
        ]
    );
    // Same options: redeclaring is fine; a different durability is not.
    broker
        .declare_exchange(
            "events",
            ExchangeOptions::topic()
                .durable()
                .alternate_exchange("unrouted"),
        )
        .await
        .unwrap();
    assert!(matches!(
        broker
            .declare_exchange("relay", ExchangeOptions::fanout())
            .await,
        Err(BrokerError::ExchangeMismatch { .. })
    ));
    // The restored bindings route.
    let to = |x: &'static str, k: &'static str, n: u32| {
        let broker = broker.clone();
        async move { broker.publish_to(x, k, persistent(n)).await.unwrap() }
    };
    assert_eq!(to("events", "order.created", 1).await, 1);
    assert_eq!(to("events", "audit.login", 2).await, 1);
    assert_eq!(to("events", "legacy.x", 3).await, 0);
    let pdf = persistent(4).with_header("format", "pdf");
    assert_eq!(broker.publish_to("docs", "", pdf).await.unwrap(), 1);
    let numbers = |v: Vec<(u32, u32, bool)>| v.into_iter().map(|g| g.0).collect::<Vec<_>>();
    assert_eq!(numbers(contents(&broker, "orders").await), [1, 2]);
    assert_eq!(numbers(contents(&broker, "pdfs").await), [4]);
}

#[tokio::test]
async fn deleting_a_durable_exchange_or_queue_deletes_its_bindings_for_good() {
    use postbox_actors::ExchangeOptions;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        for q in ["a", "b"] {
            broker.declare_queue(q, durable()).await.unwrap();
        }
        for x in ["x", "y"] {
            broker
                .declare_exchange(x, ExchangeOptions::direct().durable())
                .await
                .unwrap();
        }
        broker.bind_queue("a", "x", "k").await.unwrap();
        broker.bind_queue("b", "x", "k").await.unwrap();
        broker.bind_queue("a", "y", "k").await.unwrap();
        broker.bind_exchange("y", "x", "k").await.unwrap();
        broker.delete_exchange("y", false).await.unwrap();
        broker
            .delete_queue("b", DeleteOptions::default())
            .await
            .unwrap();
        // A new queue of the old name does not inherit the old bindings.
        broker.declare_queue("b", durable()).await.unwrap();
        // A long topology log is rewritten as a snapshot on reopening.
        for _ in 0..40 {
            broker.bind_queue("b", "x", "churn").await.unwrap();
            broker.unbind_queue("b", "x", "churn").await.unwrap();
        }
    }
    // Reopened twice: from the log, then from the snapshot it was rewritten to.
    drop(open(&rt, dir.path()));
    let broker = open(&rt, dir.path());
    assert!(broker.bindings("y").is_err());
    let dests: Vec<String> = broker
        .bindings("x")
        .unwrap()
        .into_iter()
        .map(|b| format!("{:?}", b.destination))
        .collect();
    assert_eq!(dests, ["Queue(\"a\")"]);
    assert_eq!(
        broker.publish_to("x", "k", persistent(1)).await.unwrap(),
        1,
        "only a"
    );
}

#[tokio::test]
async fn a_durable_subscription_collects_while_the_broker_is_down() {
    use postbox_actors::{ConsumeOptions, Delivery, ExchangeOptions};
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        let events = ExchangeOptions::topic().durable();
        broker
            .declare_exchange("user.events", events)
            .await
            .unwrap();
        let sub = broker
            .subscribe_durable(
                "user.events",
                "user.registered",
                "email.user.registered",
                ConsumeOptions::auto(),
                || |_d: Delivery| async { Ok(()) },
            )
            .await
            .unwrap();
        sub.cancel().await;
        // An exclusive subscription's queue is never durable.
        let transient = broker
            .subscribe("user.events", "#", ConsumeOptions::auto(), || {
                |_d: Delivery| async { Ok(()) }
            })
            .await
            .unwrap();
        let reached = broker
            .publish_to("user.events", "user.registered", persistent(7))
            .await
            .unwrap();
        assert_eq!(reached, 2);
        drop(transient);
    }
    let broker = open(&rt, dir.path());
    assert_eq!(broker.queue_names(), ["email.user.registered"]);
    let got = contents(&broker, "email.user.registered").await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [7]);
    assert_eq!(
        broker
            .publish_to("user.events", "user.registered", persistent(8))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_committed_transaction_is_all_there_after_a_crash_and_a_torn_one_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    {
        let broker = open(&rt, dir.path());
        for q in ["orders", "invoices", "shipments"] {
            broker.declare_queue(q, durable()).await.unwrap();
        }
        broker.publish("orders", persistent(1)).await.unwrap();
        broker.publish("orders", persistent(2)).await.unwrap();
        let (order, _) = broker
            .get("orders", AckMode::Manual)
            .await
            .unwrap()
            .unwrap();
        let mut tx = broker.transaction();
        tx.publish("invoices", persistent(10));
        tx.publish("shipments", persistent(20));
        tx.publish("invoices", persistent(11));
        tx.publish("invoices", common::msg(12)); // transient: memory only
        tx.ack(&order);
        let committed = tx.commit().await.unwrap();
        assert_eq!((committed.enqueued, committed.settled), (4, 1));
        // Visible at once, in publish order.
        let invoices: Vec<u32> = contents(&broker, "invoices")
            .await
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(invoices, [10, 11, 12]);
    }
    // What was written after the commit record (the queues' own journals)
    // is cut off, as if the process had died right after the commit; then
    // the commit record itself is torn at several places.
    let snapshot = tempfile::tempdir().unwrap();
    common::copy_dir(dir.path(), snapshot.path());
    let segments = segment_files(snapshot.path());
    assert_eq!(segments.len(), 1);
    let segment = segments[0].clone();
    let full = std::fs::read(&segment).unwrap();
    // Where the commit record ends: frames (length, CRC, payload) follow a
    // 24-byte header, and an atomic record's payload starts with type 4.
    let mut pos = 24;
    let mut commit_end = None;
    while pos + 8 <= full.len() {
        let len = u32::from_le_bytes(full[pos..pos + 4].try_into().unwrap()) as usize;
        if full[pos + 8] == 4 {
            commit_end = Some(pos + 8 + len);
        }
        pos += 8 + len;
    }
    let end = commit_end.expect("a commit record");
    for cut in [end, end - 1, end - 7, end - 40] {
        let trial = tempfile::tempdir().unwrap();
        common::copy_dir(snapshot.path(), trial.path());
        let seg = trial.path().join("log").join(segment.file_name().unwrap());
        std::fs::write(&seg, &full[..cut]).unwrap();
        let broker = open(&rt, trial.path());
        let numbers = |v: Vec<(u32, u32, bool)>| v.into_iter().map(|g| g.0).collect::<Vec<_>>();
        let orders = numbers(contents(&broker, "orders").await);
        let invoices = numbers(contents(&broker, "invoices").await);
        let shipments = numbers(contents(&broker, "shipments").await);
        if cut == end {
            assert_eq!(
                (orders, invoices, shipments),
                (vec![2], vec![10, 11], vec![20])
            );
        } else {
            // None of it: the order is back (to be handled again), nothing
            // was published.
            assert_eq!(
                (orders, invoices, shipments),
                (vec![1, 2], vec![], vec![]),
                "cut at {cut} of {end}"
            );
        }
    }
}

#[tokio::test]
async fn a_publish_through_an_exchange_fails_if_a_durable_queue_cannot_store_it() {
    use postbox_actors::ExchangeOptions;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let faults = DiskFaults::new();
    let broker = Broker::open(&rt, StorageOptions::new(dir.path()).faults(faults.clone())).unwrap();
    for q in ["a", "b", "c"] {
        broker.declare_queue(q, durable()).await.unwrap();
    }
    broker
        .declare_exchange("all", ExchangeOptions::fanout())
        .await
        .unwrap();
    for q in ["a", "b", "c"] {
        broker.bind_queue(q, "all", "").await.unwrap();
    }
    // Three durable copies, confirmed together.
    assert_eq!(
        broker.publish_to("all", "", persistent(1)).await.unwrap(),
        3
    );
    let _faults = faults.fail_write(1);
    let err = broker
        .publish_to("all", "", persistent(2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Refused(BrokerError::Storage(_))),
        "{err}"
    );
    // The broker keeps serving.
    assert_eq!(
        broker.publish_to("all", "", persistent(3)).await.unwrap(),
        3
    );
    rt.shutdown();
}
