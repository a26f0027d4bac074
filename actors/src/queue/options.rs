//! [`QueueOptions`]: the settings a queue is declared with.
//!
//! Redeclaring a queue with equal options is a no-op; with different options it
//! is [`BrokerError::QueueMismatch`](crate::BrokerError::QueueMismatch), as in
//! RabbitMQ.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::policy::{Overflow, QueuePolicy};

/// How a queue is declared.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::QueueOptions;
/// let orders = QueueOptions::default()
///     .message_ttl(Duration::from_secs(60))
///     .delivery_limit(5)
///     .dead_letter_exchange("orders.dlx");
/// assert_eq!(orders.delivery_limit, Some(5));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Largest message accepted, in bytes, counting its payload, headers and
    /// properties ([`Envelope::total_size`](crate::Envelope::total_size));
    /// `None` uses the broker's limit.
    pub max_message_bytes: Option<usize>,
    /// Capacity of the queue actor's mailbox: how many publishes (and, apart,
    /// how many other requests) may wait before senders are slowed down.
    pub mailbox: usize,
    /// Time to live of each message, counted from enqueueing (a message's own
    /// shorter expiration wins).
    pub message_ttl: Option<Duration>,
    /// Deliveries after which a returned message is dead-lettered instead of requeued.
    pub delivery_limit: Option<u32>,
    /// Most ready messages.
    pub max_length: Option<usize>,
    /// Most payload bytes of ready messages.
    pub max_length_bytes: Option<usize>,
    /// What happens when a length limit is reached.
    pub overflow: Overflow,
    /// Where rejected, expired, overflowed and over-delivered messages go; `None`
    /// drops (and counts) them. `""` is the default exchange.
    pub dead_letter_exchange: Option<String>,
    /// The routing key dead letters are published with; `None` keeps their own.
    pub dead_letter_routing_key: Option<String>,
    /// Deletes the queue once it has been unused this long (RabbitMQ's
    /// `x-expires`): no consumers, no `get`, no redeclaration. Publishing does
    /// not count as use.
    pub expires: Option<Duration>,
    /// Survives a restart, with its persistent messages, on a broker opened
    /// on a data directory ([`Broker::open`](crate::Broker::open)); a
    /// publish of a persistent message returns once it is stored (per the
    /// [`SyncPolicy`](crate::SyncPolicy)). On an in-memory broker it is
    /// accepted and changes nothing.
    #[serde(default)]
    pub durable: bool,
    /// A publisher duplicate window: a message whose id was published to
    /// this queue within the window is not enqueued, and the publish fails
    /// with [`BrokerError::Duplicate`](crate::BrokerError::Duplicate) (see
    /// [`DedupWindow`](crate::DedupWindow)). A durable queue keeps the ids of
    /// its persistent messages across restarts. Dead letters and requeues
    /// are not publishes: the window does not see them.
    #[serde(default)]
    pub dedup: Option<crate::dedup::DedupWindow>,
    /// One consumer at a time receives everything; the others stand by and
    /// take over in registration order (RabbitMQ's
    /// `x-single-active-consumer`): the way to keep a queue's order with
    /// consumers ready to take over. See
    /// [`QueuePolicy::single_active_consumer`](crate::QueuePolicy::single_active_consumer).
    #[serde(default)]
    pub single_active_consumer: bool,
    /// Makes it a priority queue (RabbitMQ's `x-max-priority`, 1 to 255):
    /// a message's [priority](crate::Envelope::with_priority) decides its
    /// turn, higher first and FIFO within a priority; priorities above the
    /// maximum count as the maximum. A requeued message goes back to its
    /// place among its priority's messages; with a length limit, drop-head
    /// drops the next message to be delivered (the highest priority), as
    /// RabbitMQ does. A spilling queue cannot be a priority queue.
    #[serde(default)]
    pub max_priority: Option<u8>,
    /// Load shedding of low-priority publishes while the queue is
    /// overloaded (see [`Shedding`](crate::Shedding)).
    #[serde(default)]
    pub shed: Option<crate::queue::policy::Shedding>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_message_bytes: None,
            mailbox: 1024,
            message_ttl: None,
            delivery_limit: None,
            max_length: None,
            max_length_bytes: None,
            overflow: Overflow::DropHead,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            expires: None,
            durable: false,
            dedup: None,
            single_active_consumer: false,
            max_priority: None,
            shed: None,
        }
    }
}

impl QueueOptions {
    /// Sets [`max_priority`](Self::max_priority).
    ///
    /// ```
    /// use postbox_actors::QueueOptions;
    /// assert_eq!(QueueOptions::default().max_priority(10).max_priority, Some(10));
    /// ```
    pub fn max_priority(mut self, max: u8) -> Self {
        self.max_priority = Some(max);
        self
    }

    /// Sets [`shed`](Self::shed).
    pub fn shed(mut self, shedding: crate::queue::policy::Shedding) -> Self {
        self.shed = Some(shedding);
        self
    }

    /// Sets [`max_message_bytes`](Self::max_message_bytes).
    pub fn max_message_bytes(mut self, limit: usize) -> Self {
        self.max_message_bytes = Some(limit);
        self
    }

    /// Sets [`mailbox`](Self::mailbox) (at least 1).
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = capacity.max(1);
        self
    }

    /// Sets [`message_ttl`](Self::message_ttl).
    pub fn message_ttl(mut self, ttl: Duration) -> Self {
        self.message_ttl = Some(ttl);
        self
    }

    /// Sets [`delivery_limit`](Self::delivery_limit).
    pub fn delivery_limit(mut self, deliveries: u32) -> Self {
        self.delivery_limit = Some(deliveries);
        self
    }

    /// Sets [`max_length`](Self::max_length).
    pub fn max_length(mut self, messages: usize) -> Self {
        self.max_length = Some(messages);
        self
    }

    /// Sets [`max_length_bytes`](Self::max_length_bytes).
    pub fn max_length_bytes(mut self, bytes: usize) -> Self {
        self.max_length_bytes = Some(bytes);
        self
    }

    /// Sets [`single_active_consumer`](Self::single_active_consumer).
    #[doc(alias = "x-single-active-consumer")]
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active_consumer = true;
        self
    }

    /// Sets [`dedup`](Self::dedup).
    pub fn dedup(mut self, window: crate::dedup::DedupWindow) -> Self {
        self.dedup = Some(window);
        self
    }

    /// Sets [`overflow`](Self::overflow).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Sets [`dead_letter_exchange`](Self::dead_letter_exchange).
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// Makes the queue [`durable`](Self::durable).
    ///
    /// ```
    /// use postbox_actors::QueueOptions;
    /// assert!(QueueOptions::default().durable().durable);
    /// ```
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Sets [`expires`](Self::expires).
    pub fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }

    /// Sets [`dead_letter_routing_key`](Self::dead_letter_routing_key).
    pub fn dead_letter_routing_key(mut self, key: impl Into<String>) -> Self {
        self.dead_letter_routing_key = Some(key.into());
        self
    }

    /// The limits the queue's state machine enforces.
    pub fn policy(&self) -> QueuePolicy {
        QueuePolicy {
            message_ttl_ms: self
                .message_ttl
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            delivery_limit: self.delivery_limit,
            max_length: self.max_length,
            max_length_bytes: self.max_length_bytes,
            overflow: self.overflow,
            single_active_consumer: self.single_active_consumer,
            max_priority: self.max_priority,
            shed: self.shed,
        }
    }
}

/// Conditions for deleting a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Refuse if the queue has consumers.
    pub if_unused: bool,
    /// Refuse if the queue holds ready messages (as RabbitMQ: deliveries
    /// waiting for their acknowledgement, and delayed requeues, do not count).
    pub if_empty: bool,
}
