//! postbox against what a user would pick instead, in one run on one machine:
//! `cargo bench --bench peers [-- [--quick] [--only 1,4] [--filter text]]`.
//!
//! Set `AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`) to add
//! RabbitMQ, through `lapin`, as a peer in scenarios 1, 3, 4 and 5, and
//! `NATS_URL` (e.g. `nats://127.0.0.1:4222`, a server with JetStream) to add
//! NATS JetStream, through `async-nats`, as a peer in scenario 5, and
//! `REDIS_URL` (e.g. `redis://127.0.0.1:6379`) to add scenario 9's Redis
//! row.
//!
//! # What is measured
//!
//! Every message carries a 64-byte payload unless a scenario says otherwise.
//!
//! 1. Point-to-point, one producer, one auto-ack consumer. Baselines: a bounded
//!    `tokio::sync::mpsc` channel and a raw actix actor (`do_send`).
//! 2. Point-to-point with manual acks, prefetch 256 and two competing consumers;
//!    compared with scenario 1.
//! 3. Fan-out from one producer to 10 subscribers: a stream (one shared log)
//!    and a fanout exchange (a queue per subscriber). Baseline:
//!    `tokio::sync::broadcast`, paced so that no receiver lags.
//! 4. Request-reply round trips, requester and responder on the same arbiter and
//!    on different arbiters (also with busy-polling arbiters): postbox
//!    `Addr::ask` and postbox `rpc` (request/reply queues). Baseline: actix
//!    `send().await`.
//! 5. Durable publish with confirms, against the disk's ceiling (append +
//!    `fdatasync` per batch): one publisher with batches of 1 and 64, 64 and
//!    256 concurrent publishers sharing syncs (group commit), 256 publishers
//!    with an interval sync policy (against JetStream), and recovery of
//!    1,000,000 messages at reopening. See `peers/durable.rs`.
//! 6. Routing through a topic exchange with 10,000 bindings, against the same
//!    exchange with 10.
//! 7. Memory: resident bytes per queued message with 1,000,000 queued, and per
//!    queue (with one consumer) with 100,000 queues, plus the creation rate.
//! 8. The actor layer against kameo and ractor: tell throughput, asks on one
//!    thread, across pinned threads and from a plain tokio task, restart
//!    latency after a panic, and spawning 100,000 idle actors.
//! 9. The consume path with the idempotency layer (claim, record, ack per
//!    message) with the memory store, and with Redis when `REDIS_URL` is set,
//!    against the same consumer without the layer.
//! 10. Ordered consumption, 1,000 keys: 4 partitions with one consumer each,
//!     and a key-ordered consumer with 4 workers, against a plain queue with
//!     one consumer.
//! 11. Flow control and monitoring, against a plain queue of scenario 1's
//!     shape: a priority queue, a monitor with a Prometheus recorder, and
//!     `block` overflow with a consumer ten times slower (the publisher's
//!     waiting share and the memory it adds, against no limit).
//! 12. postbox's broker API on RabbitMQ (feature `amqp`) against raw lapin
//!     doing the same: confirmed publishes, consuming with manual acks, and
//!     request-reply through direct reply-to (`AMQP_URL`). See
//!     `peers/remote.rs`.
//!
//! # How
//!
//! - Throughput: each row is the median of `reps` trials (5; 1 with
//!   `--quick`). A trial starts the system afresh (new threads, so the OS
//!   places them anew), runs a warm-up round of a tenth of the count, then one
//!   measured round of a fixed count: messages / elapsed, where the round ends
//!   when the consumers have seen every message. All systems signal
//!   completion the same way (an atomic counter and a `Notify`).
//! - Latency: one sample per round trip after a warm-up; p50 and p99 of the
//!   sorted samples. `msgs/s` is round trips per second. "Across arbiters"
//!   pins the two threads to different cores, and a floor row shows what two
//!   plain threads pay for the same two wake-ups.
//! - Memory: each case runs in a fresh child process (this binary, with
//!   `--memory-child`), so nothing earlier in the run is cached by the
//!   allocator. Resident size (`VmRSS`) is read after `malloc_trim(0)` before
//!   filling and after, and the difference is divided by the count.
//! - The producer runs on the driver thread, consumers on worker threads: for
//!   postbox the arbiters of a `Runtime` (one per core), for tokio a
//!   multi-threaded runtime with one worker per core, for actix one arbiter per
//!   core. The OS places the threads; `--pin` puts the producer on core 0 and
//!   every consuming thread on core 1 instead, for all systems alike (see
//!   `peers/place.rs`). Only public APIs are used.
//! - RabbitMQ rows run after every in-process row (the broker shares the
//!   machine and stays busy for a while after heavy traffic), 256 publishes in
//!   flight; see `peers/rabbit.rs`. JetStream's rows run last; see
//!   `peers/nats.rs`.
//!
//! Options: `--quick` (small counts, one trial: the CI smoke test), `--only
//! 1,4` (scenarios), `--filter text` (rows whose system contains `text`;
//! `=name` for exactly that row; for profiling), `--pin` (fixed placement:
//! stable run to run, for comparing commits).
//!
//! Output: a Markdown table with ratios on stdout, a goals check, and
//! `target/bench/peers.json` (an array of `{scenario, system, msgs_per_sec,
//! p50_us, p99_us, bytes_per_msg}`).

// A benchmark program: its modules share items with each other, not with
// users, so the library's API lints do not apply.
#![allow(unreachable_pub, missing_docs, missing_debug_implementations)]

#[path = "peers/actix_threads.rs"]
mod actix_threads;
#[path = "peers/actor_layer.rs"]
mod actor_layer;
#[path = "peers/durable.rs"]
mod durable;
#[path = "peers/fanout.rs"]
mod fanout;
#[path = "peers/flow.rs"]
mod flow;
#[path = "peers/goals.rs"]
mod goals;
#[path = "peers/idempotent.rs"]
mod idempotent;
#[path = "peers/memory.rs"]
mod memory;
#[path = "peers/nats.rs"]
mod nats;
#[path = "peers/ordered.rs"]
mod ordered;
#[path = "peers/p2p.rs"]
mod p2p;
#[path = "peers/place.rs"]
mod place;
#[path = "peers/rabbit.rs"]
mod rabbit;
#[path = "peers/remote.rs"]
mod remote;
#[path = "peers/report.rs"]
mod report;
#[path = "peers/rpc.rs"]
mod rpc;
#[path = "peers/topic.rs"]
mod topic;
#[path = "peers/util.rs"]
mod util;

use report::Report;

/// What to run and how much of it.
pub struct Config {
    /// Small counts: a smoke test.
    pub quick: bool,
    /// Trials per throughput row (RabbitMQ: rounds, at most 3).
    pub reps: usize,
    /// Scenarios to run (all when empty).
    pub only: Vec<u32>,
    /// Only rows whose system contains this text (`--filter`, for profiling).
    pub filter: Option<String>,
    /// Fixed thread placement for throughput trials (`--pin`).
    pub pin: bool,
    /// RabbitMQ, when `AMQP_URL` is set.
    pub amqp: Option<String>,
    /// NATS JetStream, when `NATS_URL` is set.
    pub nats: Option<String>,
}

impl Config {
    fn from_args(args: &[String]) -> Config {
        let quick = args.iter().any(|a| a == "--quick");
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .map(|list| {
                list.split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .expect("--only takes scenario numbers: 1,3")
                    })
                    .collect()
            })
            .unwrap_or_default();
        let filter = args
            .iter()
            .position(|a| a == "--filter")
            .and_then(|i| args.get(i + 1))
            .cloned();
        Config {
            quick,
            reps: if quick { 1 } else { 5 },
            only,
            filter,
            pin: args.iter().any(|a| a == "--pin"),
            amqp: std::env::var("AMQP_URL").ok().filter(|u| !u.is_empty()),
            nats: std::env::var("NATS_URL").ok().filter(|u| !u.is_empty()),
        }
    }

    /// `full`, or `quick` with `--quick`.
    pub fn count(&self, full: u64, quick: u64) -> u64 {
        if self.quick { quick } else { full }
    }

    /// Whether to run the row of `system`: `--filter text` runs the rows whose
    /// system contains `text`, `--filter =name` only the row called `name`.
    pub fn wants(&self, system: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| match f.strip_prefix('=') {
                Some(exact) => system == exact,
                None => system.contains(f.as_str()),
            })
    }

    fn runs(&self, scenario: u32) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        memory::child(&args[i + 1..]);
        return;
    }
    let cfg = Config::from_args(&args);
    let machine = machine();
    println!(
        "postbox peers benchmark{}",
        if cfg.quick { " (--quick)" } else { "" }
    );
    println!("{machine}");
    let start = std::time::Instant::now();

    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("the driver's tokio runtime");
    // After the driver's workers exist, so that they (and RabbitMQ's client
    // tasks on them) are not confined to the producer's core.
    if cfg.pin {
        place::enable();
        place::producer();
    }
    let mut report = Report::default();
    let mut notes: Vec<String> = Vec::new();
    driver.block_on(async {
        // In-process systems first: RabbitMQ runs on this machine too, and
        // keeps working (flushing, collecting garbage) for a while after its
        // rows, which would disturb whatever ran next.
        if cfg.runs(1) {
            p2p::scenario1(&cfg, &mut report).await;
        }
        if cfg.runs(2) {
            p2p::scenario2(&cfg, &mut report).await;
        }
        if cfg.runs(3) {
            fanout::scenario3(&cfg, &mut report).await;
        }
        if cfg.runs(4) {
            rpc::scenario4(&cfg, &mut report).await;
        }
        if cfg.runs(5) {
            durable::scenario5(&cfg, &mut report).await;
        }
        if cfg.runs(6) {
            topic::scenario6(&cfg, &mut report).await;
        }
        if cfg.runs(7) {
            memory::scenario7(&cfg, &mut report);
        }
        if cfg.runs(8) {
            actor_layer::scenario8(&cfg, &mut report).await;
        }
        if cfg.runs(9) {
            idempotent::scenario9(&cfg, &mut report).await;
        }
        if cfg.runs(10) {
            ordered::scenario10(&cfg, &mut report).await;
        }
        if cfg.runs(11) {
            flow::scenario11(&cfg, &mut report).await;
        }
        // RabbitMQ's rows: the publisher may run anywhere, like its client's tasks.
        util::unpin_current_thread();
        let rabbit = match &cfg.amqp {
            None => {
                notes.push(
                    "RabbitMQ rows skipped: AMQP_URL is not set \
                     (e.g. AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f)."
                        .to_string(),
                );
                None
            }
            Some(url) => match rabbit::Rabbit::connect(url).await {
                Ok(r) => Some(r),
                Err(err) => {
                    notes.push(format!(
                        "RabbitMQ rows skipped: cannot connect to AMQP_URL: {err}"
                    ));
                    None
                }
            },
        };
        if let Some(r) = rabbit {
            println!("\n== RabbitMQ");
            if cfg.runs(1) {
                r.scenario1(&cfg, &mut report).await;
            }
            if cfg.runs(3) {
                r.scenario3(&cfg, &mut report).await;
            }
            // Scenario 12 compares its rpc row with scenario 4's.
            if cfg.runs(4) || cfg.runs(12) {
                r.scenario4(&cfg, &mut report).await;
            }
            if cfg.runs(5) {
                r.scenario5(&cfg, &mut report).await;
            }
            r.close().await;
            if cfg.runs(12) {
                remote::scenario12(&cfg, &mut report).await;
            }
        }
        // JetStream's rows (scenario 5 only), last for the same reason.
        if cfg.runs(5) {
            match &cfg.nats {
                None => notes.push(
                    "NATS JetStream rows skipped: NATS_URL is not set \
                     (e.g. NATS_URL=nats://127.0.0.1:4222, a server started with -js)."
                        .to_string(),
                ),
                Some(url) => match nats::Nats::connect(url).await {
                    Ok(n) => {
                        println!("\n== NATS JetStream");
                        n.scenario5(&cfg, &mut report).await;
                        n.close().await;
                    }
                    Err(err) => notes.push(format!(
                        "NATS JetStream rows skipped: cannot connect to NATS_URL: {err}"
                    )),
                },
            }
        }
    });
    driver.shutdown_timeout(std::time::Duration::from_secs(1));

    println!("\n## Results\n\n{machine}");
    print!("{}", report.table());
    println!("\n## Goals\n");
    print!("{}", goals::check(&report));
    for note in &notes {
        println!("\nNote: {note}");
    }
    match report.write_json() {
        Ok(path) => println!("\nWrote {}", path.display()),
        Err(err) => {
            eprintln!("cannot write peers.json: {err}");
            std::process::exit(1);
        }
    }
    println!("Total time: {:.0} s", start.elapsed().as_secs_f64());
}

/// One line about the machine: CPU model, cores, memory, kernel.
fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease");
    // Anything else running skews the numbers: say how busy the machine was.
    let load = read("/proc/loadavg");
    let load = load.split_whitespace().next().unwrap_or("?");
    format!(
        "Machine: {cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}; load average {load} at start",
        kernel.trim()
    )
}
