//! Measurement helpers shared by every scenario: completion signals, timing
//! loops, percentiles, resident memory.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The size of every message payload unless a scenario says otherwise.
pub const PAYLOAD: usize = 64;

/// A 64-byte payload. Cloning it only bumps a reference count, for every system.
pub fn payload() -> bytes::Bytes {
    bytes::Bytes::from(vec![0x5a; PAYLOAD])
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Leaks a value for the rest of the run, so that consumers on other threads can
/// hold a plain `&'static` (copying it costs nothing, unlike an `Arc` clone).
pub fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

/// "Every message has been consumed": a counter shared by the consumers of one
/// run, which wakes the driver when it reaches the target.
///
/// Every system pays the same for it: one uncontended (or, with competing
/// consumers, lightly contended) atomic add per message.
pub struct Done {
    count: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Done {
    pub fn new() -> Self {
        Done {
            count: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
        }
    }

    /// Starts a round that ends after `target` hits. Call it before producing.
    pub fn arm(&self, target: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
    }

    /// Counts `k` consumed messages.
    pub fn hit(&self, k: u64) {
        let now = self.count.fetch_add(k, Ordering::AcqRel) + k;
        if now == self.target.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    /// Waits until the armed target is reached.
    pub async fn wait(&self) {
        while self.count.load(Ordering::Acquire) < self.target.load(Ordering::Acquire) {
            self.notify.notified().await;
        }
    }
}

/// Completion for fan-out: every subscriber counts what it received itself (no
/// shared counter on the hot path), and reports once when its running total
/// reaches the goal of the current round.
pub struct FanIn {
    /// Cumulative number of messages each subscriber must have seen.
    goal: AtomicU64,
    finished: Done,
}

impl FanIn {
    pub fn new() -> Self {
        FanIn {
            goal: AtomicU64::new(u64::MAX),
            finished: Done::new(),
        }
    }

    /// Starts a round: each of `subscribers` must reach a running total of `goal`.
    pub fn arm(&self, goal: u64, subscribers: u64) {
        self.finished.arm(subscribers);
        self.goal.store(goal, Ordering::SeqCst);
    }

    /// A subscriber's running total is now `seen`.
    pub fn seen(&self, seen: u64) {
        if seen == self.goal.load(Ordering::Relaxed) {
            self.finished.hit(1);
        }
    }

    pub async fn wait(&self) {
        self.finished.wait().await;
    }
}

/// The results of repeated trials.
#[derive(Clone, Copy, Debug)]
pub struct Trials {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Runs `trial` (a complete setup, measurement and teardown) `reps` times.
/// Fresh threads in every trial let the OS place them anew, so that one
/// unlucky placement does not decide a row; the spread shows how much
/// placement matters.
pub async fn trials<F, Fut>(reps: usize, mut trial: F) -> Trials
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    let mut results = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        results.push(trial().await);
    }
    let median = median(&mut results);
    Trials {
        median,
        min: results[0],
        max: results[results.len() - 1],
    }
}

/// A fresh multi-threaded tokio runtime with one worker per core, for the
/// receiving side of a tokio baseline: like a postbox `Runtime`, it gives each
/// trial new threads. Shut it down with `shutdown_background` (it may be
/// dropped inside the driver's async context).
pub fn worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("tokio-baseline")
        .on_thread_start(crate::place::worker_thread)
        .enable_all()
        .build()
        .expect("a tokio runtime for the baseline")
}

/// Runs a warm-up round, then `reps` measured rounds of `n` messages each, and
/// returns the median throughput in messages per second. `round(n)` must
/// produce `n` messages and return once they have all been consumed.
pub async fn throughput<F, Fut>(warmup: u64, n: u64, reps: usize, mut round: F) -> f64
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Duration>,
{
    if warmup > 0 {
        round(warmup).await;
    }
    let mut rates: Vec<f64> = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let elapsed = round(n).await;
        rates.push(n as f64 / elapsed.as_secs_f64());
    }
    median(&mut rates)
}

/// Times one round: `body` produces, then waits for completion.
pub async fn timed(body: impl Future<Output = ()>) -> Duration {
    let start = Instant::now();
    body.await;
    start.elapsed()
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Round-trip samples (ns) and the elapsed time of one measured run.
pub type Samples = (Vec<u64>, Duration);

/// Runs `warmup + n` round trips of `trip`, timing the last `n`.
pub async fn sample<F, Fut>(warmup: usize, n: usize, mut trip: F) -> Samples
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..warmup {
        trip().await;
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        trip().await;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    (samples, start.elapsed())
}

/// Latency samples in nanoseconds.
pub struct Latencies {
    samples: Vec<u64>,
    elapsed: Duration,
}

impl Latencies {
    pub fn new(samples: Vec<u64>, elapsed: Duration) -> Self {
        let mut samples = samples;
        samples.sort_unstable();
        Latencies { samples, elapsed }
    }

    /// The `p`-th percentile in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let i = ((self.samples.len() as f64 * p / 100.0) as usize).min(self.samples.len() - 1);
        self.samples[i] as f64 / 1000.0
    }

    /// Round trips per second over the whole measured run.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Resident set size of this process, in bytes (Linux: `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Gives freed heap memory back to the OS, so that a later RSS reading counts
/// live data rather than what the allocator keeps cached (glibc only).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim has no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// RSS after trimming the heap, in bytes.
pub fn live_rss() -> u64 {
    trim_heap();
    rss_bytes()
}

/// Lets the calling thread run on every core again (undoes
/// [`pin_current_thread`]; threads and child processes inherit affinity).
pub fn unpin_current_thread() {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn sched_setaffinity(pid: i32, cpusetsize: usize, mask: *const u64) -> i32;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut mask = [0u64; 16];
        for cpu in 0..cores.min(1024) {
            mask[cpu / 64] |= 1 << (cpu % 64);
        }
        // SAFETY: `mask` is a valid cpu_set_t of the size passed; pid 0 is this thread.
        unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) };
    }
}

/// Pins the calling thread to one CPU (Linux; elsewhere, or if the CPU does
/// not exist, it does nothing). Used where a result depends on whether two
/// threads share a core: "across arbiters" means across cores.
pub fn pin_current_thread(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        unsafe extern "C" {
            fn sched_setaffinity(pid: i32, cpusetsize: usize, mask: *const u64) -> i32;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpu >= cores || cpu >= 1024 {
            return;
        }
        // A cpu_set_t: 1024 bits.
        let mut mask = [0u64; 16];
        mask[cpu / 64] = 1 << (cpu % 64);
        // SAFETY: `mask` is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) };
        if rc != 0 {
            eprintln!(
                "sched_setaffinity({cpu}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}
