//! The broker-wide memory budget (RabbitMQ's memory high watermark and its
//! flow control): the bytes of the messages queues hold in memory, summed
//! over every queue, against a limit.
//!
//! Each queue charges the budget with what it holds (the sizes of its ready
//! messages in memory and of the publishes waiting for it) whenever that
//! changes. Past the limit, the queues that cause it, those holding at least
//! [`CAUSE_SHARE`] of the budget, make their publishers wait, as overflow
//! `block` does; a queue holding little keeps flowing (replies, control
//! messages). Past [`HARD_FACTOR`] times the limit, because many small
//! queues add up, every queue makes its publishers wait. Once consumers
//! bring the total back under the limit, the waiting queues are woken and
//! take their publishes in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use postbox::Recipient;
use serde::Serialize;
use tokio::sync::broadcast;

/// A queue holding this share of the budget (or more) is a cause: its
/// publishers wait first.
pub(crate) const CAUSE_SHARE: f64 = 0.125;

/// Past this many times the limit, every queue's publishers wait.
pub(crate) const HARD_FACTOR: f64 = 1.25;

/// The budget crossing its limit, one way or the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEvent {
    /// True when the total passed the limit, false when it came back under.
    pub over: bool,
    /// Bytes held when it crossed.
    pub used: usize,
    /// The limit.
    pub limit: usize,
}

/// Where the budget stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryStats {
    /// Bytes of messages the queues hold in memory.
    pub used: usize,
    /// The limit.
    pub limit: usize,
    /// Whether publishers of the queues causing it wait.
    pub over: bool,
}

/// The queue actor's wake-up: the budget is back under its limit.
pub(crate) struct BudgetFreed;
impl postbox::Message for BudgetFreed {
    type Reply = ();
}

/// One broker's memory budget, shared with its queues.
pub(crate) struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    over: AtomicBool,
    /// Queues whose publishers wait for the budget, to wake when it frees.
    waiting: Mutex<Vec<Recipient<BudgetFreed>>>,
    events: broadcast::Sender<MemoryEvent>,
}

impl MemoryBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(MemoryBudget {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            over: AtomicBool::new(false),
            waiting: Mutex::new(Vec::new()),
            events: broadcast::channel(64).0,
        })
    }

    /// A queue's holding changed from `before` to `after` bytes.
    pub(crate) fn charge(&self, queue: &str, before: usize, after: usize) {
        let used = if after >= before {
            self.used.fetch_add(after - before, Ordering::AcqRel) + (after - before)
        } else {
            self.used.fetch_sub(before - after, Ordering::AcqRel) - (before - after)
        };
        let over = used > self.limit;
        if self.over.swap(over, Ordering::AcqRel) == over {
            return;
        }
        let event = MemoryEvent {
            over,
            used,
            limit: self.limit,
        };
        if over {
            tracing::warn!(
                queue,
                used,
                limit = self.limit,
                "memory budget exceeded: publishers of the queues holding most wait"
            );
        } else {
            tracing::info!(
                used,
                limit = self.limit,
                "memory budget back under its limit: publishers resume"
            );
            for queue in std::mem::take(&mut *self.waiting.lock()) {
                let _ = queue.try_send(BudgetFreed);
            }
        }
        let _ = self.events.send(event);
    }

    /// Whether a queue holding `held` bytes must make its publishers wait.
    pub(crate) fn blocks(&self, held: usize) -> bool {
        if !self.over.load(Ordering::Acquire) {
            return false;
        }
        let used = self.used.load(Ordering::Acquire);
        held as f64 >= self.limit as f64 * CAUSE_SHARE
            || used as f64 >= self.limit as f64 * HARD_FACTOR
    }

    /// Registers a queue to wake once the budget frees.
    pub(crate) fn wait(&self, queue: Recipient<BudgetFreed>) {
        let mut waiting = self.waiting.lock();
        if !self.over.load(Ordering::Acquire) {
            // Freed meanwhile.
            drop(waiting);
            let _ = queue.try_send(BudgetFreed);
            return;
        }
        waiting.push(queue);
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        MemoryStats {
            used: self.used.load(Ordering::Acquire),
            limit: self.limit,
            over: self.over.load(Ordering::Acquire),
        }
    }

    pub(crate) fn events(&self) -> broadcast::Receiver<MemoryEvent> {
        self.events.subscribe()
    }
}

/// The default budget: 40% of the machine's memory (RabbitMQ's default
/// high watermark), or `None` where it cannot be read.
pub(crate) fn default_limit() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    usize::try_from(kb.saturating_mul(1024) / 10 * 4).ok()
}
