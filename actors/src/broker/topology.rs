//! The broker's topology: queues, streams, exchanges and the bindings between
//! them, and routing through that graph.
//!
//! Routing follows exchange-to-exchange bindings (each exchange visited at most
//! once, so cycles are harmless), gives each queue and each stream at most one
//! copy however many paths reach it, and sends what an exchange cannot route to
//! its alternate exchange, if it names one. As in RabbitMQ, an exchange that
//! matched a binding to another exchange has routed the message, whatever that
//! exchange does with it: its own alternate is not used.
//!
//! Streams live here too (not in a registry of their own) so that binding to a
//! stream, deleting one and routing see one consistent graph under one lock.
//!
//! Routing is on every publish's path, so it does no per-destination name
//! lookups: bindings hold their target's handle, resolved at bind time
//! ([`crate::exchange::Bound`]), and the topology keeps those current. It is
//! changed only under its write lock, by bind and unbind, queue declaration
//! (a queue declared again under a stopped one's name takes over its
//! bindings, which are re-pointed at it), and the deletion of queues, streams
//! and exchanges (which removes every binding to them). A route is collected
//! into a [`Routed`] that holds up to 16 targets inline, so a publish
//! allocates nothing for routing in the common case, and each target costs one
//! refcount: queues are kept as `Arc<LocalQueue>`. Only exchange-to-exchange
//! hops and alternate exchanges are looked up by name.
//!
//! The name maps use FxHash rather than SipHash. Names come from users, but
//! this broker lives inside one process and takes names from that process's
//! own code: whoever could feed it colliding names could run code here anyway,
//! so HashDoS resistance buys nothing, and SipHash was a visible share of
//! every publish.

use std::sync::Arc;

use bytestring::ByteString;
use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::exchange::{Binding, Bound, Destination, Exchange, ExchangeOptions};
use crate::queue::handle::LocalQueue;
use crate::queue::options::QueueOptions;
use crate::stream::{StreamError, StreamHandle};

pub(crate) struct QueueEntry {
    pub(crate) handle: Arc<LocalQueue>,
    /// Boxed: the entry sits in a hash map slot, which holds it inline
    /// (with the map's spare slots, about 1.3 times over at 100,000 queues).
    pub(crate) options: Box<QueueOptions>,
    /// Its id in the broker's store, if it is durable there.
    pub(crate) store_id: Option<crate::store::QueueId>,
}

/// Where a routed message goes: a queue's inbox or a stream's log. Cloning
/// one is a single refcount.
#[derive(Clone)]
pub(crate) enum Target {
    Queue(Arc<LocalQueue>),
    Stream(StreamHandle),
}

impl Target {
    /// The queue, if it is one.
    pub(crate) fn queue(&self) -> Option<&LocalQueue> {
        match self {
            Target::Queue(q) => Some(q),
            Target::Stream(_) => None,
        }
    }

    /// Identity: the address of the shared handle (one per queue or stream in
    /// the topology).
    fn id(&self) -> usize {
        match self {
            Target::Queue(q) => Arc::as_ptr(q) as *const () as usize,
            Target::Stream(s) => Arc::as_ptr(&s.core) as *const () as usize,
        }
    }

    /// Whether it can still take messages: a queue whose actor stopped is
    /// skipped until the topology forgets it. (A deleted stream leaves the
    /// topology at once.)
    fn is_live(&self) -> bool {
        match self {
            Target::Queue(q) => !q.addr.is_closed(),
            Target::Stream(_) => true,
        }
    }

    /// Refuses a message this target would refuse for its size.
    pub(crate) fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        match self {
            Target::Queue(q) => q.check(message),
            Target::Stream(s) => s.check_routed(message),
        }
    }
}

/// The targets of one publish, each once, and the name of the exchange it was
/// published to (shared, for its envelope; `None` for the default exchange).
#[derive(Default)]
pub(crate) struct Routed {
    pub(crate) targets: SmallVec<[Target; 16]>,
    pub(crate) exchange: Option<Arc<str>>,
    /// The duplicate window of the exchange it was published to.
    pub(crate) dedup: Option<Arc<crate::dedup::SharedWindow>>,
}

#[derive(Default)]
pub(crate) struct Topology {
    pub(crate) queues: FxHashMap<ByteString, QueueEntry>,
    pub(crate) exchanges: FxHashMap<ByteString, Exchange<Target>>,
    pub(crate) streams: FxHashMap<ByteString, StreamHandle>,
}

impl Topology {
    /// The live queue of that name.
    pub(crate) fn queue(&self, name: &str) -> Option<&Arc<LocalQueue>> {
        self.queues
            .get(name)
            .map(|e| &e.handle)
            .filter(|h| !h.addr.is_closed())
    }

    /// Registers a queue. A stopped queue's entry of that name is replaced,
    /// and bindings to that name now lead to the new queue (they used to be
    /// resolved by name on each publish; they are resolved once here).
    pub(crate) fn insert_queue(&mut self, name: ByteString, entry: QueueEntry) {
        let target = Target::Queue(entry.handle.clone());
        let replaced = self.queues.insert(name.clone(), entry).is_some();
        if replaced {
            let dest = Destination::Queue(name);
            for exchange in self.exchanges.values_mut() {
                exchange.retarget(&dest, &target);
            }
        }
    }

    /// Forgets a queue (if it is still the same actor) and every binding to
    /// it; returns its entry.
    pub(crate) fn remove_queue(&mut self, name: &str, id: postbox::ActorId) -> Option<QueueEntry> {
        if self
            .queues
            .get(name)
            .is_none_or(|e| e.handle.addr.id() != id)
        {
            return None;
        }
        let entry = self.queues.remove(name);
        let dest = Destination::Queue(ByteString::from(name));
        for exchange in self.exchanges.values_mut() {
            exchange.unbind_destination(&dest);
        }
        entry
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
            .insert(ByteString::from(name), Exchange::new(name, options));
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

    /// What a binding to `destination` holds: the queue's or stream's handle.
    fn resolve(&self, destination: &Destination) -> Result<Option<Target>, BrokerError> {
        match destination {
            Destination::Queue(q) => self
                .queue(q)
                .map(|h| Some(Target::Queue(h.clone())))
                .ok_or_else(|| BrokerError::QueueNotFound(q.to_string())),
            Destination::Stream(s) => self
                .streams
                .get(s)
                .map(|h| Some(Target::Stream(h.clone())))
                .ok_or_else(|| StreamError::NotFound(s.to_string()).into()),
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                Err(BrokerError::ExchangeNotFound(e.to_string()))
            }
            Destination::Exchange(_) => Ok(None),
        }
    }

    /// Adds a binding to `exchange`; Ok(false) if it existed already.
    pub(crate) fn bind(&mut self, exchange: &str, binding: Binding) -> Result<bool, BrokerError> {
        let target = self.resolve(&binding.destination)?;
        let source = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| BrokerError::ExchangeNotFound(exchange.to_string()))?;
        Ok(source.bind(binding, target)?)
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

    /// Collects into `out` the queues and streams a message published to
    /// `exchange` reaches, each once. The default exchange `""` routes to the
    /// queue named by the key.
    pub(crate) fn route(
        &self,
        exchange: &str,
        key: &str,
        message: &Envelope,
        out: &mut Routed,
    ) -> Result<(), BrokerError> {
        if exchange.is_empty() {
            out.targets
                .extend(self.queue(key).map(|h| Target::Queue(h.clone())));
            return Ok(());
        }
        let Some((name, source)) = self.exchanges.get_key_value(exchange) else {
            return Err(BrokerError::ExchangeNotFound(exchange.to_string()));
        };
        out.exchange = Some(source.name.clone());
        out.dedup = source.dedup.clone();
        let mut visited = SmallVec::new();
        self.route_into(name, source, key, message, &mut visited, &mut out.targets);
        Ok(())
    }

    /// Routes through exchange `name`; returns whether it routed the message:
    /// matched a binding to a queue or stream (one already reached by another
    /// path counts) or to another exchange.
    fn route_into<'a>(
        &'a self,
        name: &'a str,
        exchange: &'a Exchange<Target>,
        key: &str,
        message: &Envelope,
        visited: &mut SmallVec<[&'a str; 4]>,
        out: &mut SmallVec<[Target; 16]>,
    ) -> bool {
        if visited.contains(&name) {
            return false;
        }
        visited.push(name);
        let start = out.len();
        let mut routed = false;
        let mut hops: SmallVec<[&'a ByteString; 2]> = SmallVec::new();
        let repeats = exchange.route(key, message, |bound: &'a Bound<Target>| {
            match &bound.target {
                Some(target) if target.is_live() => {
                    routed = true;
                    out.push(target.clone());
                }
                Some(_) => {}
                None => {
                    if let Destination::Exchange(next) = &bound.dest {
                        // As in RabbitMQ: a match on a binding to another
                        // exchange counts as routed here, even if that exchange
                        // then reaches nothing (this one's alternate is unused).
                        routed = true;
                        hops.push(next);
                    }
                }
            }
        });
        // One copy per target: needed when this exchange may name one twice,
        // or when earlier exchanges on the path already reached some.
        if repeats || start > 0 {
            dedup_tail(out, start);
        }
        for next in hops {
            if let Some((next, exchange)) = self.exchanges.get_key_value(&**next) {
                self.route_into(next, exchange, key, message, visited, out);
            }
        }
        if let Some(alternate) = exchange
            .options
            .alternate_exchange
            .as_deref()
            .filter(|_| !routed)
            && let Some((alternate, exchange)) = self.exchanges.get_key_value(alternate)
        {
            routed = self.route_into(alternate, exchange, key, message, visited, out);
        }
        routed
    }
}

/// Removes from `out[start..]` every target already present earlier in `out`,
/// keeping the first of each.
fn dedup_tail(out: &mut SmallVec<[Target; 16]>, start: usize) {
    if out.len() - start == 0 {
        return;
    }
    if out.len() <= 32 {
        let mut i = start.max(1);
        while i < out.len() {
            let id = out[i].id();
            if out[..i].iter().any(|t| t.id() == id) {
                out.remove(i);
            } else {
                i += 1;
            }
        }
        return;
    }
    let mut seen: FxHashSet<usize> = out[..start].iter().map(Target::id).collect();
    let mut i = 0;
    out.retain(|t| {
        i += 1;
        i <= start || seen.insert(t.id())
    });
}

#[cfg(test)]
mod tests {
    use postbox::RuntimeHandle;
    use postbox::testkit::local;

    use crate::{Broker, Envelope, ExchangeOptions, QueueOptions};

    use super::*;

    /// A queue declared again under a stopped queue's name (before the
    /// stopped one left the topology) takes over its bindings, as it did when
    /// bindings were resolved by name on each publish.
    #[tokio::test(start_paused = true)]
    async fn a_queue_that_replaces_a_stopped_one_takes_over_its_bindings() {
        local(async {
            let broker = Broker::new(&RuntimeHandle::local());
            broker
                .declare_exchange("x", ExchangeOptions::direct())
                .await
                .unwrap();
            broker
                .declare_queue("q", QueueOptions::default())
                .await
                .unwrap();
            let old = broker.local_queue("q").unwrap();
            broker.bind_queue("q", "x", "k").await.unwrap();
            broker
                .declare_queue("other", QueueOptions::default())
                .await
                .unwrap();
            let other = broker.local_queue("other").unwrap();
            let route = |broker: &Broker| {
                let routed = broker.route_targets("x", "k", &Envelope::new("")).unwrap();
                routed
                    .targets
                    .iter()
                    .map(|t| t.queue().unwrap().addr.id())
                    .collect::<Vec<_>>()
            };
            assert_eq!(route(&broker), [old.addr.id()]);
            // Stand-in for a new incarnation under the same name.
            broker.inner.topology.write().insert_queue(
                ByteString::from("q"),
                QueueEntry {
                    handle: other.clone(),
                    options: Box::default(),
                    store_id: None,
                },
            );
            assert_eq!(route(&broker), [other.addr.id()]);
            // The binding is still listed once, and unbinding removes it.
            assert_eq!(broker.bindings("x").unwrap().len(), 1);
            assert!(broker.unbind_queue("q", "x", "k").await.unwrap());
            assert!(route(&broker).is_empty());
        })
        .await;
    }
}
