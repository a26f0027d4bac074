//! What travels through a mailbox: a type-erased [`Handle`] per message, for
//! one-way sends ([`Tell`]) and for requests that carry a reply channel
//! ([`Request`]).
//!
//! A request whose asker already gave up (timed out, or dropped its future) is
//! recognised by its closed reply channel and skipped at dequeue time instead of
//! being executed.

use futures::future::LocalBoxFuture;
use tokio::sync::oneshot;

use crate::actor::{Actor, Handler, Message};
use crate::ask::AskError;
use crate::context::Context;
use crate::failure::Failure;

/// One queued message, with its type erased so that an actor's mailbox can hold
/// every message type it handles.
pub(crate) trait Handle<A: Actor>: Send {
    /// True when nobody waits for this message's outcome any more.
    fn cancelled(&self) -> bool {
        false
    }

    /// Runs the actor's handler for this message.
    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut Context<A>,
    ) -> LocalBoxFuture<'a, Result<(), Failure>>;
}

pub(crate) type Envelope<A> = Box<dyn Handle<A>>;

/// A one-way message.
pub(crate) struct Tell<M>(pub(crate) M);

impl<A: Handler<M>, M: Message> Handle<A> for Tell<M> {
    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut Context<A>,
    ) -> LocalBoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move { actor.handle(self.0, ctx).await.map(|_| ()) })
    }
}

/// A request: the message plus the channel its reply goes back on.
pub(crate) struct Request<M: Message> {
    pub(crate) msg: M,
    pub(crate) reply: ReplyGuard<M::Reply>,
}

impl<A: Handler<M>, M: Message> Handle<A> for Request<M> {
    fn cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut Context<A>,
    ) -> LocalBoxFuture<'a, Result<(), Failure>> {
        let Request { msg, mut reply } = *self;
        Box::pin(async move { reply.answer(actor.handle(msg, ctx).await) })
    }
}

/// A reply channel that always answers: if it is dropped unanswered, the asker
/// learns why instead of getting a bare "channel closed": dropped while a
/// handler panics, the actor failed; dropped otherwise (the request was
/// dropped unhandled, or its handler was dropped mid-way because the runtime
/// shut down), the actor is gone.
pub(crate) struct ReplyGuard<R> {
    tx: Option<oneshot::Sender<Result<R, AskError>>>,
}

impl<R> ReplyGuard<R> {
    pub(crate) fn new(tx: oneshot::Sender<Result<R, AskError>>) -> Self {
        ReplyGuard { tx: Some(tx) }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(|tx| tx.is_closed())
    }

    /// Sends the handler's outcome to the asker, and hands a failure on to
    /// the cell (it fails the actor).
    pub(crate) fn answer(&mut self, outcome: Result<R, Failure>) -> Result<(), Failure> {
        match outcome {
            Ok(value) => {
                self.send(Ok(value));
                Ok(())
            }
            Err(failure) => {
                self.send(Err(AskError::Failed(failure.clone())));
                Err(failure)
            }
        }
    }

    fn send(&mut self, value: Result<R, AskError>) {
        if let Some(tx) = self.tx.take() {
            // The asker may have timed out meanwhile; its reply is then discarded.
            let _ = tx.send(value);
        }
    }
}

impl<R> Drop for ReplyGuard<R> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let err = if std::thread::panicking() {
                AskError::Failed(Failure::with_kind(
                    crate::FailureKind::Panic,
                    "the actor panicked while handling the request",
                ))
            } else {
                AskError::Closed
            };
            let _ = tx.send(Err(err));
        }
    }
}
