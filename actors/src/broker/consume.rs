//! Consuming through the broker: [`Broker::consume`] starts a supervised
//! consumer on a queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::broker::Broker;
use crate::consumer::{
    ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle, Registration, Shared,
};
use crate::error::BrokerError;
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
        let addr = self
            .inner
            .runtime
            .build(move || {
                Some(ConsumerActor::new(
                    child_queue.clone(),
                    &child_options,
                    factory.build(),
                    Arc::clone(&child_shared),
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
        // Registration happens in `started`, before any message is handled.
        match addr.ask(Registration).await {
            Ok(Some(_)) => Ok(ConsumerHandle {
                queue: handle.name().into(),
                addr,
                shared,
            }),
            _ => {
                addr.stop();
                self.alive()?;
                if let Some(refused) = shared.refused.lock().take() {
                    return Err(refused);
                }
                Err(handle.gone())
            }
        }
    }
}
