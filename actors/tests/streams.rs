//! Streams: a shared log read by supervised subscribers, with retention,
//! backpressure, drop-oldest skips, restarts and typed errors.
//!
//! Everything runs in local mode on tokio's paused clock (one thread,
//! deterministic, no wall-clock waits), except one test across real arbiters.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Backoff, Failure, Runtime, RuntimeHandle};
use postbox_actors::NameKind;
use postbox_actors::{Broker, BrokerConfig, Envelope, NameError};
use postbox_actors::{
    StreamConsumer, StreamDelivery, StreamError, StreamOptions, StreamOverflow, StreamStart,
    SubscribeOptions, TryStreamPublishError,
};
use tokio::sync::{Semaphore, mpsc};

mod common;
use common::{Got, msg, reader, settle, settled};

fn offsets(got: &[Got], label: &str) -> Vec<u64> {
    got.iter()
        .filter(|g| g.label == label)
        .map(|g| g.offset)
        .collect()
}

fn values(got: &[Got], label: &str) -> Vec<u32> {
    got.iter()
        .filter(|g| g.label == label)
        .map(|g| g.value)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_subscriber_gets_every_record_in_order() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("ticks", StreamOptions::default())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut subs = Vec::new();
        for label in ["a", "b", "c"] {
            subs.push(
                stream
                    .subscribe(
                        StreamStart::Next,
                        SubscribeOptions::default().batch(7),
                        reader(label, &tx, None),
                    )
                    .await
                    .unwrap(),
            );
        }
        for i in 0..300u32 {
            assert_eq!(stream.publish(msg(i)).await.unwrap(), u64::from(i));
            if i % 50 == 0 {
                settle().await; // some published while subscribers are parked, some while busy
            }
        }
        let range = stream
            .publish_batch((300..310).map(msg).collect())
            .await
            .unwrap();
        assert_eq!(range, 300..310);
        let got = settled(&mut rx).await;
        for label in ["a", "b", "c"] {
            assert_eq!(values(&got, label), (0..310).collect::<Vec<_>>(), "{label}");
            assert_eq!(
                offsets(&got, label),
                (0..310).collect::<Vec<_>>(),
                "{label}"
            );
        }
        assert!(got.iter().all(|g| g.attempt == 0 && g.skipped == 0));
        let stats = stream.stats();
        assert_eq!((stats.published, stats.subscribers), (310, 3));
        for sub in subs {
            let s = sub.stats().unwrap();
            assert_eq!((s.offset, s.lag, s.delivered), (310, 0, 310));
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn late_subscribers_start_where_asked() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("history", StreamOptions::default().max_len(8))
            .await
            .unwrap();
        let mut sixth_at = 0;
        for i in 0..10u32 {
            let offset = stream.publish(msg(i)).await.unwrap();
            if offset == 6 {
                sixth_at = postbox::clock::now_ms();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 8 retained: offsets 2..=9.
        let stats = stream.stats();
        assert_eq!((stats.first_offset, stats.next_offset), (2, 10));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let starts = [
            ("first", StreamStart::First),
            ("last", StreamStart::Last),
            ("next", StreamStart::Next),
            ("offset", StreamStart::Offset(4)),
            ("old", StreamStart::Offset(0)),
            ("future", StreamStart::Offset(999)),
            ("time", StreamStart::Timestamp(sixth_at)),
            ("later", StreamStart::Timestamp(u64::MAX)),
        ];
        let mut subs = Vec::new();
        for (label, start) in starts {
            subs.push(
                stream
                    .subscribe(start, SubscribeOptions::default(), reader(label, &tx, None))
                    .await
                    .unwrap(),
            );
        }
        stream.publish(msg(10)).await.unwrap();
        let got = settled(&mut rx).await;
        let range = |a: u64, b: u64| (a..=b).collect::<Vec<_>>();
        assert_eq!(offsets(&got, "first"), range(2, 10));
        assert_eq!(offsets(&got, "last"), range(9, 10));
        assert_eq!(offsets(&got, "next"), range(10, 10));
        assert_eq!(offsets(&got, "offset"), range(4, 10));
        assert_eq!(offsets(&got, "old"), range(2, 10), "clamped to the oldest");
        assert_eq!(
            offsets(&got, "future"),
            range(10, 10),
            "clamped to the next"
        );
        assert_eq!(offsets(&got, "time"), range(6, 10));
        assert_eq!(offsets(&got, "later"), range(10, 10));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn block_overflow_parks_the_publisher_until_the_slowest_subscriber_advances() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("orders", StreamOptions::default().max_len(4))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let _fast = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default(),
                reader("fast", &tx, None),
            )
            .await
            .unwrap();
        let slow = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default(),
                reader("slow", &tx, Some(&gate)),
            )
            .await
            .unwrap();
        // The slow subscriber takes record 0 and waits on the gate: it holds
        // position 0, so exactly 4 records fit.
        for i in 0..4u32 {
            stream.publish(msg(i)).await.unwrap();
            settle().await;
        }
        let full = stream.try_publish(msg(4)).unwrap_err();
        let TryStreamPublishError::Full {
            stream: name,
            message,
        } = full
        else {
            panic!("expected Full, got {full:?}");
        };
        assert_eq!(name, "orders");
        assert_eq!(
            message.decode::<u32>().unwrap(),
            4,
            "the message comes back"
        );
        // A waiting publish parks...
        let publisher = {
            let stream = stream.clone();
            tokio::task::spawn_local(async move { stream.publish(msg(4)).await })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!publisher.is_finished(), "the publisher waits");
        assert_eq!(stream.stats().next_offset, 4);
        assert!(stream.stats().blocked >= 2);
        assert_eq!(slow.stats().unwrap().offset, 0);
        // ...until the slow subscriber finishes the batch holding record 0.
        gate.add_permits(1_000);
        assert_eq!(publisher.await.unwrap().unwrap(), 4);
        let got = settled(&mut rx).await;
        assert_eq!(values(&got, "fast"), vec![0, 1, 2, 3, 4]);
        assert_eq!(values(&got, "slow"), vec![0, 1, 2, 3, 4]);
        // Nothing was trimmed that a subscriber had not read.
        assert_eq!(stream.stats().skipped, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn publish_batch_waits_for_room_record_by_record() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("batch", StreamOptions::default().max_len(3))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _sub = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().batch(2),
                reader("s", &tx, None),
            )
            .await
            .unwrap();
        let range = stream
            .publish_batch((0..20).map(msg).collect())
            .await
            .unwrap();
        assert_eq!(range, 0..20);
        let got = settled(&mut rx).await;
        assert_eq!(values(&got, "s"), (0..20).collect::<Vec<_>>());
        assert!(stream.stats().blocked > 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn drop_oldest_skips_a_lagging_subscriber_and_tells_it_how_many() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream(
                "metrics",
                StreamOptions::default()
                    .max_len(4)
                    .overflow(StreamOverflow::DropOldest),
            )
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let slow = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default(),
                reader("slow", &tx, Some(&gate)),
            )
            .await
            .unwrap();
        stream.publish(msg(0)).await.unwrap();
        settle().await; // the subscriber holds record 0 and waits
        for i in 1..10u32 {
            // Never waits, never fails.
            stream.try_publish(msg(i)).unwrap();
        }
        let stats = stream.stats();
        assert_eq!((stats.first_offset, stats.len, stats.trimmed), (6, 4, 6));
        gate.add_permits(1_000);
        let got = settled(&mut rx).await;
        assert_eq!(offsets(&got, "slow"), vec![0, 6, 7, 8, 9]);
        let skipped: Vec<u64> = got.iter().map(|g| g.skipped).collect();
        assert_eq!(
            skipped,
            vec![0, 5, 0, 0, 0],
            "told once, on the first record after the gap"
        );
        assert_eq!(slow.stats().unwrap().skipped, 5);
        assert_eq!(stream.stats().skipped, 5);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retention_by_length_bytes_and_age() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        // Length (no subscribers: nothing holds block mode back).
        let by_len = broker
            .declare_stream("len", StreamOptions::default().max_len(3))
            .await
            .unwrap();
        for i in 0..10 {
            by_len.publish(msg(i)).await.unwrap();
        }
        let s = by_len.stats();
        assert_eq!(
            (s.first_offset, s.next_offset, s.len, s.trimmed),
            (7, 10, 3, 7)
        );

        // Bytes: 4-byte payloads, at most 10 bytes retained.
        let by_bytes = broker
            .declare_stream("bytes", StreamOptions::unbounded().max_bytes(10))
            .await
            .unwrap();
        for _ in 0..5 {
            by_bytes.publish(Envelope::new("abcd")).await.unwrap();
        }
        let s = by_bytes.stats();
        assert_eq!((s.first_offset, s.len, s.bytes), (3, 2, 8));
        by_bytes.publish(Envelope::new("0123456789")).await.unwrap();
        assert_eq!((by_bytes.stats().len, by_bytes.stats().bytes), (1, 10));
        // Larger than max_bytes can never fit: refused as too large.
        assert_eq!(
            by_bytes.publish(Envelope::new("0123456789X")).await,
            Err(StreamError::MessageTooLarge {
                stream: "bytes".into(),
                size: 11,
                limit: 10
            })
        );

        // Age: on postbox's clock, which follows the paused tokio clock.
        let by_age = broker
            .declare_stream(
                "age",
                StreamOptions::unbounded().max_age(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        for i in 0..3 {
            by_age.publish(msg(i)).await.unwrap();
        }
        tokio::time::advance(Duration::from_millis(600)).await;
        for i in 3..5 {
            by_age.publish(msg(i)).await.unwrap();
        }
        assert_eq!(by_age.stats().len, 5);
        tokio::time::advance(Duration::from_millis(500)).await;
        let s = by_age.stats();
        assert_eq!((s.first_offset, s.len), (3, 2));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(by_age.stats().len, 0);

        // Age in block mode does not trim what a live subscriber has not read.
        let held = broker
            .declare_stream(
                "held",
                StreamOptions::unbounded().max_age(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _sub = held
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().batch(1),
                reader("held", &tx, Some(&gate)),
            )
            .await
            .unwrap();
        for i in 0..3 {
            held.publish(msg(i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(held.stats().len, 3, "all unread: all kept");
        gate.add_permits(3);
        let got = settled(&mut rx).await;
        assert_eq!(values(&got, "held"), vec![0, 1, 2]);
        assert_eq!(held.stats().len, 0, "read, then expired");
    })
    .await;
}

/// Fails (error) on offset 3 and panics on offset 7, once each.
struct Flaky {
    tx: mpsc::UnboundedSender<Got>,
    failed: Arc<Mutex<HashSet<u64>>>,
}

impl StreamConsumer for Flaky {
    async fn handle(&mut self, d: StreamDelivery) -> Result<(), Failure> {
        let first_time = self.failed.lock().insert(d.offset());
        if first_time && d.offset() == 3 {
            return Err(Failure::msg("poison 3"));
        }
        if first_time && d.offset() == 7 {
            panic!("poison 7");
        }
        let _ = self.tx.send(Got {
            label: "flaky",
            offset: d.offset(),
            value: d.decode()?,
            attempt: d.attempt(),
            skipped: d.skipped(),
        });
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_crashed_subscriber_restarts_at_the_record_it_failed_on() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("jobs", StreamOptions::default().max_len(4))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let factory = {
            let (tx, failed) = (tx.clone(), failed.clone());
            move || Flaky {
                tx: tx.clone(),
                failed: failed.clone(),
            }
        };
        let options = SubscribeOptions::default().backoff(Backoff::exponential(
            Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        let sub = stream
            .subscribe(StreamStart::Next, options, factory)
            .await
            .unwrap();
        let publisher = {
            let stream = stream.clone();
            tokio::task::spawn_local(async move {
                for i in 0..10 {
                    stream.publish(msg(i)).await.unwrap();
                }
            })
        };
        // While it restarts (1 s backoff), its position holds block-mode
        // retention: the publisher cannot run ahead by more than 4.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(sub.stats().unwrap().offset, 3);
        assert_eq!(stream.stats().next_offset, 7);
        assert!(!publisher.is_finished());
        publisher.await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await; // past the second restart
        let got = settled(&mut rx).await;
        // Every record handled successfully exactly once, in order.
        assert_eq!(values(&got, "flaky"), (0..10).collect::<Vec<_>>());
        let attempts: Vec<(u64, u32)> = got
            .iter()
            .filter(|g| g.attempt > 0)
            .map(|g| (g.offset, g.attempt))
            .collect();
        assert_eq!(attempts, vec![(3, 1), (7, 1)], "flagged as redeliveries");
        assert_eq!(sub.addr().stats().restarts, 2);
        let stats = sub.stats().unwrap();
        assert_eq!(
            (stats.offset, stats.delivered, stats.redeliveries),
            (10, 10, 2)
        );
    })
    .await;
}

/// Always fails.
struct Broken;
impl StreamConsumer for Broken {
    async fn handle(&mut self, _: StreamDelivery) -> Result<(), Failure> {
        Err(Failure::msg("broken"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_past_its_restart_limit_releases_its_position() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("doomed", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        let sub = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().restarts(2, Duration::from_secs(60)),
                || Broken,
            )
            .await
            .unwrap();
        let publisher = {
            let stream = stream.clone();
            tokio::task::spawn_local(async move {
                for i in 0..10 {
                    stream.publish(msg(i)).await.unwrap();
                }
            })
        };
        let reason = sub.terminated().await;
        assert!(reason.is_failure(), "{reason}");
        publisher.await.unwrap();
        assert_eq!(stream.stats().subscribers, 0);
        assert!(sub.stats().is_none());
    })
    .await;
}

/// Takes one virtual second per record.
struct Slow(mpsc::UnboundedSender<u64>);
impl StreamConsumer for Slow {
    async fn handle(&mut self, d: StreamDelivery) -> Result<(), Failure> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = self.0.send(d.offset());
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_is_graceful_and_releases_blocked_publishers() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("slow", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sub = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().batch(2),
                move || Slow(tx.clone()),
            )
            .await
            .unwrap();
        let publisher = {
            let stream = stream.clone();
            tokio::task::spawn_local(async move {
                for i in 0..100 {
                    stream.publish(msg(i)).await.unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(!publisher.is_finished());
        let stats = sub.cancel().await.unwrap();
        // It finished the batch in hand: its position is right after what it handled.
        let mut handled = Vec::new();
        while let Ok(o) = rx.try_recv() {
            handled.push(o);
        }
        assert_eq!(handled, (0..stats.offset).collect::<Vec<_>>());
        assert!(stats.offset >= 3 && stats.offset < 100);
        // Its position no longer holds anyone back.
        publisher.await.unwrap();
        assert_eq!(stream.stats().subscribers, 0);
        assert_eq!(stream.stats().next_offset, 100);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn named_subscribers_resume_where_they_stopped() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("audit", StreamOptions::unbounded())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let named = SubscribeOptions::default().named("auditor");
        let first = stream
            .subscribe(StreamStart::First, named.clone(), reader("one", &tx, None))
            .await
            .unwrap();
        let dup = stream
            .subscribe(StreamStart::First, named.clone(), reader("dup", &tx, None))
            .await;
        assert!(matches!(dup, Err(StreamError::SubscriberExists { .. })));
        for i in 0..5 {
            stream.publish(msg(i)).await.unwrap();
        }
        settle().await;
        first.cancel().await;
        assert_eq!(stream.stored_offset("auditor"), Some(5));
        for i in 5..8 {
            stream.publish(msg(i)).await.unwrap();
        }
        // Asks for First, resumes at its stored position instead.
        let _again = stream
            .subscribe(StreamStart::First, named, reader("two", &tx, None))
            .await
            .unwrap();
        let got = settled(&mut rx).await;
        assert_eq!(values(&got, "one"), vec![0, 1, 2, 3, 4]);
        assert_eq!(values(&got, "two"), vec![5, 6, 7]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn delete_stream_stops_its_subscribers_and_fails_its_publishers() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let stream = broker
            .declare_stream("gone", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let parked = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default(),
                reader("parked", &tx, None),
            )
            .await
            .unwrap();
        let gated = stream
            .subscribe(
                StreamStart::Next,
                SubscribeOptions::default().batch(1),
                reader("gated", &tx, Some(&gate)),
            )
            .await
            .unwrap();
        stream.publish(msg(0)).await.unwrap();
        stream.publish(msg(1)).await.unwrap();
        let blocked = {
            let stream = stream.clone();
            tokio::task::spawn_local(async move { stream.publish(msg(2)).await })
        };
        settle().await;
        assert!(!blocked.is_finished());
        let deleting = {
            let broker = broker.clone();
            tokio::task::spawn_local(async move { broker.delete_stream("gone").await })
        };
        settle().await;
        // The waiting publisher is refused at once.
        assert_eq!(
            blocked.await.unwrap(),
            Err(StreamError::NotFound("gone".into()))
        );
        // The gated subscriber finishes the batch in hand, then stops.
        gate.add_permits(1);
        let stats = deleting.await.unwrap().unwrap();
        assert_eq!(stats.next_offset, 2);
        assert!(!parked.terminated().await.is_failure());
        assert!(!gated.terminated().await.is_failure());
        assert_eq!(
            stream.publish(msg(3)).await,
            Err(StreamError::NotFound("gone".into()))
        );
        assert!(stream.is_deleted());
        assert!(matches!(
            broker.stream("gone"),
            Err(StreamError::NotFound(_))
        ));
        assert!(matches!(
            broker.delete_stream("gone").await,
            Err(StreamError::NotFound(_))
        ));
        assert!(broker.stream_names().is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_a_typed_error() {
    local(async {
        let mut config = BrokerConfig::default();
        // 48 bytes of fixed fields, 8 of payload.
        config.max_message_bytes = 56;
        let broker = Broker::with_config(&RuntimeHandle::local(), config);
        assert_eq!(
            broker
                .declare_stream("", StreamOptions::default())
                .await
                .unwrap_err(),
            StreamError::InvalidName(NameError::Empty {
                kind: NameKind::Stream
            })
        );
        assert!(matches!(
            broker
                .declare_stream("a\nb", StreamOptions::default())
                .await,
            Err(StreamError::InvalidName(NameError::ControlChar { .. }))
        ));
        assert!(matches!(
            broker
                .declare_stream(&"s".repeat(256), StreamOptions::default())
                .await,
            Err(StreamError::InvalidName(NameError::TooLong { .. }))
        ));
        assert_eq!(
            broker.stream("nope").unwrap_err(),
            StreamError::NotFound("nope".into())
        );
        let s = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        // Same options again: the same stream.
        broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        let mismatch = broker
            .declare_stream("s", StreamOptions::default().max_len(5))
            .await
            .unwrap_err();
        assert!(matches!(mismatch, StreamError::Mismatch { ref name, .. } if name == "s"));
        // The broker's message size limit applies, unless the stream sets its own.
        let too_large = StreamError::MessageTooLarge {
            stream: "s".into(),
            size: 57,
            limit: 56,
        };
        assert_eq!(
            s.publish(Envelope::new("123456789")).await,
            Err(too_large.clone())
        );
        assert!(matches!(
            s.try_publish(Envelope::new("123456789")),
            Err(TryStreamPublishError::Refused(ref e)) if *e == too_large
        ));
        assert_eq!(
            s.publish_batch(vec![Envelope::new("1"), Envelope::new("123456789")])
                .await,
            Err(too_large)
        );
        assert_eq!(s.stats().published, 0, "a refused batch appends nothing");
        let big = broker
            .declare_stream("big", StreamOptions::default().max_message_bytes(100))
            .await
            .unwrap();
        big.publish(Envelope::new("123456789")).await.unwrap();
    })
    .await;
}

#[test]
fn subscribers_on_real_arbiters_get_everything_in_order() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        let broker = Broker::new(&rt);
        let stream = broker
            .declare_stream("live", StreamOptions::default().max_len(64))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let labels = ["a", "b", "c", "d"];
        for label in labels {
            stream
                .subscribe(
                    StreamStart::Next,
                    SubscribeOptions::default().batch(16),
                    reader(label, &tx, None),
                )
                .await
                .unwrap();
        }
        let n = 5_000u32;
        for i in 0..n {
            stream.publish(msg(i)).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < labels.len() * n as usize {
            let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("every record arrives")
                .unwrap();
            got.push(next);
        }
        for label in labels {
            assert_eq!(values(&got, label), (0..n).collect::<Vec<_>>(), "{label}");
        }
        assert_eq!(stream.stats().skipped, 0);
    });
    rt.shutdown();
}

#[test]
fn drop_oldest_on_real_arbiters_skips_only_what_it_reports() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        let broker = Broker::new(&rt);
        let stream = broker
            .declare_stream(
                "lossy",
                StreamOptions::default()
                    .max_len(16)
                    .overflow(StreamOverflow::DropOldest),
            )
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let labels = ["a", "b", "c", "d"];
        let mut subs = Vec::new();
        for label in labels {
            subs.push(
                stream
                    .subscribe(
                        StreamStart::First,
                        SubscribeOptions::default().batch(8),
                        reader(label, &tx, None),
                    )
                    .await
                    .unwrap(),
            );
        }
        let n = 20_000u32;
        for i in 0..n {
            stream.publish(msg(i)).await.unwrap();
        }
        // Every subscriber ends with the last record, which is never trimmed.
        let mut got = Vec::new();
        let mut finished = HashSet::new();
        while finished.len() < labels.len() {
            let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the last record arrives")
                .unwrap();
            if next.offset == u64::from(n - 1) {
                finished.insert(next.label);
            }
            got.push(next);
        }
        for (label, sub) in labels.into_iter().zip(&subs) {
            let mine: Vec<&Got> = got.iter().filter(|g| g.label == label).collect();
            let mut expect = 0u64;
            let mut reported = 0u64;
            for g in &mine {
                assert_eq!(
                    g.offset,
                    expect + g.skipped,
                    "{label}: a gap it was not told about"
                );
                assert_eq!(u64::from(g.value), g.offset);
                reported += g.skipped;
                expect = g.offset + 1;
            }
            assert_eq!(expect, u64::from(n));
            assert_eq!(mine.len() as u64 + reported, u64::from(n), "{label}");
            assert_eq!(sub.stats().unwrap().skipped, reported, "{label}");
        }
    });
    rt.shutdown();
}
