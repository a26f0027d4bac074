//! Monitoring a broker: a [`Monitor`] samples every queue and stream at an
//! interval, computes rates, raises [`Alert`]s when thresholds are crossed,
//! and records metrics through the [`metrics`](::metrics) facade. A program subscribes
//! to its samples and alerts as streams of events instead of polling.
//!
//! The monitor is an actor on the broker's runtime. Each sample asks every
//! queue for a snapshot (concurrently); the queues answer between their
//! other work, so sampling adds no cost per message. Alerts fire once when
//! their condition starts and clear once when it ends; each also goes to
//! `tracing` (a warning when it fires, an info when it clears).
//!
//! ```
//! use std::time::Duration;
//! use postbox_actors::monitor::{MonitorOptions, Thresholds};
//! use postbox_actors::{Broker, Envelope, QueueOptions};
//! # postbox::testkit::run(async {
//! # let broker = Broker::new(&postbox::RuntimeHandle::local());
//! broker.declare_queue("orders", QueueOptions::default()).await?;
//! let options = MonitorOptions::default()
//!     .interval(Duration::from_secs(1))
//!     .thresholds(Thresholds::default().depth(2));
//! let monitor = broker.monitor(options);
//! let mut alerts = monitor.alerts();
//! for n in 0..3 {
//!     broker.publish("orders", Envelope::new(format!("order {n}"))).await?;
//! }
//! let alert = alerts.recv().await?;
//! assert!(alert.firing && alert.queue == "orders");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod alert;
mod metrics;
#[cfg(feature = "prometheus")]
pub mod prometheus;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::{Actor, Addr, Context, Failure, Handler, Message};
use rustc_hash::FxHashMap;
use tokio::sync::{broadcast, watch};

pub use self::alert::{Alert, AlertKind, Thresholds};
use self::alert::{AlertState, Observed};
use self::metrics::DeliveryLatency;
pub use self::metrics::{LATENCY_SAMPLE_EVERY, METRICS};
use crate::broker::Broker;
use crate::envelope::Envelope;
use crate::queue::ack::{ConsumerId, DeliveryTag};
use crate::queue::observe::{Observer, ObserverGuard};
use crate::queue::stats::{ConsumerStats, QueueStats};
use crate::stream::StreamStats;

/// How a [`Monitor`] samples and what it watches.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MonitorOptions {
    /// Time between samples (RabbitMQ's management plugin: 5 s).
    pub interval: Duration,
    /// Alert thresholds for every queue without its own.
    pub thresholds: Thresholds,
    /// Thresholds of particular queues, by name.
    pub queue_thresholds: FxHashMap<String, Thresholds>,
    /// Record metrics through the `metrics` facade (a no-op until the
    /// application installs a recorder).
    pub metrics: bool,
}

impl Default for MonitorOptions {
    fn default() -> Self {
        MonitorOptions {
            interval: Duration::from_secs(5),
            thresholds: Thresholds::default(),
            queue_thresholds: FxHashMap::default(),
            metrics: true,
        }
    }
}

impl MonitorOptions {
    /// Sets [`interval`](Self::interval) (at least a millisecond).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets [`thresholds`](Self::thresholds).
    pub fn thresholds(mut self, thresholds: Thresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Gives queue `name` thresholds of its own.
    pub fn queue_thresholds(mut self, name: impl Into<String>, thresholds: Thresholds) -> Self {
        self.queue_thresholds.insert(name.into(), thresholds);
        self
    }

    /// Sets [`metrics`](Self::metrics).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }
}

/// Messages per second over the last interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Messages enqueued.
    pub publish: f64,
    /// Deliveries (redeliveries included).
    pub deliver: f64,
    /// Redeliveries.
    pub redeliver: f64,
    /// Acknowledgements.
    pub ack: f64,
}

/// One queue at one sample.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct QueueSample {
    /// The queue.
    pub name: String,
    /// Its sizes and lifetime counters.
    pub stats: QueueStats,
    /// Rates since the previous sample (`None` at its first).
    pub rates: Option<Rates>,
    /// Age of the message to be delivered next (`None` when none is ready).
    pub head_age_ms: Option<u64>,
    /// Messages it dead-lettered (and a dead-letter exchange took).
    pub dead_lettered: u64,
    /// Messages it dropped for a dead-letter reason with nowhere to go.
    pub dead_letters_dropped: u64,
    /// Publishes waiting for room (overflow `block`).
    pub waiting_publishes: usize,
    /// Its consumers' crashes within the longest crash-loop window watched.
    pub recent_crashes: u32,
    /// Each registered consumer: prefetch, unacknowledged deliveries,
    /// deliveries received, whether it is active or blocked.
    pub consumers: Vec<ConsumerStats>,
}

/// One stream at one sample.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StreamSample {
    /// The stream.
    pub name: String,
    /// Its sizes and counters.
    pub stats: StreamStats,
    /// Records appended per second since the previous sample.
    pub publish_rate: Option<f64>,
}

/// Every queue and stream at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// When it was taken (epoch ms, [`postbox::clock::now_ms`]).
    pub at_ms: u64,
    /// The queues, by name.
    pub queues: Vec<QueueSample>,
    /// The streams, by name.
    pub streams: Vec<StreamSample>,
}

/// A running monitor of one broker; dropping it stops the monitor.
///
/// Subscribers that fall more than 1,024 events behind lose the oldest
/// (`broadcast`'s `Lagged`); [`latest`](Self::latest) and
/// [`firing`](Self::firing) always have the current state.
pub struct Monitor {
    addr: Addr<MonitorActor>,
    samples: broadcast::Sender<Arc<Sample>>,
    alerts: broadcast::Sender<Alert>,
    latest: watch::Receiver<Option<Arc<Sample>>>,
    firing: Arc<Mutex<Vec<Alert>>>,
    _observer: ObserverGuard,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// Samples as they are taken.
    pub fn samples(&self) -> broadcast::Receiver<Arc<Sample>> {
        self.samples.subscribe()
    }

    /// Alerts as they fire and clear.
    pub fn alerts(&self) -> broadcast::Receiver<Alert> {
        self.alerts.subscribe()
    }

    /// The latest sample, if one was taken.
    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.latest.borrow().clone()
    }

    /// The alerts firing now.
    pub fn firing(&self) -> Vec<Alert> {
        self.firing.lock().clone()
    }

    /// Takes a sample now (besides the regular ones).
    pub fn sample_now(&self) {
        let _ = self.addr.try_send(Tick { regular: false });
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.addr.stop();
    }
}

impl Broker {
    /// Starts monitoring this broker (see [`monitor`](crate::monitor)).
    pub fn monitor(&self, options: MonitorOptions) -> Monitor {
        let (samples, _) = broadcast::channel(1024);
        let (alerts, _) = broadcast::channel(1024);
        let (latest_tx, latest) = watch::channel(None);
        let firing = Arc::new(Mutex::new(Vec::new()));
        let watched = Arc::new(Watched {
            crashes: Mutex::default(),
            latency: options.metrics.then(DeliveryLatency::default),
        });
        let observer = self.observe(watched.clone());
        // A crashed monitor restarts fresh (its rates and alert state start
        // over); the subscribers keep their channels.
        let (broker, parts) = (self.clone(), (samples.clone(), alerts.clone()));
        let (latest_tx, firing2, watched2) = (Arc::new(latest_tx), firing.clone(), watched);
        let addr = self
            .runtime()
            .build(move || {
                Some(MonitorActor {
                    broker: broker.clone(),
                    options: options.clone(),
                    samples: parts.0.clone(),
                    alerts: parts.1.clone(),
                    latest: latest_tx.clone(),
                    firing: firing2.clone(),
                    watched: watched2.clone(),
                    previous: FxHashMap::default(),
                    previous_streams: FxHashMap::default(),
                    state: AlertState::default(),
                })
            })
            .name("monitor".to_string())
            .spawn();
        Monitor {
            addr,
            samples,
            alerts,
            latest,
            firing,
            _observer: observer,
        }
    }
}

/// What the monitor learns from the queues as it happens: consumer
/// crashes, and (with metrics) delivery latency.
struct Watched {
    /// Crash times (epoch ms) by queue, oldest first.
    crashes: Mutex<FxHashMap<String, VecDeque<u64>>>,
    latency: Option<DeliveryLatency>,
}

impl Observer for Watched {
    // Publishes are counted from the samples: no copy of each is needed.
    fn observes_publishes(&self) -> bool {
        false
    }

    fn delivered(&self, queue: &str, consumer: ConsumerId, tag: DeliveryTag, message: &Envelope) {
        if let Some(latency) = &self.latency {
            latency.delivered(queue, consumer, tag, message);
        }
    }

    fn consumer_failed(&self, queue: &str, _: ConsumerId, _: &Failure, _: u64) {
        let mut crashes = self.crashes.lock();
        let times = crashes.entry(queue.to_string()).or_default();
        times.push_back(postbox::clock::now_ms());
        // Bounded: a window never needs more than its threshold's count.
        if times.len() > 1024 {
            times.pop_front();
        }
    }
}

struct MonitorActor {
    broker: Broker,
    options: MonitorOptions,
    samples: broadcast::Sender<Arc<Sample>>,
    alerts: broadcast::Sender<Alert>,
    latest: Arc<watch::Sender<Option<Arc<Sample>>>>,
    firing: Arc<Mutex<Vec<Alert>>>,
    watched: Arc<Watched>,
    /// Each queue's counters at the previous sample, and when.
    previous: FxHashMap<String, (QueueStats, u64)>,
    previous_streams: FxHashMap<String, (u64, u64)>,
    state: AlertState,
}

struct Tick {
    /// A regular tick schedules the next one.
    regular: bool,
}

impl Message for Tick {
    type Reply = ();
}

impl Actor for MonitorActor {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        ctx.notify_later(Tick { regular: true }, self.options.interval);
        Ok(())
    }
}

impl Handler<Tick> for MonitorActor {
    async fn handle(&mut self, tick: Tick, ctx: &mut Context<Self>) -> Result<(), Failure> {
        if tick.regular {
            ctx.notify_later(Tick { regular: true }, self.options.interval);
        }
        self.sample().await;
        Ok(())
    }
}

impl MonitorActor {
    /// The longest crash-loop window any thresholds watch.
    fn crash_window_ms(&self) -> u64 {
        std::iter::once(&self.options.thresholds)
            .chain(self.options.queue_thresholds.values())
            .filter_map(|t| t.crash_loop)
            .map(|(_, w)| u64::try_from(w.as_millis()).unwrap_or(u64::MAX))
            .max()
            .unwrap_or(0)
    }

    async fn sample(&mut self) {
        let names = self.broker.queue_names();
        let snapshots =
            futures::future::join_all(names.iter().map(|name| self.broker.queue_stats(name))).await;
        let now = postbox::clock::now_ms();
        let window = self.crash_window_ms();
        let crashes: FxHashMap<String, u32> = {
            let mut all = self.watched.crashes.lock();
            all.retain(|_, times| {
                while times
                    .front()
                    .is_some_and(|t| now.saturating_sub(*t) > window)
                {
                    times.pop_front();
                }
                !times.is_empty()
            });
            all.iter()
                .map(|(q, t)| (q.clone(), u32::try_from(t.len()).unwrap_or(u32::MAX)))
                .collect()
        };
        let mut sample = Sample {
            at_ms: now,
            ..Sample::default()
        };
        let mut fired = Vec::new();
        for (name, snapshot) in names.into_iter().zip(snapshots) {
            // Deleted since it was listed.
            let Ok(snapshot) = snapshot else { continue };
            let stats = snapshot.stats;
            let rates = self.previous.get(&name).and_then(|(prev, at)| {
                let secs = now.saturating_sub(*at) as f64 / 1e3;
                (secs > 0.0).then(|| Rates {
                    publish: stats.published.saturating_sub(prev.published) as f64 / secs,
                    deliver: stats.delivered.saturating_sub(prev.delivered) as f64 / secs,
                    redeliver: stats.redelivered.saturating_sub(prev.redelivered) as f64 / secs,
                    ack: stats.acknowledged.saturating_sub(prev.acknowledged) as f64 / secs,
                })
            });
            self.previous.insert(name.clone(), (stats, now));
            let queue = QueueSample {
                head_age_ms: stats.head_timestamp_ms.map(|t| now.saturating_sub(t)),
                recent_crashes: crashes.get(&name).copied().unwrap_or(0),
                name,
                stats,
                rates,
                consumers: snapshot.consumers,
                dead_lettered: snapshot.dead_lettered,
                dead_letters_dropped: snapshot.dead_letters_dropped,
                waiting_publishes: snapshot.waiting_publishes,
            };
            let thresholds = self
                .options
                .queue_thresholds
                .get(&queue.name)
                .unwrap_or(&self.options.thresholds);
            let seen = Observed {
                ready: stats.ready,
                consumers: stats.consumers,
                head_age_ms: queue.head_age_ms,
                waiting_publishes: queue.waiting_publishes,
                crashes: queue.recent_crashes,
            };
            self.state
                .check(&queue.name, thresholds, &seen, now, &mut fired);
            sample.queues.push(queue);
        }
        let alive: FxHashMap<&str, ()> = sample
            .queues
            .iter()
            .map(|q| (q.name.as_str(), ()))
            .collect();
        self.state
            .forget_except(&|q| alive.contains_key(q), now, &mut fired);
        self.previous.retain(|q, _| alive.contains_key(q.as_str()));
        if let Some(latency) = &self.watched.latency {
            latency.retain(|q| alive.contains_key(q));
        }
        for name in self.broker.stream_names() {
            let Ok(stream) = self.broker.stream(&name) else {
                continue;
            };
            let stats = stream.stats();
            let rate = self
                .previous_streams
                .get(&name)
                .and_then(|(published, at)| {
                    let secs = now.saturating_sub(*at) as f64 / 1e3;
                    (secs > 0.0).then(|| stats.published.saturating_sub(*published) as f64 / secs)
                });
            self.previous_streams
                .insert(name.clone(), (stats.published, now));
            sample.streams.push(StreamSample {
                name,
                stats,
                publish_rate: rate,
            });
        }
        let firing = self.state.firing();
        if self.options.metrics {
            metrics::record(&sample, firing.len());
        }
        *self.firing.lock() = firing;
        for alert in fired {
            let _ = self.alerts.send(alert);
        }
        let sample = Arc::new(sample);
        let _ = self.latest.send(Some(sample.clone()));
        let _ = self.samples.send(sample);
    }
}
