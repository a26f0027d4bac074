//! Scenario 5: durable publish with confirms under group commit, and
//! recovery.
//!
//! Every message is a 64-byte payload, persistent, to one durable queue with
//! no consumer (messages pile up, as in the RabbitMQ and JetStream rows). The
//! data directory (a fresh one per row or trial) lives in
//! `$POSTBOX_BENCH_DIR` or the system's temporary directory, and is removed
//! afterwards.
//!
//! - The disk's ceiling: a plain loop that appends a batch of records (an
//!   8-byte length plus the 64-byte payload each) to a file with one `write`,
//!   then `fdatasync`s it, with batches of 1 and of 64. No durable queue can
//!   confirm faster than that on this disk at that batch size. p50/p99 are per
//!   batch (write + fdatasync).
//! - postbox, batch 1 and 64: one publisher (the driver thread) on a broker
//!   opened with [`Broker::open`] and the default [`SyncPolicy::Always`]
//!   (confirmed after the group's `fdatasync`): `publish().await` per
//!   message, or `publish_batch(64)` with one confirm per batch; compared
//!   with the ceiling at the same batch size.
//! - postbox, 64 and 256 concurrent publishers: that many tokio tasks, each
//!   awaiting the confirm of its own publish before the next, with
//!   `SyncPolicy::Always`; the store's group commit lets them share syncs
//!   (the note gives the syncs and messages per sync, from
//!   [`Broker::storage_stats`]). Faces RabbitMQ with 64 publishers.
//! - postbox, 256 publishers with [`SyncPolicy::Interval`] of 100 ms (the
//!   interval of `StorageOptions`' documentation): confirmed once written to
//!   the OS, synced every 100 ms. Faces JetStream, which acknowledges once
//!   written to the OS and (nats-server 2.9) syncs a stream every 2 minutes.
//! - Recovery: N persistent messages published (in batches), the broker
//!   dropped (a clean close), then `Broker::open` timed until
//!   `queue_stats` shows all N ready, with a fresh runtime. The log was
//!   just written, so it is read from the page cache (as after a crash of
//!   the process, not of the machine).
//!
//! RabbitMQ's rows are in `rabbit.rs`, JetStream's in `nats.rs`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postbox::Runtime;
use postbox_actors::{
    Broker, Envelope, QueueHandle, QueueOptions, StorageOptions, StorageStats, SyncPolicy,
};

use crate::Config;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Latencies, PAYLOAD, Trials, median, payload, sample, thousands};

pub const S5: &str = "5 durable publish with confirms";
pub const BATCHES: [usize; 2] = [1, 64];
/// Concurrent publishers of the group-commit rows.
pub const PUBLISHERS: [usize; 2] = [64, 256];
/// The sync interval of the interval-policy row.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Publishers of the interval-policy row (JetStream's row has as many
/// publishes in flight).
pub const INTERVAL_PUBLISHERS: usize = 256;

pub const POSTBOX_INTERVAL: &str = "postbox durable, 256 publishers, SyncPolicy::Interval(100 ms)";
pub const POSTBOX_RECOVERY: &str = "postbox recovery: Broker::open until all ready";

pub fn ceiling(batch: usize) -> String {
    format!("disk ceiling: append + fdatasync, batch {batch}")
}

pub fn postbox(batch: usize) -> String {
    format!("postbox durable publish + confirm, batch {batch}")
}

pub fn postbox_publishers(publishers: usize) -> String {
    format!("postbox durable, {publishers} publishers, confirm each")
}

const QUEUE: &str = "bench";

pub async fn scenario5(cfg: &Config, report: &mut Report) {
    println!("\n== {S5}");
    for batch in BATCHES {
        if cfg.wants(&ceiling(batch)) {
            // Enough syncs for a stable p99, few enough to bound the time.
            let syncs = cfg.count(if batch == 1 { 3_000 } else { 1_000 }, 100) as usize;
            let l = tokio::task::spawn_blocking(move || append_fdatasync(batch, syncs))
                .await
                .expect("the disk loop")
                .expect("append + fdatasync in the bench directory");
            report.push(
                Row::new(S5, ceiling(batch))
                    .rate(l.rate() * batch as f64)
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .note("p50/p99 per batch"),
            );
        }
        if cfg.wants(&postbox(batch)) {
            // As many confirms as the ceiling has syncs.
            let rounds = cfg.count(if batch == 1 { 3_000 } else { 1_000 }, 100) as usize;
            let (l, stats) = confirms(batch, rounds).await;
            let per_sync = (rounds * batch) as f64 / stats.syncs.max(1) as f64;
            let note = if batch == 1 {
                format!(
                    "one publisher, publish().await per message, returns after its fdatasync \
                     (SyncPolicy::Always), as the ceiling syncs each record; p50/p99 per publish; \
                     {} syncs, {per_sync:.1} msgs/sync",
                    thousands(stats.syncs)
                )
            } else {
                format!(
                    "one publisher, publish_batch(64): one confirm per batch after its fdatasync, \
                     as the ceiling's one write + fdatasync per 64 records; p50/p99 per batch; \
                     {} syncs, {per_sync:.1} msgs/sync",
                    thousands(stats.syncs)
                )
            };
            report.push(
                Row::new(S5, postbox(batch))
                    .rate(l.rate() * batch as f64)
                    .latency(l.percentile_us(50.0), l.percentile_us(99.0))
                    .vs(&ceiling(batch), Metric::Throughput)
                    .note(note),
            );
        }
    }
    for publishers in PUBLISHERS {
        let system = postbox_publishers(publishers);
        if !cfg.wants(&system) {
            continue;
        }
        let n = cfg.count(200_000, 12_800);
        let (t, stats) = concurrent(cfg.reps.min(3), publishers, n, SyncPolicy::Always).await;
        report.push(
            Row::new(S5, system)
                .trials(t)
                .vs(&ceiling(64), Metric::Throughput)
                .note(format!(
                    "{publishers} tokio tasks, each awaiting its own publish's confirm \
                     (SyncPolicy::Always: after an fdatasync), one queue; group commit: {} syncs \
                     for {} msgs, {:.1} msgs/sync, confirm avg {} µs (median trial); faces \
                     RabbitMQ with 64 publishers",
                    thousands(stats.syncs),
                    thousands(n),
                    n as f64 / stats.syncs.max(1) as f64,
                    stats.confirm_latency_avg_us,
                )),
        );
    }
    if cfg.wants(POSTBOX_INTERVAL) {
        let n = cfg.count(500_000, 25_600);
        let (t, stats) = concurrent(
            cfg.reps.min(3),
            INTERVAL_PUBLISHERS,
            n,
            SyncPolicy::Interval(INTERVAL),
        )
        .await;
        report.push(
            Row::new(S5, POSTBOX_INTERVAL)
                .trials(t)
                .vs(crate::nats::NATS_IN_FLIGHT, Metric::Throughput)
                .note(format!(
                    "256 tokio tasks, each awaiting its own confirm: confirmed once written to \
                     the OS, fdatasync every 100 ms ({} syncs in the median trial); faces \
                     JetStream, which acks once written to the OS and (nats-server 2.9) syncs \
                     a stream every 2 min (sync_interval, default 2 min, is settable from 2.10)",
                    thousands(stats.syncs),
                )),
        );
    }
    if cfg.wants(POSTBOX_RECOVERY) {
        let n = cfg.count(1_000_000, 100_000);
        let r = recovery(cfg.reps.min(3), n).await;
        report.push(Row::new(S5, POSTBOX_RECOVERY).trials(r.rate).note(format!(
            "{} persistent 64-byte messages, {:.0} MB of log, broker dropped cleanly, \
                     fresh runtime; Broker::open {:.0} ms + queue_stats ready == N {:.0} ms \
                     (median); log in the page cache (just written)",
            thousands(n),
            r.bytes_on_disk as f64 / 1e6,
            r.open.as_secs_f64() * 1e3,
            r.ready.as_secs_f64() * 1e3,
        )));
    }
}

fn bench_dir() -> PathBuf {
    std::env::var_os("POSTBOX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A fresh, unique data directory path (not created).
fn data_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    bench_dir().join(format!(
        "postbox-peers-{}-{what}-{n}.data",
        std::process::id()
    ))
}

fn persistent(p: &Bytes) -> Envelope {
    Envelope::new(p.clone()).with_persistent(true)
}

/// A runtime and a broker on a fresh data directory, with one durable queue.
struct Durable {
    rt: Runtime,
    broker: Broker,
    queue: QueueHandle,
    dir: PathBuf,
}

impl Durable {
    async fn open(what: &str, sync: SyncPolicy) -> Durable {
        let dir = data_dir(what);
        let rt = place::postbox_runtime().await;
        let broker = Broker::open(&rt, StorageOptions::new(&dir).sync(sync))
            .expect("open a broker on the bench directory");
        let queue = broker
            .declare_queue(QUEUE, QueueOptions::default().durable())
            .await
            .expect("declare the durable queue");
        Durable {
            rt,
            broker,
            queue,
            dir,
        }
    }

    fn stats(&self) -> StorageStats {
        self.broker.storage_stats().expect("a broker with storage")
    }

    /// Closes the broker (its store syncs and stops), stops the runtime,
    /// removes the directory.
    fn close(self) {
        let Durable {
            rt,
            broker,
            queue,
            dir,
        } = self;
        drop(queue);
        drop(broker);
        rt.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The counters that changed between two readings.
fn delta(before: &StorageStats, after: &StorageStats) -> StorageStats {
    let mut d = after.clone();
    d.syncs = after.syncs - before.syncs;
    d.confirms = after.confirms - before.confirms;
    d.bytes_written = after.bytes_written - before.bytes_written;
    d
}

/// One publisher: `rounds` confirmed publishes of `batch` messages (one
/// `publish` for 1, one `publish_batch` otherwise), after a tenth as many
/// for warm-up. Latency per round; the store's counters over the measured
/// rounds.
async fn confirms(batch: usize, rounds: usize) -> (Latencies, StorageStats) {
    let d = Durable::open(&format!("batch{batch}"), SyncPolicy::Always).await;
    let p = payload();
    let round = || {
        let (queue, p) = (&d.queue, &p);
        async move {
            if batch == 1 {
                queue.publish(persistent(p)).await.expect("durable publish");
            } else {
                let messages = (0..batch).map(|_| persistent(p)).collect();
                queue
                    .publish_batch(messages)
                    .await
                    .expect("durable publish_batch");
            }
        }
    };
    // The warm-up, then the measured rounds.
    let _ = sample(rounds / 10, 0, round).await;
    let before = d.stats();
    let (samples, elapsed) = sample(0, rounds, round).await;
    let stats = delta(&before, &d.stats());
    d.close();
    (Latencies::new(samples, elapsed), stats)
}

/// `publishers` tasks publishing `k` messages in all, each awaiting every
/// confirm before its next publish.
async fn publish_concurrently(queue: &QueueHandle, p: &Bytes, publishers: usize, k: u64) {
    let each = k / publishers as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..publishers {
        let (queue, p) = (queue.clone(), p.clone());
        tasks.spawn(async move {
            for _ in 0..each {
                queue
                    .publish(persistent(&p))
                    .await
                    .expect("durable publish");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a publisher task");
    }
}

/// `reps` trials, each on a fresh runtime and data directory: a warm-up of
/// a tenth, then `n` messages from `publishers` concurrent publishers.
/// Returns the rates and the store's counters of the median trial.
async fn concurrent(
    reps: usize,
    publishers: usize,
    n: u64,
    sync: SyncPolicy,
) -> (Trials, StorageStats) {
    let n = n / publishers as u64 * publishers as u64;
    let warmup = (n / 10 / publishers as u64).max(1) * publishers as u64;
    let mut results: Vec<(f64, StorageStats)> = Vec::new();
    for _ in 0..reps.max(1) {
        let d = Durable::open(&format!("publishers{publishers}"), sync).await;
        let p = payload();
        publish_concurrently(&d.queue, &p, publishers, warmup).await;
        let before = d.stats();
        let start = Instant::now();
        publish_concurrently(&d.queue, &p, publishers, n).await;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let stats = delta(&before, &d.stats());
        d.close();
        results.push((rate, stats));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let trials = Trials {
        median: results[results.len() / 2].0,
        min: results[0].0,
        max: results[results.len() - 1].0,
    };
    let (_, stats) = results.swap_remove(results.len() / 2);
    (trials, stats)
}

struct Recovery {
    /// Messages recovered per second (open + ready).
    rate: Trials,
    /// Medians of `Broker::open`, and of the wait for the queue after it.
    open: Duration,
    ready: Duration,
    bytes_on_disk: u64,
}

/// Fills a data directory with `n` persistent messages, then reopens it
/// `reps` times, timing `Broker::open` until the queue has all `n` ready.
async fn recovery(reps: usize, n: u64) -> Recovery {
    const FILL_BATCH: u64 = 1_000;
    let dir = data_dir("recovery");
    let bytes_on_disk;
    {
        let rt = place::postbox_runtime().await;
        let broker = Broker::open(&rt, StorageOptions::new(&dir)).expect("open a broker");
        let queue = broker
            .declare_queue(QUEUE, QueueOptions::default().durable())
            .await
            .expect("declare the durable queue");
        let p = payload();
        let mut sent = 0;
        while sent < n {
            let k = FILL_BATCH.min(n - sent);
            let messages = (0..k).map(|_| persistent(&p)).collect();
            queue.publish_batch(messages).await.expect("fill the queue");
            sent += k;
        }
        bytes_on_disk = broker.storage_stats().map_or(0, |s| s.bytes_on_disk);
        drop(queue);
        drop(broker);
        rt.shutdown();
    }
    let mut rates = Vec::new();
    let mut opens = Vec::new();
    let mut readies = Vec::new();
    for _ in 0..reps.max(1) {
        let rt = place::postbox_runtime().await;
        let start = Instant::now();
        let broker = Broker::open(&rt, StorageOptions::new(&dir)).expect("reopen the broker");
        let opened = start.elapsed();
        let deadline = start + Duration::from_secs(300);
        loop {
            assert!(
                Instant::now() < deadline,
                "the recovered queue did not show {n} ready messages in 5 minutes"
            );
            let snapshot = broker
                .queue_stats(QUEUE)
                .await
                .expect("the recovered queue");
            if snapshot.stats.ready as u64 >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = start.elapsed();
        drop(broker);
        rt.shutdown();
        rates.push(n as f64 / elapsed.as_secs_f64());
        opens.push(opened.as_secs_f64());
        readies.push((elapsed - opened).as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let rate = Trials {
        median: median(&mut rates),
        min: rates[0],
        max: rates[rates.len() - 1],
    };
    Recovery {
        rate,
        open: Duration::from_secs_f64(median(&mut opens)),
        ready: Duration::from_secs_f64(median(&mut readies)),
        bytes_on_disk,
    }
}

/// `syncs` rounds of: append `batch` records with one write, then fdatasync.
fn append_fdatasync(batch: usize, syncs: usize) -> std::io::Result<Latencies> {
    let path = bench_dir().join(format!("postbox-peers-{}-{batch}.log", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let mut record = (PAYLOAD as u64).to_le_bytes().to_vec();
    record.extend_from_slice(&[0x5a; PAYLOAD]);
    let buf = record.repeat(batch);
    let mut round = || -> std::io::Result<u64> {
        let t = Instant::now();
        file.write_all(&buf)?;
        file.sync_data()?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    for _ in 0..(syncs / 10).max(1) {
        round()?;
    }
    let start = Instant::now();
    let samples = (0..syncs).map(|_| round()).collect::<Result<Vec<_>, _>>();
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok(Latencies::new(samples?, elapsed))
}
