//! Stream subscribers: the [`StreamConsumer`] trait users implement (closures
//! `FnMut(StreamDelivery) -> impl Future` are consumers), the
//! [`StreamDelivery`] they receive, the [`StreamSubscriber`] actor that reads
//! the log for them, and the [`StreamSubscription`] handle.
//!
//! The actor's mailbox carries no records, only wake-ups ([`Pump`]) and
//! control messages. On each pump it reads a batch from the log (one lock, an
//! `Arc` bump per record), hands the records to the handler one at a time,
//! then commits its position and reads the next batch under one more lock. If
//! there is more, it pumps itself again (one mailbox message per batch); if
//! not, it parks at the tail, and the next append wakes it.
//!
//! A handler that returns an error or panics fails the actor: the position is
//! committed up to the record that failed, the actor rebuilds the handler
//! from its factory (with backoff, within a restart limit), and the new
//! incarnation starts at that record, flagged as a redelivery (at least once).
//! While it restarts its position still holds back block-mode retention.

use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use postbox::{Actor, Addr, AnyAddr, Context, ExitReason, Failure, Handler, Message, Recipient};
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::stream::handle::StreamCore;
use crate::stream::log::{Read, ReaderId, Record, SubscriberStats};

/// What a stream subscriber does with each record.
///
/// Returning `Err` (or panicking) fails the subscriber: it is restarted and the
/// record is delivered again.
pub trait StreamConsumer: 'static {
    /// Handles one record.
    fn handle(&mut self, delivery: StreamDelivery) -> impl Future<Output = Result<(), Failure>>;
}

impl<F, Fut> StreamConsumer for F
where
    F: FnMut(StreamDelivery) -> Fut + 'static,
    Fut: Future<Output = Result<(), Failure>>,
{
    fn handle(&mut self, delivery: StreamDelivery) -> impl Future<Output = Result<(), Failure>> {
        self(delivery)
    }
}

/// Builds a stream consumer, at start and again after each crash.
pub trait StreamConsumerFactory<C: StreamConsumer>: Fn() -> C + Send + Sync + 'static {}

impl<C: StreamConsumer, F: Fn() -> C + Send + Sync + 'static> StreamConsumerFactory<C> for F {}

/// One record handed to a subscriber. It derefs to the [`Envelope`]; the
/// message itself is shared by every subscriber (cloning a delivery bumps a
/// reference count).
#[derive(Clone, Debug)]
pub struct StreamDelivery {
    record: Arc<Record>,
    attempt: u32,
    skipped: u64,
}

impl StreamDelivery {
    pub(crate) fn new(record: Arc<Record>, attempt: u32, skipped: u64) -> Self {
        StreamDelivery {
            record,
            attempt,
            skipped,
        }
    }

    /// The record's offset in the stream.
    pub fn offset(&self) -> u64 {
        self.record.offset
    }

    /// When it was appended, in epoch milliseconds on [`postbox::clock`].
    pub fn timestamp_ms(&self) -> u64 {
        self.record.timestamp_ms
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.record.envelope
    }

    /// True if this subscriber's handler failed on this record before.
    pub fn redelivered(&self) -> bool {
        self.attempt > 0
    }

    /// How many times this subscriber's handler failed on this record before
    /// (0 on the first delivery).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many records this subscriber missed just before this one, because
    /// drop-oldest retention trimmed them before it read them (0 almost always).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

impl Deref for StreamDelivery {
    type Target = Envelope;

    fn deref(&self) -> &Envelope {
        &self.record.envelope
    }
}

/// "Read the log": a wake-up for a parked subscriber, or the next batch.
#[derive(Debug)]
pub(crate) struct Pump;
impl Message for Pump {
    type Reply = ();
}

/// The actor hosting a [`StreamConsumer`] on one stream.
pub(crate) struct StreamSubscriber<C: StreamConsumer> {
    consumer: C,
    core: Arc<StreamCore>,
    reader: ReaderId,
    batch_size: usize,
    /// A named subscriber: a durable stream writes its commits.
    named: bool,
    /// Records read but not handled yet, and what the read said about them.
    batch: Vec<Arc<Record>>,
    read: Read,
    me: Option<Addr<Self>>,
    /// A pump to self did not fit in the mailbox: send it when it drains.
    repump: bool,
}

impl<C: StreamConsumer> StreamSubscriber<C> {
    pub(crate) fn new(
        core: Arc<StreamCore>,
        reader: ReaderId,
        batch: usize,
        named: bool,
        consumer: C,
    ) -> Self {
        StreamSubscriber {
            consumer,
            core,
            reader,
            batch_size: batch.max(1),
            named,
            batch: Vec::new(),
            read: Read::default(),
            me: None,
            repump: false,
        }
    }

    /// Commits `done` (if any) and reads the next batch, under one lock.
    fn fetch(&mut self, done: Option<u64>) -> Read {
        // The clock matters only to age retention; read it outside the lock.
        let now = if self.core.options.max_age.is_some() {
            postbox::clock::now_ms()
        } else {
            0
        };
        let read =
            self.core
                .log
                .lock()
                .read(self.reader, done, self.batch_size, now, &mut self.batch);
        if read.notify {
            self.core.release_publishers();
        }
        if self.named && done.is_some() {
            self.core.moved();
        }
        if read.skipped > 0 {
            tracing::warn!(
                stream = %self.core.name,
                skipped = read.skipped,
                "subscriber fell behind: records were trimmed before it read them"
            );
        }
        read
    }

    fn pump_self(&mut self) {
        if let Some(me) = &self.me
            && me.try_send(Pump).is_err()
        {
            self.repump = true;
        }
    }
}

impl<C: StreamConsumer> Actor for StreamSubscriber<C> {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(me) = ctx.addr() else {
            ctx.stop();
            return Ok(());
        };
        if !self.core.log.lock().set_waker(self.reader, me.recipient()) {
            ctx.stop();
            return Ok(());
        }
        self.me = Some(me);
        self.pump_self();
        Ok(())
    }

    async fn drained(&mut self, _ctx: &mut Context<Self>) -> Result<(), Failure> {
        if std::mem::take(&mut self.repump) {
            self.pump_self();
        }
        Ok(())
    }
}

/// Hands a batch to the handler in order; `at` tracks the record in hand.
async fn deliver<C: StreamConsumer>(
    consumer: &mut C,
    batch: &mut Vec<Arc<Record>>,
    read: Read,
    at: &Cell<u64>,
    stream: &str,
) -> Result<(), Failure> {
    let mut first = true;
    for record in batch.drain(..) {
        at.set(record.offset);
        let (attempt, skipped) = if first {
            first = false;
            (read.attempt, read.skipped)
        } else {
            (0, 0)
        };
        let span = tracing::debug_span!(
            "stream",
            stream,
            offset = record.offset,
            message_id = %record.envelope.id(),
            correlation_id = record.envelope.correlation_id(),
            redelivered = attempt > 0,
        );
        let delivery = StreamDelivery::new(record, attempt, skipped);
        consumer.handle(delivery).instrument(span).await?;
    }
    Ok(())
}

impl<C: StreamConsumer> Handler<Pump> for StreamSubscriber<C> {
    async fn handle(&mut self, _: Pump, ctx: &mut Context<Self>) -> Result<(), Failure> {
        if self.batch.is_empty() {
            let read = self.fetch(None);
            if read.gone {
                ctx.stop();
                return Ok(());
            }
            if read.parked {
                return Ok(());
            }
            self.read = read;
        }
        let Some(start) = self.batch.first().map(|r| r.offset) else {
            return Ok(());
        };
        let at = Cell::new(start);
        let read = std::mem::take(&mut self.read);
        let mut batch = std::mem::take(&mut self.batch);
        let outcome = AssertUnwindSafe(deliver(
            &mut self.consumer,
            &mut batch,
            read,
            &at,
            &self.core.name,
        ))
        .catch_unwind()
        .await;
        batch.clear();
        self.batch = batch;
        let failure = match outcome {
            Ok(Ok(())) => {
                let read = self.fetch(Some(at.get() + 1));
                if read.gone {
                    ctx.stop();
                } else if !read.parked {
                    self.read = read;
                    self.pump_self();
                }
                return Ok(());
            }
            Ok(Err(failure)) => failure,
            Err(panic) => Failure::from_panic(panic),
        };
        // At least once: the next incarnation starts at the record that failed.
        let notify = self.core.log.lock().fail(self.reader, at.get());
        if notify {
            self.core.release_publishers();
        }
        if self.named {
            self.core.moved();
        }
        tracing::warn!(stream = %self.core.name, offset = at.get(), %failure, "subscriber failed: it restarts at this record");
        Err(failure)
    }
}

/// Graceful cancel: stop between batches (the position is committed); replies
/// with the final stats.
pub(crate) struct StopSubscriber;
impl Message for StopSubscriber {
    type Reply = Option<SubscriberStats>;
}
impl<C: StreamConsumer> Handler<StopSubscriber> for StreamSubscriber<C> {
    async fn handle(
        &mut self,
        _: StopSubscriber,
        ctx: &mut Context<Self>,
    ) -> Result<Option<SubscriberStats>, Failure> {
        ctx.stop();
        Ok(self.core.log.lock().reader_stats(self.reader))
    }
}

/// A running stream subscriber started by
/// [`StreamHandle::subscribe`](crate::stream::StreamHandle::subscribe).
///
/// Dropping the handle does not stop the subscriber; [`cancel`](Self::cancel)
/// does, and so does deleting the stream.
pub struct StreamSubscription<C: StreamConsumer> {
    pub(crate) core: Arc<StreamCore>,
    pub(crate) reader: ReaderOf,
    /// The subscriber actor, whichever kind it is.
    pub(crate) addr: AnyAddr,
    pub(crate) stop: Recipient<StopSubscriber>,
    pub(crate) consumer: PhantomData<fn() -> C>,
}

/// Where a subscription's position is kept.
pub(crate) enum ReaderOf {
    /// In the stream's log.
    Local(ReaderId),
    /// By this process, for a stream on RabbitMQ.
    #[cfg(feature = "amqp")]
    Remote(Arc<crate::stream::remote::RemoteReader>),
}

impl<C: StreamConsumer> std::fmt::Debug for StreamSubscription<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSubscription")
            .field("stream", &self.core.name)
            .field("actor", &self.addr.id())
            .finish()
    }
}

impl<C: StreamConsumer> StreamSubscription<C> {
    /// The stream it reads.
    pub fn stream(&self) -> &str {
        &self.core.name
    }

    /// The subscriber actor (stable across its restarts): its identity,
    /// stats and death watch.
    pub fn addr(&self) -> AnyAddr {
        self.addr.clone()
    }

    /// Its position and counters; `None` once it has stopped for good.
    pub fn stats(&self) -> Option<SubscriberStats> {
        match &self.reader {
            ReaderOf::Local(reader) => self.core.log.lock().reader_stats(*reader),
            #[cfg(feature = "amqp")]
            ReaderOf::Remote(reader) => (!self.addr.is_terminated()).then(|| reader.stats()),
        }
    }

    /// Stops the subscriber gracefully: it finishes the batch in hand, commits
    /// its position (stored, for a named subscriber), and stops without being
    /// restarted. Returns its final stats (`None` if it had already stopped).
    /// On RabbitMQ the batch in hand is what its mailbox holds (a record per
    /// slot).
    pub async fn cancel(self) -> Option<SubscriberStats> {
        let stats = match self.stop.ask(StopSubscriber, None).await {
            Ok(stats) => {
                self.addr.terminated().await;
                stats
            }
            Err(_) => self.stats(),
        };
        self.addr.stop();
        self.addr.terminated().await;
        // Normally done already, when the subscriber stopped.
        match &self.reader {
            ReaderOf::Local(reader) => {
                self.core.remove_reader(*reader);
            }
            #[cfg(feature = "amqp")]
            ReaderOf::Remote(reader) => reader.finish(),
        }
        stats
    }

    /// Resolves when the subscriber is down for good (cancelled, stream
    /// deleted, or restarted too often).
    pub async fn terminated(&self) -> ExitReason {
        self.addr.terminated().await
    }
}
