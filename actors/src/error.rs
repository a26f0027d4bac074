//! [`BrokerError`]: everything the broker API can refuse, each with what the
//! caller needs to act on it.

use crate::codec::CodecError;
use crate::envelope::Envelope;
use crate::exchange::{BindingError, ExchangeOptions};
use crate::name::NameError;
use crate::queue::options::QueueOptions;
use crate::store::StoreError;
use crate::stream::StreamError;

/// Why a broker operation was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BrokerError {
    /// The name is not a valid queue or exchange name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// No queue has that name.
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    /// The queue exists with other options.
    #[error(
        "queue {name:?} exists with different options (existing {existing:?}, requested {requested:?})"
    )]
    QueueMismatch {
        /// The queue.
        name: String,
        /// Its options.
        existing: Box<QueueOptions>,
        /// The options asked for.
        requested: Box<QueueOptions>,
    },
    /// `if_unused` deletion of a queue that has consumers.
    #[error("queue {name:?} has {consumers} consumer(s)")]
    QueueInUse {
        /// The queue.
        name: String,
        /// How many consumers it has.
        consumers: usize,
    },
    /// An exclusive consumer was asked for on a queue that has consumers, or
    /// a consumer on a queue that has an exclusive one (RabbitMQ's
    /// `ACCESS_REFUSED` to `basic.consume`).
    #[error(
        "queue {queue:?} is taken: an exclusive consumer cannot share it ({consumers} consumer(s) registered)"
    )]
    ExclusiveConsumer {
        /// The queue.
        queue: String,
        /// The consumers registered there.
        consumers: usize,
    },
    /// A partitioned queue of 0 partitions was asked for.
    #[error("partitioned queue {0:?} needs at least one partition")]
    NoPartitions(String),
    /// A message published to a partitioned queue has no partition key.
    #[error("message {message_id} has no partition key for partitioned queue {queue:?}")]
    NoPartitionKey {
        /// The partitioned queue.
        queue: String,
        /// The message.
        message_id: crate::envelope::MessageId,
    },
    /// `if_empty` deletion of a queue that holds messages.
    #[error("queue {name:?} holds {messages} message(s)")]
    QueueNotEmpty {
        /// The queue.
        name: String,
        /// Ready plus unacknowledged messages.
        messages: usize,
    },
    /// A stream refused: no stream has that name (binding one to an
    /// exchange), or a message routed to it is too large for it.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// No exchange has that name.
    #[error("exchange {0:?} not found")]
    ExchangeNotFound(String),
    /// The exchange exists with other options.
    #[error(
        "exchange {name:?} exists with different options (existing {existing:?}, requested {requested:?})"
    )]
    ExchangeMismatch {
        /// The exchange.
        name: String,
        /// Its options.
        existing: Box<ExchangeOptions>,
        /// The options asked for.
        requested: Box<ExchangeOptions>,
    },
    /// Queue options that cannot be: a maximum priority of 0, or a priority
    /// queue that spills.
    #[error("queue {name:?}: {reason}")]
    InvalidQueueOptions {
        /// The queue.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Exchange options that do not go together (hashing options on an
    /// exchange that is not a consistent-hash exchange).
    #[error("exchange {name:?}: {reason}")]
    InvalidExchangeOptions {
        /// The exchange.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `if_unused` deletion of an exchange that has bindings.
    #[error("exchange {name:?} has {bindings} binding(s)")]
    ExchangeInUse {
        /// The exchange.
        name: String,
        /// How many bindings it has.
        bindings: usize,
    },
    /// A binding its exchange cannot take: a headers binding whose
    /// arguments do not make a match (an unknown `x-match`), a
    /// consistent-hash binding whose key is not a weight.
    #[error(transparent)]
    InvalidBinding(#[from] BindingError),
    /// The default exchange `""` cannot be declared, deleted or bound.
    #[error("the default exchange cannot be {0}")]
    DefaultExchange(&'static str),
    /// Storage failed: the message could not be made durable (an I/O error, a
    /// full disk), or the data directory could not be opened. A publish that
    /// gets this was not confirmed; it may still be delivered (it reached
    /// the queue), so a retry may deliver it twice.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The queue is at its length limit and its overflow is reject-publish.
    #[error("queue {0:?} is full and refuses new messages")]
    QueueFull(String),
    /// The message (payload, headers and properties) is larger than the queue
    /// accepts.
    #[error("a message of {size} bytes exceeds the {limit}-byte limit of queue {queue:?}")]
    MessageTooLarge {
        /// The queue.
        queue: String,
        /// The message's size (see [`Envelope::total_size`]).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message's id was published to this queue or exchange within its
    /// duplicate window ([`DedupWindow`](crate::DedupWindow)): it was not
    /// enqueued. A producer retrying a publish can count this as success.
    #[error("{0}")]
    Duplicate(Box<crate::dedup::Duplicate>),
    /// A typed payload could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The runtime the broker runs on has stopped.
    #[error("the broker has stopped")]
    Stopped,
    /// The operation exists only on another backend: an embedded-only call
    /// (streams, observers, transactions, `try_publish`...) on a broker
    /// connected to RabbitMQ, or a RabbitMQ URL without feature `amqp`.
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// The backend that cannot do it (`"rabbitmq"`, `"embedded"`).
        backend: &'static str,
    },
    /// The broker URL cannot be used (its credentials are never included).
    #[error("invalid broker URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password replaced by `***`.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// RabbitMQ could not be reached or refused the operation for a reason
    /// none of the other variants describes; the text never holds
    /// credentials.
    #[error("rabbitmq: {0}")]
    Backend(String),
    /// The connection to RabbitMQ was lost after the message was sent and
    /// before RabbitMQ confirmed it: it may or may not have been enqueued.
    /// A retry may deliver it twice (a duplicate window or an idempotent
    /// consumer absorbs that).
    #[error("publish unconfirmed: the connection to rabbitmq was lost ({0})")]
    Unconfirmed(String),
}

impl BrokerError {
    /// An operation the RabbitMQ backend does not offer.
    #[cfg(feature = "amqp")]
    pub(crate) fn unsupported(operation: &'static str) -> Self {
        BrokerError::Unsupported {
            operation,
            backend: "rabbitmq",
        }
    }
}

impl From<Box<crate::dedup::Duplicate>> for BrokerError {
    fn from(duplicate: Box<crate::dedup::Duplicate>) -> Self {
        BrokerError::Duplicate(duplicate)
    }
}

/// The error of a non-waiting publish: the queue is busy (the message is handed
/// back), or the publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum TryPublishError {
    /// The queue's mailbox is full; try again later or use the waiting publish.
    #[error("queue {queue:?} is busy: its mailbox is full")]
    Full {
        /// The queue.
        queue: String,
        /// The message, unchanged.
        message: Box<Envelope>,
    },
    /// Refused for another reason.
    #[error(transparent)]
    Refused(#[from] BrokerError),
}

/// Why a publish through an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Refused before anything was enqueued.
    #[error(transparent)]
    Refused(#[from] BrokerError),
    /// `mandatory` was set and no queue or stream matched: the message is
    /// handed back.
    #[error("message to exchange {exchange:?} with routing key {routing_key:?} is unroutable")]
    Unroutable {
        /// The exchange it was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
        /// The message, unchanged.
        message: Box<Envelope>,
    },
}
