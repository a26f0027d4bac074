//! The broker's topology: queues, streams, exchanges and the bindings between
//! them, and routing through that graph.
//!
//! Routing follows exchange-to-exchange bindings (each exchange visited at most
//! once, so cycles are harmless), gives each queue and each stream at most one
//! copy however many paths reach it, and sends what an exchange cannot route to
//! its alternate exchange, if it names one.
//!
//! Streams live here too (not in a registry of their own) so that binding to a
//! stream, deleting one and routing see one consistent graph under one lock.

use std::collections::HashMap;

use bytestring::ByteString;

use crate::envelope::Headers;
use crate::error::BrokerError;
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, ExchangeOptions};
use crate::queue::handle::QueueHandle;
use crate::queue::options::QueueOptions;
use crate::stream::handle::StreamHandle;

pub(crate) struct QueueEntry {
    pub(crate) handle: QueueHandle,
    pub(crate) options: QueueOptions,
}

/// Where a routed message goes: a queue's inbox or a stream's log.
#[derive(Clone)]
pub(crate) enum Target {
    Queue(QueueHandle),
    Stream(StreamHandle),
}

impl Target {
    /// The queue, if it is one.
    pub(crate) fn queue(&self) -> Option<&QueueHandle> {
        match self {
            Target::Queue(q) => Some(q),
            Target::Stream(_) => None,
        }
    }

    /// True if both are the same queue or the same stream.
    fn same(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Queue(a), Target::Queue(b)) => a.addr.id() == b.addr.id(),
            (Target::Stream(a), Target::Stream(b)) => std::sync::Arc::ptr_eq(&a.core, &b.core),
            _ => false,
        }
    }

    /// Refuses a message this target would refuse for its size.
    pub(crate) fn check(&self, message: &crate::envelope::Envelope) -> Result<(), BrokerError> {
        match self {
            Target::Queue(q) => q.check(message),
            Target::Stream(s) => s.check_routed(message),
        }
    }
}

#[derive(Default)]
pub(crate) struct Topology {
    pub(crate) queues: HashMap<ByteString, QueueEntry>,
    pub(crate) exchanges: HashMap<ByteString, Exchange>,
    pub(crate) streams: HashMap<ByteString, StreamHandle>,
}

impl Topology {
    /// The live queue of that name.
    pub(crate) fn queue(&self, name: &str) -> Option<&QueueHandle> {
        self.queues
            .get(name)
            .map(|e| &e.handle)
            .filter(|h| !h.addr.is_closed())
    }

    /// Forgets a queue (if it is still the same actor) and every binding to it.
    pub(crate) fn remove_queue(&mut self, name: &str, id: postbox::ActorId) {
        if self
            .queues
            .get(name)
            .is_some_and(|e| e.handle.addr.id() == id)
        {
            self.queues.remove(name);
            let dest = Destination::Queue(ByteString::from(name));
            for exchange in self.exchanges.values_mut() {
                exchange.unbind_destination(&dest);
            }
        }
    }

    /// Forgets a stream and every binding to it; returns its handle.
    pub(crate) fn remove_stream(&mut self, name: &str) -> Option<StreamHandle> {
        let handle = self.streams.remove(name)?;
        let dest = Destination::Stream(ByteString::from(name));
        for exchange in self.exchanges.values_mut() {
            exchange.unbind_destination(&dest);
        }
        Some(handle)
    }

    pub(crate) fn declare_exchange(
        &mut self,
        name: &str,
        options: ExchangeOptions,
    ) -> Result<(), BrokerError> {
        if let Some(existing) = self.exchanges.get(name) {
            if existing.options != options {
                return Err(BrokerError::ExchangeMismatch {
                    name: name.to_string(),
                    existing: Box::new(existing.options.clone()),
                    requested: Box::new(options),
                });
            }
            return Ok(());
        }
        self.exchanges
            .insert(ByteString::from(name), Exchange::new(options));
        Ok(())
    }

    pub(crate) fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        let exchange = self
            .exchanges
            .get(name)
            .ok_or_else(|| BrokerError::ExchangeNotFound(name.to_string()))?;
        if if_unused && !exchange.bindings().is_empty() {
            return Err(BrokerError::ExchangeInUse {
                name: name.to_string(),
                bindings: exchange.bindings().len(),
            });
        }
        self.exchanges.remove(name);
        let dest = Destination::Exchange(ByteString::from(name));
        for exchange in self.exchanges.values_mut() {
            exchange.unbind_destination(&dest);
        }
        Ok(())
    }

    fn check_destination(&self, destination: &Destination) -> Result<(), BrokerError> {
        match destination {
            Destination::Queue(q) if self.queue(q).is_none() => {
                Err(BrokerError::QueueNotFound(q.to_string()))
            }
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                Err(BrokerError::ExchangeNotFound(e.to_string()))
            }
            Destination::Stream(s) if !self.streams.contains_key(s) => {
                Err(BrokerError::StreamNotFound(s.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Adds a binding to `exchange`; Ok(false) if it existed already.
    pub(crate) fn bind(&mut self, exchange: &str, binding: Binding) -> Result<bool, BrokerError> {
        self.check_destination(&binding.destination)?;
        let source = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| BrokerError::ExchangeNotFound(exchange.to_string()))?;
        if binding.headers.is_some() && source.options.kind != ExchangeKind::Headers {
            return Err(BrokerError::WrongExchangeKind {
                exchange: exchange.to_string(),
                kind: source.options.kind,
                expected: ExchangeKind::Headers,
            });
        }
        Ok(source.bind(binding))
    }

    /// Removes a binding from `exchange`; Ok(false) if there was none.
    pub(crate) fn unbind(
        &mut self,
        exchange: &str,
        binding: &Binding,
    ) -> Result<bool, BrokerError> {
        let source = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| BrokerError::ExchangeNotFound(exchange.to_string()))?;
        Ok(source.unbind(binding))
    }

    /// The queues and streams a message published to `exchange` reaches, each
    /// once. The default exchange `""` routes to the queue named by the key.
    pub(crate) fn route(
        &self,
        exchange: &str,
        key: &str,
        headers: &Headers,
    ) -> Result<Vec<Target>, BrokerError> {
        let mut out = Vec::new();
        if exchange.is_empty() {
            out.extend(self.queue(key).cloned().map(Target::Queue));
            return Ok(out);
        }
        if !self.exchanges.contains_key(exchange) {
            return Err(BrokerError::ExchangeNotFound(exchange.to_string()));
        }
        let mut visited = Vec::new();
        self.route_into(exchange, key, headers, &mut visited, &mut out);
        Ok(out)
    }

    /// Routes through `name`; returns whether it reached any queue or stream
    /// (one already reached by another path counts).
    fn route_into<'a>(
        &'a self,
        name: &'a str,
        key: &str,
        headers: &Headers,
        visited: &mut Vec<&'a str>,
        out: &mut Vec<Target>,
    ) -> bool {
        if visited.contains(&name) {
            return false;
        }
        visited.push(name);
        let Some(exchange) = self.exchanges.get(name) else {
            return false;
        };
        let mut dests = Vec::new();
        exchange.route(key, headers, &mut dests);
        let mut routed = false;
        for dest in dests {
            let target = match dest {
                Destination::Queue(q) => self.queue(q).cloned().map(Target::Queue),
                Destination::Stream(s) => self.streams.get(s).cloned().map(Target::Stream),
                Destination::Exchange(e) => {
                    routed |= self.route_into(e, key, headers, visited, out);
                    continue;
                }
            };
            if let Some(target) = target {
                routed = true;
                if !out.iter().any(|t| t.same(&target)) {
                    out.push(target);
                }
            }
        }
        if let Some(alternate) = exchange
            .options
            .alternate_exchange
            .as_deref()
            .filter(|_| !routed)
        {
            routed = self.route_into(alternate, key, headers, visited, out);
        }
        routed
    }
}
