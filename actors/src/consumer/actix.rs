//! Deliveries for an [actix](https://docs.rs/actix) actor (feature `actix`):
//! [`ActixConsumer`] is a [`Consumer`] that hands each delivery, as a
//! message, to an `actix::Recipient<M>` and settles it by the actor's reply.
//!
//! Many services that would embed postbox are actix-web applications with
//! actix actors already. Such an actor consumes a queue as it is: no
//! postbox types in its handlers, and the acknowledgements come from its
//! replies.
//!
//! # How deliveries reach the actor
//!
//! For each delivery the consumer builds the message (decoding the payload
//! with [`ActixConsumer::json`], or with your function given to
//! [`ActixConsumer::new`]), sends it with `Recipient::send(..).await`, and
//! waits for the reply before it takes its next delivery. So the actor's
//! mailbox pushes back: a consumer has one message at a time in the actor,
//! a full actix mailbox makes it wait, and the deliveries waiting behind
//! that one count against its prefetch, so the queue keeps the rest.
//! Several consumers (or a [`ConsumerPool`](crate::ConsumerPool)) on one
//! recipient put that many messages in the actor at once.
//!
//! # How the reply settles the delivery
//!
//! The message's `Result` type implements [`ActorReply`]:
//!
//! | reply | manual ack | auto ack |
//! |---|---|---|
//! | `Ok(_)` of a `Result<T, E>`, or `()` | acknowledged | handled |
//! | `Err(e)` of a `Result<T, E>` (`E: Display`) | the handler fails with `e`: the consumer's [`OnError`](crate::OnError) policy settles it (requeued by default; dead-lettered, retried with backoff, or the consumer restarted) | counted as lost |
//! | an [`Outcome`] | settled as it says (ack, requeue, discard, requeue after a delay) | handled |
//!
//! Two more cases:
//!
//! - **A delivery that cannot be made into a message** (a payload that does
//!   not decode) is rejected without requeue, so it goes to the queue's
//!   dead-letter exchange if it has one, and the handler fails with the
//!   decoding error (counted in [`ConsumerReport::errors`]). Requeued, it
//!   would fail the same way for ever.
//! - **An actor that has stopped** (its mailbox closed) crashes the
//!   consumer, as a panic does: what it holds is requeued for the other
//!   consumers, and it is restarted from its factory with backoff. Restarted
//!   with a recipient of the same stopped actor, it crashes again (with
//!   growing backoff, and shows as crash-looping in its
//!   [report](crate::ConsumerHandle::report)); bound that with
//!   [`ConsumeOptions::restarts`](crate::ConsumeOptions::restarts), or give
//!   a factory that looks up the current actor (`move || ActixConsumer::new(..)`).
//!   Cancel the consumer before stopping its actor.
//!
//! No timeout is put on `send`: an actor that takes long holds its
//! delivery that long (a timed-out message would still be handled by the
//! actor, and then again after a requeue).
//!
//! # Where the actor runs
//!
//! A postbox [`Runtime`](postbox::Runtime) runs its actors (queues, and the
//! consumer actors that host `ActixConsumer`s) on an actix system of its
//! own, on its own threads; the actix actor runs wherever it was started,
//! usually the application's actix system (actix-web's). `Recipient::send`
//! works across threads and systems: the consumer awaits the reply on its
//! arbiter while the actor handles the message on its own. Both can also
//! share one thread: on an actix system's thread,
//! [`RuntimeHandle::local`](postbox::RuntimeHandle::local) runs postbox's
//! actors next to the actix ones (as in the example below).
//!
//! The repository's `examples/actix_web_orders.rs` puts it behind an
//! actix-web endpoint: orders posted over HTTP (503 with `Retry-After` when
//! the queue is full), booked by an actix actor on the web server's system.
//!
//! ```
//! use actix::prelude::*;
//! use postbox_actors::actix::ActixConsumer;
//! use postbox_actors::{Broker, ConsumeOptions, Envelope, OnError, QueueOptions};
//!
//! /// An actor the application already has.
//! #[derive(Default)]
//! struct Billing {
//!     billed: u64,
//! }
//! impl Actor for Billing {
//!     type Context = Context<Self>;
//! }
//!
//! /// Its message, decoded from each delivery's JSON payload.
//! #[derive(serde::Deserialize)]
//! struct Bill {
//!     cents: u64,
//! }
//! impl Message for Bill {
//!     type Result = Result<(), String>; // Ok acks, Err fails the delivery
//! }
//! impl Handler<Bill> for Billing {
//!     type Result = Result<(), String>;
//!     fn handle(&mut self, bill: Bill, _: &mut Context<Self>) -> Self::Result {
//!         if bill.cents == 0 {
//!             return Err("nothing to bill".into());
//!         }
//!         self.billed += bill.cents;
//!         Ok(())
//!     }
//! }
//!
//! struct Total;
//! impl Message for Total {
//!     type Result = u64;
//! }
//! impl Handler<Total> for Billing {
//!     type Result = u64;
//!     fn handle(&mut self, _: Total, _: &mut Context<Self>) -> u64 {
//!         self.billed
//!     }
//! }
//!
//! System::new().block_on(async {
//!     // postbox's actors on this actix system's thread, next to Billing.
//!     let broker = Broker::new(&postbox::RuntimeHandle::local());
//!     broker.declare_queue("bills", QueueOptions::default()).await?;
//!     let billing = Billing::default().start();
//!     // A failed bill is not worth retrying: dead-lettered (here: dropped).
//!     let options = ConsumeOptions::manual(8).on_error(OnError::DeadLetter);
//!     let bills = ActixConsumer::<Bill>::json(billing.clone().recipient());
//!     let consumer = broker.consume("bills", options, bills).await?;
//!     for cents in [250, 0, 100] {
//!         let bill = Envelope::encode(&serde_json::json!({ "cents": cents }))?;
//!         broker.publish("bills", bill).await?;
//!     }
//!     broker.publish("bills", Envelope::new("not a bill")).await?;
//!     let stats = loop {
//!         let stats = broker.queue_stats("bills").await?.stats;
//!         if stats.acknowledged + stats.rejected == 4 {
//!             break stats;
//!         }
//!         actix::clock::sleep(std::time::Duration::from_millis(1)).await;
//!     };
//!     assert_eq!((stats.acknowledged, stats.rejected), (2, 2));
//!     assert_eq!(billing.send(Total).await?, 350);
//!     // The 0 bill, and the one that did not decode:
//!     assert_eq!(consumer.report().errors, 2);
//!     consumer.cancel().await;
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })
//! .unwrap();
//! ```
//!
//! [`ConsumerReport::errors`]: crate::ConsumerReport::errors

use std::fmt;
use std::sync::Arc;

use ::actix::{MailboxError, Message, Recipient};
use postbox::Failure;
use serde::de::DeserializeOwned;

use crate::consumer::{Consumer, ConsumerFactory};
use crate::queue::ack::AckMode;
use crate::queue::delivery::{Delivery, Outcome};

/// How an actix actor's reply settles the delivery it was made from: see
/// the [module](self) for the table.
///
/// - `Ok(_)` of a `Result<T, E>`: acknowledged; `Err(e)`: the delivery
///   failed with `e`, settled by the consumer's [`OnError`](crate::OnError)
///   policy (requeued by default);
/// - `()`: acknowledged;
/// - an [`Outcome`]: settled as it says.
pub trait ActorReply: Send + 'static {
    /// The outcome to settle with (`Ok`), or the handler's failure (`Err`).
    fn into_outcome(self) -> Result<Outcome, Failure>;
}

impl ActorReply for () {
    fn into_outcome(self) -> Result<Outcome, Failure> {
        Ok(Outcome::Ack)
    }
}

impl ActorReply for Outcome {
    fn into_outcome(self) -> Result<Outcome, Failure> {
        Ok(self)
    }
}

impl<T, E> ActorReply for Result<T, E>
where
    T: Send + 'static,
    E: fmt::Display + Send + 'static,
{
    fn into_outcome(self) -> Result<Outcome, Failure> {
        match self {
            Ok(_) => Ok(Outcome::Ack),
            Err(err) => Err(Failure::msg(err.to_string())),
        }
    }
}

type MakeMessage<M> = dyn Fn(&Delivery) -> Result<M, Failure> + Send + Sync;

/// A [`Consumer`] that sends each delivery, as a message `M`, to an actix
/// actor and settles it by the actor's reply (see the [module](self)).
///
/// It is its own factory (each restart gets a clone, sending to the same
/// recipient), so it goes straight to `Broker::consume`:
///
/// ```text
/// let orders = ActixConsumer::<PlaceOrder>::json(addr.recipient());
/// broker.consume("orders", ConsumeOptions::manual(4), orders).await?;
/// ```
pub struct ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    recipient: Recipient<M>,
    message: Arc<MakeMessage<M>>,
}

impl<M> ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: ActorReply,
{
    /// Sends `message(&delivery)` to `recipient` for each delivery. The
    /// function sees the whole delivery (payload, headers, whether it is a
    /// redelivery and its delivery count); an `Err` from it rejects the
    /// delivery without requeue.
    pub fn new(
        recipient: Recipient<M>,
        message: impl Fn(&Delivery) -> Result<M, Failure> + Send + Sync + 'static,
    ) -> Self {
        ActixConsumer {
            recipient,
            message: Arc::new(message),
        }
    }

    /// Sends each delivery's payload, decoded from JSON ([`Envelope::decode`])
    /// as an `M`, to `recipient`; a payload that does not decode is rejected
    /// without requeue.
    ///
    /// [`Envelope::decode`]: crate::Envelope::decode
    pub fn json(recipient: Recipient<M>) -> Self
    where
        M: DeserializeOwned,
    {
        ActixConsumer::new(recipient, |delivery: &Delivery| Ok(delivery.decode::<M>()?))
    }

    /// Where the messages go.
    pub fn recipient(&self) -> &Recipient<M> {
        &self.recipient
    }
}

impl<M> Clone for ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn clone(&self) -> Self {
        ActixConsumer {
            recipient: self.recipient.clone(),
            message: self.message.clone(),
        }
    }
}

impl<M> fmt::Debug for ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActixConsumer")
            .field("message", &std::any::type_name::<M>())
            .field("connected", &self.recipient.connected())
            .finish()
    }
}

impl<M> ConsumerFactory<ActixConsumer<M>> for ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: ActorReply,
{
    fn build(&self) -> ActixConsumer<M> {
        self.clone()
    }
}

impl<M> Consumer for ActixConsumer<M>
where
    M: Message + Send + 'static,
    M::Result: ActorReply,
{
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let manual = delivery.ack_mode() == AckMode::Manual;
        let message = match (self.message)(&delivery) {
            Ok(message) => message,
            Err(failure) => {
                // It would fail the same way every time: not requeued. The
                // `OnError` policy then finds it settled and leaves it so.
                if manual {
                    delivery.reject(false).await?;
                }
                return Err(failure);
            }
        };
        let reply = match self.recipient.send(message).await {
            Ok(reply) => reply,
            Err(MailboxError::Closed) => {
                // The actor is gone: crash, so that what this consumer holds
                // is requeued (for other consumers) and it restarts with
                // backoff instead of failing every delivery at once.
                // `resume_unwind`: a panic without the panic hook's report.
                std::panic::resume_unwind(Box::new(format!(
                    "the actix actor receiving {} has stopped (its mailbox is closed)",
                    std::any::type_name::<M>()
                )))
            }
            Err(MailboxError::Timeout) => {
                return Err(Failure::msg("the actix actor did not reply in time"));
            }
        };
        let outcome = reply.into_outcome()?;
        if manual {
            delivery.settle(outcome, false).await?;
        }
        Ok(())
    }
}
