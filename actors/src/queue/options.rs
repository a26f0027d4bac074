//! [`QueueOptions`]: the settings a queue is declared with.
//!
//! Redeclaring a queue with equal options is a no-op; with different options it
//! is [`BrokerError::QueueMismatch`](crate::BrokerError::QueueMismatch), as in
//! RabbitMQ.

use serde::{Deserialize, Serialize};

/// How a queue is declared.
///
/// ```
/// use postbox_actors::QueueOptions;
/// let options = QueueOptions::default().max_message_bytes(64 * 1024).mailbox(4096);
/// assert_eq!(options.max_message_bytes, Some(64 * 1024));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Largest payload accepted, in bytes; `None` uses the broker's limit.
    pub max_message_bytes: Option<usize>,
    /// Capacity of the queue actor's mailbox: how many publishes and
    /// acknowledgements may wait before publishers are slowed down.
    pub mailbox: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_message_bytes: None,
            mailbox: 1024,
        }
    }
}

impl QueueOptions {
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
}

/// Conditions for deleting a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Refuse if the queue has consumers.
    pub if_unused: bool,
    /// Refuse if the queue holds messages (ready or unacknowledged).
    pub if_empty: bool,
}
