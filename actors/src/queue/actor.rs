//! The queue actor: drives a [`QueueState`] from messages and pushes its
//! dispatches to consumer actors.
//!
//! Flow control: publishers wait when the queue's inbox is full (its backlog
//! of ready messages is bounded only by its length limits).
//! The queue never waits on a consumer: it hands deliveries over with `try_send`,
//! and a consumer whose mailbox is full is marked blocked (no more dispatches to
//! it) while a small task waits for room and then unblocks it. A manual-ack
//! consumer is further bounded by its prefetch; an auto-ack consumer by its
//! mailbox only, and its deliveries are settled when dispatched (the queue keeps
//! no copy: auto-ack is at-most-once, as in RabbitMQ).
//!
//! Consumers are watched: when a consumer's incarnation ends (stop, error or
//! panic), its registration ends and every delivery it had not settled is
//! requeued at its original position.
//!
//! After every event the actor makes progress in one place: it moves the state
//! machine's clock to now, hands the messages the state removed (rejected,
//! expired, overflowed, over the delivery limit) to its dead-letter exchange
//! with their death history, or drops and counts them, dispatches, and sets a
//! timer for the next expiry or delayed requeue.
//!
//! The queue knows nothing of exchanges: dead letters go through the
//! [`QueueHost`] it was created with (the broker), which routes them and never
//! makes the queue wait.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytestring::ByteString;
use postbox::{
    Actor, ActorId, AnyAddr, Context, Failure, Handler, Message, Recipient, RuntimeHandle,
    TrySendError,
};

use crate::dedup::SharedWindow;
use crate::envelope::{DeathReason, Envelope};
use crate::queue::ack::{AckMode, ConsumerId};
use crate::queue::budget::{BudgetFreed, MemoryBudget};
use crate::queue::by_id::ById;
use crate::queue::consumers::{Claim, Consumers};
use crate::queue::delivery::{Delivery, Link, LinkSlot, Outcome, PendingSettle};
use crate::queue::handle::LocalQueue;
use crate::queue::inbox::{Collect, Inbox, Shut};
use crate::queue::observe::Observers;
use crate::queue::options::QueueOptions;
use crate::queue::policy::{Overflow, QueuePolicy};
use crate::queue::state::{ConsumerError, DeadLetter, Publish as Published, QueueState};
use crate::queue::stats::{ConsumerStats, QueueStats};
use crate::store::{Append, Confirm, Loc, QueueId, Recovered, StorageStats, Store, StoreError};

/// A queue's counters and consumers at one moment.
#[derive(Clone, Debug)]
pub struct QueueSnapshot {
    /// The queue's name.
    pub name: ByteString,
    /// Message counts and counters.
    pub stats: QueueStats,
    /// One entry per registered consumer.
    pub consumers: Vec<ConsumerStats>,
    /// Messages sent to the dead-letter exchange (and reaching a queue or a
    /// stream there).
    pub dead_lettered: u64,
    /// Messages removed for a dead-letter reason but dropped: no dead-letter
    /// exchange, it routed nowhere, or it would have cycled.
    pub dead_letters_dropped: u64,
    /// Auto-ack deliveries that no handler completed: their consumer failed
    /// while handling them, or stopped for good (or never got them) while
    /// they waited for it. Auto-ack is at-most-once, as in RabbitMQ; this
    /// counts every loss, so that handled + lost accounts for every auto-ack
    /// delivery.
    pub auto_ack_lost: u64,
    /// Publishes waiting for room in a queue whose overflow is
    /// [`Overflow::Block`] (not counted as ready).
    pub waiting_publishes: usize,
    /// For a durable queue on a broker with a data directory: the counters
    /// of the message log it shares with the broker's other durable queues
    /// (bytes on disk, segments, syncs, bytes per sync, confirm latency).
    pub storage: Option<StorageStats>,
}

/// What a queue needs from whoever runs it (the broker), handed to it when it
/// is created: publishing its dead letters, and being forgotten when it stops.
pub(crate) trait QueueHost: Send + Sync + 'static {
    /// Publishes a dead letter through `exchange` with its own routing key,
    /// never waiting, to every target but the queues `skip` names; returns
    /// whether any queue or stream took it.
    fn dead_letter(&self, exchange: &str, message: Envelope, skip: &dyn Fn(&str) -> bool) -> bool;

    /// The queue `name` (actor `id`) stopped: deleted, or failed.
    fn queue_stopped(&self, name: &str, id: ActorId, deleted: bool);

    /// The broker's memory budget, if it has one.
    fn memory_budget(&self) -> Option<Arc<MemoryBudget>>;
}

/// A durable queue's place in its broker's store: what it writes its
/// persistent messages, settlements and deliveries to, under its id.
pub(crate) struct Durable {
    pub(crate) store: Store,
    pub(crate) id: QueueId,
}

/// Where a queue sends its dead letters.
#[derive(Clone, Debug)]
struct DeadLetterTarget {
    exchange: ByteString,
    routing_key: Option<ByteString>,
}

/// Starts a queue actor named `name` on `runtime` and returns its handle;
/// `None` if the runtime has stopped.
pub(crate) fn spawn_queue(
    runtime: &RuntimeHandle,
    name: ByteString,
    options: &QueueOptions,
    max_message_bytes: usize,
    observers: Observers,
    host: Arc<dyn QueueHost>,
    durable: Option<(Durable, Vec<Recovered>)>,
) -> Option<LocalQueue> {
    let consumers = Arc::new(Consumers::default());
    let persists = durable.is_some();
    let window_log = durable
        .as_ref()
        .map(|(d, _)| (d.store.dedup_path(d.id), d.store.syncs()));
    let inbox = Arc::new(Inbox::new(options.mailbox));
    let lease = Arc::new(AtomicU64::new(postbox::clock::now_ms()));
    let expires = options
        .expires
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let dead_letter = options.dead_letter_exchange.as_deref().map(|exchange| {
        Box::new(DeadLetterTarget {
            exchange: ByteString::from(exchange),
            routing_key: options
                .dead_letter_routing_key
                .as_deref()
                .map(ByteString::from),
        })
    });
    // Boxed, so that the factory (kept for the actor's life) shrinks to a
    // pointer once it has handed the actor over.
    let mut actor = Some(Box::new(QueueActor::new(
        name.clone(),
        options.policy(),
        dead_letter,
        expires,
        observers,
        host,
        consumers.clone(),
        inbox.clone(),
        lease.clone(),
        durable,
    )));
    let addr = runtime
        .build(move || actor.take().map(|actor| *actor))
        .mailbox(options.mailbox)
        .name(crate::name::actor_name(format_args!("queue:{name}")))
        .spawn();
    if addr.is_closed() {
        return None;
    }
    let dedup = options.dedup.map(|window| {
        let target = crate::dedup::DedupTarget::Queue(name.to_string());
        Arc::new(match &window_log {
            Some((path, sync)) => SharedWindow::durable(window, target, path, *sync),
            None => SharedWindow::new(window, target),
        })
    });
    Some(LocalQueue {
        key: Arc::from(&*name),
        name,
        addr,
        max_message_bytes,
        consumers,
        confirm: matches!(
            options.overflow,
            Overflow::RejectPublish | Overflow::RejectPublishDlx
        ),
        inbox,
        lease,
        durable: persists,
        dedup,
    })
}

struct Registered {
    sink: Sink,
    link: Arc<Link>,
    /// Cancelled by its consumer: it gets nothing more, and the registration
    /// ends once what it holds is settled.
    cancelled: bool,
    /// It holds the queue's exclusivity (released when it is removed).
    exclusive: bool,
}

/// Where a consumer's deliveries go: one at a time to any actor that handles
/// [`Delivery`], or in batches to a [`ConsumerActor`](crate::ConsumerActor),
/// which is also told when the queue cancels it.
#[derive(Clone)]
pub(crate) enum Sink {
    One(Recipient<Delivery>),
    Batch {
        deliveries: Recipient<DeliveryBatch>,
        cancelled: Recipient<Cancelled>,
    },
    /// No actor: the registration of one `basic.get` delivery.
    Fetch,
}

impl Sink {
    /// Where a consumer actor is told it was cancelled.
    pub(crate) fn cancelled(&self) -> Option<&Recipient<Cancelled>> {
        match self {
            Sink::Batch { cancelled, .. } => Some(cancelled),
            Sink::One(_) | Sink::Fetch => None,
        }
    }

    pub(crate) fn any(&self) -> Option<AnyAddr> {
        match self {
            Sink::One(r) => Some(r.any()),
            Sink::Batch { deliveries, .. } => Some(deliveries.any()),
            Sink::Fetch => None,
        }
    }
}

/// Deliveries handed to one consumer in one mailbox slot. Auto-ack
/// deliveries still in a batch when it is dropped (the consumer stopped
/// before taking them) are counted as lost.
pub(crate) struct DeliveryBatch(pub(crate) Vec<Delivery>);
impl Message for DeliveryBatch {
    type Reply = ();
}

impl Drop for DeliveryBatch {
    fn drop(&mut self) {
        for delivery in self.0.drain(..) {
            delivery.lost();
        }
    }
}

/// The queue ended the registration: it was deleted (`deleted`: RabbitMQ's
/// `basic.cancel` from the broker), or the consumer had cancelled and has
/// settled everything it held.
pub(crate) struct Cancelled {
    pub(crate) deleted: bool,
}
impl Message for Cancelled {
    type Reply = ();
}

/// Most deliveries in one batch: bounds what a consumer's mailbox slot holds.
const MAX_BATCH: usize = 64;

/// No timer set: a deadline that far (epoch ms) would never come.
const NO_TIMER: u64 = u64::MAX;

/// The actor that owns one queue, reached through a [`LocalQueue`].
pub(crate) struct QueueActor {
    name: ByteString,
    state: QueueState,
    consumers: ById<Registered>,
    next_consumer: u64,
    observers: Observers,
    host: Arc<dyn QueueHost>,
    consumer_count: Arc<Consumers>,
    inbox: Arc<Inbox>,
    /// Boxed: most queues have none, and every queue's task holds the actor.
    dead_letter: Option<Box<DeadLetterTarget>>,
    /// When the pending timer fires (epoch ms); `NO_TIMER` if none is set.
    /// Not an `Option`: those 8 bytes took every queue's task into the
    /// next 128-byte size (tokio's task cells are aligned to 128).
    timer_at: u64,
    dead_lettered: u64,
    dead_letters_dropped: u64,
    /// Shared with every registration's link: deliveries lose themselves.
    auto_ack_lost: Arc<AtomicU64>,
    /// How long the queue may stay unused before it deletes itself (ms).
    expires: Option<u64>,
    /// When it was last used (epoch ms): shared with its handles, so that a
    /// redeclaration renews it.
    lease: Arc<AtomicU64>,
    expiry_armed: bool,
    /// A check for an unused backlog buffer is scheduled.
    spare_check: bool,
    /// Events handled since the last progress (see [`QueueActor::touch`]).
    unprogressed: u32,
    /// Whether progress may wait for the mailbox to drain: not with length
    /// limits, which must see dispatches as they happen.
    coalesce: bool,
    /// Where its persistent messages go, if it is durable on a broker with
    /// storage.
    durable: Option<Durable>,
    /// Deleted (not merely stopped): its durable declaration goes too.
    deleted: bool,
    /// Whether a full queue makes its publishers wait ([`Overflow::Block`]
    /// with a limit).
    block: bool,
    /// Publishes waiting for room under [`Overflow::Block`], oldest first.
    /// While any waits, the queue takes nothing from its inbox.
    parked: VecDeque<Parked>,
    /// The newest batch of the inbox the queue was told to collect: under
    /// [`Overflow::Block`] it may collect later than told, but never a batch
    /// it was not yet told of (a request sent after that batch closed could
    /// be overtaken).
    collect_through: u64,
    /// Told batches left in the inbox because publishes were waiting.
    held_back: bool,
    /// The broker's memory budget: past it, a queue holding much makes its
    /// publishers wait as under [`Overflow::Block`].
    budget: Option<Arc<MemoryBudget>>,
    /// What this queue charges the budget now (bytes).
    charged: usize,
    /// Bytes of the parked publishes.
    parked_bytes: usize,
}

/// A publish waiting for room in a blocking queue.
struct Parked {
    message: Envelope,
    /// Told once the message (and the messages parked before it with no
    /// sender of their own) entered the queue and, if persistent on a
    /// durable queue, was stored: a confirmed publish's wait.
    entered: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
}

/// Most events handled before the queue makes progress even though more are
/// waiting: bounds how long consumers wait under a flood of publishes.
const PROGRESS_EVERY: u32 = 128;

impl QueueActor {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: ByteString,
        policy: QueuePolicy,
        dead_letter: Option<Box<DeadLetterTarget>>,
        expires: Option<u64>,
        observers: Observers,
        host: Arc<dyn QueueHost>,
        consumer_count: Arc<Consumers>,
        inbox: Arc<Inbox>,
        lease: Arc<AtomicU64>,
        durable: Option<(Durable, Vec<Recovered>)>,
    ) -> Self {
        // Drop-head and reject-publish must see each dispatch as it happens;
        // spill limits only memory, and dispatching a batch at once is fine.
        let coalesce = (policy.max_length.is_none() && policy.max_length_bytes.is_none())
            || policy.overflow == Overflow::Spill;
        let block = policy.overflow == Overflow::Block
            && (policy.max_length.is_some() || policy.max_length_bytes.is_some());
        let budget = host.memory_budget();
        let mut state = QueueState::with_policy(policy);
        let durable = durable.map(|(durable, recovered)| {
            if !recovered.is_empty() {
                tracing::info!(queue = %name, messages = recovered.len(), "durable queue recovered");
            }
            state.restore(
                recovered
                    .into_iter()
                    .map(|m| (m.seq, m.expires_at, m.message, m.loc.pack())),
            );
            durable
        });
        QueueActor {
            name,
            state,
            consumers: ById::default(),
            next_consumer: 1,
            observers,
            host,
            consumer_count,
            inbox,
            dead_letter,
            timer_at: NO_TIMER,
            dead_lettered: 0,
            dead_letters_dropped: 0,
            auto_ack_lost: Arc::default(),
            expires,
            lease,
            expiry_armed: false,
            spare_check: false,
            unprogressed: 0,
            coalesce,
            durable,
            deleted: false,
            block,
            parked: VecDeque::new(),
            collect_through: 0,
            held_back: false,
            budget,
            charged: 0,
            parked_bytes: 0,
        }
    }

    /// Notes an event that may enable deliveries. Progress happens when the
    /// mailbox drains ([`Actor::drained`]) or every [`PROGRESS_EVERY`] events, so
    /// that a burst of publishes is dispatched in batches.
    fn touch(&mut self, ctx: &mut Context<Self>, events: u32) {
        self.unprogressed = self.unprogressed.saturating_add(events);
        if !self.coalesce || self.unprogressed >= PROGRESS_EVERY {
            self.progressed(ctx);
        }
    }

    /// Enqueues a message; false if the queue refused it (reject-publish). A
    /// persistent message to a durable queue is written to the store (not
    /// waited for: see [`PublishDurable`] for publishes that are confirmed).
    #[inline]
    fn publish(&mut self, message: Envelope) -> bool {
        if self.may_block() && (!self.parked.is_empty() || !self.room_for(&message)) {
            self.park(message, None);
            return true;
        }
        if self.durable.is_some() && message.persistent() {
            return self.publish_persistent(message);
        }
        self.enqueue(message, None)
    }

    /// [`publish`](Self::publish) of a message to persist.
    #[inline(never)]
    fn publish_persistent(&mut self, message: Envelope) -> bool {
        let Some((store, id)) = self.durable.as_ref().map(|d| (d.store.clone(), d.id)) else {
            return self.enqueue(message, None);
        };
        match store.append() {
            Ok(mut append) => {
                let taken = self.enqueue(message, Some((&mut append, id)));
                append.finish(None);
                taken
            }
            Err(err) => {
                tracing::warn!(queue = %self.name, %err, "persistent message kept in memory only: the store failed");
                self.enqueue(message, None)
            }
        }
    }

    /// Whether publishes to this queue may have to wait: overflow block, or
    /// a memory budget.
    #[inline]
    fn may_block(&self) -> bool {
        self.block || self.budget.is_some()
    }

    /// Whether the memory budget makes this queue's publishers wait now.
    #[inline]
    fn budget_blocks(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.blocks(self.charged))
    }

    /// Whether `message` may enter now: within the limits (overflow block)
    /// and the memory budget.
    #[inline]
    fn room_for(&self, message: &Envelope) -> bool {
        (!self.block || self.state.has_room_for(message)) && !self.budget_blocks()
    }

    /// Charges the memory budget with what the queue holds now.
    fn recharge(&mut self) {
        if let Some(budget) = &self.budget {
            let held = self.state.bytes_in_memory() + self.parked_bytes;
            if held != self.charged {
                budget.charge(&self.name, self.charged, held);
                self.charged = held;
            }
        }
    }

    /// Asks the budget to wake this queue once it frees.
    fn wait_for_budget(&self, ctx: &mut Context<Self>) {
        if let (Some(budget), Some(addr)) = (&self.budget, ctx.addr()) {
            budget.wait(addr.recipient());
        }
    }

    /// Sets `message` aside until the queue has room for it (after the
    /// messages already waiting).
    #[inline(never)]
    fn park(
        &mut self,
        message: Envelope,
        entered: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    ) {
        if self.parked.is_empty() {
            tracing::debug!(queue = %self.name, "queue full: publishers wait (overflow block)");
        }
        self.parked_bytes += message.size();
        self.parked.push_back(Parked { message, entered });
    }

    /// Parks every inbox batch the queue was told of, so that a request
    /// parked next comes after them.
    fn park_told(&mut self) {
        while let Some(mut batch) = self.inbox.collect(self.collect_through) {
            for message in batch.drain(..) {
                self.park(message, None);
            }
            self.inbox.recycle(batch);
        }
    }

    /// Lets waiting publishes in while there is room: the parked ones, then
    /// (once none waits) the batches of the inbox the queue was told of.
    /// Returns whether any message entered.
    fn unpark(&mut self) -> bool {
        let mut entered = false;
        loop {
            while let Some(front) = self.parked.front() {
                if !self.room_for(&front.message) {
                    return entered;
                }
                let Some(Parked {
                    message,
                    entered: done,
                }) = self.parked.pop_front()
                else {
                    break;
                };
                self.parked_bytes -= message.size();
                entered = true;
                self.enter(message, done);
            }
            // Nothing waits: the inbox may go on.
            let Some(mut batch) = self.inbox.collect(self.collect_through) else {
                self.held_back = false;
                break;
            };
            for message in batch.drain(..) {
                entered |= self.publish(message) && self.parked.is_empty();
            }
            self.inbox.recycle(batch);
        }
        entered
    }

    /// Enqueues a parked message, persisting it if it is persistent on a
    /// durable queue; `done` hears when it is stored (or at once).
    fn enter(
        &mut self,
        message: Envelope,
        done: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    ) {
        let store = self.durable.as_ref().map(|d| (d.store.clone(), d.id));
        match store {
            Some((store, id)) if message.persistent() => match store.append() {
                Ok(mut append) => {
                    self.enqueue(message, Some((&mut append, id)));
                    append.finish(done);
                }
                Err(err) => {
                    // Not stored: the waiting publisher hears why.
                    if let Some(done) = done {
                        let _ = done.send(Err(err));
                    }
                }
            },
            _ => {
                self.enqueue(message, None);
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
            }
        }
    }

    /// Enqueues a message, persisting it through `persist` if given.
    #[inline]
    fn enqueue(&mut self, message: Envelope, persist: Option<(&mut Append<'_>, QueueId)>) -> bool {
        // Observers hear of enqueued messages only; a clone is a few refcounts.
        let observed = self.observers.wants_publishes().then(|| message.clone());
        let outcome = match persist {
            Some((append, id)) => self.state.publish_persisted(message, |seq, expires_at, m| {
                append.publish(id, seq, expires_at, m).pack()
            }),
            None => self.state.publish(message),
        };
        match outcome {
            Published::Enqueued => {
                if let Some(message) = observed {
                    self.observers.each(|o| o.published(&self.name, &message));
                }
                true
            }
            Published::Refused(message) => {
                tracing::debug!(queue = %self.name, message_id = %message.id(), "publish refused: queue full");
                false
            }
            // Dropped as the queue's policy says: the publisher is not told.
            Published::Dropped => true,
        }
    }

    /// Writes what happened to persisted messages (settled, delivered) to the
    /// store: lazily, with the next group.
    fn flush_journal(&mut self) {
        if !self.state.has_journal() {
            return;
        }
        let journal = self.state.take_journal();
        if let Some(durable) = &self.durable {
            let unpack = |locs: Vec<u64>| locs.into_iter().map(Loc::unpack).collect::<Vec<_>>();
            durable
                .store
                .record(&unpack(journal.settled), &unpack(journal.delivered));
        }
    }

    /// Brings the state up to now, then dead-letters, dispatches and re-arms the
    /// timer: called after every event.
    fn progress(&mut self, ctx: &mut Context<Self>) {
        self.state.advance_to(postbox::clock::now_ms());
        self.progressed(ctx);
    }

    /// [`progress`](Self::progress) for handlers that just advanced the clock.
    fn progressed(&mut self, ctx: &mut Context<Self>) {
        self.unprogressed = 0;
        self.dead_letters();
        self.dispatch(ctx);
        // Room made by deliveries lets waiting publishes in, which may be
        // delivered in turn.
        if self.may_block() {
            self.recharge();
            while (!self.parked.is_empty() || self.held_back) && self.unpark() {
                self.dispatch(ctx);
                self.recharge();
            }
            let waiting = !self.parked.is_empty();
            if waiting && self.budget_blocks() {
                self.wait_for_budget(ctx);
            }
            // What `try_publish` sees: full while publishes wait or the
            // queue is at its limit.
            self.inbox.set_blocked(
                waiting || (self.block && self.state.at_limit()) || self.budget_blocks(),
            );
        }
        // Dispatching expires heads too.
        self.dead_letters();
        self.arm_timer(ctx);
        self.arm_expiry(ctx);
        if !self.spare_check && self.state.has_spare() {
            // Not now: a backlog that drained often fills again at once.
            self.spare_check = true;
            ctx.notify_later(ReleaseSpare, SPARE_AFTER);
        }
        self.flush_journal();
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(due) = self.state.next_deadline() else {
            return;
        };
        if self.timer_at <= due {
            return; // an earlier or equal timer is already set
        }
        self.timer_at = due;
        ctx.notify_later(Tick, postbox::clock::until(due));
    }

    fn dead_letters(&mut self) {
        if !self.state.has_dead() {
            return;
        }
        for DeadLetter { message, reason } in self.state.drain_dead() {
            self.dead_letter(message, reason);
        }
    }

    fn dead_letter(&mut self, mut message: Envelope, reason: DeathReason) {
        let Some(target) = &self.dead_letter else {
            self.dead_letters_dropped += 1;
            self.observers
                .each(|o| o.dead_lettered(&self.name, &message, reason, false));
            return;
        };
        message.record_death(&self.name, reason, postbox::clock::now_ms());
        let key = target
            .routing_key
            .clone()
            .unwrap_or_else(|| ByteString::from(message.routing_key()));
        let message = message
            .with_routing_key(&*key)
            .with_exchange(&*target.exchange);
        // As in RabbitMQ: a message that would come back to a queue it already
        // died in, with no rejection anywhere in its history, is in a cycle:
        // it is dropped there. (Streams never dead-letter, so they close no cycle.)
        let rejected = message
            .deaths()
            .iter()
            .any(|d| d.reason == DeathReason::Rejected);
        let deaths = message.deaths().to_vec();
        let cycle = |queue: &str| !rejected && deaths.iter().any(|d| d.queue == queue);
        let observed = self.observers.is_active().then(|| message.clone());
        let id = message.id();
        let routed = self.host.dead_letter(&target.exchange, message, &cycle);
        if let Some(message) = observed {
            self.observers
                .each(|o| o.dead_lettered(&self.name, &message, reason, routed));
        }
        if routed {
            self.dead_lettered += 1;
            tracing::debug!(queue = %self.name, message_id = %id, %reason, exchange = %target.exchange, "dead-lettered");
        } else {
            self.dead_letters_dropped += 1;
            tracing::debug!(queue = %self.name, message_id = %id, %reason, "dead letter dropped");
        }
    }

    /// Hands ready messages to eligible consumers until one of the two runs out.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        // Deliveries for batch consumers are gathered and sent per consumer.
        let mut batches: Vec<(ConsumerId, Vec<Delivery>)> = Vec::new();
        while let Some(d) = self.state.next_delivery() {
            let Some(reg) = self.consumers.get(&d.consumer) else {
                // Unreachable by construction (registrations mirror the state);
                // put the message back rather than lose it.
                let _ = self.state.nack(d.consumer, d.tag, false, true);
                let _ = self.state.remove_consumer(d.consumer);
                continue;
            };
            self.observers
                .each(|o| o.delivered(&self.name, d.consumer, d.tag, &d.message));
            let delivery = Delivery::new(d.message, d.tag, reg.link.clone(), d.loc);
            match reg.sink {
                Sink::One(_) | Sink::Fetch => self.hand_over(ctx, d.consumer, vec![delivery]),
                Sink::Batch { .. } => {
                    let i = match batches.iter().position(|(c, _)| *c == d.consumer) {
                        Some(i) => i,
                        None => {
                            batches.push((d.consumer, Vec::with_capacity(8)));
                            batches.len() - 1
                        }
                    };
                    batches[i].1.push(delivery);
                    if batches[i].1.len() >= MAX_BATCH {
                        let (consumer, batch) = batches.swap_remove(i);
                        self.hand_over(ctx, consumer, batch);
                    }
                }
            }
        }
        for (consumer, batch) in batches {
            self.hand_over(ctx, consumer, batch);
        }
    }

    /// Puts deliveries into a consumer's mailbox. If it is full, the consumer is
    /// blocked and a task waits for room; a consumer whose mailbox closed is
    /// removed (see [`QueueActor::consumer_closed`]).
    fn hand_over(
        &mut self,
        ctx: &mut Context<Self>,
        consumer: ConsumerId,
        mut batch: Vec<Delivery>,
    ) {
        let Some(reg) = self.consumers.get(&consumer) else {
            // Removed while this batch was gathered: its deliveries were requeued.
            return;
        };
        if reg.link.mode == AckMode::Manual {
            // Before the consumer can see them: one lock for the whole batch.
            reg.link.track(batch.iter().map(Delivery::tag));
        }
        let sent = match &reg.sink {
            Sink::One(r) => match batch.pop() {
                Some(one) => r
                    .try_send(one)
                    .map_err(|e| e.map(|d| Pending::One(r.clone(), DeliveryBatch(vec![d])))),
                None => Ok(()),
            },
            Sink::Batch { deliveries, .. } => deliveries
                .try_send(DeliveryBatch(batch))
                .map_err(|e| e.map(|b| Pending::Batch(deliveries.clone(), b))),
            // Never in line for deliveries (its registration is cancelled).
            Sink::Fetch => Ok(()),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(pending)) => {
                let _ = self.state.set_blocked(consumer, true);
                let me = ctx.addr();
                ctx.spawn(async move {
                    let delivered = pending.send().await;
                    if let Some(me) = me {
                        let _ = me
                            .send(Handoff {
                                consumer,
                                delivered,
                            })
                            .await;
                    }
                });
            }
            // It died before its watch fired: manual-ack deliveries are
            // requeued with the rest of what it held; auto-ack ones were
            // settled when dispatched, and are lost (and counted, when the
            // undelivered batch is dropped), as in RabbitMQ.
            Err(TrySendError::Closed(pending)) => {
                drop(pending);
                self.remove(consumer);
            }
        }
    }

    /// Ends a registration: applies the settlements it recorded, then requeues
    /// everything else it held.
    fn remove(&mut self, consumer: ConsumerId) {
        let Some(reg) = self.consumers.remove(&consumer) else {
            return;
        };
        if reg.exclusive {
            self.consumer_count.release_exclusive();
        }
        self.count_consumers();
        let pending = reg.link.close();
        self.apply(consumer, pending);
        match self.state.remove_consumer(consumer) {
            Ok(requeued) if requeued > 0 => {
                tracing::debug!(queue = %self.name, %consumer, requeued, "consumer gone: deliveries requeued");
            }
            _ => {}
        }
    }

    fn apply(&mut self, consumer: ConsumerId, pending: Vec<PendingSettle>) {
        for p in pending {
            self.observers
                .each(|o| o.settled(&self.name, consumer, p.tag, p.multiple, p.outcome));
            let result = match p.outcome {
                Outcome::Ack => self.state.ack(consumer, p.tag, p.multiple),
                Outcome::Requeue => self.state.nack(consumer, p.tag, p.multiple, true),
                Outcome::Discard => self.state.nack(consumer, p.tag, p.multiple, false),
                Outcome::RequeueAfter(delay) => {
                    let until = postbox::clock::after(delay);
                    self.state.nack_delayed(consumer, p.tag, p.multiple, until)
                }
            };
            if let Err(err) = result {
                // The link validated it; a mismatch here is a bug, not a user error.
                tracing::error!(queue = %self.name, %consumer, %err, "settlement refused by the queue state");
            }
        }
    }

    /// Publishes the number of consumers (cancelled ones, and `basic.get`
    /// registrations, are not consumers any more), and starts the expiry
    /// clock when there are none.
    fn count_consumers(&mut self) {
        let n = self.consumers.values().filter(|r| !r.cancelled).count();
        let was = self.consumer_count.set_registered(n);
        if n == 0 && was > 0 {
            self.renew_lease();
        }
    }

    /// Ends a cancelled registration once its consumer holds nothing more,
    /// and tells the consumer.
    fn finish_if_settled(&mut self, consumer: ConsumerId) {
        let done = self.consumers.get(&consumer).is_some_and(|r| r.cancelled)
            && self
                .state
                .consumer_stats(consumer)
                .is_none_or(|c| c.unacked == 0);
        if !done {
            return;
        }
        if let Some(reg) = self.consumers.get(&consumer) {
            notify_cancelled(&reg.sink, false);
        }
        self.remove(consumer);
    }

    /// Marks the queue used now (a `basic.get`, a redeclaration, its last
    /// consumer leaving): an expiring queue's clock starts again.
    fn renew_lease(&self) {
        self.lease
            .store(postbox::clock::now_ms(), Ordering::Relaxed);
    }

    /// Arms the expiry check for an unused expiring queue.
    fn arm_expiry(&mut self, ctx: &mut Context<Self>) {
        let Some(expires) = self.expires else { return };
        if self.consumer_count.registered() > 0 || self.expiry_armed {
            return;
        }
        self.expiry_armed = true;
        let due = self.lease.load(Ordering::Relaxed).saturating_add(expires);
        ctx.notify_later(ExpiryCheck, postbox::clock::until(due));
    }

    /// Deletes the queue now: nothing is accepted any more; what got in
    /// before is collected and counted. Returns the last snapshot.
    fn delete_now(&mut self, ctx: &mut Context<Self>) -> QueueSnapshot {
        self.inbox.shut(Shut::Deleted);
        self.collect_all();
        let snapshot = self.snapshot();
        self.deleted = true;
        self.flush_journal();
        if let Some(durable) = &self.durable {
            // Its messages are dead with it (its id is never used again);
            // settling them lets their segments go.
            let persisted: Vec<Loc> = self
                .state
                .persisted()
                .into_iter()
                .map(Loc::unpack)
                .collect();
            durable.store.record(&persisted, &[]);
        }
        ctx.stop();
        snapshot
    }

    fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            name: self.name.clone(),
            stats: self.state.stats(),
            consumers: self
                .state
                .consumers()
                .filter(|c| self.consumers.get(&c.id).is_some_and(|r| !r.cancelled))
                .collect(),
            dead_lettered: self.dead_lettered,
            dead_letters_dropped: self.dead_letters_dropped,
            auto_ack_lost: self.auto_ack_lost.load(Ordering::Relaxed),
            waiting_publishes: self.parked.len(),
            storage: self.durable.as_ref().map(|d| d.store.stats()),
        }
    }

    /// Takes every publish waiting in the inbox into the queue.
    fn collect_all(&mut self) {
        while let Some(mut batch) = self.inbox.collect(u64::MAX) {
            for message in batch.drain(..) {
                self.publish(message);
            }
            self.inbox.recycle(batch);
        }
    }

    /// Ends every registration and tells the consumers: the queue is going
    /// away (RabbitMQ cancels the consumers of a deleted queue).
    fn cancel_consumers(&mut self) {
        // Counted out before they are told: a consumer that has stopped
        // is never still counted.
        self.consumer_count.set_registered(0);
        self.consumer_count.release_exclusive();
        for (id, reg) in self.consumers.drain() {
            reg.link.close();
            if matches!(reg.sink, Sink::Fetch) {
                continue;
            }
            self.observers
                .each(|o| o.consumer_cancelled(&self.name, id));
            tracing::info!(queue = %self.name, consumer = %id, "consumer cancelled: queue deleted");
            notify_cancelled(&reg.sink, true);
        }
    }
}

/// Tells a consumer actor its registration ended.
fn notify_cancelled(sink: &Sink, deleted: bool) {
    if let Sink::Batch { cancelled, .. } = sink {
        tell_cancelled(cancelled, deleted);
    }
}

/// Tells a consumer actor its registration ended (or, `deleted`, that its
/// queue went away), without waiting on a full mailbox.
pub(crate) fn tell_cancelled(cancelled: &Recipient<Cancelled>, deleted: bool) {
    if let Err(TrySendError::Full(msg)) = cancelled.try_send(Cancelled { deleted })
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        // Not tied to this incarnation of the queue: it must arrive.
        let cancelled = cancelled.clone();
        rt.spawn(async move {
            let _ = cancelled.send(msg).await;
        });
    }
}

impl Drop for QueueActor {
    /// Dropped without `stopped`: the runtime shut down. Publishers waiting
    /// for room, and later ones, get `Stopped`; settling fails.
    fn drop(&mut self) {
        // What it held is gone: the budget no longer counts it.
        if let Some(budget) = &self.budget {
            budget.charge(&self.name, self.charged, 0);
        }
        self.inbox.shut(Shut::Stopped);
        for reg in self.consumers.values() {
            reg.link.close();
        }
    }
}

impl Actor for QueueActor {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.arm_expiry(ctx);
        Ok(())
    }

    async fn drained(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        if self.unprogressed > 0 {
            self.progress(ctx);
        }
        Ok(())
    }

    async fn stopped(&mut self, ctx: &mut Context<Self>) {
        // Nothing is accepted from now on; what got in before is dropped with
        // the queue (a deletion counted it in its snapshot).
        self.inbox.shut(Shut::Deleted);
        self.cancel_consumers();
        self.flush_journal();
        self.host.queue_stopped(&self.name, ctx.id(), self.deleted);
    }
}

/// Delete the queue when `owner` stops for good.
pub(crate) struct TieTo(pub(crate) AnyAddr);
impl Message for TieTo {
    type Reply = ();
}
impl Handler<TieTo> for QueueActor {
    async fn handle(
        &mut self,
        TieTo(owner): TieTo,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        ctx.watch(&owner, Some(u64::MAX), |_| OwnerGone);
        Ok(())
    }
}

/// The actor this queue is tied to has stopped for good.
struct OwnerGone;
impl Message for OwnerGone {
    type Reply = ();
}
impl Handler<OwnerGone> for QueueActor {
    async fn handle(&mut self, _: OwnerGone, ctx: &mut Context<Self>) -> Result<(), Failure> {
        tracing::debug!(queue = %self.name, "owner gone: exclusive queue deleted");
        ctx.stop();
        Ok(())
    }
}

/// The memory budget freed: publishes that waited for it may enter.
impl Handler<BudgetFreed> for QueueActor {
    async fn handle(&mut self, _: BudgetFreed, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.progress(ctx);
        Ok(())
    }
}

/// Publishes wait in the inbox; this takes them, batch by batch.
impl Handler<Collect> for QueueActor {
    async fn handle(
        &mut self,
        Collect(through): Collect,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        self.state.advance_to(postbox::clock::now_ms());
        self.collect_through = self.collect_through.max(through);
        let mut taken = 0;
        // A blocking queue with publishes waiting leaves the inbox full.
        while (self.parked.is_empty() || !self.may_block())
            && let Some(mut batch) = self.inbox.collect(through)
        {
            taken += batch.len();
            for message in batch.drain(..) {
                tracing::trace!(queue = %self.name, message_id = %message.id(), correlation_id = message.correlation_id(), "enqueue");
                self.publish(message);
                if !self.coalesce {
                    // Length limits must see each dispatch as it happens.
                    self.progressed(ctx);
                }
            }
            self.inbox.recycle(batch);
        }
        if self.may_block() && !self.parked.is_empty() {
            self.held_back = true;
        }
        if self.coalesce && taken > 0 {
            self.touch(ctx, taken as u32);
        }
        Ok(())
    }
}

/// Enqueue one message and say whether the queue took it (reject-publish
/// queues refuse when full).
pub(crate) struct PublishConfirmed(pub(crate) Envelope);
impl Message for PublishConfirmed {
    type Reply = bool;
}
impl Handler<PublishConfirmed> for QueueActor {
    async fn handle(
        &mut self,
        PublishConfirmed(message): PublishConfirmed,
        ctx: &mut Context<Self>,
    ) -> Result<bool, Failure> {
        self.state.advance_to(postbox::clock::now_ms());
        let accepted = self.publish(message);
        self.progressed(ctx);
        Ok(accepted)
    }
}

/// Why a [`PublishDurable`] was refused.
#[derive(Debug)]
pub(crate) enum DurableRefusal {
    /// The queue is full (reject-publish).
    Full,
    /// The store cannot take it.
    Storage(StoreError),
}

/// Enqueue messages, persisting the persistent ones, and reply with the
/// store's confirmation of them (`None`: nothing to wait for).
pub(crate) struct PublishDurable(pub(crate) Vec<Envelope>);
impl Message for PublishDurable {
    type Reply = Result<Option<Confirm>, DurableRefusal>;
}
impl Handler<PublishDurable> for QueueActor {
    async fn handle(
        &mut self,
        PublishDurable(messages): PublishDurable,
        ctx: &mut Context<Self>,
    ) -> Result<Result<Option<Confirm>, DurableRefusal>, Failure> {
        self.state.advance_to(postbox::clock::now_ms());
        if (self.block || !self.parked.is_empty() || self.budget_blocks()) && !messages.is_empty() {
            // In order behind everything told before: the inbox's batches
            // the queue left there, then the waiting publishes. The
            // publisher waits until the last of its messages is in (and
            // stored).
            self.park_told();
            let (done, entered) = tokio::sync::oneshot::channel();
            for message in messages {
                self.park(message, None);
            }
            if let Some(last) = self.parked.back_mut() {
                last.entered = Some(done);
            }
            self.progressed(ctx);
            return Ok(Ok(Some(entered)));
        }
        let store = self.durable.as_ref().map(|d| (d.store.clone(), d.id));
        let mut refused = false;
        let confirm = match &store {
            Some((store, id)) if messages.iter().any(Envelope::persistent) => {
                let mut append = match store.append() {
                    Ok(append) => append,
                    Err(err) => return Ok(Err(DurableRefusal::Storage(err))),
                };
                for message in messages {
                    let persist = message.persistent().then_some((&mut append, *id));
                    refused |= !self.enqueue(message, persist);
                }
                let (done, confirm) = tokio::sync::oneshot::channel();
                append.finish(Some(done));
                Some(confirm)
            }
            _ => {
                for message in messages {
                    refused |= !self.enqueue(message, None);
                }
                None
            }
        };
        self.progressed(ctx);
        Ok(if refused {
            Err(DurableRefusal::Full)
        } else {
            Ok(confirm)
        })
    }
}

/// A transaction's first step on a durable queue: reserve positions for its
/// persistent messages. Replies with the queue's id in the store and each
/// message's `(seq, expires_at)`; `None` if the queue does not persist (not
/// durable, or the broker is in memory).
pub(crate) struct TxReserve(pub(crate) Vec<Envelope>);
impl Message for TxReserve {
    type Reply = Option<(QueueId, Vec<(u64, u64)>)>;
}
impl Handler<TxReserve> for QueueActor {
    async fn handle(
        &mut self,
        TxReserve(messages): TxReserve,
        _: &mut Context<Self>,
    ) -> Result<Option<(QueueId, Vec<(u64, u64)>)>, Failure> {
        let Some(id) = self.durable.as_ref().map(|d| d.id) else {
            return Ok(None);
        };
        self.state.advance_to(postbox::clock::now_ms());
        Ok(Some((id, self.state.reserve(&messages))))
    }
}

/// A transaction's last step on a durable queue: its messages, stored by the
/// commit record, enter the queue at their reserved positions.
pub(crate) struct TxPublish(pub(crate) Vec<(u64, u64, Envelope, Loc)>);
impl Message for TxPublish {
    type Reply = ();
}
impl Handler<TxPublish> for QueueActor {
    async fn handle(
        &mut self,
        TxPublish(messages): TxPublish,
        ctx: &mut Context<Self>,
    ) -> Result<(), Failure> {
        self.state.advance_to(postbox::clock::now_ms());
        for (seq, expires_at, message, loc) in messages {
            let observed = self.observers.wants_publishes().then(|| message.clone());
            self.state
                .publish_reserved(seq, expires_at, message, loc.pack());
            if let Some(message) = observed {
                self.observers.each(|o| o.published(&self.name, &message));
            }
        }
        self.progressed(ctx);
        Ok(())
    }
}

/// How long a drained backlog keeps its buffer before giving it back.
const SPARE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives back the backlog's buffer if it is still mostly unused.
struct ReleaseSpare;
impl Message for ReleaseSpare {
    type Reply = ();
}
impl Handler<ReleaseSpare> for QueueActor {
    async fn handle(&mut self, _: ReleaseSpare, _: &mut Context<Self>) -> Result<(), Failure> {
        self.spare_check = false;
        if self.state.has_spare() {
            self.state.release_spare();
        }
        Ok(())
    }
}

/// The timer for the next expiry or delayed requeue.
struct Tick;
impl Message for Tick {
    type Reply = ();
}
impl Handler<Tick> for QueueActor {
    async fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.timer_at = NO_TIMER;
        self.progress(ctx);
        Ok(())
    }
}

/// Register a consumer; replies with its link.
pub(crate) struct Subscribe {
    pub(crate) sink: Sink,
    pub(crate) mode: AckMode,
    pub(crate) prefetch: u32,
    /// The consumer actor's incarnation the registration is tied to.
    pub(crate) incarnation: Option<u64>,
    /// RabbitMQ's `exclusive` flag of `basic.consume`.
    pub(crate) exclusive: bool,
    /// Registered on a consumer's behalf: its link goes here before
    /// anything is delivered to it.
    pub(crate) slot: Option<LinkSlot>,
    /// Sent without waiting for the reply: its place among the queue's
    /// consumers, given back once it is registered.
    pub(crate) claim: Option<Claim>,
}
impl Message for Subscribe {
    /// `Ok(None)`: the queue is stopping.
    type Reply = Result<Option<Arc<Link>>, crate::queue::state::ConsumerError>;
}
impl Handler<Subscribe> for QueueActor {
    async fn handle(
        &mut self,
        msg: Subscribe,
        ctx: &mut Context<Self>,
    ) -> Result<Result<Option<Arc<Link>>, crate::queue::state::ConsumerError>, Failure> {
        let Some(me) = ctx.addr() else {
            return Ok(Ok(None));
        };
        // A restarted consumer's earlier registration may still be here (its
        // end is on its way): it must not stand in its own way. (A consumer
        // actor registers once per incarnation; a first incarnation has no
        // earlier one, and is not worth a scan of every consumer.)
        if let Sink::Batch { deliveries, .. } = &msg.sink
            && msg.incarnation.is_some_and(|i| i > 1)
        {
            let actor = deliveries.any().id();
            let stale: Vec<ConsumerId> = self
                .consumers
                .iter()
                .filter(|(_, reg)| {
                    matches!(&reg.sink, Sink::Batch { deliveries, .. } if deliveries.any().id() == actor)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                self.remove(id);
            }
        }
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        let registered = if msg.exclusive {
            // Not while a registration sent without waiting is on its way.
            if self.consumer_count.take_exclusive() {
                let taken = self
                    .state
                    .add_exclusive_consumer(id, msg.mode, msg.prefetch);
                if taken.is_err() {
                    self.consumer_count.release_exclusive();
                }
                taken
            } else {
                Err(ConsumerError::Exclusive(self.consumer_count.count()))
            }
        } else {
            self.state.add_consumer(id, msg.mode, msg.prefetch)
        };
        if let Err(err) = registered {
            // A claimed registration is told (dropping its claim) that it
            // cannot be had; none is refused this way while claims keep
            // exclusive consumers out.
            tracing::debug!(queue = %self.name, %err, "consumer refused");
            return Ok(Err(err));
        }
        let link = Arc::new(Link::new(
            id,
            self.name.clone(),
            crate::queue::delivery::LinkTarget::Local(me),
            msg.mode,
            self.auto_ack_lost.clone(),
        ));
        if let Some(slot) = &msg.slot {
            let _ = slot.set(link.clone());
        }
        if let Some(sink) = msg.sink.any() {
            let watched = sink.clone();
            ctx.watch(&watched, msg.incarnation, move |reason| Unsubscribe {
                consumer: id,
                crashed: match reason {
                    postbox::ExitReason::Failed(failure) => Some((failure, sink.stats().restarts)),
                    _ => None,
                },
            });
        }
        self.consumers.insert(
            id,
            Registered {
                sink: msg.sink,
                link: link.clone(),
                cancelled: false,
                exclusive: msg.exclusive,
            },
        );
        self.count_consumers();
        if let Some(claim) = msg.claim {
            claim.release();
        }
        tracing::debug!(queue = %self.name, consumer = %id, mode = ?msg.mode, prefetch = msg.prefetch, exclusive = msg.exclusive, "consumer registered");
        self.progress(ctx);
        Ok(Ok(Some(link)))
    }
}

/// A marker: answered once everything sent to the queue before it was
/// handled (a consumer waits so for a registration sent on its behalf).
pub(crate) struct Barrier;
impl Message for Barrier {
    type Reply = ();
}
impl Handler<Barrier> for QueueActor {
    async fn handle(&mut self, _: Barrier, _: &mut Context<Self>) -> Result<(), Failure> {
        Ok(())
    }
}

/// End a registration (its unsettled deliveries are requeued): the consumer
/// is stopping, or its watched incarnation ended (`crashed`: with a failure,
/// and the consumer's restarts so far).
pub(crate) struct Unsubscribe {
    pub(crate) consumer: ConsumerId,
    pub(crate) crashed: Option<(Failure, u64)>,
}

impl Unsubscribe {
    /// Ends `consumer`'s registration now.
    pub(crate) fn now(consumer: ConsumerId) -> Self {
        Unsubscribe {
            consumer,
            crashed: None,
        }
    }
}

impl Message for Unsubscribe {
    type Reply = ();
}
impl Handler<Unsubscribe> for QueueActor {
    async fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) -> Result<(), Failure> {
        if let Some((failure, restarts)) = &msg.crashed
            && self.consumers.contains_key(&msg.consumer)
        {
            tracing::warn!(queue = %self.name, consumer = %msg.consumer, %failure, restarts, "consumer crashed: its deliveries are requeued");
            self.observers
                .each(|o| o.consumer_failed(&self.name, msg.consumer, failure, *restarts));
        }
        self.remove(msg.consumer);
        self.progress(ctx);
        Ok(())
    }
}

/// Cancel a registration, as RabbitMQ's `basic.cancel`: no more deliveries;
/// it ends once what it holds is settled. Replies with how many it holds.
pub(crate) struct Cancel(pub(crate) ConsumerId);
impl Message for Cancel {
    type Reply = usize;
}
impl Handler<Cancel> for QueueActor {
    async fn handle(
        &mut self,
        Cancel(id): Cancel,
        ctx: &mut Context<Self>,
    ) -> Result<usize, Failure> {
        let Some(reg) = self.consumers.get_mut(&id) else {
            return Ok(0);
        };
        reg.cancelled = true;
        let held = self.state.cancel_consumer(id).unwrap_or(0);
        tracing::debug!(queue = %self.name, consumer = %id, held, "consumer cancelled");
        self.count_consumers();
        self.finish_if_settled(id);
        self.progress(ctx);
        Ok(held)
    }
}

/// `basic.get`: the head ready message, without a consumer. In manual mode it
/// is held (by a registration of its own) until settled, and requeued if its
/// delivery is dropped unsettled. Replies with it and how many are left ready.
pub(crate) struct Get {
    pub(crate) mode: AckMode,
}
impl Message for Get {
    type Reply = Option<(Delivery, usize)>;
}
impl Handler<Get> for QueueActor {
    async fn handle(
        &mut self,
        msg: Get,
        ctx: &mut Context<Self>,
    ) -> Result<Option<(Delivery, usize)>, Failure> {
        self.state.advance_to(postbox::clock::now_ms());
        // Publishes waiting in the inbox came first.
        self.collect_all();
        self.renew_lease();
        let Some(me) = ctx.addr() else {
            return Ok(None);
        };
        let id = ConsumerId(self.next_consumer);
        self.next_consumer += 1;
        self.state.add_fetcher(id, msg.mode)?;
        let fetched = self.state.fetch(id)?;
        let link = Arc::new(Link::new(
            id,
            self.name.clone(),
            crate::queue::delivery::LinkTarget::Local(me.clone()),
            msg.mode,
            self.auto_ack_lost.clone(),
        ));
        let reply = fetched.map(|d| {
            self.observers
                .each(|o| o.delivered(&self.name, id, d.tag, &d.message));
            let delivery = match msg.mode {
                AckMode::Manual => {
                    link.track([d.tag]);
                    Delivery::fetched(d.message, d.tag, link.clone(), d.loc, me)
                }
                AckMode::Auto => Delivery::new(d.message, d.tag, link.clone(), d.loc),
            };
            (delivery, self.state.ready_len())
        });
        if msg.mode == AckMode::Manual && reply.is_some() {
            self.consumers.insert(
                id,
                Registered {
                    sink: Sink::Fetch,
                    link,
                    cancelled: true,
                    exclusive: false,
                },
            );
        } else {
            let _ = self.state.remove_consumer(id);
        }
        self.progress(ctx);
        Ok(reply)
    }
}

/// Time to check whether an expiring queue has been unused long enough.
struct ExpiryCheck;
impl Message for ExpiryCheck {
    type Reply = ();
}
impl Handler<ExpiryCheck> for QueueActor {
    async fn handle(&mut self, _: ExpiryCheck, ctx: &mut Context<Self>) -> Result<(), Failure> {
        self.expiry_armed = false;
        let Some(expires) = self.expires else {
            return Ok(());
        };
        let unused_since = self.lease.load(Ordering::Relaxed);
        if self.consumer_count.registered() == 0
            && postbox::clock::now_ms() >= unused_since.saturating_add(expires)
        {
            tracing::info!(queue = %self.name, "queue expired: unused for its expiry time");
            self.delete_now(ctx);
        } else {
            self.arm_expiry(ctx);
        }
        Ok(())
    }
}

/// A consumer recorded settlements on its link.
pub(crate) struct Settle(pub(crate) ConsumerId);
impl Message for Settle {
    type Reply = ();
}
impl Handler<Settle> for QueueActor {
    async fn handle(&mut self, Settle(id): Settle, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(reg) = self.consumers.get(&id) else {
            return Ok(());
        };
        let pending = reg.link.drain();
        self.apply(id, pending);
        self.finish_if_settled(id);
        self.state.advance_to(postbox::clock::now_ms());
        self.touch(ctx, 1);
        Ok(())
    }
}

/// Apply every settlement consumers have recorded, write what the queue
/// has not written yet, and reply with the store's confirmation of it.
pub(crate) struct SyncPoint;
impl Message for SyncPoint {
    type Reply = Option<Confirm>;
}
impl Handler<SyncPoint> for QueueActor {
    async fn handle(
        &mut self,
        _: SyncPoint,
        ctx: &mut Context<Self>,
    ) -> Result<Option<Confirm>, Failure> {
        let ids: Vec<ConsumerId> = self.consumers.keys().copied().collect();
        for id in ids {
            if let Some(reg) = self.consumers.get(&id) {
                let pending = reg.link.drain();
                self.apply(id, pending);
                self.finish_if_settled(id);
            }
        }
        self.progress(ctx);
        let Some(durable) = &self.durable else {
            return Ok(None);
        };
        let Ok(append) = durable.store.append() else {
            return Ok(None);
        };
        let (done, confirm) = tokio::sync::oneshot::channel();
        append.finish(Some(done));
        Ok(Some(confirm))
    }
}

/// A delayed hand-off to a full consumer mailbox finished.
struct Handoff {
    consumer: ConsumerId,
    delivered: bool,
}

/// Deliveries waiting for room in a full consumer mailbox. They are held in
/// a [`DeliveryBatch`] (one delivery, for a [`Sink::One`]) until they are in
/// the mailbox, so that auto-ack deliveries dropped on the way (the consumer
/// closed, or the queue stopped and aborted the hand-off) are counted as lost.
enum Pending {
    One(Recipient<Delivery>, DeliveryBatch),
    Batch(Recipient<DeliveryBatch>, DeliveryBatch),
}

impl Pending {
    /// Waits for room; false if the consumer's mailbox closed.
    async fn send(self) -> bool {
        match self {
            Pending::One(r, mut held) => match held.0.pop() {
                Some(d) => match r.send(d).await {
                    Ok(()) => true,
                    Err(postbox::SendError(d)) => {
                        d.lost();
                        false
                    }
                },
                None => true,
            },
            Pending::Batch(r, b) => r.send(b).await.is_ok(),
        }
    }
}
impl Message for Handoff {
    type Reply = ();
}
impl Handler<Handoff> for QueueActor {
    async fn handle(&mut self, msg: Handoff, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(reg) = self.consumers.get(&msg.consumer) else {
            return Ok(());
        };
        let _ = reg;
        if msg.delivered {
            let _ = self.state.set_blocked(msg.consumer, false);
        } else {
            self.remove(msg.consumer);
        }
        self.progress(ctx);
        Ok(())
    }
}

/// Drop every ready message; replies with how many.
pub(crate) struct Purge;
impl Message for Purge {
    type Reply = usize;
}
impl Handler<Purge> for QueueActor {
    async fn handle(&mut self, _: Purge, ctx: &mut Context<Self>) -> Result<usize, Failure> {
        self.progress(ctx);
        let purged = self.state.purge();
        // The room it made lets waiting publishes in (and frees budget).
        self.progressed(ctx);
        Ok(purged)
    }
}

/// Read the counters.
pub(crate) struct Snapshot;
impl Message for Snapshot {
    type Reply = QueueSnapshot;
}
impl Handler<Snapshot> for QueueActor {
    async fn handle(
        &mut self,
        _: Snapshot,
        ctx: &mut Context<Self>,
    ) -> Result<QueueSnapshot, Failure> {
        // Report the state after pending dispatches, not before them.
        self.progress(ctx);
        Ok(self.snapshot())
    }
}

/// Delete the queue, if the conditions hold; replies with the snapshot at deletion
/// or the snapshot that made it refuse.
pub(crate) struct Delete {
    pub(crate) if_unused: bool,
    pub(crate) if_empty: bool,
}
impl Message for Delete {
    type Reply = Result<QueueSnapshot, QueueSnapshot>;
}
impl Handler<Delete> for QueueActor {
    async fn handle(
        &mut self,
        msg: Delete,
        ctx: &mut Context<Self>,
    ) -> Result<Result<QueueSnapshot, QueueSnapshot>, Failure> {
        // Publishes still waiting in the inbox happened before the delete.
        self.state.advance_to(postbox::clock::now_ms());
        self.collect_all();
        self.progressed(ctx);
        let snapshot = self.snapshot();
        if (msg.if_unused && self.consumer_count.registered() > 0)
            || (msg.if_empty && self.state.ready_len() > 0)
        {
            return Ok(Err(snapshot));
        }
        // The point of no return, under the inbox's lock: a publish that got
        // in before is collected and deleted with the queue (and counted in
        // the snapshot); every later one fails.
        if !self
            .inbox
            .shut_unless(Shut::Deleted, |waiting| msg.if_empty && waiting > 0)
        {
            return Ok(Err(self.snapshot()));
        }
        Ok(Ok(self.delete_now(ctx)))
    }
}

#[cfg(test)]
mod tests {
    /// Every queue's task holds its actor inline, and tokio rounds a task up
    /// to 128 bytes: at 824 bytes the task of an idle queue is 1,536 bytes,
    /// eight more took it to 1,664 (measured with valgrind's dhat on the
    /// `--memory-child queues-postbox` bench). State only some queues use
    /// goes behind a box.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_queue_actor_fits_its_task_size() {
        let size = std::mem::size_of::<super::QueueActor>();
        assert!(size <= 824, "QueueActor is {size} bytes");
    }
}
