//! # postbox-actors: the messaging actors of postbox
//!
//! RabbitMQ's model, in process, as actors on [`postbox`]:
//!
//! - a [`Broker`] that declares, deletes and purges queues, exchanges and
//!   streams, binds them, publishes and consumes;
//! - queues: FIFO, competing consumers served round-robin within each one's
//!   prefetch, acknowledgements (auto; manual ack, nack with or without requeue,
//!   reject, `multiple`), requeue to the original position, TTL, length and
//!   delivery limits with overflow policies (drop-head, drop-new,
//!   reject-publish, spill, block), priorities, dead-letter exchanges;
//! - exchanges: direct, fanout, topic, headers, and consistent hash placing
//!   keys where RabbitMQ's plugin does;
//! - consumers ([`Consumer`]) hosted by supervised actors with bounded
//!   mailboxes: one that crashes has its unacknowledged deliveries requeued and
//!   is rebuilt fresh; [layers](Layer) add retries and more around them;
//! - streams ([`StreamHandle`]): shared, non-destructive logs (RabbitMQ
//!   streams, Kafka topics), in memory or durable, read by any number of
//!   supervised subscribers, each from its own position;
//! - durability ([`Broker::open`]): durable queues, exchanges, bindings and
//!   streams on a data directory, publisher confirms, spill to disk;
//! - duplicates: publisher duplicate windows ([`DedupWindow`]) on queues,
//!   exchanges and streams, and idempotent consumers ([`idempotency`]) with
//!   memory, disk, Redis and PostgreSQL stores;
//! - request-reply ([`rpc`]), publish/subscribe ([`Subscription`]) and
//!   transactions ([`Transaction`]) built on the broker;
//! - flow control: rate limits ([`RateLimit`], [`Throttle`]) for publishers
//!   and consumers, pools of consumers that grow and shrink
//!   ([`ConsumerPool`]), load shedding ([`Shedding`]) and a broker-wide
//!   memory budget ([`BrokerConfig::memory_budget`]);
//! - monitoring ([`monitor`]): samples with rates, threshold alerts as
//!   events, and metrics through the `metrics` facade (Prometheus with
//!   feature `prometheus`);
//! - an [`Envelope`] with ids, routing key, headers, correlation id, reply-to,
//!   priority and expiration, and typed payloads through a pluggable [`Codec`].
//!
//! # Where things live
//!
//! Dependencies point one way, from the bottom of this list to the top:
//!
//! | layer | modules | holds |
//! |---|---|---|
//! | messages | `envelope`, `codec`, `name`, `error` | the message, payload codecs, name rules, errors |
//! | storage | `store/` | the message log, key logs, the topology log, durable streams' logs |
//! | queues, streams, exchanges | `queue/` (public: [`queue::state`]), `stream/`, `exchange/`, `dedup` | dispatch and acknowledgements (`queue::state`, `queue::actor`, `queue::delivery`), the stream log, routing tables (topic trie, headers match), publishers' duplicate windows |
//! | consumers | `consumer/`, `supervision`, [`idempotency`] | the [`Consumer`] trait, its actor, [`Layer`]s (retries, idempotency and its stores), error and restart policies |
//! | broker | `broker/` | the [`Broker`] API and the topology: routing through exchanges happens in `broker::topology` |
//! | patterns | `subscription`, `transaction`, `rpc/`, `rate/`, [`monitor`] | publish/subscribe, transactions, request-reply, rate limits, monitoring (samples, alerts, metrics) |
//! | testing | `testkit/` (feature `testkit`) | a capturing broker, a delivery probe, fault injection |
//!
//! The queue's rules live in [`queue::state::QueueState`], a plain state machine
//! with no actors in it, so that they can be tested exhaustively and persisted;
//! the queue actor only drives it.
//!
//! Flow control: a queue whose inbox is full slows its publishers down, and a
//! consumer whose mailbox is full stops receiving until it drains. A queue's
//! backlog of ready messages is bounded by its length limits
//! ([`QueueOptions::max_length`]), if set; with overflow
//! [`Block`](Overflow::Block) a full queue makes its publishers wait, so
//! backpressure reaches them end to end.

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub mod amqp;
mod broker;
mod codec;
mod consumer;
mod dedup;
mod envelope;
mod error;
mod exchange;
pub mod idempotency;
pub mod monitor;
mod name;
pub mod partition;
pub mod queue;
mod rate;
pub mod rpc;
#[cfg(any(feature = "redis", feature = "postgres", feature = "amqp"))]
mod secret;
mod spare;
mod store;
mod stream;
mod subscription;
mod supervision;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
mod transaction;

pub use broker::{Backend, Broker, BrokerConfig, PartitionOptions, Partitioned, PublishOptions};
pub use codec::{Codec, CodecError, Json};
#[cfg(feature = "actix")]
#[cfg_attr(docsrs, doc(cfg(feature = "actix")))]
pub use consumer::actix;
pub use consumer::{
    ConsumeOptions, Consumer, ConsumerFactory, ConsumerHandle, ConsumerReport, KeyOrdered,
    KeyOrderedConsumer, Layer, LayerExt, Layered, OnError, RetryPolicy, Retrying,
};
pub use consumer::{ConsumerPool, PoolError, PoolOptions, PoolStats, PoolWatch};
pub use dedup::{DedupStats, DedupTarget, DedupWindow, Duplicate};
pub use envelope::{Death, DeathReason, Envelope, HeaderValue, Headers, MessageId};
pub use error::{BrokerError, PublishError, TryPublishError};
pub use exchange::{
    Binding, BindingError, BindingKey, Destination, ExchangeKind, ExchangeOptions, HashOn,
    HashProperty, HeadersMatch, XMatch,
};
pub use name::{MAX_NAME_LEN, NameError, NameKind, RESERVED_PREFIX};
pub use queue::ack::{AckMode, ConsumerId, DeliveryTag};
pub use queue::actor::QueueSnapshot;
pub use queue::budget::{MemoryEvent, MemoryStats};
pub use queue::delivery::{AckError, Delivery, MAX_REQUEUE_DELAY, Outcome, Settler};
pub use queue::handle::QueueHandle;
pub use queue::observe::{Observer, ObserverGuard};
pub use queue::options::{DeleteOptions, QueueOptions};
pub use queue::policy::{Overflow, QueuePolicy, ShedAction, Shedding};
pub use queue::stats::{ConsumerStats, QueueStats};
pub use rate::{RateLimit, RateLimited, RateLimiter, Throttle, ThrottleError, Throttled};

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use store::fuzzing;
pub use store::{StorageOptions, StorageStats, StoreError, SyncPolicy};
pub use stream::{
    StreamConsumer, StreamConsumerFactory, StreamDelivery, StreamError, StreamHandle,
    StreamOptions, StreamOverflow, StreamStart, StreamStats, StreamSubscription, SubscribeOptions,
    SubscriberStats, TryStreamPublishError,
};
pub use subscription::Subscription;
pub use transaction::{Committed, Transaction, TxError};

/// The README's code, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
