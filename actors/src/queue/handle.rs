//! [`QueueHandle`]: direct, typed access to one queue, for publishers and
//! consumers that should not pay a name lookup per message.
//!
//! A handle is either to an embedded queue ([`LocalQueue`]: its actor, its
//! inbox) or, with feature `amqp`, to a queue on RabbitMQ (behind
//! [`RemoteOps`], which the `amqp` module implements); the same calls serve
//! both.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytestring::ByteString;
use postbox::{Addr, AnyAddr, Recipient, TrySendError};

use crate::dedup::SharedWindow;
use crate::envelope::Envelope;
use crate::error::{BrokerError, TryPublishError};
use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::actor::{
    Barrier, DurableRefusal, PublishConfirmed, PublishDurable, QueueActor, QueueSnapshot, Sink,
    Snapshot, Subscribe, TieTo, Unsubscribe,
};
use crate::queue::consumers::{Claim, Consumers};
use crate::queue::delivery::Delivery;
use crate::queue::inbox::{Collect, Inbox, NoRoom, Shut};
use crate::store::Confirm;

/// A handle to one queue; cheap to clone. Obtained from
/// [`Broker::declare_queue`](crate::Broker::declare_queue) or
/// [`Broker::queue`](crate::Broker::queue).
///
/// On a broker connected to RabbitMQ ([`Broker::connect`](crate::Broker::connect)),
/// the handle names a RabbitMQ queue: `publish`, `publish_batch`, `get` and
/// `snapshot` go to the server; what only an embedded queue can do
/// (`try_publish` without waiting, `sync`, `consume_with` an actor,
/// `tie_to`) fails with [`BrokerError::Unsupported`].
#[derive(Clone, Debug)]
pub struct QueueHandle {
    repr: Repr,
}

#[derive(Clone, Debug)]
enum Repr {
    /// Shared with the topology and every other handle: a handle is one
    /// pointer to copy and keep (consumers keep theirs for life).
    Local(Arc<LocalQueue>),
    #[cfg(feature = "amqp")]
    Remote(Arc<dyn RemoteOps>),
}

/// A queue served elsewhere (RabbitMQ, for the `amqp` backend): what a
/// [`QueueHandle`] and a consumer ask of it.
#[cfg(feature = "amqp")]
pub(crate) trait RemoteOps: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    fn is_live(&self) -> bool;
    fn consumer_count(&self) -> usize;
    fn gone(&self) -> BrokerError;
    fn publish(&self, message: Envelope) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn publish_batch(&self, messages: Vec<Envelope>) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn get(&self, mode: AckMode) -> BoxFuture<'_, Result<Option<(Delivery, usize)>, BrokerError>>;
    fn snapshot(&self) -> BoxFuture<'_, Result<QueueSnapshot, BrokerError>>;
    /// Registers a consumer: see [`LocalQueue::subscribe_as`].
    fn subscribe(
        &self,
        subscribe: Subscribe,
    ) -> BoxFuture<'_, Result<Arc<crate::queue::delivery::Link>, BrokerError>>;
    /// `basic.cancel`: how many deliveries the consumer holds, `None` if
    /// it is gone.
    fn cancel(&self, consumer: ConsumerId) -> BoxFuture<'_, Option<usize>>;
    /// Ends the registration now; what it held is requeued.
    fn unsubscribe(&self, consumer: ConsumerId) -> BoxFuture<'_, ()>;
}

#[cfg(feature = "amqp")]
type BoxFuture<'a, T> = futures::future::BoxFuture<'a, T>;

impl From<Arc<LocalQueue>> for QueueHandle {
    fn from(local: Arc<LocalQueue>) -> Self {
        QueueHandle {
            repr: Repr::Local(local),
        }
    }
}

#[cfg(feature = "amqp")]
impl From<Arc<dyn RemoteOps>> for QueueHandle {
    fn from(remote: Arc<dyn RemoteOps>) -> Self {
        QueueHandle {
            repr: Repr::Remote(remote),
        }
    }
}

/// Runs `$local` on an embedded queue, `$remote` on a RabbitMQ one.
macro_rules! dispatch {
    ($self:ident, $q:ident => $local:expr, $r:ident => $remote:expr) => {
        match &$self.repr {
            Repr::Local($q) => $local,
            #[cfg(feature = "amqp")]
            Repr::Remote($r) => $remote,
        }
    };
}

impl QueueHandle {
    /// The queue's name.
    pub fn name(&self) -> &str {
        dispatch!(self, q => q.name(), r => r.name())
    }

    /// Fetches the head ready message without a consumer: RabbitMQ's
    /// `basic.get`. With [`AckMode::Manual`] it must be settled through the
    /// returned [`Delivery`]; dropping it unsettled requeues it (as closing a
    /// RabbitMQ channel does). Returns it with the number of ready messages
    /// left, or `None` if the queue has none. It renews an expiring queue.
    #[doc(alias = "basic_get")]
    pub async fn get(&self, mode: AckMode) -> Result<Option<(Delivery, usize)>, BrokerError> {
        dispatch!(self, q => q.get(mode).await, r => r.get(mode).await)
    }

    /// Whether the queue still runs (not deleted, runtime not stopped; on
    /// RabbitMQ: the broker's connection is not closed for good).
    pub fn is_live(&self) -> bool {
        dispatch!(self, q => q.is_live(), r => r.is_live())
    }

    /// How many consumers are registered right now, read without asking the
    /// queue (on RabbitMQ: as of the last declaration or snapshot, plus this
    /// process's consumers since).
    pub fn consumer_count(&self) -> usize {
        dispatch!(self, q => q.consumer_count(), r => r.consumer_count())
    }

    /// Enqueues a message, waiting while the queue's mailbox is full. A queue
    /// with reject-publish overflow is asked, and a full one answers
    /// [`BrokerError::QueueFull`].
    ///
    /// While the queue is busy, consecutive publishes share a mailbox entry (up
    /// to 64 of them), so a publish usually costs a short lock and a push; the
    /// messages of one publisher are enqueued in the order it published them.
    ///
    /// Once the queue is deleted (or the runtime stopped), every publish fails:
    /// with [`BrokerError::QueueNotFound`] (or [`BrokerError::Stopped`]).
    ///
    /// On a queue with a duplicate window ([`QueueOptions::dedup`]), a
    /// message whose id the window knows is not enqueued:
    /// [`BrokerError::Duplicate`] says so, and of which original.
    ///
    /// On RabbitMQ, it returns once the server has confirmed the message
    /// (publisher confirms).
    ///
    /// [`QueueOptions::dedup`]: crate::QueueOptions::dedup
    #[doc(alias = "basic_publish")]
    pub async fn publish(&self, message: Envelope) -> Result<(), BrokerError> {
        dispatch!(self, q => q.publish(message).await, r => r.publish(message).await)
    }

    /// Enqueues several messages in order, as one mailbox entry.
    ///
    /// On a queue with a duplicate window, messages whose ids it knows (or
    /// that repeat an id earlier in the batch) are left out, the others
    /// enqueued, and then the first one left out is reported as
    /// [`BrokerError::Duplicate`]. On RabbitMQ the messages are published
    /// back to back and their confirms awaited together.
    pub async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        dispatch!(self, q => q.publish_batch(messages).await, r => r.publish_batch(messages).await)
    }

    /// Enqueues a message if the queue's mailbox has room now.
    ///
    /// This does not wait for the queue's answer: on a queue with
    /// reject-publish overflow, a message the queue then refuses is only
    /// counted (`QueueStats::refused`). Use [`publish`](Self::publish) to be
    /// told. Nor does it wait for the disk: a persistent message to a
    /// durable queue is written with the store's next group, unconfirmed.
    pub fn try_publish(&self, message: Envelope) -> Result<(), TryPublishError> {
        dispatch!(self, q => q.try_publish(message), _r => Err(BrokerError::unsupported("try_publish").into()))
    }

    /// Waits until everything this queue has been told so far is on disk
    /// (per the sync policy): publishes, and the acknowledgements and
    /// rejections that returned before this call. Acks are otherwise written
    /// lazily (a lost ack is a redelivery after a crash); this makes them
    /// durable when that matters. On a queue that is not durable, or on an
    /// in-memory broker, it returns at once.
    ///
    /// ```
    /// # use postbox_actors::{AckMode, Broker, Envelope, QueueOptions};
    /// # postbox::testkit::run(async {
    /// # let broker = Broker::new(&postbox::RuntimeHandle::local());
    /// let queue = broker.declare_queue("jobs", QueueOptions::default().durable()).await?;
    /// queue.publish(Envelope::new("job").with_persistent(true)).await?;
    /// let (job, _) = queue.get(AckMode::Manual).await?.expect("a job");
    /// job.ack().await?;
    /// queue.sync().await?; // the ack survives a crash from here on
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn sync(&self) -> Result<(), BrokerError> {
        dispatch!(self, q => q.sync().await, _r => Err(BrokerError::unsupported("sync")))
    }

    /// Counters and consumers. On RabbitMQ: ready messages and consumers, as
    /// a passive declaration reports them (the other counters are zero).
    pub async fn snapshot(&self) -> Result<QueueSnapshot, BrokerError> {
        dispatch!(self, q => q.snapshot().await, r => r.snapshot().await)
    }

    /// Registers any actor that handles [`Delivery`] as a consumer of this
    /// queue, competing with its other consumers (for a supervised consumer
    /// built from a factory, use [`Broker::consume`](crate::Broker::consume)).
    /// The registration ends when that actor's current incarnation ends, when
    /// the queue is deleted, or with [`cancel_consumer`](Self::cancel_consumer);
    /// its unsettled deliveries are then requeued.
    #[doc(alias = "basic_consume")]
    pub async fn consume_with(
        &self,
        sink: Recipient<Delivery>,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<ConsumerId, BrokerError> {
        dispatch!(self, q => q.consume_with(sink, mode, prefetch).await, _r => Err(BrokerError::unsupported("consume_with")))
    }

    /// Ties the queue's life to an actor: when that actor stops for good, the
    /// queue deletes itself (an exclusive queue, as subscriptions use).
    pub async fn tie_to(&self, owner: AnyAddr) -> Result<(), BrokerError> {
        dispatch!(self, q => q.tie_to(owner).await, _r => Err(BrokerError::unsupported("tie_to")))
    }

    /// Ends a registration made with [`consume_with`](Self::consume_with);
    /// its unsettled deliveries are requeued.
    #[doc(alias = "basic_cancel")]
    pub async fn cancel_consumer(&self, consumer: ConsumerId) -> Result<(), BrokerError> {
        dispatch!(self, q => q.cancel_consumer(consumer).await, _r => Err(BrokerError::unsupported("cancel_consumer")))
    }
}

/// What the consumer actor asks of its queue, on either backend.
impl QueueHandle {
    /// Registers a consumer; returns the link its deliveries are settled through.
    pub(crate) async fn subscribe_as(
        &self,
        subscribe: Subscribe,
    ) -> Result<Arc<crate::queue::delivery::Link>, BrokerError> {
        dispatch!(self,
            q => q.subscribe_as(subscribe).await,
            r => r.subscribe(subscribe).await)
    }

    /// A place for a consumer's registration sent without waiting for the
    /// queue (see [`crate::queue::consumers`]): only on an embedded queue,
    /// for a consumer actor (told through its sink if the queue goes first)
    /// that is not exclusive, while no exclusive consumer holds the queue.
    /// `None`: register and wait for the answer instead.
    pub(crate) fn claim(&self, subscribe: &Subscribe) -> Option<Claim> {
        let cancelled = subscribe
            .sink
            .cancelled()
            .filter(|_| !subscribe.exclusive)?;
        dispatch!(self,
            q => q.consumers.claim(cancelled.clone()),
            _r => None)
    }

    /// Sends a claimed registration to an embedded queue without waiting
    /// for its answer: the queue takes it ahead of anything sent to it
    /// later. Fails only if the queue is gone.
    pub(crate) async fn subscribe_claimed(&self, subscribe: Subscribe) -> Result<(), BrokerError> {
        dispatch!(self,
            q => q.subscribe_claimed(subscribe).await,
            r => Err(r.gone()))
    }

    /// Returns once the queue has handled everything sent to it before.
    pub(crate) async fn barrier(&self) {
        dispatch!(self,
            q => { let _ = q.addr.ask(Barrier).await; },
            _r => {})
    }

    /// Stops deliveries to `consumer` (`basic.cancel`); returns how many
    /// it still holds, `None` if the queue is gone.
    pub(crate) async fn cancel(&self, consumer: ConsumerId) -> Option<usize> {
        dispatch!(self,
            q => q.addr.ask(crate::queue::actor::Cancel(consumer)).await.ok(),
            r => r.cancel(consumer).await)
    }

    /// Ends `consumer`'s registration now; what it held is requeued.
    pub(crate) async fn unsubscribe_now(&self, consumer: ConsumerId) {
        dispatch!(self,
            q => { let _ = q.addr.ask(Unsubscribe::now(consumer)).await; },
            r => r.unsubscribe(consumer).await)
    }

    /// Why the queue no longer takes publishes or consumers.
    pub(crate) fn gone(&self) -> BrokerError {
        dispatch!(self, q => q.gone(), r => r.gone())
    }
}

/// An embedded queue: its actor, and the inbox publishes wait in.
#[derive(Clone, Debug)]
pub(crate) struct LocalQueue {
    pub(crate) name: ByteString,
    /// The name as a routing key: a message published to the queue without
    /// one gets it, as through RabbitMQ's default exchange (shared, so that
    /// setting it allocates nothing).
    pub(crate) key: Arc<str>,
    pub(crate) addr: Addr<QueueActor>,
    pub(crate) max_message_bytes: usize,
    /// Kept up to date by the queue actor, for checks that must not wait on it.
    pub(crate) consumers: Arc<Consumers>,
    /// Publishes must wait for the queue's answer (reject-publish overflow).
    pub(crate) confirm: bool,
    /// Where publishes wait for the queue, batched (see [`crate::queue::inbox`]).
    pub(crate) inbox: Arc<Inbox>,
    /// When the queue was last used (epoch ms), for queue expiry.
    pub(crate) lease: Arc<AtomicU64>,
    /// Durable, on a broker with storage: persistent messages are confirmed
    /// once stored.
    pub(crate) durable: bool,
    /// The publishers' duplicate window, if the queue has one.
    pub(crate) dedup: Option<Arc<SharedWindow>>,
}

impl LocalQueue {
    /// See [`QueueHandle::name`].
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Marks the queue used now (a redeclaration): an expiring queue's clock
    /// starts again.
    pub(crate) fn renew(&self) {
        self.lease
            .store(postbox::clock::now_ms(), Ordering::Relaxed);
    }

    /// See [`QueueHandle::get`].
    pub(crate) async fn get(
        &self,
        mode: AckMode,
    ) -> Result<Option<(Delivery, usize)>, BrokerError> {
        self.before_request();
        self.addr
            .ask(crate::queue::actor::Get { mode })
            .await
            .map_err(|_| self.gone())
    }

    /// See [`QueueHandle::is_live`].
    pub(crate) fn is_live(&self) -> bool {
        !self.addr.is_closed() && self.inbox.shut_reason().is_none()
    }

    /// See [`QueueHandle::consumer_count`].
    pub(crate) fn consumer_count(&self) -> usize {
        self.consumers.count()
    }

    /// `message`, with the queue's name as its routing key if it has none
    /// (RabbitMQ's default exchange routes by the queue's name, and that is
    /// the key its consumers and dead letters see). A key of its own is
    /// kept: postbox's messages carry their partition or ordering key there.
    #[inline]
    fn keyed(&self, message: Envelope) -> Envelope {
        if message.routing_key().is_empty() {
            message.with_routing_key(self.key.clone())
        } else {
            message
        }
    }

    pub(crate) fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        let size = message.total_size();
        if size > self.max_message_bytes {
            return Err(BrokerError::MessageTooLarge {
                queue: self.name.to_string(),
                size,
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    /// What a publish to a queue that no longer takes messages is told: the
    /// runtime stopped, or the queue is gone.
    pub(crate) fn gone(&self) -> BrokerError {
        match self.inbox.shut_reason() {
            Some(Shut::Stopped) => BrokerError::Stopped,
            _ => BrokerError::QueueNotFound(self.name.to_string()),
        }
    }

    /// See [`QueueHandle::publish`].
    pub(crate) async fn publish(&self, message: Envelope) -> Result<(), BrokerError> {
        let message = self.keyed(message);
        self.check(&message)?;
        if let Some(dedup) = &self.dedup {
            return Box::pin(self.publish_once(dedup, message)).await;
        }
        self.publish_now(message).await
    }

    /// Publishes through the duplicate window: admitted first (so that of
    /// two concurrent publishes of one id exactly one goes on), forgotten
    /// if the publish then fails.
    async fn publish_once(
        &self,
        dedup: &SharedWindow,
        message: Envelope,
    ) -> Result<(), BrokerError> {
        let id = message.id();
        // Stored beside the message, for a durable one: both are stored
        // before the publish returns.
        let logged = self.admit(dedup, &message)?;
        let published = match self.publish_now(message).await {
            Ok(()) => Self::confirmed(logged).await,
            Err(err) => Err(err),
        };
        if published.is_err() {
            dedup.forget(id);
        }
        published
    }

    /// Admits `message` through the queue's duplicate window. The id of a
    /// persistent message to a durable queue is also written to the
    /// window's log: the confirmation to wait for with the message's own.
    /// (A transient message does not survive a restart; its id must not.)
    pub(crate) fn admit(
        &self,
        dedup: &SharedWindow,
        message: &Envelope,
    ) -> Result<Option<Confirm>, Box<crate::dedup::Duplicate>> {
        if self.durable && message.persistent() {
            dedup.admit_persistent(message.id())
        } else {
            dedup.admit(message.id()).map(|()| None)
        }
    }

    /// Enqueues a message whose size was checked (by `publish`, or by the
    /// fan-out before it hands copies over).
    pub(crate) async fn publish_now(&self, message: Envelope) -> Result<(), BrokerError> {
        if self.durable && message.persistent() {
            let confirm = self.enqueue_durable(vec![message]).await?;
            return Self::confirmed(confirm).await;
        }
        // A shut inbox refuses below (under its lock); this catches a queue
        // whose actor is gone without having shut it.
        if self.addr.is_closed() {
            return Err(self.gone());
        }
        if self.confirm {
            return match self.addr.ask(PublishConfirmed(message)).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(BrokerError::QueueFull(self.name.to_string())),
                Err(_) => Err(self.gone()),
            };
        }
        let room = self.inbox.room().await.map_err(|_| self.gone())?;
        let Err((room, message)) = self.inbox.join(room, message) else {
            return Ok(());
        };
        let permit = self.addr.reserve().await.map_err(|_| self.gone())?;
        if let Some(batch) = self.inbox.open(room, message).map_err(|_| self.gone())? {
            permit.send(Collect(batch));
        }
        Ok(())
    }

    /// See [`QueueHandle::publish_batch`].
    pub(crate) async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        let messages: Vec<Envelope> = messages.into_iter().map(|m| self.keyed(m)).collect();
        for message in &messages {
            self.check(message)?;
        }
        let Some(dedup) = &self.dedup else {
            return self.publish_batch_now(messages).await;
        };
        let mut duplicate = None;
        let mut admitted = Vec::with_capacity(messages.len());
        let mut logged = Vec::new();
        for message in messages {
            match self.admit(dedup, &message) {
                Ok(confirm) => {
                    logged.extend(confirm);
                    admitted.push(message);
                }
                Err(dup) => {
                    duplicate.get_or_insert(BrokerError::Duplicate(dup));
                }
            }
        }
        let ids: Vec<_> = admitted.iter().map(Envelope::id).collect();
        let mut published = self.publish_batch_now(admitted).await;
        for confirm in logged {
            published = published.and(Self::confirmed(Some(confirm)).await);
        }
        if let Err(err) = published {
            for id in ids {
                dedup.forget(id);
            }
            return Err(err);
        }
        duplicate.map_or(Ok(()), Err)
    }

    async fn publish_batch_now(&self, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        if self.durable && messages.iter().any(Envelope::persistent) {
            // One store group, one confirmation, for the whole batch.
            let confirm = self.enqueue_durable(messages).await?;
            return Self::confirmed(confirm).await;
        }
        if self.inbox.shut_reason().is_some() {
            return Err(self.gone());
        }
        let permit = self.addr.reserve().await.map_err(|_| self.gone())?;
        let batch = self
            .inbox
            .open_with(messages)
            .await
            .map_err(|_| self.gone())?;
        permit.send(Collect(batch));
        Ok(())
    }

    /// See [`QueueHandle::try_publish`].
    pub(crate) fn try_publish(&self, message: Envelope) -> Result<(), TryPublishError> {
        let message = self.keyed(message);
        self.check(&message)?;
        if self.inbox.blocked() {
            // A blocking queue at its limit: waiting is `publish`'s job.
            return Err(TryPublishError::Full {
                queue: self.name.to_string(),
                message: Box::new(message),
            });
        }
        let id = message.id();
        if let Some(dedup) = &self.dedup {
            // Not waiting for the disk: a durable window's id is written
            // with the log's next group, as the message is.
            self.admit(dedup, &message).map_err(BrokerError::from)?;
        }
        let enqueued = self.try_enqueue(message);
        if let (Err(_), Some(dedup)) = (&enqueued, &self.dedup) {
            dedup.forget(id);
        }
        enqueued.map_err(|err| match err {
            TrySendError::Full(message) => TryPublishError::Full {
                queue: self.name.to_string(),
                message: Box::new(message),
            },
            TrySendError::Closed(_) => self.gone().into(),
        })
    }

    /// Hands messages to a durable queue, which persists the persistent ones;
    /// returns the store's confirmation to wait for.
    pub(crate) async fn enqueue_durable(
        &self,
        messages: Vec<Envelope>,
    ) -> Result<Option<Confirm>, BrokerError> {
        // After this publisher's earlier publishes, not ahead of them.
        self.before_request();
        match self.addr.ask(PublishDurable(messages)).await {
            Ok(Ok(confirm)) => Ok(confirm),
            Ok(Err(DurableRefusal::Full)) => Err(BrokerError::QueueFull(self.name.to_string())),
            Ok(Err(DurableRefusal::Storage(err))) => Err(BrokerError::Storage(err)),
            Err(_) => Err(self.gone()),
        }
    }

    /// See [`QueueHandle::sync`].
    pub(crate) async fn sync(&self) -> Result<(), BrokerError> {
        self.before_request();
        let confirm = self
            .addr
            .ask(crate::queue::actor::SyncPoint)
            .await
            .map_err(|_| self.gone())?;
        Self::confirmed(confirm).await
    }

    /// Waits for a confirmation from [`enqueue_durable`](Self::enqueue_durable).
    pub(crate) async fn confirmed(confirm: Option<Confirm>) -> Result<(), BrokerError> {
        Ok(crate::store::confirmed(confirm).await?)
    }

    /// Enqueues without waiting and without the size check (dead letters were
    /// checked when first published); hands the message back if there is no room.
    pub(crate) fn try_enqueue(&self, message: Envelope) -> Result<(), TrySendError<Envelope>> {
        let room = match self.inbox.try_room() {
            Ok(room) if !self.addr.is_closed() => room,
            Err(NoRoom::Full) => return Err(TrySendError::Full(message)),
            Ok(_) | Err(NoRoom::Closed) => return Err(TrySendError::Closed(message)),
        };
        let Err((room, message)) = self.inbox.join(room, message) else {
            return Ok(());
        };
        match self.addr.try_reserve() {
            Ok(permit) => match self.inbox.open(room, message) {
                Ok(Some(batch)) => {
                    permit.send(Collect(batch));
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(message) => Err(TrySendError::Closed(message)),
            },
            Err(TrySendError::Full(())) => Err(TrySendError::Full(message)),
            Err(TrySendError::Closed(())) => Err(TrySendError::Closed(message)),
        }
    }

    /// Ends the open batch, so that publishes after a request cannot overtake it.
    fn before_request(&self) {
        self.inbox.close();
    }

    /// See [`QueueHandle::snapshot`].
    pub(crate) async fn snapshot(&self) -> Result<QueueSnapshot, BrokerError> {
        self.before_request();
        let mut snapshot = self.addr.ask(Snapshot).await.map_err(|_| self.gone())?;
        if let Some(dedup) = &self.dedup {
            let stats = dedup.stats();
            snapshot.stats.duplicates = stats.duplicates;
            snapshot.stats.dedup_ids = stats.ids;
        }
        Ok(snapshot)
    }

    /// See [`QueueHandle::consume_with`].
    pub(crate) async fn consume_with(
        &self,
        sink: Recipient<Delivery>,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<ConsumerId, BrokerError> {
        self.subscribe_as(Subscribe {
            sink: Sink::One(sink),
            mode,
            prefetch,
            incarnation: None,
            exclusive: false,
            slot: None,
            claim: None,
        })
        .await
        .map(|link| link.consumer)
    }

    pub(crate) async fn subscribe_as(
        &self,
        subscribe: Subscribe,
    ) -> Result<Arc<crate::queue::delivery::Link>, BrokerError> {
        self.before_request();
        match self.addr.ask(subscribe).await {
            Ok(Ok(Some(link))) => Ok(link),
            Ok(Err(crate::queue::state::ConsumerError::Exclusive(consumers))) => {
                Err(BrokerError::ExclusiveConsumer {
                    queue: self.name.to_string(),
                    consumers,
                })
            }
            _ => Err(self.gone()),
        }
    }

    /// See [`QueueHandle::subscribe_claimed`].
    pub(crate) async fn subscribe_claimed(&self, subscribe: Subscribe) -> Result<(), BrokerError> {
        self.before_request();
        match self.addr.send(subscribe).await {
            Ok(()) => Ok(()),
            Err(postbox::SendError(unsent)) => {
                // Never sent: nobody is to be told.
                if let Some(claim) = unsent.claim {
                    claim.release();
                }
                Err(self.gone())
            }
        }
    }

    /// See [`QueueHandle::tie_to`].
    pub(crate) async fn tie_to(&self, owner: AnyAddr) -> Result<(), BrokerError> {
        self.before_request();
        self.addr.send(TieTo(owner)).await.map_err(|_| self.gone())
    }

    /// See [`QueueHandle::cancel_consumer`].
    pub(crate) async fn cancel_consumer(&self, consumer: ConsumerId) -> Result<(), BrokerError> {
        self.before_request();
        self.addr
            .send(Unsubscribe::now(consumer))
            .await
            .map_err(|_| self.gone())
    }
}
