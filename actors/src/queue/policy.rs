//! The limits a queue enforces ([`QueuePolicy`]) and what it does when a
//! length limit is reached ([`Overflow`]).

use serde::{Deserialize, Serialize};

/// What happens when a publish would pass a length limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Drop (or dead-letter, reason `maxlen`) the oldest ready messages. The
    /// limits hold after requeues too: a requeue that brings the queue over
    /// them drops from the head.
    #[default]
    DropHead,
    /// Refuse the new message; the publisher is told. (A requeue may leave the
    /// queue over its limit; publishes are refused until it is back under.)
    RejectPublish,
    /// Refuse the new message, as `RejectPublish`, and dead-letter it with
    /// reason `maxlen`.
    RejectPublishDlx,
    /// Keep everything: past the length limits (10,000 messages when no
    /// limit is set), messages are paged out to disk and read back in order
    /// as the head drains, so that a backlog of millions costs bounded
    /// memory. The limits bound memory, not the queue. (RabbitMQ's lazy
    /// queues; see `queue::spill`.)
    Spill,
    /// Make publishers wait: a message that would pass a limit waits, out of
    /// the queue, until consumers make room, and while one waits the queue
    /// takes no more publishes from its inbox, so the inbox fills and
    /// [`publish`](crate::QueueHandle::publish) waits for room
    /// (`try_publish` fails with `Full`). Backpressure then reaches the
    /// producer end to end: the ready messages never pass the limits, and
    /// at most the mailbox's capacity of publishes wait in front of them.
    /// A message larger than `max_length_bytes` enters an empty queue (it
    /// would otherwise wait for ever). Messages of a committed transaction
    /// are already stored and enter at once.
    Block,
    /// Discard the new message (dead-lettered with reason `maxlen` where the
    /// queue has a dead-letter exchange); the publisher is not told. The
    /// queue keeps its oldest messages, as a bounded buffer that loses the
    /// newest.
    DropNew,
}

/// The limits a queue enforces. All default to "none".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueuePolicy {
    /// Per-queue message TTL in milliseconds (the smaller of it and a message's
    /// own expiration applies), counted from enqueueing.
    pub message_ttl_ms: Option<u64>,
    /// A message delivered this many times and returned again is dead-lettered
    /// (reason `delivery_limit`) instead of requeued.
    pub delivery_limit: Option<u32>,
    /// Most ready messages.
    pub max_length: Option<usize>,
    /// Most payload bytes of ready messages.
    pub max_length_bytes: Option<usize>,
    /// What a full queue does with a new message.
    pub overflow: Overflow,
    /// One consumer at a time receives everything (RabbitMQ's
    /// `x-single-active-consumer`): the first registered that is not
    /// cancelled. The others stand by, and the next in registration order
    /// takes over when it goes. It goes when it is removed (its unsettled
    /// deliveries are requeued to their places, so they come first, to the
    /// next one), or once it is cancelled and has settled what it held.
    #[serde(default)]
    pub single_active_consumer: bool,
    /// A priority queue's highest priority (RabbitMQ's `x-max-priority`):
    /// higher priorities are delivered first, FIFO within a priority, and
    /// priorities above it count as it. `None` (or 0): a FIFO queue.
    #[serde(default)]
    pub max_priority: Option<u8>,
    /// Load shedding: what to do with low-priority publishes while the
    /// queue is overloaded.
    #[serde(default)]
    pub shed: Option<Shedding>,
}

/// A load-shedding policy: while the queue is overloaded (this many ready
/// messages, or the next message this old), a publish whose priority is
/// below `below_priority` is dropped, dead-lettered (reason `shed`) or
/// deferred, so that the important traffic keeps flowing. Shed messages
/// count as published, and in `QueueStats::shed` (deferred ones in
/// `delayed` until they come back).
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{QueueOptions, Shedding};
/// let orders = QueueOptions::default().shed(
///     Shedding::below_priority(5).at_depth(10_000).defer(Duration::from_secs(30)),
/// );
/// # let _ = orders;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Shedding {
    /// Messages of a priority below this are shed.
    pub below_priority: u8,
    /// Overloaded from this many ready messages.
    pub depth: Option<usize>,
    /// Overloaded once the next message to deliver is this old (ms, from
    /// its timestamp).
    pub age_ms: Option<u64>,
    /// What happens to a shed message.
    pub action: ShedAction,
}

/// What happens to a shed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShedAction {
    /// Dropped, and counted.
    Drop,
    /// Dead-lettered with reason [`Shed`](crate::DeathReason::Shed).
    DeadLetter,
    /// Set aside for this long (ms), then ready again at its place in the
    /// queue (as a delayed requeue).
    Defer(u64),
}

impl Shedding {
    /// Sheds messages of a priority below `priority` (dropping them until
    /// told otherwise) once a threshold is set and passed.
    pub fn below_priority(priority: u8) -> Self {
        Shedding {
            below_priority: priority,
            depth: None,
            age_ms: None,
            action: ShedAction::Drop,
        }
    }

    /// Overloaded from `ready` ready messages.
    pub fn at_depth(mut self, ready: usize) -> Self {
        self.depth = Some(ready);
        self
    }

    /// Overloaded once the next message is `age` old.
    pub fn at_age(mut self, age: std::time::Duration) -> Self {
        self.age_ms = Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Shed messages are dead-lettered.
    pub fn dead_letter(mut self) -> Self {
        self.action = ShedAction::DeadLetter;
        self
    }

    /// Shed messages come back after `delay`.
    pub fn defer(mut self, delay: std::time::Duration) -> Self {
        self.action = ShedAction::Defer(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }
}
