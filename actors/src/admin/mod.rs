//! The operator's view (feature `admin`): a management HTTP API in RabbitMQ's
//! shapes, a Prometheus endpoint, and a live dashboard, served by the broker's
//! own process.
//!
//! [`AdminServer::start`] listens on 127.0.0.1 unless told otherwise and
//! serves:
//!
//! | path | what |
//! |---|---|
//! | `GET /` | the dashboard (its script and style come from this binary: no CDN) |
//! | `GET /api/overview` | totals, rates, firing alerts, recent history |
//! | `GET /api/queues`, `GET /api/queues/{name}` | queues (the detail adds consumers, history and death reasons) |
//! | `GET /api/exchanges`, `GET /api/bindings` | the topology |
//! | `GET /api/consumers`, `GET /api/crashes` | consumers, and their recent crashes |
//! | `GET /api/streams` | streams and their subscribers' lag |
//! | `GET /api/alerts`, `GET /api/deaths` | alerts firing and recent; dead-lettering by queue and reason |
//! | `GET /metrics` | Prometheus text, when [`AdminOptions::metrics`] gives a renderer |
//! | `DELETE /api/queues/{name}` | delete a queue (`?if-unused=true`, `?if-empty=true`) |
//! | `DELETE /api/queues/{name}/contents` | purge a queue |
//! | `POST /api/queues/{name}/get` | look at messages without consuming them for good |
//! | `POST /api/exchanges/{name}/publish` | publish a test message (`amq.default`: the default exchange) |
//!
//! RabbitMQ's default-vhost paths (`/api/queues/%2F/{name}`...) are accepted
//! too, so that scripts written against RabbitMQ's management API work.
//!
//! Safe by default: bound to a loopback address, it answers only requests
//! that name a loopback host (`localhost`, `127.0.0.1`, `[::1]`), which
//! defeats DNS rebinding; reads are open to whoever can reach the address (set
//! [`AdminOptions::protect_reads`] to require the token for them too);
//! mutations are off unless [`AdminOptions::mutations`] turns them on, which
//! requires a bearer token. The token is compared in constant time and never
//! logged or printed (its `Debug` is redacted). Request bodies are bounded
//! ([`AdminOptions::max_body_bytes`]), requests are rate-limited
//! ([`AdminOptions::requests_per_second`], 429 beyond) and time-bounded, and
//! every input is validated: bad input is a 4xx with a JSON body
//! (`{"error": ..., "reason": ...}`, RabbitMQ's shape), never a panic.
//!
//! The server samples the broker with its own [`Monitor`](crate::monitor::Monitor)
//! (every second by default, [`AdminOptions::monitor`]) and keeps a short
//! history of each queue for the dashboard's charts.
//!
//! ```no_run
//! use postbox::Runtime;
//! use postbox_actors::admin::{AdminOptions, AdminServer};
//! use postbox_actors::{Broker, QueueOptions};
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = Runtime::new()?;
//! let broker = Broker::new(&rt.handle());
//! broker.declare_queue("orders", QueueOptions::default()).await?;
//! let token = std::env::var("POSTBOX_ADMIN_TOKEN")?;
//! let admin = AdminServer::start(
//!     &broker,
//!     AdminOptions::default().token(token).mutations(true),
//! )
//! .await?;
//! println!("dashboard at {}", admin.url());
//! # Ok(()) }
//! ```
//!
//! Where it differs from RabbitMQ's management plugin: one vhost (`/`), no
//! users or permissions beyond one token, no definitions import/export, and
//! `get` only ever requeues (an operator's look never consumes).

mod api;
mod assets;
mod guard;
mod state;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::monitor::MonitorOptions;

/// Renders the Prometheus text served at `/metrics`.
pub type MetricsRenderer = Arc<dyn Fn() -> String + Send + Sync>;

/// The bearer token: compared in constant time, never printed.
#[derive(Clone)]
pub(crate) struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// How an [`AdminServer`] listens and what it allows.
#[derive(Clone)]
#[non_exhaustive]
pub struct AdminOptions {
    /// Where to listen (127.0.0.1:15680 by default; port 0 picks a free one).
    pub bind: SocketAddr,
    token: Option<Token>,
    /// Whether purge, delete, publish and get are served (they also need
    /// the token).
    pub mutations: bool,
    /// Whether reads need the token too.
    pub protect_reads: bool,
    /// How the server's monitor samples (default: every second, no alert
    /// thresholds).
    pub monitor: MonitorOptions,
    /// Largest request body accepted (64 KiB); larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests per second served, with bursts of twice as many; more get 429.
    pub requests_per_second: NonZeroU32,
    /// Longest a request may take before it gets 503.
    pub request_timeout: Duration,
    /// Samples of history kept per queue for the charts (300: five minutes
    /// at the default interval).
    pub history: usize,
    /// Renders `/metrics`; without one, `/metrics` is 404.
    pub metrics: Option<MetricsRenderer>,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 15680)),
            token: None,
            mutations: false,
            protect_reads: false,
            monitor: MonitorOptions::default().interval(Duration::from_secs(1)),
            max_body_bytes: 64 * 1024,
            requests_per_second: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            request_timeout: Duration::from_secs(10),
            history: 300,
            metrics: None,
        }
    }
}

impl fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminOptions")
            .field("bind", &self.bind)
            .field("token", &self.token)
            .field("mutations", &self.mutations)
            .field("protect_reads", &self.protect_reads)
            .field("monitor", &self.monitor)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("requests_per_second", &self.requests_per_second)
            .field("request_timeout", &self.request_timeout)
            .field("history", &self.history)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

impl AdminOptions {
    /// Sets [`bind`](Self::bind).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// The bearer token that mutations (and protected reads) require
    /// (`Authorization: Bearer <token>`), at least [`MIN_TOKEN_LEN`]
    /// characters.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into().into()));
        self
    }

    /// Sets [`mutations`](Self::mutations).
    pub fn mutations(mut self, on: bool) -> Self {
        self.mutations = on;
        self
    }

    /// Sets [`protect_reads`](Self::protect_reads).
    pub fn protect_reads(mut self, on: bool) -> Self {
        self.protect_reads = on;
        self
    }

    /// Sets [`monitor`](Self::monitor): the sampling interval and the alert
    /// thresholds the dashboard shows.
    pub fn monitor(mut self, options: MonitorOptions) -> Self {
        self.monitor = options;
        self
    }

    /// Sets [`max_body_bytes`](Self::max_body_bytes).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets [`requests_per_second`](Self::requests_per_second).
    pub fn requests_per_second(mut self, n: NonZeroU32) -> Self {
        self.requests_per_second = n;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`history`](Self::history) (at least 2).
    pub fn history(mut self, samples: usize) -> Self {
        self.history = samples.max(2);
        self
    }

    /// Serves `/metrics` with `render` (with feature `prometheus`:
    /// `move || handle.render()` on the handle that
    /// `monitor::prometheus::install()` returns).
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }
}

/// Why an [`AdminServer`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Mutations were enabled without a token.
    #[error("mutations need a token (AdminOptions::token)")]
    MutationsWithoutToken,
    /// Reads were protected without a token.
    #[error("protected reads need a token (AdminOptions::token)")]
    ReadsWithoutToken,
    /// The token is shorter than [`MIN_TOKEN_LEN`] or has characters an
    /// HTTP header cannot carry.
    #[error("the token must be at least {MIN_TOKEN_LEN} visible ASCII characters")]
    WeakToken,
    /// Not called from within a tokio runtime.
    #[error("the admin server runs on tokio: start it from within a tokio runtime")]
    NoRuntime,
}

/// A running admin server; dropping it (or [`shutdown`](Self::shutdown))
/// stops it and its monitor.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    collector: JoinHandle<()>,
}

impl fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// Binds `options.bind` and serves `broker`'s API and dashboard on the
    /// current tokio runtime until shut down.
    pub async fn start(broker: &Broker, options: AdminOptions) -> Result<AdminServer, AdminError> {
        if let Some(Token(token)) = &options.token {
            let visible = token.bytes().all(|b| b.is_ascii_graphic());
            if token.len() < MIN_TOKEN_LEN || !visible {
                return Err(AdminError::WeakToken);
            }
        } else if options.mutations {
            return Err(AdminError::MutationsWithoutToken);
        } else if options.protect_reads {
            return Err(AdminError::ReadsWithoutToken);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AdminError::NoRuntime)?;
        let listener = tokio::net::TcpListener::bind(options.bind)
            .await
            .map_err(|source| AdminError::Bind {
                addr: options.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AdminError::Bind {
            addr: options.bind,
            source,
        })?;
        let (state, collector) = state::State::start(broker, &options, &runtime);
        let app = api::router(state, &options);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = runtime.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "admin server stopped");
            }
        });
        tracing::info!(%addr, mutations = options.mutations, "admin server listening");
        Ok(AdminServer {
            addr,
            stop: Some(stop),
            task: Some(task),
            collector,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dashboard's URL (`http://addr/`).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops accepting connections, lets requests in progress finish (up to
    /// five seconds) and stops the monitor.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.collector.abort();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.collector.abort();
    }
}
