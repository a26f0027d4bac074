//! Consuming through the broker: [`Broker::consume`] starts a supervised
//! consumer on a queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use postbox::{ChildSpec, Restart};

use crate::broker::Broker;
use crate::consumer::{
    ConsumeOptions, Consumer, ConsumerActor, ConsumerFactory, ConsumerHandle, Registration, Shared,
};
use crate::error::BrokerError;

impl Broker {
    /// Starts a supervised consumer on `queue`. `factory` builds the consumer, and
    /// builds it again after each crash. Returns once it is registered.
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
        let name = format!("consumer:{queue}:{n}");
        let mailbox = options.mailbox_capacity();
        let child_options = options.clone();
        let child_queue = handle.clone();
        let shared = Arc::new(Shared::default());
        let child_shared = shared.clone();
        let child = ChildSpec::new("consumer", move || {
            ConsumerActor::new(
                child_queue.clone(),
                &child_options,
                factory.build(),
                Arc::clone(&child_shared),
            )
        })
        .restart(Restart::Transient)
        .mailbox(mailbox);
        let supervisor = options
            .supervision
            .spec(name)
            .child(child)
            .spawn(&self.inner.runtime);
        let id = supervisor.addr().id();
        self.inner.live.lock().insert(id, supervisor.clone());
        let broker = Arc::downgrade(&self.inner);
        let abandoned = shared.clone();
        supervisor.addr().any().on_exit(Some(u64::MAX), move |_| {
            abandoned.abandon();
            if let Some(inner) = broker.upgrade() {
                inner.live.lock().remove(&id);
            }
        });
        let addr = supervisor
            .child::<ConsumerActor<C>>("consumer")
            .await
            .map_err(|_| BrokerError::Stopped)?;
        // Registration happens in `started`, before any message is handled.
        match addr.ask(Registration).await {
            Ok(Some(_)) => Ok(ConsumerHandle {
                queue: handle.name.clone(),
                addr,
                supervisor,
                shared,
            }),
            _ => {
                supervisor.stop();
                self.alive()?;
                Err(handle.gone())
            }
        }
    }
}
