//! The traits users implement: [`Actor`] for state and lifecycle, [`Message`] for
//! what can be sent, [`Handler`] for what an actor does with it.
//!
//! Handlers are `async fn`s with `&mut self`: an actor processes one message at a
//! time, to completion, even across `.await`s, so its state never needs a lock.
//! Actors live on one arbiter thread for their whole life, so neither the actor
//! nor its handler futures need to be `Send`; only messages and replies cross
//! threads.
//!
//! ```
//! use postbox::{Actor, Context, Failure, Handler, Message};
//!
//! #[derive(Default)]
//! struct Counter { n: u64 }
//! impl Actor for Counter {}
//!
//! struct Add(u64);
//! impl Message for Add { type Reply = u64; }
//!
//! impl Handler<Add> for Counter {
//!     async fn handle(&mut self, msg: Add, _ctx: &mut Context<Self>) -> Result<u64, Failure> {
//!         self.n += msg.0;
//!         Ok(self.n)
//!     }
//! }
//! ```

use std::future::Future;

use crate::context::Context;
use crate::failure::Failure;

/// An actor: state plus lifecycle hooks. Messages are handled by [`Handler`] impls.
pub trait Actor: Sized + 'static {
    /// Called when an incarnation starts, before it handles any message. An error
    /// fails the incarnation like a failing handler does.
    fn started(&mut self, ctx: &mut Context<Self>) -> impl Future<Output = Result<(), Failure>> {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Called after a message is handled when no other message is waiting. An
    /// actor that coalesces work (a queue dispatching many publishes at once) does
    /// it here, so that it batches under load and stays prompt when idle. An error
    /// fails the incarnation like a failing handler does.
    fn drained(&mut self, ctx: &mut Context<Self>) -> impl Future<Output = Result<(), Failure>> {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Called when an incarnation ends for any reason, including after a failure
    /// (a panic inside `stopped` is caught and logged).
    fn stopped(&mut self, ctx: &mut Context<Self>) -> impl Future<Output = ()> {
        let _ = ctx;
        async {}
    }
}

/// A message: anything `Send` with a reply type (use `()` for one-way messages).
pub trait Message: Send + 'static {
    /// What the handler returns to an `ask`.
    type Reply: Send + 'static;
}

/// Handling of message `M` by actor `Self`.
///
/// Returning `Err` fails the actor: it is stopped, and restarted with fresh state
/// if a supervisor says so. An `ask` that caused the failure gets
/// [`AskError::Failed`](crate::AskError::Failed).
pub trait Handler<M: Message>: Actor {
    /// Handles one message.
    fn handle(
        &mut self,
        msg: M,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Result<M::Reply, Failure>>;
}
