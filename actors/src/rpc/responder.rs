//! The answering side: [`Respond`] for what users write, [`Responder`] for the
//! consumer that runs it.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postbox::Failure;

use super::direct::DirectReplies;
use super::{DEADLINE_HEADER, ERROR_HEADER};
use crate::broker::Broker;
use crate::consumer::{ConsumeOptions, Consumer, ConsumerHandle};
use crate::envelope::{Envelope, HeaderValue};
use crate::error::BrokerError;
use crate::queue::ack::AckMode;
use crate::queue::delivery::Delivery;

/// An error to send back to the requester, who gets
/// [`RequestError::Remote`](super::RequestError::Remote): a message, and
/// optionally structured details (any serializable value, sent as JSON).
///
/// ```
/// use postbox_actors::rpc::RemoteError;
/// #[derive(serde::Serialize)]
/// struct Invalid { field: &'static str }
/// let err = RemoteError::new("invalid order").with_details(&Invalid { field: "qty" })?;
/// assert_eq!(err.message(), "invalid order");
/// # Ok::<(), postbox_actors::CodecError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    message: String,
    details: Option<bytes::Bytes>,
}

impl RemoteError {
    /// A remote error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        RemoteError {
            message: message.into(),
            details: None,
        }
    }

    /// Adds structured details, encoded as JSON; the requester decodes them
    /// with [`RequestError::details`](super::RequestError::details).
    pub fn with_details<T: serde::Serialize + ?Sized>(
        mut self,
        details: &T,
    ) -> Result<Self, crate::codec::CodecError> {
        self.details = Some(
            serde_json::to_vec(details)
                .map_err(|e| crate::codec::CodecError::Encode(e.to_string()))?
                .into(),
        );
        Ok(self)
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The reply that carries this error back.
    pub(crate) fn into_reply(self) -> Envelope {
        let reply = Envelope::new(self.details.clone().unwrap_or_default())
            .with_header(ERROR_HEADER, self.message);
        match self.details {
            Some(_) => reply
                .with_header(ERROR_DETAILS_HEADER, true)
                .with_content_type("application/json"),
            None => reply,
        }
    }
}

impl From<crate::codec::CodecError> for RemoteError {
    fn from(err: crate::codec::CodecError) -> Self {
        RemoteError::new(err.to_string())
    }
}

/// Header marking a remote error's reply as carrying details (its payload).
pub(crate) const ERROR_DETAILS_HEADER: &str = "x-error-details";

/// A request as a handler sees it: the message (it derefs to the [`Envelope`])
/// and its deadline.
#[derive(Clone, Debug)]
pub struct Request {
    message: Envelope,
    deadline_ms: Option<u64>,
}

impl Deref for Request {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.message
    }
}

impl Request {
    /// The request message.
    pub fn message(&self) -> &Envelope {
        &self.message
    }

    /// The requester's deadline, in epoch milliseconds on [`postbox::clock`].
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// Time left before the requester gives up; `None` if it set no deadline.
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline_ms.map(postbox::clock::until)
    }
}

fn deadline_of(message: &Envelope) -> Option<u64> {
    match message.header(DEADLINE_HEADER) {
        Some(HeaderValue::Int(ms)) => u64::try_from(*ms).ok(),
        _ => None,
    }
}

/// What a responder does with a request: return the reply, or an error for the
/// requester. Closures `FnMut(Request) -> impl Future<Output = Result<Envelope, RemoteError>>`
/// are responders too. A panic fails the responder like any consumer: in
/// manual-ack mode the request is redelivered.
pub trait Respond: 'static {
    /// Answers one request.
    fn respond(&mut self, request: Request) -> impl Future<Output = Result<Envelope, RemoteError>>;
}

impl<F, Fut> Respond for F
where
    F: FnMut(Request) -> Fut + 'static,
    Fut: Future<Output = Result<Envelope, RemoteError>>,
{
    fn respond(&mut self, request: Request) -> impl Future<Output = Result<Envelope, RemoteError>> {
        self(request)
    }
}

/// Counters of a responder, over all its restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponderStats {
    /// Requests answered with a reply.
    pub replied: u64,
    /// Requests answered with a remote error.
    pub errors: u64,
    /// Requests skipped because their deadline had passed.
    pub expired: u64,
    /// Requests without `reply_to`, discarded.
    pub malformed: u64,
    /// Replies whose reply queue no longer existed.
    pub undeliverable: u64,
}

#[derive(Default)]
struct Counters {
    replied: AtomicU64,
    errors: AtomicU64,
    expired: AtomicU64,
    malformed: AtomicU64,
    undeliverable: AtomicU64,
}

/// The consumer that runs a [`Respond`]: checks the deadline, calls it, sends
/// the reply (or the error) to `reply_to` with the request's correlation id,
/// then acknowledges the request (manual mode), so a crash before the reply
/// means redelivery.
pub struct Responder<R: Respond> {
    inner: R,
    broker: Broker,
    /// The broker's requesters that take direct replies.
    direct: Arc<DirectReplies>,
    counters: Arc<Counters>,
}

impl<R: Respond> std::fmt::Debug for Responder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").finish_non_exhaustive()
    }
}

impl<R: Respond> Consumer for Responder<R> {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let manual = delivery.ack_mode() == AckMode::Manual;
        let Some(reply_to) = delivery.reply_to().map(str::to_owned) else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(message_id = %delivery.id(), "request without reply_to discarded");
            if manual {
                delivery.reject(false).await?;
            }
            return Ok(());
        };
        let request = Request {
            deadline_ms: deadline_of(&delivery),
            message: delivery.message().clone(),
        };
        if request.time_left() == Some(Duration::ZERO) {
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                correlation_id = delivery.correlation_id(),
                "expired request skipped"
            );
            if manual {
                delivery.ack().await?;
            }
            return Ok(());
        }
        let reply = match self.inner.respond(request).await {
            Ok(reply) => {
                self.counters.replied.fetch_add(1, Ordering::Relaxed);
                reply
            }
            Err(err) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                err.into_reply()
            }
        };
        let reply = match delivery.correlation_id() {
            Some(cid) => reply.with_correlation_id(cid.to_owned()),
            None => reply,
        };
        if let Some(requester) = self.direct.find(&reply_to) {
            tracing::trace!(
                correlation_id = reply.correlation_id(),
                reply_to,
                "direct reply"
            );
            requester.deliver(reply).await;
        } else {
            self.publish_reply(&reply_to, reply).await;
        }
        if manual {
            delivery.ack().await?;
        }
        Ok(())
    }
}

impl<R: Respond> Responder<R> {
    /// Publishes a reply to its requester's reply queue.
    async fn publish_reply(&self, reply_to: &str, reply: Envelope) {
        match self.broker.publish_to("", reply_to, reply).await {
            Ok(0) => {
                self.counters.undeliverable.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(err) => {
                self.counters.undeliverable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, reply_to, "reply not sent");
            }
        }
    }
}

/// A running responder.
pub struct ResponderHandle<R: Respond> {
    consumer: ConsumerHandle<Responder<R>>,
    counters: Arc<Counters>,
}

impl<R: Respond> std::fmt::Debug for ResponderHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponderHandle")
            .field("consumer", &self.consumer)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<R: Respond> ResponderHandle<R> {
    /// Its counters.
    pub fn stats(&self) -> ResponderStats {
        let c = &self.counters;
        ResponderStats {
            replied: c.replied.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            undeliverable: c.undeliverable.load(Ordering::Relaxed),
        }
    }

    /// The underlying consumer.
    pub fn consumer(&self) -> &ConsumerHandle<Responder<R>> {
        &self.consumer
    }

    /// Stops answering (gracefully, see [`ConsumerHandle::cancel`]).
    pub async fn cancel(self) {
        self.consumer.cancel().await;
    }
}

impl Broker {
    /// Starts a supervised responder on `queue`: each request is answered by a
    /// [`Respond`] built by `factory` (and rebuilt after a crash).
    pub async fn respond<R, F>(
        &self,
        queue: &str,
        options: ConsumeOptions,
        factory: F,
    ) -> Result<ResponderHandle<R>, BrokerError>
    where
        R: Respond,
        F: Fn() -> R + Send + Sync + 'static,
    {
        let counters = Arc::new(Counters::default());
        let (broker, c) = (self.clone(), counters.clone());
        let consumer = self
            .consume(queue, options, move || Responder {
                inner: factory(),
                direct: broker.extension::<DirectReplies>(),
                broker: broker.clone(),
                counters: c.clone(),
            })
            .await?;
        Ok(ResponderHandle { consumer, counters })
    }
}
