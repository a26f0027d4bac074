//! # postbox-actors: the messaging actors of postbox
//!
//! RabbitMQ's model, in process, as actors on [`postbox`]:
//!
//! - a [`Broker`] facade that declares, deletes and purges queues, publishes and
//!   consumes;
//! - one [`QueueActor`] per queue: FIFO, competing consumers served round-robin
//!   within each one's prefetch, acknowledgements (auto; manual ack, nack with or
//!   without requeue, reject, `multiple`), requeue to the original position;
//! - [`ConsumerActor`]s with bounded mailboxes, supervised: a consumer that
//!   crashes has its unacknowledged deliveries requeued and is rebuilt fresh;
//! - [`stream`]s: shared, non-destructive, in-memory logs (RabbitMQ streams,
//!   Kafka topics) read by any number of supervised subscribers, each from
//!   its own position, with retention and backpressure;
//! - an [`Envelope`] with ids, routing key, headers, correlation id, reply-to,
//!   priority and expiration, and typed payloads through a pluggable [`Codec`].
//!
//! The queue's rules live in [`queue::state::QueueState`], a plain state machine
//! with no actors in it, so that they can be tested exhaustively and persisted;
//! [`QueueActor`] only drives it.
//!
//! Flow control: a queue whose inbox is full slows its publishers down, and a
//! consumer whose mailbox is full stops receiving until it drains. A queue's
//! backlog of ready messages is bounded only by its length limits
//! ([`QueueOptions::max_length`]), if set.

pub mod broker;
pub mod codec;
pub mod consumer;
pub mod delivery;
pub mod envelope;
pub mod error;
pub mod exchange;
pub mod name;
pub mod observe;
pub mod queue;
pub mod retry;
pub mod rpc;
mod spare;
pub mod stream;
pub mod subscription;
pub mod testkit;
mod topology;
pub mod transaction;

pub use broker::{Broker, BrokerConfig};
pub use codec::{Codec, CodecError, Json};
pub use consumer::{ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle};
pub use delivery::Settler;
pub use delivery::{AckError, Delivery, Outcome};
pub use envelope::{Envelope, HeaderValue, Headers, MessageId};
pub use error::{BrokerError, PublishError, TryPublishError};
pub use exchange::headers::{HeadersMatch, XMatch};
pub use exchange::{Binding, Destination, ExchangeKind, ExchangeOptions};
pub use name::{NameError, NameKind};
pub use observe::{Observer, ObserverGuard};
pub use queue::actor::{QueueActor, QueueSnapshot};
pub use queue::handle::QueueHandle;
pub use queue::options::{DeleteOptions, QueueOptions};
pub use queue::state::{AckMode, ConsumerId, ConsumerStats, DeliveryTag, QueueStats};
pub use retry::{RetryPolicy, Retrying};
pub use stream::{
    StreamConsumer, StreamDelivery, StreamError, StreamHandle, StreamOptions, StreamOverflow,
    StreamStart, StreamStats, StreamSubscription, SubscribeOptions, SubscriberStats,
    TryStreamPublishError,
};
pub use subscription::Subscription;
pub use transaction::{Committed, Transaction, TxError};
