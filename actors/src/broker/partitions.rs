//! Partitioned queues: N queues, each with a single active consumer, and a
//! publisher that sends each message to the partition of its key (Kafka's
//! hash, see [`crate::partition`]). One key's messages stay in one queue, in
//! order, handled by one consumer at a time; different keys proceed in
//! parallel. A crashed partition consumer's unsettled deliveries go back to
//! their places and reach the next consumer of that partition first.

use crate::broker::Broker;
use crate::consumer::{ConsumeOptions, Consumer, ConsumerFactory, ConsumerHandle};
use crate::envelope::Envelope;
use crate::error::BrokerError;
use crate::partition::{PartitionKey, Sequencer, kafka_partition};
use crate::queue::handle::QueueHandle;
use crate::queue::options::QueueOptions;

/// How a partitioned queue is declared; see [`Broker::declare_partitioned`].
///
/// ```
/// use postbox_actors::{PartitionOptions, QueueOptions};
/// use postbox_actors::partition::PartitionKey;
/// let by_user = PartitionOptions::new(4)
///     .key(PartitionKey::Header("user-id".into()))
///     .queue(QueueOptions::default().durable());
/// # let _ = by_user;
/// ```
#[derive(Clone, Debug)]
pub struct PartitionOptions {
    partitions: u32,
    key: PartitionKey,
    queue: QueueOptions,
    sequence: bool,
}

impl PartitionOptions {
    /// `partitions` partitions (at least 1, else the declaration fails),
    /// keyed by the routing key, with default queue options.
    pub fn new(partitions: u32) -> Self {
        PartitionOptions {
            partitions,
            key: PartitionKey::RoutingKey,
            queue: QueueOptions::default(),
            sequence: false,
        }
    }

    /// Numbers each key's messages (1, 2, 3... in
    /// [`SEQUENCE_HEADER`](crate::partition::SEQUENCE_HEADER)) as they are
    /// published through this handle and its clones, so that consumers can
    /// tell a gap or a reorder ([`SequenceCheck`](crate::partition::SequenceCheck)).
    pub fn sequence(mut self) -> Self {
        self.sequence = true;
        self
    }

    /// Where the key comes from (default: the routing key).
    pub fn key(mut self, key: PartitionKey) -> Self {
        self.key = key;
        self
    }

    /// The options of each partition's queue (a single active consumer is
    /// always on).
    pub fn queue(mut self, options: QueueOptions) -> Self {
        self.queue = options;
        self
    }
}

/// A partitioned queue: its partitions' queues, `name.0` to `name.{n-1}`,
/// and the routing of messages to them by key.
#[derive(Clone, Debug)]
pub struct Partitioned {
    name: String,
    key: PartitionKey,
    queues: Vec<QueueHandle>,
    sequencer: Option<Sequencer>,
}

impl Broker {
    /// Declares a partitioned queue: `options`' partition count of queues
    /// named `name.0`, `name.1`..., each with a single active consumer (or
    /// checks the existing ones, as [`declare_queue`](Self::declare_queue)).
    /// Partitions are durable if the queue options are. Fails with
    /// [`BrokerError::NoPartitions`] for 0 partitions.
    ///
    /// ```
    /// use postbox_actors::{Broker, Envelope, PartitionOptions};
    /// # postbox::testkit::run(async {
    /// # let broker = Broker::new(&postbox::RuntimeHandle::local());
    /// let events = broker.declare_partitioned("events", PartitionOptions::new(4)).await?;
    /// let p = events.publish(Envelope::new("created").with_routing_key("user-7")).await?;
    /// assert_eq!(p, events.publish(Envelope::new("paid").with_routing_key("user-7")).await?);
    /// assert_eq!(events.queue(p).unwrap().snapshot().await?.stats.ready, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn declare_partitioned(
        &self,
        name: &str,
        options: PartitionOptions,
    ) -> Result<Partitioned, BrokerError> {
        if options.partitions == 0 {
            return Err(BrokerError::NoPartitions(name.to_string()));
        }
        let queue = options.queue.single_active_consumer();
        let mut queues = Vec::with_capacity(options.partitions as usize);
        for i in 0..options.partitions {
            queues.push(
                self.declare_queue(&format!("{name}.{i}"), queue.clone())
                    .await?,
            );
        }
        Ok(Partitioned {
            name: name.to_string(),
            key: options.key,
            queues,
            sequencer: options.sequence.then(Sequencer::default),
        })
    }
}

impl Partitioned {
    /// Its name (the partitions are `name.0`...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many partitions it has.
    pub fn partitions(&self) -> u32 {
        // At most u32::MAX queues were declared.
        self.queues.len() as u32
    }

    /// The partition `message` goes to. Fails with
    /// [`BrokerError::NoPartitionKey`] if it has no key.
    pub fn partition_of(&self, message: &Envelope) -> Result<u32, BrokerError> {
        Ok(kafka_partition(&self.key_of(message)?, self.partitions()))
    }

    fn key_of(&self, message: &Envelope) -> Result<Vec<u8>, BrokerError> {
        self.key
            .of(message)
            .ok_or_else(|| BrokerError::NoPartitionKey {
                queue: self.name.clone(),
                message_id: message.id(),
            })
    }

    /// Publishes `message` to its key's partition (numbered within its key,
    /// with [`PartitionOptions::sequence`]); returns the partition.
    pub async fn publish(&self, message: Envelope) -> Result<u32, BrokerError> {
        let key = self.key_of(&message)?;
        let partition = kafka_partition(&key, self.partitions());
        let message = match &self.sequencer {
            Some(sequencer) => sequencer.stamp(&key, message),
            None => message,
        };
        self.queues[partition as usize].publish(message).await?;
        Ok(partition)
    }

    /// Partition `partition`'s queue.
    pub fn queue(&self, partition: u32) -> Option<&QueueHandle> {
        self.queues.get(partition as usize)
    }

    /// Every partition's queue, in partition order.
    pub fn queues(&self) -> &[QueueHandle] {
        &self.queues
    }

    /// Starts one consumer on each partition (built by `factory`). The first
    /// consumer of a partition is its active one; calling this again (in
    /// this process or for another group of workers) adds standbys that take
    /// over, partition by partition, in the order they registered.
    pub async fn consume<C, F>(
        &self,
        broker: &Broker,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<Vec<ConsumerHandle<C>>, BrokerError>
    where
        C: Consumer,
        F: ConsumerFactory<C> + Clone,
    {
        let mut consumers = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            consumers.push(
                broker
                    .consume(queue.name(), options.clone(), factory.clone())
                    .await?,
            );
        }
        Ok(consumers)
    }
}
