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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytestring::ByteString;
use parking_lot::RwLock;
use postbox::{ChildSpec, Restart, RuntimeHandle, SupervisorSpec};
use serde::Serialize;

use crate::consumer::{ConsumeOptions, Consumer, ConsumerActor, ConsumerHandle, Registration};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::name::{NameKind, validate_name};
use crate::observe::{Observer, ObserverGuard, Observers};
use crate::queue::actor::{Delete, Purge, QueueActor, QueueSnapshot};
use crate::queue::handle::QueueHandle;
use crate::queue::options::{DeleteOptions, QueueOptions};

/// Broker-wide settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Largest payload accepted by queues that set no limit of their own.
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

struct Entry {
    handle: QueueHandle,
    options: QueueOptions,
}

struct Inner {
    runtime: RuntimeHandle,
    config: BrokerConfig,
    queues: RwLock<HashMap<ByteString, Entry>>,
    consumers: AtomicU64,
    observers: Observers,
}

/// An in-process message broker; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("queues", &self.inner.queues.read().len())
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
            inner: Arc::new(Inner {
                runtime: runtime.clone(),
                config,
                queues: RwLock::new(HashMap::new()),
                consumers: AtomicU64::new(1),
                observers: Observers::default(),
            }),
        }
    }

    /// Declares a queue: creates it, or checks that the existing one has the
    /// same options.
    pub async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueHandle, BrokerError> {
        validate_name(NameKind::Queue, name)?;
        let mut queues = self.inner.queues.write();
        if let Some(entry) = queues.get(name).filter(|e| !e.handle.addr.is_closed()) {
            if entry.options != options {
                return Err(BrokerError::QueueMismatch {
                    name: name.to_string(),
                    existing: Box::new(entry.options.clone()),
                    requested: Box::new(options),
                });
            }
            return Ok(entry.handle.clone());
        }
        let name = ByteString::from(name);
        let actor_name = name.clone();
        let mut actor = Some(QueueActor::new(name.clone(), self.inner.observers.clone()));
        let addr = self
            .inner
            .runtime
            .build(move || actor.take())
            .mailbox(options.mailbox)
            .name(format!("queue:{actor_name}"))
            .spawn();
        let handle = QueueHandle {
            name: name.clone(),
            addr,
            max_message_bytes: options
                .max_message_bytes
                .unwrap_or(self.inner.config.max_message_bytes),
        };
        tracing::debug!(queue = %name, ?options, "queue declared");
        queues.insert(
            name,
            Entry {
                handle: handle.clone(),
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
            .queues
            .read()
            .get(name)
            .filter(|e| !e.handle.addr.is_closed())
            .map(|e| e.handle.clone())
            .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))
    }

    /// The names of all queues.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .queues
            .read()
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
        let handle = self.queue(name)?;
        let outcome = handle
            .addr
            .ask(Delete {
                if_unused: options.if_unused,
                if_empty: options.if_empty,
            })
            .await
            .map_err(|_| BrokerError::QueueNotFound(name.to_string()))?;
        match outcome {
            Ok(snapshot) => {
                let mut queues = self.inner.queues.write();
                if queues
                    .get(name)
                    .is_some_and(|e| e.handle.addr.id() == handle.addr.id())
                {
                    queues.remove(name);
                }
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
                messages: snapshot.stats.ready + snapshot.stats.unacked,
            }),
        }
    }

    /// Drops a queue's ready messages (not the unacknowledged ones); returns how many.
    pub async fn purge_queue(&self, name: &str) -> Result<usize, BrokerError> {
        let handle = self.queue(name)?;
        handle
            .addr
            .ask(Purge)
            .await
            .map_err(|_| BrokerError::QueueNotFound(name.to_string()))
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
        F: Fn() -> C + Send + Sync + 'static,
    {
        let handle = self.queue(queue)?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let name = format!("consumer:{queue}:{n}");
        let mailbox = options.mailbox_capacity();
        let child_options = options.clone();
        let child_queue = handle.clone();
        let child = ChildSpec::new("consumer", move || {
            ConsumerActor::new(child_queue.clone(), &child_options, factory())
        })
        .restart(Restart::Transient)
        .mailbox(mailbox);
        let supervisor = SupervisorSpec::new(name)
            .intensity(options.max_restarts, options.window)
            .backoff(options.backoff)
            .child(child)
            .spawn(&self.inner.runtime);
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
                Err(BrokerError::QueueNotFound(queue.to_string()))
            }
        }
    }
}
