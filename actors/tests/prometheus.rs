//! The Prometheus exporter (feature `prometheus`): the monitor's metrics,
//! rendered, parse as Prometheus' text format and carry every documented
//! name (`monitor::METRICS`), with the values of the sample.

#![cfg(feature = "prometheus")]

use std::collections::BTreeSet;
use std::time::Duration;

use postbox::testkit::local;
use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::monitor::{METRICS, MonitorOptions, Thresholds, prometheus};
use postbox_actors::{
    AckMode, Broker, ConsumeOptions, Delivery, Envelope, QueueOptions, StorageOptions,
    StreamOptions,
};

mod common;
use common::msg;

#[tokio::test(start_paused = true)]
async fn the_exported_metrics_parse_and_carry_the_documented_names() {
    // The process-wide recorder: this test binary holds only this test.
    let handle = prometheus::install().expect("no recorder installed yet");
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(1).unwrap();
    // A durable queue, for the confirm latency.
    {
        let durable = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
        durable
            .declare_queue("stored", QueueOptions::default().durable())
            .await
            .unwrap();
        durable
            .publish("stored", msg(1).with_persistent(true))
            .await
            .unwrap();
    }
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("orders", QueueOptions::default().max_length(100))
            .await
            .unwrap();
        broker
            .declare_stream("events", StreamOptions::default())
            .await
            .unwrap();
        let options = MonitorOptions::default()
            .interval(Duration::from_secs(1))
            .thresholds(Thresholds::default().depth(10));
        let _monitor = broker.monitor(options);
        let _consumer = broker
            .consume("orders", ConsumeOptions::manual(10), || {
                |d: Delivery| async move {
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            })
            .await
            .unwrap();
        for n in 0..200 {
            broker.publish("orders", msg(n)).await.unwrap();
        }
        broker
            .stream("events")
            .unwrap()
            .publish(Envelope::new("e"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let _ = broker.get("orders", AckMode::Auto).await;
    })
    .await;
    let text = handle.render();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for (name, kind, _, _) in METRICS {
        // Histograms render as summaries: name plus _sum and _count.
        let present = names.contains(name)
            || (*kind == "histogram" && names.contains(format!("{name}_count").as_str()));
        assert!(present, "{name} missing from:\n{text}");
    }
    let published = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "postbox_queue_published_total" && s.labels.get("queue") == Some("orders")
        })
        .expect("orders' published counter");
    assert!(
        matches!(published.value, prometheus_parse::Value::Counter(v) if v == 200.0),
        "{published:?}"
    );
    rt.shutdown();
}
