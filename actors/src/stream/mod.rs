//! Streams: a shared, non-destructive log, as RabbitMQ streams and Kafka
//! topics are, in memory, and on disk too when durable. The semantics are
//! documented on [`StreamHandle`].
//!
//! - `options`: [`StreamOptions`] (retention, overflow, durability),
//!   [`StreamStart`], [`SubscribeOptions`];
//! - `log`: the log itself, as a plain state machine: offsets, the ring of
//!   records, readers' positions, retention, and for a durable stream the
//!   stored end readers stop at;
//! - `handle`: [`StreamHandle`]: publish, publish a batch, try to publish,
//!   subscribe, stats, sync;
//! - `subscriber`: the supervised subscriber actor, the [`StreamConsumer`]
//!   trait, [`StreamDelivery`] and [`StreamSubscription`];
//! - `error`: [`StreamError`], [`TryStreamPublishError`];
//! - `remote` (feature `amqp`): streams a server keeps (RabbitMQ's stream
//!   queues): subscribers' positions and actors kept here, records fed by
//!   the backend.
//!
//! The broker declares, deletes and binds streams
//! ([`Broker::declare_stream`](crate::Broker::declare_stream) and its siblings).
//!
//! # Durable streams
//!
//! A stream declared [`durable`](StreamOptions::durable) on a broker opened
//! on a data directory ([`Broker::open`](crate::Broker::open)) keeps its
//! records in a segmented log of its own on disk, and its named subscribers'
//! positions beside it; the broker's topology log records its declaration
//! (with an id never reused). The disk side (file format, writer thread,
//! group commit, recovery, deletion of trimmed segments) is
//! `store::stream_log`; this module keeps the records in memory as for any
//! stream, and makes them readable once they are stored.
//!
//! Memory: the in-memory ring is kept as for every stream, bounded by the
//! retention only, so a durable stream with a large retention holds all its
//! retained records in memory, and reads them all back into memory when the
//! broker reopens. Spilling records to disk (reading old ones from the
//! segments) is not done.

mod error;
pub(crate) mod handle;
pub(crate) mod log;
mod options;
#[cfg(feature = "amqp")]
pub(crate) mod remote;
pub(crate) mod subscriber;

pub use error::{StreamError, TryStreamPublishError};
pub use handle::StreamHandle;
pub use log::{StreamStats, SubscriberStats};
pub use options::{StreamOptions, StreamOverflow, StreamStart, SubscribeOptions};
pub use subscriber::{StreamConsumer, StreamConsumerFactory, StreamDelivery, StreamSubscription};
