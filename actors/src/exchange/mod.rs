//! Exchanges: where publishers send messages, and bindings decide which queues,
//! streams (or further exchanges) get a copy.

mod consistent_hash;
mod headers;
mod topic;

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytestring::ByteString;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, HeaderValue, Headers};
use consistent_hash::Ring;
pub use consistent_hash::{HashOn, HashProperty};
pub use headers::{BindingError, HeadersMatch, XMatch};
use topic::TopicTrie;

/// The routing algorithm of an exchange.
///
/// Kinds, as in RabbitMQ:
/// - **direct**: the routing key equals the binding key;
/// - **fanout**: every binding, whatever the key;
/// - **topic**: the binding key is a pattern with `*` and `#`, matched as
///   RabbitMQ matches it (through a trie: the cost does not grow with the
///   number of bindings);
/// - **headers**: match on message headers, `x-match` all or any
///   ([`HeadersMatch`]);
/// - **consistent hash** (`x-consistent-hash`, RabbitMQ's plugin): each
///   binding key is a weight, and each message goes to one destination,
///   chosen by a hash of its routing key, a header or a property
///   ([`HashOn`]) exactly as RabbitMQ chooses it for the same bindings.
///
/// The default exchange `""` is a direct exchange to which every queue is bound
/// by its own name (streams have a namespace of their own, and are reached only
/// through explicit bindings). An exchange may name an alternate exchange that receives
/// the messages it cannot route, and exchanges can be bound to exchanges.
///
/// Exchanges are routing tables, not actors. A publish is routed in the
/// publisher's own task and goes straight into each target queue's mailbox:
/// routing adds no hop, a hot exchange does not funnel every publisher through
/// one thread, and a full queue slows down exactly the publishers that target it.
/// (RabbitMQ routes in the publishing channel for the same reasons.) Queues,
/// consumers and subscriptions are actors.
///
/// Each binding is resolved when it is made: the table holds the target queue's
/// or stream's handle next to its name (`Bound`), so routing a message hashes
/// and compares no destination names and copies no handles beyond one refcount
/// per target. The topology keeps the resolved handles current (see
/// `topology`). Fanout and direct tables hold each destination once, so their
/// routes need no deduplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every binding.
    Fanout,
    /// Routing-key patterns with `*` and `#`.
    Topic,
    /// Header values, `x-match` all or any.
    Headers,
    /// RabbitMQ's consistent-hash exchange: one destination per message, by
    /// a hash of its key ([`HashOn`]), binding keys being weights.
    #[serde(rename = "x-consistent-hash")]
    ConsistentHash,
}

/// How an exchange is declared.
///
/// ```
/// use postbox_actors::ExchangeOptions;
/// let events = ExchangeOptions::topic().alternate_exchange("unrouted");
/// # let _ = events;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExchangeOptions {
    /// The routing algorithm.
    pub kind: ExchangeKind,
    /// Where messages this exchange cannot route go instead.
    pub alternate_exchange: Option<String>,
    /// Kept across restarts of a broker opened on a data directory
    /// ([`Broker::open`](crate::Broker::open)), with its bindings to durable
    /// queues and exchanges. Ignored by an in-memory broker.
    #[serde(default)]
    pub durable: bool,
    /// A publisher duplicate window: a message whose id was published to
    /// this exchange within the window is not routed, and the publish fails
    /// with [`BrokerError::Duplicate`](crate::BrokerError::Duplicate) (see
    /// [`DedupWindow`](crate::DedupWindow)). The window is in memory: it
    /// starts empty when the broker reopens (give the queues behind it
    /// windows of their own to keep ids across restarts).
    #[serde(default)]
    pub dedup: Option<crate::dedup::DedupWindow>,
    /// What a consistent-hash exchange hashes (its `hash-header` or
    /// `hash-property` argument); the routing key by default. Other kinds
    /// refuse anything but the default.
    #[serde(default)]
    pub hash_on: HashOn,
}

impl ExchangeOptions {
    /// Options of the given kind.
    pub fn new(kind: ExchangeKind) -> Self {
        ExchangeOptions {
            kind,
            alternate_exchange: None,
            durable: false,
            dedup: None,
            hash_on: HashOn::RoutingKey,
        }
    }

    /// Sets [`dedup`](Self::dedup).
    pub fn dedup(mut self, window: crate::dedup::DedupWindow) -> Self {
        self.dedup = Some(window);
        self
    }

    /// A direct exchange.
    pub fn direct() -> Self {
        Self::new(ExchangeKind::Direct)
    }

    /// A fanout exchange.
    pub fn fanout() -> Self {
        Self::new(ExchangeKind::Fanout)
    }

    /// A topic exchange.
    pub fn topic() -> Self {
        Self::new(ExchangeKind::Topic)
    }

    /// A headers exchange.
    pub fn headers() -> Self {
        Self::new(ExchangeKind::Headers)
    }

    /// A consistent-hash exchange (`x-consistent-hash`), hashing the
    /// routing key unless told otherwise ([`hash_on`](Self::hash_on)).
    ///
    /// ```
    /// use postbox_actors::{Broker, Envelope, ExchangeOptions, HashOn, QueueOptions};
    /// # postbox::testkit::run(async {
    /// # let broker = Broker::new(&postbox::RuntimeHandle::local());
    /// let by_user = ExchangeOptions::consistent_hash().hash_on(HashOn::header("user"));
    /// broker.declare_exchange("orders", by_user).await?;
    /// for (queue, weight) in [("orders.a", "1"), ("orders.b", "2")] {
    ///     broker.declare_queue(queue, QueueOptions::default()).await?;
    ///     broker.bind_queue(queue, "orders", weight).await?;
    /// }
    /// // One user's messages all reach the same queue.
    /// for n in 0..3 {
    ///     let order = Envelope::new(format!("order {n}")).with_header("user", "ada");
    ///     assert_eq!(broker.publish_to("orders", "", order).await?, 1);
    /// }
    /// let a = broker.queue_stats("orders.a").await?.stats.ready;
    /// let b = broker.queue_stats("orders.b").await?.stats.ready;
    /// assert!((a, b) == (3, 0) || (a, b) == (0, 3));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn consistent_hash() -> Self {
        Self::new(ExchangeKind::ConsistentHash)
    }

    /// Sets [`hash_on`](Self::hash_on).
    pub fn hash_on(mut self, hash_on: HashOn) -> Self {
        self.hash_on = hash_on;
        self
    }

    /// Sets the alternate exchange.
    pub fn alternate_exchange(mut self, name: impl Into<String>) -> Self {
        self.alternate_exchange = Some(name.into());
        self
    }

    /// Makes the exchange [`durable`](Self::durable).
    ///
    /// ```
    /// use postbox_actors::ExchangeOptions;
    /// assert!(ExchangeOptions::topic().durable().durable);
    /// ```
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }
}

/// What a binding delivers to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// A queue, by name.
    Queue(ByteString),
    /// Another exchange, by name (exchange-to-exchange binding).
    Exchange(ByteString),
    /// A stream, by name: each message routed to it is appended once.
    Stream(ByteString),
}

/// What a binding says besides its source and destination, as AMQP's
/// `queue.bind`: a routing key (a pattern, for topic exchanges; ignored by
/// fanout and headers exchanges) and arguments (for headers exchanges, the
/// headers to match and `x-match`). The one binding argument of
/// [`Broker::bind_queue`](crate::Broker::bind_queue) and its siblings: a `&str`
/// or a [`HeadersMatch`] converts into it.
///
/// Arguments are part of a binding's identity on every kind of exchange, as in
/// RabbitMQ: the same key and destination with other arguments is another
/// binding, unbound on its own (a message still reaches a queue once).
///
/// ```
/// use postbox_actors::{BindingKey, HeadersMatch, HeaderValue};
/// let by_key: BindingKey = "orders.*".into();
/// let by_headers: BindingKey = HeadersMatch::all([("format", "pdf")]).into();
/// let tagged = BindingKey::routing_key("k").argument("purpose", "audit");
/// assert_eq!(by_key.key(), "orders.*");
/// assert_eq!(by_headers.arguments().get("x-match"), Some(&HeaderValue::from("all")));
/// assert_eq!(tagged.arguments().len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BindingKey {
    key: ByteString,
    arguments: Headers,
}

impl BindingKey {
    /// A routing key, or a topic pattern.
    pub fn routing_key(key: impl Into<ByteString>) -> Self {
        BindingKey {
            key: key.into(),
            arguments: Headers::new(),
        }
    }

    /// A headers match (its arguments: `x-match` and the headers).
    pub fn headers_match(headers: HeadersMatch) -> Self {
        BindingKey {
            key: ByteString::new(),
            arguments: headers.to_arguments(),
        }
    }

    /// Adds an argument.
    pub fn argument(mut self, name: impl Into<ByteString>, value: impl Into<HeaderValue>) -> Self {
        self.arguments.insert(name.into(), value.into());
        self
    }

    /// The routing key or pattern.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The arguments.
    pub fn arguments(&self) -> &Headers {
        &self.arguments
    }

    pub(crate) fn into_parts(self) -> (ByteString, Headers) {
        (self.key, self.arguments)
    }
}

impl From<&str> for BindingKey {
    fn from(key: &str) -> Self {
        BindingKey::routing_key(key)
    }
}

impl From<String> for BindingKey {
    fn from(key: String) -> Self {
        BindingKey::routing_key(key)
    }
}

impl From<&String> for BindingKey {
    fn from(key: &String) -> Self {
        BindingKey::routing_key(key.as_str())
    }
}

impl From<HeadersMatch> for BindingKey {
    fn from(headers: HeadersMatch) -> Self {
        BindingKey::headers_match(headers)
    }
}

/// One binding of an exchange, as listed by the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Where it delivers.
    pub destination: Destination,
    /// The binding key (a pattern for topic exchanges; unused by fanout and headers).
    pub key: ByteString,
    /// Its arguments (for headers exchanges, `x-match` and the headers to
    /// match); part of its identity.
    pub arguments: Headers,
}

/// A binding's destination as the routing table holds it: the name, and the
/// target (`T`: a queue's or stream's handle, chosen by whoever owns the
/// exchange) it named when it was bound (`None` for an exchange, which routing
/// looks up by name). Equal, and hashed, by destination only.
#[derive(Clone)]
pub(crate) struct Bound<T> {
    pub(crate) dest: Destination,
    pub(crate) target: Option<T>,
}

impl<T> PartialEq for Bound<T> {
    fn eq(&self, other: &Self) -> bool {
        self.dest == other.dest
    }
}

impl<T> Eq for Bound<T> {}

impl<T> Hash for Bound<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.dest.hash(state);
    }
}

enum Table<T> {
    /// Each key's destinations, each once (equal bindings are refused).
    Direct(FxHashMap<ByteString, Vec<Bound<T>>>),
    /// Each destination once, however many bindings lead to it.
    Fanout(Vec<Bound<T>>),
    Topic(TopicTrie<Bound<T>>),
    Headers(Vec<(HeadersMatch, Bound<T>)>),
    /// Each binding's weight range, in binding order.
    ConsistentHash(Ring<T>),
}

/// One exchange: its options and its compiled bindings, whose resolved
/// targets are `T`s.
pub(crate) struct Exchange<T> {
    /// Its name, shared with the envelopes published through it.
    pub(crate) name: Arc<str>,
    pub(crate) options: ExchangeOptions,
    bindings: Vec<Binding>,
    table: Table<T>,
    /// The publishers' duplicate window, if it has one.
    pub(crate) dedup: Option<Arc<crate::dedup::SharedWindow>>,
}

impl<T: Clone> Exchange<T> {
    pub(crate) fn new(name: &str, options: ExchangeOptions) -> Self {
        let table = match options.kind {
            ExchangeKind::Direct => Table::Direct(FxHashMap::default()),
            ExchangeKind::Fanout => Table::Fanout(Vec::new()),
            ExchangeKind::Topic => Table::Topic(TopicTrie::new()),
            ExchangeKind::Headers => Table::Headers(Vec::new()),
            ExchangeKind::ConsistentHash => Table::ConsistentHash(Ring::new()),
        };
        let dedup = options.dedup.map(|window| {
            Arc::new(crate::dedup::SharedWindow::new(
                window,
                crate::dedup::DedupTarget::Exchange(name.to_string()),
            ))
        });
        Exchange {
            name: Arc::from(name),
            options,
            bindings: Vec::new(),
            table,
            dedup,
        }
    }

    pub(crate) fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds a binding whose destination resolved to `target`; false if an
    /// identical one exists. For a headers exchange, its arguments must parse
    /// as a [`HeadersMatch`]; for a consistent-hash exchange, its key as a
    /// weight.
    pub(crate) fn bind(
        &mut self,
        binding: Binding,
        target: Option<T>,
    ) -> Result<bool, BindingError> {
        // An invalid binding is never among them: the arms below refuse it
        // before anything changes.
        if self.bindings.contains(&binding) {
            return Ok(false);
        }
        let dest = Bound {
            dest: binding.destination.clone(),
            target,
        };
        let shared = self.shares_entry(&binding);
        match &mut self.table {
            Table::Headers(list) => {
                list.push((HeadersMatch::from_arguments(&binding.arguments)?, dest));
            }
            Table::ConsistentHash(ring) => {
                ring.push(weight(&binding.key)?, dest);
            }
            // Bindings that differ only in their arguments share a table
            // entry: a message reaches the destination once.
            _ if shared => {}
            Table::Direct(map) => map.entry(binding.key.clone()).or_default().push(dest),
            Table::Fanout(list) => list.push(dest),
            Table::Topic(trie) => {
                trie.insert(&binding.key, dest);
            }
        }
        self.bindings.push(binding);
        Ok(true)
    }

    /// Whether another binding has the same table entry as `binding` (the
    /// same destination, and key where the kind routes by key). Headers and
    /// consistent-hash bindings each have an entry of their own whatever this
    /// says: their arms come first.
    fn shares_entry(&self, binding: &Binding) -> bool {
        let fanout = matches!(self.table, Table::Fanout(_));
        self.bindings.iter().any(|b| {
            b != binding && b.destination == binding.destination && (fanout || b.key == binding.key)
        })
    }

    /// Removes a binding; false if there was none.
    pub(crate) fn unbind(&mut self, binding: &Binding) -> bool {
        let Some(i) = self.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        self.bindings.remove(i);
        let dest = &binding.destination;
        let shared = self.shares_entry(binding);
        match &mut self.table {
            Table::Headers(list) => {
                if let Ok(m) = HeadersMatch::from_arguments(&binding.arguments) {
                    remove_one(list, |(hm, d)| d.dest == *dest && *hm == m);
                }
            }
            Table::ConsistentHash(ring) => {
                if let Ok(w) = weight(&binding.key) {
                    ring.remove(w, dest);
                }
            }
            _ if shared => {}
            Table::Direct(map) => {
                if let Some(list) = map.get_mut(&binding.key) {
                    remove_one(list, |d| d.dest == *dest);
                    if list.is_empty() {
                        map.remove(&binding.key);
                    }
                }
            }
            Table::Fanout(list) => remove_one(list, |b| b.dest == *dest),
            Table::Topic(trie) => {
                // Equality is by destination: the target does not matter here.
                let probe = Bound {
                    dest: dest.clone(),
                    target: None,
                };
                trie.remove(&binding.key, &probe);
            }
        }
        true
    }

    /// Points every binding to `destination` at `target` (a queue declared
    /// again under the same name after its actor stopped).
    pub(crate) fn retarget(&mut self, destination: &Destination, target: &T) {
        let update = |b: &mut Bound<T>| {
            if b.dest == *destination {
                b.target = Some(target.clone());
            }
        };
        match &mut self.table {
            Table::Direct(map) => map.values_mut().flatten().for_each(update),
            Table::Fanout(list) => list.iter_mut().for_each(update),
            Table::Topic(trie) => trie.for_each_value_mut(update),
            Table::Headers(list) => list.iter_mut().for_each(|(_, b)| update(b)),
            Table::ConsistentHash(ring) => ring.for_each_mut(update),
        }
    }

    /// Removes every binding to `destination`; returns how many.
    pub(crate) fn unbind_destination(&mut self, destination: &Destination) -> usize {
        let doomed: Vec<Binding> = self
            .bindings
            .iter()
            .filter(|b| &b.destination == destination)
            .cloned()
            .collect();
        for b in &doomed {
            self.unbind(b);
        }
        doomed.len()
    }

    /// Calls `each` with the destinations this exchange itself routes a message
    /// to (not following exchange-to-exchange bindings). Returns true if one
    /// destination may have come more than once (several topic patterns or
    /// header matches leading to it): the caller then removes repeats.
    pub(crate) fn route<'a>(
        &'a self,
        key: &str,
        message: &Envelope,
        mut each: impl FnMut(&'a Bound<T>),
    ) -> bool {
        match &self.table {
            Table::Direct(map) => {
                map.get(key).into_iter().flatten().for_each(each);
                false
            }
            Table::Fanout(list) => {
                list.iter().for_each(each);
                false
            }
            Table::Topic(trie) => {
                let mut n = 0;
                trie.for_each_match(key, |b| {
                    n += 1;
                    each(b)
                });
                n > 1
            }
            Table::Headers(list) => {
                let mut n = 0;
                let headers = message.headers();
                for (_, b) in list.iter().filter(|(m, _)| m.matches(headers)) {
                    n += 1;
                    each(b);
                }
                n > 1
            }
            Table::ConsistentHash(ring) => {
                if let Some(b) = ring.route(&self.options.hash_on, key, message) {
                    each(b);
                }
                false
            }
        }
    }
}

/// A consistent-hash binding key's weight.
fn weight(key: &str) -> Result<u64, BindingError> {
    consistent_hash::parse_weight(key).ok_or_else(|| BindingError::BadWeight(key.to_string()))
}

fn remove_one<T>(list: &mut Vec<T>, pred: impl Fn(&T) -> bool) {
    if let Some(i) = list.iter().position(pred) {
        list.remove(i);
    }
}
