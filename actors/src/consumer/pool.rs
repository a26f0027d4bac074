//! [`ConsumerPool`]: a pool of `min..=max` workers on one queue that grows
//! under a backlog and shrinks when workers sit idle (Spring AMQP's
//! `concurrency = "5-10"`).
//!
//! A pool is a [`KeyOrderedConsumer`] whose set of lanes changes: one
//! registration with the queue, and workers added or retired behind it. A
//! scaler task beside the lanes checks the queue and the lanes every
//! [`check_interval`](PoolOptions::check_interval), and takes at most one
//! step per check, with cooldowns ([`PoolOptions`] has the rules and the
//! defaults). A retired worker takes no new key, finishes what it holds, and
//! ends: no delivery moves between workers and the registration never
//! changes, so scaling never reorders, loses or duplicates a delivery.
//!
//! The decision itself ([`Decider`]) is a plain state machine, tested on
//! its own.

use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::consumer::key_ordered::{Core, DEFAULT_ATTEMPTS, DEFAULT_RETRY_DELAY, Load};
use crate::consumer::{ConsumeOptions, Consumer, ConsumerFactory, KeyOrderedConsumer};
use crate::partition::PartitionKey;
use crate::queue::ack::ConsumerId;
use crate::queue::delivery::{Delivery, LinkTarget, Unseen};

/// Why a pool's configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A pool keeps at least one worker: `min` and `max` must be 1 or more.
    #[error("a consumer pool needs at least one worker (min {min}, max {max})")]
    NoWorkers {
        /// The minimum asked for.
        min: usize,
        /// The maximum asked for.
        max: usize,
    },
    /// The minimum is above the maximum.
    #[error("a consumer pool's minimum ({min}) is above its maximum ({max})")]
    MinAboveMax {
        /// The minimum asked for.
        min: usize,
        /// The maximum asked for.
        max: usize,
    },
    /// A concurrency string that is neither `"N"` nor `"MIN-MAX"`.
    #[error("bad consumer pool concurrency {spec:?}: expected \"N\" or \"MIN-MAX\"")]
    BadConcurrency {
        /// The string given.
        spec: String,
    },
}

/// How a [`ConsumerPool`] sizes itself.
///
/// Every [`check_interval`](Self::check_interval) the pool looks at its
/// **waiting** messages: those ready in the queue (and publishes waiting
/// for room in a full `block` queue), plus those delivered to it that wait
/// behind another key's delivery (a free worker could have run
/// them; those behind their own key would wait however many workers there
/// are).
///
/// - **Up**, one worker at a time, up to `max`: when for
///   [`consecutive_active_trigger`](Self::consecutive_active_trigger)
///   checks in a row more than
///   [`backlog_per_worker`](Self::backlog_per_worker) messages per worker
///   were waiting, or the oldest waiting message (by its timestamp) had
///   waited more than [`max_wait`](Self::max_wait); and at least
///   [`start_consumer_min_interval`](Self::start_consumer_min_interval)
///   after the last step up.
/// - **Down**, one worker at a time, down to `min`: when over the last
///   [`consecutive_idle_trigger`](Self::consecutive_idle_trigger) checks
///   the workers were idle (held nothing) for at least one worker's worth
///   of that time, added up: one worker idle throughout, or two half the
///   time, and so on (the pool spreads new keys over its workers, so a
///   light load keeps every worker a little busy rather than one idle);
///   and at least
///   [`stop_consumer_min_interval`](Self::stop_consumer_min_interval) after
///   the last step down. The count of checks starts again after each step
///   and after sustained pressure (a single check that catches a burst is
///   not pressure, but does not step down either). The worker holding the
///   least is retired: it takes no new key, finishes what it holds (its
///   keys in flight keep coming to it, so that their order holds), and
///   ends.
///
/// The defaults follow Spring AMQP's `SimpleMessageListenerContainer`
/// where its settings mean the same here (see each constant). Spring counts
/// its active trigger in messages received back to back, which a backlog
/// satisfies within moments; here it counts checks, hence 3 rather than 10.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{PoolError, PoolOptions};
/// let pool = PoolOptions::new(5, 10)?
///     .backlog_per_worker(20)
///     .stop_consumer_min_interval(Duration::from_secs(30));
/// assert_eq!((pool.min(), pool.max()), (5, 10));
/// // Spring's `concurrency` strings.
/// assert_eq!("5-10".parse::<PoolOptions>()?.max(), 10);
/// assert_eq!("3".parse::<PoolOptions>()?.min(), 3);
/// assert!(matches!(PoolOptions::new(10, 5), Err(PoolError::MinAboveMax { .. })));
/// assert!(matches!(PoolOptions::new(0, 0), Err(PoolError::NoWorkers { .. })));
/// # Ok::<(), PoolError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    min: usize,
    max: usize,
    backlog_per_worker: usize,
    max_wait: Duration,
    check_interval: Duration,
    active_trigger: u32,
    idle_trigger: u32,
    start_interval: Duration,
    stop_interval: Duration,
    prefetch_per_worker: u32,
}

impl PoolOptions {
    /// Default [`check_interval`](Self::check_interval): 1 s, Spring's
    /// `receiveTimeout`, the pace at which its consumers notice they are idle.
    pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
    /// Default [`backlog_per_worker`](Self::backlog_per_worker): 10 waiting
    /// messages per worker.
    pub const DEFAULT_BACKLOG_PER_WORKER: usize = 10;
    /// Default [`max_wait`](Self::max_wait): 5 s.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
    /// Default [`consecutive_active_trigger`](Self::consecutive_active_trigger):
    /// 3 checks (3 s of pressure at the default interval: a burst that
    /// clears within a check or two adds nobody).
    pub const DEFAULT_CONSECUTIVE_ACTIVE_TRIGGER: u32 = 3;
    /// Default [`consecutive_idle_trigger`](Self::consecutive_idle_trigger):
    /// 10 checks, Spring's (10 s idle at the default interval, as Spring's
    /// 10 receive timeouts of 1 s).
    pub const DEFAULT_CONSECUTIVE_IDLE_TRIGGER: u32 = 10;
    /// Default [`start_consumer_min_interval`](Self::start_consumer_min_interval):
    /// 10 s, Spring's `startConsumerMinInterval`.
    pub const DEFAULT_START_CONSUMER_MIN_INTERVAL: Duration = Duration::from_secs(10);
    /// Default [`stop_consumer_min_interval`](Self::stop_consumer_min_interval):
    /// 60 s, Spring's `stopConsumerMinInterval` (shrinking is slower than
    /// growing: a worker too many costs little, one too few costs latency).
    pub const DEFAULT_STOP_CONSUMER_MIN_INTERVAL: Duration = Duration::from_secs(60);
    /// Default [`prefetch_per_worker`](Self::prefetch_per_worker): 16.
    pub const DEFAULT_PREFETCH_PER_WORKER: u32 = 16;

    /// A pool of `min` to `max` workers, with the default rules. Refused
    /// if either is 0 ([`PoolError::NoWorkers`]) or `min > max`
    /// ([`PoolError::MinAboveMax`]).
    pub fn new(min: usize, max: usize) -> Result<Self, PoolError> {
        if min == 0 || max == 0 {
            return Err(PoolError::NoWorkers { min, max });
        }
        if min > max {
            return Err(PoolError::MinAboveMax { min, max });
        }
        Ok(PoolOptions {
            min,
            max,
            backlog_per_worker: Self::DEFAULT_BACKLOG_PER_WORKER,
            max_wait: Self::DEFAULT_MAX_WAIT,
            check_interval: Self::DEFAULT_CHECK_INTERVAL,
            active_trigger: Self::DEFAULT_CONSECUTIVE_ACTIVE_TRIGGER,
            idle_trigger: Self::DEFAULT_CONSECUTIVE_IDLE_TRIGGER,
            start_interval: Self::DEFAULT_START_CONSUMER_MIN_INTERVAL,
            stop_interval: Self::DEFAULT_STOP_CONSUMER_MIN_INTERVAL,
            prefetch_per_worker: Self::DEFAULT_PREFETCH_PER_WORKER,
        })
    }

    /// The fewest workers.
    pub fn min(&self) -> usize {
        self.min
    }

    /// The most workers.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How long the pool must have had a worker's worth of idleness before
    /// it retires one:
    /// [`consecutive_idle_trigger`](Self::consecutive_idle_trigger) ×
    /// [`check_interval`](Self::check_interval).
    pub fn idle_time(&self) -> Duration {
        self.check_interval.saturating_mul(self.idle_trigger)
    }

    /// Waiting messages per worker above which the pool is under pressure
    /// (0: any waiting message).
    pub fn backlog_per_worker(mut self, messages: usize) -> Self {
        self.backlog_per_worker = messages;
        self
    }

    /// How long the oldest waiting message may have waited (since its
    /// timestamp) before the pool is under pressure. `Duration::MAX` turns
    /// this trigger off.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// How often the pool checks its load (at least 1 ms).
    pub fn check_interval(mut self, every: Duration) -> Self {
        self.check_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Checks in a row under pressure before a worker is added (at least 1).
    #[doc(alias = "consecutiveActiveTrigger")]
    pub fn consecutive_active_trigger(mut self, checks: u32) -> Self {
        self.active_trigger = checks.max(1);
        self
    }

    /// Checks in a row with a worker's worth of idleness before a worker is
    /// retired (at least 1).
    #[doc(alias = "consecutiveIdleTrigger")]
    pub fn consecutive_idle_trigger(mut self, checks: u32) -> Self {
        self.idle_trigger = checks.max(1);
        self
    }

    /// The least time between two steps up.
    #[doc(alias = "startConsumerMinInterval")]
    pub fn start_consumer_min_interval(mut self, interval: Duration) -> Self {
        self.start_interval = interval;
        self
    }

    /// The least time between two steps down.
    #[doc(alias = "stopConsumerMinInterval")]
    pub fn stop_consumer_min_interval(mut self, interval: Duration) -> Self {
        self.stop_interval = interval;
        self
    }

    /// The registration's prefetch per worker that
    /// [`consume_options`](Self::consume_options) gives (0: no limit).
    pub fn prefetch_per_worker(mut self, prefetch: u32) -> Self {
        self.prefetch_per_worker = prefetch;
        self
    }

    /// Manual acknowledgements with a prefetch that covers the most
    /// workers: `max` × [`prefetch_per_worker`](Self::prefetch_per_worker).
    ///
    /// A pool is one registration, whose prefetch is fixed when it
    /// registers, and a worker without deliveries is no use: so the
    /// prefetch is sized for `max` workers from the start. Below `max`, the
    /// extra deliveries wait in the workers' queues, where they count as
    /// waiting. A pool registered with a prefetch below `max` can use no
    /// more workers than its prefetch (it says so with a `warn!` event).
    pub fn consume_options(&self) -> ConsumeOptions {
        let max = u32::try_from(self.max).unwrap_or(u32::MAX);
        ConsumeOptions::manual(max.saturating_mul(self.prefetch_per_worker))
    }
}

impl FromStr for PoolOptions {
    type Err = PoolError;

    /// Spring's `concurrency`: `"N"` (a fixed pool of N) or `"MIN-MAX"`.
    fn from_str(spec: &str) -> Result<Self, PoolError> {
        let bad = || PoolError::BadConcurrency {
            spec: spec.to_string(),
        };
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
        match spec.split_once('-') {
            Some((min, max)) => PoolOptions::new(number(min)?, number(max)?),
            None => {
                let n = number(spec)?;
                PoolOptions::new(n, n)
            }
        }
    }
}

/// A pool's size and what it did, as of its last check (the worker counts
/// change at once with each step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Workers taking new keys.
    pub workers: usize,
    /// Retired workers still finishing what they hold.
    pub retiring: usize,
    /// The configured minimum.
    pub min: usize,
    /// The configured maximum.
    pub max: usize,
    /// The most workers the pool has had.
    pub peak: usize,
    /// Steps up taken.
    pub scaled_up: u64,
    /// Steps down taken.
    pub scaled_down: u64,
    /// Messages waiting at the last check: ready in the queue, and
    /// delivered but behind another key.
    pub waiting: usize,
    /// How long the oldest waiting message had waited, at the last check.
    pub oldest_wait: Option<Duration>,
}

/// What a pool's incarnations share with its [`PoolWatch`]es.
#[derive(Debug)]
struct PoolShared {
    stats: watch::Sender<PoolStats>,
}

/// Reads a pool's size and steps, from any thread: see
/// [`ConsumerPool::watch`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PoolWatch {
    shared: Arc<PoolShared>,
}

impl PoolWatch {
    /// The pool's size and steps.
    pub fn stats(&self) -> PoolStats {
        *self.shared.stats.borrow()
    }

    /// How many workers take new keys now.
    pub fn workers(&self) -> usize {
        self.shared.stats.borrow().workers
    }

    /// A receiver that sees every update (each step and each check), for
    /// code that waits for a size: `rx.wait_for(|s| s.workers == 10)`
    /// (bound the wait with a timeout).
    pub fn subscribe(&self) -> watch::Receiver<PoolStats> {
        self.shared.stats.subscribe()
    }
}

/// A consumer factory for a pool of `min..=max` workers on one queue:
/// give it to [`Broker::consume`](crate::Broker::consume) with
/// [`consume_options`](Self::consume_options). Each worker is a consumer
/// built by `factory`, handling one delivery at a time; the handler acks.
///
/// Without a [key](Self::key) every message is its own key (its message
/// id), so messages run in parallel on whichever worker is free. With one,
/// deliveries that share a key run one after another, in order, as with
/// [`KeyOrdered`](crate::KeyOrdered), whatever the pool's size does.
/// A handler's `Err` or panic is retried in place, and the delivery
/// rejected once its [attempts](Self::attempts) are spent. (A handler that
/// nacks with requeue sends the message back to the queue, where the later
/// deliveries of its key overtake it: to keep order, return `Err` and let
/// the pool retry in place.)
///
/// If the consumer crashes (and is rebuilt), the pool starts again from
/// `min` workers; its [`PoolWatch`] carries on.
///
/// ```
/// use postbox_actors::{Broker, ConsumerPool, Delivery, Envelope, PoolOptions, QueueOptions};
/// use postbox_actors::partition::PartitionKey;
/// # postbox::testkit::run(async {
/// # let broker = Broker::new(&postbox::RuntimeHandle::local());
/// let queue = broker.declare_queue("orders", QueueOptions::default()).await?;
/// let handler = || |d: Delivery| async move {
///     let _order: String = d.decode()?;
///     d.ack().await?;
///     Ok::<(), postbox::Failure>(())
/// };
/// // @RabbitListener(concurrency = "5-10"), each user's orders in order.
/// let pool = ConsumerPool::new("5-10".parse::<PoolOptions>()?, handler)
///     .key(PartitionKey::Header("user".into()));
/// let watch = pool.watch();
/// let options = pool.consume_options();
/// let _consumer = broker.consume("orders", options, pool).await?;
/// assert_eq!(watch.workers(), 5);
/// queue.publish(Envelope::encode(&"order-1")?.with_header("user", "u7")).await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct ConsumerPool<F> {
    options: PoolOptions,
    key: Option<PartitionKey>,
    factory: Arc<F>,
    attempts: u32,
    retry_delay: Duration,
    shared: Arc<PoolShared>,
}

impl<F> ConsumerPool<F> {
    /// A pool sized by `options`, of consumers built by `factory`; every
    /// message its own key, and a failed delivery tried 3 times, 100 ms
    /// apart.
    pub fn new(options: PoolOptions, factory: F) -> Self {
        let (stats, _) = watch::channel(PoolStats {
            workers: options.min,
            min: options.min,
            max: options.max,
            peak: options.min,
            ..PoolStats::default()
        });
        ConsumerPool {
            options,
            key: None,
            factory: Arc::new(factory),
            attempts: DEFAULT_ATTEMPTS,
            retry_delay: DEFAULT_RETRY_DELAY,
            shared: Arc::new(PoolShared { stats }),
        }
    }

    /// Deliveries that share this key are handled one after another, in
    /// order (a message without the key is a key of its own).
    pub fn key(mut self, key: PartitionKey) -> Self {
        self.key = Some(key);
        self
    }

    /// How many times a delivery is tried (at least 1), and how long apart,
    /// before it is rejected.
    pub fn attempts(mut self, attempts: u32, delay: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.retry_delay = delay;
        self
    }

    /// Its sizing rules.
    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    /// The options to consume with: see [`PoolOptions::consume_options`].
    pub fn consume_options(&self) -> ConsumeOptions {
        self.options.consume_options()
    }

    /// A reader of the pool's size and steps; it outlives the consumer's
    /// restarts.
    pub fn watch(&self) -> PoolWatch {
        PoolWatch {
            shared: self.shared.clone(),
        }
    }
}

impl<C, F> ConsumerFactory<KeyOrderedConsumer<C>> for ConsumerPool<F>
where
    C: Consumer,
    F: ConsumerFactory<C>,
{
    fn build(&self) -> KeyOrderedConsumer<C> {
        let min = self.options.min;
        self.shared.stats.send_modify(|s| {
            s.workers = min;
            s.retiring = 0;
        });
        let factory = self.factory.clone();
        KeyOrderedConsumer::new(
            min,
            self.key.clone(),
            move || factory.build(),
            (self.attempts, self.retry_delay),
            Some(Scaler {
                options: self.options.clone(),
                shared: self.shared.clone(),
                task: None,
                started: false,
            }),
        )
    }
}

/// The task that sizes one incarnation of a pool; it starts with the
/// first delivery (which tells it its queue and registration) and stops
/// with the consumer.
pub(super) struct Scaler {
    options: PoolOptions,
    shared: Arc<PoolShared>,
    task: Option<tokio::task::JoinHandle<()>>,
    started: bool,
}

impl Scaler {
    /// Starts the scaler on the consumer's thread, once.
    pub(super) fn start<C: Consumer>(&mut self, core: &Rc<Core<C>>, delivery: &Delivery) {
        if self.started {
            return;
        }
        self.started = true;
        let settler = delivery.settler();
        let watched = Watched {
            queue: settler.link.queue.clone(),
            name: settler.link.queue_name.clone(),
            me: delivery.consumer(),
        };
        self.task = Some(tokio::task::spawn_local(scale(
            Rc::downgrade(core),
            watched,
            self.options.clone(),
            self.shared.clone(),
        )));
    }

    /// Stops the scaler (the consumer stops).
    pub(super) fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The queue a scaler watches (embedded, or on RabbitMQ), and the pool's
/// registration with it.
struct Watched {
    queue: LinkTarget,
    name: ByteString,
    me: ConsumerId,
}

/// The least time a check waits for the queue's snapshot.
const SNAPSHOT_PATIENCE: Duration = Duration::from_secs(1);

/// Checks the load every interval and steps the lanes up or down. Ends when
/// the queue is gone or the consumer stopped.
async fn scale<C: Consumer>(
    core: Weak<Core<C>>,
    watched: Watched,
    options: PoolOptions,
    shared: Arc<PoolShared>,
) {
    let mut decider = Decider::default();
    let mut warned = false;
    let patience = options.check_interval.max(SNAPSHOT_PATIENCE);
    // Idle time counts from here.
    if let Some(core) = core.upgrade() {
        core.idle_since_last();
    }
    let mut last_check = Instant::now();
    loop {
        tokio::time::sleep(options.check_interval).await;
        let snapshot = match watched.queue.snapshot(&watched.name, patience).await {
            Ok(snapshot) => snapshot,
            // The queue is gone: nothing left to size for.
            Err(Unseen::Gone) => return,
            // A busy (or failing) queue, a connection being restored: look
            // again next time.
            Err(Unseen::NotNow(why)) => {
                tracing::debug!(queue = %watched.name, %why, "consumer pool: no snapshot this check");
                continue;
            }
        };
        let Some(core) = core.upgrade() else { return };
        if !warned
            && let Some(me) = snapshot.consumers.iter().find(|c| c.id == watched.me)
            && me.prefetch != 0
            && (me.prefetch as usize) < options.max
        {
            warned = true;
            tracing::warn!(
                queue = %watched.name,
                prefetch = me.prefetch,
                max = options.max,
                "consumer pool: a prefetch below its maximum leaves workers without deliveries (see PoolOptions::consume_options)"
            );
        }
        let load = core.load();
        let now_ms = postbox::clock::now_ms();
        let age = |ts: u64| Duration::from_millis(now_ms.saturating_sub(ts));
        let head = snapshot
            .stats
            .head_timestamp_ms
            .filter(|_| snapshot.stats.ready > 0)
            .map(age);
        let held = load.oldest_ms.map(age);
        let now = Instant::now();
        let seen = Seen {
            workers: load.active,
            // Publishes waiting for room in a full (blocking) queue are a
            // backlog too: without them a bounded queue would cap the pool.
            waiting: snapshot.stats.ready + snapshot.waiting_publishes + load.waiting,
            oldest_wait: head.max(held),
            idle: core.idle_since_last(),
            span: now.saturating_duration_since(last_check),
            quietest: load.quietest,
        };
        last_check = now;
        let step = decider.decide(&options, &seen, now);
        match step {
            Some(Step::Up(reason)) => {
                core.grow();
                tracing::info!(
                    queue = %watched.name,
                    from = seen.workers,
                    to = seen.workers + 1,
                    waiting = seen.waiting,
                    oldest_wait_ms = seen.oldest_wait.map(|d| d.as_millis() as u64),
                    reason = reason.as_str(),
                    "consumer pool scaled up"
                );
            }
            Some(Step::Down(slot)) => {
                core.retire(slot);
                tracing::info!(
                    queue = %watched.name,
                    from = seen.workers,
                    to = seen.workers - 1,
                    waiting = seen.waiting,
                    "consumer pool scaled down: a worker's worth of idleness"
                );
            }
            None => {}
        }
        let after: Load = core.load();
        shared.stats.send_modify(|s| {
            s.workers = after.active;
            s.retiring = after.retiring;
            s.peak = s.peak.max(after.active);
            s.waiting = seen.waiting;
            s.oldest_wait = seen.oldest_wait;
            match step {
                Some(Step::Up(_)) => s.scaled_up += 1,
                Some(Step::Down(_)) => s.scaled_down += 1,
                None => {}
            }
        });
    }
}

/// What one check saw.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Workers taking new keys.
    workers: usize,
    /// Messages waiting (ready, or delivered behind another key).
    waiting: usize,
    /// How long the oldest of them has waited.
    oldest_wait: Option<Duration>,
    /// The time workers held nothing since the last check, added up.
    idle: Duration,
    /// The time since the last check.
    span: Duration,
    /// The worker to retire first (the one holding the least).
    quietest: Option<usize>,
}

/// A scaling step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Add a worker.
    Up(Pressure),
    /// Retire the worker in this slot.
    Down(usize),
}

/// Why the pool is under pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pressure {
    /// More waiting messages per worker than allowed.
    Backlog,
    /// The oldest waiting message waited too long.
    Age,
}

impl Pressure {
    fn as_str(self) -> &'static str {
        match self {
            Pressure::Backlog => "backlog",
            Pressure::Age => "oldest message waited too long",
        }
    }
}

/// Decides, check by check, whether to step: the pool's rules with no
/// actor or clock in them.
#[derive(Debug, Default)]
struct Decider {
    /// Checks in a row under pressure.
    pressed: u32,
    /// The last checks since sustained pressure or a step: (idle, span)
    /// of each, at most `consecutive_idle_trigger` of them.
    recent: VecDeque<(Duration, Duration)>,
    last_up: Option<Instant>,
    last_down: Option<Instant>,
}

impl Decider {
    fn decide(&mut self, options: &PoolOptions, seen: &Seen, now: Instant) -> Option<Step> {
        let cooled = |last: Option<Instant>, gap: Duration| {
            last.is_none_or(|t| now.duration_since(t) >= gap)
        };
        self.recent.push_back((seen.idle, seen.span));
        while self.recent.len() > options.idle_trigger as usize {
            self.recent.pop_front();
        }
        let backlog = seen.waiting > options.backlog_per_worker.saturating_mul(seen.workers);
        let stale = seen.oldest_wait.is_some_and(|w| w > options.max_wait);
        if backlog || stale {
            self.pressed = self.pressed.saturating_add(1);
            if self.pressed < options.active_trigger {
                // A burst caught by one check: neither a reason to grow
                // nor proof that the workers are needed.
                return None;
            }
            // Sustained pressure: idleness seen so far does not count.
            self.recent.clear();
            if seen.workers < options.max && cooled(self.last_up, options.start_interval) {
                self.pressed = 0;
                self.last_up = Some(now);
                let why = if backlog {
                    Pressure::Backlog
                } else {
                    Pressure::Age
                };
                return Some(Step::Up(why));
            }
            return None;
        }
        self.pressed = 0;
        let (idle, span) = self
            .recent
            .iter()
            .fold((Duration::ZERO, Duration::ZERO), |(i, s), &(idle, span)| {
                (i + idle, s + span)
            });
        // A worker's worth of idleness over the whole window.
        let spare = self.recent.len() == options.idle_trigger as usize && idle >= span;
        if seen.workers > options.min && spare && cooled(self.last_down, options.stop_interval) {
            let slot = seen.quietest?;
            self.recent.clear();
            self.last_down = Some(now);
            return Some(Step::Down(slot));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// A check a second after the last, with `idle` seconds of idleness.
    fn seen(workers: usize, waiting: usize, idle: f64) -> Seen {
        Seen {
            workers,
            waiting,
            oldest_wait: None,
            idle: Duration::from_secs_f64(idle),
            span: S,
            quietest: Some(7),
        }
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        assert_eq!(
            PoolOptions::new(6, 5),
            Err(PoolError::MinAboveMax { min: 6, max: 5 })
        );
        assert_eq!(
            PoolOptions::new(1, 0),
            Err(PoolError::NoWorkers { min: 1, max: 0 })
        );
        assert_eq!(
            PoolOptions::new(0, 3),
            Err(PoolError::NoWorkers { min: 0, max: 3 })
        );
        for spec in ["", "a-b", "5-", "-5", "5-10-15", "x"] {
            assert_eq!(
                spec.parse::<PoolOptions>(),
                Err(PoolError::BadConcurrency { spec: spec.into() }),
                "{spec:?}"
            );
        }
        assert_eq!(
            "10-5".parse::<PoolOptions>(),
            Err(PoolError::MinAboveMax { min: 10, max: 5 })
        );
        let pool: PoolOptions = " 5 - 10 ".parse().unwrap();
        assert_eq!((pool.min(), pool.max()), (5, 10));
        assert_eq!(pool, PoolOptions::new(5, 10).unwrap());
        assert_eq!(pool.idle_time(), 10 * S);
        assert_eq!(pool.consume_options().prefetch, 160);
    }

    #[tokio::test(start_paused = true)]
    async fn steps_up_after_sustained_pressure_one_cooldown_apart_up_to_max() {
        let options = PoolOptions::new(2, 4).unwrap();
        let mut d = Decider::default();
        let t0 = Instant::now();
        // 21 waiting for 2 workers: pressure; the third check steps.
        assert_eq!(d.decide(&options, &seen(2, 21, 0.0), t0), None);
        assert_eq!(d.decide(&options, &seen(2, 21, 0.0), t0 + S), None);
        assert_eq!(
            d.decide(&options, &seen(2, 21, 0.0), t0 + 2 * S),
            Some(Step::Up(Pressure::Backlog))
        );
        // Pressure again, but within the start interval: no step.
        for i in 3..12 {
            assert_eq!(d.decide(&options, &seen(3, 100, 0.0), t0 + i * S), None);
        }
        assert_eq!(
            d.decide(&options, &seen(3, 100, 0.0), t0 + 12 * S),
            Some(Step::Up(Pressure::Backlog))
        );
        // At the maximum: never more.
        for i in 13..60 {
            assert_eq!(d.decide(&options, &seen(4, 1000, 0.0), t0 + i * S), None);
        }
        // A break in the pressure starts the count again.
        let mut d = Decider::default();
        assert_eq!(d.decide(&options, &seen(2, 21, 0.0), t0), None);
        assert_eq!(d.decide(&options, &seen(2, 21, 0.0), t0 + S), None);
        assert_eq!(d.decide(&options, &seen(2, 20, 0.0), t0 + 2 * S), None);
        assert_eq!(d.decide(&options, &seen(2, 21, 0.0), t0 + 3 * S), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_age_of_the_oldest_waiting_message_is_pressure_too() {
        let options = PoolOptions::new(1, 2)
            .unwrap()
            .consecutive_active_trigger(1);
        let mut d = Decider::default();
        let t0 = Instant::now();
        let mut old = seen(1, 1, 0.0);
        old.oldest_wait = Some(5 * S);
        assert_eq!(d.decide(&options, &old, t0), None, "5 s is not above 5 s");
        old.oldest_wait = Some(6 * S);
        assert_eq!(d.decide(&options, &old, t0), Some(Step::Up(Pressure::Age)));
        let off = options.max_wait(Duration::MAX);
        let mut d = Decider::default();
        assert_eq!(d.decide(&off, &old, t0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn steps_down_after_a_workers_worth_of_idleness_one_cooldown_apart_down_to_min() {
        let options = PoolOptions::new(2, 4).unwrap();
        let mut d = Decider::default();
        let t0 = Instant::now();
        // Four workers a quarter idle each: one worker's worth, but only
        // for 9 checks of the 10.
        for i in 1..10 {
            assert_eq!(d.decide(&options, &seen(4, 0, 1.0), t0 + i * S), None);
        }
        assert_eq!(
            d.decide(&options, &seen(4, 0, 1.0), t0 + 10 * S),
            Some(Step::Down(7))
        );
        // Idle enough again, but within the stop interval: not yet.
        for i in 11..70 {
            assert_eq!(d.decide(&options, &seen(3, 0, 2.0), t0 + i * S), None);
        }
        assert_eq!(
            d.decide(&options, &seen(3, 0, 2.0), t0 + 70 * S),
            Some(Step::Down(7))
        );
        // At the minimum: never fewer.
        for i in 71..200 {
            assert_eq!(d.decide(&options, &seen(2, 0, 2.0), t0 + i * S), None);
        }
        // Less than a worker's worth of idleness: no step.
        let mut d = Decider::default();
        for i in 1..100 {
            assert_eq!(d.decide(&options, &seen(4, 0, 0.9), t0 + i * S), None);
        }
        // A check that catches a burst neither steps down nor starts the
        // window again: the next calm check steps.
        let mut d = Decider::default();
        for i in 1..10 {
            assert_eq!(d.decide(&options, &seen(4, 0, 4.0), t0 + i * S), None);
        }
        assert_eq!(d.decide(&options, &seen(4, 100, 4.0), t0 + 10 * S), None);
        assert_eq!(
            d.decide(&options, &seen(4, 0, 4.0), t0 + 11 * S),
            Some(Step::Down(7))
        );
        // Sustained pressure (3 checks; at the maximum, so no step up: a
        // hot key's backlog, say, while other workers idle) starts the
        // window again.
        let mut d = Decider::default();
        let max = PoolOptions::new(2, 4).unwrap();
        for i in 1..10 {
            assert_eq!(d.decide(&max, &seen(4, 0, 4.0), t0 + i * S), None);
        }
        for i in 10..13 {
            assert_eq!(d.decide(&max, &seen(4, 100, 4.0), t0 + i * S), None);
        }
        for i in 13..22 {
            assert_eq!(d.decide(&max, &seen(4, 0, 4.0), t0 + i * S), None);
        }
        assert_eq!(
            d.decide(&max, &seen(4, 0, 4.0), t0 + 22 * S),
            Some(Step::Down(7))
        );
    }
}
