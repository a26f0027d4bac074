//! Streams: a shared, non-destructive, in-memory log, as RabbitMQ streams and
//! Kafka topics are. The semantics are documented on [`StreamHandle`].
//!
//! - `options`: [`StreamOptions`] (retention, overflow), [`StreamStart`],
//!   [`SubscribeOptions`];
//! - `log`: the log itself, as a plain state machine: offsets, the ring of
//!   records, readers' positions, retention;
//! - `handle`: [`StreamHandle`]: publish, publish a batch, try to publish,
//!   subscribe, stats;
//! - `subscriber`: the supervised subscriber actor, the [`StreamConsumer`]
//!   trait, [`StreamDelivery`] and [`StreamSubscription`];
//! - `error`: [`StreamError`], [`TryStreamPublishError`].
//!
//! The broker declares, deletes and binds streams
//! ([`Broker::declare_stream`](crate::Broker::declare_stream) and its siblings).

mod error;
mod handle;
mod log;
mod options;
mod subscriber;

pub use error::{StreamError, TryStreamPublishError};
pub use handle::StreamHandle;
pub use log::{StreamStats, SubscriberStats};
pub use options::{StreamOptions, StreamOverflow, StreamStart, SubscribeOptions};
pub use subscriber::{StreamConsumer, StreamConsumerFactory, StreamDelivery, StreamSubscription};
