//! Request-reply: [`Ask`], the future returned by [`Addr::ask`], and its
//! [`AskError`].
//!
//! An ask first waits for room in the mailbox (backpressure applies to requests
//! too), then for the reply. `.timeout(d)` bounds both. When the asker gives up,
//! the request is not recalled from the mailbox, but the actor skips it when it
//! reaches the head (its reply channel is closed) and counts it in
//! [`ActorStats::skipped_requests`](crate::ActorStats).

use std::future::{Future, IntoFuture};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::mailbox;

use crate::actor::{Handler, Message};
use crate::addr::Addr;
use crate::envelope::{Envelope, ReplyGuard, Request};
use crate::failure::Failure;

/// Why an ask did not produce a reply.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AskError {
    /// The actor had stopped for good (or stopped before handling the request).
    #[error("the actor's mailbox is closed")]
    Closed,
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The handler failed or panicked while handling this request.
    #[error("the actor failed while handling the request: {0}")]
    Failed(Failure),
}

/// A pending request; `.await` it, optionally after `.timeout(d)`.
#[must_use = "an ask does nothing until awaited"]
pub struct Ask<'a, A: Handler<M>, M: Message> {
    addr: &'a Addr<A>,
    msg: M,
    timeout: Option<Duration>,
}

impl<A: Handler<M>, M: Message> std::fmt::Debug for Ask<'_, A, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ask")
            .field("to", &self.addr.id())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<'a, A: Handler<M>, M: Message> Ask<'a, A, M> {
    pub(crate) fn new(addr: &'a Addr<A>, msg: M) -> Self {
        Ask {
            addr,
            msg,
            timeout: None,
        }
    }

    /// Gives up with [`AskError::Timeout`] after `d` (waiting for mailbox room
    /// included).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
}

/// Sends `msg` as a request into `mailbox` (wrapped by `wrap` into the
/// mailbox's envelope type) once there is room, and waits for the reply.
pub(crate) async fn exchange<E, M: Message>(
    mailbox: &mailbox::Sender<E>,
    msg: M,
    wrap: impl FnOnce(Request<M>) -> E,
) -> Result<M::Reply, AskError> {
    let permit = mailbox.reserve().await.map_err(|_| AskError::Closed)?;
    let (tx, rx) = oneshot::channel();
    permit.send(wrap(Request {
        msg,
        reply: ReplyGuard::new(tx),
    }));
    rx.await.unwrap_or(Err(AskError::Closed))
}

impl<'a, A: Handler<M>, M: Message> IntoFuture for Ask<'a, A, M> {
    type Output = Result<M::Reply, AskError>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        let Ask { addr, msg, timeout } = self;
        let ask = exchange(&addr.tx, msg, |r| -> Envelope<A> { Box::new(r) });
        match timeout {
            None => Box::pin(ask),
            Some(d) => Box::pin(with_timeout(d, ask)),
        }
    }
}

/// `fut`, failing with [`AskError::Timeout`] after `d`. A combinator, not an
/// `async fn`: that would hold `fut` twice (the argument and the timeout it
/// moves into), doubling the boxed ask.
pub(crate) fn with_timeout<T>(
    d: Duration,
    fut: impl Future<Output = Result<T, AskError>>,
) -> impl Future<Output = Result<T, AskError>> {
    futures::FutureExt::map(tokio::time::timeout(d, fut), move |done| {
        done.unwrap_or(Err(AskError::Timeout(d)))
    })
}
