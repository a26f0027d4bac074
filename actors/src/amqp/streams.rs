//! Streams on RabbitMQ: a postbox stream is a RabbitMQ stream queue
//! (`x-queue-type: stream`), read over AMQP 0-9-1 as RabbitMQ allows it.
//!
//! - declaring, binding and deleting one are those of a queue, with the
//!   stream's retention as arguments (`x-max-length-bytes`, `x-max-age`);
//!   what a RabbitMQ stream cannot do (retention by count, `block`
//!   overflow, duplicate windows) is refused with
//!   [`StreamError::Unsupported`];
//! - a publish goes through the default exchange with a publisher confirm:
//!   RabbitMQ does not say at which offset, so it returns
//!   [`UNKNOWN_OFFSET`](crate::StreamHandle::UNKNOWN_OFFSET);
//! - a subscriber is a supervised actor ([`RemoteSubscriber`]) fed by a
//!   task that owns its channel: `basic.qos` (RabbitMQ requires a
//!   prefetch on a stream), then `basic.consume` with an `x-stream-offset`.
//!   Records come with their offset (RabbitMQ's `x-stream-offset` header).
//!
//! Positions are client-side, as they are for any stream reader: the
//! subscriber keeps the first offset it has not handled. When its handler
//! fails, or the connection is lost, the feed consumes again from there on
//! a new channel, and the records of the old one still in the actor's
//! mailbox are dropped (each carries its channel's epoch). A named
//! subscriber's position is kept by this process when it stops (AMQP has
//! no offset tracking: that is RabbitMQ's stream protocol).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use parking_lot::Mutex;
use postbox::{Actor, AnyAddr, Context, Failure, Handler, Message, Recipient};
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use super::connection::{Remote, Session};
use super::convert::{envelope, short};
use super::topology::{Record as Declarations, Subject, refusal};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::stream::handle::StreamCore;
use crate::stream::log::Record;
use crate::stream::subscriber::{ReaderOf, StopSubscriber};
use crate::stream::{
    StreamConsumer, StreamConsumerFactory, StreamDelivery, StreamError, StreamOptions,
    StreamOverflow, StreamStart, StreamStats, StreamSubscription, SubscribeOptions,
    SubscriberStats,
};

/// A stream queue is durable on RabbitMQ, whatever its options say.
pub(crate) const STREAM_FLAGS: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The header RabbitMQ puts each stream record's offset in.
pub(crate) const OFFSET_HEADER: &str = "x-stream-offset";

/// A stream's options as `queue.declare` arguments; what a RabbitMQ stream
/// cannot do is refused.
pub(crate) fn stream_args(options: &StreamOptions) -> Result<FieldTable, StreamError> {
    if options.max_len.is_some() {
        return Err(StreamError::Unsupported(
            "max_len (a RabbitMQ stream retains by max_bytes and max_age only)",
        ));
    }
    let limited = options.max_bytes.is_some() || options.max_age.is_some();
    if limited && options.overflow == StreamOverflow::Block {
        return Err(StreamError::Unsupported(
            "block overflow (a RabbitMQ stream trims regardless of its readers: StreamOverflow::DropOldest)",
        ));
    }
    if options.dedup.is_some() {
        return Err(StreamError::Unsupported("a duplicate window on a stream"));
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("stream"));
    if let Some(bytes) = options.max_bytes {
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(bytes).unwrap_or(i64::MAX)),
        );
    }
    if let Some(age) = options.max_age {
        // RabbitMQ's finest unit is the second.
        let seconds = age.as_secs() + u64::from(age.subsec_nanos() > 0);
        args.insert("x-max-age".into(), text(&format!("{}s", seconds.max(1))));
    }
    Ok(args)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The `x-stream-offset` argument for `start`.
fn offset_arg(start: StreamStart) -> AMQPValue {
    match start {
        StreamStart::First => text("first"),
        StreamStart::Last => text("last"),
        StreamStart::Next => text("next"),
        StreamStart::Offset(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
        // Seconds, by RabbitMQ's clock, a second early for the clocks'
        // skew: the subscriber skips the records published before `ms`.
        StreamStart::Timestamp(ms) => AMQPValue::Timestamp((ms / 1000).saturating_sub(1)),
    }
}

/// A broker error as a stream's: a missing queue is the stream missing.
fn stream_error(name: &str, err: BrokerError) -> StreamError {
    match err {
        BrokerError::QueueNotFound(_) => StreamError::NotFound(name.to_string()),
        BrokerError::Stopped => StreamError::Stopped,
        other => StreamError::Remote(Box::new(other)),
    }
}

impl Remote {
    /// Declares stream `name` on RabbitMQ and records it (redeclared after
    /// a reconnection).
    pub(crate) async fn declare_stream(
        &self,
        name: &str,
        options: &StreamOptions,
    ) -> Result<(), StreamError> {
        let args = stream_args(options)?;
        let queue = short(name, "a stream name").map_err(|e| stream_error(name, e))?;
        self.timed("queue.declare", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let (queue, args) = (queue.clone(), args.clone());
                async move { channel.queue_declare(queue, STREAM_FLAGS, args).await }
            })
            .await
            .map_err(|e| refusal(self, &e, Subject::Queue(name)))
        })
        .await
        .map_err(|e| stream_error(name, e))?;
        let mut record = self.record.lock();
        let Declarations {
            declared, streams, ..
        } = &mut *record;
        Declarations::declare(declared, streams, name, options.clone(), |_| None);
        Ok(())
    }

    /// Deletes stream `name` on RabbitMQ (`NotFound` if it is missing).
    /// Forgotten here first, whatever RabbitMQ answers: a reconnection must
    /// not declare it again.
    pub(crate) async fn delete_stream(&self, name: &str) -> Result<(), StreamError> {
        self.record
            .lock()
            .forget(&crate::exchange::Destination::Stream(name.into()));
        let queue = short(name, "a stream name").map_err(|e| stream_error(name, e))?;
        // `queue.delete` of a missing queue succeeds: check first.
        self.passive(name)
            .await
            .map_err(|e| stream_error(name, e))?;
        self.timed("queue.delete", async {
            let session = self.session().await?;
            self.on_admin(&session, |channel| {
                let queue = queue.clone();
                async move { channel.queue_delete(queue, Default::default()).await }
            })
            .await
            .map_err(|e| refusal(self, &e, Subject::Queue(name)))
        })
        .await
        .map_err(|e| stream_error(name, e))?;
        Ok(())
    }
}

/// What a [`StreamHandle`](crate::StreamHandle) holds for a stream on
/// RabbitMQ, shared by its handles.
pub(crate) struct RemoteStream {
    remote: Arc<Remote>,
    name: ByteString,
    /// Records this process published.
    published: AtomicU64,
    /// Live subscribers, by number.
    readers: Mutex<HashMap<u64, (Arc<RemoteReader>, AnyAddr)>>,
    next_reader: AtomicU64,
    /// Named subscribers' positions when they stopped, and the live names.
    stored: Mutex<HashMap<String, Option<u64>>>,
    deleted: AtomicBool,
}

impl RemoteStream {
    pub(crate) fn new(remote: &Arc<Remote>, name: &str) -> Self {
        RemoteStream {
            remote: remote.clone(),
            name: ByteString::from(name),
            published: AtomicU64::new(0),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(1),
            stored: Mutex::new(HashMap::new()),
            deleted: AtomicBool::new(false),
        }
    }

    fn gone(&self) -> StreamError {
        if self.remote.is_closed() {
            StreamError::Stopped
        } else {
            StreamError::NotFound(self.name.to_string())
        }
    }

    /// Publishes one record, confirmed.
    pub(crate) async fn publish(&self, message: Envelope) -> Result<(), StreamError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.gone());
        }
        // The size was checked against the stream's limit by the handle.
        self.remote
            .publish_to_queue(&self.name, message, usize::MAX)
            .await
            .map_err(|e| stream_error(&self.name, e))?;
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes records back to back, then waits for all their confirms.
    pub(crate) async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<(), StreamError> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.gone());
        }
        let n = messages.len() as u64;
        self.remote
            .publish_batch(&self.name, messages, usize::MAX)
            .await
            .map_err(|e| stream_error(&self.name, e))?;
        self.published.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// What this process knows: the records it published, its live
    /// subscribers, and what they skipped.
    pub(crate) fn stats(&self, mut stats: StreamStats) -> StreamStats {
        let readers = self.readers.lock();
        stats.published = self.published.load(Ordering::Relaxed);
        stats.subscribers = readers.len();
        stats.skipped = readers.values().map(|(r, _)| r.stats().skipped).sum();
        stats
    }

    /// The live subscribers: each one's name and position.
    pub(crate) fn subscribers(&self) -> Vec<(Option<String>, SubscriberStats)> {
        let mut all: Vec<_> = self
            .readers
            .lock()
            .iter()
            .map(|(n, (r, _))| (*n, r.name.clone(), r.stats()))
            .collect();
        all.sort_by_key(|(n, _, _)| *n);
        all.into_iter().map(|(_, name, s)| (name, s)).collect()
    }

    /// The position named subscriber `name` stopped at, if it did.
    pub(crate) fn stored_offset(&self, name: &str) -> Option<u64> {
        self.stored.lock().get(name).copied().flatten()
    }

    /// Marks the stream deleted and stops its subscribers.
    pub(crate) async fn close(&self) {
        self.deleted.store(true, Ordering::Release);
        let readers: Vec<_> = self.readers.lock().drain().collect();
        for (_, (reader, addr)) in readers {
            reader.stop();
            addr.stop();
            addr.terminated().await;
        }
    }

    /// Starts a supervised subscriber reading from `start` (a named one from
    /// where it stopped in this process); returns once RabbitMQ has its
    /// consumer.
    pub(crate) async fn subscribe<C, F>(
        self: &Arc<Self>,
        core: &Arc<StreamCore>,
        start: StreamStart,
        options: SubscribeOptions,
        factory: F,
    ) -> Result<StreamSubscription<C>, StreamError>
    where
        C: StreamConsumer,
        F: StreamConsumerFactory<C>,
    {
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.gone());
        }
        let mut start = start;
        if let Some(name) = &options.name {
            let mut stored = self.stored.lock();
            match stored.get(name) {
                Some(None) => {
                    return Err(StreamError::SubscriberExists {
                        stream: self.name.to_string(),
                        name: name.clone(),
                    });
                }
                Some(Some(at)) => start = StreamStart::Offset(*at),
                None => {}
            }
            // Live: `None` until it stops.
            stored.insert(name.clone(), None);
        }
        let number = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let reader = Arc::new(RemoteReader {
            stream: self.clone(),
            number,
            name: options.name.clone(),
            start,
            prefetch: u16::try_from(options.batch).unwrap_or(u16::MAX),
            position: Mutex::new(Position::default()),
            epoch: AtomicU64::new(0),
            reopen: Notify::new(),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        });
        let label = match &options.name {
            Some(name) => format!("stream:{}:{name}", self.name),
            None => format!("stream:{}:{number}", self.name),
        };
        let child = reader.clone();
        let addr = core
            .runtime
            .build(move || {
                Some(RemoteSubscriber {
                    consumer: factory(),
                    reader: child.clone(),
                })
            })
            .mailbox(options.mailbox)
            .name(label)
            .supervise(options.supervision.strategy())
            .spawn();
        let any = addr.any();
        self.readers
            .lock()
            .insert(number, (reader.clone(), any.clone()));
        {
            let reader = reader.clone();
            any.on_exit(Some(u64::MAX), move |_| reader.finish());
        }
        // Until RabbitMQ has the consumer: a failure, or the caller giving
        // up on this call, stops the subscriber (and frees its name).
        let mut unstarted = Unstarted {
            reader: reader.clone(),
            addr: any.clone(),
            armed: true,
        };
        let (started, opened) = oneshot::channel();
        tokio::spawn(feed(reader.clone(), addr.recipient(), started));
        let opened = match opened.await {
            Ok(result) => result,
            Err(_) => Err(StreamError::Stopped),
        };
        if let Err(err) = opened {
            drop(unstarted);
            any.terminated().await;
            return Err(err);
        }
        unstarted.armed = false;
        Ok(StreamSubscription {
            core: core.clone(),
            reader: ReaderOf::Remote(reader),
            stop: addr.recipient(),
            addr: any,
            consumer: PhantomData,
        })
    }
}

/// Stops a subscriber whose `subscribe` did not return it.
struct Unstarted {
    reader: Arc<RemoteReader>,
    addr: AnyAddr,
    armed: bool,
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if self.armed {
            self.reader.stop();
            self.addr.stop();
            self.reader.finish();
        }
    }
}

/// One subscriber's position and counters, kept across its incarnations.
#[derive(Default)]
struct Position {
    /// The first offset not handled yet; `None` before the first record.
    next: Option<u64>,
    /// The first offset RabbitMQ delivered, before any is handled: where
    /// `next` and `last` resolved, to read again from after a lost channel
    /// (asking for `next` again would skip what came meanwhile).
    floor: Option<u64>,
    /// The record the handler failed on, how many times, and the records
    /// it said were skipped just before it (said again on the retry).
    failed: Option<Failed>,
    stats: SubscriberStats,
}

#[derive(Clone, Copy)]
struct Failed {
    offset: u64,
    times: u32,
    skipped: u64,
}

/// A subscriber's state shared by its actor, its feed and its
/// subscription.
pub(crate) struct RemoteReader {
    stream: Arc<RemoteStream>,
    number: u64,
    name: Option<String>,
    start: StreamStart,
    prefetch: u16,
    position: Mutex<Position>,
    /// The channel whose records the actor takes: bumped to drop what an
    /// abandoned channel delivered.
    epoch: AtomicU64,
    /// Consume again from the position (the handler failed).
    reopen: Notify,
    stopped: AtomicBool,
    stop: Notify,
}

impl std::fmt::Debug for RemoteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReader")
            .field("stream", &self.stream.name)
            .field("name", &self.name)
            .finish()
    }
}

impl RemoteReader {
    pub(crate) fn stats(&self) -> SubscriberStats {
        self.position.lock().stats
    }

    /// Where to consume from: the position, else the first record
    /// delivered, else the start.
    fn resume(&self) -> StreamStart {
        let position = self.position.lock();
        position
            .next
            .or(position.floor)
            .map_or(self.start, StreamStart::Offset)
    }

    /// Pins where the start resolved, at the first record delivered.
    fn delivered(&self, offset: u64) {
        let mut position = self.position.lock();
        if position.next.is_none() && position.floor.is_none() {
            position.floor = Some(offset);
        }
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_one();
    }

    /// The subscriber is down for good: its feed stops, a named one's
    /// position is kept. Idempotent.
    pub(crate) fn finish(&self) {
        self.stop();
        if self.stream.readers.lock().remove(&self.number).is_none()
            && !self.stream.deleted.load(Ordering::Acquire)
        {
            return;
        }
        if let Some(name) = &self.name {
            let next = {
                let position = self.position.lock();
                position.next.or(position.floor)
            };
            // Nothing delivered from `next` or `last`: where that was is
            // not known here (see the README).
            let at = match (next, self.start) {
                (Some(next), _) => Some(next),
                (None, StreamStart::Offset(at)) => Some(at),
                (None, _) => None,
            };
            let mut stored = self.stream.stored.lock();
            match at {
                Some(at) => {
                    stored.insert(name.clone(), Some(at));
                }
                None => {
                    stored.remove(name);
                }
            }
        }
    }
}

/// A record from the feed, or the end of the stream.
#[derive(Debug)]
pub(crate) enum Fed {
    Record {
        epoch: u64,
        record: Arc<Record>,
    },
    /// The stream was deleted: stop.
    Gone,
}
impl Message for Fed {
    type Reply = ();
}

/// The actor hosting a [`StreamConsumer`] on a RabbitMQ stream.
pub(crate) struct RemoteSubscriber<C: StreamConsumer> {
    consumer: C,
    reader: Arc<RemoteReader>,
}

impl<C: StreamConsumer> Actor for RemoteSubscriber<C> {}

impl<C: StreamConsumer> Handler<Fed> for RemoteSubscriber<C> {
    async fn handle(&mut self, fed: Fed, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let record = match fed {
            Fed::Gone => {
                ctx.stop();
                return Ok(());
            }
            Fed::Record { epoch, record } => {
                if epoch != self.reader.epoch.load(Ordering::Acquire) {
                    return Ok(());
                }
                record
            }
        };
        let offset = record.offset;
        let (attempt, skipped) = {
            let position = self.reader.position.lock();
            match position.next {
                // Handled already (a channel opened again delivers from
                // the position's chunk).
                Some(next) if offset < next => return Ok(()),
                // Before the first record handled: RabbitMQ starts at a
                // time by the second (less a margin), this at the
                // millisecond, by the message's timestamp.
                None => {
                    if let StreamStart::Timestamp(ms) = self.reader.start
                        && record.timestamp_ms < ms
                    {
                        return Ok(());
                    }
                }
                Some(_) => {}
            }
            match position.failed.filter(|f| f.offset == offset) {
                Some(failed) => (failed.times, failed.skipped),
                // A gap: retention trimmed records before this reader got
                // them.
                None => (0, position.next.map_or(0, |next| offset - next)),
            }
        };
        let span = tracing::debug_span!(
            "stream",
            stream = %self.reader.stream.name,
            offset,
            message_id = %record.envelope.id(),
            correlation_id = record.envelope.correlation_id(),
            redelivered = attempt > 0,
        );
        let delivery = StreamDelivery::new(record, attempt, skipped);
        let outcome = AssertUnwindSafe(self.consumer.handle(delivery).instrument(span))
            .catch_unwind()
            .await;
        let failure = match outcome {
            Ok(Ok(())) => {
                let mut position = self.reader.position.lock();
                position.next = Some(offset + 1);
                position.failed = None;
                position.stats.offset = offset + 1;
                position.stats.delivered += 1;
                position.stats.skipped += skipped;
                return Ok(());
            }
            Ok(Err(failure)) => failure,
            Err(panic) => Failure::from_panic(panic),
        };
        {
            let mut position = self.reader.position.lock();
            position.next = Some(offset);
            position.failed = Some(Failed {
                offset,
                times: attempt + 1,
                skipped,
            });
            position.stats.offset = offset;
            position.stats.redeliveries += 1;
        }
        // What the channel delivered after this record is dropped; the
        // feed consumes again from it.
        self.reader.epoch.fetch_add(1, Ordering::AcqRel);
        self.reader.reopen.notify_one();
        tracing::warn!(stream = %self.reader.stream.name, offset, %failure, "subscriber failed: it restarts at this record");
        Err(failure)
    }
}

impl<C: StreamConsumer> Handler<StopSubscriber> for RemoteSubscriber<C> {
    async fn handle(
        &mut self,
        _: StopSubscriber,
        ctx: &mut Context<Self>,
    ) -> Result<Option<SubscriberStats>, Failure> {
        ctx.stop();
        Ok(Some(self.reader.stats()))
    }
}

/// How a channel's reading ended.
enum Ended {
    /// The subscriber stopped.
    Stopped,
    /// The handler failed: read again from the position.
    Reopen,
    /// RabbitMQ cancelled the consumer: the stream was deleted.
    Deleted,
    /// The channel or the connection was lost.
    Lost,
}

/// The pause before consuming again on a live connection whose channel
/// RabbitMQ closed, doubled per failure in a row up to the maximum.
const REOPEN_PAUSE: Duration = Duration::from_millis(100);
const REOPEN_PAUSE_MAX: Duration = Duration::from_secs(5);

/// Feeds the subscriber: consumes from its position, on a new channel after
/// each failure or reconnection, until it stops. `started` hears how the
/// first `basic.consume` went.
async fn feed(
    reader: Arc<RemoteReader>,
    to: Recipient<Fed>,
    started: oneshot::Sender<Result<(), StreamError>>,
) {
    let remote = reader.stream.remote.clone();
    let name = reader.stream.name.clone();
    let mut started = Some(started);
    let mut session = match remote.session().await {
        Ok(session) => session,
        Err(err) => {
            if let Some(started) = started.take() {
                let _ = started.send(Err(stream_error(&name, err)));
            }
            return;
        }
    };
    // Attempts in a row that failed to consume, for the pause.
    let mut failures = 0u32;
    loop {
        if reader.stopped.load(Ordering::Acquire) {
            break;
        }
        // The epoch first, then the position: a record the actor handles
        // in between moves the position before it is read here.
        let epoch = reader.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let from = reader.resume();
        let ended = match open(&remote, &session, &reader, from).await {
            Ok((channel, mut consumer)) => {
                if let Some(started) = started.take() {
                    let _ = started.send(Ok(()));
                }
                failures = 0;
                let ended = pump(&reader, &to, epoch, &channel, &mut consumer).await;
                // Closed before the consumer is dropped: see `consume`.
                let _ = channel.close(200, "subscriber done".into()).await;
                drop(consumer);
                ended
            }
            Err(err) => {
                if let Some(started) = started.take() {
                    let _ = started.send(Err(stream_error(&name, err)));
                    return;
                }
                match err {
                    BrokerError::QueueNotFound(_) => Ended::Deleted,
                    BrokerError::Stopped => Ended::Stopped,
                    _ => {
                        // A refusal that may last (permissions, another
                        // kind of queue under the name): said, and tried
                        // again less and less often.
                        failures = failures.saturating_add(1);
                        tracing::warn!(stream = %name, %err, failures, "reading the stream again failed; retrying");
                        Ended::Lost
                    }
                }
            }
        };
        let ended = match ended {
            // RabbitMQ cancels a consumer for other reasons than a deletion
            // (a replica restarting): only a missing stream ends it.
            Ended::Deleted => match remote.passive(&name).await {
                Err(BrokerError::QueueNotFound(_)) => Ended::Deleted,
                Err(BrokerError::Stopped) => Ended::Stopped,
                _ => Ended::Lost,
            },
            other => other,
        };
        match ended {
            Ended::Stopped => break,
            Ended::Reopen => {}
            Ended::Deleted => {
                tracing::warn!(stream = %name, "the stream is gone: its subscriber stops");
                let _ = to.send(Fed::Gone).await;
                break;
            }
            Ended::Lost => {
                let pause = REOPEN_PAUSE
                    .saturating_mul(1 << failures.min(6))
                    .min(REOPEN_PAUSE_MAX);
                let next = async {
                    if session.connection.status().connected() {
                        tokio::time::sleep(pause).await;
                        if session.connection.status().connected() {
                            return Some(session.clone());
                        }
                    }
                    remote.next_session(session.generation).await
                };
                tokio::select! {
                    next = next => match next {
                        Some(next) => session = next,
                        None => break,
                    },
                    () = reader.stop.notified() => break,
                }
            }
        }
    }
}

/// A channel with the prefetch, consuming the stream from `from`.
async fn open(
    remote: &Remote,
    session: &Session,
    reader: &RemoteReader,
    from: StreamStart,
) -> Result<(lapin::Channel, lapin::Consumer), BrokerError> {
    let name = &*reader.stream.name;
    let subject = Subject::Queue(name);
    remote
        .timed("basic.consume", async {
            let channel = session
                .connection
                .create_channel()
                .await
                .map_err(|e| refusal(remote, &e, subject))?;
            channel
                .basic_qos(reader.prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(|e| refusal(remote, &e, subject))?;
            let mut args = FieldTable::default();
            args.insert(OFFSET_HEADER.into(), offset_arg(from));
            let consumer = channel
                .basic_consume(
                    short(name, "a stream name")?,
                    format!("postbox-stream-{}", remote.consumer_id()).into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .map_err(|e| refusal(remote, &e, subject))?;
            Ok((channel, consumer))
        })
        .await
}

/// Hands records to the actor, one mailbox slot each (the mailbox and the
/// prefetch bound what is in flight), acking each once it is in the
/// mailbox: a stream's acks only grant credit.
async fn pump(
    reader: &RemoteReader,
    to: &Recipient<Fed>,
    epoch: u64,
    channel: &lapin::Channel,
    consumer: &mut lapin::Consumer,
) -> Ended {
    loop {
        let next = tokio::select! {
            biased;
            () = reader.stop.notified() => return Ended::Stopped,
            () = reader.reopen.notified() => return Ended::Reopen,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => {
                tracing::debug!(stream = %reader.stream.name, error = %reader.stream.remote.scrub(&err), "stream channel lost");
                return Ended::Lost;
            }
            None if channel.status().connected() => return Ended::Deleted,
            None => return Ended::Lost,
        };
        let Some(offset) = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(OFFSET_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                _ => None,
            })
        else {
            // Not a stream's record (the name now holds another kind of
            // queue): acked, or its credit would be held for ever.
            tracing::warn!(stream = %reader.stream.name, "a record without its offset: skipped");
            let _ = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await;
            continue;
        };
        reader.delivered(offset);
        let message = envelope(
            delivery.data,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            false,
            &delivery.properties,
        );
        let record = Arc::new(Record {
            offset,
            timestamp_ms: message.timestamp_ms(),
            envelope: message,
        });
        tokio::select! {
            biased;
            () = reader.stop.notified() => return Ended::Stopped,
            sent = to.send(Fed::Record { epoch, record }) => {
                if sent.is_err() {
                    return Ended::Stopped;
                }
            }
        }
        let _ = channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_rabbitmq_lacks_is_refused_and_the_rest_maps_to_arguments() {
        assert!(matches!(
            stream_args(&StreamOptions::default()),
            Err(StreamError::Unsupported(what)) if what.starts_with("max_len")
        ));
        let blocking = StreamOptions::unbounded().max_bytes(1 << 20);
        assert!(matches!(
            stream_args(&blocking),
            Err(StreamError::Unsupported(what)) if what.starts_with("block")
        ));
        // Nothing is trimmed: block has nothing to wait for.
        assert!(stream_args(&StreamOptions::unbounded()).is_ok());
        let options = StreamOptions::unbounded()
            .max_bytes(1 << 20)
            .max_age(Duration::from_millis(1500))
            .overflow(StreamOverflow::DropOldest);
        let args = stream_args(&options).unwrap();
        let args = args.inner();
        assert_eq!(args.get("x-queue-type"), Some(&text("stream")));
        assert_eq!(
            args.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(1 << 20))
        );
        assert_eq!(args.get("x-max-age"), Some(&text("2s")));
    }

    #[test]
    fn start_positions_become_x_stream_offset() {
        assert_eq!(offset_arg(StreamStart::First), text("first"));
        assert_eq!(offset_arg(StreamStart::Next), text("next"));
        assert_eq!(offset_arg(StreamStart::Last), text("last"));
        assert_eq!(
            offset_arg(StreamStart::Offset(42)),
            AMQPValue::LongLongInt(42)
        );
        assert_eq!(
            offset_arg(StreamStart::Timestamp(1_700_000_000_999)),
            AMQPValue::Timestamp(1_699_999_999)
        );
    }
}
