//! The queue as a pure state machine.
//!
//! [`QueueState`] is everything a queue knows, with none of the machinery around it: no
//! actors, no async, no I/O and no clocks. The queue actor feeds it events (a publish, a
//! consumer joining or leaving, an ack) and asks it what to deliver next; because every
//! transition is a plain, deterministic method call, the semantics can be tested
//! exhaustively here and the state can later be snapshotted or replayed for persistence.
//!
//! Semantics (see the reference "Queues" and "Acknowledgements" sections):
//! - Ready messages are delivered in FIFO order, each to exactly one consumer, the
//!   consumers taking turns in registration order (fair round-robin).
//! - A consumer in [`AckMode::Manual`] holds at most `prefetch` unsettled deliveries
//!   (0 = no limit). A consumer in [`AckMode::Auto`] settles on delivery.
//! - A consumer whose mailbox is full is [blocked](QueueState::set_blocked) and skipped.
//! - A requeued delivery (nack with requeue, or its consumer going away) goes back to its
//!   original position in the ready queue, so it is delivered before any message
//!   published after it; its next delivery is flagged `redelivered` and its delivery
//!   count goes up.
//! - Settling an unknown or already settled delivery is a [`SettleError`] for the caller
//!   and leaves the state untouched.
//! - Limits ([`QueuePolicy`]): a message TTL (the smaller of the queue's and the
//!   message's; counted from enqueueing; not reset by a requeue; an expired message is
//!   removed when it reaches the head and never delivered), a delivery limit, and
//!   length limits in messages and bytes with drop-head or reject-publish overflow.
//! - Messages removed for one of those reasons, or nacked without requeue, wait in an
//!   outbox ([`QueueState::drain_dead`]) with their [`DeathReason`], for the driver to
//!   dead-letter or drop.
//! - Time is whatever the driver says it is ([`QueueState::advance_to`]), so tests can
//!   step it and replays are deterministic.
//!
//! ```
//! use postbox_actors::envelope::Envelope;
//! use postbox_actors::queue::state::{AckMode, ConsumerId, QueueState};
//!
//! let mut queue = QueueState::new();
//! let worker = ConsumerId(1);
//! queue.add_consumer(worker, AckMode::Manual, 10)?;
//! queue.publish(Envelope::new("job"));
//!
//! let first = queue.next_delivery().expect("a ready message and a consumer");
//! assert_eq!(first.consumer, worker);
//! assert_eq!(first.message.delivery_count(), 1);
//!
//! // The worker gives up on it: it comes back, flagged as redelivered.
//! queue.nack(worker, first.tag, false, true)?;
//! let again = queue.next_delivery().expect("the requeued message");
//! assert!(again.message.redelivered());
//! assert_eq!(again.message.delivery_count(), 2);
//!
//! queue.ack(worker, again.tag, false)?;
//! assert!(queue.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;

/// Identifies a consumer within a queue. Chosen by the caller (the queue actor), which
/// must not register the same id twice at once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConsumerId(pub u64);

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Identifies one delivery for settling it. Issued by the queue, strictly increasing
/// from 1; a redelivery gets a new tag. Tag 0 is never issued.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryTag(pub u64);

impl fmt::Display for DeliveryTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How a consumer's deliveries are settled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Settled as soon as it is delivered: at-most-once, no prefetch limit.
    Auto,
    /// Settled by [`QueueState::ack`] / [`QueueState::nack`]: at-least-once, bounded by
    /// the consumer's prefetch.
    #[default]
    Manual,
}

/// One delivery decided by [`QueueState::next_delivery`]: send `message` to `consumer`,
/// which settles it (in manual mode) by `tag`.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Who gets the message.
    pub consumer: ConsumerId,
    /// The delivery's tag, to settle it with.
    pub tag: DeliveryTag,
    /// The message, with its delivery count and redelivered flag already set.
    pub message: Envelope,
}

/// A snapshot of a queue's size and lifetime counters.
///
/// At all times `published == ready + unacked + delayed + acknowledged + rejected + purged + expired + maxlen + delivery_limit`
/// (auto-acknowledged deliveries count as acknowledged; requeued messages are back in
/// `ready` or `unacked`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Messages waiting for a consumer.
    pub ready: usize,
    /// Deliveries waiting to be settled.
    pub unacked: usize,
    /// Registered consumers.
    pub consumers: usize,
    /// Messages ever published to the queue.
    pub published: u64,
    /// Deliveries made (redeliveries included).
    pub delivered: u64,
    /// Deliveries that were redeliveries.
    pub redelivered: u64,
    /// Deliveries settled by ack, or automatically in auto mode.
    pub acknowledged: u64,
    /// Deliveries nacked without requeue (discarded or dead-lettered).
    pub rejected: u64,
    /// Deliveries returned to the ready queue, by nack or by their consumer going away.
    pub requeued: u64,
    /// Ready messages dropped by [`QueueState::purge`].
    pub purged: u64,
    /// Messages nacked with a delay, waiting to come back.
    pub delayed: usize,
    /// Payload bytes of the ready messages.
    pub ready_bytes: usize,
    /// Messages removed because their TTL ran out.
    pub expired: u64,
    /// Messages removed from the head to respect a length limit.
    pub maxlen: u64,
    /// Messages removed because they used up the delivery limit.
    pub delivery_limit: u64,
    /// Publishes refused because the queue was full (reject-publish).
    pub refused: u64,
}

/// What happens when a publish would pass a length limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Drop (or dead-letter, reason `maxlen`) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the new message; the publisher is told.
    RejectPublish,
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
}

/// Why a message left a queue other than by being consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathReason {
    /// Nacked or rejected without requeue.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped from the head for a length limit.
    MaxLen,
    /// Returned once too often.
    DeliveryLimit,
}

impl DeathReason {
    /// RabbitMQ's name for the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

impl fmt::Display for DeathReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message removed from a queue for a [`DeathReason`].
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The message, as it was in the queue.
    pub message: Envelope,
    /// Why it was removed.
    pub reason: DeathReason,
}

/// The outcome of [`QueueState::publish`].
#[derive(Debug)]
pub enum Publish {
    /// The message is in the queue.
    Enqueued,
    /// The queue is full and its overflow is reject-publish: the message, back.
    Refused(Envelope),
}

/// Milliseconds of a duration, saturating.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A snapshot of one consumer's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerStats {
    /// The consumer.
    pub id: ConsumerId,
    /// How its deliveries are settled.
    pub mode: AckMode,
    /// Its prefetch as registered (0 = no limit; ignored in auto mode).
    pub prefetch: u32,
    /// Deliveries it holds unsettled (always 0 in auto mode).
    pub unacked: usize,
    /// Whether it is blocked (its mailbox is full).
    pub blocked: bool,
    /// Deliveries it has received.
    pub delivered: u64,
}

/// Why an ack, nack or reject (or a consumer operation) was refused. The queue's state is
/// unchanged whenever one of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// The consumer is not registered: never was, or has been removed.
    #[error("consumer {0} is not registered on this queue")]
    UnknownConsumer(ConsumerId),
    /// The tag was never issued by this queue (0, or above the last one issued).
    #[error("delivery tag {tag} was never issued by this queue")]
    UnknownTag {
        /// The tag given.
        tag: DeliveryTag,
    },
    /// The delivery was issued but is no longer outstanding: acked, nacked, requeued
    /// (e.g. because its consumer went away), or settled automatically.
    #[error("delivery tag {tag} is already settled")]
    AlreadySettled {
        /// The tag given.
        tag: DeliveryTag,
    },
    /// The delivery is outstanding, but held by another consumer.
    #[error("delivery tag {tag} belongs to consumer {owner}")]
    WrongConsumer {
        /// The tag given.
        tag: DeliveryTag,
        /// The consumer holding it.
        owner: ConsumerId,
    },
    /// The consumer acknowledges automatically, so it has nothing to settle.
    #[error("consumer {0} uses automatic acknowledgement; it has nothing to settle")]
    AutoAckConsumer(ConsumerId),
}

/// Why a consumer could not be registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// A consumer with this id is already registered.
    #[error("consumer {0} is already registered on this queue")]
    Duplicate(ConsumerId),
}

/// A message held by the queue, with its publish sequence number: its original position,
/// which a requeue restores.
#[derive(Clone, Debug)]
struct Entry {
    seq: u64,
    message: Envelope,
    /// When it expires (epoch ms on the driver's clock); set at enqueue from the
    /// smaller of the queue's and the message's TTL, and kept across requeues.
    /// [`NEVER`] when it has no TTL (a sentinel: 8 bytes less per queued message
    /// than an `Option`).
    expires_at: u64,
}

/// The expiry of a message without TTL.
const NEVER: u64 = u64::MAX;

/// The ready messages, ordered by publish sequence number.
///
/// Kept behind these few methods so that a priority-ordered structure can replace it.
#[derive(Clone, Debug, Default)]
struct Ready {
    // Invariant: sorted by strictly increasing `seq`.
    entries: VecDeque<Entry>,
    /// Sum of the payload sizes, for byte length limits.
    bytes: usize,
}

impl Ready {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a newly published message (its seq is the highest so far).
    fn push(&mut self, entry: Entry) {
        self.bytes += entry.message.size();
        self.entries.push_back(entry);
    }

    /// The message to deliver next.
    fn head(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// Takes the message to deliver next.
    fn pop(&mut self) -> Option<Entry> {
        let entry = self.entries.pop_front()?;
        self.bytes -= entry.message.size();
        crate::spare::release(&mut self.entries);
        Some(entry)
    }

    /// Puts a previously delivered message back at its original position. Requeued
    /// messages are old, so the position is near the head and the insert cheap.
    fn requeue(&mut self, entry: Entry) {
        self.bytes += entry.message.size();
        let at = self.entries.partition_point(|e| e.seq < entry.seq);
        self.entries.insert(at, entry);
    }

    /// Drops every ready message; returns how many there were.
    fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        crate::spare::release(&mut self.entries);
        self.bytes = 0;
        n
    }
}

/// A registered consumer and the deliveries it holds.
#[derive(Clone, Debug)]
struct Consumer {
    id: ConsumerId,
    mode: AckMode,
    prefetch: u32,
    blocked: bool,
    delivered: u64,
    /// Outstanding deliveries by tag (always empty in auto mode). Per consumer, so that
    /// `multiple` settles and removal touch only this consumer's deliveries.
    unacked: Unacked,
}

/// One consumer's outstanding deliveries, by tag. Tags only grow, so a deque with
/// tombstones gives O(1) inserts and (amortized) removals that never move
/// entries; a B-tree would shift its large values inside nodes on every settle.
#[derive(Clone, Debug, Default)]
struct Unacked {
    // Invariant: strictly increasing tags; no tombstone at either end.
    slots: VecDeque<(DeliveryTag, Option<Entry>)>,
    live: usize,
}

impl Unacked {
    fn len(&self) -> usize {
        self.live
    }

    fn insert(&mut self, tag: DeliveryTag, entry: Entry) {
        debug_assert!(self.slots.back().is_none_or(|(t, _)| *t < tag));
        self.slots.push_back((tag, Some(entry)));
        self.live += 1;
    }

    fn position(&self, tag: &DeliveryTag) -> Option<usize> {
        // Settling in delivery order is the common case: the oldest entry.
        let i = match self.slots.front() {
            Some((front, _)) if front == tag => 0,
            _ => self.slots.binary_search_by_key(tag, |(t, _)| *t).ok()?,
        };
        self.slots[i].1.is_some().then_some(i)
    }

    fn contains_key(&self, tag: &DeliveryTag) -> bool {
        self.position(tag).is_some()
    }

    fn remove(&mut self, tag: &DeliveryTag) -> Option<Entry> {
        let i = self.position(tag)?;
        let entry = self.slots[i].1.take();
        self.live -= 1;
        self.trim();
        entry
    }

    /// Removes every delivery with a tag up to and including `tag`, oldest first.
    fn take_through(&mut self, tag: DeliveryTag) -> Vec<Entry> {
        let end = self.slots.partition_point(|(t, _)| *t <= tag);
        let taken: Vec<Entry> = self.slots.drain(..end).filter_map(|(_, e)| e).collect();
        self.live -= taken.len();
        self.trim();
        taken
    }

    fn trim(&mut self) {
        while self.slots.front().is_some_and(|(_, e)| e.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|(_, e)| e.is_none()) {
            self.slots.pop_back();
        }
        crate::spare::release(&mut self.slots);
    }

    fn into_values(self) -> impl Iterator<Item = Entry> {
        self.slots.into_iter().filter_map(|(_, e)| e)
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&DeliveryTag, &Entry)> {
        self.slots
            .iter()
            .filter_map(|(t, e)| e.as_ref().map(|e| (t, e)))
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.iter().map(|(_, e)| e)
    }
}

impl Consumer {
    /// Whether the consumer may receive a delivery now.
    fn can_take(&self) -> bool {
        !self.blocked
            && match self.mode {
                AckMode::Auto => true,
                // u32 -> usize is lossless on the 32- and 64-bit targets std runs on.
                AckMode::Manual => {
                    self.prefetch == 0 || self.unacked.len() < self.prefetch as usize
                }
            }
    }

    fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            id: self.id,
            mode: self.mode,
            prefetch: self.prefetch,
            unacked: self.unacked.len(),
            blocked: self.blocked,
            delivered: self.delivered,
        }
    }
}

/// Lifetime counters (the live sizes are computed on demand in [`QueueState::stats`]).
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    published: u64,
    delivered: u64,
    redelivered: u64,
    acknowledged: u64,
    rejected: u64,
    requeued: u64,
    purged: u64,
    expired: u64,
    maxlen: u64,
    delivery_limit: u64,
    refused: u64,
}

/// A queue's complete state: ready messages, consumers, and outstanding deliveries.
///
/// See the [module documentation](self) for the semantics and an example.
#[derive(Clone, Debug, Default)]
pub struct QueueState {
    ready: Ready,
    /// In registration order, which is the round-robin order.
    consumers: Vec<Consumer>,
    /// Position of each consumer in `consumers`, for O(1) settles.
    index: HashMap<ConsumerId, usize>,
    /// Where the next round-robin scan starts: the position after the consumer served
    /// last. May equal `consumers.len()`, so that a consumer registered after the last
    /// one was served gets the next turn.
    cursor: usize,
    /// Sequence number of the next published message.
    next_seq: u64,
    /// The last delivery tag issued; 0 before the first delivery.
    last_tag: u64,
    /// Outstanding deliveries across all consumers.
    unacked: usize,
    counters: Counters,
    policy: QueuePolicy,
    /// The driver's clock (epoch ms), as last told by [`QueueState::advance_to`].
    now_ms: u64,
    /// Nacked-with-delay messages, by (due time, seq).
    delayed: BTreeMap<(u64, u64), Entry>,
    /// Messages removed for a dead-letter reason, waiting for the driver.
    dead: Vec<DeadLetter>,
}

impl QueueState {
    /// An empty queue with no consumers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue with limits.
    #[must_use]
    pub fn with_policy(policy: QueuePolicy) -> Self {
        QueueState {
            policy,
            ..Self::default()
        }
    }

    /// The queue's limits.
    #[must_use]
    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Appends `message` to the ready queue, applying the length limits: with
    /// [`Overflow::DropHead`] the oldest ready messages make room (dead-lettered
    /// with [`DeathReason::MaxLen`]); with [`Overflow::RejectPublish`] a full queue
    /// refuses the new message and hands it back.
    pub fn publish(&mut self, message: Envelope) -> Publish {
        let (max_len, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        if self.policy.overflow == Overflow::RejectPublish {
            let full_len = max_len.is_some_and(|max| self.ready.len() >= max);
            let full_bytes = max_bytes.is_some_and(|max| self.ready.bytes + message.size() > max);
            if full_len || full_bytes {
                self.counters.refused += 1;
                return Publish::Refused(message);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counters.published += 1;
        let ttl = match (self.policy.message_ttl_ms, message.expiration()) {
            (Some(q), Some(m)) => Some(q.min(millis(m))),
            (q, m) => q.or(m.map(millis)),
        };
        // Saturating: a TTL reaching past the end of time never expires.
        let expires_at = ttl.map_or(NEVER, |ttl| self.now_ms.saturating_add(ttl));
        self.ready.push(Entry {
            seq,
            message,
            expires_at,
        });
        // Drop-head: the oldest make room (the new message itself, if it alone is too big).
        while max_len.is_some_and(|max| self.ready.len() > max)
            || max_bytes.is_some_and(|max| self.ready.bytes > max)
        {
            let Some(head) = self.ready.pop() else { break };
            self.counters.maxlen += 1;
            self.dead.push(DeadLetter {
                message: head.message,
                reason: DeathReason::MaxLen,
            });
        }
        Publish::Enqueued
    }

    /// Moves the driver's clock forward (it never goes back), returns delayed
    /// messages that are due to the ready queue, and expires the head.
    pub fn advance_to(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let entry = entry.remove();
            self.counters.requeued += 1;
            self.ready.requeue(entry);
        }
        self.expire();
    }

    /// Removes expired messages at the head of the ready queue (dead-lettered with
    /// [`DeathReason::Expired`]); returns how many. As in RabbitMQ, a message behind
    /// the head is removed when it reaches the head, and never delivered expired.
    pub fn expire(&mut self) -> usize {
        let mut n = 0;
        while self
            .ready
            .head()
            .is_some_and(|e| e.expires_at != NEVER && e.expires_at <= self.now_ms)
        {
            let Some(entry) = self.ready.pop() else { break };
            n += 1;
            self.counters.expired += 1;
            self.dead.push(DeadLetter {
                message: entry.message,
                reason: DeathReason::Expired,
            });
        }
        n
    }

    /// When the driver should next call [`advance_to`](Self::advance_to): the
    /// earliest of the head's expiry and the next delayed message's due time.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        let head = self
            .ready
            .head()
            .map(|e| e.expires_at)
            .filter(|t| *t != NEVER);
        let delayed = self.delayed.keys().next().map(|(due, _)| *due);
        match (head, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the messages removed for a dead-letter reason since the last call,
    /// oldest first, for the driver to dead-letter or drop.
    pub fn drain_dead(&mut self) -> std::vec::IntoIter<DeadLetter> {
        // Taken, not drained: a burst of dead letters does not leave its
        // buffer behind.
        std::mem::take(&mut self.dead).into_iter()
    }

    /// Whether dead letters are waiting to be drained.
    #[must_use]
    pub fn has_dead(&self) -> bool {
        !self.dead.is_empty()
    }

    /// Registers a consumer, last in the round-robin order.
    ///
    /// `prefetch` is the most unsettled deliveries it may hold in manual mode; 0 means no
    /// limit. It is ignored in auto mode, where deliveries settle immediately.
    ///
    /// # Errors
    /// [`ConsumerError::Duplicate`] if `id` is already registered.
    pub fn add_consumer(
        &mut self,
        id: ConsumerId,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<(), ConsumerError> {
        if self.index.contains_key(&id) {
            return Err(ConsumerError::Duplicate(id));
        }
        self.index.insert(id, self.consumers.len());
        self.consumers.push(Consumer {
            id,
            mode,
            prefetch,
            blocked: false,
            delivered: 0,
            unacked: Unacked::default(),
        });
        Ok(())
    }

    /// Unregisters a consumer (it stopped, crashed or went away) and requeues every
    /// delivery it still held, exactly as [`nack`](Self::nack) with requeue would: each
    /// goes back to its original position and is redelivered to someone else.
    ///
    /// Returns how many deliveries were requeued.
    ///
    /// # Errors
    /// [`SettleError::UnknownConsumer`] if `id` is not registered.
    pub fn remove_consumer(&mut self, id: ConsumerId) -> Result<usize, SettleError> {
        let index = self.position(id)?;
        self.index.remove(&id);
        let removed = self.consumers.remove(index);
        for (position, consumer) in self.consumers.iter().enumerate().skip(index) {
            self.index.insert(consumer.id, position);
        }
        // Keep the turn with the consumer that followed the removed one.
        if index < self.cursor {
            self.cursor -= 1;
        }
        let requeued = removed.unacked.len();
        self.unacked -= requeued;
        for entry in removed.unacked.into_values() {
            self.requeue(entry);
        }
        Ok(requeued)
    }

    /// Blocks (`true`) or unblocks (`false`) a consumer. A blocked consumer, typically
    /// one whose mailbox is full, gets no deliveries until unblocked; it keeps its turn
    /// order and its outstanding deliveries.
    ///
    /// # Errors
    /// [`SettleError::UnknownConsumer`] if `id` is not registered.
    pub fn set_blocked(&mut self, id: ConsumerId, blocked: bool) -> Result<(), SettleError> {
        let index = self.position(id)?;
        if let Some(consumer) = self.consumers.get_mut(index) {
            consumer.blocked = blocked;
        }
        Ok(())
    }

    /// Decides the next delivery: the head ready message, for the next eligible consumer
    /// in round-robin order.
    ///
    /// A consumer is eligible when it is not blocked and, in manual mode with a prefetch,
    /// holds fewer unsettled deliveries than its prefetch. The returned message carries
    /// its new delivery count and `redelivered` flag. In manual mode the queue keeps a copy
    /// until the delivery is settled; in auto mode the delivery is settled (acknowledged)
    /// at once.
    ///
    /// Returns `None` when no message is ready or no consumer is eligible; that costs at
    /// most one pass over the consumers. Call it until it returns `None` after anything
    /// that may enable a delivery (publish, settle, new or unblocked consumer).
    pub fn next_delivery(&mut self) -> Option<Dispatch> {
        self.expire();
        if self.ready.is_empty() {
            return None;
        }
        let index = self.next_eligible()?;
        let consumer = self.consumers.get_mut(index)?;
        let mut entry = self.ready.pop()?;

        let delivery_count = entry.message.delivery_count().saturating_add(1);
        let redelivered = delivery_count > 1;
        entry.message.set_delivery(delivery_count, redelivered);

        // 2^64 deliveries cannot happen, so the tag cannot overflow.
        self.last_tag += 1;
        let tag = DeliveryTag(self.last_tag);
        self.cursor = index + 1;
        consumer.delivered += 1;
        self.counters.delivered += 1;
        if redelivered {
            self.counters.redelivered += 1;
        }

        let message = match consumer.mode {
            AckMode::Auto => {
                self.counters.acknowledged += 1;
                entry.message
            }
            AckMode::Manual => {
                // Cheap: the envelope is reference-counted inside.
                let message = entry.message.clone();
                consumer.unacked.insert(tag, entry);
                self.unacked += 1;
                message
            }
        };
        Some(Dispatch {
            consumer: consumer.id,
            tag,
            message,
        })
    }

    /// Acknowledges delivery `tag` held by `consumer`, or with `multiple` every delivery
    /// that consumer holds up to and including `tag`. Returns how many were settled.
    ///
    /// # Errors
    /// See [`SettleError`]; in order of precedence: the consumer is unknown, is in auto
    /// mode, the tag was never issued, is held by another consumer, or is already settled.
    /// With `multiple`, `tag` itself must be outstanding for `consumer`. On error nothing
    /// is settled.
    pub fn ack(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
    ) -> Result<usize, SettleError> {
        self.settle(consumer, tag, multiple, |queue, _entry| {
            queue.counters.acknowledged += 1;
        })
    }

    /// Negatively acknowledges deliveries (selected as for [`ack`](Self::ack)).
    ///
    /// With `requeue`, each goes back to its original position in the ready queue, so it
    /// is delivered before anything published after it. Without, it is discarded (counted
    /// as rejected); use [`nack_with`](Self::nack_with) to receive discarded messages,
    /// e.g. to dead-letter them. Returns how many were settled.
    ///
    /// # Errors
    /// As for [`ack`](Self::ack).
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        requeue: bool,
    ) -> Result<usize, SettleError> {
        if requeue {
            return self.settle(consumer, tag, multiple, Self::requeue);
        }
        self.settle(consumer, tag, multiple, |queue, entry| {
            queue.counters.rejected += 1;
            queue.dead.push(DeadLetter {
                message: entry.message,
                reason: DeathReason::Rejected,
            });
        })
    }

    /// Like a requeueing [`nack`](Self::nack), but the messages come back to the
    /// ready queue (at their original positions) only once the clock reaches
    /// `until_ms`. Until then they count as [`QueueStats::delayed`].
    ///
    /// # Errors
    /// As for [`ack`](Self::ack).
    pub fn nack_delayed(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        until_ms: u64,
    ) -> Result<usize, SettleError> {
        self.settle(consumer, tag, multiple, |queue, entry| {
            if queue.over_delivery_limit(&entry) {
                queue.dead_letter_over_limit(entry);
            } else {
                queue.delayed.insert((until_ms, entry.seq), entry);
            }
        })
    }

    /// [`nack`](Self::nack), handing each discarded message to `discarded` (called only
    /// when `requeue` is false, once per message, oldest delivery first). This is the hook
    /// for dead-lettering; it allocates nothing itself.
    ///
    /// `discarded` should not panic: messages not yet handed over would be lost.
    ///
    /// # Errors
    /// As for [`ack`](Self::ack); `discarded` is not called on error.
    ///
    /// ```
    /// use postbox_actors::envelope::Envelope;
    /// use postbox_actors::queue::state::{AckMode, ConsumerId, QueueState};
    ///
    /// let mut queue = QueueState::new();
    /// queue.add_consumer(ConsumerId(1), AckMode::Manual, 0)?;
    /// queue.publish(Envelope::new("poison"));
    /// let delivery = queue.next_delivery().expect("deliverable");
    ///
    /// let mut dead_letters = Vec::new();
    /// queue.nack_with(ConsumerId(1), delivery.tag, false, false, |m| dead_letters.push(m))?;
    /// assert_eq!(dead_letters[0].payload().as_ref(), b"poison");
    /// assert_eq!(queue.stats().rejected, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn nack_with(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        requeue: bool,
        mut discarded: impl FnMut(Envelope),
    ) -> Result<usize, SettleError> {
        if requeue {
            self.settle(consumer, tag, multiple, Self::requeue)
        } else {
            self.settle(consumer, tag, multiple, |queue, entry| {
                queue.counters.rejected += 1;
                discarded(entry.message);
            })
        }
    }

    /// Rejects one delivery: [`nack`](Self::nack) without `multiple`.
    ///
    /// # Errors
    /// As for [`ack`](Self::ack).
    pub fn reject(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        requeue: bool,
    ) -> Result<usize, SettleError> {
        self.nack(consumer, tag, false, requeue)
    }

    /// Drops every ready message; outstanding deliveries are kept. Returns how many were
    /// dropped.
    pub fn purge(&mut self) -> usize {
        let purged = self.ready.clear();
        self.counters.purged += purged as u64;
        purged
    }

    /// Current sizes and lifetime counters.
    #[must_use]
    pub fn stats(&self) -> QueueStats {
        let c = self.counters;
        QueueStats {
            ready: self.ready.len(),
            unacked: self.unacked,
            consumers: self.consumers.len(),
            published: c.published,
            delivered: c.delivered,
            redelivered: c.redelivered,
            acknowledged: c.acknowledged,
            rejected: c.rejected,
            requeued: c.requeued,
            purged: c.purged,
            delayed: self.delayed.len(),
            ready_bytes: self.ready.bytes,
            expired: c.expired,
            maxlen: c.maxlen,
            delivery_limit: c.delivery_limit,
            refused: c.refused,
        }
    }

    /// One consumer's state, if it is registered.
    #[must_use]
    pub fn consumer_stats(&self, id: ConsumerId) -> Option<ConsumerStats> {
        let index = *self.index.get(&id)?;
        self.consumers.get(index).map(Consumer::stats)
    }

    /// Every registered consumer's state, in registration (round-robin) order.
    pub fn consumers(&self) -> impl ExactSizeIterator<Item = ConsumerStats> {
        self.consumers.iter().map(Consumer::stats)
    }

    /// Messages waiting for a consumer.
    #[must_use]
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Deliveries waiting to be settled, across all consumers.
    #[must_use]
    pub fn unacked_len(&self) -> usize {
        self.unacked
    }

    /// Whether the queue holds no message at all: none ready, delayed or unsettled.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.unacked == 0 && self.delayed.is_empty()
    }

    /// Whether any consumer is registered.
    #[must_use]
    pub fn has_consumers(&self) -> bool {
        !self.consumers.is_empty()
    }

    /// The position of a registered consumer.
    fn position(&self, id: ConsumerId) -> Result<usize, SettleError> {
        self.index
            .get(&id)
            .copied()
            .ok_or(SettleError::UnknownConsumer(id))
    }

    /// The first eligible consumer at or after the cursor, wrapping around.
    fn next_eligible(&self) -> Option<usize> {
        let n = self.consumers.len();
        let start = if self.cursor < n { self.cursor } else { 0 };
        let (before, from) = self.consumers.split_at(start);
        from.iter()
            .chain(before)
            .position(Consumer::can_take)
            .map(|offset| (start + offset) % n)
    }

    /// Returns a settled delivery to the ready queue, unless it has used up the
    /// queue's delivery limit: then it is dead-lettered instead.
    fn requeue(&mut self, entry: Entry) {
        if self.over_delivery_limit(&entry) {
            self.dead_letter_over_limit(entry);
            return;
        }
        self.counters.requeued += 1;
        self.ready.requeue(entry);
    }

    fn over_delivery_limit(&self, entry: &Entry) -> bool {
        self.policy
            .delivery_limit
            .is_some_and(|limit| entry.message.delivery_count() >= limit)
    }

    fn dead_letter_over_limit(&mut self, entry: Entry) {
        self.counters.delivery_limit += 1;
        self.dead.push(DeadLetter {
            message: entry.message,
            reason: DeathReason::DeliveryLimit,
        });
    }

    /// Checks a settle request without changing anything; returns the consumer's position.
    fn check_settle(&self, consumer: ConsumerId, tag: DeliveryTag) -> Result<usize, SettleError> {
        let index = self.position(consumer)?;
        let holder = self
            .consumers
            .get(index)
            .ok_or(SettleError::UnknownConsumer(consumer))?;
        if holder.mode == AckMode::Auto {
            return Err(SettleError::AutoAckConsumer(consumer));
        }
        if tag.0 == 0 || tag.0 > self.last_tag {
            return Err(SettleError::UnknownTag { tag });
        }
        if holder.unacked.contains_key(&tag) {
            return Ok(index);
        }
        // Error path only: find out whose it is, if anyone's.
        match self.consumers.iter().find(|c| c.unacked.contains_key(&tag)) {
            Some(owner) => Err(SettleError::WrongConsumer {
                tag,
                owner: owner.id,
            }),
            None => Err(SettleError::AlreadySettled { tag }),
        }
    }

    /// Validates, then removes the selected deliveries from `consumer` and hands each to
    /// `apply`, oldest first. Nothing changes on error.
    fn settle(
        &mut self,
        consumer: ConsumerId,
        tag: DeliveryTag,
        multiple: bool,
        mut apply: impl FnMut(&mut Self, Entry),
    ) -> Result<usize, SettleError> {
        let index = self.check_settle(consumer, tag)?;
        let holder = self
            .consumers
            .get_mut(index)
            .ok_or(SettleError::UnknownConsumer(consumer))?;
        if !multiple {
            let entry = holder
                .unacked
                .remove(&tag)
                .ok_or(SettleError::AlreadySettled { tag })?;
            self.unacked -= 1;
            apply(self, entry);
            return Ok(1);
        }
        // Everything this consumer holds up to `tag` is settled.
        let settled = holder.unacked.take_through(tag);
        let count = settled.len();
        self.unacked -= count;
        for entry in settled {
            apply(self, entry);
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::envelope::MessageId;

    const A: ConsumerId = ConsumerId(1);
    const B: ConsumerId = ConsumerId(2);
    const C: ConsumerId = ConsumerId(3);

    fn msg(name: &str) -> Envelope {
        Envelope::new(name.to_owned())
    }

    fn name(message: &Envelope) -> &str {
        std::str::from_utf8(message.payload()).unwrap()
    }

    fn publish_all(queue: &mut QueueState, names: &[&str]) {
        for n in names {
            queue.publish(msg(n));
        }
    }

    /// A purged backlog, a drained one and settled deliveries give their
    /// buffers back (they used to keep them until the queue was deleted).
    #[test]
    fn memory_is_given_back_when_the_backlog_shrinks() {
        const N: usize = 200_000;
        let mut q = QueueState::new();
        for _ in 0..N {
            q.publish(Envelope::new(""));
        }
        assert!(q.ready.entries.capacity() >= N);
        assert_eq!(q.purge(), N);
        assert!(
            q.ready.entries.capacity() <= 1024,
            "{}",
            q.ready.entries.capacity()
        );

        for _ in 0..N {
            q.publish(Envelope::new(""));
        }
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        let mut tags = Vec::with_capacity(N);
        while let Some(d) = q.next_delivery() {
            tags.push(d.tag);
        }
        assert_eq!(tags.len(), N);
        assert!(
            q.ready.entries.capacity() <= 1024,
            "{}",
            q.ready.entries.capacity()
        );
        let held = &q.consumers[0].unacked.slots;
        assert!(held.capacity() >= N);
        for tag in tags {
            q.ack(A, tag, false).unwrap();
        }
        let held = &q.consumers[0].unacked.slots;
        assert!(held.capacity() <= 1024, "{}", held.capacity());
        assert!(q.is_empty());
    }

    fn ready_names(queue: &QueueState) -> Vec<String> {
        queue
            .ready
            .entries
            .iter()
            .map(|e| name(&e.message).to_owned())
            .collect()
    }

    /// Everything observable about a queue, to check that a failed call changed nothing.
    #[derive(Debug, PartialEq)]
    struct Snapshot {
        stats: QueueStats,
        consumers: Vec<ConsumerStats>,
        ready: Vec<(u64, MessageId, u32)>,
        unacked: Vec<(ConsumerId, DeliveryTag, u64, MessageId)>,
        cursor: usize,
        last_tag: u64,
        next_seq: u64,
    }

    fn snapshot(queue: &QueueState) -> Snapshot {
        Snapshot {
            stats: queue.stats(),
            consumers: queue.consumers().collect(),
            ready: queue
                .ready
                .entries
                .iter()
                .map(|e| (e.seq, e.message.id(), e.message.delivery_count()))
                .collect(),
            unacked: queue
                .consumers
                .iter()
                .flat_map(|c| {
                    c.unacked
                        .iter()
                        .map(|(tag, e)| (c.id, *tag, e.seq, e.message.id()))
                })
                .collect(),
            cursor: queue.cursor,
            last_tag: queue.last_tag,
            next_seq: queue.next_seq,
        }
    }

    fn deliver(queue: &mut QueueState) -> Dispatch {
        queue.next_delivery().expect("a delivery")
    }

    #[test]
    fn requeued_message_returns_to_its_original_position() {
        let mut q = QueueState::new();
        publish_all(&mut q, &["m1", "m2", "m3"]);
        q.add_consumer(A, AckMode::Manual, 2).unwrap();

        let d1 = deliver(&mut q);
        let d2 = deliver(&mut q);
        assert_eq!((name(&d1.message), name(&d2.message)), ("m1", "m2"));
        assert_eq!((d1.tag, d2.tag), (DeliveryTag(1), DeliveryTag(2)));
        assert!(q.next_delivery().is_none(), "prefetch 2 reached");

        assert_eq!(q.nack(A, d1.tag, false, true), Ok(1));
        assert_eq!(ready_names(&q), ["m1", "m3"]);

        let again = deliver(&mut q);
        assert_eq!(name(&again.message), "m1");
        assert!(again.message.redelivered());
        assert_eq!(again.message.delivery_count(), 2);
        assert_eq!(again.tag, DeliveryTag(3));
        assert!(q.next_delivery().is_none(), "prefetch 2 reached again");

        q.ack(A, d2.tag, false).unwrap();
        let d3 = deliver(&mut q);
        assert_eq!(name(&d3.message), "m3");
        assert!(!d3.message.redelivered());
        assert_eq!(d3.message.delivery_count(), 1);

        let stats = q.stats();
        assert_eq!(
            (
                stats.delivered,
                stats.redelivered,
                stats.requeued,
                stats.acknowledged
            ),
            (4, 1, 1, 1)
        );
    }

    #[test]
    fn requeue_goes_behind_older_ready_messages() {
        // Requeued messages interleave with ready ones by publish order: m2 lands before
        // m4 and m5, then m3 between m2 and m4.
        let mut q = QueueState::new();
        publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        q.add_consumer(B, AckMode::Manual, 0).unwrap();
        let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
        // A: m1, m3; B: m2, m4.
        assert_eq!(q.nack(B, d[3].tag, true, true), Ok(2));
        assert_eq!(ready_names(&q), ["m2", "m4", "m5"]);
        assert_eq!(q.nack(A, d[2].tag, false, true), Ok(1));
        assert_eq!(ready_names(&q), ["m2", "m3", "m4", "m5"]);
    }

    #[test]
    fn round_robin_is_fair() {
        let mut q = QueueState::new();
        for id in [A, B, C] {
            q.add_consumer(id, AckMode::Manual, 0).unwrap();
        }
        publish_all(&mut q, &["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        let order: Vec<_> = std::iter::from_fn(|| q.next_delivery())
            .map(|d| d.consumer)
            .collect();
        assert_eq!(order, [A, B, C, A, B, C, A, B, C]);
        for stats in q.consumers() {
            assert_eq!((stats.delivered, stats.unacked), (3, 3));
        }
    }

    #[test]
    fn prefetch_bounds_and_blocked_consumers_are_skipped() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 1).unwrap();
        q.add_consumer(B, AckMode::Manual, 2).unwrap();
        q.add_consumer(C, AckMode::Manual, 3).unwrap();
        for i in 0..10 {
            q.publish(msg(&format!("m{i}")));
        }
        let first: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
        let order: Vec<_> = first.iter().map(|d| d.consumer).collect();
        assert_eq!(order, [A, B, C, B, C, C]);
        for stats in q.consumers() {
            assert_eq!(stats.unacked, stats.prefetch as usize);
        }
        assert_eq!(q.ready_len(), 4);

        // Free everyone's credit, but block B: it is skipped, and the turn order holds.
        for d in &first {
            q.ack(d.consumer, d.tag, false).unwrap();
        }
        q.set_blocked(B, true).unwrap();
        assert!(q.consumer_stats(B).unwrap().blocked);
        let order: Vec<_> = std::iter::from_fn(|| q.next_delivery())
            .map(|d| d.consumer)
            .collect();
        assert_eq!(order, [A, C, C, C]);
        assert_eq!(q.ready_len(), 0);

        // Unblocked, B is eligible again.
        q.set_blocked(B, false).unwrap();
        q.publish(msg("late"));
        assert_eq!(deliver(&mut q).consumer, B);
        // Everyone blocked: nothing is delivered, nothing is lost.
        for id in [A, B, C] {
            q.set_blocked(id, true).unwrap();
        }
        q.publish(msg("waiting"));
        assert!(q.next_delivery().is_none());
        assert_eq!(q.ready_len(), 1);
    }

    #[test]
    fn new_consumer_gets_the_next_turn_after_the_last_one_served() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Auto, 0).unwrap();
        q.add_consumer(B, AckMode::Auto, 0).unwrap();
        publish_all(&mut q, &["1", "2", "3", "4", "5"]);
        assert_eq!(deliver(&mut q).consumer, A);
        assert_eq!(deliver(&mut q).consumer, B);
        q.add_consumer(C, AckMode::Auto, 0).unwrap();
        assert_eq!(deliver(&mut q).consumer, C);
        assert_eq!(deliver(&mut q).consumer, A);
        // Removing the consumer whose turn it is passes the turn to the next one.
        q.remove_consumer(B).unwrap();
        assert_eq!(deliver(&mut q).consumer, C);
    }

    #[test]
    fn multiple_ack_and_nack_touch_only_the_callers_deliveries() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        q.add_consumer(B, AckMode::Manual, 0).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]);
        let d: Vec<_> = (0..6).map(|_| deliver(&mut q)).collect();
        // A holds tags 1, 3, 5; B holds 2, 4, 6.
        assert_eq!(q.ack(A, d[4].tag, true), Ok(3));
        assert_eq!(q.consumer_stats(A).unwrap().unacked, 0);
        assert_eq!(q.consumer_stats(B).unwrap().unacked, 3);

        assert_eq!(q.nack(B, d[3].tag, true, true), Ok(2));
        assert_eq!(ready_names(&q), ["m2", "m4", "m7", "m8"]);

        let mut dropped = Vec::new();
        assert_eq!(
            q.nack_with(B, d[5].tag, true, false, |m| dropped.push(m)),
            Ok(1)
        );
        assert_eq!(dropped.len(), 1);
        assert_eq!(name(&dropped[0]), "m6");

        let stats = q.stats();
        assert_eq!(
            (
                stats.acknowledged,
                stats.requeued,
                stats.rejected,
                stats.unacked
            ),
            (3, 2, 1, 0)
        );
        assert_eq!(stats.ready, 4);
    }

    #[test]
    fn multiple_with_only_earlier_deliveries_outstanding() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3"]);
        let d: Vec<_> = (0..3).map(|_| deliver(&mut q)).collect();
        q.ack(A, d[1].tag, false).unwrap();
        // Tag 2 is settled: `multiple` from it is refused, and 1 stays outstanding.
        let before = snapshot(&q);
        assert_eq!(
            q.ack(A, d[1].tag, true),
            Err(SettleError::AlreadySettled { tag: d[1].tag })
        );
        assert_eq!(snapshot(&q), before);
        assert_eq!(q.ack(A, d[2].tag, true), Ok(2));
        assert!(q.is_empty());
    }

    #[test]
    fn every_settle_error_leaves_the_state_unchanged() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        q.add_consumer(B, AckMode::Manual, 0).unwrap();
        q.add_consumer(C, AckMode::Auto, 0).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
        let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
        // A: tag 1 (m1), 4 (m4); B: tag 2 (m2); C auto: tag 3 (m3, settled).
        assert_eq!(
            d.iter().map(|d| d.consumer).collect::<Vec<_>>(),
            [A, B, C, A]
        );
        q.ack(A, d[3].tag, false).unwrap();
        q.publish(msg("m6"));

        let ghost = ConsumerId(99);
        let cases: Vec<(ConsumerId, u64, bool, SettleError)> = vec![
            (ghost, 1, false, SettleError::UnknownConsumer(ghost)),
            (ghost, 0, true, SettleError::UnknownConsumer(ghost)),
            (C, 3, false, SettleError::AutoAckConsumer(C)),
            (C, 1, true, SettleError::AutoAckConsumer(C)),
            (C, 0, false, SettleError::AutoAckConsumer(C)),
            (
                A,
                0,
                false,
                SettleError::UnknownTag {
                    tag: DeliveryTag(0),
                },
            ),
            (
                A,
                5,
                true,
                SettleError::UnknownTag {
                    tag: DeliveryTag(5),
                },
            ),
            (
                A,
                u64::MAX,
                true,
                SettleError::UnknownTag {
                    tag: DeliveryTag(u64::MAX),
                },
            ),
            (
                A,
                2,
                false,
                SettleError::WrongConsumer {
                    tag: DeliveryTag(2),
                    owner: B,
                },
            ),
            (
                B,
                1,
                true,
                SettleError::WrongConsumer {
                    tag: DeliveryTag(1),
                    owner: A,
                },
            ),
            // Settled automatically (auto consumer C).
            (
                A,
                3,
                false,
                SettleError::AlreadySettled {
                    tag: DeliveryTag(3),
                },
            ),
            // Already acked.
            (
                A,
                4,
                false,
                SettleError::AlreadySettled {
                    tag: DeliveryTag(4),
                },
            ),
            (
                B,
                4,
                true,
                SettleError::AlreadySettled {
                    tag: DeliveryTag(4),
                },
            ),
        ];
        for (consumer, tag, multiple, expected) in cases {
            let tag = DeliveryTag(tag);
            let before = snapshot(&q);
            assert_eq!(q.ack(consumer, tag, multiple), Err(expected.clone()));
            assert_eq!(snapshot(&q), before, "ack {consumer} {tag}");
            for requeue in [true, false] {
                let mut called = false;
                let result = q.nack_with(consumer, tag, multiple, requeue, |_| called = true);
                assert_eq!(result, Err(expected.clone()));
                assert!(!called);
                assert_eq!(snapshot(&q), before, "nack {consumer} {tag}");
            }
            if !multiple {
                assert_eq!(q.reject(consumer, tag, true), Err(expected.clone()));
                assert_eq!(snapshot(&q), before);
            }
        }

        // Consumer operations on an unknown consumer.
        let before = snapshot(&q);
        assert_eq!(
            q.remove_consumer(ghost),
            Err(SettleError::UnknownConsumer(ghost))
        );
        assert_eq!(
            q.set_blocked(ghost, true),
            Err(SettleError::UnknownConsumer(ghost))
        );
        assert_eq!(
            q.add_consumer(A, AckMode::Auto, 5),
            Err(ConsumerError::Duplicate(A))
        );
        assert_eq!(snapshot(&q), before);

        // Deliveries of a removed consumer are no longer outstanding anywhere.
        q.remove_consumer(A).unwrap();
        assert_eq!(
            q.ack(B, d[0].tag, false),
            Err(SettleError::AlreadySettled { tag: d[0].tag })
        );
        assert_eq!(
            q.ack(A, d[0].tag, false),
            Err(SettleError::UnknownConsumer(A))
        );
    }

    #[test]
    fn double_ack_is_already_settled() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        q.publish(msg("m"));
        let d = deliver(&mut q);
        assert_eq!(q.ack(A, d.tag, false), Ok(1));
        assert_eq!(
            q.ack(A, d.tag, false),
            Err(SettleError::AlreadySettled { tag: d.tag })
        );
        assert_eq!(q.stats().acknowledged, 1);
    }

    #[test]
    fn error_messages() {
        let tag = DeliveryTag(7);
        assert_eq!(
            SettleError::UnknownConsumer(A).to_string(),
            "consumer 1 is not registered on this queue"
        );
        assert_eq!(
            SettleError::UnknownTag { tag }.to_string(),
            "delivery tag 7 was never issued by this queue"
        );
        assert_eq!(
            SettleError::AlreadySettled { tag }.to_string(),
            "delivery tag 7 is already settled"
        );
        assert_eq!(
            SettleError::WrongConsumer { tag, owner: B }.to_string(),
            "delivery tag 7 belongs to consumer 2"
        );
        assert_eq!(
            SettleError::AutoAckConsumer(C).to_string(),
            "consumer 3 uses automatic acknowledgement; it has nothing to settle"
        );
        assert_eq!(
            ConsumerError::Duplicate(A).to_string(),
            "consumer 1 is already registered on this queue"
        );
    }

    #[test]
    fn removed_consumers_deliveries_are_requeued_in_place() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 0).unwrap();
        q.add_consumer(B, AckMode::Manual, 0).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3", "m4", "m5"]);
        let d: Vec<_> = (0..4).map(|_| deliver(&mut q)).collect();
        // A: m1, m3; B: m2, m4.
        q.ack(B, d[1].tag, false).unwrap();

        assert_eq!(q.remove_consumer(A), Ok(2));
        assert_eq!(ready_names(&q), ["m1", "m3", "m5"]);
        assert!(q.consumer_stats(A).is_none());
        let stats = q.stats();
        assert_eq!(
            (stats.requeued, stats.unacked, stats.ready, stats.consumers),
            (2, 1, 3, 1)
        );

        let next: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
        let seen: Vec<_> = next
            .iter()
            .map(|d| {
                (
                    d.consumer,
                    name(&d.message),
                    d.message.redelivered(),
                    d.message.delivery_count(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [(B, "m1", true, 2), (B, "m3", true, 2), (B, "m5", false, 1)]
        );
        assert_eq!(q.stats().redelivered, 2);

        // Removing the last consumer requeues the rest; nothing is delivered any more.
        assert_eq!(q.remove_consumer(B), Ok(4));
        assert!(!q.has_consumers());
        assert!(q.next_delivery().is_none());
        assert_eq!(ready_names(&q), ["m1", "m3", "m4", "m5"]);
    }

    #[test]
    fn auto_mode_settles_on_dispatch() {
        let mut q = QueueState::new();
        // Prefetch is ignored in auto mode.
        q.add_consumer(A, AckMode::Auto, 1).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3"]);
        let d: Vec<_> = std::iter::from_fn(|| q.next_delivery()).collect();
        assert_eq!(d.len(), 3);
        assert!(
            d.iter()
                .all(|d| d.consumer == A && d.message.delivery_count() == 1)
        );
        assert_eq!(d.iter().map(|d| d.tag.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(q.is_empty());
        let stats = q.stats();
        assert_eq!(
            (stats.delivered, stats.acknowledged, stats.unacked),
            (3, 3, 0)
        );
        let consumer = q.consumer_stats(A).unwrap();
        assert_eq!((consumer.unacked, consumer.delivered), (0, 3));
        assert_eq!(
            q.ack(A, d[0].tag, false),
            Err(SettleError::AutoAckConsumer(A))
        );
    }

    #[test]
    fn purge_drops_ready_but_keeps_unacked() {
        let mut q = QueueState::new();
        q.add_consumer(A, AckMode::Manual, 1).unwrap();
        publish_all(&mut q, &["m1", "m2", "m3"]);
        let d = deliver(&mut q);
        assert_eq!(q.purge(), 2);
        assert_eq!(q.purge(), 0);
        assert_eq!((q.ready_len(), q.unacked_len()), (0, 1));
        assert!(!q.is_empty());
        // The outstanding delivery can still be requeued and redelivered.
        q.nack(A, d.tag, false, true).unwrap();
        assert_eq!(name(&deliver(&mut q).message), "m1");
        assert_eq!(q.stats().purged, 2);
    }

    #[test]
    fn empty_queue_and_no_consumers() {
        let mut q = QueueState::new();
        assert!(q.is_empty());
        assert!(!q.has_consumers());
        assert!(q.next_delivery().is_none());
        q.publish(msg("m"));
        assert!(!q.is_empty());
        assert!(q.next_delivery().is_none(), "no consumer");
        q.add_consumer(A, AckMode::default(), 0).unwrap();
        assert_eq!(q.consumer_stats(A).unwrap().mode, AckMode::Manual);
        assert!(q.next_delivery().is_some());
        assert!(q.next_delivery().is_none(), "no message");
        assert_eq!(q.stats().consumers, 1);
    }

    /// A small deterministic generator (SplitMix64) for the soak test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn ten_thousand_messages_four_consumers_each_acked_once() {
        const MESSAGES: usize = 10_000;
        let consumers = [
            ConsumerId(10),
            ConsumerId(11),
            ConsumerId(12),
            ConsumerId(13),
        ];
        let mut q = QueueState::new();
        for id in consumers {
            q.add_consumer(id, AckMode::Manual, 16).unwrap();
        }
        let mut published = HashSet::new();
        let mut acked: HashMap<MessageId, u32> = HashMap::new();
        let mut held: HashMap<ConsumerId, BTreeMap<DeliveryTag, MessageId>> = HashMap::new();
        let mut rng = Rng(0x5EED);

        let mut sent = 0;
        while sent < MESSAGES || !q.is_empty() {
            // Publish in bursts so that deliveries interleave with publishing.
            for _ in 0..rng.below(40) {
                if sent < MESSAGES {
                    let m = Envelope::new(sent.to_string());
                    published.insert(m.id());
                    q.publish(m);
                    sent += 1;
                }
            }
            while let Some(d) = q.next_delivery() {
                let mine = held.entry(d.consumer).or_default();
                assert!(mine.len() < 16, "prefetch exceeded");
                mine.insert(d.tag, d.message.id());
            }
            // Each consumer settles some of what it holds, in varying ways.
            for id in consumers {
                let mine = held.entry(id).or_default();
                if mine.is_empty() {
                    continue;
                }
                let tags: Vec<_> = mine.keys().copied().collect();
                let tag = tags[rng.below(tags.len())];
                match rng.below(10) {
                    0..=4 => {
                        assert_eq!(q.ack(id, tag, false), Ok(1));
                        *acked.entry(mine.remove(&tag).unwrap()).or_default() += 1;
                    }
                    5..=7 => {
                        let upto: Vec<_> = mine.range(..=tag).map(|(t, _)| *t).collect();
                        assert_eq!(q.ack(id, tag, true), Ok(upto.len()));
                        for t in upto {
                            *acked.entry(mine.remove(&t).unwrap()).or_default() += 1;
                        }
                    }
                    8 => {
                        assert_eq!(q.nack(id, tag, false, true), Ok(1));
                        mine.remove(&tag);
                    }
                    _ => {
                        // Double settle attempts are refused.
                        assert_eq!(q.ack(id, tag, false), Ok(1));
                        *acked.entry(mine.remove(&tag).unwrap()).or_default() += 1;
                        assert_eq!(
                            q.ack(id, tag, false),
                            Err(SettleError::AlreadySettled { tag })
                        );
                    }
                }
            }
        }

        assert_eq!(acked.len(), MESSAGES);
        assert!(acked.values().all(|&n| n == 1));
        assert_eq!(acked.keys().copied().collect::<HashSet<_>>(), published);
        let stats = q.stats();
        assert_eq!(stats.published, MESSAGES as u64);
        assert_eq!(stats.acknowledged, MESSAGES as u64);
        assert_eq!(stats.delivered, MESSAGES as u64 + stats.redelivered);
        assert!(stats.requeued > 0 && stats.redelivered == stats.requeued);
        // Round-robin spreads the work evenly.
        for consumer in q.consumers() {
            let share = consumer.delivered as f64 / stats.delivered as f64;
            assert!((0.2..0.3).contains(&share), "{consumer:?}");
        }
    }

    mod model {
        //! Model-based property tests: random operation sequences run against the queue
        //! and a simple reference model, checking results and invariants after each step.

        use std::collections::{BTreeMap, HashMap, HashSet};

        use proptest::prelude::*;

        use super::super::*;
        use super::A;
        use crate::envelope::MessageId;

        #[derive(Clone, Copy, Debug)]
        enum TagPick {
            /// One of the chosen consumer's outstanding tags (by index), if it has any.
            Held(usize),
            /// Any number, often invalid.
            Raw(u64),
        }

        #[derive(Clone, Copy, Debug)]
        enum Settle {
            Ack,
            Requeue,
            Discard,
        }

        #[derive(Clone, Debug)]
        enum Op {
            Publish,
            Add {
                manual: bool,
                prefetch: u32,
                reuse: Option<usize>,
            },
            Remove(usize),
            Block(usize, bool),
            Deliver,
            Drain,
            Settle {
                consumer: usize,
                tag: TagPick,
                multiple: bool,
                how: Settle,
            },
            Purge,
        }

        fn op() -> impl Strategy<Value = Op> {
            let tag = prop_oneof![
                3 => any::<usize>().prop_map(TagPick::Held),
                1 => (0u64..40).prop_map(TagPick::Raw),
            ];
            let how = prop_oneof![
                Just(Settle::Ack),
                Just(Settle::Requeue),
                Just(Settle::Discard)
            ];
            prop_oneof![
                6 => Just(Op::Publish),
                2 => (any::<bool>(), 0u32..4, proptest::option::weighted(0.1, 0usize..8))
                    .prop_map(|(manual, prefetch, reuse)| Op::Add { manual, prefetch, reuse }),
                1 => (0usize..8).prop_map(Op::Remove),
                1 => (0usize..8, any::<bool>()).prop_map(|(c, b)| Op::Block(c, b)),
                5 => Just(Op::Deliver),
                1 => Just(Op::Drain),
                6 => (0usize..8, tag, any::<bool>(), how).prop_map(
                    |(consumer, tag, multiple, how)| Op::Settle { consumer, tag, multiple, how }
                ),
                1 => Just(Op::Purge),
            ]
        }

        struct MConsumer {
            id: ConsumerId,
            manual: bool,
            prefetch: u32,
            blocked: bool,
            removed: bool,
            /// Outstanding tags -> publish index.
            held: BTreeMap<u64, u64>,
        }

        impl MConsumer {
            fn eligible(&self) -> bool {
                !self.removed
                    && !self.blocked
                    && (!self.manual
                        || self.prefetch == 0
                        || self.held.len() < self.prefetch as usize)
            }
        }

        /// The reference model. Consumers are never deleted, only marked removed, so that
        /// "the next one after the last served, in registration order" is well defined.
        #[derive(Default)]
        struct Model {
            /// Publish index -> id, for ready messages.
            ready: BTreeMap<u64, MessageId>,
            ids: Vec<MessageId>,
            deliveries: HashMap<MessageId, u32>,
            consumers: Vec<MConsumer>,
            last_served: Option<usize>,
            last_tag: u64,
            stats: QueueStats,
        }

        impl Model {
            fn live(&self, id: ConsumerId) -> Option<usize> {
                self.consumers.iter().position(|c| c.id == id && !c.removed)
            }

            fn expected_consumer(&self) -> Option<usize> {
                let n = self.consumers.len();
                let start = self.last_served.map_or(0, |p| p + 1);
                (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&p| self.consumers[p].eligible())
            }

            fn check_settle(
                &self,
                id: ConsumerId,
                tag: u64,
                multiple: bool,
            ) -> Result<Vec<u64>, SettleError> {
                let Some(p) = self.live(id) else {
                    return Err(SettleError::UnknownConsumer(id));
                };
                let c = &self.consumers[p];
                let t = DeliveryTag(tag);
                if !c.manual {
                    return Err(SettleError::AutoAckConsumer(id));
                }
                if tag == 0 || tag > self.last_tag {
                    return Err(SettleError::UnknownTag { tag: t });
                }
                if !c.held.contains_key(&tag) {
                    return Err(
                        match self.consumers.iter().find(|o| o.held.contains_key(&tag)) {
                            Some(o) => SettleError::WrongConsumer {
                                tag: t,
                                owner: o.id,
                            },
                            None => SettleError::AlreadySettled { tag: t },
                        },
                    );
                }
                Ok(if multiple {
                    c.held.range(..=tag).map(|(t, _)| *t).collect()
                } else {
                    vec![tag]
                })
            }
        }

        struct Harness {
            queue: QueueState,
            model: Model,
            next_consumer: u64,
        }

        impl Harness {
            fn pick_consumer(&self, i: usize) -> ConsumerId {
                // One slot past the end is a consumer that never existed.
                self.model
                    .consumers
                    .get(i % (self.model.consumers.len() + 1))
                    .map_or(ConsumerId(u64::MAX), |c| c.id)
            }

            fn publish(&mut self) {
                let m = Envelope::new("m");
                let index = self.model.ids.len() as u64;
                self.model.ids.push(m.id());
                self.model.ready.insert(index, m.id());
                self.model.stats.published += 1;
                self.queue.publish(m);
            }

            fn deliver(&mut self) -> bool {
                let result = self.queue.next_delivery();
                let expected = if self.model.ready.is_empty() {
                    None
                } else {
                    self.model.expected_consumer()
                };
                let (Some(d), Some(p)) = (result.as_ref(), expected) else {
                    assert!(
                        result.is_none() && expected.is_none(),
                        "{result:?} vs {expected:?}"
                    );
                    return false;
                };
                let m = &mut self.model;
                // (d) and (e): the delivered message is the oldest ready one by original
                // publish position, so a requeued message comes before later publishes.
                let (index, id) = m.ready.pop_first().unwrap();
                assert_eq!(d.message.id(), id);
                let count = m.deliveries.entry(id).or_default();
                *count += 1;
                assert_eq!(d.message.delivery_count(), *count);
                assert_eq!(d.message.redelivered(), *count > 1);
                // Fair round-robin.
                let consumer = &mut m.consumers[p];
                assert_eq!(d.consumer, consumer.id);
                m.last_tag += 1;
                assert_eq!(d.tag, DeliveryTag(m.last_tag));
                m.last_served = Some(p);
                m.stats.delivered += 1;
                if *count > 1 {
                    m.stats.redelivered += 1;
                }
                if consumer.manual {
                    consumer.held.insert(m.last_tag, index);
                } else {
                    m.stats.acknowledged += 1;
                }
                true
            }

            fn apply(&mut self, op: &Op) {
                match *op {
                    Op::Publish => self.publish(),
                    Op::Add {
                        manual,
                        prefetch,
                        reuse,
                    } => {
                        let id = match reuse {
                            Some(i) if !self.model.consumers.is_empty() => self.pick_consumer(i),
                            _ => {
                                self.next_consumer += 1;
                                ConsumerId(self.next_consumer)
                            }
                        };
                        let mode = if manual {
                            AckMode::Manual
                        } else {
                            AckMode::Auto
                        };
                        let result = self.queue.add_consumer(id, mode, prefetch);
                        if self.model.live(id).is_some() {
                            assert_eq!(result, Err(ConsumerError::Duplicate(id)));
                        } else {
                            assert_eq!(result, Ok(()));
                            self.model.consumers.push(MConsumer {
                                id,
                                manual,
                                prefetch,
                                blocked: false,
                                removed: false,
                                held: BTreeMap::new(),
                            });
                        }
                    }
                    Op::Remove(i) => {
                        let id = self.pick_consumer(i);
                        let result = self.queue.remove_consumer(id);
                        match self.model.live(id) {
                            None => assert_eq!(result, Err(SettleError::UnknownConsumer(id))),
                            Some(p) => {
                                let c = &mut self.model.consumers[p];
                                c.removed = true;
                                let held = std::mem::take(&mut c.held);
                                assert_eq!(result, Ok(held.len()));
                                for index in held.into_values() {
                                    self.model
                                        .ready
                                        .insert(index, self.model.ids[index as usize]);
                                    self.model.stats.requeued += 1;
                                }
                            }
                        }
                    }
                    Op::Block(i, blocked) => {
                        let id = self.pick_consumer(i);
                        let result = self.queue.set_blocked(id, blocked);
                        match self.model.live(id) {
                            None => assert_eq!(result, Err(SettleError::UnknownConsumer(id))),
                            Some(p) => {
                                assert_eq!(result, Ok(()));
                                self.model.consumers[p].blocked = blocked;
                            }
                        }
                    }
                    Op::Deliver => {
                        self.deliver();
                    }
                    Op::Drain => while self.deliver() {},
                    Op::Settle {
                        consumer,
                        tag,
                        multiple,
                        how,
                    } => {
                        let id = self.pick_consumer(consumer);
                        let tag = match tag {
                            TagPick::Raw(t) => t,
                            TagPick::Held(i) => self
                                .model
                                .live(id)
                                .map(|p| &self.model.consumers[p].held)
                                .filter(|h| !h.is_empty())
                                .and_then(|h| h.keys().nth(i % h.len()).copied())
                                .unwrap_or(i as u64 % 40),
                        };
                        let expected = self.model.check_settle(id, tag, multiple);
                        let mut discarded = Vec::new();
                        let result = match how {
                            Settle::Ack => self.queue.ack(id, DeliveryTag(tag), multiple),
                            Settle::Requeue => {
                                self.queue.nack(id, DeliveryTag(tag), multiple, true)
                            }
                            Settle::Discard => {
                                self.queue
                                    .nack_with(id, DeliveryTag(tag), multiple, false, |m| {
                                        discarded.push(m.id())
                                    })
                            }
                        };
                        let tags = match expected {
                            Err(e) => {
                                assert_eq!(result, Err(e));
                                return;
                            }
                            Ok(tags) => tags,
                        };
                        assert_eq!(result, Ok(tags.len()));
                        let p = self.model.live(id).unwrap();
                        let mut expected_discards = Vec::new();
                        for t in tags {
                            let index = self.model.consumers[p].held.remove(&t).unwrap();
                            let mid = self.model.ids[index as usize];
                            match how {
                                Settle::Ack => self.model.stats.acknowledged += 1,
                                Settle::Requeue => {
                                    self.model.stats.requeued += 1;
                                    self.model.ready.insert(index, mid);
                                }
                                Settle::Discard => {
                                    self.model.stats.rejected += 1;
                                    expected_discards.push(mid);
                                }
                            }
                        }
                        assert_eq!(discarded, expected_discards);
                    }
                    Op::Purge => {
                        let n = self.model.ready.len();
                        self.model.ready.clear();
                        self.model.stats.purged += n as u64;
                        assert_eq!(self.queue.purge(), n);
                    }
                }
            }

            fn check_invariants(&self) {
                let q = &self.queue;
                let s = q.stats();
                // (a) Conservation.
                assert_eq!(
                    s.published,
                    (s.ready + s.unacked + s.delayed) as u64
                        + s.acknowledged
                        + s.rejected
                        + s.purged
                        + s.expired
                        + s.maxlen
                        + s.delivery_limit,
                    "{s:?}"
                );
                // Counters and sizes agree with the model.
                let live: Vec<_> = self.model.consumers.iter().filter(|c| !c.removed).collect();
                let expected = QueueStats {
                    ready: self.model.ready.len(),
                    unacked: live.iter().map(|c| c.held.len()).sum(),
                    consumers: live.len(),
                    // Every model message has the 1-byte payload "m".
                    ready_bytes: self.model.ready.len(),
                    ..self.model.stats
                };
                assert_eq!(s, expected);
                assert_eq!(q.ready_len(), s.ready);
                assert_eq!(q.unacked_len(), s.unacked);
                assert_eq!(q.is_empty(), s.ready == 0 && s.unacked == 0);
                assert_eq!(q.has_consumers(), s.consumers > 0);
                // Consumers, in registration order.
                let stats: Vec<_> = q.consumers().collect();
                assert_eq!(stats.len(), live.len());
                for (stat, model) in stats.iter().zip(&live) {
                    assert_eq!(stat.id, model.id);
                    assert_eq!(stat.unacked, model.held.len());
                    assert_eq!(stat.blocked, model.blocked);
                    // (b) Prefetch is never exceeded.
                    if stat.mode == AckMode::Manual && stat.prefetch > 0 {
                        assert!(stat.unacked <= stat.prefetch as usize, "{stat:?}");
                    }
                    assert_eq!(q.consumer_stats(stat.id).as_ref(), Some(stat));
                }
                // (c) Every message is in at most one place, and where the model says.
                let mut seen = HashSet::new();
                let mut last_seq = None;
                for e in &q.ready.entries {
                    assert!(
                        seen.insert(e.message.id()),
                        "duplicate {:?}",
                        e.message.id()
                    );
                    assert!(last_seq < Some(e.seq), "ready out of order");
                    last_seq = Some(e.seq);
                }
                for c in &q.consumers {
                    for e in c.unacked.values() {
                        assert!(
                            seen.insert(e.message.id()),
                            "duplicate {:?}",
                            e.message.id()
                        );
                    }
                }
                assert_eq!(seen.len(), s.ready + s.unacked);
                let ready_ids: Vec<_> = q.ready.entries.iter().map(|e| e.message.id()).collect();
                let model_ids: Vec<_> = self.model.ready.values().copied().collect();
                assert_eq!(ready_ids, model_ids);
                // The position index is consistent.
                assert_eq!(q.index.len(), q.consumers.len());
                for (p, c) in q.consumers.iter().enumerate() {
                    assert_eq!(q.index.get(&c.id), Some(&p));
                }
                assert!(q.cursor <= q.consumers.len());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn random_operations_keep_the_invariants(ops in proptest::collection::vec(op(), 0..250)) {
                let mut h = Harness { queue: QueueState::new(), model: Model::default(), next_consumer: 0 };
                for op in &ops {
                    h.apply(op);
                    h.check_invariants();
                }
            }

            /// (d) One consumer, no requeues: deliveries follow publish order exactly.
            #[test]
            fn single_consumer_without_requeue_delivers_in_publish_order(
                prefetch in 0u32..5,
                ops in proptest::collection::vec((0u8..6, any::<usize>(), any::<bool>()), 0..300),
            ) {
                let mut q = QueueState::new();
                q.add_consumer(A, AckMode::Manual, prefetch).unwrap();
                let mut published = Vec::new();
                let mut delivered = Vec::new();
                let mut held: Vec<DeliveryTag> = Vec::new();
                for (kind, pick, flag) in ops {
                    match kind {
                        0 | 1 => {
                            let m = Envelope::new("m");
                            published.push(m.id());
                            q.publish(m);
                        }
                        2 => {
                            if let Some(d) = q.next_delivery() {
                                prop_assert!(!d.message.redelivered());
                                delivered.push(d.message.id());
                                held.push(d.tag);
                            }
                        }
                        3 if !held.is_empty() => {
                            let i = pick % held.len();
                            if flag {
                                q.ack(A, held[i], true).unwrap();
                                held.drain(..=i);
                            } else {
                                q.reject(A, held[i], false).unwrap();
                                held.remove(i);
                            }
                        }
                        4 => q.set_blocked(A, flag).unwrap(),
                        5 if pick % 8 == 0 => {
                            // Purged messages are never delivered: drop them from the
                            // expected order too.
                            let n = q.purge();
                            let start = published.len() - n;
                            published.truncate(start);
                        }
                        _ => {}
                    }
                }
                // Everything delivered was delivered in publish order.
                let order: HashMap<MessageId, usize> =
                    published.iter().enumerate().map(|(i, id)| (*id, i)).collect();
                let positions: Vec<_> = delivered.iter().map(|id| order[id]).collect();
                prop_assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
                prop_assert_eq!(positions, (0..delivered.len()).collect::<Vec<_>>());
            }
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use std::time::Duration;

    use super::*;

    const C: ConsumerId = ConsumerId(1);

    fn payload(m: &Envelope) -> &[u8] {
        m.payload().as_ref()
    }

    fn dead(q: &mut QueueState) -> Vec<(String, DeathReason)> {
        q.drain_dead()
            .map(|d| {
                (
                    String::from_utf8_lossy(payload(&d.message)).into_owned(),
                    d.reason,
                )
            })
            .collect()
    }

    #[test]
    fn ttl_smaller_of_queue_and_message_expires_at_head_and_survives_requeue() {
        let mut q = QueueState::with_policy(QueuePolicy {
            message_ttl_ms: Some(1000),
            ..Default::default()
        });
        q.advance_to(10_000);
        q.publish(Envelope::new("long"));
        q.publish(Envelope::new("short").with_expiration(Duration::from_millis(100)));
        q.publish(Envelope::new("capped").with_expiration(Duration::from_secs(60)));
        assert_eq!(q.next_deadline(), Some(11_000), "the head's expiry");
        // At 10_500 "short" has expired but is not at the head: it stays (as in RabbitMQ).
        q.advance_to(10_500);
        assert_eq!(q.stats().ready, 3);
        // A consumer takes "long"; nacking it back does not reset its clock.
        q.add_consumer(C, AckMode::Manual, 1).unwrap();
        let long = q.next_delivery().unwrap();
        assert_eq!(payload(&long.message), b"long");
        // Now "short" is the head and expired: removed, never delivered.
        q.advance_to(10_600);
        assert_eq!(dead(&mut q), vec![("short".into(), DeathReason::Expired)]);
        q.nack(C, long.tag, false, true).unwrap();
        q.advance_to(11_000);
        // "long" (1 s from 10_000) and "capped" (queue TTL 1 s beats 60 s) are both gone.
        assert_eq!(q.next_delivery().map(|d| d.tag), None);
        assert_eq!(
            dead(&mut q),
            vec![
                ("long".into(), DeathReason::Expired),
                ("capped".into(), DeathReason::Expired)
            ]
        );
        let s = q.stats();
        assert_eq!((s.expired, s.ready, s.delivered), (3, 0, 1));
    }

    #[test]
    fn drop_head_and_reject_publish() {
        let mut q = QueueState::with_policy(QueuePolicy {
            max_length: Some(2),
            ..Default::default()
        });
        for m in ["a", "b", "c"] {
            assert!(matches!(q.publish(Envelope::new(m)), Publish::Enqueued));
        }
        assert_eq!(dead(&mut q), vec![("a".into(), DeathReason::MaxLen)]);
        assert_eq!((q.stats().ready, q.stats().maxlen), (2, 1));

        let mut q = QueueState::with_policy(QueuePolicy {
            max_length_bytes: Some(5),
            overflow: Overflow::RejectPublish,
            ..Default::default()
        });
        assert!(matches!(q.publish(Envelope::new("abc")), Publish::Enqueued));
        match q.publish(Envelope::new("def")) {
            Publish::Refused(m) => assert_eq!(payload(&m), b"def"),
            Publish::Enqueued => panic!("6 bytes > 5"),
        }
        assert!(matches!(q.publish(Envelope::new("de")), Publish::Enqueued));
        let s = q.stats();
        assert_eq!(
            (s.ready, s.ready_bytes, s.refused, s.published),
            (2, 5, 1, 2)
        );
        assert!(
            !q.has_dead(),
            "a refused message is handed back, not dead-lettered"
        );
    }

    #[test]
    fn delivery_limit_dead_letters_instead_of_requeueing() {
        let mut q = QueueState::with_policy(QueuePolicy {
            delivery_limit: Some(2),
            ..Default::default()
        });
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.publish(Envelope::new("poison"));
        let first = q.next_delivery().unwrap();
        q.nack(C, first.tag, false, true).unwrap();
        let second = q.next_delivery().unwrap();
        assert_eq!(second.message.delivery_count(), 2);
        // Returned after its 2nd delivery: over the limit.
        q.remove_consumer(C).unwrap();
        assert_eq!(
            dead(&mut q),
            vec![("poison".into(), DeathReason::DeliveryLimit)]
        );
        let s = q.stats();
        assert_eq!((s.ready, s.requeued, s.delivery_limit), (0, 1, 1));
    }

    #[test]
    fn rejected_messages_go_to_the_outbox() {
        let mut q = QueueState::new();
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.publish(Envelope::new("x"));
        q.publish(Envelope::new("y"));
        let _x = q.next_delivery().unwrap();
        let y = q.next_delivery().unwrap();
        q.nack(C, y.tag, true, false).unwrap();
        assert_eq!(
            dead(&mut q),
            vec![
                ("x".into(), DeathReason::Rejected),
                ("y".into(), DeathReason::Rejected)
            ]
        );
        assert!(!q.has_dead());
    }

    #[test]
    fn delayed_nack_comes_back_at_its_position_only_when_due() {
        let mut q = QueueState::new();
        q.add_consumer(C, AckMode::Manual, 0).unwrap();
        q.advance_to(1000);
        q.publish(Envelope::new("first"));
        q.publish(Envelope::new("second"));
        let first = q.next_delivery().unwrap();
        q.nack_delayed(C, first.tag, false, 1500).unwrap();
        assert_eq!((q.stats().delayed, q.stats().ready), (1, 1));
        assert_eq!(q.next_deadline(), Some(1500));
        let second = q.next_delivery().unwrap();
        assert_eq!(payload(&second.message), b"second");
        q.advance_to(1499);
        assert!(q.next_delivery().is_none(), "not before it is due");
        q.advance_to(1500);
        let again = q.next_delivery().unwrap();
        assert_eq!(payload(&again.message), b"first");
        assert!(again.message.redelivered());
        assert_eq!(q.stats().delayed, 0);
        assert!(!q.is_empty());
    }
}
