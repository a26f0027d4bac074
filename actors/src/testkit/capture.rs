//! [`TestBroker`]: a broker that records its traffic (publishes, deliveries,
//! settlements, dead letters) for assertions.
//!
//! It registers an [`Observer`] with [`Broker::observe`]. Observers are called
//! on the queues' threads, so the record sits behind a mutex, and a
//! [`Notify`] wakes tests that wait for an event. The record is in the order
//! the queues reported the events; within one queue that is the queue's own
//! order.

use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::RuntimeHandle;
use postbox::testkit::{ProbeError, ProbeErrorKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::envelope::DeathReason;
use crate::envelope::{Envelope, MessageId};
use crate::queue::ack::{ConsumerId, DeliveryTag};
use crate::queue::delivery::Outcome;
use crate::queue::observe::{Observer, ObserverGuard};

/// How many events a failure message lists before it abbreviates.
const SHOWN: usize = 20;

/// A message enqueued on a queue.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Published {
    /// The queue.
    pub queue: String,
    /// The message as published: id, routing key, headers, payload.
    pub message: Envelope,
}

/// A message handed to a consumer.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Delivered {
    /// The queue.
    pub queue: String,
    /// The consumer registration it went to.
    pub consumer: ConsumerId,
    /// The delivery tag.
    pub tag: DeliveryTag,
    /// The message, with this delivery's count and redelivered flag.
    pub message: Envelope,
}

/// A consumer settled a delivery (and, if `multiple`, every earlier one it held).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Settled {
    /// The queue.
    pub queue: String,
    /// The consumer registration that settled it.
    pub consumer: ConsumerId,
    /// The delivery tag.
    pub tag: DeliveryTag,
    /// Whether earlier deliveries held by the consumer were settled too.
    pub multiple: bool,
    /// Ack, requeue or discard.
    pub outcome: Outcome,
    /// The id of the message delivered under `tag`, if its delivery was recorded.
    pub message_id: Option<MessageId>,
}

/// A message left a queue for a [`DeathReason`] (rejected, expired, ...).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLettered {
    /// The queue it left.
    pub queue: String,
    /// The message, as it was in the queue.
    pub message: Envelope,
    /// Why it left.
    pub reason: DeathReason,
    /// Whether the queue's dead-letter exchange took it (false: it was dropped).
    pub routed: bool,
}

/// One recorded event.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// See [`Published`].
    Published(Published),
    /// See [`Delivered`].
    Delivered(Delivered),
    /// See [`Settled`].
    Settled(Settled),
    /// See [`DeadLettered`].
    DeadLettered(DeadLettered),
}

impl Event {
    /// The queue the event happened on.
    pub fn queue(&self) -> &str {
        match self {
            Event::Published(p) => &p.queue,
            Event::Delivered(d) => &d.queue,
            Event::Settled(s) => &s.queue,
            Event::DeadLettered(d) => &d.queue,
        }
    }
}

impl fmt::Display for Event {
    /// One line, for failure messages: what happened, where, and to which
    /// message (ids, not payloads).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Published(p) => write!(
                f,
                "published to {:?}: {} ({} bytes, key {:?})",
                p.queue,
                p.message.id(),
                p.message.size(),
                p.message.routing_key()
            ),
            Event::Delivered(d) => write!(
                f,
                "delivered from {:?} to consumer {}, tag {}{}: {}",
                d.queue,
                d.consumer,
                d.tag,
                if d.message.redelivered() {
                    " (redelivered)"
                } else {
                    ""
                },
                d.message.id()
            ),
            Event::Settled(s) => write!(
                f,
                "settled on {:?} by consumer {}, tag {}{}: {:?}",
                s.queue,
                s.consumer,
                s.tag,
                if s.multiple { " and earlier" } else { "" },
                s.outcome
            ),
            Event::DeadLettered(d) => write!(
                f,
                "dead-lettered from {:?} ({}, {}): {}",
                d.queue,
                d.reason,
                if d.routed { "routed" } else { "dropped" },
                d.message.id()
            ),
        }
    }
}

/// A snapshot of recorded events, in order, with queries by queue. Derefs to
/// `[Event]`.
#[derive(Clone, Debug, Default)]
pub struct Events {
    list: Vec<Event>,
}

impl Deref for Events {
    type Target = [Event];
    fn deref(&self) -> &[Event] {
        &self.list
    }
}

impl Events {
    /// The messages published to `queue`, in order.
    pub fn published_to(&self, queue: &str) -> Vec<Envelope> {
        self.list
            .iter()
            .filter_map(|e| match e {
                Event::Published(p) if p.queue == queue => Some(p.message.clone()),
                _ => None,
            })
            .collect()
    }

    /// The deliveries made from `queue`, in order.
    pub fn deliveries(&self, queue: &str) -> Vec<Delivered> {
        self.list
            .iter()
            .filter_map(|e| match e {
                Event::Delivered(d) if d.queue == queue => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// The settlements made on `queue`, in order.
    pub fn settlements(&self, queue: &str) -> Vec<Settled> {
        self.list
            .iter()
            .filter_map(|e| match e {
                Event::Settled(s) if s.queue == queue => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The messages that left `queue` as dead letters, in order.
    pub fn dead_letters(&self, queue: &str) -> Vec<DeadLettered> {
        self.list
            .iter()
            .filter_map(|e| match e {
                Event::DeadLettered(d) if d.queue == queue => Some(d.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Formats the last [`SHOWN`] events, one per line.
fn show(events: &[Event]) -> String {
    if events.is_empty() {
        return "none".to_string();
    }
    let skip = events.len().saturating_sub(SHOWN);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("\n  ... {skip} earlier"));
    }
    for e in &events[skip..] {
        out.push_str(&format!("\n  {e}"));
    }
    out
}

#[derive(Default)]
struct State {
    events: Events,
    /// Per queue: how many publishes `expect_published` has returned.
    taken: HashMap<String, usize>,
    /// The message most recently delivered under each (queue, tag).
    tags: HashMap<(String, u64), MessageId>,
}

#[derive(Default)]
struct Recorder {
    state: Mutex<State>,
    changed: Notify,
}

impl Recorder {
    fn record(&self, event: Event) {
        self.state.lock().events.list.push(event);
        self.changed.notify_waiters();
    }

    /// Waits until `check` returns `Some` or `deadline` passes; `check` runs
    /// under the lock, after each new event.
    async fn wait<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Option<T> {
        loop {
            // Register interest before checking, so an event recorded between
            // the check and the wait still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = check(&mut self.state.lock()) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return check(&mut self.state.lock());
            }
        }
    }
}

impl Observer for Recorder {
    fn published(&self, queue: &str, message: &Envelope) {
        self.record(Event::Published(Published {
            queue: queue.to_string(),
            message: message.clone(),
        }));
    }

    fn delivered(&self, queue: &str, consumer: ConsumerId, tag: DeliveryTag, message: &Envelope) {
        self.state
            .lock()
            .tags
            .insert((queue.to_string(), tag.0), message.id());
        self.record(Event::Delivered(Delivered {
            queue: queue.to_string(),
            consumer,
            tag,
            message: message.clone(),
        }));
    }

    fn dead_lettered(&self, queue: &str, message: &Envelope, reason: DeathReason, routed: bool) {
        self.record(Event::DeadLettered(DeadLettered {
            queue: queue.to_string(),
            message: message.clone(),
            reason,
            routed,
        }));
    }

    fn settled(
        &self,
        queue: &str,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        outcome: Outcome,
    ) {
        let message_id = self
            .state
            .lock()
            .tags
            .get(&(queue.to_string(), tag.0))
            .copied();
        self.record(Event::Settled(Settled {
            queue: queue.to_string(),
            consumer,
            tag,
            multiple,
            outcome,
            message_id,
        }));
    }
}

/// A [`Broker`] whose publishes, deliveries, settlements and dead letters are
/// recorded for assertions. Derefs to the broker, so it is used like one.
///
/// The panicking expectations (`expect_published`, `wait_for`) fail with a
/// message that lists what was recorded instead; their `try_` forms return the
/// same text as a [`ProbeError`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use postbox::RuntimeHandle;
/// use postbox::testkit;
/// use postbox_actors::testkit::TestBroker;
/// use postbox_actors::{ConsumeOptions, Delivery, Outcome, QueueOptions};
///
/// testkit::run(async {
///     let broker = TestBroker::new(&RuntimeHandle::local());
///     broker.declare_queue("orders", QueueOptions::default()).await.unwrap();
///     let _consumer = broker
///         .consume("orders", ConsumeOptions::manual(8), || |d: Delivery| async move {
///             d.ack().await?;
///             Ok(())
///         })
///         .await
///         .unwrap();
///
///     broker.publish_json("orders", &7u32).await.unwrap();
///     let second = Duration::from_secs(1);
///     let order = broker.expect_published("orders", second).await;
///     assert_eq!(order.decode::<u32>().unwrap(), 7);
///
///     broker.wait_for(|e| e.settlements("orders").len() == 1, second).await;
///     let delivered = broker.deliveries("orders");
///     assert_eq!(delivered.len(), 1);
///     assert!(!delivered[0].message.redelivered());
///     let settled = &broker.settlements("orders")[0];
///     assert_eq!((settled.outcome, settled.message_id), (Outcome::Ack, Some(order.id())));
/// });
/// ```
pub struct TestBroker {
    broker: Broker,
    recorder: Arc<Recorder>,
    _guard: ObserverGuard,
}

impl fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBroker")
            .field("broker", &self.broker)
            .field("events", &self.recorder.state.lock().events.len())
            .finish()
    }
}

impl Deref for TestBroker {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

impl TestBroker {
    /// A new broker on `runtime`, recorded from the start.
    pub fn new(runtime: &RuntimeHandle) -> TestBroker {
        TestBroker::attach(&Broker::new(runtime))
    }

    /// Records the traffic of an existing broker from now on, until the
    /// `TestBroker` is dropped.
    pub fn attach(broker: &Broker) -> TestBroker {
        let recorder = Arc::new(Recorder::default());
        let guard = broker.observe(recorder.clone());
        TestBroker {
            broker: broker.clone(),
            recorder,
            _guard: guard,
        }
    }

    /// The broker, to clone and hand to the code under test.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Everything recorded so far, in order.
    pub fn events(&self) -> Events {
        self.recorder.state.lock().events.clone()
    }

    /// The messages published to `queue` so far, in order.
    pub fn published_to(&self, queue: &str) -> Vec<Envelope> {
        self.recorder.state.lock().events.published_to(queue)
    }

    /// The deliveries made from `queue` so far, in order.
    pub fn deliveries(&self, queue: &str) -> Vec<Delivered> {
        self.recorder.state.lock().events.deliveries(queue)
    }

    /// The settlements made on `queue` so far, in order.
    pub fn settlements(&self, queue: &str) -> Vec<Settled> {
        self.recorder.state.lock().events.settlements(queue)
    }

    /// The dead letters of `queue` so far, in order.
    pub fn dead_letters(&self, queue: &str) -> Vec<DeadLettered> {
        self.recorder.state.lock().events.dead_letters(queue)
    }

    /// Forgets everything recorded, including what `expect_published` returned.
    pub fn clear(&self) {
        let mut state = self.recorder.state.lock();
        *state = State::default();
    }

    /// Waits up to `timeout` for the next publish to `queue` that this method
    /// has not returned yet (the first call returns the first publish, and so on).
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Timeout`], listing the events recorded meanwhile.
    pub async fn try_expect_published(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> Result<Envelope, ProbeError> {
        let deadline = postbox::clock::deadline(timeout);
        let found = self
            .recorder
            .wait(deadline, |state| {
                let taken = state.taken.get(queue).copied().unwrap_or(0);
                let next = state
                    .events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Published(p) if p.queue == queue => Some(&p.message),
                        _ => None,
                    })
                    .nth(taken)
                    .cloned()?;
                state.taken.insert(queue.to_string(), taken + 1);
                Some(next)
            })
            .await;
        found.ok_or_else(|| {
            let state = self.recorder.state.lock();
            let taken = state.taken.get(queue).copied().unwrap_or(0);
            ProbeError::new(
                ProbeErrorKind::Timeout,
                format!(
                    "expect_published: timeout ({timeout:?}) waiting for publish #{} to {queue:?}; recorded instead: {}",
                    taken + 1,
                    show(&state.events)
                ),
            )
        })
    }

    /// Waits up to `timeout` for the next publish to `queue` and returns it.
    ///
    /// # Panics
    ///
    /// If none comes in time, listing the events recorded.
    pub async fn expect_published(&self, queue: &str, timeout: Duration) -> Envelope {
        self.try_expect_published(queue, timeout)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits up to `timeout` until `condition` holds for the events recorded.
    /// `condition` runs under the record's lock, after every new event: keep it
    /// quick and do not call this broker's methods from it.
    ///
    /// # Errors
    ///
    /// [`ProbeErrorKind::Timeout`], listing the events recorded.
    pub async fn try_wait_for(
        &self,
        mut condition: impl FnMut(&Events) -> bool,
        timeout: Duration,
    ) -> Result<(), ProbeError> {
        let deadline = postbox::clock::deadline(timeout);
        let met = self
            .recorder
            .wait(deadline, |state| condition(&state.events).then_some(()))
            .await;
        met.ok_or_else(|| {
            ProbeError::new(
                ProbeErrorKind::Timeout,
                format!(
                    "wait_for: condition not met within {timeout:?}; recorded: {}",
                    show(&self.recorder.state.lock().events)
                ),
            )
        })
    }

    /// Waits up to `timeout` until `condition` holds for the events recorded.
    ///
    /// # Panics
    ///
    /// If it does not in time, listing the events recorded.
    pub async fn wait_for(&self, condition: impl FnMut(&Events) -> bool, timeout: Duration) {
        if let Err(err) = self.try_wait_for(condition, timeout).await {
            panic!("{err}");
        }
    }
}
