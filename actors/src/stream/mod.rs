//! Streams: a shared, non-destructive, in-memory log, as RabbitMQ streams and
//! Kafka topics are. Fan-out to many subscribers without a queue per
//! subscriber: each record is stored once, and every subscriber reads every
//! record from its own position.
//!
//! - [`options`]: [`StreamOptions`] (retention, overflow), [`StreamStart`],
//!   [`SubscribeOptions`];
//! - [`log`]: the log itself, as a plain state machine: offsets, the ring of
//!   records, readers' positions, retention;
//! - [`handle`]: [`StreamHandle`]: publish, publish a batch, try to publish,
//!   subscribe, stats;
//! - [`subscriber`]: the supervised [`StreamSubscriber`] actor, the
//!   [`StreamConsumer`] trait, [`StreamDelivery`] and [`StreamSubscription`];
//! - [`broker_api`]: `Broker::declare_stream`, `Broker::stream`,
//!   `Broker::delete_stream`, and binding streams to exchanges;
//! - [`error`]: [`StreamError`], [`TryStreamPublishError`].
//!
//! # Semantics
//!
//! - **Append-only, offsets.** Every record gets the next `u64` offset, from 0,
//!   and an append time on [`postbox::clock`] (never going backwards). Reads do
//!   not remove anything: a subscriber gets every record from its start
//!   position, in offset order, and many subscribers share one copy of each
//!   message.
//! - **Start positions** ([`StreamStart`]): `First` (oldest retained), `Last`
//!   (the newest record), `Next` (default: only new records), `Offset(o)`
//!   (clamped to the retained range), `Timestamp(ms)` (the first record
//!   appended at or after `ms`).
//! - **Retention** trims the oldest records beyond `max_len` records,
//!   `max_bytes` payload bytes, or older than `max_age`. Age is checked lazily,
//!   at each append, read and stats call. A message larger than `max_bytes`
//!   (or than `max_message_bytes`, by default the broker's limit) is refused.
//! - **Overflow** ([`StreamOverflow`]), when retention would trim a record that
//!   a live subscriber has not finished handling:
//!   - `Block` (default): backpressure. [`StreamHandle::publish`] waits until
//!     the slowest subscriber moves on; [`StreamHandle::try_publish`] fails with
//!     [`TryStreamPublishError::Full`] and hands the message back. Nothing a
//!     live subscriber still needs is trimmed, by any limit. A subscriber that
//!     never advances stops every publisher: cancel it, or use `DropOldest`.
//!     (A handler that publishes to its own block-mode stream can deadlock.)
//!   - `DropOldest`: Kafka's way. Records are trimmed anyway; a subscriber
//!     that fell behind skips to the oldest retained record, the first
//!     delivery after the gap tells it how many it missed
//!     ([`StreamDelivery::skipped`]), its stats count them, and a warning is
//!     logged.
//! - **Subscribers** are actors with bounded mailboxes (that carry only
//!   wake-ups), each under a supervisor of its own, like queue consumers. A
//!   subscriber reads batches (64 records per lock by default), commits its
//!   position after each batch, parks when it reaches the tail, and is woken
//!   by the next append (one small message; appends to a stream whose
//!   subscribers are all busy send nothing).
//! - **Failure**: a handler that returns an error or panics fails its actor;
//!   its position is committed up to the record that failed, the supervisor
//!   rebuilds the handler from its factory (default: 5 restarts in 10 s,
//!   backoff 10 ms to 1 s), and it resumes at that record, flagged
//!   [`redelivered`](StreamDelivery::redelivered) with an
//!   [`attempt`](StreamDelivery::attempt) count: at least once, and nothing
//!   else is repeated or lost. While it restarts its position still counts for
//!   block-mode retention. Past its restart limit it stays down and its
//!   position is released.
//! - **Cancel** ([`StreamSubscription::cancel`]) is graceful: the subscriber
//!   finishes the batch in hand, commits, and stops.
//! - **Named subscribers** ([`SubscribeOptions::named`]): the stream stores the
//!   position of a named subscriber when it stops, and the next subscriber
//!   with that name resumes there (RabbitMQ's offset tracking). One live
//!   subscriber per name.
//! - **Delete** ([`Broker::delete_stream`](crate::Broker::delete_stream)) stops
//!   the subscribers and fails waiting and later publishes with
//!   [`StreamError::NotFound`].
//! - **Bad input** is a typed [`StreamError`] that changes nothing: invalid
//!   names, oversize messages, unknown streams, redeclaration with other
//!   options, a second live subscriber with the same name.
//!
//! Each delivery runs inside a `stream` tracing span with the stream, offset,
//! message id, correlation id and redelivered flag.
//!
//! - **Exchanges** route to streams as to queues
//!   ([`Broker::bind_stream`](crate::Broker::bind_stream),
//!   [`Broker::bind_stream_headers`](crate::Broker::bind_stream_headers),
//!   [`Broker::unbind_stream`](crate::Broker::unbind_stream)): each message
//!   appends one record per stream it reaches, however many bindings match;
//!   streams count in `publish_to`'s result and make a `mandatory` publish
//!   routed; a full block-mode stream makes `publish_to` wait. Dead letters
//!   reach streams without ever making their queue wait (a full stream gets
//!   them from a task), and transactions append at commit, after checking
//!   sizes with everything else. Deleting a stream removes its bindings.
//!   Publishing through a [`StreamHandle`] skips routing.
//!
//! ```
//! use postbox::Runtime;
//! use postbox_actors::stream::{StreamDelivery, StreamOptions, StreamStart, SubscribeOptions};
//! use postbox_actors::{Broker, Envelope};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = Runtime::new()?;
//! let broker = Broker::new(&rt);
//! let prices = broker.declare_stream("prices", StreamOptions::default().max_len(10_000)).await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let mut readers = Vec::new();
//! for who in ["audit", "ui"] {
//!     let tx = tx.clone();
//!     readers.push(
//!         prices
//!             .subscribe(StreamStart::First, SubscribeOptions::default(), move || {
//!                 let tx = tx.clone();
//!                 move |d: StreamDelivery| {
//!                     let _ = tx.send((who, d.offset(), d.decode::<u32>()));
//!                     async { Ok(()) }
//!                 }
//!             })
//!             .await?,
//!     );
//! }
//! assert_eq!(prices.publish(Envelope::encode(&101u32)?).await?, 0);
//! assert_eq!(prices.publish(Envelope::encode(&102u32)?).await?, 1);
//! let mut got = Vec::new();
//! for _ in 0..4 {
//!     let (who, offset, price) = rx.recv().await.unwrap();
//!     got.push((who, offset, price?));
//! }
//! got.sort();
//! assert_eq!(got, [("audit", 0, 101), ("audit", 1, 102), ("ui", 0, 101), ("ui", 1, 102)]);
//! for reader in readers {
//!     reader.cancel().await;
//! }
//! broker.delete_stream("prices").await?;
//! # Ok(()) }
//! ```

pub mod broker_api;
pub mod error;
pub mod handle;
pub mod log;
pub mod options;
pub mod subscriber;

pub use error::{StreamError, TryStreamPublishError};
pub use handle::StreamHandle;
pub use log::{Record, StreamStats, SubscriberStats};
pub use options::{StreamOptions, StreamOverflow, StreamStart, SubscribeOptions};
pub use subscriber::{
    Pump, StreamConsumer, StreamConsumerFactory, StreamDelivery, StreamSubscriber,
    StreamSubscription,
};
