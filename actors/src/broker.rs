//! [`Broker`]: the facade applications use: declare, delete and purge queues,
//! publish, consume.
//!
//! The API names queues, never actors, so the same calls can later be served by
//! another backend (RabbitMQ) without changing applications. Queues live in a
//! registry read under a lock only on lookups; publishers on a hot path take a
//! [`QueueHandle`] once and skip the lookup.
//!
//! ```
//! use postbox::Runtime;
//! use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueOptions};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = Runtime::new()?;
//! let broker = Broker::new(&rt);
//! broker.declare_queue("orders", QueueOptions::default()).await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let _consumer = broker
//!     .consume("orders", ConsumeOptions::manual(8), move || {
//!         let tx = tx.clone();
//!         move |d: Delivery| {
//!             let tx = tx.clone();
//!             async move {
//!                 tx.send(d.decode::<u32>()?).ok();
//!                 d.ack().await?;
//!                 Ok(())
//!             }
//!         }
//!     })
//!     .await?;
//! broker.publish("orders", Envelope::encode(&42u32)?).await?;
//! assert_eq!(tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?, Some(42));
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytestring::ByteString;
use parking_lot::RwLock;
use postbox::{ChildSpec, Restart, RuntimeHandle};
use serde::Serialize;

use crate::consumer::{
    ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle, Registration,
};
use crate::envelope::Envelope;
use crate::error::{BrokerError, PublishError};
use crate::exchange::headers::HeadersMatch;
use crate::exchange::{Binding, Destination, ExchangeOptions};
use crate::name::{NameKind, validate_declared, validate_key, validate_name};
use crate::observe::{Observer, ObserverGuard, Observers};
use crate::queue::actor::{
    DeadLetterTarget, Delete, Purge, QueueActor, QueueConfig, QueueSnapshot,
};
use crate::queue::handle::QueueHandle;
use crate::queue::inbox::{Inbox, Shut};
use crate::queue::options::{DeleteOptions, QueueOptions};
use crate::queue::state::Overflow;
use crate::topology::{QueueEntry, Routed, Target, Topology};

/// Broker-wide settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Largest message ([`Envelope::total_size`]: payload, headers and
    /// properties) accepted by queues and streams that set no limit of their own.
    pub max_message_bytes: usize,
}

impl Default for BrokerConfig {
    /// 16 MiB messages.
    fn default() -> Self {
        BrokerConfig {
            max_message_bytes: 16 << 20,
        }
    }
}

struct Inner {
    runtime: RuntimeHandle,
    config: BrokerConfig,
    topology: RwLock<Topology>,
    consumers: AtomicU64,
    observers: Observers,
    /// Every running consumer's supervisor: a consumer lives until it is
    /// cancelled or gives up, whether or not its handle is kept.
    live: parking_lot::Mutex<std::collections::HashMap<postbox::ActorId, postbox::Supervisor>>,
    /// Requesters that take direct replies (see `rpc::direct`).
    direct_replies: crate::rpc::direct::DirectReplies,
    /// Fails what waits on this broker's queues and streams when the runtime
    /// shuts down.
    _shutdown: postbox::ShutdownHook,
}

impl Inner {
    /// The runtime shut down: publishers waiting for room in a queue or a
    /// stream, and later ones, fail with `Stopped` (the actors themselves are
    /// dropped as their arbiters stop).
    fn shut_down(&self) {
        let topology = self.topology.read();
        for entry in topology.queues.values() {
            entry.handle.inbox.shut(Shut::Stopped);
        }
        for stream in topology.streams.values() {
            stream.core.stop();
        }
    }
}

/// A weak reference to a broker, for its queues: they route dead letters
/// through it and leave its topology when they stop.
#[derive(Clone)]
pub(crate) struct BrokerRef(Weak<Inner>);

impl BrokerRef {
    /// The queues and streams `message` reaches through `exchange` with
    /// `routing_key`; empty if the broker is gone or the exchange does not exist.
    pub(crate) fn route(&self, exchange: &str, routing_key: &str, message: &Envelope) -> Routed {
        let mut routed = Routed::default();
        if let Some(inner) = self.0.upgrade() {
            // An unknown exchange routes nowhere.
            let _ =
                inner
                    .topology
                    .read()
                    .route(exchange, routing_key, message.headers(), &mut routed);
        }
        routed
    }

    /// Forgets a queue that stopped (if it is still the same actor).
    pub(crate) fn remove_queue(&self, name: &str, id: postbox::ActorId) {
        if let Some(inner) = self.0.upgrade() {
            inner.topology.write().remove_queue(name, id);
        }
    }
}

/// An in-process message broker; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("queues", &self.inner.topology.read().queues.len())
            .field("exchanges", &self.inner.topology.read().exchanges.len())
            .finish()
    }
}

impl Broker {
    /// A broker whose queues and consumers run on `runtime`.
    pub fn new(runtime: &RuntimeHandle) -> Broker {
        Broker::with_config(runtime, BrokerConfig::default())
    }

    /// A broker with explicit settings.
    pub fn with_config(runtime: &RuntimeHandle, config: BrokerConfig) -> Broker {
        Broker {
            inner: Arc::new_cyclic(|weak: &Weak<Inner>| {
                let weak = weak.clone();
                Inner {
                    runtime: runtime.clone(),
                    config,
                    topology: RwLock::new(Topology::default()),
                    consumers: AtomicU64::new(1),
                    observers: Observers::default(),
                    live: Default::default(),
                    direct_replies: Default::default(),
                    _shutdown: runtime.on_shutdown(move || {
                        if let Some(inner) = weak.upgrade() {
                            inner.shut_down();
                        }
                    }),
                }
            }),
        }
    }

    /// Fails with [`BrokerError::Stopped`] once the runtime has shut down:
    /// every call after that is refused, none hangs.
    pub(crate) fn alive(&self) -> Result<(), BrokerError> {
        if self.inner.runtime.is_shut_down() {
            return Err(BrokerError::Stopped);
        }
        Ok(())
    }

    /// Queues, streams, exchanges and bindings (streams are declared and
    /// deleted by `stream::broker_api`).
    pub(crate) fn topology(&self) -> &RwLock<Topology> {
        &self.inner.topology
    }

    pub(crate) fn direct_replies(&self) -> &crate::rpc::direct::DirectReplies {
        &self.inner.direct_replies
    }

    pub(crate) fn runtime(&self) -> &RuntimeHandle {
        &self.inner.runtime
    }

    pub(crate) fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Declares a queue: creates it, or checks that the existing one has the
    /// same options.
    pub async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueHandle, BrokerError> {
        validate_declared(NameKind::Queue, name)?;
        self.alive()?;
        let mut topology = self.inner.topology.write();
        if let Some(entry) = topology
            .queues
            .get(name)
            .filter(|e| !e.handle.addr.is_closed())
        {
            if entry.options != options {
                return Err(BrokerError::QueueMismatch {
                    name: name.to_string(),
                    existing: Box::new(entry.options.clone()),
                    requested: Box::new(options),
                });
            }
            return Ok(QueueHandle::clone(&entry.handle));
        }
        let name = ByteString::from(name);
        let actor_name = name.clone();
        // "" is the default exchange: dead letters straight to a queue by key.
        if let Some(dlx) = options
            .dead_letter_exchange
            .as_deref()
            .filter(|x| !x.is_empty())
        {
            validate_name(NameKind::Exchange, dlx)?;
        }
        if let Some(key) = &options.dead_letter_routing_key {
            validate_key(NameKind::RoutingKey, key)?;
        }
        let consumers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inbox = Arc::new(Inbox::new(options.mailbox));
        let config = QueueConfig {
            policy: options.policy(),
            dead_letter: options
                .dead_letter_exchange
                .as_deref()
                .map(|exchange| DeadLetterTarget {
                    exchange: ByteString::from(exchange),
                    routing_key: options
                        .dead_letter_routing_key
                        .as_deref()
                        .map(ByteString::from),
                }),
        };
        let mut actor = Some(QueueActor::new(
            name.clone(),
            config,
            self.inner.observers.clone(),
            BrokerRef(Arc::downgrade(&self.inner)),
            consumers.clone(),
            inbox.clone(),
        ));
        let addr = self
            .inner
            .runtime
            .build(move || actor.take())
            .mailbox(options.mailbox)
            .name(format!("queue:{actor_name}"))
            .spawn();
        if addr.is_closed() {
            // The runtime stopped under us: the actor could not start.
            return Err(BrokerError::Stopped);
        }
        let handle = QueueHandle {
            name: name.clone(),
            addr,
            max_message_bytes: options
                .max_message_bytes
                .unwrap_or(self.inner.config.max_message_bytes),
            consumers,
            confirm: options.overflow == Overflow::RejectPublish,
            inbox,
        };
        tracing::debug!(queue = %name, ?options, "queue declared");
        topology.insert_queue(
            name,
            QueueEntry {
                handle: Arc::new(handle.clone()),
                options,
            },
        );
        Ok(handle)
    }

    /// Registers an observer of all traffic on this broker's queues, until the
    /// returned guard is dropped.
    pub fn observe(&self, observer: Arc<dyn Observer>) -> ObserverGuard {
        self.inner.observers.add(observer)
    }

    /// A handle to an existing queue.
    pub fn queue(&self, name: &str) -> Result<QueueHandle, BrokerError> {
        self.inner
            .topology
            .read()
            .queue(name)
            .map(|h| QueueHandle::clone(h))
            .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))
    }

    /// The names of all queues.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .topology
            .read()
            .queues
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    /// Deletes a queue, dropping its messages; its consumers' registrations end.
    /// Returns the queue's last snapshot.
    pub async fn delete_queue(
        &self,
        name: &str,
        options: DeleteOptions,
    ) -> Result<QueueSnapshot, BrokerError> {
        self.alive()?;
        let handle = self.queue(name)?;
        let outcome = handle
            .addr
            .ask(Delete {
                if_unused: options.if_unused,
                if_empty: options.if_empty,
            })
            .await
            .map_err(|_| handle.gone())?;
        match outcome {
            Ok(snapshot) => {
                self.inner
                    .topology
                    .write()
                    .remove_queue(name, handle.addr.id());
                Ok(snapshot)
            }
            Err(snapshot) if options.if_unused && !snapshot.consumers.is_empty() => {
                Err(BrokerError::QueueInUse {
                    name: name.to_string(),
                    consumers: snapshot.consumers.len(),
                })
            }
            Err(snapshot) => Err(BrokerError::QueueNotEmpty {
                name: name.to_string(),
                messages: snapshot.stats.ready,
            }),
        }
    }

    /// Drops a queue's ready messages (not the unacknowledged ones); returns how many.
    pub async fn purge_queue(&self, name: &str) -> Result<usize, BrokerError> {
        self.alive()?;
        let handle = self.queue(name)?;
        handle.addr.ask(Purge).await.map_err(|_| handle.gone())
    }

    /// Publishes to a queue, waiting while it is saturated.
    pub async fn publish(&self, queue: &str, message: Envelope) -> Result<(), BrokerError> {
        self.queue(queue)?.publish(message).await
    }

    /// Publishes a value encoded as JSON.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        value: &T,
    ) -> Result<(), BrokerError> {
        self.publish(queue, Envelope::encode(value)?).await
    }

    /// A queue's counters and consumers.
    pub async fn queue_stats(&self, name: &str) -> Result<QueueSnapshot, BrokerError> {
        self.queue(name)?.snapshot().await
    }

    /// Declares an exchange: creates it, or checks that the existing one has the
    /// same options.
    pub async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange("declared"));
        }
        validate_declared(NameKind::Exchange, name)?;
        self.alive()?;
        if let Some(alternate) = &options.alternate_exchange {
            validate_name(NameKind::Exchange, alternate)?;
        }
        self.inner.topology.write().declare_exchange(name, options)
    }

    /// Deletes an exchange and every binding from or to it.
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange("deleted"));
        }
        self.alive()?;
        self.inner.topology.write().delete_exchange(name, if_unused)
    }

    /// Binds a queue to an exchange with a binding key (a pattern for topic
    /// exchanges). Binding twice is a no-op.
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), BrokerError> {
        self.bind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            key,
            None,
        )
    }

    /// Binds a queue to a headers exchange.
    pub async fn bind_queue_headers(
        &self,
        queue: &str,
        exchange: &str,
        headers: HeadersMatch,
    ) -> Result<(), BrokerError> {
        self.bind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            "",
            Some(headers),
        )
    }

    /// Binds exchange `destination` to exchange `source`: what `source` routes
    /// with this key also goes through `destination`.
    pub async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), BrokerError> {
        self.bind(
            source,
            Destination::Exchange(ByteString::from(destination)),
            key,
            None,
        )
    }

    /// Removes a queue binding; false if there was none.
    pub async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            key,
            None,
        )
    }

    /// Removes a headers binding; false if there was none.
    pub async fn unbind_queue_headers(
        &self,
        queue: &str,
        exchange: &str,
        headers: HeadersMatch,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            "",
            Some(headers),
        )
    }

    /// Removes an exchange-to-exchange binding; false if there was none.
    pub async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            source,
            Destination::Exchange(ByteString::from(destination)),
            key,
            None,
        )
    }

    /// The bindings whose source is `exchange`.
    pub fn bindings(&self, exchange: &str) -> Result<Vec<Binding>, BrokerError> {
        self.inner
            .topology
            .read()
            .exchanges
            .get(exchange)
            .map(|e| e.bindings().to_vec())
            .ok_or_else(|| BrokerError::ExchangeNotFound(exchange.to_string()))
    }

    fn binding(
        exchange: &str,
        destination: Destination,
        key: &str,
        headers: Option<HeadersMatch>,
    ) -> Result<Binding, BrokerError> {
        if exchange.is_empty() {
            return Err(BrokerError::DefaultExchange("bound to"));
        }
        validate_key(NameKind::BindingKey, key)?;
        Ok(Binding {
            destination,
            key: ByteString::from(key),
            headers,
        })
    }

    pub(crate) fn bind(
        &self,
        exchange: &str,
        destination: Destination,
        key: &str,
        headers: Option<HeadersMatch>,
    ) -> Result<(), BrokerError> {
        let binding = Self::binding(exchange, destination, key, headers)?;
        self.alive()?;
        self.inner
            .topology
            .write()
            .bind(exchange, binding)
            .map(|_| ())
    }

    pub(crate) fn unbind(
        &self,
        exchange: &str,
        destination: Destination,
        key: &str,
        headers: Option<HeadersMatch>,
    ) -> Result<bool, BrokerError> {
        let binding = Self::binding(exchange, destination, key, headers)?;
        self.alive()?;
        self.inner.topology.write().unbind(exchange, &binding)
    }

    /// Publishes through an exchange (`""`: the default exchange) with a routing
    /// key. Returns how many queues and streams it reached; a message that
    /// reaches none is dropped (see [`publish_mandatory`](Self::publish_mandatory)).
    /// Waits while a target queue is saturated, or a target stream with block
    /// overflow is full.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
    ) -> Result<usize, PublishError> {
        self.route_and_send(exchange, routing_key, message, false)
            .await
    }

    /// Like [`publish_to`](Self::publish_to), but a message that reaches no queue
    /// and no stream comes back as [`PublishError::Unroutable`].
    pub async fn publish_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
    ) -> Result<usize, PublishError> {
        self.route_and_send(exchange, routing_key, message, true)
            .await
    }

    async fn route_and_send(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
        mandatory: bool,
    ) -> Result<usize, PublishError> {
        self.alive()?;
        let routed = self.route_targets(exchange, routing_key, &message)?;
        let message = if message.routing_key() == routing_key {
            message
        } else {
            message.with_routing_key(routing_key)
        };
        let message = match routed.exchange {
            // The exchange's own name, shared: no allocation per publish.
            Some(name) => message.with_exchange(name),
            None if message.exchange().is_empty() => message,
            None => message.with_exchange(""),
        };
        let targets = routed.targets;
        if targets.is_empty() {
            tracing::debug!(exchange, routing_key, message_id = %message.id(), "unroutable");
            if mandatory {
                return Err(PublishError::Unroutable {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    message: Box::new(message),
                });
            }
            return Ok(0);
        }
        Ok(Self::deliver_to(&targets, message).await?)
    }

    /// The queues and streams a message published to `exchange` with
    /// `routing_key` reaches.
    pub(crate) fn route_targets(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
    ) -> Result<Routed, BrokerError> {
        validate_key(NameKind::RoutingKey, routing_key)?;
        let mut routed = Routed::default();
        self.inner
            .topology
            .read()
            .route(exchange, routing_key, message.headers(), &mut routed)?;
        Ok(routed)
    }

    /// The queues (not the streams) a message published to `exchange` with
    /// `routing_key` reaches: for request-reply, where only queues answer.
    pub(crate) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
    ) -> Result<Vec<QueueHandle>, BrokerError> {
        let routed = self.route_targets(exchange, routing_key, message)?;
        Ok(routed
            .targets
            .iter()
            .filter_map(|t| t.queue().cloned())
            .collect())
    }

    /// [`deliver_to`](Self::deliver_to) for queues only.
    pub(crate) async fn deliver(
        targets: &[QueueHandle],
        message: Envelope,
    ) -> Result<usize, BrokerError> {
        Self::deliver_to(targets, message).await
    }

    /// Enqueues `message` on every target queue and appends it to every target
    /// stream, or does neither if it is too large for any. Returns how many
    /// targets there were, or [`BrokerError::QueueFull`] if a queue refused it
    /// (the others have their copy). Waits for room in full queues and in full
    /// block-mode streams.
    pub(crate) async fn deliver_to<T: Deliver>(
        targets: &[T],
        message: Envelope,
    ) -> Result<usize, BrokerError> {
        for target in targets {
            target.check(&message)?;
        }
        let n = targets.len();
        let mut message = Some(message);
        let mut refused = None;
        for (i, target) in targets.iter().enumerate() {
            let copy = if i + 1 == n {
                message.take()
            } else {
                message.clone()
            };
            if let Some(copy) = copy
                && let Err(err) = target.deliver(copy).await
            {
                refused = Some(err);
            }
        }
        refused.map_or(Ok(n), Err)
    }

    /// Starts a supervised consumer on `queue`. `factory` builds the consumer, and
    /// builds it again after each crash. Returns once it is registered.
    pub async fn consume<C, F>(
        &self,
        queue: &str,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<ConsumerHandle<C>, BrokerError>
    where
        C: Consumer,
        F: ConsumerFactory<C>,
    {
        self.alive()?;
        let handle = self.queue(queue)?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let name = format!("consumer:{queue}:{n}");
        let mailbox = options.mailbox_capacity();
        let child_options = options.clone();
        let child_queue = handle.clone();
        let backlog = Arc::default();
        let child = ChildSpec::new("consumer", move || {
            ConsumerActor::with_backlog(
                child_queue.clone(),
                &child_options,
                factory(),
                Arc::clone(&backlog),
            )
        })
        .restart(Restart::Transient)
        .mailbox(mailbox);
        let supervisor = options
            .supervision
            .spec(name)
            .child(child)
            .spawn(&self.inner.runtime);
        let id = supervisor.addr().id();
        self.inner.live.lock().insert(id, supervisor.clone());
        let broker = Arc::downgrade(&self.inner);
        supervisor.addr().any().on_exit(Some(u64::MAX), move |_| {
            if let Some(inner) = broker.upgrade() {
                inner.live.lock().remove(&id);
            }
        });
        let addr = supervisor
            .child::<ConsumerActor<C>>("consumer")
            .await
            .map_err(|_| BrokerError::Stopped)?;
        // Registration happens in `started`, before any message is handled.
        match addr.ask(Registration).await {
            Ok(Some(_)) => Ok(ConsumerHandle {
                queue: handle.name.clone(),
                addr,
                supervisor,
            }),
            _ => {
                supervisor.stop();
                self.alive()?;
                Err(handle.gone())
            }
        }
    }
}

/// Something [`Broker::deliver_to`] hands a routed message to.
pub(crate) trait Deliver {
    /// Refuses a message this target would refuse for its size.
    fn check(&self, message: &Envelope) -> Result<(), BrokerError>;
    /// Hands one copy over, waiting for room; an error is a refusal to report
    /// after every other target has had its copy.
    async fn deliver(&self, message: Envelope) -> Result<(), BrokerError>;
}

impl Deliver for QueueHandle {
    fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        QueueHandle::check(self, message)
    }

    async fn deliver(&self, message: Envelope) -> Result<(), BrokerError> {
        // A queue that refuses (reject-publish) is reported; a queue deleted
        // since routing simply does not get its copy.
        match self.publish(message).await {
            Err(err @ BrokerError::QueueFull(_)) => Err(err),
            _ => Ok(()),
        }
    }
}

impl Deliver for Target {
    fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        Target::check(self, message)
    }

    async fn deliver(&self, message: Envelope) -> Result<(), BrokerError> {
        match self {
            Target::Queue(queue) => queue.deliver(message).await,
            // Nor does a stream deleted since routing (the size was checked).
            Target::Stream(stream) => {
                let _ = stream.publish(message).await;
                Ok(())
            }
        }
    }
}
