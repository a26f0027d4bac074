//! [`KeyOrdered`]: one consumer registration handled by N workers, where
//! deliveries that share a key are handled one after another, in order, and
//! different keys in parallel.
//!
//! Each key in flight belongs to one worker, whose deliveries are handled in
//! the order they arrived; a delivery whose key is not in flight goes to the
//! least busy worker. The consumer's prefetch bounds what waits (behind a
//! busy key or a busy worker): memory is bounded by configuration.
//!
//! A handler's `Err` (or panic) is retried in place, so that the key's later
//! deliveries do not overtake it, and the delivery is rejected (dead-lettered)
//! once its attempts are spent. The whole consumer crashing (its own panic)
//! requeues everything it held, in order, and its workers stop with it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use futures::FutureExt;
use postbox::Failure;
use rustc_hash::FxHashMap;

use crate::consumer::{Consumer, ConsumerFactory};
use crate::partition::PartitionKey;
use crate::queue::delivery::{AckError, Delivery, Outcome};

/// A key-ordered consumer factory: `workers` consumers built by `factory`,
/// fed by key. Give it to [`Broker::consume`](crate::Broker::consume) with
/// manual acknowledgements; the handler acks (or the delivery is rejected
/// after its attempts).
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
            attempts: 3,
            retry_delay: Duration::from_millis(100),
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

impl<C, F> ConsumerFactory<KeyOrderedConsumer<C>> for KeyOrdered<F>
where
    C: Consumer,
    F: ConsumerFactory<C> + Clone,
{
    fn build(&self) -> KeyOrderedConsumer<C> {
        KeyOrderedConsumer {
            lanes: (0..self.workers)
                .map(|_| Lane {
                    consumer: Rc::new(RefCell::new(Some(self.factory.build()))),
                    queue: Rc::new(RefCell::new(VecDeque::new())),
                    wake: Rc::new(tokio::sync::Notify::new()),
                    task: None,
                })
                .collect(),
            keys: Rc::new(RefCell::new(FxHashMap::default())),
            key: self.key.clone(),
            attempts: self.attempts,
            retry_delay: self.retry_delay,
        }
    }
}

/// A worker's waiting deliveries, with their keys' hashes.
type Waiting = Rc<RefCell<VecDeque<(u64, Delivery)>>>;

/// Keys in flight, by hash: their worker and how many of their deliveries
/// it holds. (Two keys that share a hash share a worker: less parallelism,
/// the same order.)
type InFlight = Rc<RefCell<FxHashMap<u64, (usize, usize)>>>;

/// One worker: its consumer, the deliveries waiting for it, its task.
struct Lane<C> {
    consumer: Rc<RefCell<Option<C>>>,
    queue: Waiting,
    wake: Rc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The consumer [`KeyOrdered`] builds.
pub struct KeyOrderedConsumer<C> {
    lanes: Vec<Lane<C>>,
    /// Keys in flight: their lane and how many of their deliveries it holds.
    keys: InFlight,
    key: PartitionKey,
    attempts: u32,
    retry_delay: Duration,
}

impl<C> std::fmt::Debug for KeyOrderedConsumer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyOrderedConsumer")
            .field("workers", &self.lanes.len())
            .field("keys_in_flight", &self.keys.borrow().len())
            .finish()
    }
}

impl<C: Consumer> KeyOrderedConsumer<C> {
    /// Starts lane `i`'s task, if it is not running.
    fn start(&mut self, i: usize) {
        let lane = &mut self.lanes[i];
        if lane.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let (consumer, queue, wake, keys) = (
            lane.consumer.clone(),
            lane.queue.clone(),
            lane.wake.clone(),
            self.keys.clone(),
        );
        let (attempts, delay) = (self.attempts, self.retry_delay);
        lane.task = Some(tokio::task::spawn_local(async move {
            loop {
                let next = queue.borrow_mut().pop_front();
                let Some((key, delivery)) = next else {
                    wake.notified().await;
                    continue;
                };
                handle(&consumer, delivery, attempts, delay).await;
                let mut keys = keys.borrow_mut();
                if let Some(entry) = keys.get_mut(&key) {
                    entry.1 -= 1;
                    if entry.1 == 0 {
                        keys.remove(&key);
                    }
                }
            }
        }));
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
        // No key: a key of its own (the message id), so it runs when a lane is free.
        let key = self
            .key
            .hash_of(&delivery)
            .unwrap_or_else(|| delivery.id().0.as_u64_pair().0 ^ delivery.id().0.as_u64_pair().1);
        let lane = {
            let mut keys = self.keys.borrow_mut();
            let lanes = &self.lanes;
            let entry = keys.entry(key).or_insert_with(|| {
                // The least busy lane takes a key not in flight.
                let lane = (0..lanes.len())
                    .min_by_key(|&i| lanes[i].queue.borrow().len())
                    .unwrap_or(0);
                (lane, 0)
            });
            entry.1 += 1;
            entry.0
        };
        let was_idle = {
            let mut queue = self.lanes[lane].queue.borrow_mut();
            queue.push_back((key, delivery));
            queue.len() == 1
        };
        self.start(lane);
        // A worker with work queued drains it before it waits again: only
        // an idle one needs waking.
        if was_idle {
            self.lanes[lane].wake.notify_one();
        }
        Ok(())
    }

    async fn cancelled(&mut self) {
        for lane in &mut self.lanes {
            if let Some(task) = lane.task.take() {
                task.abort();
            }
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
        for lane in &mut self.lanes {
            if let Some(task) = lane.task.take() {
                task.abort();
            }
        }
    }
}
