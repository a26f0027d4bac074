//! What a queue reports of itself: [`QueueStats`] (sizes and lifetime
//! counters) and [`ConsumerStats`] (one consumer's share).

use serde::{Deserialize, Serialize};

use crate::queue::ack::{AckMode, ConsumerId};

/// A snapshot of a queue's size and lifetime counters.
///
/// At all times `published == ready + unacked + delayed + acknowledged + rejected + purged + expired + maxlen + delivery_limit + shed`
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
    /// Ready messages dropped by a purge.
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
    /// Publishes shed (dropped or dead-lettered) by the queue's
    /// load-shedding policy; deferred ones are not counted here.
    #[serde(default)]
    pub shed: u64,
    /// Messages of this queue in the broker's store: a durable queue's
    /// persistent messages, ready, delayed or unacknowledged.
    pub persisted: usize,
    /// Ready messages paged out to disk (overflow `spill`); counted in
    /// `ready` too.
    pub spilled: usize,
    /// Bytes the spilled messages take on disk.
    pub spill_bytes_on_disk: u64,
    /// Publishes refused by the queue's duplicate window (not counted in
    /// `published`).
    #[serde(default)]
    pub duplicates: u64,
    /// Message ids its duplicate window remembers now.
    #[serde(default)]
    pub dedup_ids: usize,
    /// The timestamp (epoch ms, [`Envelope::timestamp_ms`]: its creation,
    /// unless set) of the message to be delivered next: how long the queue
    /// has kept its consumers waiting (RabbitMQ's `head_message_timestamp`).
    ///
    /// [`Envelope::timestamp_ms`]: crate::Envelope::timestamp_ms
    #[serde(default)]
    pub head_timestamp_ms: Option<u64>,
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
    /// Whether it receives deliveries: false once cancelled, and for the
    /// standbys of a queue with a single active consumer.
    pub active: bool,
}
