//! Transactions: settle deliveries (from any number of queues) and publish new
//! messages as one unit. On commit all of it takes effect, on rollback none of
//! it.

use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::broker::Broker;
use crate::broker::{Admitted, Target, deliver_to};
use crate::dedup::SharedWindow;
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::queue::actor::{TxPublish, TxReserve};
use crate::queue::delivery::{AckError, Delivery, Link, LinkState, Outcome, Settler};
use crate::queue::handle::LocalQueue;
use crate::store::{Loc, QueueId};

/// Why a commit was refused. Nothing was published or settled.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TxError {
    /// A settlement was invalid (already settled, consumer gone, auto-ack).
    #[error(transparent)]
    Settle(#[from] AckError),
    /// A publish was invalid (unknown exchange, bad key, too large for a queue
    /// or a stream it reaches).
    #[error(transparent)]
    Publish(#[from] BrokerError),
    /// A publish reaches a queue with reject-publish overflow, which could refuse
    /// it after the rest had committed.
    #[error("queue {0:?} has reject-publish overflow and cannot take part in a transaction")]
    RejectPublishQueue(String),
    /// The commit record could not be stored. Nothing was published; when
    /// the record could not even be written the settlements were undone
    /// too, but when it was written and not synced they took effect in
    /// memory (after a restart, none of the transaction is there).
    #[error("the transaction could not be stored: {0}")]
    Storage(#[from] crate::store::StoreError),
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages published (one per publish call).
    pub published: usize,
    /// Copies enqueued or appended (a publish can reach several queues and
    /// streams, or none).
    pub enqueued: usize,
    /// Deliveries settled (a `multiple` settlement can cover several).
    pub settled: usize,
}

#[derive(Debug)]
struct Settlement {
    settler: Settler,
    multiple: bool,
    outcome: Outcome,
}

#[derive(Debug)]
struct Publication {
    exchange: String,
    routing_key: String,
    message: Envelope,
}

/// A unit of settlements and publishes, started by [`Broker::transaction`].
///
/// This is stronger than RabbitMQ's `tx`, which covers one channel and commits
/// per queue: it is the consume-transform-produce unit of Kafka's transactions.
/// A [`Transaction`] only buffers until [`commit`](Transaction::commit), so a
/// transaction that is rolled back, dropped, or abandoned by a panicking handler
/// leaves no trace: nothing was published and the deliveries stay unsettled (a
/// crashed consumer's deliveries are then requeued as usual).
///
/// Commit validates everything before changing anything: each publish is routed
/// and checked (exchange, key, size against every queue and stream it
/// reaches), then the links of every consumer whose deliveries are settled are
/// locked together and every settlement is checked and recorded under those
/// locks, with all of them undone if one fails. Only then are the messages
/// enqueued and appended, which cannot fail. (A queue or stream deleted in
/// between simply does not get its copy, as with any publish.)
///
/// Streams reached through an exchange get their records at commit, after the
/// settlements are recorded, in publish order. Appending cannot fail, but it
/// can wait: a block-mode stream that is full makes the commit wait for room
/// (as a full queue's mailbox does), and the transaction's messages become
/// visible to subscribers one by one, not at a single instant. A commit that is
/// dropped while it waits has recorded its settlements and published only
/// part of its messages, so await commits to the end. A stream's readers
/// cannot see a rollback: nothing reaches the stream before commit.
///
/// On a broker opened on a data directory, a commit that publishes
/// persistent messages to durable queues, or settles deliveries of them,
/// writes one commit record holding all of those publishes and settlements
/// and waits for it to be stored (per the sync policy) before the messages
/// enter their queues: after a crash, all of a committed transaction is
/// there or none of it. (Two exceptions, documented: an `ack_multiple`
/// records only its own delivery in the commit record, the earlier ones it
/// covers are journaled by their queue as plain acks; and copies for
/// streams and transient queues live in memory as usual.)
///
/// ```
/// use postbox::Runtime;
/// use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, QueueOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::new()?;
/// let broker = Broker::new(&rt);
/// for q in ["orders", "invoices", "shipments"] {
///     broker.declare_queue(q, QueueOptions::default()).await?;
/// }
/// let b = broker.clone();
/// let _billing = broker
///     .consume("orders", ConsumeOptions::manual(8), move || {
///         let b = b.clone();
///         move |order: Delivery| {
///             let b = b.clone();
///             async move {
///                 let mut tx = b.transaction();
///                 tx.publish("invoices", order.message().clone());
///                 tx.publish("shipments", order.message().clone());
///                 tx.ack(&order);
///                 tx.commit().await?; // both publishes and the ack, or nothing
///                 Ok(())
///             }
///         }
///     })
///     .await?;
/// broker.publish("orders", Envelope::new("order 1")).await?;
/// # tokio::time::sleep(std::time::Duration::from_millis(100)).await;
/// # Ok(()) }
/// ```
#[must_use = "a transaction does nothing until committed"]
#[derive(Debug)]
pub struct Transaction {
    broker: Broker,
    settlements: Vec<Settlement>,
    publications: Vec<Publication>,
}

impl Broker {
    /// Starts a transaction.
    pub fn transaction(&self) -> Transaction {
        Transaction {
            broker: self.clone(),
            settlements: Vec::new(),
            publications: Vec::new(),
        }
    }
}

impl Transaction {
    /// Acknowledges `delivery` on commit.
    pub fn ack(&mut self, delivery: &Delivery) -> &mut Self {
        self.settle(delivery.settler(), Outcome::Ack, false)
    }

    /// Acknowledges `delivery` and every earlier one its consumer holds, on commit.
    pub fn ack_multiple(&mut self, delivery: &Delivery) -> &mut Self {
        self.settle(delivery.settler(), Outcome::Ack, true)
    }

    /// Nacks `delivery` on commit (requeued, or discarded/dead-lettered).
    pub fn nack(&mut self, delivery: &Delivery, requeue: bool) -> &mut Self {
        let outcome = if requeue {
            Outcome::Requeue
        } else {
            Outcome::Discard
        };
        self.settle(delivery.settler(), outcome, false)
    }

    /// Settles through a [`Settler`] on commit.
    pub fn settle(&mut self, settler: Settler, outcome: Outcome, multiple: bool) -> &mut Self {
        self.settlements.push(Settlement {
            settler,
            multiple,
            outcome,
        });
        self
    }

    /// Publishes to a queue (through the default exchange) on commit.
    pub fn publish(&mut self, queue: &str, message: Envelope) -> &mut Self {
        self.publish_to("", queue, message)
    }

    /// Publishes through an exchange on commit.
    pub fn publish_to(
        &mut self,
        exchange: &str,
        routing_key: &str,
        message: Envelope,
    ) -> &mut Self {
        self.publications.push(Publication {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            message,
        });
        self
    }

    /// Whether nothing has been added.
    pub fn is_empty(&self) -> bool {
        self.settlements.is_empty() && self.publications.is_empty()
    }

    /// Applies everything, or nothing (see [`Transaction`]).
    pub async fn commit(self) -> Result<Committed, TxError> {
        // RabbitMQ's transactions are per channel and do not span a
        // consumer's channel and a publisher's: not offered there.
        if self.broker.backend() == crate::broker::Backend::RabbitMq {
            return Err(TxError::Publish(BrokerError::Unsupported {
                operation: "transactions",
                backend: "rabbitmq",
            }));
        }
        // 1. Route and check every publish; nothing has changed yet.
        // Duplicate windows admit the ids now; if the commit then fails,
        // they are forgotten.
        let mut windows = Admissions::default();
        let mut logging = Vec::new();
        let mut routed: Vec<(SmallVec<[Target; 16]>, Envelope)> =
            Vec::with_capacity(self.publications.len());
        for p in self.publications {
            let message = p
                .message
                .with_routing_key(p.routing_key.clone())
                .with_exchange(p.exchange.clone());
            let route = self
                .broker
                .route_targets(&p.exchange, &p.routing_key, &message)?;
            let mut targets = route.targets;
            for target in &targets {
                target.check(&message)?;
                if let Some(queue) = target.queue().filter(|q| q.confirm) {
                    return Err(TxError::RejectPublishQueue(queue.name().to_string()));
                }
            }
            let id = message.id();
            if let Some(window) = route.dedup {
                // A duplicate at the exchange fails the commit.
                window.admit(id).map_err(BrokerError::from)?;
                windows.0.push((window, id));
            }
            // A duplicate at a queue leaves that queue out, as a publish does.
            targets.retain(|target| {
                let Some(queue) = target.queue() else {
                    return true;
                };
                let Some(window) = queue.dedup.clone() else {
                    return true;
                };
                match queue.admit(&window, &message) {
                    Ok(logged) => {
                        windows.0.push((window, id));
                        logging.extend(logged);
                        true
                    }
                    Err(_) => false,
                }
            });
            routed.push((targets, message));
        }
        // The ids durable queues' windows log are stored before the commit.
        for confirm in logging {
            crate::store::confirmed(Some(confirm))
                .await
                .map_err(TxError::Storage)?;
        }
        // 2. On a broker with storage, persistent messages for durable queues
        // get their positions now and are stored with the settlements as one
        // record (see `Staged`).
        let staged = match self.broker.store() {
            Some(_) => Staged::reserve(&mut routed).await,
            None => Staged::default(),
        };
        // 3. Record every settlement under the locks of all the links
        // involved, and write the commit record before they are released.
        let store = self.broker.store();
        let (settled, notify, stored) = settle_all(&self.settlements, |settled_locs| {
            let Some(store) = store.filter(|_| !staged.is_empty() || !settled_locs.is_empty())
            else {
                return Ok(None);
            };
            let mut append = store.append()?;
            let locs = append.atomic(&staged.records(), settled_locs);
            let (done, confirm) = tokio::sync::oneshot::channel();
            append.finish(Some(done));
            Ok(Some((locs, confirm)))
        })?;
        let locs = match stored {
            Some((locs, confirm)) => {
                crate::queue::handle::LocalQueue::confirmed(Some(confirm))
                    .await
                    .map_err(|err| match err {
                        BrokerError::Storage(err) => TxError::Storage(err),
                        other => TxError::Publish(other),
                    })?;
                locs
            }
            None => Vec::new(),
        };
        // 4. Enqueue and append: cannot fail now (a full block-mode stream
        // makes this wait, see the module docs).
        // Committed: the ids stay in their windows.
        windows.0.clear();
        let published = routed.len();
        let mut enqueued = staged.publish(locs).await;
        for (targets, message) in routed {
            if !targets.is_empty() {
                let targets: SmallVec<[Admitted; 16]> = targets.into_iter().map(Admitted).collect();
                enqueued += deliver_to(&targets, message).await.unwrap_or(0);
            }
        }
        for link in notify {
            link.notify().await;
        }
        Ok(Committed {
            published,
            enqueued,
            settled,
        })
    }

    /// Abandons the transaction: nothing is published. With `requeue`, the
    /// deliveries it would have settled are requeued now; without, they stay
    /// unsettled with their consumers.
    pub async fn rollback(self, requeue: bool) {
        if !requeue {
            return;
        }
        for s in self.settlements {
            // Requeue what is still held; what was settled meanwhile stays settled.
            let _ = s.settler.settle(Outcome::Requeue, s.multiple).await;
        }
    }
}

/// Records all settlements atomically: every involved link is locked (in
/// address order, so concurrent transactions cannot deadlock), every claim is
/// applied, and if one fails every link is restored. Then, still under the
/// locks, `store` is given the stored locations of the messages that leave
/// their queues (acked or discarded), to write the commit record: no queue
/// can see (and journal) a settlement before that record is in the log.
/// If `store` fails, every link is restored too. Returns the number of
/// deliveries settled, the links whose queues must be told, and what `store`
/// returned.
fn settle_all<R>(
    settlements: &[Settlement],
    store: impl FnOnce(&[Loc]) -> Result<R, TxError>,
) -> Result<(usize, Vec<Arc<Link>>, R), TxError> {
    let mut links: BTreeMap<usize, Arc<Link>> = BTreeMap::new();
    for s in settlements {
        links.insert(
            Arc::as_ptr(&s.settler.link) as usize,
            s.settler.link.clone(),
        );
    }
    let mut guards: BTreeMap<usize, parking_lot::MutexGuard<'_, LinkState>> =
        links.iter().map(|(k, link)| (*k, link.lock())).collect();
    let snapshots: BTreeMap<usize, LinkState> =
        guards.iter().map(|(k, g)| (*k, (**g).clone())).collect();
    let mut settled = 0;
    let mut notify = Vec::new();
    let mut leaving = Vec::new();
    let restore = |guards: &mut BTreeMap<usize, parking_lot::MutexGuard<'_, LinkState>>| {
        for (k, guard) in guards.iter_mut() {
            if let Some(snapshot) = snapshots.get(k) {
                **guard = snapshot.clone();
            }
        }
    };
    for s in settlements {
        let key = Arc::as_ptr(&s.settler.link) as usize;
        let Some(state) = guards.get_mut(&key) else {
            continue;
        };
        match s
            .settler
            .link
            .claim_locked(state, s.settler.tag, s.multiple, s.outcome)
        {
            Ok((n, first)) => {
                settled += n;
                if first {
                    notify.push(s.settler.link.clone());
                }
                // (With `multiple`, the earlier deliveries' locations are not
                // known here: their settlements are journaled by the queue.)
                if s.settler.loc != 0 && matches!(s.outcome, Outcome::Ack | Outcome::Discard) {
                    leaving.push(Loc::unpack(s.settler.loc));
                }
            }
            Err(err) => {
                restore(&mut guards);
                return Err(err.into());
            }
        }
    }
    match store(&leaving) {
        Ok(stored) => Ok((settled, notify, stored)),
        Err(err) => {
            restore(&mut guards);
            Err(err)
        }
    }
}

/// A transaction's persistent messages for durable queues: each has its
/// position reserved in its queue, is written in the commit record, and
/// enters its queue once that record is stored. (Other copies are delivered
/// as any publish is, after the commit.)
#[derive(Default)]
struct Staged {
    queues: Vec<StagedQueue>,
}

struct StagedQueue {
    handle: Arc<LocalQueue>,
    id: QueueId,
    /// `(seq, expires_at, message)`.
    messages: Vec<(u64, u64, Envelope)>,
}

/// The ids a commit's publishes were admitted with by duplicate windows:
/// forgotten again unless the commit goes through (then it clears them).
#[derive(Default)]
struct Admissions(Vec<(Arc<SharedWindow>, crate::envelope::MessageId)>);

impl Drop for Admissions {
    fn drop(&mut self) {
        for (window, id) in self.0.drain(..) {
            window.forget(id);
        }
    }
}

impl Staged {
    /// Takes the copies for durable queues out of `routed` and reserves
    /// their positions. A queue that turns out not to persist keeps its
    /// copies in `routed`.
    async fn reserve(routed: &mut [(SmallVec<[Target; 16]>, Envelope)]) -> Staged {
        let mut wanted: Vec<(Arc<LocalQueue>, Vec<Envelope>)> = Vec::new();
        for (targets, message) in routed.iter_mut() {
            if !message.persistent() {
                continue;
            }
            targets.retain(|target| {
                let Target::Queue(queue) = target else {
                    return true;
                };
                if !queue.durable {
                    return true;
                }
                let id = queue.addr.id();
                match wanted.iter_mut().find(|(q, _)| q.addr.id() == id) {
                    Some((_, messages)) => messages.push(message.clone()),
                    None => wanted.push((queue.clone(), vec![message.clone()])),
                }
                false
            });
        }
        let mut staged = Staged::default();
        for (handle, messages) in wanted {
            match handle.addr.ask(TxReserve(messages.clone())).await {
                Ok(Some((id, reserved))) => staged.queues.push(StagedQueue {
                    handle,
                    id,
                    messages: reserved
                        .into_iter()
                        .zip(messages)
                        .map(|((seq, expires_at), m)| (seq, expires_at, m))
                        .collect(),
                }),
                // Not persisting after all, or gone: delivered as usual.
                _ => {
                    for message in messages {
                        if let Some((targets, _)) =
                            routed.iter_mut().find(|(_, m)| m.id() == message.id())
                        {
                            targets.push(Target::Queue(handle.clone()));
                        }
                    }
                }
            }
        }
        staged
    }

    fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The publish records of the commit record, in order.
    fn records(&self) -> Vec<(QueueId, u64, u64, &Envelope)> {
        self.queues
            .iter()
            .flat_map(|q| {
                q.messages
                    .iter()
                    .map(|(seq, expires_at, m)| (q.id, *seq, *expires_at, m))
            })
            .collect()
    }

    /// Hands each queue its messages, stored at `locs` (in the order of
    /// [`records`](Self::records)); returns how many were handed over.
    async fn publish(self, locs: Vec<Loc>) -> usize {
        let mut locs = locs.into_iter();
        let mut enqueued = 0;
        for q in self.queues {
            let messages: Vec<(u64, u64, Envelope, Loc)> = q
                .messages
                .into_iter()
                .zip(locs.by_ref())
                .map(|((seq, expires_at, m), loc)| (seq, expires_at, m, loc))
                .collect();
            let n = messages.len();
            // A queue deleted meanwhile does not get them (nor would it
            // after a restart: its records are dead).
            if q.handle.addr.ask(TxPublish(messages)).await.is_ok() {
                enqueued += n;
            }
        }
        enqueued
    }
}
