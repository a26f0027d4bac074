//! [`KeyOrdered`]: one consumer registration handled by N workers, where
//! deliveries that share a key are handled one after another, in order, and
//! different keys in parallel.
//!
//! Each key in flight belongs to one worker (a lane), whose deliveries are
//! handled in the order they arrived; a delivery whose key is not in flight
//! goes to the least busy worker. The consumer's prefetch bounds what waits
//! (behind a busy key or a busy worker): memory is bounded by configuration.
//!
//! The set of lanes can change while deliveries flow (a [pool](super::pool)
//! grows and shrinks it): a new lane takes keys that are not in flight; a
//! retired lane takes no new key, finishes what it holds (its keys in flight
//! keep coming to it, so that their order holds) and then ends. No delivery
//! moves between lanes and the registration never changes, so scaling cannot
//! reorder, lose or duplicate anything.
//!
//! A handler's `Err` (or panic) is retried in place, so that the key's later
//! deliveries do not overtake it, and the delivery is rejected (dead-lettered)
//! once its attempts are spent. The whole consumer crashing (its own panic)
//! requeues everything it held, in order, and its workers stop with it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use futures::FutureExt;
use postbox::Failure;
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use crate::consumer::pool::Scaler;
use crate::consumer::{Consumer, ConsumerFactory};
use crate::partition::PartitionKey;
use crate::queue::delivery::{AckError, Delivery, Outcome};

/// A key-ordered consumer factory: `workers` consumers built by `factory`,
/// fed by key. Give it to [`Broker::consume`](crate::Broker::consume) with
/// manual acknowledgements; the handler acks (or the delivery is rejected
/// after its attempts). For a number of workers that follows the load, see
/// [`ConsumerPool`](crate::ConsumerPool).
///
/// ```
/// use postbox_actors::{ConsumeOptions, Delivery, KeyOrdered};
/// use postbox_actors::partition::PartitionKey;
/// let handler = || |d: Delivery| async move {
///     d.ack().await?;
///     Ok::<(), postbox::Failure>(())
/// };
/// // 8 users' events handled at once, each user's in order.
/// let factory = KeyOrdered::new(8, PartitionKey::Header("user".into()), handler);
/// let options = ConsumeOptions::manual(256);
/// # let _ = (factory, options);
/// ```
#[derive(Clone, Debug)]
pub struct KeyOrdered<F> {
    workers: usize,
    key: PartitionKey,
    factory: F,
    attempts: u32,
    retry_delay: Duration,
}

impl<F> KeyOrdered<F> {
    /// `workers` workers (at least 1), keyed by `key`; a failed delivery is
    /// tried 3 times, 100 ms apart.
    pub fn new(workers: usize, key: PartitionKey, factory: F) -> Self {
        KeyOrdered {
            workers: workers.max(1),
            key,
            factory,
            attempts: DEFAULT_ATTEMPTS,
            retry_delay: DEFAULT_RETRY_DELAY,
        }
    }

    /// How many times a delivery is tried (at least 1), and how long apart,
    /// before it is rejected.
    pub fn attempts(mut self, attempts: u32, delay: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.retry_delay = delay;
        self
    }
}

/// Tries of a delivery before it is rejected, unless configured.
pub(super) const DEFAULT_ATTEMPTS: u32 = 3;
/// Wait between two tries of a delivery, unless configured.
pub(super) const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(100);

impl<C, F> ConsumerFactory<KeyOrderedConsumer<C>> for KeyOrdered<F>
where
    C: Consumer,
    F: ConsumerFactory<C> + Clone,
{
    fn build(&self) -> KeyOrderedConsumer<C> {
        KeyOrderedConsumer::new(
            self.workers,
            Some(self.key.clone()),
            self.factory.clone(),
            (self.attempts, self.retry_delay),
            None,
        )
    }
}

/// A worker's waiting deliveries, with their keys' hashes.
type Waiting = Rc<RefCell<VecDeque<(u64, Delivery)>>>;

/// What a lane's task and the router both see of it.
struct LaneState {
    /// The key whose delivery is in the handler.
    handling: Cell<Option<u64>>,
    /// Takes no new key; ends once it has handled what it holds.
    retiring: Cell<bool>,
    /// Since when it has held nothing (`None` while it holds something).
    idle_since: Cell<Option<Instant>>,
    /// Time it held nothing, over its life, up to `idle_since`.
    idle_total: Cell<Duration>,
    /// How much of its idle time the scaler has counted.
    idle_counted: Cell<Duration>,
}

impl LaneState {
    /// It takes a delivery: its idle time, if it was idle, is added up.
    fn busy(&self) {
        if let Some(since) = self.idle_since.take() {
            self.idle_total.set(self.idle_total.get() + since.elapsed());
        }
    }

    /// Its idle time since the last call.
    fn idle_uncounted(&self, now: Instant) -> Duration {
        let ongoing = self
            .idle_since
            .get()
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        let total = self.idle_total.get() + ongoing;
        let new = total.saturating_sub(self.idle_counted.get());
        self.idle_counted.set(total);
        new
    }
}

/// One worker: its consumer, the deliveries waiting for it, its task.
struct Lane<C> {
    consumer: Rc<RefCell<Option<C>>>,
    queue: Waiting,
    wake: Rc<tokio::sync::Notify>,
    state: Rc<LaneState>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<C> Lane<C> {
    /// Deliveries it holds: waiting, and in the handler.
    fn load(&self) -> usize {
        self.queue.borrow().len() + usize::from(self.state.handling.get().is_some())
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The lanes and the keys in flight, shared by the consumer, its lanes'
/// tasks and its scaler (all on the consumer's thread).
pub(super) struct Core<C> {
    /// By slot; a retired lane's slot is empty until a new lane takes it.
    lanes: RefCell<Vec<Option<Lane<C>>>>,
    /// Keys in flight, by hash: their lane's slot and how many of their
    /// deliveries it holds. (Two keys that share a hash share a lane: less
    /// parallelism, the same order.) A lane that holds nothing has no key
    /// here, so an idle lane can end at once.
    keys: RefCell<FxHashMap<u64, (usize, usize)>>,
    /// Builds a new lane's consumer.
    build: Box<dyn Fn() -> C>,
    attempts: u32,
    retry_delay: Duration,
}

/// What the lanes hold, as the scaler sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Load {
    /// Lanes that take new keys.
    pub(super) active: usize,
    /// Lanes finishing what they hold before they end.
    pub(super) retiring: usize,
    /// Deliveries waiting behind another key's delivery: a free lane could
    /// have run them. (Those behind their own key wait however many lanes
    /// there are.)
    pub(super) waiting: usize,
    /// The timestamp (epoch ms) of the oldest of those.
    pub(super) oldest_ms: Option<u64>,
    /// The active lane to retire first: the one holding the least, and of
    /// those the one idle the longest.
    pub(super) quietest: Option<usize>,
}

impl<C: Consumer> Core<C> {
    /// Adds a lane; its task starts with its first delivery.
    fn add_lane(&self) -> usize {
        let lane = Lane {
            consumer: Rc::new(RefCell::new(Some((self.build)()))),
            queue: Rc::new(RefCell::new(VecDeque::new())),
            wake: Rc::new(tokio::sync::Notify::new()),
            state: Rc::new(LaneState {
                handling: Cell::new(None),
                retiring: Cell::new(false),
                idle_since: Cell::new(Some(Instant::now())),
                idle_total: Cell::new(Duration::ZERO),
                idle_counted: Cell::new(Duration::ZERO),
            }),
            task: None,
        };
        let mut lanes = self.lanes.borrow_mut();
        match lanes.iter().position(Option::is_none) {
            Some(slot) => {
                lanes[slot] = Some(lane);
                slot
            }
            None => {
                lanes.push(Some(lane));
                lanes.len() - 1
            }
        }
    }

    /// One more active lane: a retiring one taken back (it still holds
    /// work, and keeps its consumer), or a new one.
    pub(super) fn grow(&self) {
        let revived = self
            .lanes
            .borrow()
            .iter()
            .flatten()
            .find(|lane| lane.state.retiring.get())
            .map(|lane| lane.state.retiring.set(false))
            .is_some();
        if !revived {
            self.add_lane();
        }
    }

    /// Retires the lane in `slot`: it takes no new key. One that holds
    /// nothing ends now; one that holds deliveries ends once it has handled
    /// them (its keys in flight keep coming to it until then).
    pub(super) fn retire(&self, slot: usize) {
        let ended = {
            let mut lanes = self.lanes.borrow_mut();
            let Some(Some(lane)) = lanes.get_mut(slot) else {
                return;
            };
            lane.state.retiring.set(true);
            if lane.load() == 0 {
                // Parked, holding nothing, and no key points at it.
                lane.stop();
                lanes[slot].take()
            } else {
                None
            }
        };
        // Dropped out of the borrow: dropping a consumer runs user code.
        drop(ended);
    }

    /// What the lanes hold, for the scaler.
    pub(super) fn load(&self) -> Load {
        let mut load = Load::default();
        let now = Instant::now();
        let mut quietest = None;
        for (slot, lane) in self.lanes.borrow().iter().enumerate() {
            let Some(lane) = lane else { continue };
            if lane.state.retiring.get() {
                load.retiring += 1;
            } else {
                load.active += 1;
                let rank = (lane.load(), lane.state.idle_since.get().unwrap_or(now));
                if quietest.is_none_or(|(_, best)| rank < best) {
                    quietest = Some((slot, rank));
                }
            }
            let current = lane.state.handling.get();
            for (key, delivery) in lane.queue.borrow().iter() {
                if Some(*key) != current {
                    load.waiting += 1;
                    let ts = delivery.timestamp_ms();
                    load.oldest_ms = Some(load.oldest_ms.map_or(ts, |o| o.min(ts)));
                }
            }
        }
        load.quietest = quietest.map(|(slot, _)| slot);
        load
    }

    /// The time the active lanes held nothing since the last call, added
    /// up (two lanes idle for a second: two seconds).
    pub(super) fn idle_since_last(&self) -> Duration {
        let now = Instant::now();
        let mut idle = Duration::ZERO;
        for lane in self.lanes.borrow().iter().flatten() {
            let new = lane.state.idle_uncounted(now);
            if !lane.state.retiring.get() {
                idle += new;
            }
        }
        idle
    }

    /// The active lane holding the least (the first of equals), or a new
    /// lane if there is no active one (after a cancel).
    fn least_busy(&self) -> usize {
        let best = self
            .lanes
            .borrow()
            .iter()
            .enumerate()
            .filter_map(|(slot, lane)| lane.as_ref().map(|lane| (slot, lane)))
            .filter(|(_, lane)| !lane.state.retiring.get())
            .min_by_key(|(_, lane)| lane.load())
            .map(|(slot, _)| slot);
        best.unwrap_or_else(|| self.add_lane())
    }

    /// The slot of the lane that takes a delivery of `key`: the one that
    /// has the key in flight, or else the least busy.
    fn route(&self, key: u64) -> usize {
        {
            let lanes = self.lanes.borrow();
            let mut keys = self.keys.borrow_mut();
            // A key points at a live lane (a lane ends only once it holds
            // nothing); checked all the same, so that a slip cannot strand
            // a key.
            if let Some(entry) = keys.get_mut(&key)
                && matches!(lanes.get(entry.0), Some(Some(_)))
            {
                entry.1 += 1;
                return entry.0;
            }
        }
        let slot = self.least_busy();
        self.keys.borrow_mut().insert(key, (slot, 1));
        slot
    }

    /// One delivery of `key` was handled: the key leaves flight once its
    /// lane holds none of it.
    fn release(&self, key: u64) {
        let mut keys = self.keys.borrow_mut();
        if let Some(entry) = keys.get_mut(&key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(&key);
            }
        }
    }

    /// Ends the retired lane in `slot` (called by its own task, when it
    /// has handled everything it held).
    fn remove(&self, slot: usize, state: &Rc<LaneState>) {
        let ended = {
            let mut lanes = self.lanes.borrow_mut();
            match lanes.get_mut(slot) {
                Some(lane) if lane.as_ref().is_some_and(|l| Rc::ptr_eq(&l.state, state)) => {
                    lane.take()
                }
                _ => None,
            }
        };
        drop(ended);
    }

    /// Every lane, taken out (the consumer stops).
    fn take_lanes(&self) -> Vec<Lane<C>> {
        self.keys.borrow_mut().clear();
        self.lanes.borrow_mut().drain(..).flatten().collect()
    }
}

/// Starts the task of the lane in `slot`, if it is not running.
fn start<C: Consumer>(core: &Rc<Core<C>>, slot: usize) {
    let mut lanes = core.lanes.borrow_mut();
    let Some(Some(lane)) = lanes.get_mut(slot) else {
        return;
    };
    if lane.task.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    let work = run_lane(
        core.clone(),
        slot,
        lane.consumer.clone(),
        lane.queue.clone(),
        lane.wake.clone(),
        lane.state.clone(),
    );
    lane.task = Some(tokio::task::spawn_local(work));
}

/// A lane's task: handles its deliveries in order; once retired and empty,
/// ends the lane.
async fn run_lane<C: Consumer>(
    core: Rc<Core<C>>,
    slot: usize,
    consumer: Rc<RefCell<Option<C>>>,
    queue: Waiting,
    wake: Rc<tokio::sync::Notify>,
    state: Rc<LaneState>,
) {
    let (attempts, delay) = (core.attempts, core.retry_delay);
    loop {
        let next = queue.borrow_mut().pop_front();
        let Some((key, delivery)) = next else {
            if state.retiring.get() {
                // Holds nothing: no key points here any more.
                tracing::debug!(lane = slot, "key-ordered lane retired");
                core.remove(slot, &state);
                return;
            }
            if state.idle_since.get().is_none() {
                state.idle_since.set(Some(Instant::now()));
            }
            wake.notified().await;
            continue;
        };
        state.handling.set(Some(key));
        handle(&consumer, delivery, attempts, delay).await;
        state.handling.set(None);
        core.release(key);
    }
}

/// The consumer [`KeyOrdered`] and [`ConsumerPool`](crate::ConsumerPool)
/// build.
pub struct KeyOrderedConsumer<C> {
    core: Rc<Core<C>>,
    /// `None`: every message is a key of its own (a plain pool).
    key: Option<PartitionKey>,
    /// Grows and shrinks the lanes (a pool).
    scaler: Option<Scaler>,
}

impl<C> std::fmt::Debug for KeyOrderedConsumer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyOrderedConsumer")
            .field(
                "workers",
                &self.core.lanes.borrow().iter().flatten().count(),
            )
            .field("keys_in_flight", &self.core.keys.borrow().len())
            .field("scaling", &self.scaler.is_some())
            .finish()
    }
}

impl<C: Consumer> KeyOrderedConsumer<C> {
    /// `workers` lanes of consumers built by `factory`, keyed by `key`
    /// (none: each message its own key), trying each delivery
    /// `attempts.0` times `attempts.1` apart, scaled by `scaler` if any.
    pub(super) fn new<F: ConsumerFactory<C>>(
        workers: usize,
        key: Option<PartitionKey>,
        factory: F,
        (attempts, retry_delay): (u32, Duration),
        scaler: Option<Scaler>,
    ) -> Self {
        let core = Rc::new(Core {
            lanes: RefCell::new(Vec::with_capacity(workers)),
            keys: RefCell::new(FxHashMap::default()),
            build: Box::new(move || factory.build()),
            attempts,
            retry_delay,
        });
        for _ in 0..workers.max(1) {
            core.add_lane();
        }
        KeyOrderedConsumer { core, key, scaler }
    }
}

/// Handles one delivery, retrying in place; rejects it once its attempts
/// are spent. A panic counts as a failed attempt.
async fn handle<C: Consumer>(
    consumer: &Rc<RefCell<Option<C>>>,
    delivery: Delivery,
    attempts: u32,
    delay: Duration,
) {
    let settler = delivery.settler();
    let id = delivery.id();
    // Kept for retries (the handler takes the delivery).
    let spare = (attempts > 1).then(|| delivery.retry_copy());
    let mut delivery = Some(delivery);
    for attempt in 1..=attempts {
        // The consumer is taken out for the call: no borrow across the await.
        let Some(mut inner) = consumer.borrow_mut().take() else {
            return;
        };
        // Each attempt gets the delivery (later ones a copy on the same
        // tag: settling any of them settles it).
        let d = match (delivery.take(), &spare) {
            (Some(d), _) => d,
            (None, Some(spare)) => spare.retry_copy(),
            (None, None) => return,
        };
        let result = std::panic::AssertUnwindSafe(inner.handle(d))
            .catch_unwind()
            .await;
        *consumer.borrow_mut() = Some(inner);
        let failure = match result {
            Ok(Ok(())) => return,
            Ok(Err(failure)) => failure,
            Err(panic) => Failure::from_panic(panic),
        };
        if attempt == attempts {
            tracing::warn!(message_id = %id, attempt, %failure, "key-ordered handler failed: rejected");
            match settler.settle(Outcome::Discard, false).await {
                Ok(_) | Err(AckError::AlreadySettled { .. } | AckError::ConsumerGone { .. }) => {}
                Err(err) => tracing::warn!(message_id = %id, %err, "could not reject"),
            }
            return;
        }
        tracing::debug!(message_id = %id, attempt, %failure, "key-ordered handler failed: retrying in place");
        tokio::time::sleep(delay).await;
    }
}

impl<C: Consumer> Consumer for KeyOrderedConsumer<C> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        if let Some(scaler) = &mut self.scaler {
            scaler.start(&self.core, &delivery);
        }
        // No key: a key of its own (the message id), so it runs when a lane is free.
        let key = self
            .key
            .as_ref()
            .and_then(|key| key.hash_of_delivered(&delivery, delivery.queue()))
            .unwrap_or_else(|| {
                let (hi, lo) = delivery.id().0.as_u64_pair();
                hi ^ lo
            });
        let slot = self.core.route(key);
        let was_idle = {
            let lanes = self.core.lanes.borrow();
            let Some(Some(lane)) = lanes.get(slot) else {
                // Unreachable: routing names a live lane. The delivery
                // is settled by the consumer's `OnError` policy.
                self.core.release(key);
                return Err(Failure::msg("key-ordered routing named no lane"));
            };
            lane.state.busy();
            let mut queue = lane.queue.borrow_mut();
            queue.push_back((key, delivery));
            queue.len() == 1
        };
        start(&self.core, slot);
        // A worker with work queued drains it before it waits again: only
        // an idle one needs waking.
        if was_idle && let Some(Some(lane)) = self.core.lanes.borrow().get(slot) {
            lane.wake.notify_one();
        }
        Ok(())
    }

    async fn cancelled(&mut self) {
        if let Some(scaler) = &mut self.scaler {
            scaler.stop();
        }
        for mut lane in self.core.take_lanes() {
            lane.stop();
            let inner = lane.consumer.borrow_mut().take();
            if let Some(mut inner) = inner {
                inner.cancelled().await;
            }
        }
    }
}

impl<C> Drop for KeyOrderedConsumer<C> {
    /// The consumer crashed or stopped: its workers stop with it (what they
    /// held is requeued by the queue, in order).
    fn drop(&mut self) {
        if let Some(scaler) = &mut self.scaler {
            scaler.stop();
        }
        let lanes: Vec<Lane<C>> = std::mem::take(&mut *self.core.lanes.borrow_mut())
            .into_iter()
            .flatten()
            .collect();
        for mut lane in lanes {
            lane.stop();
        }
        self.core.keys.borrow_mut().clear();
    }
}
