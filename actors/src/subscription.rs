//! Publish/subscribe: a [`Subscription`] is a queue bound to an exchange with
//! a consumer on it.

use bytestring::ByteString;

use crate::broker::Broker;
use crate::consumer::{ConsumeOptions, Consumer, ConsumerFactory, ConsumerHandle};
use crate::error::BrokerError;
use crate::queue::options::{DeleteOptions, QueueOptions};

/// A running subscription: its queue and its consumer.
///
/// - [`Broker::subscribe`] gives the subscriber a queue of its own, named
///   `sub.<uuid>`, exclusive to it: the queue is deleted when the subscriber
///   stops for good (cancelled, or past its restart limit). A subscriber that
///   crashes and restarts keeps its queue and what was published meanwhile. A
///   late subscriber gets nothing published before it subscribed.
/// - [`Broker::subscribe_durable`] uses a named queue that outlives its
///   consumers, like the `email.user.registered` queue of a classic
///   user-registration fan-out: messages published while the subscriber is away
///   wait for it. Several consumers on one durable subscription share its work.
///
/// ```
/// use postbox::Runtime;
/// use postbox_actors::{Broker, ConsumeOptions, Delivery, Envelope, ExchangeOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = Runtime::new()?;
/// let broker = Broker::new(&rt);
/// broker.declare_exchange("user.events", ExchangeOptions::topic()).await?;
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let welcome = broker
///     .subscribe_durable("user.events", "user.registered", "email.user.registered", ConsumeOptions::auto(), move || {
///         let tx = tx.clone();
///         move |d: Delivery| {
///             let _ = tx.send(d.decode::<String>());
///             async { Ok(()) }
///         }
///     })
///     .await?;
/// let reached = broker.publish_to("user.events", "user.registered", Envelope::encode("ada")?).await?;
/// assert_eq!(reached, 1);
/// assert_eq!(rx.recv().await.unwrap()?, "ada");
/// welcome.cancel().await; // the durable queue stays, and keeps collecting
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Subscription<C: Consumer> {
    broker: Broker,
    queue: ByteString,
    durable: bool,
    consumer: ConsumerHandle<C>,
}

impl<C: Consumer> Subscription<C> {
    /// The subscription's queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// True for a durable (named, shared, persisting) subscription.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The consumer.
    pub fn consumer(&self) -> &ConsumerHandle<C> {
        &self.consumer
    }

    /// Stops receiving. A non-durable subscription's queue is deleted with
    /// whatever it still holds; a durable one keeps its queue and bindings, and
    /// messages keep arriving there for the next consumer.
    pub async fn cancel(self) {
        self.consumer.cancel().await;
        if !self.durable {
            // The queue deletes itself when its owner stops; this makes it
            // synchronous for the caller.
            let _ = self
                .broker
                .delete_queue(&self.queue, DeleteOptions::default())
                .await;
        }
    }
}

impl Broker {
    /// Subscribes to `exchange` with a binding key (a pattern for topic
    /// exchanges; ignored by fanout). The subscriber gets an exclusive queue
    /// that lives as long as it does.
    pub async fn subscribe<C, F>(
        &self,
        exchange: &str,
        key: &str,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<Subscription<C>, BrokerError>
    where
        C: Consumer,
        F: ConsumerFactory<C>,
    {
        let name = format!("sub.{}", uuid::Uuid::new_v4().simple());
        let queue = self.declare_queue(&name, QueueOptions::default()).await?;
        let started = async {
            self.bind_queue(&name, exchange, key).await?;
            let consumer = self.consume(&name, options, factory).await?;
            queue.tie_to(consumer.addr()).await?;
            Ok(consumer)
        };
        match started.await {
            Ok(consumer) => Ok(Subscription {
                broker: self.clone(),
                queue: ByteString::from(name),
                durable: false,
                consumer,
            }),
            Err(err) => {
                let _ = self.delete_queue(&name, DeleteOptions::default()).await;
                Err(err)
            }
        }
    }

    /// Subscribes through the named queue `queue`, declared (if needed) and bound
    /// to `exchange` with `key`. The queue outlives the subscriber; subscribing
    /// again with the same name adds a competing consumer. The queue is
    /// declared durable: on a broker opened on a data directory
    /// ([`Broker::open`]) it keeps its persistent messages across restarts,
    /// and its binding too when the exchange is durable.
    pub async fn subscribe_durable<C, F>(
        &self,
        exchange: &str,
        key: &str,
        queue: &str,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<Subscription<C>, BrokerError>
    where
        C: Consumer,
        F: ConsumerFactory<C>,
    {
        if self.queue(queue).is_err() {
            self.declare_queue(queue, QueueOptions::default().durable())
                .await?;
        }
        self.bind_queue(queue, exchange, key).await?;
        let consumer = self.consume(queue, options, factory).await?;
        Ok(Subscription {
            broker: self.clone(),
            queue: ByteString::from(queue),
            durable: true,
            consumer,
        })
    }
}
