//! The monitor: samples with rates, and alerts that fire once per crossing
//! and clear once, for depth, age, missing consumers, crash loops and
//! blocked publishers. Paused time: the intervals are virtual.

use std::time::Duration;

use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::monitor::{Alert, AlertKind, MonitorOptions, Thresholds};
use postbox_actors::{Broker, ConsumeOptions, Delivery, Overflow, QueueOptions};
use tokio::sync::broadcast;

mod common;
use common::msg;

const SECOND: Duration = Duration::from_secs(1);

/// Every alert received so far.
fn drain(rx: &mut broadcast::Receiver<Alert>) -> Vec<Alert> {
    let mut out = Vec::new();
    while let Ok(a) = rx.try_recv() {
        out.push(a);
    }
    out
}

/// Lets `n` sampling intervals of a second pass.
async fn intervals(n: u32) {
    for _ in 0..n {
        tokio::time::sleep(SECOND).await;
    }
    // The sample after the last tick.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_depth_alert_fires_once_per_crossing_and_clears_once() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        let options = MonitorOptions::default()
            .interval(SECOND)
            .thresholds(Thresholds::default().depth(5));
        let monitor = broker.monitor(options);
        let mut alerts = monitor.alerts();
        for n in 0..10 {
            broker.publish("orders", msg(n)).await.unwrap();
        }
        intervals(1).await;
        let fired = drain(&mut alerts);
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert!(fired[0].firing && fired[0].queue == "orders");
        assert_eq!(
            fired[0].kind,
            AlertKind::Depth {
                ready: 10,
                threshold: 5
            }
        );
        // Still over: nothing new, however many samples.
        for n in 10..20 {
            broker.publish("orders", msg(n)).await.unwrap();
        }
        intervals(3).await;
        assert!(drain(&mut alerts).is_empty());
        assert_eq!(monitor.firing().len(), 1);
        // Back under: cleared, once.
        broker.purge_queue("orders").await.unwrap();
        intervals(3).await;
        let cleared = drain(&mut alerts);
        assert_eq!(cleared.len(), 1, "{cleared:?}");
        assert!(!cleared[0].firing);
        assert!(monitor.firing().is_empty());
        // Over again: a second crossing fires again.
        for n in 0..6 {
            broker.publish("orders", msg(n)).await.unwrap();
        }
        intervals(1).await;
        let again = drain(&mut alerts);
        assert_eq!(again.len(), 1);
        assert!(again[0].firing);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn samples_carry_rates_and_the_age_of_the_next_message() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let monitor = broker.monitor(MonitorOptions::default().interval(SECOND));
        let mut samples = monitor.samples();
        // 500 messages in the first interval, 200 in the next two each.
        for n in 0..500 {
            broker.publish("q", msg(n)).await.unwrap();
        }
        let first = samples.recv().await.unwrap();
        let q = &first.queues[0];
        assert_eq!((q.name.as_str(), q.stats.ready), ("q", 500));
        assert!(q.rates.is_none(), "no rate at the first sample");
        for _ in 0..2 {
            for n in 0..200 {
                broker.publish("q", msg(n)).await.unwrap();
            }
            let s = samples.recv().await.unwrap();
            let rates = s.queues[0].rates.expect("a rate");
            assert!(
                (rates.publish - 200.0).abs() < 1.0,
                "200 a second: {rates:?}"
            );
            assert_eq!(rates.deliver, 0.0);
        }
        // The head was published at the start: about three seconds old.
        let latest = monitor.latest().unwrap();
        assert!(latest.queues[0].consumers.is_empty());
        let age = latest.queues[0].head_age_ms.unwrap();
        assert!((2_900..=3_100).contains(&age), "{age}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn age_and_missing_consumer_alerts_fire_and_clear() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let thresholds = Thresholds::default()
            .oldest_message(Duration::from_secs(5))
            .no_consumers();
        let options = MonitorOptions::default()
            .interval(SECOND)
            .queue_thresholds("q", thresholds);
        let monitor = broker.monitor(options);
        let mut alerts = monitor.alerts();
        broker.publish("q", msg(1)).await.unwrap();
        intervals(1).await;
        let first = drain(&mut alerts);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(matches!(first[0].kind, AlertKind::NoConsumers { ready: 1 }));
        intervals(5).await;
        let aged = drain(&mut alerts);
        assert_eq!(aged.len(), 1, "{aged:?}");
        assert!(matches!(aged[0].kind, AlertKind::OldestMessage { .. }) && aged[0].firing);
        // A consumer takes it: both clear.
        let _c = broker
            .consume("q", ConsumeOptions::auto(), || {
                |_: Delivery| async { Ok::<(), Failure>(()) }
            })
            .await
            .unwrap();
        intervals(1).await;
        let cleared = drain(&mut alerts);
        assert_eq!(cleared.len(), 2, "{cleared:?}");
        assert!(cleared.iter().all(|a| !a.firing));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_consumer_is_reported_and_cleared_when_it_stops() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let thresholds = Thresholds::default().crash_loop(3, Duration::from_secs(10));
        let options = MonitorOptions::default()
            .interval(SECOND)
            .thresholds(thresholds);
        let monitor = broker.monitor(options);
        let mut alerts = monitor.alerts();
        let consumer = broker
            .consume("q", ConsumeOptions::manual(1), || {
                |_: Delivery| async {
                    panic!("poison");
                    #[allow(unreachable_code)]
                    Ok::<(), Failure>(())
                }
            })
            .await
            .unwrap();
        broker.publish("q", msg(1)).await.unwrap();
        intervals(3).await;
        let fired = drain(&mut alerts);
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert!(
            matches!(fired[0].kind, AlertKind::CrashLooping { crashes, .. } if crashes >= 3),
            "{fired:?}"
        );
        let _ = consumer.close().await;
        broker.purge_queue("q").await.unwrap();
        intervals(12).await;
        let cleared = drain(&mut alerts);
        assert_eq!(cleared.len(), 1, "{cleared:?}");
        assert!(!cleared[0].firing);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn publishers_blocked_too_long_fire_an_alert() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default()
            .max_length(2)
            .overflow(Overflow::Block);
        broker.declare_queue("q", options).await.unwrap();
        let thresholds = Thresholds::default().publishers_blocked(Duration::from_secs(3));
        let monitor = broker.monitor(
            MonitorOptions::default()
                .interval(SECOND)
                .thresholds(thresholds),
        );
        let mut alerts = monitor.alerts();
        for n in 0..3 {
            broker.publish("q", msg(n)).await.unwrap();
        }
        intervals(2).await;
        assert!(drain(&mut alerts).is_empty(), "not yet");
        intervals(3).await;
        let fired = drain(&mut alerts);
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert!(matches!(fired[0].kind, AlertKind::PublishersBlocked { .. }));
        broker
            .get("q", postbox_actors::AckMode::Auto)
            .await
            .unwrap()
            .unwrap();
        intervals(1).await;
        let cleared = drain(&mut alerts);
        assert_eq!(cleared.len(), 1);
        assert!(!cleared[0].firing);
    })
    .await;
}

/// The README's metrics table lists every metric the monitor records.
#[test]
fn the_readme_documents_every_metric() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the README");
    for (name, kind, _, _) in postbox_actors::monitor::METRICS {
        assert!(
            readme.contains(&format!("| `{name}` | {kind} |")),
            "{name} is not in the README's metrics table"
        );
    }
}
