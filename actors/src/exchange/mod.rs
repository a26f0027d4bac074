//! Exchanges: where publishers send messages, and bindings decide which queues,
//! streams (or further exchanges) get a copy.
//!
//! Kinds, as in RabbitMQ:
//! - **direct**: the routing key equals the binding key;
//! - **fanout**: every binding, whatever the key;
//! - **topic**: the binding key is a pattern with `*` and `#` ([`topic`]);
//! - **headers**: match on message headers, `x-match` all or any ([`headers`]).
//!
//! The default exchange `""` is a direct exchange to which every queue is bound
//! by its own name (streams have a namespace of their own, and are reached only
//! through explicit bindings). An exchange may name an alternate exchange that receives
//! the messages it cannot route, and exchanges can be bound to exchanges.
//!
//! Exchanges are routing tables, not actors. A publish is routed in the
//! publisher's own task and goes straight into each target queue's mailbox:
//! routing adds no hop, a hot exchange does not funnel every publisher through
//! one thread, and a full queue slows down exactly the publishers that target it.
//! (RabbitMQ routes in the publishing channel for the same reasons.) Queues,
//! consumers and subscriptions are actors.

pub mod headers;
pub mod topic;

use std::collections::{HashMap, HashSet};

use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::envelope::Headers;
use headers::HeadersMatch;
use topic::TopicTrie;

/// The routing algorithm of an exchange.
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
}

impl ExchangeOptions {
    /// Options of the given kind.
    pub fn new(kind: ExchangeKind) -> Self {
        ExchangeOptions {
            kind,
            alternate_exchange: None,
        }
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

    /// Sets the alternate exchange.
    pub fn alternate_exchange(mut self, name: impl Into<String>) -> Self {
        self.alternate_exchange = Some(name.into());
        self
    }
}

/// What a binding delivers to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A queue, by name.
    Queue(ByteString),
    /// Another exchange, by name (exchange-to-exchange binding).
    Exchange(ByteString),
    /// A stream, by name: each message routed to it is appended once.
    Stream(ByteString),
}

/// One binding of an exchange, as listed by the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Where it delivers.
    pub destination: Destination,
    /// The binding key (a pattern for topic exchanges; unused by fanout and headers).
    pub key: ByteString,
    /// The header match, for headers exchanges.
    pub headers: Option<HeadersMatch>,
}

enum Table {
    Direct(HashMap<ByteString, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic(TopicTrie<Destination>),
    Headers(Vec<(HeadersMatch, Destination)>),
}

/// One exchange: its options and its compiled bindings.
pub(crate) struct Exchange {
    pub(crate) options: ExchangeOptions,
    bindings: Vec<Binding>,
    table: Table,
}

impl Exchange {
    pub(crate) fn new(options: ExchangeOptions) -> Self {
        let table = match options.kind {
            ExchangeKind::Direct => Table::Direct(HashMap::new()),
            ExchangeKind::Fanout => Table::Fanout(Vec::new()),
            ExchangeKind::Topic => Table::Topic(TopicTrie::new()),
            ExchangeKind::Headers => Table::Headers(Vec::new()),
        };
        Exchange {
            options,
            bindings: Vec::new(),
            table,
        }
    }

    pub(crate) fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Adds a binding; false if an identical one exists.
    pub(crate) fn bind(&mut self, binding: Binding) -> bool {
        if self.bindings.contains(&binding) {
            return false;
        }
        let dest = binding.destination.clone();
        match &mut self.table {
            Table::Direct(map) => map.entry(binding.key.clone()).or_default().push(dest),
            Table::Fanout(list) => list.push(dest),
            Table::Topic(trie) => {
                trie.insert(&binding.key, dest);
            }
            Table::Headers(list) => {
                // A headers binding without arguments is `x-match: all` of nothing.
                let m = binding
                    .headers
                    .clone()
                    .unwrap_or_else(|| HeadersMatch::all(Vec::<(&str, &str)>::new()));
                list.push((m, dest));
            }
        }
        self.bindings.push(binding);
        true
    }

    /// Removes a binding; false if there was none.
    pub(crate) fn unbind(&mut self, binding: &Binding) -> bool {
        let Some(i) = self.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        self.bindings.remove(i);
        let dest = &binding.destination;
        match &mut self.table {
            Table::Direct(map) => {
                if let Some(list) = map.get_mut(&binding.key) {
                    remove_one(list, |d| d == dest);
                    if list.is_empty() {
                        map.remove(&binding.key);
                    }
                }
            }
            Table::Fanout(list) => remove_one(list, |d| d == dest),
            Table::Topic(trie) => {
                trie.remove(&binding.key, dest);
            }
            Table::Headers(list) => {
                let m = binding
                    .headers
                    .clone()
                    .unwrap_or_else(|| HeadersMatch::all(Vec::<(&str, &str)>::new()));
                remove_one(list, |(hm, d)| d == dest && *hm == m);
            }
        }
        true
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

    /// The destinations this exchange itself routes a message to (not following
    /// exchange-to-exchange bindings), each once.
    pub(crate) fn route<'a>(
        &'a self,
        key: &str,
        headers: &Headers,
        out: &mut Vec<&'a Destination>,
    ) {
        let start = out.len();
        match &self.table {
            Table::Direct(map) => {
                if let Some(list) = map.get(key) {
                    out.extend(list.iter());
                }
            }
            Table::Fanout(list) => out.extend(list.iter()),
            Table::Topic(trie) => out.extend(trie.matches(key)),
            Table::Headers(list) => out.extend(
                list.iter()
                    .filter(|(m, _)| m.matches(headers))
                    .map(|(_, d)| d),
            ),
        }
        // Several bindings to one destination still make one copy.
        if out.len() - start > 1 {
            let mut seen = HashSet::new();
            let mut i = start;
            while i < out.len() {
                if seen.insert(out[i]) {
                    i += 1;
                } else {
                    out.swap_remove(i);
                }
            }
        }
    }
}

fn remove_one<T>(list: &mut Vec<T>, pred: impl Fn(&T) -> bool) {
    if let Some(i) = list.iter().position(pred) {
        list.remove(i);
    }
}
