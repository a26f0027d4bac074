//! Transactions: settle deliveries (from any number of queues) and publish new
//! messages as one unit. On commit all of it takes effect, on rollback none of
//! it.

use std::collections::BTreeMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::broker::Broker;
use crate::broker::{Target, deliver_to};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::queue::delivery::{AckError, Delivery, Link, LinkState, Outcome, Settler};

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
        // 1. Route and check every publish; nothing has changed yet.
        let mut routed: Vec<(SmallVec<[Target; 16]>, Envelope)> =
            Vec::with_capacity(self.publications.len());
        for p in self.publications {
            let message = p
                .message
                .with_routing_key(p.routing_key.clone())
                .with_exchange(p.exchange.clone());
            let targets = self
                .broker
                .route_targets(&p.exchange, &p.routing_key, &message)?
                .targets;
            for target in &targets {
                target.check(&message)?;
                if let Some(queue) = target.queue().filter(|q| q.confirm) {
                    return Err(TxError::RejectPublishQueue(queue.name().to_string()));
                }
            }
            routed.push((targets, message));
        }
        // 2. Record every settlement under the locks of all the links involved.
        let (settled, notify) = settle_all(&self.settlements)?;
        // 3. Enqueue and append: cannot fail now (a full block-mode stream
        // makes this wait, see the module docs).
        let published = routed.len();
        let mut enqueued = 0;
        for (targets, message) in routed {
            if !targets.is_empty() {
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
/// applied, and if one fails every link is restored. Returns the number of
/// deliveries settled and the links whose queues must be told.
fn settle_all(settlements: &[Settlement]) -> Result<(usize, Vec<Arc<Link>>), TxError> {
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
            }
            Err(err) => {
                for (k, guard) in guards.iter_mut() {
                    if let Some(snapshot) = snapshots.get(k) {
                        **guard = snapshot.clone();
                    }
                }
                return Err(err.into());
            }
        }
    }
    Ok((settled, notify))
}
