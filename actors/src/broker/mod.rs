//! [`Broker`]: the facade applications use. Everything a broker does is here,
//! one file per concern:
//!
//! - `queues`: declare, delete, purge, look up queues;
//! - `exchanges`: declare and delete exchanges, bind and unbind;
//! - `publish`: publish to a queue or through an exchange, and the one
//!   fan-out that hands a routed message to its targets (also used for dead
//!   letters, which the broker publishes for its queues);
//! - `consume`: start supervised consumers;
//! - `streams`: declare, delete, look up and bind streams;
//! - `topology`: the graph of queues, streams, exchanges and bindings, and
//!   routing through it;
//! - `durable`: opening on a data directory, recovery, and the durable
//!   topology.

mod consume;
mod durable;
mod exchanges;
mod partitions;
mod publish;
mod queues;
mod streams;
mod topology;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use postbox::{ActorId, RuntimeHandle, ShutdownHook};
use rustc_hash::FxHashMap;

pub use partitions::{PartitionOptions, Partitioned};
pub use publish::PublishOptions;
pub(crate) use publish::{Admitted, deliver_to};
pub(crate) use topology::Target;

use crate::error::BrokerError;
use crate::queue::budget::{MemoryEvent, MemoryStats};
use crate::queue::inbox::Shut;
use crate::queue::observe::{Observer, ObserverGuard, Observers};
use topology::Topology;

/// The backend a [`Broker`] runs on (see [`Broker::connect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// In this process: queues and consumers are actors here.
    Embedded,
    /// On RabbitMQ (feature `amqp`): queues live on the server, consumers
    /// are actors here.
    RabbitMq,
}

/// Broker-wide settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Largest message ([`Envelope::total_size`](crate::Envelope::total_size):
    /// payload, headers and properties) accepted by queues and streams that
    /// set no limit of their own.
    pub max_message_bytes: usize,
    /// The memory budget in bytes (RabbitMQ's memory high watermark): past
    /// it, the publishers of the queues holding an eighth of it or more
    /// wait until consumers bring it back under, and past 1.25 times it the
    /// publishers of every queue wait (see [`Broker::memory`]). It counts
    /// the sizes of the messages queues hold in memory (ready, and
    /// publishes waiting), not the allocator's overhead. `None`: no budget.
    pub memory_budget: Option<usize>,
}

impl Default for BrokerConfig {
    /// 16 MiB messages; a memory budget of 40% of the machine's memory
    /// (RabbitMQ's default watermark), where it can be read.
    fn default() -> Self {
        BrokerConfig {
            max_message_bytes: 16 << 20,
            memory_budget: crate::queue::budget::default_limit(),
        }
    }
}

impl BrokerConfig {
    /// Sets [`memory_budget`](Self::memory_budget) (`None`: no budget).
    ///
    /// ```
    /// use postbox_actors::BrokerConfig;
    /// let config = BrokerConfig::default().memory_budget(Some(512 << 20));
    /// assert_eq!(config.memory_budget, Some(512 << 20));
    /// ```
    pub fn memory_budget(mut self, bytes: Option<usize>) -> Self {
        self.memory_budget = bytes;
        self
    }
}

struct Inner {
    runtime: RuntimeHandle,
    config: BrokerConfig,
    topology: RwLock<Topology>,
    consumers: AtomicU64,
    observers: Observers,
    /// Every running consumer: a consumer lives until it is cancelled or
    /// gives up, whether or not its handle is kept.
    live: Mutex<HashMap<ActorId, crate::supervision::Kept>>,
    /// State the layers above keep per broker, one value per type (see
    /// [`Broker::extension`]).
    extensions: RwLock<FxHashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    /// Fails what waits on this broker's queues and streams when the runtime
    /// shuts down.
    _shutdown: ShutdownHook,
    /// The data directory, for a broker opened on one.
    storage: Option<durable::Storage>,
    /// The memory budget its queues charge, if it has one.
    budget: Option<Arc<crate::queue::budget::MemoryBudget>>,
    /// RabbitMQ, for a broker connected to it: every call goes there.
    #[cfg(feature = "amqp")]
    remote: std::sync::OnceLock<Arc<crate::amqp::Remote>>,
}

impl Inner {
    /// The runtime shut down: publishers waiting for room in a queue or a
    /// stream, and later ones, fail with `Stopped` (the actors themselves are
    /// dropped as their arbiters stop).
    fn shut_down(&self) {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote.get() {
            remote.close();
        }
        let topology = self.topology.read();
        for entry in topology.queues.values() {
            entry.handle.inbox.shut(Shut::Stopped);
        }
        for stream in topology.streams.values() {
            stream.core.stop();
        }
    }
}

/// A weak reference to a broker: what its queues hold of it (see
/// [`QueueHost`](crate::queue::actor::QueueHost)).
#[derive(Clone)]
pub(crate) struct BrokerRef(Weak<Inner>);

/// An in-process message broker; cheap to clone, usable from any thread.
///
/// The API names queues, never actors, so the same calls can later be served by
/// another backend (RabbitMQ) without changing applications. Queues live in a
/// registry read under a lock only on lookups; publishers on a hot path take a
/// [`QueueHandle`](crate::QueueHandle) once and skip the lookup.
///
/// ```
/// use postbox::Runtime;
/// use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueOptions};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::new()?;
/// let broker = Broker::new(&rt);
/// broker.declare_queue("orders", QueueOptions::default()).await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let _consumer = broker
///     .consume("orders", ConsumeOptions::manual(8), move || {
///         let tx = tx.clone();
///         move |d: Delivery| {
///             let tx = tx.clone();
///             async move {
///                 tx.send(d.decode::<u32>()?).ok();
///                 d.ack().await?;
///                 Ok(())
///             }
///         }
///     })
///     .await?;
/// broker.publish("orders", Envelope::encode(&42u32)?).await?;
/// assert_eq!(tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?, Some(42));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.inner.remote.get() {
            return f.debug_struct("Broker").field("backend", remote).finish();
        }
        let topology = self.inner.topology.read();
        f.debug_struct("Broker")
            .field("queues", &topology.queues.len())
            .field("exchanges", &topology.exchanges.len())
            .field("streams", &topology.streams.len())
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
        Broker::build(runtime, config, None)
    }

    /// A broker on the backend `url` names: `memory:` for an embedded one
    /// ([`Broker::new`]), `amqp://user:password@host:port/vhost` or
    /// `amqps://...` for RabbitMQ (feature `amqp`; see
    /// [`connect_with`](Self::connect_with)). Applications choose their
    /// backend by configuration and keep their code.
    ///
    /// Fails with [`BrokerError::InvalidUrl`] for another scheme, with
    /// [`BrokerError::Unsupported`] for RabbitMQ without feature `amqp`, and
    /// with [`BrokerError::Backend`] if RabbitMQ cannot be reached or
    /// refuses the credentials (which no error or log line shows).
    ///
    /// ```
    /// use postbox_actors::{Backend, Broker};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let rt = postbox::Runtime::new()?;
    /// let url = std::env::var("BROKER_URL").unwrap_or_else(|_| "memory:".into());
    /// let broker = Broker::connect(&rt, &url).await?;
    /// # assert_eq!(broker.backend(), Backend::Embedded);
    /// # Ok(()) }
    /// ```
    pub async fn connect(runtime: &RuntimeHandle, url: &str) -> Result<Broker, BrokerError> {
        if url == "memory:" || url == "memory://" {
            return Ok(Broker::new(runtime));
        }
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            #[cfg(feature = "amqp")]
            return Broker::connect_with(runtime, crate::amqp::AmqpOptions::new(url)).await;
            #[cfg(not(feature = "amqp"))]
            return Err(BrokerError::Unsupported {
                operation: "an amqp:// URL (build postbox-actors with feature `amqp`)",
                backend: "embedded",
            });
        }
        Err(BrokerError::InvalidUrl {
            url: url.split('@').next_back().unwrap_or_default().to_string(),
            reason: "expected memory:, amqp:// or amqps://".into(),
        })
    }

    /// A broker on RabbitMQ, connected as `options` say (a CA certificate
    /// for `amqps://`, timeouts, reconnection backoff).
    #[cfg(feature = "amqp")]
    #[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
    pub async fn connect_with(
        runtime: &RuntimeHandle,
        options: crate::amqp::AmqpOptions,
    ) -> Result<Broker, BrokerError> {
        let config = BrokerConfig::default().memory_budget(None);
        let remote = crate::amqp::Remote::connect(options, config.max_message_bytes).await?;
        let broker = Broker::build(runtime, config, None);
        // Set once, here, before anyone else has the broker.
        let _ = broker.inner.remote.set(remote);
        Ok(broker)
    }

    /// Which backend serves this broker.
    pub fn backend(&self) -> Backend {
        #[cfg(feature = "amqp")]
        if self.inner.remote.get().is_some() {
            return Backend::RabbitMq;
        }
        Backend::Embedded
    }

    /// RabbitMQ, for a broker connected to it.
    #[cfg(feature = "amqp")]
    pub(crate) fn remote(&self) -> Option<&Arc<crate::amqp::Remote>> {
        self.inner.remote.get()
    }

    fn build(
        runtime: &RuntimeHandle,
        config: BrokerConfig,
        storage: Option<durable::Storage>,
    ) -> Broker {
        let budget = config
            .memory_budget
            .map(crate::queue::budget::MemoryBudget::new);
        Broker {
            inner: Arc::new_cyclic(|weak: &Weak<Inner>| {
                let weak = weak.clone();
                Inner {
                    runtime: runtime.clone(),
                    config,
                    topology: RwLock::new(Topology::default()),
                    consumers: AtomicU64::new(1),
                    observers: Observers::default(),
                    live: Mutex::default(),
                    extensions: RwLock::default(),
                    _shutdown: runtime.on_shutdown(move || {
                        if let Some(inner) = weak.upgrade() {
                            inner.shut_down();
                        }
                    }),
                    storage,
                    budget,
                    #[cfg(feature = "amqp")]
                    remote: std::sync::OnceLock::new(),
                }
            }),
        }
    }

    /// Where the memory budget stands ([`BrokerConfig::memory_budget`]);
    /// `None` without one.
    pub fn memory(&self) -> Option<MemoryStats> {
        self.inner.budget.as_ref().map(|b| b.stats())
    }

    /// The memory budget's crossings, as they happen: over the limit (the
    /// publishers of the queues holding the most wait), back under (they
    /// resume). `None` without a budget.
    pub fn memory_events(&self) -> Option<tokio::sync::broadcast::Receiver<MemoryEvent>> {
        self.inner.budget.as_ref().map(|b| b.events())
    }

    /// Registers an observer of all traffic on this broker's queues, until the
    /// returned guard is dropped.
    pub fn observe(&self, observer: Arc<dyn Observer>) -> ObserverGuard {
        self.inner.observers.add(observer)
    }

    /// Fails with [`BrokerError::Stopped`] once the runtime has shut down:
    /// every call after that is refused, none hangs.
    pub(crate) fn alive(&self) -> Result<(), BrokerError> {
        if self.inner.runtime.is_shut_down() {
            return Err(BrokerError::Stopped);
        }
        Ok(())
    }

    pub(crate) fn runtime(&self) -> &RuntimeHandle {
        &self.inner.runtime
    }

    /// The message log, for a broker opened on a data directory.
    pub(crate) fn store(&self) -> Option<&crate::store::Store> {
        self.inner.storage.as_ref().map(|s| &s.log)
    }

    /// The value of type `T` this broker keeps for a layer above it (the
    /// requesters that take direct replies, say), created on first use. Layers
    /// keep per-broker state here so that the broker does not know them.
    pub(crate) fn extension<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let id = TypeId::of::<T>();
        if let Some(value) = self.inner.extensions.read().get(&id)
            && let Ok(value) = value.clone().downcast::<T>()
        {
            return value;
        }
        let mut extensions = self.inner.extensions.write();
        let value = extensions
            .entry(id)
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        // The entry for `T`'s id holds a `T`.
        value
            .downcast::<T>()
            .unwrap_or_else(|_| Arc::new(T::default()))
    }

    fn weak(&self) -> BrokerRef {
        BrokerRef(Arc::downgrade(&self.inner))
    }
}
