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
//! use postbox_actors::Envelope;
//! use postbox_actors::queue::state::QueueState;
//! use postbox_actors::{AckMode, ConsumerId};
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

use crate::envelope::{DeathReason, Envelope};
use crate::queue::ack::{AckMode, ConsumerId, DeliveryTag};
use crate::queue::policy::{Overflow, QueuePolicy, ShedAction, Shedding};
use crate::queue::spill::Spill;
use crate::queue::stats::{ConsumerStats, QueueStats};
use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

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
    /// Where the message is stored (0: not persisted).
    pub loc: u64,
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
    /// The queue is full and its overflow is drop-new: the message went to
    /// the dead letters (reason `maxlen`).
    Dropped,
}

/// Milliseconds of a duration, saturating.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
    /// An exclusive consumer was asked for on a queue that has consumers, or
    /// a consumer on a queue that has an exclusive one (RabbitMQ's
    /// `ACCESS_REFUSED` to `basic.consume`).
    #[error(
        "the queue has an exclusive consumer, or consumers an exclusive one cannot join ({0} registered)"
    )]
    Exclusive(usize),
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

/// The expiry of a TTL-0 message that a consumer could take when it was
/// published: it does not expire while it waits for that delivery, but a
/// requeue expires it (its time was up when it was published).
const IMMEDIATE: u64 = u64::MAX - 1;

/// The in-memory length of a spilling queue with no length limit.
const DEFAULT_IN_MEMORY: usize = 10_000;

/// From this many consumers on, a queue finds one by id through a hash map
/// (the same threshold as the queue actor's `ById`);
/// below, by scanning them. A count going up and down across it rebuilds
/// an index of 8 entries each time: cheaper than the registration that
/// caused it, so no hysteresis.
const INDEXED_FROM: usize = crate::queue::by_id::MANY;

/// The ready messages, ordered by publish sequence number: in a priority
/// queue, by priority (highest first), then by sequence number.
///
/// With a [`Spill`], only the head is in `entries` (up to the in-memory
/// limits); the rest is on disk, after it in order, and is read back as the
/// head drains (the head is never empty while anything is spilled).
#[derive(Debug, Default)]
struct Ready {
    // Invariant: sorted by strictly increasing `seq`. In a priority queue,
    // the messages of priority 0.
    entries: VecDeque<Entry>,
    /// A priority queue's messages of priorities 1 to its maximum (at index
    /// priority - 1), each level sorted by `seq`; empty for other queues.
    levels: Vec<VecDeque<Entry>>,
    /// Ready messages in `levels`.
    in_levels: usize,
    /// Sum of the payload sizes, for byte length limits (spilled included).
    bytes: usize,
    spill: Option<Box<Spilling>>,
    /// Where each persisted message in memory (ready, delayed or
    /// unacknowledged) has its publish record in the durable store, by
    /// sequence number (see [`QueueState::publish_persisted`]). A side table
    /// rather than a field of every entry: entries are moved at every
    /// publish and delivery, and in-memory queues (most) never need it.
    stored: FxHashMap<u64, u64>,
}

/// A spilling queue's tail and its in-memory limits.
#[derive(Debug)]
struct Spilling {
    tail: Spill,
    max_len: usize,
    max_bytes: usize,
}

impl Ready {
    fn len(&self) -> usize {
        self.entries.len() + self.in_levels + self.spill.as_ref().map_or(0, |s| s.tail.len())
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.in_levels == 0
    }

    /// The level a message of a priority queue waits in (`None`: priority 0,
    /// or not a priority queue): its priority, capped at the maximum.
    #[inline]
    fn level_of(&self, message: &Envelope) -> Option<usize> {
        if self.levels.is_empty() || message.priority() == 0 {
            return None;
        }
        Some(usize::from(message.priority()).min(self.levels.len()) - 1)
    }

    /// The highest non-empty priority level.
    #[inline]
    fn top_level(&self) -> Option<usize> {
        if self.in_levels == 0 {
            return None;
        }
        self.levels.iter().rposition(|l| !l.is_empty())
    }

    /// Appends a newly published message (its seq is the highest so far).
    #[inline]
    fn push(&mut self, entry: Entry) {
        self.bytes += entry.message.size();
        if let Some(level) = self.level_of(&entry.message) {
            self.in_levels += 1;
            return self.levels[level].push_back(entry);
        }
        if self.spill.is_some() {
            return self.push_spilling(entry);
        }
        self.entries.push_back(entry);
    }

    /// [`push`](Self::push) for a spilling queue: to the tail on disk once
    /// the in-memory limits are reached (or anything is there already).
    #[inline(never)]
    fn push_spilling(&mut self, entry: Entry) {
        if let Some(s) = &mut self.spill {
            let in_memory = self.bytes - s.tail.bytes();
            if s.tail.len() > 0 || self.entries.len() >= s.max_len || in_memory > s.max_bytes {
                let loc = self.stored.remove(&entry.seq).unwrap_or(0);
                s.tail
                    .push(entry.seq, entry.expires_at, loc, &entry.message);
                return;
            }
        }
        self.entries.push_back(entry);
    }

    /// The message to deliver next.
    fn head(&self) -> Option<&Entry> {
        match self.top_level() {
            Some(level) => self.levels[level].front(),
            None => self.entries.front(),
        }
    }

    /// Takes the message to deliver next.
    #[inline]
    fn pop(&mut self) -> Option<Entry> {
        if let Some(level) = self.top_level() {
            let entry = self.levels[level].pop_front()?;
            self.in_levels -= 1;
            self.bytes -= entry.message.size();
            return Some(entry);
        }
        let entry = self.entries.pop_front()?;
        self.bytes -= entry.message.size();
        if self.spill.is_some() {
            self.read_back();
        }
        Some(entry)
    }

    /// For a spilling queue whose head ran low: reads back a batch of the
    /// tail, half the in-memory limit at a time.
    #[inline(never)]
    fn read_back(&mut self) {
        if let Some(s) = &mut self.spill
            && s.tail.len() > 0
            && self.entries.len() <= s.max_len / 2
        {
            let room = s.max_len - self.entries.len();
            let (entries, stored) = (&mut self.entries, &mut self.stored);
            s.tail.pop_into(room.max(1), &mut |m| {
                if m.loc != 0 {
                    stored.insert(m.seq, m.loc);
                }
                entries.push_back(Entry {
                    seq: m.seq,
                    message: m.message,
                    expires_at: m.expires_at,
                });
            });
        }
    }

    /// Puts a previously delivered message back at its original position. Requeued
    /// messages are old, so the position is near the head and the insert cheap.
    fn requeue(&mut self, entry: Entry) {
        self.bytes += entry.message.size();
        let entries = match self.level_of(&entry.message) {
            Some(level) => {
                self.in_levels += 1;
                &mut self.levels[level]
            }
            None => &mut self.entries,
        };
        let at = entries.partition_point(|e| e.seq < entry.seq);
        entries.insert(at, entry);
    }

    /// The store locations of the persisted ready messages.
    fn locs(&mut self) -> Vec<u64> {
        let mut locs: Vec<u64> = if self.stored.is_empty() {
            Vec::new()
        } else {
            self.entries
                .iter()
                .chain(self.levels.iter().flatten())
                .filter_map(|e| self.stored.get(&e.seq).copied())
                .collect()
        };
        if let Some(s) = &mut self.spill {
            locs.extend(s.tail.locs());
        }
        locs
    }

    /// Drops every ready message; returns how many there were.
    fn clear(&mut self) -> usize {
        let n = self.len();
        if !self.stored.is_empty() {
            for e in self.entries.iter().chain(self.levels.iter().flatten()) {
                self.stored.remove(&e.seq);
            }
        }
        self.entries.clear();
        self.levels.iter_mut().for_each(VecDeque::clear);
        self.in_levels = 0;
        crate::spare::release(&mut self.entries);
        if let Some(s) = &mut self.spill {
            s.tail.clear();
        }
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
    /// Cancelled: it gets nothing more, and keeps what it holds until settled.
    cancelled: bool,
    /// Registered with the exclusive flag: no other consumer may join.
    exclusive: bool,
    /// Registered for `basic.get` only (see [`QueueState::add_fetcher`]).
    fetcher: bool,
    /// Whether it is in the queue's `active` line.
    in_line: bool,
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
        self.slots.iter().filter_map(|(_, e)| e.as_ref())
    }
}

impl Consumer {
    /// Whether the consumer may receive a delivery now.
    fn can_take(&self) -> bool {
        !self.blocked
            && !self.cancelled
            && match self.mode {
                AckMode::Auto => true,
                // u32 -> usize is lossless on the 32- and 64-bit targets std runs on.
                AckMode::Manual => {
                    self.prefetch == 0 || self.unacked.len() < self.prefetch as usize
                }
            }
    }

    /// How many more deliveries it could take now (`usize::MAX`: no limit).
    fn room(&self) -> usize {
        if self.blocked || self.cancelled {
            return 0;
        }
        match self.mode {
            AckMode::Manual if self.prefetch > 0 => {
                (self.prefetch as usize).saturating_sub(self.unacked.len())
            }
            _ => usize::MAX,
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
            active: false,
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
    shed: u64,
}

/// A queue's complete state: ready messages, consumers, and outstanding deliveries.
///
/// See the [module documentation](self) for the semantics and an example.
#[derive(Debug, Default)]
pub struct QueueState {
    ready: Ready,
    /// In registration order.
    consumers: Vec<Consumer>,
    /// Position of each consumer in `consumers`, for O(1) settles, once
    /// there are [`INDEXED_FROM`] of them (empty before: see
    /// [`QueueState::find`]).
    index: FxHashMap<ConsumerId, usize>,
    /// The consumers in line for deliveries (their positions in `consumers`),
    /// in the order they became able to take one (RabbitMQ's active
    /// consumers): the front is served next and goes to the back. One found
    /// unable to take is dropped from the line (blocked) and rejoins at the
    /// back once it can again.
    active: VecDeque<usize>,
    /// Sequence number of the next published message.
    next_seq: u64,
    /// Persisted messages held (ready, delayed or unacknowledged).
    persisted: usize,
    /// The last delivery tag issued; 0 before the first delivery.
    last_tag: u64,
    /// Outstanding deliveries across all consumers.
    unacked: usize,
    counters: Counters,
    policy: QueuePolicy,
    /// The driver's clock (epoch ms), as last told by [`QueueState::advance_to`].
    now_ms: u64,
    /// With a single active consumer: the one that has the queue now, kept
    /// while it is registered and either not cancelled or still holding
    /// deliveries.
    holder: Option<ConsumerId>,
    /// Nacked-with-delay messages, by (due time, seq).
    delayed: BTreeMap<(u64, u64), Entry>,
    /// Messages removed for a dead-letter reason, waiting for the driver.
    dead: Vec<DeadLetter>,
    /// What happened to persisted messages, for the driver to record.
    /// Boxed, and made at the first: most queues persist nothing.
    journal: Option<Box<Journal>>,
}

/// The persisted messages that left the queue, and those delivered, since
/// the driver last took them ([`QueueState::take_journal`]): what a durable
/// queue's driver writes to its store. Messages are named by the store
/// location the driver gave them when they were published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Journal {
    /// Persisted messages that left the queue: acknowledged, discarded,
    /// expired, dropped, dead-lettered, purged, or delivered in auto mode.
    pub settled: Vec<u64>,
    /// Persisted messages delivered (in manual mode) once more each.
    pub delivered: Vec<u64>,
}

impl Journal {
    /// Nothing to record.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.settled.is_empty() && self.delivered.is_empty()
    }
}

impl QueueState {
    /// An empty queue with no consumers.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue with limits. With [`Overflow::Spill`], the tail past
    /// the limits is paged out to the system's temporary directory (see
    /// [`spill_to`](Self::spill_to)).
    #[must_use]
    pub fn with_policy(policy: QueuePolicy) -> Self {
        let mut state = QueueState {
            policy,
            ..Self::default()
        };
        if let Some(max) = state.policy.max_priority.filter(|m| *m > 0) {
            state.ready.levels = (0..max).map(|_| VecDeque::new()).collect();
        }
        if state.policy.overflow == Overflow::Spill {
            state.spill_to(std::env::temp_dir());
        }
        state
    }

    /// Pages the tail past the in-memory limits out to anonymous files in
    /// `dir` (the policy's length limits, 10,000 messages when none is
    /// set), whatever the overflow policy. Call it before publishing.
    pub fn spill_to(&mut self, dir: std::path::PathBuf) {
        self.ready.spill = Some(Box::new(Spilling {
            tail: Spill::new(dir),
            max_len: self.policy.max_length.unwrap_or(DEFAULT_IN_MEMORY).max(1),
            max_bytes: self.policy.max_length_bytes.unwrap_or(usize::MAX),
        }));
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
        self.publish_persisted(message, |_, _, _| 0)
    }

    /// [`publish`](Self::publish), persisting the message once it is in the
    /// queue: `persist(seq, expires_at, message)` stores it and returns where
    /// (a non-zero location), before length limits or a TTL of 0 may remove
    /// it again. From then on the queue reports what happens to it in its
    /// [`Journal`]. A refused message is not persisted.
    pub fn publish_persisted(
        &mut self,
        message: Envelope,
        persist: impl FnOnce(u64, u64, &Envelope) -> u64,
    ) -> Publish {
        if let Some(shed) = self.policy.shed
            && message.priority() < shed.below_priority
            && self.overloaded(&shed)
        {
            return self.shed(message, shed.action, persist);
        }
        let (max_len, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        if self.policy.overflow == Overflow::DropNew && !self.has_room_for(&message) {
            // Accepted, then dropped: counted as published, as drop-head.
            self.counters.published += 1;
            self.counters.maxlen += 1;
            self.dead.push(DeadLetter {
                message,
                reason: DeathReason::MaxLen,
            });
            return Publish::Dropped;
        }
        if matches!(
            self.policy.overflow,
            Overflow::RejectPublish | Overflow::RejectPublishDlx
        ) {
            let full_len = max_len.is_some_and(|max| self.ready.len() >= max);
            let full_bytes = max_bytes.is_some_and(|max| self.ready.bytes + message.size() > max);
            if full_len || full_bytes {
                self.counters.refused += 1;
                if self.policy.overflow == Overflow::RejectPublishDlx {
                    // Refused, and dead-lettered: the publisher is told, and a
                    // copy goes to the dead-letter exchange.
                    self.counters.maxlen += 1;
                    self.dead.push(DeadLetter {
                        message: message.clone(),
                        reason: DeathReason::MaxLen,
                    });
                }
                return Publish::Refused(message);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counters.published += 1;
        let expires_at = self.expiry(&message);
        let loc = persist(seq, expires_at, &message);
        self.store_at(seq, loc);
        self.ready.push(Entry {
            seq,
            message,
            expires_at,
        });
        self.after_publish(expires_at);
        Publish::Enqueued
    }

    /// Whether `message` fits within the length limits now. An empty queue
    /// takes any message, so that one larger than `max_length_bytes` (or a
    /// limit of 0) cannot wait for ever under [`Overflow::Block`].
    pub fn has_room_for(&self, message: &Envelope) -> bool {
        let (max_len, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        self.ready.is_empty()
            || (max_len.is_none_or(|max| self.ready.len() < max)
                && max_bytes.is_none_or(|max| self.ready.bytes + message.size() <= max))
    }

    /// Bytes of the ready messages held in memory (not those spilled to
    /// disk): what the queue charges the broker's memory budget.
    #[must_use]
    pub fn bytes_in_memory(&self) -> usize {
        self.ready.bytes - self.ready.spill.as_ref().map_or(0, |s| s.tail.bytes())
    }

    /// Whether the queue is overloaded by `shed`'s thresholds.
    fn overloaded(&self, shed: &Shedding) -> bool {
        shed.depth.is_some_and(|d| self.ready.len() >= d)
            || shed.age_ms.is_some_and(|max| {
                self.ready
                    .head()
                    .is_some_and(|e| self.now_ms.saturating_sub(e.message.timestamp_ms()) >= max)
            })
    }

    /// Sheds a publish: drops, dead-letters or defers it.
    fn shed(
        &mut self,
        message: Envelope,
        action: ShedAction,
        persist: impl FnOnce(u64, u64, &Envelope) -> u64,
    ) -> Publish {
        self.counters.published += 1;
        match action {
            ShedAction::Drop => {
                self.counters.shed += 1;
                Publish::Dropped
            }
            ShedAction::DeadLetter => {
                self.counters.shed += 1;
                self.dead.push(DeadLetter {
                    message,
                    reason: DeathReason::Shed,
                });
                Publish::Dropped
            }
            ShedAction::Defer(delay_ms) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let expires_at = self.expiry(&message);
                let loc = persist(seq, expires_at, &message);
                self.store_at(seq, loc);
                let due = self.now_ms.saturating_add(delay_ms);
                self.delayed.insert(
                    (due, seq),
                    Entry {
                        seq,
                        message,
                        expires_at,
                    },
                );
                Publish::Enqueued
            }
        }
    }

    /// Whether the ready messages reach a length limit.
    pub fn at_limit(&self) -> bool {
        let (max_len, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        !self.ready.is_empty()
            && (max_len.is_some_and(|max| self.ready.len() >= max)
                || max_bytes.is_some_and(|max| self.ready.bytes >= max))
    }

    /// When `message`, published now, expires (per-message and per-queue TTL).
    fn expiry(&self, message: &Envelope) -> u64 {
        let ttl = match (self.policy.message_ttl_ms, message.expiration()) {
            (Some(q), Some(m)) => Some(q.min(millis(m))),
            (q, m) => q.or(m.map(millis)),
        };
        match ttl {
            // TTL 0, as RabbitMQ: delivered if a consumer can take it at once,
            // expired otherwise.
            Some(0) if self.ready.len() < self.room_now() => IMMEDIATE,
            // Saturating: a TTL reaching past the end of time never expires.
            Some(ttl) => self.now_ms.saturating_add(ttl),
            None => NEVER,
        }
    }

    /// Length limits and TTL 0 after a message entered the ready queue.
    fn after_publish(&mut self, expires_at: u64) {
        // Drop-head: the oldest make room (the new message itself, if it alone is too big).
        self.drop_head();
        if expires_at == IMMEDIATE || expires_at == self.now_ms {
            // A TTL-0 message nobody can take now goes at once.
            self.expire();
        }
    }

    /// Reserves sequence numbers (queue positions) for `messages`, to be
    /// published later with [`publish_reserved`](Self::publish_reserved)
    /// once they are stored elsewhere (a transaction's commit): returns each
    /// one's `(seq, expires_at)`. A reservation never published is a gap.
    pub fn reserve<'a>(
        &mut self,
        messages: impl IntoIterator<Item = &'a Envelope>,
    ) -> Vec<(u64, u64)> {
        messages
            .into_iter()
            .map(|message| {
                let seq = self.next_seq;
                self.next_seq += 1;
                // IMMEDIATE is decided at enqueue; here a TTL of 0 means now.
                let expires_at = match self.expiry(message) {
                    IMMEDIATE => self.now_ms,
                    at => at,
                };
                (seq, expires_at)
            })
            .collect()
    }

    /// Enqueues a message at a position reserved by [`reserve`](Self::reserve),
    /// stored at `loc`: among the ready messages by `seq`, as a requeued one.
    /// Length limits apply as for [`publish`](Self::publish) (drop-head; a
    /// reject-publish queue cannot take part in a transaction).
    pub fn publish_reserved(&mut self, seq: u64, expires_at: u64, message: Envelope, loc: u64) {
        self.counters.published += 1;
        self.store_at(seq, loc);
        self.ready.requeue(Entry {
            seq,
            message,
            expires_at,
        });
        self.after_publish(expires_at);
    }

    /// Puts back messages recovered from a durable store, in their publish
    /// order, as ready messages: `(seq, expires_at, message, loc)`, with the
    /// message's delivery count as of the crash. Messages published from now
    /// on come after them.
    pub fn restore(&mut self, messages: impl IntoIterator<Item = (u64, u64, Envelope, u64)>) {
        for (seq, expires_at, message, loc) in messages {
            let last = seq >= self.next_seq;
            self.store_at(seq, loc);
            self.next_seq = self.next_seq.max(seq.saturating_add(1));
            let entry = Entry {
                seq,
                message,
                expires_at,
            };
            // In order, whatever order they come in; the newest at the tail
            // (where a spilling queue pages it out).
            if last {
                self.ready.push(entry);
            } else {
                self.ready.requeue(entry);
            }
        }
    }

    /// Takes what the queue recorded of its persisted messages since the
    /// last call.
    pub fn take_journal(&mut self) -> Journal {
        // The box stays, for the next records.
        self.journal
            .as_deref_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether the journal has anything to take.
    #[must_use]
    pub fn has_journal(&self) -> bool {
        self.journal.as_deref().is_some_and(|j| !j.is_empty())
    }

    /// The store locations of every persisted message the queue holds
    /// (ready, delayed and unsettled): what a deleted durable queue settles.
    pub fn persisted(&mut self) -> Vec<u64> {
        // Those in memory are in the side table; the spilled ones on disk.
        let mut locs: Vec<u64> = self.ready.stored.values().copied().collect();
        if let Some(s) = &mut self.ready.spill {
            locs.extend(s.tail.locs());
        }
        locs
    }

    /// Records where message `seq` is stored (0: it is not).
    #[inline]
    fn store_at(&mut self, seq: u64, loc: u64) {
        if loc != 0 {
            self.ready.stored.insert(seq, loc);
            self.persisted += 1;
        }
    }

    /// Forgets where message `seq` is stored, which is returned (0: nowhere).
    #[inline]
    fn unstore(&mut self, seq: u64) -> u64 {
        if self.ready.stored.is_empty() {
            return 0;
        }
        self.ready.stored.remove(&seq).unwrap_or(0)
    }

    /// A message leaves the queue: its store location goes to the journal.
    #[inline]
    fn take(&mut self, entry: Entry) -> Envelope {
        let loc = self.unstore(entry.seq);
        if loc != 0 {
            self.journal.get_or_insert_default().settled.push(loc);
            self.persisted -= 1;
        }
        entry.message
    }

    /// How many messages the consumers could take right now (`usize::MAX`:
    /// no limit).
    fn room_now(&self) -> usize {
        self.consumers
            .iter()
            .map(Consumer::room)
            .fold(0usize, usize::saturating_add)
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
        self.trim_after_requeue();
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
            let message = self.take(entry);
            self.dead.push(DeadLetter {
                message,
                reason: DeathReason::Expired,
            });
        }
        n
    }

    /// Whether the ready backlog's buffer is mostly unused (it drained from a
    /// large backlog): the driver may [`release_spare`](Self::release_spare)
    /// it, ideally once it has stayed so for a while.
    #[must_use]
    pub fn has_spare(&self) -> bool {
        crate::spare::is_spare(&self.ready.entries)
    }

    /// Gives back what the ready backlog's buffer does not need.
    pub fn release_spare(&mut self) {
        crate::spare::release(&mut self.ready.entries);
    }

    /// When the driver should next call [`advance_to`](Self::advance_to): the
    /// earliest of the head's expiry and the next delayed message's due time.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        let head = self
            .ready
            .head()
            .map(|e| e.expires_at)
            .filter(|t| *t != NEVER && *t != IMMEDIATE);
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
        self.register(id, mode, prefetch, false, false)
    }

    /// Registers an exclusive consumer (RabbitMQ's `exclusive` flag of
    /// `basic.consume`): refused if the queue has consumers (cancelled ones
    /// still settling count), and while it is registered no other consumer
    /// may join ([`add_consumer`](Self::add_consumer) fails with
    /// [`ConsumerError::Exclusive`]). `basic.get` is not a consumer: see
    /// [`add_fetcher`](Self::add_fetcher).
    ///
    /// # Errors
    /// [`ConsumerError::Duplicate`] if `id` is already registered,
    /// [`ConsumerError::Exclusive`] if the queue has consumers.
    pub fn add_exclusive_consumer(
        &mut self,
        id: ConsumerId,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<(), ConsumerError> {
        self.register(id, mode, prefetch, true, false)
    }

    /// Registers a cancelled consumer for [`fetch`](Self::fetch)
    /// (`basic.get`): it never receives deliveries from the line, does not
    /// count as a consumer, and is not refused by an exclusive consumer.
    ///
    /// # Errors
    /// [`ConsumerError::Duplicate`] if `id` is already registered.
    pub fn add_fetcher(&mut self, id: ConsumerId, mode: AckMode) -> Result<(), ConsumerError> {
        self.register(id, mode, 0, false, true)
    }

    fn register(
        &mut self,
        id: ConsumerId,
        mode: AckMode,
        prefetch: u32,
        exclusive: bool,
        fetcher: bool,
    ) -> Result<(), ConsumerError> {
        if self.find(id).is_some() {
            return Err(ConsumerError::Duplicate(id));
        }
        if !fetcher {
            // Consumers present: not cancelled, or cancelled and still
            // settling (fetchers are cancelled from the start).
            let present = self
                .consumers
                .iter()
                .filter(|c| !c.fetcher && (!c.cancelled || c.unacked.len() > 0));
            let (count, taken) = present.fold((0, false), |(n, t), c| (n + 1, t || c.exclusive));
            if taken || (exclusive && count > 0) {
                return Err(ConsumerError::Exclusive(count));
            }
        }
        // Most queues have one consumer: the first takes room for one (a
        // Vec or VecDeque would take four).
        if self.consumers.capacity() == 0 {
            self.consumers.reserve_exact(1);
        }
        self.consumers.push(Consumer {
            id,
            mode,
            prefetch,
            blocked: false,
            cancelled: fetcher,
            exclusive,
            fetcher,
            in_line: !fetcher,
            delivered: 0,
            unacked: Unacked::default(),
        });
        match self.consumers.len() {
            n if n < INDEXED_FROM => {}
            INDEXED_FROM => {
                let ids = self.consumers.iter().enumerate();
                self.index = ids.map(|(position, c)| (c.id, position)).collect();
            }
            n => {
                self.index.insert(id, n - 1);
            }
        }
        if !fetcher {
            if self.active.capacity() == 0 {
                self.active.reserve_exact(1);
            }
            self.active.push_back(self.consumers.len() - 1);
        }
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
        if self.holder == Some(id) {
            self.holder = None;
        }
        let removed = self.consumers.remove(index);
        if self.consumers.len() < INDEXED_FROM {
            self.index = FxHashMap::default();
        } else {
            self.index.remove(&id);
            for (position, consumer) in self.consumers.iter().enumerate().skip(index) {
                self.index.insert(consumer.id, position);
            }
        }
        // Positions after the removed one moved down by one.
        self.active.retain(|p| *p != index);
        for p in &mut self.active {
            if *p > index {
                *p -= 1;
            }
        }
        let requeued = removed.unacked.len();
        self.unacked -= requeued;
        for entry in removed.unacked.into_values() {
            self.requeue(entry);
        }
        self.trim_after_requeue();
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
        self.rejoin(index);
        Ok(())
    }

    /// Cancels a consumer, as RabbitMQ's `basic.cancel`: it gets no more
    /// deliveries, and the ones it holds stay settleable (remove it to requeue
    /// them). Returns how many it holds.
    ///
    /// # Errors
    /// [`SettleError::UnknownConsumer`] if `id` is not registered.
    pub fn cancel_consumer(&mut self, id: ConsumerId) -> Result<usize, SettleError> {
        let index = self.position(id)?;
        let consumer = &mut self.consumers[index];
        consumer.cancelled = true;
        Ok(consumer.unacked.len())
    }

    /// Puts a consumer that can take deliveries again back in line, at the
    /// back (a consumer already in line keeps its place).
    fn rejoin(&mut self, index: usize) {
        if let Some(consumer) = self.consumers.get_mut(index)
            && !consumer.in_line
            && consumer.can_take()
        {
            consumer.in_line = true;
            self.active.push_back(index);
        }
    }

    /// Decides the next delivery: the head ready message, for the consumer at the
    /// front of the line.
    ///
    /// Consumers are served as RabbitMQ serves them: each in turn, in the order they
    /// became able to take a delivery. The one served goes to the back of the line;
    /// one found unable to take (blocked, or at its prefetch limit in manual mode)
    /// leaves the line, and rejoins it at the back once it can take again (after a
    /// settlement, or when unblocked). The returned message carries its new delivery
    /// count and `redelivered` flag. In manual mode the queue keeps a copy until the
    /// delivery is settled; in auto mode the delivery is settled (acknowledged) at
    /// once.
    ///
    /// Returns `None` when no message is ready or no consumer can take one. Call it
    /// until it returns `None` after anything that may enable a delivery (publish,
    /// settle, new or unblocked consumer).
    pub fn next_delivery(&mut self) -> Option<Dispatch> {
        self.expire();
        if self.ready.is_empty() {
            return None;
        }
        if self.policy.single_active_consumer {
            let index = self.single_active()?;
            if !self.consumers.get(index)?.can_take() {
                return None;
            }
            return self.deliver_to(index);
        }
        let index = loop {
            let index = *self.active.front()?;
            let consumer = self.consumers.get_mut(index)?;
            if consumer.can_take() {
                break index;
            }
            consumer.in_line = false;
            self.active.pop_front();
        };
        let dispatch = self.deliver_to(index)?;
        // Served: to the back of the line (a single consumer stays put).
        if self.active.len() > 1
            && let Some(index) = self.active.pop_front()
        {
            self.active.push_back(index);
        }
        Some(dispatch)
    }

    /// With a single active consumer: the position of the consumer that has
    /// the queue, choosing the next one (the first registered that is not
    /// cancelled) when the holder is gone, or cancelled with nothing left to
    /// settle. `None`: nobody may receive now (no consumer, or a cancelled
    /// holder still settling).
    fn single_active(&mut self) -> Option<usize> {
        if let Some(id) = self.holder
            && let Some(index) = self.find(id)
            && let Some(holder) = self.consumers.get(index)
        {
            if !holder.cancelled {
                return Some(index);
            }
            if holder.unacked.len() > 0 {
                return None;
            }
        }
        let index = self.consumers.iter().position(|c| !c.cancelled)?;
        self.holder = Some(self.consumers[index].id);
        Some(index)
    }

    /// Whether `consumer` receives deliveries now: with a single active
    /// consumer, only the one that has the queue (or would be chosen next);
    /// otherwise any that is not cancelled.
    fn is_active(&self, consumer: &Consumer) -> bool {
        if consumer.cancelled {
            return false;
        }
        if !self.policy.single_active_consumer {
            return true;
        }
        let holder = self.holder.and_then(|id| {
            let c = self.consumers.get(self.find(id)?)?;
            (!c.cancelled || c.unacked.len() > 0).then_some(id)
        });
        match holder {
            Some(id) => id == consumer.id,
            None => self.consumers.iter().find(|c| !c.cancelled).map(|c| c.id) == Some(consumer.id),
        }
    }

    /// Hands the head ready message to the consumer at `index`.
    #[inline(always)]
    fn deliver_to(&mut self, index: usize) -> Option<Dispatch> {
        let consumer = self.consumers.get_mut(index)?;
        let mut entry = self.ready.pop()?;

        let delivery_count = entry.message.delivery_count().saturating_add(1);
        let redelivered = delivery_count > 1;
        entry.message.set_delivery(delivery_count, redelivered);

        // 2^64 deliveries cannot happen, so the tag cannot overflow.
        self.last_tag += 1;
        let tag = DeliveryTag(self.last_tag);
        consumer.delivered += 1;
        self.counters.delivered += 1;
        if redelivered {
            self.counters.redelivered += 1;
        }

        // Where it is stored, for a transaction that settles it.
        let mut loc = 0;
        let message = match consumer.mode {
            AckMode::Auto => {
                self.counters.acknowledged += 1;
                if !self.ready.stored.is_empty()
                    && let Some(loc) = self.ready.stored.remove(&entry.seq)
                {
                    self.journal.get_or_insert_default().settled.push(loc);
                    self.persisted -= 1;
                }
                entry.message
            }
            AckMode::Manual => {
                if !self.ready.stored.is_empty()
                    && let Some(&stored) = self.ready.stored.get(&entry.seq)
                {
                    self.journal.get_or_insert_default().delivered.push(stored);
                    loc = stored;
                }
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
            loc,
        })
    }

    /// Hands the head ready message to `consumer` whatever its place in line or
    /// its prefetch: RabbitMQ's `basic.get`. Register a (cancelled) consumer for
    /// the purpose. Returns `None` if no message is ready.
    ///
    /// # Errors
    /// [`SettleError::UnknownConsumer`] if `consumer` is not registered.
    pub fn fetch(&mut self, consumer: ConsumerId) -> Result<Option<Dispatch>, SettleError> {
        let index = self.position(consumer)?;
        self.expire();
        Ok(self.deliver_to(index))
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
        self.settle(consumer, tag, multiple, |queue, entry| {
            queue.counters.acknowledged += 1;
            queue.take(entry);
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
            let settled = self.settle(consumer, tag, multiple, Self::requeue)?;
            self.trim_after_requeue();
            return Ok(settled);
        }
        self.settle(consumer, tag, multiple, |queue, entry| {
            queue.counters.rejected += 1;
            let message = queue.take(entry);
            queue.dead.push(DeadLetter {
                message,
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
                let mut entry = entry;
                if entry.expires_at == IMMEDIATE {
                    entry.expires_at = queue.now_ms;
                }
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
    /// use postbox_actors::Envelope;
    /// use postbox_actors::queue::state::QueueState;
    /// use postbox_actors::{AckMode, ConsumerId};
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
            let settled = self.settle(consumer, tag, multiple, Self::requeue)?;
            self.trim_after_requeue();
            Ok(settled)
        } else {
            self.settle(consumer, tag, multiple, |queue, entry| {
                queue.counters.rejected += 1;
                discarded(queue.take(entry));
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
        let persisted = self.ready.locs();
        self.persisted -= persisted.len();
        if !persisted.is_empty() {
            self.journal
                .get_or_insert_default()
                .settled
                .extend(persisted);
        }
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
            // Cancelled ones (and `basic.get` registrations) are not
            // consumers any more, as in RabbitMQ.
            consumers: self.consumers.iter().filter(|c| !c.cancelled).count(),
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
            shed: c.shed,
            persisted: self.persisted,
            spilled: self.ready.spill.as_ref().map_or(0, |s| s.tail.len()),
            spill_bytes_on_disk: self.ready.spill.as_ref().map_or(0, |s| s.tail.disk_bytes()),
            // The window is the publishers' side: its handle fills these in.
            duplicates: 0,
            dedup_ids: 0,
            head_timestamp_ms: self.ready.head().map(|e| e.message.timestamp_ms()),
        }
    }

    /// One consumer's state, if it is registered.
    #[must_use]
    pub fn consumer_stats(&self, id: ConsumerId) -> Option<ConsumerStats> {
        let index = self.find(id)?;
        self.consumers.get(index).map(|c| self.stats_of(c))
    }

    /// Every registered consumer's state, in registration (round-robin) order.
    pub fn consumers(&self) -> impl ExactSizeIterator<Item = ConsumerStats> {
        self.consumers.iter().map(|c| self.stats_of(c))
    }

    fn stats_of(&self, consumer: &Consumer) -> ConsumerStats {
        ConsumerStats {
            active: self.is_active(consumer),
            ..consumer.stats()
        }
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
        self.find(id).ok_or(SettleError::UnknownConsumer(id))
    }

    /// The position of a registered consumer: a scan of the few, or a
    /// lookup in the index of the many.
    fn find(&self, id: ConsumerId) -> Option<usize> {
        if self.consumers.len() < INDEXED_FROM {
            self.consumers.iter().position(|c| c.id == id)
        } else {
            self.index.get(&id).copied()
        }
    }

    /// Returns a settled delivery to the ready queue, unless it has used up the
    /// queue's delivery limit: then it is dead-lettered instead.
    fn requeue(&mut self, mut entry: Entry) {
        if self.over_delivery_limit(&entry) {
            self.dead_letter_over_limit(entry);
            return;
        }
        if entry.expires_at == IMMEDIATE {
            // A TTL-0 message had its one chance: it expires at the head.
            entry.expires_at = self.now_ms;
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
        let message = self.take(entry);
        self.dead.push(DeadLetter {
            message,
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
            self.rejoin(index);
            return Ok(1);
        }
        // Everything this consumer holds up to `tag` is settled.
        let settled = holder.unacked.take_through(tag);
        let count = settled.len();
        self.unacked -= count;
        for entry in settled {
            apply(self, entry);
        }
        self.rejoin(index);
        Ok(count)
    }

    /// After requeues: with drop-head overflow, the length limits hold again
    /// (RabbitMQ drops, or dead-letters with reason `maxlen`, from the head;
    /// with reject-publish overflows a requeue may leave the queue over its
    /// limit, and new publishes are refused until it is back under).
    fn trim_after_requeue(&mut self) {
        if self.policy.overflow == Overflow::DropHead {
            self.drop_head();
        }
    }

    /// Drops ready messages from the head (dead-lettered with reason `maxlen`)
    /// until the queue is within its length limits.
    #[inline]
    fn drop_head(&mut self) {
        // Spill keeps everything; block and drop-new keep their oldest (a
        // message they let into an empty queue past the byte limit stays).
        if matches!(
            self.policy.overflow,
            Overflow::Spill | Overflow::Block | Overflow::DropNew
        ) {
            return;
        }
        let (max_len, max_bytes) = (self.policy.max_length, self.policy.max_length_bytes);
        while max_len.is_some_and(|max| self.ready.len() > max)
            || max_bytes.is_some_and(|max| self.ready.bytes > max)
        {
            let Some(head) = self.ready.pop() else { break };
            self.counters.maxlen += 1;
            let message = self.take(head);
            self.dead.push(DeadLetter {
                message,
                reason: DeathReason::MaxLen,
            });
        }
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
