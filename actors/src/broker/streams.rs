//! Streams through the broker: declare, look up, delete, and bind them to
//! exchanges.
//!
//! Streams have a namespace of their own (a queue and a stream may share a
//! name). They are kept in the broker's topology, with its queues and
//! exchanges, read under its lock only on lookups: publishers on a hot path
//! keep a [`StreamHandle`].
//!
//! A durable stream on a broker opened on a data directory is recorded in
//! the topology log before its declaration returns, and its deletion removes
//! its records from disk (see `durable`).

use bytestring::ByteString;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::exchange::{BindingKey, Destination};
use crate::name::{NameKind, validate_declared};
use crate::stream::{StreamError, StreamHandle, StreamOptions, StreamStats};

impl Broker {
    /// Declares a stream: creates it, or checks that the existing one has the
    /// same options ([`StreamError::Mismatch`] if not). A
    /// [`durable`](StreamOptions::durable) stream on a broker opened on a
    /// data directory is on disk before this returns
    /// ([`StreamError::Storage`] if it cannot be).
    pub async fn declare_stream(
        &self,
        name: &str,
        options: StreamOptions,
    ) -> Result<StreamHandle, StreamError> {
        validate_declared(NameKind::Stream, name)?;
        self.alive().map_err(|_| StreamError::Stopped)?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return self.declare_remote_stream(remote, name, options).await;
        }
        let mut topology = self.inner.topology.write();
        if let Some(existing) = topology.streams.get(name) {
            if existing.core.options != options {
                return Err(StreamError::Mismatch {
                    name: name.to_string(),
                    existing: Box::new(existing.core.options.clone()),
                    requested: Box::new(options),
                });
            }
            return Ok(existing.clone());
        }
        let limit = options
            .max_message_bytes
            .unwrap_or(self.inner.config.max_message_bytes);
        let handle = match (&self.inner.storage, options.durable) {
            (Some(storage), true) => {
                storage.declare_stream(name, &options, limit, self.runtime())?
            }
            _ => StreamHandle::new(
                ByteString::from(name),
                options,
                limit,
                self.runtime().clone(),
            ),
        };
        let name = ByteString::from(name);
        tracing::debug!(stream = %name, options = ?handle.options(), "stream declared");
        topology.streams.insert(name, handle.clone());
        Ok(handle)
    }

    /// [`declare_stream`](Self::declare_stream) on RabbitMQ: a stream
    /// queue, declared there every time (another process may have deleted
    /// it), its handle kept here so that every handle shares its
    /// subscribers' positions.
    #[cfg(feature = "amqp")]
    async fn declare_remote_stream(
        &self,
        remote: &std::sync::Arc<crate::amqp::Remote>,
        name: &str,
        options: StreamOptions,
    ) -> Result<StreamHandle, StreamError> {
        if let Some(existing) = self.inner.topology.read().streams.get(name)
            && existing.core.options != options
        {
            return Err(StreamError::Mismatch {
                name: name.to_string(),
                existing: Box::new(existing.core.options.clone()),
                requested: Box::new(options),
            });
        }
        remote.declare_stream(name, &options).await?;
        let mut topology = self.inner.topology.write();
        if let Some(existing) = topology.streams.get(name) {
            return Ok(existing.clone());
        }
        let limit = options
            .max_message_bytes
            .unwrap_or(self.inner.config.max_message_bytes);
        let handle = StreamHandle::remote(
            ByteString::from(name),
            options,
            limit,
            self.runtime().clone(),
            crate::stream::remote::RemoteStream::new(
                name,
                Box::new(crate::amqp::AmqpStream::new(remote, name)),
            ),
        );
        tracing::debug!(stream = %name, options = ?handle.options(), "stream declared on rabbitmq");
        topology
            .streams
            .insert(ByteString::from(name), handle.clone());
        Ok(handle)
    }

    /// A handle to an existing stream (on RabbitMQ: one this process
    /// declared).
    pub fn stream(&self, name: &str) -> Result<StreamHandle, StreamError> {
        self.inner
            .topology
            .read()
            .streams
            .get(name)
            .cloned()
            .ok_or_else(|| StreamError::NotFound(name.to_string()))
    }

    /// The names of all streams.
    pub fn stream_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .topology
            .read()
            .streams
            .keys()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        names
    }

    /// Deletes a stream, its records and every binding to it, and stops its
    /// subscribers (each finishes the batch in hand). Publishers waiting on it,
    /// and later calls through its handles, get [`StreamError::NotFound`].
    /// A durable stream's records are deleted from disk too, and its deletion
    /// recorded: it does not come back when the broker reopens. Returns its
    /// last stats.
    pub async fn delete_stream(&self, name: &str) -> Result<StreamStats, StreamError> {
        self.alive().map_err(|_| StreamError::Stopped)?;
        let (handle, durable) = {
            let mut topology = self.inner.topology.write();
            let handle = topology
                .remove_stream(name)
                .ok_or_else(|| StreamError::NotFound(name.to_string()))?;
            // Recorded under the topology's lock (a declaration of that name
            // may follow at once), and first: a crash from here on does not
            // bring it back.
            let durable = match &self.inner.storage {
                Some(storage) if handle.is_durable() => storage.forget_stream(name),
                _ => None,
            };
            (handle, durable)
        };
        tracing::debug!(stream = %name, "stream deleted");
        #[cfg(feature = "amqp")]
        if let (Some(remote), Some(stream)) = (self.remote(), handle.on_rabbitmq()) {
            let deleted = remote.delete_stream(name).await;
            let stats = handle.stats();
            handle.core.close().await;
            stream.close().await;
            deleted?;
            return Ok(stats);
        }
        let stats = handle.core.close().await;
        if let (Some(id), Some(storage)) = (durable, &self.inner.storage) {
            storage.remove_stream(id);
        }
        Ok(stats)
    }

    /// Binds a stream to an exchange, with a routing key (a pattern for topic
    /// exchanges) or a headers match: what the exchange routes with it is
    /// appended to the stream, once per message however many bindings match.
    /// Binding twice is a no-op. Arguments in the order of
    /// [`Broker::bind_queue`]: what is bound, then to which exchange.
    pub async fn bind_stream(
        &self,
        stream: &str,
        exchange: &str,
        key: impl Into<BindingKey>,
    ) -> Result<(), BrokerError> {
        self.bind(
            exchange,
            Destination::Stream(ByteString::from(stream)),
            key.into(),
        )
        .await
    }

    /// Removes a stream binding; false if there was none.
    pub async fn unbind_stream(
        &self,
        stream: &str,
        exchange: &str,
        key: impl Into<BindingKey>,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            exchange,
            Destination::Stream(ByteString::from(stream)),
            key.into(),
        )
        .await
    }
}
