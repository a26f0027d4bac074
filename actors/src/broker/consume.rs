//! Consuming through the broker: [`Broker::consume`] starts a supervised
//! consumer on a queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::broker::Broker;
use crate::consumer::{
    ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle, Shared,
};
use crate::error::BrokerError;
use crate::queue::delivery::LinkSlot;
use crate::supervision::Kept;

impl Broker {
    /// Starts a consumer on `queue`. `factory` builds the consumer, and builds
    /// it again after each crash (the consumer restarts itself, as its
    /// [`ConsumeOptions`] say). Returns once it is registered.
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
        let child_options = options.clone();
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
                    &child_options,
                    factory.build(),
                    Arc::clone(&child_shared),
                    child_slot.clone(),
                ))
            })
            .mailbox(options.mailbox_capacity())
            .name(format!("consumer:{queue}:{n}"))
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
        // The first incarnation is registered from here while it starts:
        // a round trip to the queue, not one to the consumer and another
        // from it to the queue. (Restarted incarnations register themselves.)
        let subscription = ConsumerActor::subscription(
            &addr,
            options.mode,
            options.prefetch,
            options.exclusive,
            1,
            Some(slot),
        );
        match handle.subscribe_as(subscription).await {
            Ok(_) => Ok(ConsumerHandle {
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
