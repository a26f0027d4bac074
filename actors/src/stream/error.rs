//! [`StreamError`] and [`TryStreamPublishError`]: everything the stream API can
//! refuse. A refused call changes nothing (on RabbitMQ, a publish whose
//! confirm was lost, or a batch refused part way, may have landed: see
//! [`StreamError::Remote`]).

use crate::envelope::Envelope;
use crate::name::NameError;
use crate::store::StoreError;
use crate::stream::options::StreamOptions;

/// Why a stream operation was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StreamError {
    /// The name is not a valid stream name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// No stream has that name (or it was deleted).
    #[error("stream {0:?} not found")]
    NotFound(String),
    /// The stream exists with other options.
    #[error(
        "stream {name:?} exists with different options (existing {existing:?}, requested {requested:?})"
    )]
    Mismatch {
        /// The stream.
        name: String,
        /// Its options.
        existing: Box<StreamOptions>,
        /// The options asked for.
        requested: Box<StreamOptions>,
    },
    /// The message is larger than the stream accepts: the whole message
    /// against its `max_message_bytes`, or the payload against its `max_bytes`
    /// retention.
    #[error("a message of {size} bytes exceeds the {limit}-byte limit of stream {stream:?}")]
    MessageTooLarge {
        /// The stream.
        stream: String,
        /// The size that broke the limit.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message's id was published to the stream within its duplicate
    /// window ([`DedupWindow`](crate::DedupWindow)): it was not appended.
    /// [`Duplicate::original`](crate::Duplicate::original) is the offset of
    /// the original.
    #[error("{0}")]
    Duplicate(Box<crate::dedup::Duplicate>),
    /// A named subscriber with this name is already live on the stream.
    #[error("stream {stream:?} already has a live subscriber named {name:?}")]
    SubscriberExists {
        /// The stream.
        stream: String,
        /// The subscriber name.
        name: String,
    },
    /// A durable stream's storage failed: the record could not be stored (an
    /// I/O error, a full disk; it was taken back and no subscriber gets it),
    /// the stream's log failed a sync earlier (nothing more is stored until
    /// the broker is reopened), or the broker was closed.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The runtime the broker runs on has stopped.
    #[error("the broker has stopped")]
    Stopped,
    /// The RabbitMQ backend cannot do what was asked (the option or call
    /// named): a RabbitMQ stream retains by bytes and age only, trims
    /// regardless of its readers, has no duplicate window, and every
    /// publish there waits for its confirm (no `try_publish`).
    #[error("{0} is not supported by the rabbitmq backend")]
    Unsupported(&'static str),
    /// RabbitMQ refused the call or could not be reached (postbox on
    /// RabbitMQ); a publish whose confirm was lost is
    /// [`BrokerError::Unconfirmed`](crate::BrokerError::Unconfirmed) here.
    #[error(transparent)]
    Remote(Box<crate::error::BrokerError>),
}

/// The error of [`StreamHandle::try_publish`](crate::stream::StreamHandle::try_publish).
#[derive(Debug, thiserror::Error)]
pub enum TryStreamPublishError {
    /// Block overflow, and the slowest subscriber has not read the record that
    /// retention would trim: try again later, or use the waiting publish.
    #[error("stream {stream:?} is full: its slowest subscriber is behind")]
    Full {
        /// The stream.
        stream: String,
        /// The message, unchanged.
        message: Box<Envelope>,
    },
    /// Refused for another reason.
    #[error(transparent)]
    Refused(#[from] StreamError),
}

impl TryStreamPublishError {
    /// The message handed back by [`Full`](Self::Full).
    pub fn into_message(self) -> Option<Envelope> {
        match self {
            TryStreamPublishError::Full { message, .. } => Some(*message),
            TryStreamPublishError::Refused(_) => None,
        }
    }
}
