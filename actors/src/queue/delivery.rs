//! [`Delivery`]: a message handed to one consumer, and how that consumer settles
//! it (ack, nack with or without requeue, reject; singly or `multiple`).
//!
//! Each consumer registration has a link to its queue. The link knows which
//! deliveries this consumer still holds, so settling something unknown, settling
//! twice, or settling after the consumer's registration ended (it stopped or
//! crashed, and its deliveries were requeued) is a typed [`AckError`] returned at
//! once, and the queue never sees the bad request.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytestring::ByteString;
use parking_lot::Mutex;
use postbox::{Addr, Message};

use crate::envelope::Envelope;
#[cfg(feature = "amqp")]
use crate::error::BrokerError;
use crate::queue::ack::{AckMode, ConsumerId, DeliveryTag};
use crate::queue::actor::{QueueActor, QueueSnapshot, Settle, Snapshot};

/// How a delivery is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: remove it from the queue.
    Ack,
    /// Not processed: put it back at its original position, flagged redelivered.
    Requeue,
    /// Not processed and not to be retried: discard it (counted as rejected, and
    /// dead-lettered if the queue has a dead-letter exchange).
    Discard,
    /// Not processed yet: put it back at its original position once the delay
    /// has passed (meanwhile it is neither ready nor unacknowledged, but delayed).
    RequeueAfter(std::time::Duration),
}

/// The longest delay [`Delivery::nack_after`] accepts: 2^32 - 1 milliseconds,
/// about 49.7 days (the limit of RabbitMQ's delayed-message exchange). A
/// longer one is refused with [`AckError::DelayTooLong`] rather than parking
/// the message for good.
pub const MAX_REQUEUE_DELAY: std::time::Duration =
    std::time::Duration::from_millis(u32::MAX as u64);

/// Why a settlement was refused. The queue is unaffected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The delivery was made in auto-ack mode: it was settled when delivered.
    #[error("delivery {tag} of queue {queue:?} was auto-acknowledged; there is nothing to settle")]
    AutoAck {
        /// The delivery tag.
        tag: DeliveryTag,
        /// The queue.
        queue: ByteString,
    },
    /// This consumer does not hold that delivery any more (it was settled before).
    #[error("delivery {tag} of queue {queue:?} was already settled")]
    AlreadySettled {
        /// The delivery tag.
        tag: DeliveryTag,
        /// The queue.
        queue: ByteString,
    },
    /// A delayed requeue longer than [`MAX_REQUEUE_DELAY`]; the delivery is
    /// still held, unsettled.
    #[error(
        "a requeue delay of {delay:?} on queue {queue:?} exceeds the limit of {MAX_REQUEUE_DELAY:?}"
    )]
    DelayTooLong {
        /// The delay asked for.
        delay: std::time::Duration,
        /// The queue.
        queue: ByteString,
    },
    /// The consumer's registration ended (stopped, crashed, cancelled, or the
    /// queue was deleted); its unsettled deliveries were requeued.
    #[error("the consumer of delivery {tag} on queue {queue:?} is gone; the delivery was requeued")]
    ConsumerGone {
        /// The delivery tag.
        tag: DeliveryTag,
        /// The queue.
        queue: ByteString,
    },
}

/// One consumer's registration with one queue.
///
/// Settlements are recorded here, under the same lock that the queue takes to
/// end the registration, and the queue drains them in batches. So a settlement
/// is either applied by the queue or refused with `ConsumerGone`, never both
/// acknowledged and requeued.
pub(crate) struct Link {
    pub(crate) consumer: ConsumerId,
    pub(crate) queue_name: ByteString,
    /// Who applies the recorded settlements.
    pub(crate) queue: LinkTarget,
    pub(crate) mode: AckMode,
    state: Mutex<LinkState>,
    /// Mirrors `LinkState::closed` for readers that must not take the lock
    /// (a consumer checks it per delivery).
    closed: AtomicBool,
    /// The queue's count of lost auto-ack deliveries.
    lost: Arc<AtomicU64>,
    /// For a link to RabbitMQ: the connection its current deliveries came
    /// on (their tags carry it in their top 16 bits); 0 for an embedded
    /// queue, whose tags never go stale this way.
    generation: AtomicU64,
}

/// Where a queue leaves the link of a registration made on a consumer's
/// behalf (by whoever starts the consumer), before it delivers anything to
/// it: the consumer takes it from there.
pub(crate) type LinkSlot = Arc<std::sync::OnceLock<Arc<Link>>>;

/// Bits of a RabbitMQ delivery tag below the channel's generation.
pub(crate) const GENERATION_SHIFT: u32 = 48;
/// A generation is kept to the 16 bits above a tag (it wraps).
pub(crate) const GENERATION_MASK: u64 = (1 << (64 - GENERATION_SHIFT)) - 1;

/// Who applies a link's settlements: the embedded queue's actor, or (feature
/// `amqp`) the RabbitMQ channel the deliveries came on.
#[derive(Clone)]
pub(crate) enum LinkTarget {
    Local(Addr<QueueActor>),
    #[cfg(feature = "amqp")]
    Remote(Arc<dyn ApplySettlements>),
}

/// Applies a link's recorded settlements somewhere other than an embedded
/// queue (a RabbitMQ channel, for the `amqp` backend).
#[cfg(feature = "amqp")]
pub(crate) trait ApplySettlements: Send + Sync {
    /// Takes the link's pending settlements and applies them, in order.
    fn apply<'a>(&'a self, link: &'a Link) -> futures::future::BoxFuture<'a, ()>;

    /// What the server says of `queue` (a passive declare: its ready
    /// messages and consumers).
    fn snapshot<'a>(
        &'a self,
        queue: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<QueueSnapshot, BrokerError>>;
}

/// Why a link's queue could not be looked at.
#[derive(Debug)]
pub(crate) enum Unseen {
    /// The queue is gone (deleted, or its broker stopped).
    Gone,
    /// Not this time (busy, slow, reconnecting): try again later.
    NotNow(String),
}

impl LinkTarget {
    /// A snapshot of the link's queue, named `queue`, within `patience`:
    /// asked of the embedded queue's actor, or of RabbitMQ.
    pub(crate) async fn snapshot(
        &self,
        queue: &str,
        patience: Duration,
    ) -> Result<QueueSnapshot, Unseen> {
        match self {
            LinkTarget::Local(addr) => {
                let _ = queue;
                match addr.ask(Snapshot).timeout(patience).await {
                    Ok(snapshot) => Ok(snapshot),
                    Err(postbox::AskError::Closed) => Err(Unseen::Gone),
                    Err(err) => Err(Unseen::NotNow(err.to_string())),
                }
            }
            #[cfg(feature = "amqp")]
            LinkTarget::Remote(remote) => {
                match tokio::time::timeout(patience, remote.snapshot(queue)).await {
                    Ok(Ok(snapshot)) => Ok(snapshot),
                    Ok(Err(BrokerError::QueueNotFound(_) | BrokerError::Stopped)) => {
                        Err(Unseen::Gone)
                    }
                    Ok(Err(err)) => Err(Unseen::NotNow(err.to_string())),
                    Err(_) => Err(Unseen::NotNow(format!("no answer within {patience:?}"))),
                }
            }
        }
    }
}

#[derive(Clone, Default)]
pub(crate) struct LinkState {
    closed: bool,
    /// Tags delivered to this consumer and not yet settled (manual mode only).
    outstanding: Tags,
    /// Settlements the queue has not applied yet, in order.
    pending: Vec<PendingSettle>,
    /// What was still held when the registration ended (requeued then):
    /// settling one of those is `ConsumerGone`, any other `AlreadySettled`.
    gone: Tags,
}

/// A consumer's unsettled delivery tags, in order. The queue issues tags in
/// increasing order, so inserting is a push at the back and settling in order
/// (the common case) a pop at the front.
#[derive(Clone, Default, Debug)]
pub(crate) struct Tags(VecDeque<u64>);

impl Tags {
    fn insert(&mut self, tag: u64) {
        match self.0.back() {
            Some(&last) if last >= tag => {
                // Out of order (not issued by a queue today): keep it sorted.
                if let Err(i) = self.0.binary_search(&tag) {
                    self.0.insert(i, tag);
                }
            }
            _ => self.0.push_back(tag),
        }
    }

    fn contains(&self, tag: u64) -> bool {
        // Settling in delivery order is the common case: the oldest tag.
        self.0.front() == Some(&tag) || self.0.binary_search(&tag).is_ok()
    }

    fn remove(&mut self, tag: u64) {
        if self.0.front() == Some(&tag) {
            self.0.pop_front();
        } else if let Ok(i) = self.0.binary_search(&tag) {
            self.0.remove(i);
        }
    }

    /// Removes every tag up to and including `tag`; returns how many.
    fn remove_through(&mut self, tag: u64) -> usize {
        let n = self.0.partition_point(|&t| t <= tag);
        self.0.drain(..n);
        n
    }

    #[cfg(feature = "amqp")]
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A settlement waiting for the queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingSettle {
    pub(crate) tag: DeliveryTag,
    pub(crate) multiple: bool,
    pub(crate) outcome: Outcome,
}

impl Link {
    pub(crate) fn new(
        consumer: ConsumerId,
        queue_name: ByteString,
        queue: LinkTarget,
        mode: AckMode,
        lost: Arc<AtomicU64>,
    ) -> Self {
        Link {
            consumer,
            queue_name,
            queue,
            mode,
            state: Mutex::new(LinkState::default()),
            closed: AtomicBool::new(false),
            lost,
            generation: AtomicU64::new(0),
        }
    }

    /// Whether settlements go to RabbitMQ (whose `multiple` covers more
    /// than this side's).
    #[inline]
    fn is_remote(&self) -> bool {
        match self.queue {
            LinkTarget::Local(_) => false,
            #[cfg(feature = "amqp")]
            LinkTarget::Remote(_) => true,
        }
    }

    /// Whether a delivery of this registration is still held on a live
    /// channel: false for one made on a RabbitMQ connection since lost
    /// (RabbitMQ requeued it, and delivers it again).
    #[inline]
    pub(crate) fn is_current(&self, tag: DeliveryTag) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        generation == 0 || tag.0 >> GENERATION_SHIFT == generation & GENERATION_MASK
    }

    pub(crate) fn is_active(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Counts one auto-ack delivery of this registration as lost.
    pub(crate) fn lose_one(&self) {
        if self.mode == AckMode::Auto {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records deliveries as held by this consumer.
    pub(crate) fn track(&self, tags: impl IntoIterator<Item = DeliveryTag>) {
        let mut state = self.state.lock();
        for tag in tags {
            state.outstanding.insert(tag.0);
        }
    }

    /// Takes the settlements recorded so far, for the queue to apply.
    pub(crate) fn drain(&self) -> Vec<PendingSettle> {
        std::mem::take(&mut self.state.lock().pending)
    }

    /// Ends the registration and returns the settlements still to apply; later
    /// settlements fail with `ConsumerGone`.
    pub(crate) fn close(&self) -> Vec<PendingSettle> {
        let mut state = self.state.lock();
        state.closed = true;
        self.closed.store(true, Ordering::Release);
        let held = std::mem::take(&mut state.outstanding);
        state.gone.0.extend(held.0);
        std::mem::take(&mut state.pending)
    }

    /// Tells the queue that settlements are waiting. If the queue is gone it cannot
    /// redeliver either: there is nothing to undo.
    pub(crate) async fn notify(&self) {
        match &self.queue {
            LinkTarget::Local(queue) => {
                let _ = queue.send(Settle(self.consumer)).await;
            }
            #[cfg(feature = "amqp")]
            LinkTarget::Remote(settle) => settle.apply(self).await,
        }
    }

    /// How many deliveries this consumer holds unsettled.
    #[cfg(feature = "amqp")]
    pub(crate) fn outstanding(&self) -> usize {
        self.state.lock().outstanding.0.len()
    }

    /// Takes the settlements recorded so far, with (read at the same
    /// moment) the oldest delivery still held and whether the registration
    /// is still on.
    #[cfg(feature = "amqp")]
    pub(crate) fn drain_with_oldest(&self) -> (Vec<PendingSettle>, Option<DeliveryTag>, bool) {
        let mut state = self.state.lock();
        let oldest = state.outstanding.0.front().copied().map(DeliveryTag);
        (std::mem::take(&mut state.pending), oldest, !state.closed)
    }

    /// Forgets every delivery held (their channel closed: RabbitMQ requeues
    /// them); the registration goes on, on a new channel, whose deliveries
    /// carry `generation`. Pending settlements are dropped with them, and
    /// settling an older delivery fails with `ConsumerGone`.
    #[cfg(feature = "amqp")]
    pub(crate) fn reset(&self, generation: u64) {
        let mut state = self.state.lock();
        state.outstanding.clear();
        state.pending.clear();
        self.generation.store(generation, Ordering::Release);
    }

    /// Checks and records a settlement; returns how many deliveries it covers and
    /// whether the queue must be told (the first pending settlement since its
    /// last drain).
    fn claim(
        &self,
        tag: DeliveryTag,
        multiple: bool,
        outcome: Outcome,
    ) -> Result<(usize, bool), AckError> {
        let mut state = self.state.lock();
        self.claim_locked(&mut state, tag, multiple, outcome)
    }

    /// [`claim`](Self::claim) with the lock already held (transactions hold the
    /// locks of every link they settle on).
    pub(crate) fn claim_locked(
        &self,
        state: &mut LinkState,
        tag: DeliveryTag,
        multiple: bool,
        outcome: Outcome,
    ) -> Result<(usize, bool), AckError> {
        let queue = || self.queue_name.clone();
        if let Outcome::RequeueAfter(delay) = outcome
            && delay > MAX_REQUEUE_DELAY
        {
            return Err(AckError::DelayTooLong {
                delay,
                queue: queue(),
            });
        }
        if self.mode == AckMode::Auto {
            return Err(AckError::AutoAck {
                tag,
                queue: queue(),
            });
        }
        if !self.is_current(tag) || (state.closed && state.gone.contains(tag.0)) {
            return Err(AckError::ConsumerGone {
                tag,
                queue: queue(),
            });
        }
        if state.closed {
            // Settled before the registration ended (a `basic.get`
            // delivery's ends once it is settled).
            return Err(AckError::AlreadySettled {
                tag,
                queue: queue(),
            });
        }
        if !state.outstanding.contains(tag.0) {
            return Err(AckError::AlreadySettled {
                tag,
                queue: queue(),
            });
        }
        let n = if multiple && self.is_remote() {
            // RabbitMQ's `multiple` would also cover deliveries this side
            // holds as delayed or already settled: one settlement per tag,
            // merged again where that is safe (see `amqp::consume`).
            let n = state.outstanding.0.partition_point(|&t| t <= tag.0);
            let covered: Vec<u64> = state.outstanding.0.drain(..n).collect();
            state
                .pending
                .extend(covered.into_iter().map(|t| PendingSettle {
                    tag: DeliveryTag(t),
                    multiple: false,
                    outcome,
                }));
            let first = state.pending.len() == n;
            return Ok((n, first));
        } else if multiple {
            state.outstanding.remove_through(tag.0)
        } else {
            state.outstanding.remove(tag.0);
            1
        };
        state.pending.push(PendingSettle {
            tag,
            multiple,
            outcome,
        });
        Ok((n, state.pending.len() == 1))
    }

    /// Locks the link's settlement state.
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, LinkState> {
        self.state.lock()
    }
}

/// A cloneable handle that settles one delivery, for code that passes the
/// [`Delivery`] itself on (retry wrappers, transactions, tasks).
#[derive(Clone)]
pub struct Settler {
    pub(crate) tag: DeliveryTag,
    pub(crate) link: Arc<Link>,
    /// Where the message is stored (0: not persisted), for a transaction's
    /// commit record.
    pub(crate) loc: u64,
}

impl fmt::Debug for Settler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settler")
            .field("queue", &self.link.queue_name)
            .field("tag", &self.tag)
            .finish()
    }
}

impl Settler {
    /// The delivery tag it settles.
    pub fn tag(&self) -> DeliveryTag {
        self.tag
    }

    /// Settles with the given outcome (and, with `multiple`, every earlier
    /// delivery this consumer holds); returns how many deliveries were settled.
    ///
    /// Returns once the settlement is recorded; the queue applies recorded
    /// settlements in order, in batches. If the queue's mailbox is full this waits
    /// for room, like a publish.
    pub async fn settle(&self, outcome: Outcome, multiple: bool) -> Result<usize, AckError> {
        let (n, notify) = self.link.claim(self.tag, multiple, outcome)?;
        if notify {
            self.link.notify().await;
        }
        Ok(n)
    }
}

/// A message delivered to a consumer. Derefs to its [`Envelope`].
///
/// In manual-ack mode, settle it with [`ack`](Self::ack), [`nack`](Self::nack) or
/// [`reject`](Self::reject); until then it counts against the consumer's prefetch.
/// If the consumer stops or crashes first, it is requeued.
pub struct Delivery {
    message: Envelope,
    tag: DeliveryTag,
    link: Arc<Link>,
    /// What only some deliveries carry, out of line: a delivery is moved
    /// at every hand-over, and 128 bytes is what moves without a `memcpy`
    /// call.
    extra: Option<Arc<Extra>>,
}

/// The rarer parts of a [`Delivery`].
struct Extra {
    /// Where the message is stored (0: not persisted).
    loc: u64,
    /// For a manual `basic.get` delivery: ends its registration (requeueing
    /// it, if unsettled) when the delivery is dropped.
    _fetched: Option<Box<dyn Send + Sync>>,
}

/// Ends a `basic.get` delivery's registration when the delivery is dropped:
/// settled, nothing happens; unsettled, the queue requeues it, as RabbitMQ
/// does when the channel that got it closes.
pub(crate) struct FetchGuard {
    queue: Addr<QueueActor>,
    consumer: ConsumerId,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        let end = crate::queue::actor::Unsubscribe::now(self.consumer);
        if let Err(postbox::TrySendError::Full(end)) = self.queue.try_send(end)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let queue = self.queue.clone();
            rt.spawn(async move {
                let _ = queue.send(end).await;
            });
        }
    }
}

impl Message for Delivery {
    type Reply = ();
}

impl Deref for Delivery {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.message
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.link.queue_name)
            .field("tag", &self.tag)
            .field("consumer", &self.link.consumer)
            .field("message", &self.message)
            .finish()
    }
}

impl Delivery {
    #[inline]
    pub(crate) fn new(message: Envelope, tag: DeliveryTag, link: Arc<Link>, loc: u64) -> Self {
        Delivery {
            message,
            tag,
            link,
            extra: (loc != 0).then(|| {
                Arc::new(Extra {
                    loc,
                    _fetched: None,
                })
            }),
        }
    }

    /// A manual `basic.get` delivery: dropping it unsettled requeues it.
    pub(crate) fn fetched(
        message: Envelope,
        tag: DeliveryTag,
        link: Arc<Link>,
        loc: u64,
        queue: Addr<QueueActor>,
    ) -> Self {
        let consumer = link.consumer;
        Self::guarded(
            message,
            tag,
            link,
            loc,
            Box::new(FetchGuard { queue, consumer }),
        )
    }

    /// A delivery that drops `guard` when it is dropped (and every copy of
    /// it): a `basic.get` delivery ends its registration that way.
    pub(crate) fn guarded(
        message: Envelope,
        tag: DeliveryTag,
        link: Arc<Link>,
        loc: u64,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        Delivery {
            message,
            tag,
            link,
            extra: Some(Arc::new(Extra {
                loc,
                _fetched: Some(guard),
            })),
        }
    }

    /// Another handle on the same delivery (same tag, same consumer), for a
    /// layer that retries a handler in place: settling either settles it.
    pub(crate) fn retry_copy(&self) -> Delivery {
        Delivery {
            message: self.message.clone(),
            tag: self.tag,
            link: self.link.clone(),
            extra: self.extra.clone(),
        }
    }

    /// The message.
    pub fn message(&self) -> &Envelope {
        &self.message
    }

    /// Takes the message out of the delivery (it stays unsettled until acked).
    pub fn into_message(self) -> Envelope {
        self.message
    }

    /// The delivery tag: unique within the queue, increasing.
    pub fn tag(&self) -> DeliveryTag {
        self.tag
    }

    /// The queue it came from.
    pub fn queue(&self) -> &str {
        &self.link.queue_name
    }

    /// The consumer registration it was delivered to.
    pub fn consumer(&self) -> ConsumerId {
        self.link.consumer
    }

    /// The acknowledgement mode it was delivered under.
    pub fn ack_mode(&self) -> AckMode {
        self.link.mode
    }

    /// False once the consumer's registration has ended: the delivery has been
    /// requeued and settling it fails with [`AckError::ConsumerGone`].
    pub fn is_live(&self) -> bool {
        self.link.is_active()
    }

    /// Acknowledges this delivery.
    #[doc(alias = "basic_ack")]
    pub async fn ack(&self) -> Result<(), AckError> {
        self.settle(Outcome::Ack, false).await.map(|_| ())
    }

    /// Acknowledges this delivery and every earlier one this consumer still holds;
    /// returns how many were settled.
    pub async fn ack_multiple(&self) -> Result<usize, AckError> {
        self.settle(Outcome::Ack, true).await
    }

    /// Negatively acknowledges: `requeue` puts it back at its original position
    /// (flagged redelivered, delivery count + 1); otherwise it is discarded.
    #[doc(alias = "basic_nack")]
    pub async fn nack(&self, requeue: bool) -> Result<(), AckError> {
        let outcome = if requeue {
            Outcome::Requeue
        } else {
            Outcome::Discard
        };
        self.settle(outcome, false).await.map(|_| ())
    }

    /// [`nack`](Self::nack) for this and every earlier delivery this consumer holds.
    pub async fn nack_multiple(&self, requeue: bool) -> Result<usize, AckError> {
        let outcome = if requeue {
            Outcome::Requeue
        } else {
            Outcome::Discard
        };
        self.settle(outcome, true).await
    }

    /// Rejects it: with `requeue`, back to its original position (as
    /// [`nack(true)`](Self::nack)); without, discarded (dead-lettered if the
    /// queue has a dead-letter exchange). AMQP's `basic.reject`.
    #[doc(alias = "basic_reject")]
    pub async fn reject(&self, requeue: bool) -> Result<(), AckError> {
        self.nack(requeue).await
    }

    /// Nacks with requeue after `delay`: the message comes back at its original
    /// position once the delay has passed, not before (delayed redelivery).
    /// A delay over [`MAX_REQUEUE_DELAY`] (about 49.7 days) is refused with
    /// [`AckError::DelayTooLong`], and the delivery stays unsettled.
    pub async fn nack_after(&self, delay: std::time::Duration) -> Result<(), AckError> {
        self.settle(Outcome::RequeueAfter(delay), false)
            .await
            .map(|_| ())
    }

    /// Settles with the given outcome; see [`Settler::settle`].
    pub async fn settle(&self, outcome: Outcome, multiple: bool) -> Result<usize, AckError> {
        self.settler().settle(outcome, multiple).await
    }

    /// A cloneable handle that settles this delivery.
    pub fn settler(&self) -> Settler {
        Settler {
            tag: self.tag,
            link: self.link.clone(),
            loc: self.extra.as_ref().map_or(0, |e| e.loc),
        }
    }

    /// Records that this delivery will never be handled: an auto-ack one (the
    /// queue kept no copy) counts in its queue's `auto_ack_lost`. Manual-ack
    /// deliveries are requeued when their consumer goes, so they are not lost.
    pub(crate) fn lost(self) {
        if self.link.mode == AckMode::Auto {
            tracing::debug!(queue = %self.link.queue_name, message_id = %self.message.id(), "auto-ack delivery lost");
        }
        self.link.lose_one();
    }

    /// A second handle to this same delivery (same tag, same registration), for
    /// the test kit's duplicate-delivery fault: the first settlement of either
    /// applies, and settling the other fails with `AlreadySettled`.
    #[cfg(feature = "testkit")]
    pub(crate) fn duplicate(&self) -> Delivery {
        Delivery {
            message: self.message.clone(),
            tag: self.tag,
            link: self.link.clone(),
            extra: self.extra.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::Tags;

    #[derive(Clone, Debug)]
    enum Op {
        /// Issue the next tag, `skip` past the last one.
        Issue(u64),
        /// Settle the i-th held tag (modulo how many are held).
        Settle(usize),
        /// Settle everything through the i-th held tag.
        SettleMultiple(usize),
        /// Check a tag that may or may not be held.
        Probe(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..4).prop_map(Op::Issue),
            2 => (0usize..64).prop_map(Op::Settle),
            1 => (0usize..64).prop_map(Op::SettleMultiple),
            1 => (0u64..200).prop_map(Op::Probe),
        ]
    }

    proptest! {
        /// The deque agrees with an ordered set under any mix of in-order issuing
        /// and out-of-order settling.
        #[test]
        fn tags_behave_like_an_ordered_set(ops in proptest::collection::vec(op(), 0..200)) {
            let (mut tags, mut model, mut last) = (Tags::default(), BTreeSet::new(), 0u64);
            for op in ops {
                match op {
                    Op::Issue(skip) => {
                        last += skip;
                        tags.insert(last);
                        model.insert(last);
                    }
                    Op::Settle(i) if !model.is_empty() => {
                        let tag = *model.iter().nth(i % model.len()).unwrap();
                        tags.remove(tag);
                        model.remove(&tag);
                    }
                    Op::SettleMultiple(i) if !model.is_empty() => {
                        let tag = *model.iter().nth(i % model.len()).unwrap();
                        let rest = model.split_off(&(tag + 1));
                        prop_assert_eq!(tags.remove_through(tag), model.len());
                        model = rest;
                    }
                    Op::Probe(tag) => prop_assert_eq!(tags.contains(tag), model.contains(&tag)),
                    _ => {}
                }
                prop_assert!(tags.0.iter().copied().eq(model.iter().copied()));
            }
        }
    }

    #[test]
    fn an_out_of_order_tag_is_kept_sorted() {
        let mut tags = Tags::default();
        for t in [1, 5, 3, 5, 2] {
            tags.insert(t);
        }
        assert_eq!(tags.0, [1, 2, 3, 5]);
        assert_eq!(tags.remove_through(3), 3);
        assert!(tags.contains(5) && !tags.contains(3));
    }
}
#[cfg(test)]
mod size {
    /// Deliveries and dispatches are moved at every hand-over: past 128
    /// bytes each move is a `memcpy` call (a delivery of 136 bytes cost
    /// the point-to-point rows a fifth of their throughput).
    #[test]
    fn deliveries_move_without_memcpy() {
        assert!(std::mem::size_of::<super::Delivery>() <= 128);
        assert!(std::mem::size_of::<crate::queue::state::Dispatch>() <= 128);
    }
}
