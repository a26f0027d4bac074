//! [`Remote`]: one connection to RabbitMQ, kept up.
//!
//! A watcher task waits for the connection to fail, then reconnects with
//! doubling backoff and redeclares the topology this process declared
//! (exchanges, then queues, then bindings) before anyone uses the new
//! connection. Each connection is a *session* with a generation number:
//! consumers notice a new generation and consume again on it; publishes in
//! flight on the lost one fail with [`BrokerError::Unconfirmed`]. Calls made
//! while the connection is down wait for the next session, up to the
//! operation timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::AmqpOptions;
use super::consume::Registered;
use super::topology::Record;
use crate::error::BrokerError;
use crate::queue::ack::ConsumerId;
use crate::secret::{scrub, url_secrets};

/// One live connection and the channels the broker shares on it.
pub(crate) struct Session {
    /// Counts connections: 1 for the first, +1 per reconnection.
    pub(crate) generation: u64,
    pub(crate) connection: Connection,
    /// Publishes, with confirms; replaced if RabbitMQ closes it.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// The publisher channel while it is open, read without waiting.
    open_publisher: parking_lot::RwLock<Option<Channel>>,
    /// Declarations, deletions, bindings, passive checks.
    admin: tokio::sync::Mutex<Option<Channel>>,
    /// Set once the connection is found lost (see [`Session::create_channel`]).
    lost: watch::Sender<bool>,
}

impl Session {
    fn new(generation: u64, connection: Connection) -> Session {
        Session {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(None),
            open_publisher: parking_lot::RwLock::new(None),
            admin: tokio::sync::Mutex::new(None),
            lost: watch::Sender::new(false),
        }
    }

    /// Marks the session lost: channels still being opened on it give up.
    fn mark_lost(&self) {
        self.lost.send_replace(true);
    }

    /// Whether the session was found lost.
    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A new channel on this session's connection. lapin opens a channel
    /// through its I/O loop; asked just as the connection dies, the loop
    /// may be gone and the request then never answered: the loss of the
    /// session answers it instead.
    pub(crate) async fn create_channel(&self) -> Result<Channel, lapin::Error> {
        let mut lost = self.lost.subscribe();
        tokio::select! {
            channel = self.connection.create_channel() => channel,
            _ = lost.wait_for(|lost| *lost) => Err(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Error,
            )
            .into()),
        }
    }

    /// The channel publishes go on (publisher confirms on).
    pub(crate) async fn publisher(&self) -> Result<Channel, lapin::Error> {
        if let Some(channel) = self
            .open_publisher
            .read()
            .as_ref()
            .filter(|c| c.status().connected())
        {
            return Ok(channel.clone());
        }
        let mut slot = self.publisher.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some(channel.clone());
        *self.open_publisher.write() = Some(channel.clone());
        Ok(channel)
    }

    /// The channel topology changes go on. RabbitMQ closes a channel on a
    /// refusal (a missing queue, a mismatch): the next call opens another.
    pub(crate) async fn admin(&self) -> Result<Channel, lapin::Error> {
        let mut slot = self.admin.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.create_channel().await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

/// Where the connection stands.
#[derive(Clone)]
pub(crate) enum State {
    Up(Arc<Session>),
    Reconnecting,
    Closed,
}

/// The broker's end of RabbitMQ: options, the current session, and the
/// topology to redeclare after a reconnection.
pub(crate) struct Remote {
    pub(crate) options: AmqpOptions,
    state: watch::Sender<State>,
    pub(crate) record: Mutex<Record>,
    /// Consumer registrations (postbox's consumer ids).
    next_consumer: AtomicU64,
    /// The running registrations, to cancel or close them by id.
    registrations: Mutex<std::collections::HashMap<ConsumerId, Registered>>,
    closed: AtomicBool,
    /// The size limit of queues declared without one.
    pub(crate) max_message_bytes: usize,
    /// The URL's credentials, found once, to scrub from what lapin says.
    secrets: Vec<String>,
    /// Deliveries of redelivered messages seen by this process, by id: a
    /// classic queue does not count them, and retry policies need the
    /// attempt (bounded: see [`Remote::count_delivery`]).
    attempts: Mutex<std::collections::HashMap<crate::envelope::MessageId, u32>>,
    /// Exchanges known to exist on this connection (see
    /// [`Remote::check_exchange`]).
    pub(crate) exchanges_known: parking_lot::RwLock<std::collections::HashSet<String>>,
}

/// Redelivered messages whose deliveries are counted at once; past it the
/// counts start over (a retry policy then allows a few more attempts).
const COUNTED: usize = 65_536;

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.options.redacted_url())
            .finish()
    }
}

impl Remote {
    /// Connects (failing at once if RabbitMQ cannot be reached or refuses
    /// the credentials), then keeps the connection up from a task on the
    /// current tokio runtime.
    pub(crate) async fn connect(
        options: AmqpOptions,
        max_message_bytes: usize,
    ) -> Result<Arc<Remote>, BrokerError> {
        options.validate()?;
        let connection = tokio::time::timeout(options.timeout, open(&options))
            .await
            .map_err(|_| BrokerError::Backend("timed out connecting".into()))??;
        let session = Arc::new(Session::new(1, connection));
        let (state, _) = watch::channel(State::Up(session.clone()));
        let secrets = url_secrets(&options.url);
        let remote = Arc::new(Remote {
            options,
            state,
            record: Mutex::default(),
            next_consumer: AtomicU64::new(1),
            registrations: Mutex::default(),
            closed: AtomicBool::new(false),
            max_message_bytes,
            attempts: Mutex::default(),
            exchanges_known: parking_lot::RwLock::default(),
            secrets,
        });
        tracing::info!(url = %remote.options.redacted_url(), "connected to rabbitmq");
        tokio::spawn(keep_up(Arc::downgrade(&remote), session));
        Ok(remote)
    }

    /// The current session, waiting (up to the timeout) while reconnecting.
    pub(crate) async fn session(&self) -> Result<Arc<Session>, BrokerError> {
        if let State::Up(session) = &*self.state.borrow() {
            return Ok(session.clone());
        }
        let mut rx = self.state.subscribe();
        let wait = rx.wait_for(|s| !matches!(s, State::Reconnecting));
        let state = match tokio::time::timeout(self.options.timeout, wait).await {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => State::Closed,
            Err(_) => {
                return Err(BrokerError::Backend(
                    "the connection to rabbitmq is down (reconnecting)".into(),
                ));
            }
        };
        match state {
            State::Up(session) => Ok(session),
            _ => Err(BrokerError::Stopped),
        }
    }

    /// A session newer than `generation`, waiting for as long as it takes
    /// (consumers waiting to consume again); `None` once closed.
    pub(crate) async fn next_session(&self, generation: u64) -> Option<Arc<Session>> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| match s {
                State::Up(s) => s.generation > generation,
                State::Reconnecting => false,
                State::Closed => true,
            })
            .await
            .ok()?
            .clone();
        match state {
            State::Up(session) => Some(session),
            _ => None,
        }
    }

    /// A fresh consumer id.
    pub(crate) fn consumer_id(&self) -> u64 {
        self.next_consumer.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register(&self, consumer: ConsumerId, registered: Registered) {
        self.registrations.lock().insert(consumer, registered);
    }

    pub(crate) fn unregister(&self, consumer: ConsumerId) {
        self.registrations.lock().remove(&consumer);
    }

    pub(crate) fn registration(&self, consumer: ConsumerId) -> Option<Registered> {
        self.registrations.lock().get(&consumer).cloned()
    }

    /// Sets a delivered message's delivery count to what this process has
    /// seen of it, where RabbitMQ's count (a classic queue says only
    /// "redelivered") is lower: a retry policy's attempts then end.
    pub(crate) fn count_delivery(&self, message: &mut crate::envelope::Envelope) {
        if !message.redelivered() {
            return;
        }
        let mut attempts = self.attempts.lock();
        if attempts.len() >= COUNTED {
            attempts.clear();
        }
        let seen = attempts.entry(message.id()).or_insert(1);
        *seen = (*seen + 1).max(message.delivery_count());
        let count = *seen;
        drop(attempts);
        message.set_delivery(count, true);
    }

    /// Whether the broker was closed (the runtime shut down).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection for good: consumers stop, calls fail with
    /// `Stopped`.
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let previous = self.state.send_replace(State::Closed);
        if let State::Up(session) = previous
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = session.connection.close(200, "closed".into()).await;
            });
        }
    }

    /// Runs `op` with the operation timeout; lapin's error becomes the
    /// broker's through `map`, a timeout a `Backend` error.
    ///
    /// Not an `async fn`: one would hold `op` twice (the argument, and the
    /// timeout it is moved into), doubling the size of every future built
    /// on it (a publish's was 4.9 KB, moved at least once per publish).
    pub(crate) fn timed<T>(
        &self,
        what: &'static str,
        op: impl Future<Output = Result<T, BrokerError>>,
    ) -> impl Future<Output = Result<T, BrokerError>> {
        tokio::time::timeout(self.options.timeout, op).map(move |done| {
            done.unwrap_or_else(|_| Err(BrokerError::Backend(format!("{what} timed out"))))
        })
    }

    /// `text` without the credentials.
    pub(crate) fn scrub(&self, text: &dyn std::fmt::Display) -> String {
        scrub(text.to_string(), &self.secrets)
    }
}

/// Opens a connection as `options` say (TLS with their CA, if given).
async fn open(options: &AmqpOptions) -> Result<Connection, BrokerError> {
    let mut properties = ConnectionProperties::default();
    if let Some(name) = &options.connection_name {
        properties = properties.with_connection_name(name.clone().into());
    }
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: options.ca_certificate.clone(),
    };
    let secrets = url_secrets(&options.url);
    let runtime = lapin::runtime::default_runtime()
        .map_err(|err| BrokerError::Backend(scrub(err.to_string(), &secrets)))?;
    Connection::connect_with_config(&options.url, properties, tls, runtime)
        .await
        .map_err(|err| {
            BrokerError::Backend(format!(
                "cannot connect to {}: {}",
                options.redacted_url(),
                scrub(err.to_string(), &secrets)
            ))
        })
}

/// Waits for the session's connection to fail, then reconnects (doubling
/// the wait between attempts), redeclares the recorded topology and
/// publishes the new session; until the broker is closed or dropped.
async fn keep_up(remote: std::sync::Weak<Remote>, mut session: Arc<Session>) {
    loop {
        let mut events = session.connection.events_listener();
        loop {
            let failed = tokio::select! {
                event = events.next() => matches!(event, Some(lapin::Event::Error(_)) | None),
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    !session.connection.status().connected()
                }
            };
            let Some(r) = remote.upgrade() else { return };
            if r.is_closed() {
                return;
            }
            if failed && !session.connection.status().connected() {
                break;
            }
        }
        let Some(r) = remote.upgrade() else { return };
        tracing::warn!(url = %r.options.redacted_url(), generation = session.generation, "connection to rabbitmq lost; reconnecting");
        r.state.send_if_modified(|s| {
            if matches!(s, State::Closed) {
                return false;
            }
            *s = State::Reconnecting;
            true
        });
        // After the state: a call whose channel gives up asks for the
        // session again, and waits for the next one.
        session.mark_lost();
        let mut backoff = r.options.reconnect_min;
        let generation = session.generation + 1;
        drop(r);
        session = loop {
            let Some(r) = remote.upgrade() else { return };
            if r.is_closed() {
                return;
            }
            let options = r.options.clone();
            drop(r);
            // Bounded, as every step here: a connection that dies while
            // opening or redeclaring must not stop the reconnecting.
            match tokio::time::timeout(options.timeout, open(&options)).await {
                Ok(Ok(connection)) => {
                    let fresh = Arc::new(Session::new(generation, connection));
                    let Some(r) = remote.upgrade() else { return };
                    let record = r.record.lock().clone();
                    let redeclared =
                        tokio::time::timeout(options.timeout, record.redeclare(&fresh)).await;
                    match redeclared {
                        Ok(Ok(())) => break fresh,
                        Ok(Err(err)) => {
                            tracing::warn!(error = %r.scrub(&err), "redeclaring the topology failed; reconnecting");
                        }
                        Err(_) => {
                            tracing::warn!("redeclaring the topology timed out; reconnecting");
                        }
                    }
                    let closing = fresh.connection.close(200, "retry".into());
                    let _ = tokio::time::timeout(options.timeout, closing).await;
                }
                Ok(Err(err)) => tracing::debug!(%err, ?backoff, "reconnection failed"),
                Err(_) => tracing::debug!(?backoff, "reconnection timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(options.reconnect_max);
        };
        let Some(r) = remote.upgrade() else { return };
        // The server may have lost what was not redeclared: asked again.
        r.exchanges_known.write().clear();
        tracing::info!(url = %r.options.redacted_url(), generation, "reconnected to rabbitmq; topology redeclared");
        r.state.send_if_modified(|s| {
            if matches!(s, State::Closed) {
                return false;
            }
            *s = State::Up(session.clone());
            true
        });
    }
}
