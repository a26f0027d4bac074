//! The monitor's metrics, through the [`metrics`](::metrics) facade: whatever recorder
//! the application installs (Prometheus with feature `prometheus`, StatsD,
//! an OpenTelemetry bridge...) receives them; with none installed they cost
//! nothing.
//!
//! Counters and gauges are read from each sample, so they cost nothing per
//! message. The two histograms are recorded as events happen: delivery
//! latency by the monitor's observer (one delivery in
//! [`LATENCY_SAMPLE_EVERY`]), confirm latency by the store, per confirmed
//! publish.

use metrics::{Histogram, counter, gauge, histogram};
use parking_lot::RwLock;
use rustc_hash::FxHashMap;

use super::Sample;
use crate::envelope::Envelope;
use crate::queue::ack::{ConsumerId, DeliveryTag};

/// Every metric the monitor and the store record: (name, type, labels,
/// what it measures). The README's table is this list.
pub const METRICS: &[(&str, &str, &str, &str)] = &[
    (
        "postbox_queue_messages_ready",
        "gauge",
        "queue",
        "messages waiting for a consumer",
    ),
    (
        "postbox_queue_messages_unacked",
        "gauge",
        "queue",
        "deliveries waiting to be settled",
    ),
    (
        "postbox_queue_ready_bytes",
        "gauge",
        "queue",
        "payload bytes of the ready messages",
    ),
    (
        "postbox_queue_consumers",
        "gauge",
        "queue",
        "registered consumers",
    ),
    (
        "postbox_queue_head_age_seconds",
        "gauge",
        "queue",
        "age of the message to be delivered next (0 when empty)",
    ),
    (
        "postbox_queue_waiting_publishes",
        "gauge",
        "queue",
        "publishes waiting for room (overflow block)",
    ),
    (
        "postbox_queue_published_total",
        "counter",
        "queue",
        "messages enqueued",
    ),
    (
        "postbox_queue_delivered_total",
        "counter",
        "queue",
        "deliveries, redeliveries included",
    ),
    (
        "postbox_queue_redelivered_total",
        "counter",
        "queue",
        "redeliveries",
    ),
    (
        "postbox_queue_acknowledged_total",
        "counter",
        "queue",
        "deliveries acknowledged (or auto-acked)",
    ),
    (
        "postbox_queue_rejected_total",
        "counter",
        "queue",
        "deliveries rejected without requeue",
    ),
    (
        "postbox_queue_requeued_total",
        "counter",
        "queue",
        "deliveries requeued",
    ),
    (
        "postbox_queue_dead_lettered_total",
        "counter",
        "queue",
        "messages dead-lettered to a queue or stream",
    ),
    (
        "postbox_queue_refused_total",
        "counter",
        "queue",
        "publishes refused by a full reject-publish queue",
    ),
    (
        "postbox_queue_dropped_total",
        "counter",
        "queue, reason",
        "messages removed unconsumed: reason expired, maxlen, delivery_limit or shed",
    ),
    (
        "postbox_queue_publish_rate",
        "gauge",
        "queue",
        "messages enqueued per second over the last interval",
    ),
    (
        "postbox_queue_deliver_rate",
        "gauge",
        "queue",
        "deliveries per second over the last interval",
    ),
    (
        "postbox_queue_ack_rate",
        "gauge",
        "queue",
        "acknowledgements per second over the last interval",
    ),
    (
        "postbox_stream_records",
        "gauge",
        "stream",
        "records retained",
    ),
    (
        "postbox_stream_bytes",
        "gauge",
        "stream",
        "payload bytes retained",
    ),
    (
        "postbox_stream_subscribers",
        "gauge",
        "stream",
        "live subscribers",
    ),
    (
        "postbox_stream_published_total",
        "counter",
        "stream",
        "records appended",
    ),
    ("postbox_alerts_firing", "gauge", "", "alerts firing now"),
    (
        "postbox_delivery_latency_seconds",
        "histogram",
        "queue",
        "from a message's timestamp to its delivery (sampled)",
    ),
    (
        "postbox_confirm_latency_seconds",
        "histogram",
        "",
        "from a persistent publish to its confirmation by the store",
    ),
];

/// One delivery in this many is timed for `postbox_delivery_latency_seconds`:
/// enough for percentiles, and a small cost on the queue's hot path.
pub const LATENCY_SAMPLE_EVERY: u64 = 16;

/// Records a sample's counters and gauges.
pub(super) fn record(sample: &Sample, alerts_firing: usize) {
    for q in &sample.queues {
        let s = &q.stats;
        let gauges = [
            ("postbox_queue_messages_ready", s.ready as f64),
            ("postbox_queue_messages_unacked", s.unacked as f64),
            ("postbox_queue_ready_bytes", s.ready_bytes as f64),
            ("postbox_queue_consumers", s.consumers as f64),
            (
                "postbox_queue_head_age_seconds",
                q.head_age_ms.unwrap_or(0) as f64 / 1e3,
            ),
            (
                "postbox_queue_waiting_publishes",
                q.waiting_publishes as f64,
            ),
        ];
        let rates = q.rates.iter().flat_map(|r| {
            [
                ("postbox_queue_publish_rate", r.publish),
                ("postbox_queue_deliver_rate", r.deliver),
                ("postbox_queue_ack_rate", r.ack),
            ]
        });
        for (name, value) in gauges.into_iter().chain(rates) {
            gauge!(name, "queue" => q.name.clone()).set(value);
        }
        let counters = [
            ("postbox_queue_published_total", s.published),
            ("postbox_queue_delivered_total", s.delivered),
            ("postbox_queue_redelivered_total", s.redelivered),
            ("postbox_queue_acknowledged_total", s.acknowledged),
            ("postbox_queue_rejected_total", s.rejected),
            ("postbox_queue_requeued_total", s.requeued),
            ("postbox_queue_dead_lettered_total", q.dead_lettered),
            ("postbox_queue_refused_total", s.refused),
        ];
        for (name, value) in counters {
            counter!(name, "queue" => q.name.clone()).absolute(value);
        }
        for (reason, n) in [
            ("expired", s.expired),
            ("maxlen", s.maxlen),
            ("delivery_limit", s.delivery_limit),
            ("shed", s.shed),
        ] {
            counter!("postbox_queue_dropped_total", "queue" => q.name.clone(), "reason" => reason)
                .absolute(n);
        }
    }
    for st in &sample.streams {
        let stream = st.name.clone();
        let s = &st.stats;
        gauge!("postbox_stream_records", "stream" => stream.clone()).set(s.len as f64);
        gauge!("postbox_stream_bytes", "stream" => stream.clone()).set(s.bytes as f64);
        gauge!("postbox_stream_subscribers", "stream" => stream.clone()).set(s.subscribers as f64);
        counter!("postbox_stream_published_total", "stream" => stream).absolute(s.published);
    }
    gauge!("postbox_alerts_firing").set(alerts_firing as f64);
}

/// Times one delivery in [`LATENCY_SAMPLE_EVERY`]: from the message's
/// timestamp to its delivery, per queue.
#[derive(Default)]
pub(super) struct DeliveryLatency {
    /// Histogram handles by queue, so that a timed delivery does not build
    /// a metric key.
    histograms: RwLock<FxHashMap<Box<str>, Histogram>>,
}

impl DeliveryLatency {
    pub(super) fn delivered(&self, queue: &str, _: ConsumerId, _: DeliveryTag, m: &Envelope) {
        // Counted per thread: the queues' threads share no counter.
        thread_local!(static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        let seen = SEEN.with(|s| {
            let n = s.get();
            s.set(n.wrapping_add(1));
            n
        });
        if !seen.is_multiple_of(LATENCY_SAMPLE_EVERY) {
            return;
        }
        let waited = postbox::clock::now_ms().saturating_sub(m.timestamp_ms()) as f64 / 1e3;
        if let Some(h) = self.histograms.read().get(queue) {
            return h.record(waited);
        }
        let h = histogram!("postbox_delivery_latency_seconds", "queue" => queue.to_string());
        h.record(waited);
        self.histograms.write().insert(queue.into(), h);
    }

    /// Drops the handles of queues that are gone.
    pub(super) fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.histograms.write().retain(|q, _| alive(q));
    }
}
