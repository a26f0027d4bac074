//! [`QueueHandle`]: direct, typed access to one queue, for publishers and
//! consumers that should not pay a name lookup per message.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytestring::ByteString;
use postbox::{Addr, AnyAddr, Recipient, TrySendError};

use crate::delivery::Delivery;
use crate::envelope::Envelope;
use crate::error::{BrokerError, TryPublishError};
use crate::queue::actor::{
    Publish, PublishBatch, PublishConfirmed, QueueActor, QueueSnapshot, Sink, Snapshot, Subscribe,
    TieTo, Unsubscribe,
};
use crate::queue::state::{AckMode, ConsumerId};

/// A handle to one queue; cheap to clone. Obtained from
/// [`Broker::declare_queue`](crate::Broker::declare_queue) or
/// [`Broker::queue`](crate::Broker::queue).
#[derive(Clone, Debug)]
pub struct QueueHandle {
    pub(crate) name: ByteString,
    pub(crate) addr: Addr<QueueActor>,
    pub(crate) max_message_bytes: usize,
    /// Kept up to date by the queue actor, for checks that must not wait on it.
    pub(crate) consumers: Arc<AtomicUsize>,
    /// Publishes must wait for the queue's answer (reject-publish overflow).
    pub(crate) confirm: bool,
}

impl QueueHandle {
    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many consumers are registered right now (read without asking the queue).
    pub fn consumer_count(&self) -> usize {
        self.consumers.load(Ordering::Relaxed)
    }

    pub(crate) fn check(&self, message: &Envelope) -> Result<(), BrokerError> {
        if message.size() > self.max_message_bytes {
            return Err(BrokerError::MessageTooLarge {
                queue: self.name.to_string(),
                size: message.size(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }

    fn gone(&self) -> BrokerError {
        BrokerError::QueueNotFound(self.name.to_string())
    }

    /// Enqueues a message, waiting while the queue's mailbox is full. A queue
    /// with reject-publish overflow is asked, and a full one answers
    /// [`BrokerError::QueueFull`].
    pub async fn publish(&self, message: Envelope) -> Result<(), BrokerError> {
        self.check(&message)?;
        if self.confirm {
            return match self.addr.ask(PublishConfirmed(message)).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(BrokerError::QueueFull(self.name.to_string())),
                Err(_) => Err(self.gone()),
            };
        }
        self.addr
            .send(Publish(message))
            .await
            .map_err(|_| self.gone())
    }

    /// Enqueues several messages in order, as one mailbox message.
    pub async fn publish_batch(&self, messages: Vec<Envelope>) -> Result<(), BrokerError> {
        for message in &messages {
            self.check(message)?;
        }
        self.addr
            .send(PublishBatch(messages))
            .await
            .map_err(|_| self.gone())
    }

    /// Enqueues a message if the queue's mailbox has room now.
    pub fn try_publish(&self, message: Envelope) -> Result<(), TryPublishError> {
        self.check(&message)?;
        match self.addr.try_send(Publish(message)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Publish(message))) => Err(TryPublishError::Full {
                queue: self.name.to_string(),
                message: Box::new(message),
            }),
            Err(TrySendError::Closed(_)) => Err(self.gone().into()),
        }
    }

    /// Counters and consumers.
    pub async fn snapshot(&self) -> Result<QueueSnapshot, BrokerError> {
        self.addr.ask(Snapshot).await.map_err(|_| self.gone())
    }

    /// Registers any actor that handles [`Delivery`] as a consumer. The
    /// registration ends when that actor's current incarnation ends, or with
    /// [`unsubscribe`](Self::unsubscribe); its unsettled deliveries are then
    /// requeued.
    pub async fn subscribe(
        &self,
        sink: Recipient<Delivery>,
        mode: AckMode,
        prefetch: u32,
    ) -> Result<ConsumerId, BrokerError> {
        self.subscribe_as(Sink::One(sink), mode, prefetch, None)
            .await
            .map(|link| link.consumer)
    }

    pub(crate) async fn subscribe_as(
        &self,
        sink: Sink,
        mode: AckMode,
        prefetch: u32,
        incarnation: Option<u64>,
    ) -> Result<Arc<crate::delivery::Link>, BrokerError> {
        let subscribe = Subscribe {
            sink,
            mode,
            prefetch,
            incarnation,
        };
        self.addr
            .ask(subscribe)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| self.gone())
    }

    /// Ties the queue's life to an actor: when that actor stops for good, the
    /// queue deletes itself (an exclusive queue, as subscriptions use).
    pub async fn tie_to(&self, owner: AnyAddr) -> Result<(), BrokerError> {
        self.addr.send(TieTo(owner)).await.map_err(|_| self.gone())
    }

    /// Ends a registration; its unsettled deliveries are requeued.
    pub async fn unsubscribe(&self, consumer: ConsumerId) -> Result<(), BrokerError> {
        self.addr
            .send(Unsubscribe(consumer))
            .await
            .map_err(|_| self.gone())
    }
}
