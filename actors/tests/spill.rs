//! Spill (overflow `spill`): a backlog of millions of messages keeps only
//! its head in memory, pages the rest out to disk, and drains in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postbox::Runtime;
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, Overflow, QueueOptions};

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// A 64-byte payload numbered `n`.
fn numbered(n: u64) -> Envelope {
    let mut payload = vec![0x5a; 64];
    payload[..8].copy_from_slice(&n.to_le_bytes());
    Envelope::new(payload)
}

fn number(d: &Delivery) -> u64 {
    let p = d.message().payload();
    u64::from_le_bytes(p[..8].try_into().expect("8 bytes"))
}

async fn backlog(total: u64, in_memory: usize) -> (u64, u64) {
    let rt = Runtime::with_arbiters(1).unwrap();
    let broker = Broker::new(&rt);
    let options = QueueOptions::default()
        .max_length(in_memory)
        .overflow(Overflow::Spill);
    let queue = broker.declare_queue("backlog", options).await.unwrap();
    let mut peak = rss();
    let mut n = 0;
    while n < total {
        let batch: Vec<Envelope> = (n..(n + 1000).min(total)).map(numbered).collect();
        n += batch.len() as u64;
        queue.publish_batch(batch).await.unwrap();
        if n % 100_000 == 0 {
            peak = peak.max(rss());
        }
    }
    let stats = broker.queue_stats("backlog").await.unwrap().stats;
    assert_eq!(stats.ready as u64, total, "nothing dropped: {stats:?}");
    peak = peak.max(rss());

    // Drain with one consumer: every message, in publish order.
    let next = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let done = Arc::new(parking_lot::Mutex::new(Some(done_tx)));
    let (seen, finished) = (next.clone(), done.clone());
    let _consumer = broker
        .consume("backlog", ConsumeOptions::auto(), move || {
            let (next, done) = (seen.clone(), finished.clone());
            move |d: Delivery| {
                let expected = next.fetch_add(1, Ordering::Relaxed);
                assert_eq!(number(&d), expected, "out of order");
                if expected + 1 == total
                    && let Some(tx) = done.lock().take()
                {
                    let _ = tx.send(());
                }
                async { Ok(()) }
            }
        })
        .await
        .unwrap();
    done_rx.await.unwrap();
    peak = peak.max(rss());
    assert_eq!(next.load(Ordering::Relaxed), total);
    rt.shutdown();
    (peak, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_spilled_backlog_drains_in_order() {
    backlog(50_000, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a stress test (5,000,000 messages): run with --ignored, as CI does"]
async fn five_million_messages_spill_in_bounded_memory_and_drain_in_order() {
    let (peak, total) = backlog(5_000_000, 10_000).await;
    println!(
        "peak resident memory with {total} messages: {} MB",
        peak >> 20
    );
    assert!(peak < 200 << 20, "peak RSS {} MB", peak >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_durable_spilling_queue_recovers_spilled_and_purges_them_for_good() {
    use postbox_actors::StorageOptions;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    let options = || {
        QueueOptions::default()
            .durable()
            .max_length(500)
            .overflow(Overflow::Spill)
    };
    {
        let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
        let queue = broker.declare_queue("q", options()).await.unwrap();
        for start in (0..20_000).step_by(500) {
            let batch = (start..start + 500)
                .map(|n| numbered(n).with_persistent(true))
                .collect();
            queue.publish_batch(batch).await.unwrap();
        }
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!((stats.ready, stats.spilled), (20_000, 19_500));
    }
    {
        // Recovered into the queue's memory limit: the rest spilled again.
        let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.ready, stats.spilled), (20_000, 19_500));
        // Some taken in order, then the rest purged.
        for n in 0..600 {
            let (d, _) = broker
                .get("q", postbox_actors::AckMode::Auto)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(number(&d), n);
        }
        assert_eq!(broker.purge_queue("q").await.unwrap(), 19_400);
    }
    let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 0);
    assert_eq!(broker.storage_stats().unwrap().live_messages, 0);
    rt.shutdown();
}
