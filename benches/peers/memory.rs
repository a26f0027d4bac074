//! Scenario 7: memory.
//!
//! - Resident bytes per queued message: 1,000,000 messages (64-byte payloads,
//!   each its own allocation, as real messages are) published to a queue with
//!   no consumer. Baseline: the same payloads in an unbounded tokio mpsc
//!   channel, the least a user could get away with. "Overhead" is bytes per
//!   message minus the 64-byte payload (the payload's malloc header included).
//! - 100,000 queues with one consumer each: how fast they are created
//!   (`declare_queue` + `consume`, one after the other, as a simple loop does;
//!   and 64 at a time) and resident bytes per queue. Baseline: a bounded mpsc
//!   channel plus a receiving task per queue. (Scenario 8 has the cost of a
//!   bare actor: a queue with a consumer is two actors, the queue and the
//!   consumer, which supervises itself.)
//!
//! - 1,000,000 idle queues (declared, no consumer): how long declaring them
//!   takes and resident bytes per queue, the cost of wide fan-in.
//!
//! Each case runs in a child process (this binary with `--memory-child`), so
//! the allocator holds nothing from earlier scenarios; the resident size is
//! read after `malloc_trim(0)`, before and after filling.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use postbox::{Failure, Runtime};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueOptions};

use crate::Config;
use crate::report::{Metric, Report, Row};
use crate::util::{PAYLOAD, live_rss, thousands};

pub const S7: &str = "7 memory";

/// The most bytes of overhead per queued message the goal allows.
pub const OVERHEAD_GOAL: f64 = 150.0;

pub fn queued_postbox(n: u64) -> String {
    format!("postbox queue, {} × 64 B queued", thousands(n))
}

pub fn queued_tokio(n: u64) -> String {
    format!("tokio mpsc unbounded, {} × 64 B queued", thousands(n))
}

fn queues_postbox(n: u64) -> String {
    format!("postbox {} queues + 1 consumer each", thousands(n))
}

fn queues_postbox_concurrent(n: u64) -> String {
    format!(
        "postbox {} queues + 1 consumer each, {CONCURRENT} at a time",
        thousands(n)
    )
}

fn idle_queues_postbox(n: u64) -> String {
    format!("postbox {} idle queues (no consumer)", thousands(n))
}

/// Creations in flight in the concurrent variant.
const CONCURRENT: usize = 64;

fn queues_tokio(n: u64) -> String {
    format!("tokio {} × (mpsc(1024) + receiver task)", thousands(n))
}

/// What a child reports: a rate (per second) and bytes per item.
pub struct Measured {
    pub rate: f64,
    pub bytes: f64,
}

pub fn scenario7(cfg: &Config, report: &mut Report) {
    println!("\n== {S7}");
    let messages = cfg.count(1_000_000, 100_000);
    let queues = cfg.count(100_000, 5_000);

    if cfg.wants(&queued_tokio(messages)) {
        let m = run_child("queued-tokio", messages);
        report.push(
            Row::new(S7, queued_tokio(messages))
                .bytes(m.bytes)
                .note(format!("overhead {:.0} B/msg", m.bytes - PAYLOAD as f64)),
        );
    }
    if cfg.wants(&queued_postbox(messages)) {
        let m = run_child("queued-postbox", messages);
        report.push(
            Row::new(S7, queued_postbox(messages))
                .bytes(m.bytes)
                .vs(&queued_tokio(messages), Metric::Bytes)
                .note(format!(
                    "overhead {:.0} B/msg (goal ≤ {OVERHEAD_GOAL:.0})",
                    m.bytes - PAYLOAD as f64
                )),
        );
    }
    if cfg.wants(&queues_tokio(queues)) {
        let m = run_child("queues-tokio", queues);
        report.push(
            Row::new(S7, queues_tokio(queues))
                .rate(m.rate)
                .bytes(m.bytes)
                .note("msgs/s: created per s; bytes per queue"),
        );
    }
    if cfg.wants(&queues_postbox(queues)) {
        let m = run_child("queues-postbox", queues);
        report.push(
            Row::new(S7, queues_postbox(queues))
                .rate(m.rate)
                .bytes(m.bytes)
                .vs(&queues_tokio(queues), Metric::Bytes)
                .note("msgs/s: created per s; bytes per queue"),
        );
    }
    let idle = cfg.count(1_000_000, 10_000);
    if cfg.wants(&idle_queues_postbox(idle)) {
        let m = run_child("idle-queues-postbox", idle);
        report.push(
            Row::new(S7, idle_queues_postbox(idle))
                .rate(m.rate)
                .bytes(m.bytes)
                .note(format!(
                    "msgs/s: declared per s ({:.1} s in all); bytes per queue",
                    idle as f64 / m.rate
                )),
        );
    }
    if cfg.wants(&queues_postbox_concurrent(queues)) {
        let m = run_child("queues-postbox-concurrent", queues);
        report.push(
            Row::new(S7, queues_postbox_concurrent(queues))
                .rate(m.rate)
                .bytes(m.bytes)
                .vs(&queues_postbox(queues), Metric::Throughput)
                .note("msgs/s: created per s; bytes per queue"),
        );
    }
}

pub fn run_child(case: &str, n: u64) -> Measured {
    let exe = std::env::current_exe().expect("the bench binary's path");
    let output = Command::new(exe)
        .args(["--memory-child", case, &n.to_string()])
        .output()
        .expect("run the memory child process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "memory child {case} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("the child prints a JSON line");
    let value: serde_json::Value = serde_json::from_str(line).expect("the child's JSON");
    let get = |k: &str| value[k].as_f64().unwrap_or(f64::NAN);
    Measured {
        rate: get("rate"),
        bytes: get("bytes"),
    }
}

/// Entry point of a child process: `--memory-child <case> <count>`.
pub fn child(args: &[String]) {
    // The parent's placement is inherited; memory cases use every core.
    crate::util::unpin_current_thread();
    let case = args.first().map(String::as_str).unwrap_or_default();
    let n: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .expect("--memory-child <case> <count>");
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (rate, bytes) = driver.block_on(async {
        match case {
            "queued-postbox" => (0.0, queued_in_postbox(n).await),
            "queued-tokio" => (0.0, queued_in_tokio(n).await),
            "queues-postbox" => queues_in_postbox(n, 1).await,
            "queues-postbox-concurrent" => queues_in_postbox(n, CONCURRENT).await,
            "actors-postbox" => actors_in_postbox(n).await,
            "actors-kameo" => crate::actor_layer::kameo_idle(n).await,
            "actors-ractor" => crate::actor_layer::ractor_idle(n).await,
            "queues-tokio" => queues_in_tokio(n).await,
            "idle-queues-postbox" => idle_queues_in_postbox(n).await,
            other => panic!("unknown memory case {other}"),
        }
    });
    println!(
        "{}",
        serde_json::json!({ "case": case, "rate": rate, "bytes": bytes })
    );
    // Exit without tearing everything down: only the numbers matter.
    std::process::exit(0);
}

/// A payload of its own, as a message read from a socket or built by
/// serialization would have.
fn own_payload(i: u64) -> Bytes {
    Bytes::copy_from_slice(&[i as u8; PAYLOAD])
}

async fn queued_in_postbox(n: u64) -> f64 {
    let rt = Runtime::new().expect("postbox runtime");
    let broker = Broker::new(&rt);
    let queue = broker
        .declare_queue("memory", QueueOptions::default())
        .await
        .expect("declare the queue");
    let before = live_rss();
    let mut sent = 0;
    while sent < n {
        let k = 256.min(n - sent);
        let batch = (sent..sent + k)
            .map(|i| Envelope::new(own_payload(i)))
            .collect();
        queue.publish_batch(batch).await.expect("publish_batch");
        sent += k;
    }
    loop {
        let stats = queue.snapshot().await.expect("snapshot").stats;
        if stats.ready as u64 == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = live_rss();
    eprintln!(
        "size_of::<Envelope>() = {} B",
        std::mem::size_of::<Envelope>()
    );
    (after - before) as f64 / n as f64
}

async fn queued_in_tokio(n: u64) -> f64 {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let before = live_rss();
    for i in 0..n {
        tx.send(own_payload(i)).expect("the receiver is alive");
    }
    let after = live_rss();
    drop(rx);
    (after - before) as f64 / n as f64
}

/// Creates `n` queues with a consumer each, `concurrent` creations at a time.
async fn queues_in_postbox(n: u64, concurrent: usize) -> (f64, f64) {
    let rt = Runtime::new().expect("postbox runtime");
    let broker = Broker::new(&rt);
    let before = live_rss();
    let start = Instant::now();
    let create = |i: u64| {
        let broker = &broker;
        async move {
            let name = format!("q{i}");
            broker
                .declare_queue(&name, QueueOptions::default())
                .await
                .expect("declare a queue");
            broker
                .consume(&name, ConsumeOptions::auto(), || {
                    |delivery: Delivery| {
                        drop(delivery);
                        async { Ok::<(), Failure>(()) }
                    }
                })
                .await
                .expect("consume")
        }
    };
    // The handles are kept, as an application keeps them.
    let consumers: Vec<_> = futures::stream::iter(0..n)
        .map(create)
        .buffer_unordered(concurrent)
        .collect()
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let after = live_rss();
    drop(consumers);
    (rate, (after - before) as f64 / n as f64)
}

/// Declares `n` queues, one after the other, and waits until every queue
/// actor runs (a snapshot of the last one answers).
async fn idle_queues_in_postbox(n: u64) -> (f64, f64) {
    let rt = Runtime::new().expect("postbox runtime");
    let broker = Broker::new(&rt);
    let before = live_rss();
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n as usize);
    for i in 0..n {
        let handle = broker
            .declare_queue(&format!("q{i}"), QueueOptions::default())
            .await
            .expect("declare a queue");
        handles.push(handle);
    }
    // Every arbiter has started the queues it was handed.
    for handle in handles.iter().rev().take(rt.arbiters()) {
        handle.snapshot().await.expect("the queue runs");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let after = live_rss();
    drop(handles);
    (rate, (after - before) as f64 / n as f64)
}

struct Idle(&'static AtomicU64);

impl postbox::Actor for Idle {
    async fn started(&mut self, _: &mut postbox::Context<Self>) -> Result<(), Failure> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Spawns `n` idle actors with the default mailbox and waits until all run.
async fn actors_in_postbox(n: u64) -> (f64, f64) {
    let rt = Runtime::new().expect("postbox runtime");
    let started: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let before = live_rss();
    let start = Instant::now();
    let addrs: Vec<_> = (0..n).map(|_| rt.spawn(Idle(started))).collect();
    while started.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let after = live_rss();
    drop(addrs);
    (rate, (after - before) as f64 / n as f64)
}

async fn queues_in_tokio(n: u64) -> (f64, f64) {
    let started: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let before = live_rss();
    let start = Instant::now();
    let mut senders = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        tokio::spawn(async move {
            started.fetch_add(1, Ordering::Relaxed);
            while rx.recv().await.is_some() {}
        });
        senders.push(tx);
    }
    // Created means running and parked on its channel, as a consumer is.
    while started.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let after = live_rss();
    (rate, (after - before) as f64 / n as f64)
}
