//! The asking side: [`Requester`], its reply queue and router, and the ways to
//! wait for replies.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use parking_lot::Mutex;
use postbox::{Failure, Recipient};
use tokio::sync::{mpsc, oneshot};

use super::direct::{DirectReplies, DirectSink};
use super::{DEADLINE_HEADER, ERROR_HEADER};
#[cfg(feature = "amqp")]
use crate::amqp::Sent;
use crate::broker::{Broker, deliver_to};
use crate::consumer::{ConsumeOptions, Consumer, ConsumerHandle};
use crate::envelope::{Envelope, HeaderValue};
use crate::error::BrokerError;
use crate::queue::delivery::Delivery;
use crate::queue::handle::LocalQueue;
use crate::queue::options::QueueOptions;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A queue, by name (through the default exchange).
    Queue(String),
    /// An exchange with a routing key.
    Exchange {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
}

impl Target {
    /// An exchange and routing key.
    pub fn exchange(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Target::Exchange {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }
}

impl From<&str> for Target {
    fn from(queue: &str) -> Self {
        Target::Queue(queue.to_string())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Queue(q) => write!(f, "queue {q:?}"),
            Target::Exchange {
                exchange,
                routing_key,
            } => write!(f, "exchange {exchange:?} key {routing_key:?}"),
        }
    }
}

/// A request's correlation id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub ByteString);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request got no reply.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// No reply within the timeout.
    #[error("request {correlation_id} got no reply within {after:?}")]
    Timeout {
        /// The request's correlation id.
        correlation_id: String,
        /// The timeout.
        after: Duration,
    },
    /// Nobody can answer: no queue, or no consumer on any queue the request reaches.
    #[error("no responders for {target}")]
    NoResponders {
        /// Where the request was sent.
        target: String,
    },
    /// The responder answered with an error.
    #[error("request {correlation_id} failed remotely: {message}")]
    Remote {
        /// The request's correlation id.
        correlation_id: String,
        /// The responder's error message.
        message: String,
        /// Its structured details, JSON-encoded, if it gave any (see
        /// [`RequestError::details`]).
        details: Option<bytes::Bytes>,
    },
    /// The request carried a correlation id of its own that a request of this
    /// requester still waiting for its reply already uses.
    #[error("correlation id {0:?} is already in use by a request waiting for its reply")]
    DuplicateCorrelationId(String),
    /// The request could not be published.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The requester's reply router has stopped.
    #[error("the requester has stopped")]
    Closed,
}

impl RequestError {
    /// The structured details of a remote error, decoded: `None` if this is
    /// not a remote error or it carries none.
    pub fn details<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Option<Result<T, crate::codec::CodecError>> {
        match self {
            RequestError::Remote {
                details: Some(details),
                ..
            } => Some(
                serde_json::from_slice(details)
                    .map_err(|e| crate::codec::CodecError::Decode(e.to_string())),
            ),
            _ => None,
        }
    }
}

/// Counters of a requester.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequesterStats {
    /// Requests waiting for a reply now.
    pub pending: usize,
    /// Replies received for a waiting request.
    pub replies: u64,
    /// Replies that came after their request had timed out or been abandoned.
    pub late: u64,
}

/// What a callback actor receives for a request sent with
/// [`RequestBuilder::send_to`].
#[derive(Debug)]
pub struct ReplyEvent {
    /// The request's correlation id.
    pub id: RequestId,
    /// The reply, or why there is none.
    pub result: Result<Envelope, RequestError>,
}

impl postbox::Message for ReplyEvent {
    type Reply = ();
}

enum Waiter {
    One(oneshot::Sender<Envelope>),
    Many(mpsc::UnboundedSender<Envelope>),
}

/// How many late correlation ids a requester remembers.
const LATE_KEPT: usize = 1024;

#[derive(Default)]
pub(crate) struct Pending {
    waiting: HashMap<ByteString, Waiter>,
    replies: u64,
    late: u64,
    recent_late: VecDeque<String>,
}

impl Pending {
    /// Routes one reply to its waiter; hands it back when nobody waits for it
    /// any more (a late reply, recorded as such).
    pub(crate) fn route(&mut self, reply: Envelope) -> Option<Envelope> {
        let cid = ByteString::from(reply.correlation_id().unwrap_or_default());
        let reply = match self.waiting.get(&cid) {
            Some(Waiter::Many(tx)) => match tx.send(reply) {
                Ok(()) => None,
                Err(mpsc::error::SendError(reply)) => Some(reply),
            },
            Some(Waiter::One(_)) => match self.waiting.remove(&cid) {
                Some(Waiter::One(tx)) => tx.send(reply).err(),
                _ => Some(reply),
            },
            None => Some(reply),
        };
        match reply {
            None => {
                self.replies += 1;
                None
            }
            Some(reply) => {
                self.waiting.remove(&cid);
                self.late(cid.to_string());
                Some(reply)
            }
        }
    }

    fn late(&mut self, cid: String) {
        self.late += 1;
        tracing::warn!(correlation_id = %cid, "late reply: its requester stopped waiting");
        if self.recent_late.len() == LATE_KEPT {
            self.recent_late.pop_front();
        }
        self.recent_late.push_back(cid);
    }
}

struct Inner {
    broker: Broker,
    reply_queue: ByteString,
    pending: Arc<Mutex<Pending>>,
    /// Consumes the reply queue (embedded).
    router: Option<ConsumerHandle<ReplyRouter>>,
    /// The requester's channel on RabbitMQ, which takes its direct replies.
    #[cfg(feature = "amqp")]
    remote: Option<crate::amqp::Replies>,
    /// Registered with the broker while this requester lives, if it takes
    /// direct replies.
    direct: Option<Arc<DirectSink>>,
    /// Lets go of every waiter when the runtime shuts down, so that no
    /// request waits out its timeout for a reply that cannot come.
    _shutdown: postbox::ShutdownHook,
}

/// Consumes a requester's reply queue and hands each reply to its waiter.
pub(crate) struct ReplyRouter {
    pending: Arc<Mutex<Pending>>,
    late_replies: Option<(Broker, String, String)>,
}

impl Consumer for ReplyRouter {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let late = self.pending.lock().route(delivery.into_message());
        if let Some(reply) = late {
            forward_late(self.late_replies.as_ref(), reply).await;
        }
        Ok(())
    }
}

/// The dead-letter path for replies nobody waits for any more, if the
/// requester was given one.
pub(crate) async fn forward_late(to: Option<&(Broker, String, String)>, reply: Envelope) {
    if let Some((broker, exchange, key)) = to {
        let reply = reply.with_header(LATE_HEADER, true);
        if let Err(err) = broker.publish_to(exchange, key, reply).await {
            tracing::warn!(%err, exchange, "late reply not forwarded");
        }
    }
}

/// Header set on late replies forwarded by [`RequesterOptions::late_replies_to`].
pub const LATE_HEADER: &str = "x-late-reply";

/// How a [`Requester`] is set up.
#[derive(Clone, Debug, Default)]
pub struct RequesterOptions {
    late_replies: Option<(String, String)>,
    direct: bool,
}

impl RequesterOptions {
    /// Lets responders of this broker hand replies straight to the waiting
    /// request instead of publishing them to the reply queue (RabbitMQ's direct
    /// reply-to): two hops fewer per round trip. Such replies are not seen by
    /// the reply queue's counters or the broker's observers. See
    /// [`rpc`](crate::rpc)'s docs.
    pub fn direct_replies(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Publishes replies that arrive after their request gave up to `exchange`
    /// with `routing_key` (`""` and a queue name: straight to that queue),
    /// flagged with the `x-late-reply` header, besides counting them.
    pub fn late_replies_to(
        mut self,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.late_replies = Some((exchange.into(), routing_key.into()));
        self
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.direct.is_some() {
            self.broker
                .extension::<DirectReplies>()
                .unregister(&self.reply_queue);
        }
        // The reply queue is tied to the router: stopping it deletes the queue.
        if let Some(router) = &self.router {
            router.addr.stop();
        }
    }
}

/// A request-reply client: one exclusive reply queue, any number of requests in
/// flight. Cheap to clone; the reply queue goes away with the last clone.
#[derive(Clone)]
pub struct Requester {
    inner: Arc<Inner>,
}

impl fmt::Debug for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Requester")
            .field("reply_queue", &self.inner.reply_queue)
            .finish()
    }
}

impl Broker {
    /// A new request-reply client with its own reply queue.
    pub async fn requester(&self) -> Result<Requester, BrokerError> {
        self.requester_with(RequesterOptions::default()).await
    }

    /// A new request-reply client, configured.
    pub async fn requester_with(
        &self,
        options: RequesterOptions,
    ) -> Result<Requester, BrokerError> {
        #[cfg(feature = "amqp")]
        if let Some(remote) = self.remote() {
            return self.remote_requester(remote, options).await;
        }
        let name = format!("reply.{}", uuid::Uuid::new_v4().simple());
        let queue = self.declare_queue(&name, QueueOptions::default()).await?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let p = pending.clone();
        let late_replies = options
            .late_replies
            .map(|(ex, key)| (self.clone(), ex, key));
        let routed_late = late_replies.clone();
        let router = self
            .consume(&name, ConsumeOptions::auto(), move || ReplyRouter {
                pending: p.clone(),
                late_replies: routed_late.clone(),
            })
            .await?;
        queue.tie_to(router.addr()).await?;
        let reply_queue = ByteString::from(name);
        let direct = options.direct.then(|| {
            let sink = Arc::new(DirectSink {
                pending: pending.clone(),
                late_replies,
            });
            self.extension::<DirectReplies>()
                .register(reply_queue.clone(), &sink);
            sink
        });
        let shutdown = self.release_on_shutdown(&pending);
        Ok(Requester {
            inner: Arc::new(Inner {
                broker: self.clone(),
                reply_queue,
                pending,
                router: Some(router),
                #[cfg(feature = "amqp")]
                remote: None,
                direct,
                _shutdown: shutdown,
            }),
        })
    }
}

impl Broker {
    /// Lets go of `pending`'s waiters when the runtime shuts down, so that
    /// no request waits out its timeout for a reply that cannot come.
    fn release_on_shutdown(&self, pending: &Arc<Mutex<Pending>>) -> postbox::ShutdownHook {
        let waiters = Arc::downgrade(pending);
        self.runtime().on_shutdown(move || {
            if let Some(pending) = waiters.upgrade() {
                pending.lock().waiting.clear();
            }
        })
    }
}

#[cfg(feature = "amqp")]
impl Broker {
    /// A requester on RabbitMQ: its channel consumes direct reply-to, and
    /// replies are routed by correlation id as embedded.
    async fn remote_requester(
        &self,
        remote: &Arc<crate::amqp::Remote>,
        options: RequesterOptions,
    ) -> Result<Requester, BrokerError> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let late_replies = options
            .late_replies
            .map(|(ex, key)| (self.clone(), ex, key));
        let p = pending.clone();
        let route: crate::amqp::Route = Arc::new(move |reply| {
            let late = p.lock().route(reply);
            if let (Some(reply), Some(to)) = (late, late_replies.clone()) {
                tokio::spawn(async move { forward_late(Some(&to), reply).await });
            }
        });
        let replies = crate::amqp::Replies::open(remote, route).await?;
        let shutdown = self.release_on_shutdown(&pending);
        Ok(Requester {
            inner: Arc::new(Inner {
                broker: self.clone(),
                reply_queue: ByteString::from_static(crate::amqp::REPLY_TO),
                pending,
                router: None,
                remote: Some(replies),
                direct: None,
                _shutdown: shutdown,
            }),
        })
    }
}

impl Requester {
    /// The name of this client's reply queue.
    pub fn reply_queue(&self) -> &str {
        &self.inner.reply_queue
    }

    /// Starts a request to `target` (a queue name, or [`Target::exchange`]).
    pub fn request(&self, target: impl Into<Target>, message: Envelope) -> RequestBuilder<'_> {
        RequestBuilder {
            requester: self,
            target: target.into(),
            message,
            timeout: DEFAULT_TIMEOUT,
            fail_fast: true,
        }
    }

    /// Counters.
    pub fn stats(&self) -> RequesterStats {
        let p = self.inner.pending.lock();
        RequesterStats {
            pending: p.waiting.len(),
            replies: p.replies,
            late: p.late,
        }
    }

    /// Correlation ids of the most recent late replies (up to 1024), oldest first.
    pub fn late_replies(&self) -> Vec<String> {
        self.inner
            .pending
            .lock()
            .recent_late
            .iter()
            .cloned()
            .collect()
    }

    /// Whether the runtime shut down (and the waiters were let go).
    fn stopped(&self) -> bool {
        self.inner.broker.runtime().is_shut_down()
    }

    fn forget(&self, id: &RequestId) {
        self.inner.pending.lock().waiting.remove(&id.0);
    }

    /// Routes and publishes a request; registers `waiter` under its correlation id first.
    ///
    /// On RabbitMQ, `confirmed` waits for the request's confirm before
    /// returning; otherwise the confirm is returned, to race against the
    /// reply (which says the request arrived: one wait fewer per round trip).
    async fn publish(
        &self,
        target: &Target,
        message: Envelope,
        timeout: Duration,
        fail_fast: bool,
        waiter: Waiter,
        confirmed: bool,
    ) -> Result<(RequestId, Option<Confirming>), RequestError> {
        let (exchange, key) = match target {
            Target::Queue(q) => ("", q.as_str()),
            Target::Exchange {
                exchange,
                routing_key,
            } => (exchange.as_str(), routing_key.as_str()),
        };
        let no_responders = || RequestError::NoResponders {
            target: target.to_string(),
        };
        let targets: Vec<LocalQueue> = match self.remote() {
            // RabbitMQ routes it; a queue's consumers are checked first
            // (an exchange's targets are unknown here: an unroutable request
            // comes back instead).
            Some(replies) => {
                if fail_fast && exchange.is_empty() && !replies.answerable(key).await {
                    return Err(no_responders());
                }
                Vec::new()
            }
            None => {
                let broker = &self.inner.broker;
                let targets = broker.route_queues(exchange, key, &message)?;
                let answerable = targets.iter().any(|q| q.consumer_count() > 0);
                if targets.is_empty() || (fail_fast && !answerable) {
                    return Err(no_responders());
                }
                targets
            }
        };
        // The caller's own correlation id is kept; requests without one get
        // a fresh one.
        let id = match message.correlation_id() {
            Some(own) => RequestId(ByteString::from(own)),
            None => RequestId(ByteString::from(uuid::Uuid::new_v4().simple().to_string())),
        };
        let deadline = postbox::clock::after(timeout);
        let message = message
            .with_routing_key(key.to_string())
            .with_reply_to(self.inner.reply_queue.clone())
            .with_correlation_id(id.0.clone())
            .with_header(
                DEADLINE_HEADER,
                HeaderValue::Int(i64::try_from(deadline).unwrap_or(i64::MAX)),
            );
        {
            let mut pending = self.inner.pending.lock();
            if pending.waiting.contains_key(&id.0) {
                return Err(RequestError::DuplicateCorrelationId(id.0.to_string()));
            }
            pending.waiting.insert(id.0.clone(), waiter);
        }
        tracing::debug!(correlation_id = %id, %target, ?timeout, "request");
        let sent = match self.remote() {
            Some(replies) => match replies.publish(exchange, key, &message).await {
                Ok(confirm) => {
                    let target = target.to_string();
                    let confirm: Confirming = Box::pin(async move {
                        match confirm.await {
                            Ok(Sent::Routed) => Ok(()),
                            Ok(Sent::Unroutable) => Err(RequestError::NoResponders { target }),
                            Err(err) => Err(err.into()),
                        }
                    });
                    if confirmed {
                        confirm.await.map(|()| None)
                    } else {
                        Ok(Some(confirm))
                    }
                }
                Err(err) => Err(err.into()),
            },
            None => deliver_to(&targets, message)
                .await
                .map(|_| None)
                .map_err(Into::into),
        };
        match sent {
            Ok(confirm) => Ok((id, confirm)),
            Err(err) => {
                self.forget(&id);
                Err(err)
            }
        }
    }

    /// The requester's channel on RabbitMQ, for a broker connected to it.
    #[cfg(feature = "amqp")]
    fn remote(&self) -> Option<&crate::amqp::Replies> {
        self.inner.remote.as_ref()
    }

    /// Never remote without feature `amqp`.
    #[cfg(not(feature = "amqp"))]
    fn remote(&self) -> Option<&Never> {
        None
    }
}

/// Without feature `amqp`, the remote path's types do not exist: this
/// stands in for them (no value of it can be made).
#[cfg(not(feature = "amqp"))]
enum Never {}

#[cfg(not(feature = "amqp"))]
impl Never {
    async fn answerable(&self, _: &str) -> bool {
        match *self {}
    }

    async fn publish(
        &self,
        _: &str,
        _: &str,
        _: &Envelope,
    ) -> Result<futures::future::Ready<Result<Sent, BrokerError>>, BrokerError> {
        match *self {}
    }
}

#[cfg(not(feature = "amqp"))]
#[expect(dead_code, reason = "only RabbitMQ's requesters send through `Never`")]
enum Sent {
    Routed,
    Unroutable,
}

/// How long a request on RabbitMQ waits for its reply before it also
/// listens for its confirm.
const CONFIRM_GRACE: Duration = Duration::from_millis(5);

/// What RabbitMQ says of a request it was sent (its confirm): an error if
/// it reached no queue or a full one.
type Confirming = Pin<Box<dyn Future<Output = Result<(), RequestError>> + Send>>;

/// Default time a request waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn into_result(id: &RequestId, reply: Envelope) -> Result<Envelope, RequestError> {
    let message = match reply.header(ERROR_HEADER) {
        None => return Ok(reply),
        Some(HeaderValue::Str(message)) => message.to_string(),
        Some(other) => format!("{other:?}"),
    };
    let details = reply
        .header(super::responder::ERROR_DETAILS_HEADER)
        .is_some()
        .then(|| reply.payload().clone());
    Err(RequestError::Remote {
        correlation_id: id.to_string(),
        message,
        details,
    })
}

/// A request being prepared; `.await` it, or [`send`](Self::send) it.
#[must_use = "a request does nothing until awaited or sent"]
#[derive(Debug)]
pub struct RequestBuilder<'a> {
    requester: &'a Requester,
    target: Target,
    message: Envelope,
    timeout: Duration,
    fail_fast: bool,
}

impl<'a> RequestBuilder<'a> {
    /// Publish even if no consumer is on the target queue right now, and wait
    /// out the timeout for one to appear. (By default such a request fails at
    /// once with [`RequestError::NoResponders`]. A target that routes to no
    /// queue at all always fails at once.)
    pub fn wait_for_responders(mut self) -> Self {
        self.fail_fast = false;
        self
    }

    /// How long to wait for the reply (default 30 s). It also becomes the
    /// request's deadline, which responders see.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publishes the request and returns at once with a handle to its reply.
    pub async fn send(self) -> Result<PendingReply, RequestError> {
        self.start(true).await
    }

    /// Publishes the request; the handle races its confirm, if not
    /// `confirmed` first, against the reply.
    async fn start(self, confirmed: bool) -> Result<PendingReply, RequestError> {
        let (tx, rx) = oneshot::channel();
        let (id, confirm) = self
            .requester
            .publish(
                &self.target,
                self.message,
                self.timeout,
                self.fail_fast,
                Waiter::One(tx),
                confirmed,
            )
            .await?;
        Ok(PendingReply {
            id,
            rx,
            confirm,
            deadline: postbox::clock::deadline(self.timeout),
            timeout: self.timeout,
            requester: self.requester.clone(),
        })
    }

    /// Publishes the request; `callback` receives a [`ReplyEvent`] with the reply
    /// or the timeout. Must be called within a tokio runtime.
    pub async fn send_to(self, callback: Recipient<ReplyEvent>) -> Result<RequestId, RequestError> {
        let pending = self.send().await?;
        let id = pending.id().clone();
        tokio::spawn(async move {
            let id = pending.id().clone();
            let result = pending.await;
            let _ = callback.send(ReplyEvent { id, result }).await;
        });
        Ok(id)
    }

    /// Scatter-gather: publishes once (typically through an exchange that
    /// reaches several responders) and collects up to `max` replies until the
    /// timeout. Remote errors are collected as `Err` entries.
    pub async fn gather(
        self,
        max: usize,
    ) -> Result<Vec<Result<Envelope, RequestError>>, RequestError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let timeout = self.timeout;
        let (id, _) = self
            .requester
            .publish(
                &self.target,
                self.message,
                timeout,
                self.fail_fast,
                Waiter::Many(tx),
                true,
            )
            .await?;
        let mut replies = Vec::new();
        let deadline = postbox::clock::deadline(timeout);
        while replies.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => replies.push(into_result(&id, reply)),
                // The requester let go of the waiters: the runtime shut down.
                Ok(None) if self.requester.stopped() => {
                    return Err(BrokerError::Stopped.into());
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.requester.forget(&id);
        Ok(replies)
    }
}

impl<'a> IntoFuture for RequestBuilder<'a> {
    type Output = Result<Envelope, RequestError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.start(false).await?.await })
    }
}

/// A request in flight; `.await` it for the reply (until the request's
/// timeout), or poll it with [`try_reply`](Self::try_reply).
pub struct PendingReply {
    id: RequestId,
    rx: oneshot::Receiver<Envelope>,
    /// The request's confirm still to come (RabbitMQ), raced against the
    /// reply.
    confirm: Option<Confirming>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    requester: Requester,
}

impl fmt::Debug for PendingReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingReply")
            .field("id", &self.id)
            .finish()
    }
}

impl PendingReply {
    /// The request's correlation id.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// The reply if it has arrived, without waiting; `None` while it has not
    /// (and the timeout has not passed).
    pub fn try_reply(&mut self) -> Option<Result<Envelope, RequestError>> {
        match self.rx.try_recv() {
            Ok(reply) => Some(into_result(&self.id, reply)),
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(RequestError::Closed)),
            Err(oneshot::error::TryRecvError::Empty)
                if tokio::time::Instant::now() >= self.deadline =>
            {
                self.requester.forget(&self.id);
                Some(Err(self.timed_out()))
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
        }
    }

    fn timed_out(&self) -> RequestError {
        RequestError::Timeout {
            correlation_id: self.id.to_string(),
            after: self.timeout,
        }
    }
}

impl IntoFuture for PendingReply {
    type Output = Result<Envelope, RequestError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let mut this = self;
            let confirm = this.confirm.take();
            let reply = tokio::time::timeout_at(this.deadline, &mut this.rx);
            let reply = match confirm {
                None => reply.await,
                Some(confirm) => {
                    tokio::pin!(reply);
                    // The reply says the request arrived: its confirm is
                    // looked at only once the reply is late, which spares
                    // the task a wake-up per round trip (a returned or
                    // refused request fails that much later).
                    let confirm = async move {
                        tokio::time::sleep(CONFIRM_GRACE).await;
                        confirm.await
                    };
                    tokio::select! {
                        biased;
                        reply = &mut reply => reply,
                        confirmed = confirm => match confirmed {
                            Ok(()) => reply.await,
                            // Dropped unanswered: forgotten.
                            Err(err) => return Err(err),
                        },
                    }
                }
            };
            match reply {
                Ok(Ok(reply)) => into_result(&this.id, reply),
                // The requester let go of the waiters: the runtime shut down,
                // and nobody can answer any more.
                Ok(Err(_)) if this.requester.stopped() => Err(BrokerError::Stopped.into()),
                Ok(Err(_)) => Err(RequestError::Closed),
                Err(_) => {
                    // From now on a reply for this id is late, and counted as such.
                    this.requester.forget(&this.id);
                    Err(this.timed_out())
                }
            }
        })
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        // Abandoned without a reply: a reply arriving later is late. (After the
        // reply was taken this removes nothing.)
        if !self.rx.is_terminated() {
            self.requester.forget(&self.id);
        }
    }
}
