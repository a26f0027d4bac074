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
        "messages removed unconsumed: reason expired, maxlen or delivery_limit",
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
        let queue = q.name.clone();
        let s = &q.stats;
        gauge!("postbox_queue_messages_ready", "queue" => queue.clone()).set(s.ready as f64);
        gauge!("postbox_queue_messages_unacked", "queue" => queue.clone()).set(s.unacked as f64);
        gauge!("postbox_queue_ready_bytes", "queue" => queue.clone()).set(s.ready_bytes as f64);
        gauge!("postbox_queue_consumers", "queue" => queue.clone()).set(s.consumers as f64);
        gauge!("postbox_queue_head_age_seconds", "queue" => queue.clone())
            .set(q.head_age_ms.unwrap_or(0) as f64 / 1e3);
        gauge!("postbox_queue_waiting_publishes", "queue" => queue.clone())
            .set(q.waiting_publishes as f64);
        counter!("postbox_queue_published_total", "queue" => queue.clone()).absolute(s.published);
        counter!("postbox_queue_delivered_total", "queue" => queue.clone()).absolute(s.delivered);
        counter!("postbox_queue_redelivered_total", "queue" => queue.clone())
            .absolute(s.redelivered);
        counter!("postbox_queue_acknowledged_total", "queue" => queue.clone())
            .absolute(s.acknowledged);
        counter!("postbox_queue_rejected_total", "queue" => queue.clone()).absolute(s.rejected);
        counter!("postbox_queue_requeued_total", "queue" => queue.clone()).absolute(s.requeued);
        counter!("postbox_queue_dead_lettered_total", "queue" => queue.clone())
            .absolute(q.dead_lettered);
        counter!("postbox_queue_refused_total", "queue" => queue.clone()).absolute(s.refused);
        for (reason, n) in [
            ("expired", s.expired),
            ("maxlen", s.maxlen),
            ("delivery_limit", s.delivery_limit),
        ] {
            counter!("postbox_queue_dropped_total", "queue" => queue.clone(), "reason" => reason)
                .absolute(n);
        }
        if let Some(rates) = &q.rates {
            gauge!("postbox_queue_publish_rate", "queue" => queue.clone()).set(rates.publish);
            gauge!("postbox_queue_deliver_rate", "queue" => queue.clone()).set(rates.deliver);
            gauge!("postbox_queue_ack_rate", "queue" => queue).set(rates.ack);
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
