//! Queues through the broker: declare, look up, delete, purge, read stats.

use bytestring::ByteString;
use std::sync::Arc;

use crate::broker::Broker;
use crate::broker::topology::{QueueEntry, Topology};
use crate::error::BrokerError;
use crate::name::{NameKind, validate_declared, validate_key, validate_name};
use crate::queue::actor::{Delete, Durable, Purge, QueueSnapshot, spawn_queue};
use crate::queue::handle::{LocalQueue, QueueHandle};
use crate::queue::options::{DeleteOptions, QueueOptions};

impl Broker {
    /// A deleted queue's durable declaration goes too.
    pub(crate) fn forget_durable(&self, entry: Option<&QueueEntry>) {
        if let (Some(storage), Some(id)) = (&self.inner.storage, entry.and_then(|e| e.store_id)) {
            storage.delete_queue(id);
        }
    }

    /// Declares a queue: creates it, or checks that the existing one has the
    /// same options ([`BrokerError::QueueMismatch`] if not, as in RabbitMQ).
    #[doc(alias = "queue_declare")]
    pub async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
    ) -> Result<QueueHandle, BrokerError> {
        validate_declared(NameKind::Queue, name)?;
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
        if let Some(reason) = invalid_priority(&options) {
            return Err(BrokerError::InvalidQueueOptions {
                name: name.to_string(),
                reason,
            });
        }
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.declare_queue(name, options).await.map(Into::into);
        }
        let mut topology = self.inner.topology.write();
        if let Some(entry) = topology.queues.get(name).filter(|e| e.handle.is_live()) {
            if *entry.options != options {
                return Err(BrokerError::QueueMismatch {
                    name: name.to_string(),
                    existing: entry.options.clone(),
                    requested: Box::new(options),
                });
            }
            // A redeclaration is a use: it renews an expiring queue.
            entry.handle.renew();
            return Ok(Arc::clone(&entry.handle).into());
        }
        // A durable queue is on disk before the declaration returns.
        let durable = match (&self.inner.storage, options.durable) {
            (Some(storage), true) => {
                let id = storage.declare_queue(name, &options)?;
                Some((
                    Durable {
                        store: storage.log.clone(),
                        id,
                    },
                    Vec::new(),
                ))
            }
            _ => None,
        };
        let handle = self.start_queue(&mut topology, name, options, durable)?;
        tracing::debug!(queue = %name, "queue declared");
        Ok(handle.into())
    }

    /// Starts a queue actor and registers it (a new declaration, or a
    /// durable queue recovered with its messages).
    pub(crate) fn start_queue(
        &self,
        topology: &mut Topology,
        name: &str,
        options: QueueOptions,
        durable: Option<(Durable, Vec<crate::store::Recovered>)>,
    ) -> Result<Arc<LocalQueue>, BrokerError> {
        let limit = options
            .max_message_bytes
            .unwrap_or(self.inner.config.max_message_bytes);
        let store_id = durable.as_ref().map(|(d, _)| d.id);
        let name = ByteString::from(name);
        let handle = spawn_queue(
            &self.inner.runtime,
            name.clone(),
            &options,
            limit,
            self.inner.observers.clone(),
            Arc::new(self.weak()),
            durable,
        )
        // The runtime stopped under us: the actor could not start.
        .map(Arc::new)
        .ok_or(BrokerError::Stopped)?;
        topology.insert_queue(
            name,
            QueueEntry {
                handle: handle.clone(),
                options: Box::new(options),
                store_id,
            },
        );
        Ok(handle)
    }

    /// A handle to an existing queue.
    ///
    /// On RabbitMQ this does not ask the server (it cannot wait): a handle
    /// to a queue that does not exist fails on first use, with
    /// [`BrokerError::QueueNotFound`].
    pub fn queue(&self, name: &str) -> Result<QueueHandle, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            crate::name::validate_name(NameKind::Queue, name)?;
            return Ok(crate::amqp::RemoteQueue::new(remote, name, 0).into());
        }
        self.local_queue(name).map(QueueHandle::from)
    }

    /// The embedded queue `name`.
    pub(crate) fn local_queue(&self, name: &str) -> Result<Arc<LocalQueue>, BrokerError> {
        self.inner
            .topology
            .read()
            .queue(name)
            .map(Arc::clone)
            .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))
    }

    /// The names of all queues, sorted.
    ///
    /// On RabbitMQ: the queues this process declared (AMQP cannot list the
    /// server's).
    pub fn queue_names(&self) -> Vec<String> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.record.lock().queue_names();
        }
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

    /// The options queue `name` was declared with.
    ///
    /// On RabbitMQ: those of a queue this process declared.
    pub fn queue_options(&self, name: &str) -> Result<QueueOptions, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote
                .record
                .lock()
                .queue(name)
                .map(|d| d.options.clone())
                .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()));
        }
        self.inner
            .topology
            .read()
            .queues
            .get(name)
            .filter(|e| !e.handle.addr.is_closed())
            .map(|e| (*e.options).clone())
            .ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))
    }

    /// Deletes a queue, dropping its messages, and cancels its consumers.
    /// Returns the queue's last snapshot, which counts every publish that got
    /// in before; every publish after this returns fails.
    #[doc(alias = "queue_delete")]
    pub async fn delete_queue(
        &self,
        name: &str,
        options: DeleteOptions,
    ) -> Result<QueueSnapshot, BrokerError> {
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.delete_queue(name, options).await;
        }
        let handle = self.local_queue(name)?;
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
                let entry = self
                    .inner
                    .topology
                    .write()
                    .remove_queue(name, handle.addr.id());
                self.forget_durable(entry.as_ref());
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

    /// Fetches the head ready message of a queue without a consumer:
    /// RabbitMQ's `basic.get` (see [`QueueHandle::get`]).
    #[doc(alias = "basic_get")]
    pub async fn get(
        &self,
        queue: &str,
        mode: crate::queue::ack::AckMode,
    ) -> Result<Option<(crate::queue::delivery::Delivery, usize)>, BrokerError> {
        self.alive()?;
        self.queue(queue)?.get(mode).await
    }

    /// Drops a queue's ready messages (not the unacknowledged ones); returns how many.
    #[doc(alias = "queue_purge")]
    pub async fn purge_queue(&self, name: &str) -> Result<usize, BrokerError> {
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.purge_queue(name).await;
        }
        let handle = self.local_queue(name)?;
        handle.addr.ask(Purge).await.map_err(|_| handle.gone())
    }

    /// A queue's counters and consumers.
    pub async fn queue_stats(&self, name: &str) -> Result<QueueSnapshot, BrokerError> {
        self.queue(name)?.snapshot().await
    }
}

/// Why a priority queue cannot be declared with these options, if it cannot.
fn invalid_priority(options: &QueueOptions) -> Option<&'static str> {
    match options.max_priority {
        Some(0) => Some("the maximum priority must be 1 to 255"),
        Some(_) if options.overflow == crate::queue::policy::Overflow::Spill => {
            Some("a priority queue cannot spill (its order is not the publish order)")
        }
        _ => None,
    }
}
