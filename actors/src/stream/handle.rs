//! [`StreamHandle`]: typed access to one stream, to publish to it, subscribe to
//! it and read its counters; and the state that handle, the broker's registry
//! and the subscribers share.
//!
//! Publishing appends under the log's lock (a `parking_lot` mutex held for a
//! push and, at the length limit, a pop) and, only if some subscriber is parked
//! at the tail, wakes it afterwards with one small message into its mailbox. A
//! publisher that block-mode retention refuses waits on a `Notify` that a
//! subscriber fires when its progress makes room; it registers for it while
//! still holding the lock, so no wake-up can be lost in between.
//!
//! A durable stream also frames each record into its disk log's pending
//! buffer under that lock (so the file's order is the offsets' order), and
//! the publisher then waits, outside the lock, for the log's writer to store
//! it. The record becomes readable when it is stored: the writer tells the
//! stream ([`StreamSink`]), which wakes the subscribers parked at the tail.

use std::collections::HashMap;
use std::ops::Range;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytestring::ByteString;
use parking_lot::Mutex;
use postbox::{Recipient, RuntimeHandle};

use crate::supervision::Kept;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::envelope::Envelope;
use crate::store::stream_log::{RecoveredStream, StreamAppend, StreamLog, StreamSeed, StreamSink};
use crate::store::{Confirm, StoreError};
use crate::stream::error::{StreamError, TryStreamPublishError};
use crate::stream::log::{LogState, ReaderId, Refusal, StreamStats, SubscriberStats};
use crate::stream::options::{StreamOptions, StreamStart, SubscribeOptions};
use crate::stream::subscriber::{
    Pump, ReaderOf, StreamConsumer, StreamConsumerFactory, StreamSubscriber, StreamSubscription,
};

/// How a parked subscriber is woken: its mailbox.
pub(crate) type Waker = Recipient<Pump>;

/// One stream: its log, its subscribers' supervisors, and its settings.
pub(crate) struct StreamCore {
    pub(crate) name: ByteString,
    pub(crate) options: StreamOptions,
    /// Largest message accepted ([`Envelope::total_size`]).
    pub(crate) limit: usize,
    pub(crate) log: Mutex<LogState<Waker>>,
    /// Fired when a blocked publisher may have room, and when the stream closes.
    pub(crate) space: Notify,
    pub(crate) subscribers: Mutex<HashMap<ReaderId, Kept>>,
    pub(crate) runtime: RuntimeHandle,
    seq: AtomicU64,
    /// Set when the runtime shut down: calls fail with `Stopped`, not `NotFound`.
    stopped: AtomicBool,
    /// A durable stream's log on disk (on a broker opened on a data
    /// directory).
    pub(crate) disk: Option<StreamLog>,
    /// A stream on RabbitMQ: the log above stays empty, and is used only
    /// to mark the stream deleted.
    #[cfg(feature = "amqp")]
    pub(crate) remote: Option<Arc<crate::stream::remote::RemoteStream>>,
}

impl StreamCore {
    pub(crate) fn new(
        name: ByteString,
        options: StreamOptions,
        limit: usize,
        runtime: RuntimeHandle,
    ) -> Self {
        let mut log = LogState::new(crate::stream::log::Limits::of(&options));
        if let Some(window) = options.dedup {
            log.set_dedup(crate::dedup::Window::new(
                window,
                crate::dedup::DedupTarget::Stream(name.to_string()),
            ));
        }
        StreamCore {
            log: Mutex::new(log),
            name,
            options,
            limit,
            space: Notify::new(),
            subscribers: Mutex::new(HashMap::new()),
            runtime,
            seq: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            disk: None,
            #[cfg(feature = "amqp")]
            remote: None,
        }
    }

    /// Starts appending to a durable stream's disk log (`None` for a stream
    /// in memory only); refused if the log stores nothing more. Taken under
    /// the log's lock.
    fn disk_append(&self) -> Result<Option<StreamAppend<'_>>, StreamError> {
        match &self.disk {
            None => Ok(None),
            Some(disk) => Ok(Some(disk.append()?)),
        }
    }

    /// Waits for a durable stream's records to be stored.
    async fn confirmed(confirm: Option<Confirm>) -> Result<(), StreamError> {
        crate::store::confirmed(confirm)
            .await
            .map_err(StreamError::Storage)
    }

    /// A named subscriber committed a position: a durable stream writes it
    /// (lazily).
    pub(crate) fn moved(&self) {
        if let Some(disk) = &self.disk {
            disk.moved();
        }
    }

    /// Adds a durable stream's disk counters to `stats`.
    fn disk_stats(&self, mut stats: StreamStats) -> StreamStats {
        if let Some(disk) = &self.disk {
            (stats.bytes_on_disk, stats.segments, stats.damaged_records) = disk.stats();
        }
        stats
    }

    /// The runtime shut down: the stream takes nothing more, and publishers
    /// waiting for room, and later ones, fail with [`StreamError::Stopped`].
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.log.lock().close();
        self.release_publishers();
    }

    /// Why the stream refuses calls: deleted, or the runtime stopped.
    pub(crate) fn gone(&self) -> StreamError {
        if self.stopped.load(Ordering::Acquire) {
            StreamError::Stopped
        } else {
            StreamError::NotFound(self.name.to_string())
        }
    }

    /// Wakes subscribers parked at the tail (outside the log's lock).
    pub(crate) fn wake(wake: Vec<Waker>) {
        for waker in wake {
            if let Err(postbox::TrySendError::Full(pump)) = waker.try_send(Pump) {
                // Its mailbox is full of other messages; it must not miss this one.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = waker.send(pump).await;
                    });
                } else {
                    // A durable stream's writer thread, outside any runtime.
                    std::thread::spawn(move || {
                        let _ = futures::executor::block_on(waker.send(pump));
                    });
                }
            }
        }
    }

    /// Wakes every blocked publisher (to retry, or to see the stream closed).
    pub(crate) fn release_publishers(&self) {
        self.space.notify_waiters();
    }

    /// Removes a subscriber's reader (storing a named one's position); wakes
    /// the publishers it may have been holding back.
    pub(crate) fn remove_reader(&self, id: ReaderId) -> Option<SubscriberStats> {
        let removed = self.log.lock().remove_reader(id);
        self.subscribers.lock().remove(&id);
        let (stats, notify) = removed?;
        if notify {
            self.release_publishers();
        }
        Some(stats)
    }

    /// Closes the stream and stops its subscribers; returns its last stats.
    pub(crate) async fn close(&self) -> StreamStats {
        let stats = {
            let mut log = self.log.lock();
            log.close();
            log.stats(postbox::clock::now_ms())
        };
        let stats = self.disk_stats(stats);
        // Waiting publishers see the stream closed.
        self.release_publishers();
        let subscribers: Vec<(ReaderId, Kept)> = self.subscribers.lock().drain().collect();
        for (id, subscriber) in subscribers {
            subscriber.any.stop();
            subscriber.any.terminated().await;
            self.log.lock().remove_reader(id);
        }
        stats
    }
}

/// What a durable stream's disk log tells the stream, from its writer thread.
impl StreamSink for StreamCore {
    fn stored(&self, end: u64) {
        let mut wake = Vec::new();
        self.log.lock().confirm(end, &mut wake);
        StreamCore::wake(wake);
    }

    fn unstored(&self, from: u64, discard: &mut dyn FnMut()) {
        let notify = {
            let mut log = self.log.lock();
            discard();
            log.rollback(from)
        };
        tracing::warn!(stream = %self.name, from, "records that could not be stored were taken back");
        if notify {
            self.release_publishers();
        }
    }

    fn first_retained(&self) -> u64 {
        self.log.lock().first()
    }

    fn positions(&self) -> Vec<(String, u64)> {
        self.log.lock().named_positions()
    }
}

/// What [`StreamHandle::append_one`] did.
enum Appended {
    /// Appended at this offset; a durable stream's confirm to wait for.
    Done(u64, Option<Confirm>),
    /// Refused (block mode, full): the message back.
    Full(Envelope),
}

/// A batch being appended by [`StreamHandle::publish_batch`].
struct Batch<'a> {
    pending: Option<Envelope>,
    rest: &'a mut std::vec::IntoIter<Envelope>,
    start: Option<u64>,
    end: Option<u64>,
    confirms: Vec<Confirm>,
    /// The first message the duplicate window left out.
    duplicate: Option<Box<crate::dedup::Duplicate>>,
}

/// A handle to one stream; cheap to clone, usable from any thread. Obtained
/// from [`Broker::declare_stream`](crate::Broker::declare_stream) or
/// [`Broker::stream`](crate::Broker::stream).
///
/// Streams: a shared, non-destructive log, as RabbitMQ streams and Kafka
/// topics are, in memory, and on disk too for a durable stream. Fan-out to
/// many subscribers without a queue per subscriber: each record is stored
/// once, and every subscriber reads every record from its own position.
///
/// # Semantics
///
/// - **Append-only, offsets.** Every record gets the next `u64` offset, from 0,
///   and an append time on [`postbox::clock`] (never going backwards). Reads do
///   not remove anything: a subscriber gets every record from its start
///   position, in offset order, and many subscribers share one copy of each
///   message.
/// - **Start positions** ([`StreamStart`]): `First` (oldest retained), `Last`
///   (the newest record), `Next` (default: only new records), `Offset(o)`
///   (clamped to the retained range), `Timestamp(ms)` (the first record
///   appended at or after `ms`).
/// - **Retention** trims the oldest records beyond `max_len` records,
///   `max_bytes` payload bytes, or older than `max_age`. Age is checked lazily,
///   at each append, read and stats call. A message larger than `max_bytes`
///   (or than `max_message_bytes`, by default the broker's limit) is refused.
/// - **Overflow** ([`StreamOverflow`](crate::StreamOverflow)), when retention would trim a record that
///   a live subscriber has not finished handling:
///   - `Block` (default): backpressure. [`StreamHandle::publish`] waits until
///     the slowest subscriber moves on; [`StreamHandle::try_publish`] fails with
///     [`TryStreamPublishError::Full`] and hands the message back. Nothing a
///     live subscriber still needs is trimmed, by any limit. A subscriber that
///     never advances stops every publisher: cancel it, or use `DropOldest`.
///     (A handler that publishes to its own block-mode stream can deadlock.)
///   - `DropOldest`: Kafka's way. Records are trimmed anyway; a subscriber
///     that fell behind skips to the oldest retained record, the first
///     delivery after the gap tells it how many it missed
///     ([`StreamDelivery::skipped`](crate::StreamDelivery::skipped)), its stats count them, and a warning is
///     logged.
/// - **Subscribers** are actors with bounded mailboxes (that carry only
///   wake-ups), each restarting itself when it fails, like queue consumers. A
///   subscriber reads batches (64 records per lock by default), commits its
///   position after each batch, parks when it reaches the tail, and is woken
///   by the next append (one small message; appends to a stream whose
///   subscribers are all busy send nothing).
/// - **Failure**: a handler that returns an error or panics fails its actor;
///   its position is committed up to the record that failed, the supervisor
///   rebuilds the handler from its factory (default: 5 restarts in 10 s,
///   backoff 10 ms to 1 s), and it resumes at that record, flagged
///   [`redelivered`](crate::StreamDelivery::redelivered) with an
///   [`attempt`](crate::StreamDelivery::attempt) count: at least once, and nothing
///   else is repeated or lost. While it restarts its position still counts for
///   block-mode retention. Past its restart limit it stays down and its
///   position is released.
/// - **Cancel** ([`StreamSubscription::cancel`]) is graceful: the subscriber
///   finishes the batch in hand, commits, and stops.
/// - **Named subscribers** ([`SubscribeOptions::named`]): the stream stores the
///   position of a named subscriber when it stops, and the next subscriber
///   with that name resumes there (RabbitMQ's offset tracking). One live
///   subscriber per name.
/// - **Delete** ([`Broker::delete_stream`](crate::Broker::delete_stream)) stops
///   the subscribers and fails waiting and later publishes with
///   [`StreamError::NotFound`]. A durable stream's records and directory go
///   too: one declared again with that name starts empty, at offset 0.
/// - **Durability** ([`StreamOptions::durable`](crate::StreamOptions::durable),
///   on a broker opened with [`Broker::open`](crate::Broker::open)): every
///   record is also appended to the stream's own segmented log on disk, and
///   the named subscribers' positions are written beside it. [`publish`]
///   returns once the record is stored per the broker's
///   [`SyncPolicy`](crate::SyncPolicy) (after an `fdatasync` shared with
///   every concurrent publisher, by default), [`publish_batch`] after one
///   sync for the batch; subscribers read a record only once it is stored. A
///   record that cannot be stored is taken back (no subscriber ever sees it)
///   and its publisher gets [`StreamError::Storage`]; after a failed sync the
///   stream stores nothing more until the broker is reopened. When the
///   broker reopens, the stream comes back with its retained records (same
///   offsets, timestamps and messages), the next publish continues the
///   offsets, and a named subscriber resumes at its last written position or
///   earlier (positions are written at most every 200 ms, on
///   [`sync`](Self::sync), and when the broker closes): at least once, never
///   skipping. A record damaged on disk is skipped (a hole in the offsets,
///   counted in [`StreamStats::damaged_records`]). Retention deletes whole
///   segment files once all of their records are trimmed. The records also
///   stay in memory, bounded by the retention, as for any stream: a durable
///   stream with a large retention holds that much in memory (records are
///   not paged out to disk). A binding from a durable exchange to a durable
///   stream is durable too.
/// - **Bad input** is a typed [`StreamError`] that changes nothing: invalid
///   names, oversize messages, unknown streams, redeclaration with other
///   options, a second live subscriber with the same name.
///
/// [`publish`]: Self::publish
/// [`publish_batch`]: Self::publish_batch
///
/// Each delivery runs inside a `stream` tracing span with the stream, offset,
/// message id, correlation id and redelivered flag.
///
/// - **Exchanges** route to streams as to queues
///   ([`Broker::bind_stream`](crate::Broker::bind_stream),
///   [`Broker::unbind_stream`](crate::Broker::unbind_stream)): each message
///   appends one record per stream it reaches, however many bindings match;
///   streams count in `publish_to`'s result and make a `mandatory` publish
///   routed; a full block-mode stream makes `publish_to` wait. Dead letters
///   reach streams without ever making their queue wait (a full stream gets
///   them from a task), and transactions append at commit, after checking
///   sizes with everything else. Deleting a stream removes its bindings.
///   Publishing through a [`StreamHandle`] skips routing.
///
/// ```
/// use postbox::Runtime;
/// use postbox_actors::{
///     Broker, Envelope, StreamDelivery, StreamOptions, StreamStart, SubscribeOptions,
/// };
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::new()?;
/// let broker = Broker::new(&rt);
/// let prices = broker.declare_stream("prices", StreamOptions::default().max_len(10_000)).await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let mut readers = Vec::new();
/// for who in ["audit", "ui"] {
///     let tx = tx.clone();
///     readers.push(
///         prices
///             .subscribe(StreamStart::First, SubscribeOptions::default(), move || {
///                 let tx = tx.clone();
///                 move |d: StreamDelivery| {
///                     let _ = tx.send((who, d.offset(), d.decode::<u32>()));
///                     async { Ok(()) }
///                 }
///             })
///             .await?,
///     );
/// }
/// assert_eq!(prices.publish(Envelope::encode(&101u32)?).await?, 0);
/// assert_eq!(prices.publish(Envelope::encode(&102u32)?).await?, 1);
/// let mut got = Vec::new();
/// for _ in 0..4 {
///     let (who, offset, price) = rx.recv().await.unwrap();
///     got.push((who, offset, price?));
/// }
/// got.sort();
/// assert_eq!(got, [("audit", 0, 101), ("audit", 1, 102), ("ui", 0, 101), ("ui", 1, 102)]);
/// for reader in readers {
///     reader.cancel().await;
/// }
/// broker.delete_stream("prices").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct StreamHandle {
    pub(crate) core: Arc<StreamCore>,
}

impl std::fmt::Debug for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamHandle")
            .field("name", &self.core.name)
            .field("options", &self.core.options)
            .finish()
    }
}

impl StreamHandle {
    /// What [`publish`](Self::publish) returns for a stream on RabbitMQ,
    /// whose confirms do not say at which offset a record went (as Kafka's
    /// producer reports `-1` when the broker did not say). Subscribers see
    /// every record's offset either way.
    pub const UNKNOWN_OFFSET: u64 = u64::MAX;

    /// A new, empty stream.
    pub(crate) fn new(
        name: ByteString,
        options: StreamOptions,
        limit: usize,
        runtime: RuntimeHandle,
    ) -> Self {
        StreamHandle {
            core: Arc::new(StreamCore::new(name, options, limit, runtime)),
        }
    }

    /// A durable stream on `disk`, with what was read back from it (nothing,
    /// for a new one); starts the log's writer.
    pub(crate) fn durable(
        name: ByteString,
        options: StreamOptions,
        limit: usize,
        runtime: RuntimeHandle,
        (disk, seed): (StreamLog, StreamSeed),
        recovered: RecoveredStream,
    ) -> Result<Self, StoreError> {
        let mut core = StreamCore::new(name, options, limit, runtime);
        {
            let log = core.log.get_mut();
            for record in recovered.records {
                log.restore(record.offset, record.timestamp_ms, record.envelope);
            }
            log.restored(recovered.positions, postbox::clock::now_ms());
            log.set_durable();
        }
        core.disk = Some(disk);
        let core = Arc::new(core);
        seed.start(core.clone())?;
        Ok(StreamHandle { core })
    }

    /// A stream on RabbitMQ, read and written through `remote`.
    #[cfg(feature = "amqp")]
    pub(crate) fn remote(
        name: ByteString,
        options: StreamOptions,
        limit: usize,
        runtime: RuntimeHandle,
        remote: crate::stream::remote::RemoteStream,
    ) -> Self {
        let mut core = StreamCore::new(name, options, limit, runtime);
        core.remote = Some(Arc::new(remote));
        StreamHandle {
            core: Arc::new(core),
        }
    }

    /// The RabbitMQ side of a stream on RabbitMQ.
    #[cfg(feature = "amqp")]
    pub(crate) fn on_rabbitmq(&self) -> Option<&Arc<crate::stream::remote::RemoteStream>> {
        self.core.remote.as_ref()
    }

    /// Whether its records are kept on disk.
    pub(crate) fn is_durable(&self) -> bool {
        self.core.disk.is_some()
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The options it was declared with.
    pub fn options(&self) -> &StreamOptions {
        &self.core.options
    }

    /// The size and the limit it breaks, if `message` is too large: the whole
    /// message against `max_message_bytes`, or its payload against the
    /// `max_bytes` retention (a record that alone breaks retention).
    fn too_large(&self, message: &Envelope) -> Option<(usize, usize)> {
        let total = message.total_size();
        if total > self.core.limit {
            return Some((total, self.core.limit));
        }
        match self.core.options.max_bytes {
            Some(max) if message.size() > max => Some((message.size(), max)),
            _ => None,
        }
    }

    fn check(&self, message: &Envelope) -> Result<(), StreamError> {
        match self.too_large(message) {
            Some((size, limit)) => Err(StreamError::MessageTooLarge {
                stream: self.core.name.to_string(),
                size,
                limit,
            }),
            None => Ok(()),
        }
    }

    /// The size check of [`check`](Self::check), as a
    /// [`BrokerError`](crate::BrokerError), for messages routed here through
    /// an exchange.
    pub(crate) fn check_routed(&self, message: &Envelope) -> Result<(), crate::error::BrokerError> {
        Ok(self.check(message)?)
    }

    fn gone(&self) -> StreamError {
        self.core.gone()
    }

    /// Appends a message and returns its offset. With block overflow, waits
    /// while the slowest live subscriber has not read the record retention
    /// would trim. On a durable stream, returns once the record is stored
    /// (per the broker's [`SyncPolicy`](crate::SyncPolicy)), or fails with
    /// [`StreamError::Storage`] if it could not be (the record is then taken
    /// back: no subscriber gets it).
    ///
    /// On RabbitMQ it returns once RabbitMQ confirmed the record, and
    /// returns [`UNKNOWN_OFFSET`](Self::UNKNOWN_OFFSET): AMQP's
    /// confirms do not say where a record went.
    pub async fn publish(&self, message: Envelope) -> Result<u64, StreamError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            self.check(&message)?;
            if self.is_deleted() {
                return Err(self.gone());
            }
            remote.publish(message).await?;
            return Ok(Self::UNKNOWN_OFFSET);
        }
        let (offset, confirm) = self.append(message).await?;
        StreamCore::confirmed(confirm).await?;
        Ok(offset)
    }

    /// [`publish`](Self::publish) without waiting for the disk: returns the
    /// offset and, for a durable stream, the confirmation that the record is
    /// stored (an error there means it was taken back). For routing, which
    /// waits for the confirmations of all its targets together.
    pub(crate) async fn append(
        &self,
        message: Envelope,
    ) -> Result<(u64, Option<Confirm>), StreamError> {
        self.check(&message)?;
        let mut message = message;
        let mut wake = Vec::new();
        loop {
            let mut room = pin!(self.core.space.notified());
            let now = postbox::clock::now_ms();
            match self.append_one(message, now, &mut wake, room.as_mut())? {
                Appended::Done(offset, confirm) => {
                    StreamCore::wake(wake);
                    return Ok((offset, confirm));
                }
                Appended::Full(back) => message = back,
            }
            room.await;
        }
    }

    /// Appends one message under the log's lock (and frames it into a
    /// durable stream's disk log); a refusal registers `room` under that lock,
    /// so that a subscriber that makes room after it finds it waiting.
    fn append_one(
        &self,
        message: Envelope,
        now: u64,
        wake: &mut Vec<Waker>,
        room: Pin<&mut Notified<'_>>,
    ) -> Result<Appended, StreamError> {
        let mut log = self.core.log.lock();
        if log.is_closed() {
            return Err(self.gone());
        }
        let disk = self.core.disk_append()?;
        match log.append(message, now, wake) {
            Ok(offset) => {
                let confirm = disk.map(|mut disk| {
                    if let Some(r) = log.newest() {
                        disk.record(r.offset, r.timestamp_ms, &r.envelope);
                    }
                    disk.confirm(offset + 1)
                });
                Ok(Appended::Done(offset, confirm))
            }
            Err(Refusal::Full(back)) => {
                room.enable();
                Ok(Appended::Full(back))
            }
            Err(Refusal::Closed) => Err(self.gone()),
            Err(Refusal::Duplicate(dup)) => Err(StreamError::Duplicate(dup)),
        }
    }

    /// Appends messages in order and returns their offsets. Size checks come
    /// first: one oversize message refuses the whole batch. With block
    /// overflow, appends what fits and waits for room for the rest. On a
    /// durable stream, returns once all of them are stored (one sync for the
    /// batch, when they fit at once); if some could not be, fails with
    /// [`StreamError::Storage`] (those, and the ones after, were taken back;
    /// earlier ones may be stored). With a duplicate window, messages whose
    /// ids it knows are left out, the others appended, and then the first
    /// one left out is reported as [`StreamError::Duplicate`].
    ///
    /// On RabbitMQ the messages go back to back and the call returns once
    /// RabbitMQ confirmed them all, with an empty range at
    /// [`UNKNOWN_OFFSET`](Self::UNKNOWN_OFFSET).
    pub async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<Range<u64>, StreamError> {
        for message in &messages {
            self.check(message)?;
        }
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            if self.is_deleted() {
                return Err(self.gone());
            }
            remote.publish_batch(messages).await?;
            return Ok(Self::UNKNOWN_OFFSET..Self::UNKNOWN_OFFSET);
        }
        let mut rest = messages.into_iter();
        let mut batch = Batch {
            pending: rest.next(),
            rest: &mut rest,
            start: None,
            end: None,
            confirms: Vec::new(),
            duplicate: None,
        };
        let mut wake = Vec::new();
        loop {
            let mut room = pin!(self.core.space.notified());
            let now = postbox::clock::now_ms();
            let done = self.append_some(&mut batch, now, &mut wake, room.as_mut())?;
            StreamCore::wake(std::mem::take(&mut wake));
            if let Some(next) = done {
                // One confirm, unless the batch had to wait for room.
                for confirm in std::mem::take(&mut batch.confirms) {
                    StreamCore::confirmed(Some(confirm)).await?;
                }
                if let Some(dup) = batch.duplicate.take() {
                    return Err(StreamError::Duplicate(dup));
                }
                return Ok(batch.start.unwrap_or(next)..batch.end.unwrap_or(next));
            }
            room.await;
        }
    }

    /// Appends what fits of a batch under one lock (see
    /// [`append_one`](Self::append_one)); a durable stream's confirm covers
    /// them. Returns the next offset once everything is appended.
    fn append_some(
        &self,
        batch: &mut Batch<'_>,
        now: u64,
        wake: &mut Vec<Waker>,
        room: Pin<&mut Notified<'_>>,
    ) -> Result<Option<u64>, StreamError> {
        let mut log = self.core.log.lock();
        if log.is_closed() {
            return Err(self.gone());
        }
        let mut disk = self.core.disk_append()?;
        let mut appended = None;
        while let Some(message) = batch.pending.take() {
            match log.append(message, now, wake) {
                Ok(offset) => {
                    if let (Some(disk), Some(r)) = (disk.as_mut(), log.newest()) {
                        disk.record(r.offset, r.timestamp_ms, &r.envelope);
                    }
                    batch.start.get_or_insert(offset);
                    batch.end = Some(offset + 1);
                    appended = Some(offset + 1);
                    batch.pending = batch.rest.next();
                }
                Err(Refusal::Full(back)) => {
                    batch.pending = Some(back);
                    room.enable();
                    break;
                }
                Err(Refusal::Closed) => return Err(self.gone()),
                Err(Refusal::Duplicate(dup)) => {
                    // Left out; the rest of the batch goes on.
                    batch.duplicate.get_or_insert(dup);
                    batch.pending = batch.rest.next();
                }
            }
        }
        // What this round appended: if it fails, the records after it were
        // taken back too, and their offsets handed out again.
        if let (Some(disk), Some(end)) = (disk, appended) {
            batch.confirms.push(disk.confirm(end));
        }
        Ok(batch.pending.is_none().then(|| log.next()))
    }

    /// Appends a message if that needs no waiting; a block-mode stream whose
    /// slowest subscriber is behind refuses with
    /// [`TryStreamPublishError::Full`], which hands the message back.
    ///
    /// On a durable stream it does not wait for the disk either: the record
    /// is stored with the next group, and readable then. If that fails, the
    /// record is taken back without telling anyone (use
    /// [`publish`](Self::publish) to know).
    ///
    /// On RabbitMQ every publish waits for a confirm: this fails with
    /// [`StreamError::Unsupported`].
    pub fn try_publish(&self, message: Envelope) -> Result<u64, TryStreamPublishError> {
        self.check(&message)?;
        #[cfg(feature = "amqp")]
        if self.on_rabbitmq().is_some() {
            return Err(
                StreamError::Unsupported("try_publish (a publish waits for its confirm)").into(),
            );
        }
        let mut wake = Vec::new();
        let now = postbox::clock::now_ms();
        let appended = {
            let mut log = self.core.log.lock();
            if log.is_closed() {
                return Err(self.gone().into());
            }
            let mut disk = self.core.disk_append()?;
            let appended = log.append(message, now, &mut wake);
            if let (Ok(_), Some(disk), Some(r)) = (&appended, disk.as_mut(), log.newest()) {
                disk.record(r.offset, r.timestamp_ms, &r.envelope);
            }
            appended
        };
        match appended {
            Ok(offset) => {
                StreamCore::wake(wake);
                Ok(offset)
            }
            Err(Refusal::Full(message)) => Err(TryStreamPublishError::Full {
                stream: self.core.name.to_string(),
                message: Box::new(message),
            }),
            Err(Refusal::Closed) => Err(self.gone().into()),
            Err(Refusal::Duplicate(dup)) => Err(StreamError::Duplicate(dup).into()),
        }
    }

    /// Counters and positions (age retention is applied first), with a
    /// durable stream's disk use.
    ///
    /// On RabbitMQ, what this process knows: the records it published, its
    /// live subscribers and what they skipped (AMQP does not say how long a
    /// stream is; RabbitMQ's management API does).
    pub fn stats(&self) -> StreamStats {
        let now = postbox::clock::now_ms();
        let stats = self.core.log.lock().stats(now);
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            return remote.stats(stats);
        }
        self.core.disk_stats(stats)
    }

    /// Waits until a durable stream has stored every record appended before
    /// this call (per the broker's [`SyncPolicy`](crate::SyncPolicy)),
    /// written its named subscribers' positions as of this call (synced), and
    /// deleted the segments retention has emptied. Positions are otherwise
    /// written lazily, within 200 ms of a commit (a lost position means a
    /// redelivery after a crash, never a skip); this makes them durable when
    /// that matters. On a stream that is not durable it returns at once.
    ///
    /// ```
    /// use postbox::Runtime;
    /// use postbox_actors::{Broker, Envelope, StorageOptions, StreamOptions};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("postbox-stream-doc-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let rt = Runtime::new()?;
    /// {
    ///     let broker = Broker::open(&rt, StorageOptions::new(&dir))?;
    ///     let audit = broker.declare_stream("audit", StreamOptions::default().durable()).await?;
    ///     // Returns once the record is on disk.
    ///     assert_eq!(audit.publish(Envelope::new("login")).await?, 0);
    ///     audit.sync().await?;
    /// }
    /// let broker = Broker::open(&rt, StorageOptions::new(&dir))?;
    /// let audit = broker.stream("audit")?;
    /// assert_eq!(audit.stats().len, 1);
    /// assert_eq!(audit.publish(Envelope::new("logout")).await?, 1);
    /// # drop(broker); std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub async fn sync(&self) -> Result<(), StreamError> {
        let Some(disk) = &self.core.disk else {
            return Ok(());
        };
        if self.is_deleted() {
            return Err(self.gone());
        }
        let confirm = disk.sync();
        StreamCore::confirmed(Some(confirm)).await
    }

    /// The position stored for the named subscriber `name` when it last
    /// stopped; `None` if it never did (or is live).
    pub fn stored_offset(&self, name: &str) -> Option<u64> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            return remote.stored_offset(name);
        }
        self.core.log.lock().stored_offset(name)
    }

    /// Its live subscribers: each one's name (for a named subscriber) and
    /// position, with its lag behind the stream's end (on RabbitMQ, which
    /// does not say where the end is, the lag is 0).
    pub fn subscribers(&self) -> Vec<(Option<String>, SubscriberStats)> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            return remote.subscribers();
        }
        self.core.log.lock().readers()
    }

    /// True once the stream has been deleted.
    pub fn is_deleted(&self) -> bool {
        self.core.log.lock().is_closed()
    }

    /// Starts a supervised subscriber reading from `start` (a named one resumes
    /// at its stored position instead). `factory` builds the handler, and
    /// builds it again after each crash. Returns once the subscriber is
    /// registered: every record appended after this returns reaches it.
    pub async fn subscribe<C, F>(
        &self,
        start: StreamStart,
        options: SubscribeOptions,
        factory: F,
    ) -> Result<StreamSubscription<C>, StreamError>
    where
        C: StreamConsumer,
        F: StreamConsumerFactory<C>,
    {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.on_rabbitmq() {
            return remote.subscribe(&self.core, start, options, factory).await;
        }
        let core = self.core.clone();
        let now = postbox::clock::now_ms();
        let reader = {
            let mut log = core.log.lock();
            if log.is_closed() {
                return Err(self.gone());
            }
            log.add_reader(start, options.name.clone(), now)
                .map_err(|()| StreamError::SubscriberExists {
                    stream: core.name.to_string(),
                    name: options.name.clone().unwrap_or_default(),
                })?
        };
        let n = core.seq.fetch_add(1, Ordering::Relaxed);
        let label = match &options.name {
            Some(name) => format!("stream:{}:{name}", core.name),
            None => format!("stream:{}:{n}", core.name),
        };
        let child_core = core.clone();
        let batch = options.batch;
        let named = options.name.is_some();
        let addr = core
            .runtime
            .build(move || {
                Some(StreamSubscriber::new(
                    child_core.clone(),
                    reader,
                    batch,
                    named,
                    factory(),
                ))
            })
            .mailbox(options.mailbox)
            .name(label)
            .supervise(options.supervision.strategy())
            .spawn();
        core.subscribers.lock().insert(reader, Kept::new(&addr));
        // When the subscriber is down for good, its position stops counting.
        let weak = Arc::downgrade(&core);
        addr.any().on_exit(Some(u64::MAX), move |_| {
            if let Some(core) = weak.upgrade() {
                core.remove_reader(reader);
            }
        });
        if addr.is_closed() {
            core.remove_reader(reader);
            return Err(StreamError::Stopped);
        }
        Ok(StreamSubscription {
            core,
            reader: ReaderOf::Local(reader),
            stop: addr.recipient(),
            addr: addr.any(),
            consumer: std::marker::PhantomData,
        })
    }
}
