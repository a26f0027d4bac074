//! Exchanges through the broker: declare, delete, bind and unbind queues,
//! streams and exchanges, list bindings. A binding takes one [`BindingKey`]:
//! a routing key (a pattern, for topic exchanges) or a headers match.

use bytestring::ByteString;

use crate::broker::Broker;
use crate::broker::topology::Topology;
use crate::error::BrokerError;
use crate::exchange::{Binding, BindingKey, Destination, ExchangeKind, ExchangeOptions, HashOn};
use crate::name::{NameKind, validate_declared, validate_key, validate_name};

impl Broker {
    /// Declares an exchange: creates it, or checks that the existing one has the
    /// same options.
    #[doc(alias = "exchange_declare")]
    pub async fn declare_exchange(
        &self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange("declared"));
        }
        validate_declared(NameKind::Exchange, name)?;
        if let Some(alternate) = &options.alternate_exchange {
            validate_name(NameKind::Exchange, alternate)?;
        }
        if options.kind != ExchangeKind::ConsistentHash && options.hash_on != HashOn::RoutingKey {
            return Err(BrokerError::InvalidExchangeOptions {
                name: name.to_string(),
                reason: "only a consistent-hash exchange hashes on a header or a property",
            });
        }
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.declare_exchange(name, options).await;
        }
        let mut topology = self.inner.topology.write();
        let created = !topology.exchanges.contains_key(name);
        let durable = options.durable.then(|| options.clone());
        topology.declare_exchange(name, options)?;
        // A durable exchange is on disk before the declaration returns.
        if let (true, Some(options), Some(storage)) = (created, durable, &self.inner.storage)
            && let Err(err) = storage.declare_exchange(name, &options)
        {
            topology.exchanges.remove(name);
            return Err(err.into());
        }
        Ok(())
    }

    /// What the duplicate window of exchange `name` has done; `None` if it
    /// has no window ([`ExchangeOptions::dedup`](crate::ExchangeOptions::dedup)).
    pub fn exchange_dedup_stats(
        &self,
        name: &str,
    ) -> Result<Option<crate::dedup::DedupStats>, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            let window = remote
                .record
                .lock()
                .exchange(name)
                .and_then(|d| d.window.clone());
            return Ok(window.map(|w| w.stats()));
        }
        let topology = self.inner.topology.read();
        let exchange = topology
            .exchanges
            .get(name)
            .ok_or_else(|| BrokerError::ExchangeNotFound(name.to_string()))?;
        Ok(exchange.dedup.as_ref().map(|d| d.stats()))
    }

    /// Deletes an exchange and every binding from or to it.
    #[doc(alias = "exchange_delete")]
    pub async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange("deleted"));
        }
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.delete_exchange(name, if_unused).await;
        }
        let mut topology = self.inner.topology.write();
        let durable = topology
            .exchanges
            .get(name)
            .is_some_and(|x| x.options.durable);
        topology.delete_exchange(name, if_unused)?;
        if let (true, Some(storage)) = (durable, &self.inner.storage) {
            storage.delete_exchange(name);
        }
        Ok(())
    }

    /// Binds a queue to an exchange, with a routing key (a pattern for topic
    /// exchanges) or a headers match. Binding twice is a no-op.
    ///
    /// ```
    /// # use postbox_actors::{Broker, ExchangeOptions, HeadersMatch, QueueOptions};
    /// # postbox::testkit::run(async {
    /// # let broker = Broker::new(&postbox::RuntimeHandle::local());
    /// # broker.declare_queue("q", QueueOptions::default()).await.unwrap();
    /// broker.declare_exchange("events", ExchangeOptions::topic()).await?;
    /// broker.bind_queue("q", "events", "orders.#").await?;
    /// broker.declare_exchange("docs", ExchangeOptions::headers()).await?;
    /// broker.bind_queue("q", "docs", HeadersMatch::all([("format", "pdf")])).await?;
    /// # Ok::<(), postbox_actors::BrokerError>(())
    /// # }).unwrap();
    /// ```
    #[doc(alias = "queue_bind")]
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: impl Into<BindingKey>,
    ) -> Result<(), BrokerError> {
        self.bind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            key.into(),
        )
        .await
    }

    /// Removes a queue binding; false if there was none.
    #[doc(alias = "queue_unbind")]
    pub async fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: impl Into<BindingKey>,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            exchange,
            Destination::Queue(ByteString::from(queue)),
            key.into(),
        )
        .await
    }

    /// Binds exchange `destination` to exchange `source`: what `source` routes
    /// with this key also goes through `destination`.
    #[doc(alias = "exchange_bind")]
    pub async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: impl Into<BindingKey>,
    ) -> Result<(), BrokerError> {
        self.bind(
            source,
            Destination::Exchange(ByteString::from(destination)),
            key.into(),
        )
        .await
    }

    /// Removes an exchange-to-exchange binding; false if there was none.
    #[doc(alias = "exchange_unbind")]
    pub async fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: impl Into<BindingKey>,
    ) -> Result<bool, BrokerError> {
        self.unbind(
            source,
            Destination::Exchange(ByteString::from(destination)),
            key.into(),
        )
        .await
    }

    /// Every exchange with its options, sorted by name (the default
    /// exchange, which has no name and no options, is not listed).
    ///
    /// On RabbitMQ: the exchanges this process declared.
    pub fn exchanges(&self) -> Vec<(String, ExchangeOptions)> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return remote.record.lock().exchanges();
        }
        let mut all: Vec<(String, ExchangeOptions)> = self
            .inner
            .topology
            .read()
            .exchanges
            .iter()
            .map(|(name, e)| (name.to_string(), e.options.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The bindings whose source is `exchange`.
    ///
    /// On RabbitMQ: the bindings this process made (AMQP cannot list the
    /// server's).
    pub fn bindings(&self, exchange: &str) -> Result<Vec<Binding>, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return Ok(remote.record.lock().bindings(exchange));
        }
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
        key: BindingKey,
    ) -> Result<Binding, BrokerError> {
        if exchange.is_empty() {
            return Err(BrokerError::DefaultExchange("bound to"));
        }
        let (key, arguments) = key.into_parts();
        validate_key(NameKind::BindingKey, &key)?;
        Ok(Binding {
            destination,
            key,
            arguments,
        })
    }

    /// Binds, on whichever backend serves this broker.
    pub(super) async fn bind(
        &self,
        exchange: &str,
        destination: Destination,
        key: BindingKey,
    ) -> Result<(), BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            Self::binding(exchange, destination.clone(), key.clone())?;
            return remote
                .bind(destination, exchange, key, false)
                .await
                .map(|_| ());
        }
        self.bind_local(exchange, destination, key)
    }

    /// Unbinds, on whichever backend serves this broker.
    pub(super) async fn unbind(
        &self,
        exchange: &str,
        destination: Destination,
        key: BindingKey,
    ) -> Result<bool, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            Self::binding(exchange, destination.clone(), key.clone())?;
            return remote.bind(destination, exchange, key, true).await;
        }
        self.unbind_local(exchange, destination, key)
    }

    fn bind_local(
        &self,
        exchange: &str,
        destination: Destination,
        key: BindingKey,
    ) -> Result<(), BrokerError> {
        let binding = Self::binding(exchange, destination, key)?;
        self.alive()?;
        let mut topology = self.inner.topology.write();
        let created = topology.bind(exchange, binding.clone())?;
        if let (true, Some(storage)) = (created, &self.inner.storage)
            && Self::durable_binding(&topology, exchange, &binding.destination)
            && let Err(err) = storage.bind(exchange, &binding)
        {
            let _ = topology.unbind(exchange, &binding);
            return Err(err.into());
        }
        Ok(())
    }

    fn unbind_local(
        &self,
        exchange: &str,
        destination: Destination,
        key: BindingKey,
    ) -> Result<bool, BrokerError> {
        let binding = Self::binding(exchange, destination, key)?;
        self.alive()?;
        let mut topology = self.inner.topology.write();
        let durable = Self::durable_binding(&topology, exchange, &binding.destination);
        let removed = topology.unbind(exchange, &binding)?;
        if let (true, true, Some(storage)) = (removed, durable, &self.inner.storage)
            && let Err(err) = storage.unbind(exchange, &binding)
        {
            let _ = topology.bind(exchange, binding);
            return Err(err.into());
        }
        Ok(removed)
    }

    /// Whether a binding outlives the broker: both of its ends do (as in
    /// RabbitMQ).
    fn durable_binding(topology: &Topology, exchange: &str, destination: &Destination) -> bool {
        let durable_exchange = |name: &str| {
            topology
                .exchanges
                .get(name)
                .is_some_and(|x| x.options.durable)
        };
        durable_exchange(exchange)
            && match destination {
                Destination::Queue(q) => {
                    topology.queues.get(q).is_some_and(|e| e.store_id.is_some())
                }
                Destination::Exchange(x) => durable_exchange(x),
                Destination::Stream(s) => topology.streams.get(s).is_some_and(|h| h.is_durable()),
            }
    }
}
