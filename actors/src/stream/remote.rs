//! Streams a server keeps (RabbitMQ's stream queues, with feature `amqp`):
//! the half kept in this process, the same for any such backend.
//!
//! The backend ([`StreamBackend`]) publishes, and feeds each subscriber the
//! records from a position. This module keeps the positions: a subscriber
//! is a supervised actor ([`RemoteSubscriber`]) handling the records its
//! feed sends it, one mailbox slot each, and remembering the first offset
//! it has not handled. When its handler fails, or the connection is lost,
//! the feed starts again from there, and the records of the abandoned feed
//! still in the mailbox are dropped (each carries its feed's epoch). A
//! named subscriber's position is stored here when it stops.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytestring::ByteString;
use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use postbox::{Actor, AnyAddr, Context, Failure, Handler, Message, Recipient};
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::stream::error::StreamError;
use crate::stream::handle::StreamCore;
use crate::stream::log::{Record, StreamStats, SubscriberStats};
use crate::stream::options::{StreamStart, SubscribeOptions};
use crate::stream::subscriber::{
    ReaderOf, StopSubscriber, StreamConsumer, StreamConsumerFactory, StreamDelivery,
    StreamSubscription,
};

/// What a backend keeping streams does: publishes, and feeds a subscriber
/// the records from its position. Positions, subscribers and their actors
/// are kept here, the same for any backend.
pub(crate) trait StreamBackend: Send + Sync + 'static {
    /// Publishes one record, confirmed.
    fn publish(&self, message: Envelope) -> BoxFuture<'_, Result<(), StreamError>>;
    /// Publishes records back to back, confirmed together.
    fn publish_batch(&self, messages: Vec<Envelope>) -> BoxFuture<'_, Result<(), StreamError>>;
    /// Starts feeding `reader` (until it stops): records to `to`, from
    /// [`RemoteReader::resume`], again from there whenever asked or the
    /// connection was lost; `started` hears how the first attempt went.
    fn feed(
        &self,
        reader: Arc<RemoteReader>,
        to: Recipient<Fed>,
        started: oneshot::Sender<Result<(), StreamError>>,
    );
}

/// What a [`StreamHandle`](crate::StreamHandle) holds for a stream a
/// server keeps, shared by its handles.
pub(crate) struct RemoteStream {
    backend: Box<dyn StreamBackend>,
    name: ByteString,
    /// Records this process published.
    published: AtomicU64,
    /// Live subscribers, by number.
    readers: Mutex<HashMap<u64, (Arc<RemoteReader>, AnyAddr)>>,
    next_reader: AtomicU64,
    /// Named subscribers' positions when they stopped, and the live names.
    stored: Mutex<HashMap<String, Option<u64>>>,
}

impl RemoteStream {
    pub(crate) fn new(name: &str, backend: Box<dyn StreamBackend>) -> Self {
        RemoteStream {
            backend,
            name: ByteString::from(name),
            published: AtomicU64::new(0),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(1),
            stored: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes one record, confirmed. (The handle refuses calls on a
    /// deleted stream, marked so in its log as any stream is.)
    pub(crate) async fn publish(&self, message: Envelope) -> Result<(), StreamError> {
        // The size was checked against the stream's limit by the handle.
        self.backend.publish(message).await?;
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes records back to back, then waits for all their confirms.
    pub(crate) async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<(), StreamError> {
        let n = messages.len() as u64;
        self.backend.publish_batch(messages).await?;
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

    /// Stops its subscribers: the stream was deleted.
    pub(crate) async fn close(&self) {
        let readers: Vec<_> = self.readers.lock().drain().collect();
        for (_, (reader, addr)) in readers {
            reader.stop();
            addr.stop();
            addr.terminated().await;
        }
    }

    /// Starts a supervised subscriber reading from `start` (a named one from
    /// where it stopped in this process); returns once the server has its
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
        if core.log.lock().is_closed() {
            return Err(core.gone());
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
        // Until the server has the consumer: a failure, or the caller giving
        // up on this call, stops the subscriber (and frees its name).
        let mut unstarted = Unstarted {
            reader: reader.clone(),
            addr: any.clone(),
            armed: true,
        };
        let (started, opened) = oneshot::channel();
        self.backend.feed(reader.clone(), addr.recipient(), started);
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
    /// The stream's name.
    pub(crate) fn stream(&self) -> &ByteString {
        &self.stream.name
    }

    /// Records in flight at most (a backend's prefetch).
    pub(crate) fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// A new epoch for a new feed: records of the earlier ones are dropped.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether the subscriber stopped for good.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves when the subscriber stops for good (if it had already, on
    /// the first call).
    pub(crate) async fn stopping(&self) {
        self.stop.notified().await;
    }

    /// Resolves when the subscriber asks to be fed again from its
    /// position (its handler failed).
    pub(crate) async fn reopening(&self) {
        self.reopen.notified().await;
    }

    pub(crate) fn stats(&self) -> SubscriberStats {
        self.position.lock().stats
    }

    /// Where to consume from: the position, else the first record
    /// delivered, else the start.
    pub(crate) fn resume(&self) -> StreamStart {
        let position = self.position.lock();
        position
            .next
            .or(position.floor)
            .map_or(self.start, StreamStart::Offset)
    }

    /// Pins where the start resolved, at the first record delivered.
    pub(crate) fn delivered(&self, offset: u64) {
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
        if self.stream.readers.lock().remove(&self.number).is_none() {
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

/// The actor hosting a [`StreamConsumer`] on a stream a server keeps.
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
