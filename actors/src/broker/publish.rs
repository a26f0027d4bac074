//! Publishing: to a queue by name, or through an exchange with a routing key,
//! and the fan-out that hands a routed message to each of its targets. The
//! same fan-out serves publishers (who wait for room in full targets) and the
//! queues' dead letters (which never wait: a full target gets its copy from a
//! task), so it is written once.

use serde::Serialize;

use crate::broker::topology::{Routed, Target};
use crate::broker::{Broker, BrokerRef};
use crate::envelope::Envelope;
use crate::error::{BrokerError, PublishError};
use crate::name::{NameKind, validate_key};
use crate::queue::actor::QueueHost;
use crate::queue::handle::LocalQueue;
use crate::stream::{StreamError, TryStreamPublishError};

/// How a message is published through an exchange; see
/// [`Broker::publish_with`].
///
/// ```
/// use postbox_actors::PublishOptions;
/// let options = PublishOptions::default().mandatory();
/// assert!(options.mandatory);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// A message that reaches no queue and no stream comes back as
    /// [`PublishError::Unroutable`] instead of being dropped (AMQP's
    /// `mandatory` flag).
    pub mandatory: bool,
}

impl PublishOptions {
    /// Sets [`mandatory`](Self::mandatory).
    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }
}

impl Broker {
    /// Publishes to a queue (through the default exchange), waiting while it
    /// is saturated.
    #[doc(alias = "basic_publish")]
    pub async fn publish(&self, queue: &str, message: Envelope) -> Result<(), BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            crate::name::validate_name(NameKind::Queue, queue)?;
            let limit = self.inner.config.max_message_bytes;
            return remote.publish_to_queue(queue, message, limit).await;
        }
        self.queue(queue)?.publish(message).await
    }

    /// Publishes a value encoded as JSON to a queue.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        queue: &str,
        value: &T,
    ) -> Result<(), BrokerError> {
        self.publish(queue, Envelope::encode(value)?).await
    }

    /// Publishes through an exchange (`""`: the default exchange) with a routing
    /// key; [`publish_with`](Self::publish_with) with the default options.
    /// Returns how many queues and streams took it; a message that reaches
    /// none is dropped. Waits while a target queue is saturated, or a target
    /// stream with block overflow is full.
    #[doc(alias = "basic_publish")]
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
    ) -> Result<usize, PublishError> {
        self.publish_with(exchange, routing_key, message, PublishOptions::default())
            .await
    }

    /// Publishes through an exchange with options: with
    /// [`mandatory`](PublishOptions::mandatory), a message that reaches no
    /// queue and no stream comes back as [`PublishError::Unroutable`].
    #[doc(alias = "basic_publish")]
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
        options: PublishOptions,
    ) -> Result<usize, PublishError> {
        self.alive()?;
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            validate_key(NameKind::RoutingKey, routing_key).map_err(BrokerError::from)?;
            let limit = self.inner.config.max_message_bytes;
            return remote
                .publish_to_exchange(exchange, routing_key, message, options.mandatory, limit)
                .await;
        }
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
        // The exchange's window admits the id before any target sees it,
        // and forgets it if no target took the message.
        let id = message.id();
        if let Some(dedup) = &routed.dedup {
            dedup.admit(id).map_err(BrokerError::from)?;
        }
        let forget = || {
            if let Some(dedup) = &routed.dedup {
                dedup.forget(id);
            }
        };
        if targets.is_empty() {
            forget();
            tracing::debug!(exchange, routing_key, message_id = %message.id(), "unroutable");
            if options.mandatory {
                return Err(PublishError::Unroutable {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    message: Box::new(message),
                });
            }
            return Ok(0);
        }
        let delivered = deliver_to(&targets, message).await;
        if !matches!(delivered, Ok(n) if n > 0) {
            forget();
        }
        Ok(delivered?)
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
            .route(exchange, routing_key, message, &mut routed)?;
        Ok(routed)
    }

    /// The queues (not the streams) a message published to `exchange` with
    /// `routing_key` reaches: for request-reply, where only queues answer.
    pub(crate) fn route_queues(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Envelope,
    ) -> Result<Vec<LocalQueue>, BrokerError> {
        let routed = self.route_targets(exchange, routing_key, message)?;
        Ok(routed
            .targets
            .iter()
            .filter_map(|t| t.queue().cloned())
            .collect())
    }
}

/// One copy of `message` per target: clones for all but the last, which gets
/// the original.
fn copies<T>(targets: &[T], message: Envelope) -> impl Iterator<Item = (&T, Envelope)> {
    let n = targets.len();
    let mut message = Some(message);
    targets.iter().enumerate().filter_map(move |(i, target)| {
        let copy = if i + 1 == n {
            message.take()
        } else {
            message.clone()
        };
        copy.map(|copy| (target, copy))
    })
}

/// Enqueues `message` on every target queue and appends it to every target
/// stream, or does neither if it is too large for any. Returns how many took
/// it (a target deleted since routing does not, nor one whose duplicate
/// window knew the message), or the refusal of a reject-publish queue that
/// was full (the others have their copy). If every target that is still
/// there refused it as a duplicate, that is the error. Waits for room in full
/// queues and in full block-mode streams.
pub(crate) async fn deliver_to<T: Deliver>(
    targets: &[T],
    message: Envelope,
) -> Result<usize, BrokerError> {
    for target in targets {
        target.check(&message)?;
    }
    let mut taken = 0;
    let mut refused = None;
    let mut duplicate = None;
    // Durable queues confirm once their copy is stored: every copy is handed
    // over first and the confirmations awaited together, so that one
    // publish to N durable queues waits for one group commit, not N.
    let mut confirms = Vec::new();
    for (target, copy) in copies(targets, message) {
        match target.deliver(copy).await {
            Ok(Handed::Taken) => taken += 1,
            Ok(Handed::Confirming(confirm)) => {
                taken += 1;
                confirms.push(confirm);
            }
            Ok(Handed::Gone) => {}
            Ok(Handed::Duplicate(dup)) => {
                duplicate.get_or_insert(dup);
            }
            Err(err) => refused = Some(err),
        }
    }
    for confirm in confirms {
        if let Err(err) = LocalQueue::confirmed(Some(confirm)).await {
            refused = Some(err);
        }
    }
    if let Some(err) = refused {
        return Err(err);
    }
    match duplicate {
        Some(dup) if taken == 0 => Err(BrokerError::Duplicate(dup)),
        _ => Ok(taken),
    }
}

/// [`deliver_to`] without waiting and without the size checks: a full target
/// gets its copy from a task of its own. For the queues' dead letters (they
/// were checked when first published, and a queue never waits on another).
/// Returns how many targets there were.
fn deliver_now(targets: &[Target], message: Envelope) -> usize {
    for (target, copy) in copies(targets, message) {
        if let Some(copy) = target.try_deliver(copy)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let target = target.clone();
            runtime.spawn(async move {
                let _ = target.deliver(copy).await;
            });
        }
    }
    targets.len()
}

/// What a target did with the copy [`Deliver::deliver`] handed it.
pub(crate) enum Handed {
    /// Taken.
    Taken,
    /// Taken, and to be confirmed once stored (a durable queue).
    Confirming(crate::store::Confirm),
    /// Gone since routing: not taken.
    Gone,
    /// Refused by the target's duplicate window.
    Duplicate(Box<crate::dedup::Duplicate>),
}

/// Something [`deliver_to`] hands a routed message to: a queue or a stream.
pub(crate) trait Deliver {
    /// Refuses a message this target would refuse for its size.
    fn check(&self, message: &Envelope) -> Result<(), BrokerError>;
    /// Hands one copy over, waiting for room (not for a durable queue's
    /// confirmation: that is handed back). An error is a refusal to report
    /// after every other target has had its copy.
    async fn deliver(&self, message: Envelope) -> Result<Handed, BrokerError>;
}

impl Deliver for LocalQueue {
    fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        LocalQueue::check(self, message)
    }

    async fn deliver(&self, message: Envelope) -> Result<Handed, BrokerError> {
        let Some(dedup) = &self.dedup else {
            return self.hand_over(message).await;
        };
        let id = message.id();
        let logged = match self.admit(dedup, &message) {
            Ok(logged) => logged,
            Err(dup) => return Ok(Handed::Duplicate(dup)),
        };
        let mut handed = self.hand_over(message).await;
        if matches!(handed, Ok(Handed::Taken | Handed::Confirming(_)))
            && let Err(err) = LocalQueue::confirmed(logged).await
        {
            handed = Err(err);
        }
        if !matches!(handed, Ok(Handed::Taken | Handed::Confirming(_))) {
            dedup.forget(id);
        }
        handed
    }
}

impl LocalQueue {
    /// Hands a routed copy over, past the duplicate window.
    async fn hand_over(&self, message: Envelope) -> Result<Handed, BrokerError> {
        let handed = if self.durable && message.persistent() {
            self.enqueue_durable(vec![message])
                .await
                .map(|confirm| confirm.map_or(Handed::Taken, Handed::Confirming))
        } else {
            self.publish_now(message).await.map(|()| Handed::Taken)
        };
        match handed {
            // A queue that refuses (reject-publish) is reported, and so are
            // a storage failure and a stopped runtime.
            Err(
                err @ (BrokerError::QueueFull(_) | BrokerError::Storage(_) | BrokerError::Stopped),
            ) => Err(err),
            Err(_) => Ok(Handed::Gone),
            Ok(handed) => Ok(handed),
        }
    }
}

/// A target whose duplicate window has admitted the message already (a
/// transaction's publishes, admitted when it commits).
pub(crate) struct Admitted(pub(crate) Target);

impl Deliver for Admitted {
    fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        self.0.check(message)
    }

    async fn deliver(&self, message: Envelope) -> Result<Handed, BrokerError> {
        match &self.0 {
            Target::Queue(queue) => queue.hand_over(message).await,
            stream => stream.deliver(message).await,
        }
    }
}

impl Deliver for Target {
    fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        Target::check(self, message)
    }

    async fn deliver(&self, message: Envelope) -> Result<Handed, BrokerError> {
        match self {
            Target::Queue(queue) => queue.deliver(message).await,
            // A durable stream's confirmation is awaited with the others.
            Target::Stream(stream) => match stream.append(message).await {
                Ok((_, Some(confirm))) => Ok(Handed::Confirming(confirm)),
                Ok((_, None)) => Ok(Handed::Taken),
                Err(StreamError::Stopped) => Err(BrokerError::Stopped),
                Err(StreamError::Storage(err)) => Err(BrokerError::Storage(err)),
                Err(StreamError::Duplicate(dup)) => Ok(Handed::Duplicate(dup)),
                // Deleted since routing (the size was checked).
                Err(_) => Ok(Handed::Gone),
            },
        }
    }
}

impl Target {
    /// Hands a copy over if that needs no waiting; gives it back if the
    /// target is full. A target gone since routing does not get it.
    fn try_deliver(&self, message: Envelope) -> Option<Envelope> {
        match self {
            Target::Queue(queue) => match queue.try_enqueue(message) {
                Err(postbox::TrySendError::Full(message)) => Some(message),
                _ => None,
            },
            Target::Stream(stream) => match stream.try_publish(message) {
                Err(TryStreamPublishError::Full { message, .. }) => Some(*message),
                Err(TryStreamPublishError::Refused(err)) => {
                    tracing::debug!(stream = %stream.name(), %err, "dead letter not appended");
                    None
                }
                Ok(_) => None,
            },
        }
    }
}

impl QueueHost for BrokerRef {
    fn dead_letter(&self, exchange: &str, message: Envelope, skip: &dyn Fn(&str) -> bool) -> bool {
        let Some(inner) = self.0.upgrade() else {
            return false;
        };
        let mut routed = Routed::default();
        // An exchange that does not exist (any more) routes nowhere.
        let _ = inner
            .topology
            .read()
            .route(exchange, message.routing_key(), &message, &mut routed);
        let mut targets = routed.targets;
        targets.retain(|t| t.queue().is_none_or(|q| !skip(q.name())));
        deliver_now(&targets, message) > 0
    }

    fn memory_budget(&self) -> Option<std::sync::Arc<crate::queue::budget::MemoryBudget>> {
        self.0.upgrade().and_then(|inner| inner.budget.clone())
    }

    fn queue_stopped(&self, name: &str, id: postbox::ActorId, deleted: bool) {
        if let Some(inner) = self.0.upgrade() {
            let entry = inner.topology.write().remove_queue(name, id);
            // A durable queue that failed (rather than was deleted) is still
            // declared: it comes back when the broker reopens.
            if deleted
                && let (Some(storage), Some(store_id)) =
                    (&inner.storage, entry.as_ref().and_then(|e| e.store_id))
            {
                storage.delete_queue(store_id);
            }
        }
    }
}
