//! Consuming through the broker: [`Broker::consume`] starts a supervised
//! consumer on a queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::broker::Broker;
use crate::consumer::{
    ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle, Shared, Terms,
};
use crate::error::BrokerError;
use crate::queue::delivery::LinkSlot;
use crate::supervision::Kept;

impl Broker {
    /// Starts a consumer on `queue`. `factory` builds the consumer, and builds
    /// it again after each crash (the consumer restarts itself, as its
    /// [`ConsumeOptions`] say).
    ///
    /// On an embedded queue it returns without waiting for the queue: the
    /// registration is in the queue's mailbox, ahead of anything sent to it
    /// later, and it already counts in
    /// [`QueueHandle::consumer_count`](crate::QueueHandle::consumer_count)
    /// (so a request to a responder started this way finds it). An
    /// exclusive consumer, a consumer of a queue an exclusive one holds, and
    /// a consumer on RabbitMQ wait for the queue's answer. If an embedded
    /// queue goes away before it takes the registration, the consumer is
    /// cancelled as by a deletion.
    #[doc(alias = "basic_consume")]
    pub async fn consume<C, F>(
        &self,
        queue: &str,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<ConsumerHandle<C>, BrokerError>
    where
        C: Consumer,
        F: ConsumerFactory<C>,
    {
        self.alive()?;
        let handle = self.queue(queue)?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let child_queue = handle.clone();
        let terms = Terms::from(&options);
        let shared = Arc::new(Shared::default());
        let child_shared = shared.clone();
        let slot = LinkSlot::default();
        let child_slot = slot.clone();
        let addr = self
            .inner
            .runtime
            .build(move || {
                Some(ConsumerActor::new(
                    child_queue.clone(),
                    terms,
                    factory.build(),
                    Arc::clone(&child_shared),
                    child_slot.clone(),
                ))
            })
            .mailbox(options.mailbox_capacity())
            .name(crate::name::actor_name(format_args!(
                "consumer:{queue}:{n}"
            )))
            .supervise(options.supervision.strategy())
            .spawn();
        let id = addr.id();
        self.inner.live.lock().insert(id, Kept::new(&addr));
        let broker = Arc::downgrade(&self.inner);
        let abandoned = shared.clone();
        addr.any().on_exit(Some(u64::MAX), move |_| {
            abandoned.abandon();
            if let Some(inner) = broker.upgrade() {
                inner.live.lock().remove(&id);
            }
        });
        // The first incarnation is registered from here while it starts
        // (restarted incarnations register themselves). Sent without
        // waiting where a claim allows it (see `crate::queue::consumers`);
        // otherwise one round trip to the queue.
        let mut subscription = ConsumerActor::subscription(&addr, terms, 1, Some(slot));
        subscription.claim = handle.claim(&subscription);
        let registered = if subscription.claim.is_some() {
            handle.subscribe_claimed(subscription).await
        } else {
            handle.subscribe_as(subscription).await.map(drop)
        };
        match registered {
            Ok(()) => Ok(ConsumerHandle {
                queue: handle.name().into(),
                addr,
                shared,
            }),
            Err(err) => {
                shared.cancelled.store(true, Ordering::Release);
                addr.stop();
                self.alive()?;
                match err {
                    BrokerError::ExclusiveConsumer { .. } => {
                        tracing::warn!(queue = %handle.name(), %err, "consumer refused");
                        Err(err)
                    }
                    _ => Err(handle.gone()),
                }
            }
        }
    }
}
