//! Backpressure: a rate-limited producer, a bounded queue that makes it
//! wait, a consumer pool that grows under the backlog and shrinks when it is
//! gone, and a monitor whose alerts fire and clear as it happens.
//!
//! From section 8 of the seed tutorial (背压处理机制, "backpressure"): its
//! `ThrottledProducer` (a token bucket of 100 messages a second), its
//! `BackpressureAwareConsumer` (`@RabbitListener(concurrency = "5-10")`) and
//! its `QueueMonitor` (a depth check every 5 s that warns past a threshold).
//! Here each is a feature of the library instead of hand-written code:
//!
//! - the producer is a `Throttled` queue handle with a `RateLimit` (a token
//!   bucket): `publish` waits for its permit;
//! - the queue is bounded (`QueueOptions::max_length` with `Overflow::Block`):
//!   when it is full, publishes wait for room in front of it, and once its
//!   inbox (`QueueOptions::mailbox`, here 16 publishes) is full too,
//!   `publish` waits: the backlog cannot grow past the bound and the
//!   producer slows to what the consumers take;
//! - the consumers are a `ConsumerPool` of `"5-10"` workers, each taking
//!   `--work-ms` per message: 5 workers are slower than the producer, so a
//!   backlog builds, and the pool adds workers up to 10 (faster than the
//!   producer), then retires them once they idle (with rules sped up from
//!   Spring's defaults so that it happens within seconds);
//! - a `Monitor` samples the queue every 100 ms and raises alerts (depth
//!   above `--alert-depth`, publishers blocked longer than 300 ms), printed
//!   as they fire and clear.
//!
//! A progress bar shows the run on a terminal (hidden otherwise). It checks
//! that every message was consumed exactly once, that the queue never held
//! more than its bound, that the pool grew above its minimum and came back
//! to it (a fixed pool, `--pool 5`: that it kept its size), that every
//! alert that fired also cleared (an alert has no hysteresis: a depth that
//! hovers at the threshold may fire and clear more than once), and that the
//! producer kept to its rate limit.
//!
//! Run it with
//! `cargo run --release --example backpressure -- --messages 1000 --rate 200`.
//!
//! Flags (defaults in brackets):
//! - `--messages N`: messages to produce [1000];
//! - `--rate N`: the producer's limit, messages a second [200];
//! - `--work-ms N`: each message's handling time [40] (5 workers then take
//!   125 a second, 10 take 250);
//! - `--pool MIN-MAX`: the pool's size, Spring's `concurrency` [5-10];
//! - `--bound N`: the queue's length limit [50];
//! - `--alert-depth N`: the depth alert's threshold [half the bound].
//!
//! The checks on scaling and alerts expect the producer to outrun the
//! pool's minimum (`rate > min × 1000 / work-ms`) for a second or more; the
//! seed's own numbers, `--rate 100 --work-ms 80`, do (5 workers: 62 a
//! second; 10: 125).

#[path = "support/mod.rs"]
pub mod support;

use std::collections::HashMap;
use std::error::Error;
use std::io::IsTerminal;
use std::mem::Discriminant;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::monitor::{Alert, AlertKind, MonitorOptions, Thresholds};
use postbox_actors::{
    Broker, ConsumerPool, DeleteOptions, Delivery, Envelope, Overflow, PoolOptions, PoolStats,
    QueueOptions, RateLimit, Throttled,
};
use support::{Flags, Summary, secs};
use tokio::sync::broadcast::error::RecvError;

/// The seed's queue name (the example has a broker of its own).
const QUEUE: &str = "high.volume.queue";
/// How often the monitor samples (the seed checks every 5 s).
const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// The publishers-blocked alert's threshold.
const BLOCKED_ALERT: Duration = Duration::from_millis(300);
/// Publishes that may wait in front of the full queue before `publish`
/// itself waits (the default, 1,024, would let the producer run on for
/// seconds before it felt the bound).
const INBOX: usize = 16;
/// How often this example reads the queue's size for its peak and the bar.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Counts by second since the start.
struct PerSecond {
    started: Instant,
    counts: Mutex<Vec<u64>>,
}

impl PerSecond {
    fn new(started: Instant) -> Self {
        PerSecond {
            started,
            counts: Mutex::default(),
        }
    }

    fn add(&self) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut counts = self.counts.lock().expect("per-second lock");
        if counts.len() <= second {
            counts.resize(second + 1, 0);
        }
        counts[second] += 1;
    }

    fn counts(&self) -> Vec<u64> {
        self.counts.lock().expect("per-second lock").clone()
    }
}

/// What the consumers did: how many times each message was handled.
struct Tally {
    handled: Vec<AtomicU32>,
    consumed: AtomicU64,
    /// Messages that were not one of ours (none expected).
    strays: AtomicU64,
    per_second: PerSecond,
}

impl Tally {
    fn new(messages: u64, started: Instant) -> Self {
        Tally {
            handled: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            consumed: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            per_second: PerSecond::new(started),
        }
    }

    fn record(&self, seq: u64) {
        match usize::try_from(seq).ok().and_then(|i| self.handled.get(i)) {
            Some(count) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.strays.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.consumed.fetch_add(1, Ordering::Relaxed);
        self.per_second.add();
    }

    fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

/// Lines printed while the progress bar runs: above the bar on a terminal,
/// plainly otherwise (a hidden bar prints nothing).
#[derive(Clone)]
struct Out {
    bar: ProgressBar,
    visible: bool,
}

impl Out {
    fn new(messages: u64) -> Self {
        let visible = std::io::stdout().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(messages), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed:>3} [{bar:30}] {pos}/{len} consumed · {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Out { bar, visible }
    }

    fn say(&self, line: String) {
        if self.visible {
            self.bar.println(line);
        } else {
            println!("{line}");
        }
    }
}

/// The pool's worker count each time it changed, with when.
type Trajectory = Arc<Mutex<Vec<(Duration, usize)>>>;

/// The alerts received, with when.
type Alerts = Arc<Mutex<Vec<(Duration, Alert)>>>;

fn alert_name(kind: &AlertKind) -> &'static str {
    match kind {
        AlertKind::Depth { .. } => "depth",
        AlertKind::PublishersBlocked { .. } => "publishers blocked",
        AlertKind::OldestMessage { .. } => "oldest message",
        AlertKind::NoConsumers { .. } => "no consumers",
        AlertKind::CrashLooping { .. } => "crash loop",
        _ => "alert",
    }
}

fn describe(alert: &Alert, at: Duration) -> String {
    let t = format!("[{:>5.2} s]", at.as_secs_f64());
    match (alert.firing, &alert.kind) {
        (true, AlertKind::Depth { ready, threshold }) => {
            format!(
                "{t} ⚠ depth alert on {}: {ready} ready > {threshold}",
                alert.queue
            )
        }
        (false, AlertKind::Depth { ready, .. }) => {
            format!("{t} ✓ depth alert cleared: {ready} ready")
        }
        (true, AlertKind::PublishersBlocked { for_ms, .. }) => {
            format!("{t} ⚠ publishers blocked: waiting for room for {for_ms} ms")
        }
        (false, AlertKind::PublishersBlocked { for_ms, .. }) => {
            format!("{t} ✓ publishers unblocked after {for_ms} ms")
        }
        (true, kind) => format!("{t} ⚠ {} alert on {}", alert_name(kind), alert.queue),
        (false, kind) => format!("{t} ✓ {} alert cleared", alert_name(kind)),
    }
}

/// Whether each alert's events alternate fire, clear, fire, clear... and end
/// cleared; with the number fired and cleared.
fn alerts_balanced(alerts: &[(Duration, Alert)]) -> (bool, usize, usize) {
    let mut state: HashMap<(String, Discriminant<AlertKind>), bool> = HashMap::new();
    let mut ok = true;
    let (mut fired, mut cleared) = (0, 0);
    for (_, alert) in alerts {
        let key = (alert.queue.clone(), std::mem::discriminant(&alert.kind));
        let firing = state.entry(key).or_insert(false);
        ok &= *firing != alert.firing;
        *firing = alert.firing;
        if alert.firing {
            fired += 1;
        } else {
            cleared += 1;
        }
    }
    (ok && state.values().all(|firing| !firing), fired, cleared)
}

/// The worker count at `t`, from the trajectory.
fn workers_at(trajectory: &[(Duration, usize)], t: Duration) -> usize {
    trajectory
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .or(trajectory.first())
        .map_or(0, |&(_, w)| w)
}

/// A small table of what happened second by second (in columns of several
/// seconds for long runs): messages published and consumed, and the
/// workers at the end of each column.
fn timeline(
    elapsed: Duration,
    published: &[u64],
    consumed: &[u64],
    trajectory: &[(Duration, usize)],
) -> Vec<String> {
    const MOST_COLUMNS: u64 = 16;
    let seconds = elapsed.as_secs_f64().ceil().max(1.0) as u64;
    let width = seconds.div_ceil(MOST_COLUMNS);
    let columns = seconds.div_ceil(width);
    let sum = |counts: &[u64], c: u64| -> u64 {
        let from = (c * width) as usize;
        let to = ((c + 1) * width) as usize;
        counts.iter().take(to).skip(from).sum()
    };
    let row = |name: &str, cell: &dyn Fn(u64) -> String| {
        let cells: Vec<String> = (0..columns).map(|c| format!("{:>5}", cell(c))).collect();
        format!("{name:<10}{}", cells.join(""))
    };
    let unit = if width == 1 {
        "second".to_string()
    } else {
        format!("{width} s")
    };
    vec![
        row(&format!("per {unit}"), &|c| format!("{}", (c + 1) * width)),
        row("published", &|c| sum(published, c).to_string()),
        row("consumed", &|c| sum(consumed, c).to_string()),
        row("workers", &|c| {
            let end = Duration::from_secs((c + 1) * width).min(elapsed);
            workers_at(trajectory, end).to_string()
        }),
    ]
}

/// Background tasks, aborted when dropped (also on an early return).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    async fn stop(mut self) {
        for task in &self.0 {
            task.abort();
        }
        for task in self.0.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Polls `done` every 10 ms until it holds or `limit` passes; says which.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Runs the example on `rt` with `flags`; the tour calls it too.
pub async fn run(rt: &RuntimeHandle, flags: &Flags) -> Result<Summary, Box<dyn Error>> {
    let messages = flags.u64("messages", 1000).max(1);
    let rate = flags.u32("rate", 200).max(1);
    let work = flags.millis("work-ms", Duration::from_millis(40));
    let bound = flags.usize("bound", 50).max(1);
    let alert_depth = flags.usize("alert-depth", bound / 2);
    let pool_spec = flags.string("pool", "5-10");
    let started = Instant::now();

    // Spring's `concurrency = "5-10"`, with its rules sped up (Spring's are
    // seconds to minutes): a check every 100 ms; a worker more after 3
    // checks in a row with more than 4 messages waiting per worker, at most
    // one every 800 ms; one fewer after a worker's worth of idleness over 5
    // checks, at most one every 300 ms. A prefetch of 2 per worker keeps the
    // backlog in the queue, where the bound and the monitor see it.
    //
    // A bound caps what the pool sees waiting: at most the bound, plus what
    // its prefetch holds beyond the messages in hand (2 × max − workers).
    // The pool grows only while that can exceed 4 per worker (with the
    // defaults, up to 13 workers); a smaller bound stops it short of its
    // maximum however far behind it is (then lower `backlog_per_worker`, or
    // let `max_wait` add workers by the age of the oldest message).
    let sizing: PoolOptions = pool_spec
        .parse::<PoolOptions>()
        .map_err(|e| format!("--pool {pool_spec}: {e}"))?
        .check_interval(Duration::from_millis(100))
        .backlog_per_worker(4)
        .consecutive_active_trigger(3)
        .start_consumer_min_interval(Duration::from_millis(800))
        .consecutive_idle_trigger(5)
        .stop_consumer_min_interval(Duration::from_millis(300))
        .prefetch_per_worker(2);
    let (min, max) = (sizing.min(), sizing.max());

    let broker = Broker::new(rt);
    let queue = broker
        .declare_queue(
            QUEUE,
            QueueOptions::default()
                .max_length(bound)
                .overflow(Overflow::Block)
                .mailbox(INBOX),
        )
        .await?;

    let out = Out::new(messages);
    let monitor = broker.monitor(
        MonitorOptions::default()
            .interval(MONITOR_EVERY)
            .queue_thresholds(
                QUEUE,
                Thresholds::default()
                    .depth(alert_depth)
                    .publishers_blocked(BLOCKED_ALERT),
            ),
    );

    // The consumers: each message takes `work`, is recorded, then acked.
    let tally = Arc::new(Tally::new(messages, started));
    let handler = {
        let tally = tally.clone();
        move || {
            let tally = tally.clone();
            move |d: Delivery| {
                let tally = tally.clone();
                async move {
                    let seq: u64 = d.decode()?;
                    tokio::time::sleep(work).await;
                    tally.record(seq);
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let pool = ConsumerPool::new(sizing, handler);
    let watch = pool.watch();
    let consumer = broker.consume(QUEUE, pool.consume_options(), pool).await?;

    // Background tasks, stopped at the end (or on an error): the pool's
    // size as it changes, the alerts as they fire and clear, and the
    // queue's size.
    let trajectory: Trajectory = Arc::new(Mutex::new(vec![(Duration::ZERO, watch.workers())]));
    let mut tasks = Tasks(Vec::new());
    tasks.0.push(tokio::spawn({
        let (trajectory, mut rx) = (trajectory.clone(), watch.subscribe());
        async move {
            while rx.changed().await.is_ok() {
                let stats: PoolStats = *rx.borrow_and_update();
                let mut seen = trajectory.lock().expect("trajectory lock");
                if seen.last().map(|&(_, w)| w) != Some(stats.workers) {
                    seen.push((started.elapsed(), stats.workers));
                }
            }
        }
    }));
    let alerts: Alerts = Arc::default();
    tasks.0.push(tokio::spawn({
        let (alerts, out, mut rx) = (alerts.clone(), out.clone(), monitor.alerts());
        async move {
            loop {
                match rx.recv().await {
                    Ok(alert) => {
                        let at = started.elapsed();
                        out.say(describe(&alert, at));
                        alerts.lock().expect("alerts lock").push((at, alert));
                    }
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                }
            }
        }
    }));
    let peak_ready = Arc::new(AtomicUsize::new(0));
    let blocked_us = Arc::new(AtomicU64::new(0));
    tasks.0.push(tokio::spawn({
        let (broker, out, tally, watch) =
            (broker.clone(), out.clone(), tally.clone(), watch.clone());
        let (peak_ready, blocked_us) = (peak_ready.clone(), blocked_us.clone());
        async move {
            let mut last = Instant::now();
            loop {
                if let Ok(snapshot) = broker.queue_stats(QUEUE).await {
                    let ready = snapshot.stats.ready;
                    peak_ready.fetch_max(ready, Ordering::Relaxed);
                    let now = Instant::now();
                    if snapshot.waiting_publishes > 0 {
                        let waited = now.duration_since(last).as_micros() as u64;
                        blocked_us.fetch_add(waited, Ordering::Relaxed);
                    }
                    last = now;
                    out.bar.set_position(tally.consumed());
                    out.bar.set_message(format!(
                        "workers {:>2} · queue {ready:>3}/{bound}",
                        watch.workers()
                    ));
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        }
    }));

    // The producer: at most `rate` a second, and never past the bound.
    let limit = RateLimit::per_second(rate);
    let burst = u64::from(limit.burst_size());
    let producer = Throttled::new(queue, limit);
    out.say(format!(
        "producing {messages} messages at ≤ {rate}/s into '{QUEUE}' (bound {bound}, overflow block); \
         pool {min}-{max} workers, {} ms each",
        work.as_millis()
    ));
    let published = PerSecond::new(started);
    let producing = Instant::now();
    for seq in 0..messages {
        producer.publish(Envelope::encode(&seq)?).await?;
        published.add();
    }
    let produced_in = producing.elapsed();
    out.say(format!(
        "[{:>5.2} s] producer done: {messages} in {}",
        started.elapsed().as_secs_f64(),
        secs(produced_in)
    ));

    // Wait for the consumers to finish, the pool to shrink back and the
    // alerts to clear, each bounded (a missed one fails a check below).
    let per_message = work.max(Duration::from_millis(1));
    let as_u32 = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let drain_limit = (per_message.saturating_mul(as_u32(messages)) / as_u32(min as u64).max(1))
        .saturating_add(Duration::from_secs(5));
    let drained = until(drain_limit, || tally.consumed() >= messages).await;
    out.bar.set_position(tally.consumed());
    let shrink_limit = Duration::from_millis(2000)
        .saturating_mul(as_u32((max - min) as u64))
        .saturating_add(Duration::from_secs(2));
    let shrunk = until(shrink_limit, || watch.workers() == min).await;
    let settled = until(Duration::from_secs(3), || {
        monitor.firing().is_empty() && alerts_balanced(&alerts.lock().expect("alerts lock")).0
    })
    .await;
    let elapsed = started.elapsed();

    // Clean up: tasks, consumer, queue, monitor, bar.
    tasks.stop().await;
    consumer.cancel().await;
    let final_stats = broker
        .delete_queue(QUEUE, DeleteOptions::default())
        .await?
        .stats;
    drop(monitor);
    out.bar.finish_and_clear();

    // What happened.
    let trajectory = trajectory.lock().expect("trajectory lock").clone();
    let alerts = alerts.lock().expect("alerts lock").clone();
    let pool_stats = watch.stats();
    let peak = trajectory.iter().map(|&(_, w)| w).max().unwrap_or(0);
    let peak_at = trajectory
        .iter()
        .find(|&&(_, w)| w == peak)
        .map_or(Duration::ZERO, |&(t, _)| t);
    let final_workers = watch.workers();
    let table = timeline(
        elapsed,
        &published.counts(),
        &tally.per_second.counts(),
        &trajectory,
    );
    let once = tally
        .handled
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) == 1)
        .count() as u64;
    let twice = tally
        .handled
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 1)
        .count();
    let strays = tally.strays.load(Ordering::Relaxed);
    let peak_ready = peak_ready.load(Ordering::Relaxed);
    let blocked = Duration::from_micros(blocked_us.load(Ordering::Relaxed));
    let measured = messages as f64 / produced_in.as_secs_f64().max(1e-9);
    let allowed = f64::from(rate) * produced_in.as_secs_f64() * 1.1 + burst as f64;
    let (balanced, fired, cleared) = alerts_balanced(&alerts);
    let mut kinds: Vec<&str> = alerts
        .iter()
        .filter(|(_, a)| a.firing)
        .map(|(_, a)| alert_name(&a.kind))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();

    // The time the producer took beyond what its limit alone needs.
    let unhindered =
        Duration::from_secs_f64(messages.saturating_sub(burst) as f64 / f64::from(rate));
    let held_back = produced_in.saturating_sub(unhindered);

    let mut summary =
        Summary::new("backpressure: a throttled producer, a bounded queue, a pool that scales");
    summary
        .line(format!(
            "producer: {messages} messages in {} = {measured:.0}/s (limit {rate}/s, burst {burst}); \
             publishes waited for room in front of the full queue for {}, slowing it by {}",
            secs(produced_in),
            secs(blocked),
            secs(held_back)
        ))
        .line(format!(
            "queue: peak {peak_ready} ready, bound {bound} (overflow block, inbox {INBOX}); \
             {} published, {} acknowledged",
            final_stats.published, final_stats.acknowledged
        ))
        .line(format!(
            "pool {min}-{max}, {} ms a message: {} workers at start, peak {peak} at {}, \
             {final_workers} at the end ({} steps up, {} down)",
            work.as_millis(),
            trajectory.first().map_or(0, |&(_, w)| w),
            secs(peak_at),
            pool_stats.scaled_up,
            pool_stats.scaled_down
        ))
        .line(format!(
            "alerts: {fired} fired, {cleared} cleared ({}); ran {}",
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            },
            secs(elapsed)
        ));
    for row in table {
        summary.line(row);
    }
    summary
        .check(
            format!(
                "every message consumed exactly once ({once} of {messages} once, {twice} more than once, \
                 {strays} strays; queue: {} published, {} acked)",
                final_stats.published, final_stats.acknowledged
            ),
            drained
                && once == messages
                && twice == 0
                && strays == 0
                && final_stats.published == messages
                && final_stats.acknowledged == messages,
        )
        .check(
            format!("the queue never held more than its bound (peak {peak_ready} ≤ {bound})"),
            peak_ready <= bound,
        )
        .check(
            if min < max {
                format!(
                    "the pool grew above {min} under the backlog (peak {peak}) and shrank back \
                     ({final_workers} at the end)"
                )
            } else {
                format!("the fixed pool kept its {min} workers (peak {peak}, {final_workers} at the end)")
            },
            if min < max {
                peak > min && shrunk && final_workers == min
            } else {
                peak == min && final_workers == min
            },
        )
        .check(
            format!("every alert that fired also cleared ({fired} fired, {cleared} cleared)"),
            fired > 0 && balanced && settled,
        )
        .check(
            format!(
                "the producer kept to its limit ({messages} ≤ {rate}/s × {} × 1.1 + burst {burst} = {allowed:.0})",
                secs(produced_in)
            ),
            messages as f64 <= allowed,
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
