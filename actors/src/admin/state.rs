//! What the admin server keeps besides the broker: its monitor, a short
//! history of every queue for the charts, the recent alerts, and an observer
//! that counts dead-lettering by queue and reason and remembers consumer
//! crashes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use postbox::Failure;
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::{AdminOptions, MetricsRenderer, Token};
use crate::broker::Broker;
use crate::envelope::{DeathReason, Envelope};
use crate::monitor::{Alert, Monitor, Sample};
use crate::queue::ack::ConsumerId;
use crate::queue::observe::{Observer, ObserverGuard};

/// Recent events kept of each kind (alerts, deaths, crashes).
const RECENT: usize = 100;

/// The server's shared state.
pub(super) struct State {
    pub(super) broker: Broker,
    pub(super) monitor: Monitor,
    pub(super) token: Option<Token>,
    pub(super) mutations: bool,
    pub(super) protect_reads: bool,
    /// Bound to a loopback address: requests must name a loopback host.
    pub(super) loopback_only: bool,
    pub(super) limiter: DefaultDirectRateLimiter,
    pub(super) timeout: Duration,
    pub(super) metrics: Option<MetricsRenderer>,
    pub(super) history: Mutex<History>,
    pub(super) events: Arc<Events>,
    _observer: ObserverGuard,
}

impl State {
    /// The state, and the task that feeds the monitor's samples and alerts
    /// into the history.
    pub(super) fn start(
        broker: &Broker,
        options: &AdminOptions,
        runtime: &tokio::runtime::Handle,
    ) -> (Arc<State>, JoinHandle<()>) {
        let monitor = broker.monitor(options.monitor.clone());
        let events = Arc::new(Events::default());
        let observer = broker.observe(events.clone());
        let burst = options
            .requests_per_second
            .saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(std::num::NonZeroU32::MIN));
        let quota = Quota::per_second(options.requests_per_second).allow_burst(burst);
        let state = Arc::new(State {
            broker: broker.clone(),
            token: options.token.clone(),
            mutations: options.mutations,
            protect_reads: options.protect_reads,
            loopback_only: options.bind.ip().is_loopback(),
            limiter: RateLimiter::direct(quota),
            timeout: options.request_timeout,
            metrics: options.metrics.clone(),
            history: Mutex::new(History::new(options.history)),
            events,
            _observer: observer,
            monitor,
        });
        let mut samples = state.monitor.samples();
        let mut alerts = state.monitor.alerts();
        let weak = Arc::downgrade(&state);
        let collector = runtime.spawn(async move {
            loop {
                tokio::select! {
                    sample = samples.recv() => match sample {
                        Ok(sample) => match weak.upgrade() {
                            Some(state) => state.history.lock().record(&sample),
                            None => break,
                        },
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    },
                    alert = alerts.recv() => match alert {
                        Ok(alert) => match weak.upgrade() {
                            Some(state) => state.history.lock().alert(alert),
                            None => break,
                        },
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        (state, collector)
    }
}

/// One point of a queue's chart.
#[derive(Clone, Copy, Debug, Serialize)]
pub(super) struct Point {
    pub(super) at_ms: u64,
    pub(super) ready: usize,
    pub(super) unacked: usize,
    pub(super) publish_rate: f64,
    pub(super) deliver_rate: f64,
    pub(super) ack_rate: f64,
}

/// The last samples of every queue, of the totals, and the recent alerts.
pub(super) struct History {
    capacity: usize,
    pub(super) queues: FxHashMap<String, VecDeque<Point>>,
    pub(super) totals: VecDeque<Point>,
    pub(super) alerts: VecDeque<Alert>,
}

impl History {
    fn new(capacity: usize) -> Self {
        History {
            capacity: capacity.max(2),
            queues: FxHashMap::default(),
            totals: VecDeque::new(),
            alerts: VecDeque::new(),
        }
    }

    fn record(&mut self, sample: &Sample) {
        let mut total = Point {
            at_ms: sample.at_ms,
            ready: 0,
            unacked: 0,
            publish_rate: 0.0,
            deliver_rate: 0.0,
            ack_rate: 0.0,
        };
        // Rebuilt from the sample: queues that are gone lose their history.
        let mut before = std::mem::take(&mut self.queues);
        for q in &sample.queues {
            let rates = q.rates.unwrap_or_default();
            let point = Point {
                at_ms: sample.at_ms,
                ready: q.stats.ready,
                unacked: q.stats.unacked,
                publish_rate: rates.publish,
                deliver_rate: rates.deliver,
                ack_rate: rates.ack,
            };
            total.ready += point.ready;
            total.unacked += point.unacked;
            total.publish_rate += point.publish_rate;
            total.deliver_rate += point.deliver_rate;
            total.ack_rate += point.ack_rate;
            let mut ring = before.remove(&q.name).unwrap_or_default();
            push(&mut ring, point, self.capacity);
            self.queues.insert(q.name.clone(), ring);
        }
        push(&mut self.totals, total, self.capacity);
    }

    fn alert(&mut self, alert: Alert) {
        push(&mut self.alerts, alert, RECENT);
    }
}

fn push<T>(ring: &mut VecDeque<T>, item: T, capacity: usize) {
    if ring.len() >= capacity {
        ring.pop_front();
    }
    ring.push_back(item);
}

/// A message dead-lettered (or dropped for a dead-letter reason).
#[derive(Clone, Debug, Serialize)]
pub(super) struct Death {
    pub(super) at_ms: u64,
    pub(super) queue: String,
    pub(super) reason: DeathReason,
    /// Whether the dead-letter exchange took it (false: dropped).
    pub(super) routed: bool,
    pub(super) message_id: String,
    pub(super) routing_key: String,
}

/// A consumer's crash.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Crash {
    pub(super) at_ms: u64,
    pub(super) queue: String,
    /// Its tag, as a string (as the consumers' list shows tags).
    #[serde(serialize_with = "as_text")]
    pub(super) consumer: ConsumerId,
    pub(super) failure: String,
    pub(super) restarts: u64,
}

fn as_text<S: serde::Serializer>(id: &ConsumerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Dead-lettering and crashes, as they happen (an [`Observer`]).
#[derive(Default)]
pub(super) struct Events {
    pub(super) deaths: Mutex<DeathLog>,
    pub(super) crashes: Mutex<VecDeque<Crash>>,
}

#[derive(Default)]
pub(super) struct DeathLog {
    /// Counts by queue, then reason.
    pub(super) counts: FxHashMap<String, FxHashMap<DeathReason, u64>>,
    pub(super) recent: VecDeque<Death>,
}

impl Observer for Events {
    fn observes_publishes(&self) -> bool {
        false
    }

    fn dead_lettered(&self, queue: &str, message: &Envelope, reason: DeathReason, routed: bool) {
        let mut log = self.deaths.lock();
        *log.counts
            .entry(queue.to_string())
            .or_default()
            .entry(reason)
            .or_default() += 1;
        let death = Death {
            at_ms: postbox::clock::now_ms(),
            queue: queue.to_string(),
            reason,
            routed,
            message_id: message.id().to_string(),
            routing_key: message.routing_key().to_string(),
        };
        push(&mut log.recent, death, RECENT);
    }

    fn consumer_failed(&self, queue: &str, consumer: ConsumerId, failure: &Failure, restarts: u64) {
        let crash = Crash {
            at_ms: postbox::clock::now_ms(),
            queue: queue.to_string(),
            consumer,
            failure: failure.to_string(),
            restarts,
        };
        push(&mut self.crashes.lock(), crash, RECENT);
    }
}
