//! Point-to-point queues through the broker: competing consumers, prefetch,
//! acknowledgements, requeue order, crashes, typed errors, backpressure.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::{TestProbe, local};
use postbox::{Failure, Message, Runtime, RuntimeHandle};
use postbox_actors::testkit::DeliveryProbe;
use postbox_actors::{
    AckError, AckMode, Broker, BrokerError, ConsumeOptions, Consumer, DeleteOptions, Delivery,
    Envelope, NameError, QueueOptions, TryPublishError,
};
use tokio::sync::mpsc;

mod common;
use common::{WAIT, msg};

/// What a recording consumer saw of one delivery.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    consumer: usize,
    n: u32,
    redelivered: bool,
    count: u32,
}

/// Per-consumer count of deliveries held (received, not yet acked) and its peak.
#[derive(Default)]
struct Holding {
    now: HashMap<usize, usize>,
    peak: HashMap<usize, usize>,
}

/// Records each delivery, then acks it from a separate task after a few yields,
/// so that several deliveries are held at once.
struct Recorder {
    id: usize,
    seen: mpsc::UnboundedSender<Seen>,
    holding: Arc<Mutex<Holding>>,
}

impl Consumer for Recorder {
    async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
        let n: u32 = d.decode()?;
        {
            let mut h = self.holding.lock();
            let now = h.now.entry(self.id).or_default();
            *now += 1;
            let now = *now;
            let peak = h.peak.entry(self.id).or_default();
            *peak = (*peak).max(now);
        }
        let (id, holding, seen) = (self.id, self.holding.clone(), self.seen.clone());
        let delay = (n % 7) as usize;
        tokio::task::spawn_local(async move {
            for _ in 0..delay {
                tokio::task::yield_now().await;
            }
            *holding.lock().now.entry(id).or_default() -= 1;
            d.ack().await.expect("ack");
            let _ = seen.send(Seen {
                consumer: id,
                n,
                redelivered: d.redelivered(),
                count: d.delivery_count(),
            });
        });
        Ok(())
    }
}

async fn competing_consumers(rt: RuntimeHandle) {
    const N: u32 = 10_000;
    const PREFETCH: u32 = 8;
    let broker = Broker::new(&rt);
    broker
        .declare_queue("work", QueueOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let holding = Arc::new(Mutex::new(Holding::default()));
    let mut consumers = Vec::new();
    for id in 0..4 {
        let (tx, holding) = (tx.clone(), holding.clone());
        let handle = broker
            .consume("work", ConsumeOptions::manual(PREFETCH), move || Recorder {
                id,
                seen: tx.clone(),
                holding: holding.clone(),
            })
            .await
            .unwrap();
        consumers.push(handle);
    }
    let queue = broker.queue("work").unwrap();
    for n in 0..N {
        queue.publish(msg(n)).await.unwrap();
    }
    let mut by_message = vec![0u32; N as usize];
    let mut by_consumer = [0u32; 4];
    for _ in 0..N {
        let seen = rx.recv().await.unwrap();
        by_message[seen.n as usize] += 1;
        by_consumer[seen.consumer] += 1;
        assert!(!seen.redelivered);
    }
    assert!(
        by_message.iter().all(|&c| c == 1),
        "every message exactly once"
    );
    assert!(
        by_consumer.iter().all(|&c| c > 0),
        "all consumers worked: {by_consumer:?}"
    );
    let peaks = holding.lock().peak.clone();
    for (id, peak) in &peaks {
        assert!(
            *peak <= PREFETCH as usize,
            "consumer {id} held {peak} > prefetch"
        );
    }
    assert!(
        peaks.values().any(|&p| p > 1),
        "deliveries were held concurrently: {peaks:?}"
    );
    let stats = broker.queue_stats("work").await.unwrap().stats;
    assert_eq!(
        (stats.published, stats.delivered, stats.acknowledged),
        (10_000, 10_000, 10_000)
    );
    assert_eq!((stats.ready, stats.unacked, stats.consumers), (0, 0, 4));
    assert!(rx.try_recv().is_err(), "no extra deliveries");
}

#[tokio::test(start_paused = true)]
async fn competing_consumers_on_one_thread() {
    local(competing_consumers(RuntimeHandle::local())).await;
}

#[test]
fn competing_consumers_across_arbiters() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    driver.block_on(competing_consumers(rt.handle()));
}

#[tokio::test(start_paused = true)]
async fn a_requeued_message_comes_back_first_flagged_and_counted() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        for n in 1..=3 {
            broker.publish("q", msg(n)).await.unwrap();
        }
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let _c = broker
            .consume("q", ConsumeOptions::manual(2), probe.consumer())
            .await
            .unwrap();
        let m1 = probe.expect_delivery(WAIT).await;
        let m2 = probe.expect_delivery(WAIT).await;
        assert_eq!(
            (m1.decode::<u32>().unwrap(), m2.decode::<u32>().unwrap()),
            (1, 2)
        );
        assert!(!m1.redelivered());
        assert_eq!(m1.delivery_count(), 1);
        m1.nack(true).await.unwrap();
        let again = probe.expect_delivery(WAIT).await;
        assert_eq!(again.decode::<u32>().unwrap(), 1);
        assert!(again.redelivered());
        assert_eq!(again.delivery_count(), 2);
        assert_eq!(again.id(), m1.id());
        again.ack().await.unwrap();
        let m3 = probe.expect_delivery(WAIT).await;
        assert_eq!(m3.decode::<u32>().unwrap(), 3);
        assert!(!m3.redelivered());
        // multiple: settles m2 and m3 at once.
        assert_eq!(m3.ack_multiple().await.unwrap(), 2);
        // reject discards.
        broker.publish("q", msg(4)).await.unwrap();
        probe
            .expect_delivery(WAIT)
            .await
            .reject(false)
            .await
            .unwrap();
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!(
            (
                stats.published,
                stats.delivered,
                stats.redelivered,
                stats.acknowledged,
                stats.rejected,
                stats.requeued
            ),
            (4, 5, 1, 3, 1, 1)
        );
        assert_eq!((stats.ready, stats.unacked), (0, 0));
    })
    .await;
}

/// Holds every delivery unacked; the first incarnation panics on its 10th.
struct Hoarder {
    held: Vec<Delivery>,
    crashed: Arc<AtomicBool>,
    seen: mpsc::UnboundedSender<Seen>,
}

impl Consumer for Hoarder {
    async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
        let n: u32 = d.decode()?;
        if !self.crashed.load(Ordering::SeqCst) {
            self.held.push(d);
            if self.held.len() == 10 {
                self.crashed.store(true, Ordering::SeqCst);
                panic!("crash while holding 10 deliveries");
            }
            return Ok(());
        }
        let _ = self.seen.send(Seen {
            consumer: 0,
            n,
            redelivered: d.redelivered(),
            count: d.delivery_count(),
        });
        d.ack().await?;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_panics_holding_ten_deliveries_gets_them_all_back() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let crashed = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = crashed.clone();
        let consumer = broker
            .consume("jobs", ConsumeOptions::manual(10), move || Hoarder {
                held: Vec::new(),
                crashed: c.clone(),
                seen: tx.clone(),
            })
            .await
            .unwrap();
        let first_registration = consumer.consumer_id().await.unwrap();
        for n in 0..10 {
            broker.publish("jobs", msg(n)).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(rx.recv().await.unwrap());
        }
        assert!(crashed.load(Ordering::SeqCst));
        got.sort_by_key(|s| s.n);
        for (i, s) in got.iter().enumerate() {
            assert_eq!(s.n, i as u32);
            assert!(s.redelivered, "{s:?}");
            assert_eq!(s.count, 2, "{s:?}");
        }
        let stats = broker.queue_stats("jobs").await.unwrap().stats;
        assert_eq!(
            (
                stats.acknowledged,
                stats.requeued,
                stats.ready,
                stats.unacked
            ),
            (10, 10, 0, 0)
        );
        assert_eq!(consumer.addr().stats().restarts, 1);
        assert_ne!(consumer.consumer_id().await.unwrap(), first_registration);
        assert!(
            rx.try_recv().is_err(),
            "nothing delivered twice after the restart"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bad_settlements_and_unknown_queues_are_typed_errors() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        // Unknown queue.
        assert_eq!(
            broker.publish("nope", msg(1)).await,
            Err(BrokerError::QueueNotFound("nope".into()))
        );
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        assert!(matches!(
            broker
                .consume("nope", ConsumeOptions::manual(1), probe.consumer())
                .await,
            Err(BrokerError::QueueNotFound(_))
        ));
        assert!(matches!(
            broker.queue_stats("nope").await,
            Err(BrokerError::QueueNotFound(_))
        ));
        // Double ack.
        let consumer = broker
            .consume("q", ConsumeOptions::manual(4), probe.consumer())
            .await
            .unwrap();
        broker.publish("q", msg(1)).await.unwrap();
        let d = probe.expect_delivery(WAIT).await;
        d.ack().await.unwrap();
        assert!(matches!(
            d.ack().await,
            Err(AckError::AlreadySettled { .. })
        ));
        assert!(matches!(
            d.nack(true).await,
            Err(AckError::AlreadySettled { .. })
        ));
        // Ack after the consumer was closed: its delivery was requeued.
        broker.publish("q", msg(2)).await.unwrap();
        let held = probe.expect_delivery(WAIT).await;
        consumer.close().await;
        assert!(!held.is_live());
        assert!(matches!(
            held.ack().await,
            Err(AckError::ConsumerGone { .. })
        ));
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!(
            (
                stats.ready,
                stats.unacked,
                stats.acknowledged,
                stats.consumers
            ),
            (1, 0, 1, 0)
        );
        // Auto-ack deliveries have nothing to settle.
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let _auto = broker
            .consume("q", ConsumeOptions::auto(), probe.consumer())
            .await
            .unwrap();
        let d = probe.expect_delivery(WAIT).await;
        assert_eq!(d.decode::<u32>().unwrap(), 2);
        assert!(matches!(d.ack().await, Err(AckError::AutoAck { .. })));
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.ready, stats.unacked, stats.acknowledged), (0, 0, 2));
        // The queue survived all of it.
        broker.publish("q", msg(3)).await.unwrap();
        assert_eq!(
            probe.expect_delivery(WAIT).await.decode::<u32>().unwrap(),
            3
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn declare_delete_purge_and_validation() {
    local(async {
        let broker = Broker::with_config(&RuntimeHandle::local(), Default::default());
        // A message's size counts its fixed fields (48 bytes) and payload.
        let opts = QueueOptions::default().max_message_bytes(64);
        broker.declare_queue("q", opts.clone()).await.unwrap();
        broker.declare_queue("q", opts.clone()).await.unwrap(); // same settings: fine
        assert!(matches!(
            broker.declare_queue("q", QueueOptions::default()).await,
            Err(BrokerError::QueueMismatch { .. })
        ));
        assert!(matches!(
            broker.declare_queue("", QueueOptions::default()).await,
            Err(BrokerError::InvalidName(NameError::Empty { .. }))
        ));
        assert!(matches!(
            broker
                .declare_queue(&"x".repeat(256), QueueOptions::default())
                .await,
            Err(BrokerError::InvalidName(NameError::TooLong {
                len: 256,
                ..
            }))
        ));
        assert!(matches!(
            broker
                .declare_queue("bad\nname", QueueOptions::default())
                .await,
            Err(BrokerError::InvalidName(NameError::ControlChar { .. }))
        ));
        assert_eq!(
            broker.publish("q", Envelope::new(vec![0u8; 20])).await,
            // 48 fixed, 20 payload, and the routing key the queue's name
            // gives it.
            Err(BrokerError::MessageTooLarge {
                queue: "q".into(),
                size: 69,
                limit: 64
            })
        );
        for n in 0..3 {
            broker
                .publish("q", Envelope::new(vec![n as u8]))
                .await
                .unwrap();
        }
        assert!(matches!(
            broker
                .delete_queue(
                    "q",
                    DeleteOptions {
                        if_empty: true,
                        ..Default::default()
                    }
                )
                .await,
            Err(BrokerError::QueueNotEmpty { messages: 3, .. })
        ));
        assert_eq!(broker.purge_queue("q").await.unwrap(), 3);
        let probe = DeliveryProbe::new(&RuntimeHandle::local());
        let consumer = broker
            .consume("q", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        assert!(matches!(
            broker
                .delete_queue(
                    "q",
                    DeleteOptions {
                        if_unused: true,
                        ..Default::default()
                    }
                )
                .await,
            Err(BrokerError::QueueInUse { consumers: 1, .. })
        ));
        let last = broker
            .delete_queue("q", DeleteOptions::default())
            .await
            .unwrap();
        assert_eq!(last.stats.purged, 3);
        assert!(matches!(
            broker.publish("q", msg(0)).await,
            Err(BrokerError::QueueNotFound(_))
        ));
        // The queue is gone; its consumer is cancelled and does not come back.
        consumer.cancel().await;
        assert_eq!(broker.queue_names(), Vec::<String>::new());
        // Redeclaring gives a fresh, empty queue.
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.published, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_saturated_queue_slows_its_publisher_down() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("slow", QueueOptions::default().mailbox(4))
            .await
            .unwrap();
        // Nothing runs the queue until we yield: its mailbox fills up.
        for n in 0..4 {
            queue.try_publish(msg(n)).unwrap();
        }
        match queue.try_publish(msg(4)) {
            Err(TryPublishError::Full { message, .. }) => {
                assert_eq!(message.decode::<u32>().unwrap(), 4)
            }
            other => panic!("expected Full, got {other:?}"),
        }
        // The waiting publish completes once the queue drains.
        queue.publish(msg(4)).await.unwrap();
        assert_eq!(queue.snapshot().await.unwrap().stats.ready, 5);
    })
    .await;
}

#[derive(Debug, PartialEq)]
struct Got(u32);
impl Message for Got {
    type Reply = ();
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_with_a_small_mailbox_still_gets_everything_in_order() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let mut got = TestProbe::<Got>::new(&RuntimeHandle::local());
        let out = got.recipient();
        let _c = broker
            .consume("q", ConsumeOptions::auto().mailbox(2), move || {
                let out = out.clone();
                move |d: Delivery| {
                    let out = out.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let _ = out.send(Got(d.decode::<u32>()?)).await;
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        for n in 0..50 {
            broker.publish("q", msg(n)).await.unwrap();
        }
        let all = got.receive_n(50, WAIT).await;
        assert_eq!(all, (0..50).map(Got).collect::<Vec<_>>());
        // One at a time, 10 ms each, with no gaps while the mailbox refills.
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        got.expect_no_msg(WAIT).await;
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!(
            (stats.delivered, stats.acknowledged, stats.unacked),
            (50, 50, 0)
        );
    })
    .await;
}

/// Publishes share mailbox entries while the queue is busy; that must not change
/// what each publisher sees: its messages arrive in the order it sent them,
/// whether they went one by one, in `publish_batch`es, or between other
/// requests, and none is lost.
#[test]
fn concurrent_publishers_keep_their_own_order_through_the_batching_inbox() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        let broker = Broker::new(&rt);
        let queue = broker
            .declare_queue("ordered", QueueOptions::default().mailbox(16))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _consumer = broker
            .consume("ordered", ConsumeOptions::auto(), move || {
                let tx = tx.clone();
                move |d: Delivery| {
                    let _ = tx.send(d.decode::<(u32, u32)>().unwrap());
                    async { Ok(()) }
                }
            })
            .await
            .unwrap();
        const PUBLISHERS: u32 = 4;
        const EACH: u32 = 3_000;
        let mut tasks = Vec::new();
        for p in 0..PUBLISHERS {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0;
                while i < EACH {
                    match i % 500 {
                        // A batch of 70: larger than one inbox batch.
                        0 => {
                            let batch = (i..(i + 70).min(EACH))
                                .map(|k| Envelope::encode(&(p, k)).unwrap())
                                .collect::<Vec<_>>();
                            i += batch.len() as u32;
                            queue.publish_batch(batch).await.unwrap();
                        }
                        // Another request between publishes.
                        250 => {
                            queue.snapshot().await.unwrap();
                            queue
                                .publish(Envelope::encode(&(p, i)).unwrap())
                                .await
                                .unwrap();
                            i += 1;
                        }
                        _ => {
                            if i % 7 == 0 {
                                match queue.try_publish(Envelope::encode(&(p, i)).unwrap()) {
                                    Ok(()) => {}
                                    Err(TryPublishError::Full { message, .. }) => {
                                        queue.publish(*message).await.unwrap()
                                    }
                                    Err(other) => panic!("{other}"),
                                }
                            } else {
                                queue
                                    .publish(Envelope::encode(&(p, i)).unwrap())
                                    .await
                                    .unwrap();
                            }
                            i += 1;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut next = vec![0u32; PUBLISHERS as usize];
        for _ in 0..PUBLISHERS * EACH {
            let (p, k) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("every message arrives")
                .unwrap();
            assert_eq!(k, next[p as usize], "publisher {p} out of order");
            next[p as usize] += 1;
        }
        assert!(next.iter().all(|&n| n == EACH));
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!(stats.published, u64::from(PUBLISHERS * EACH));
    });
    rt.shutdown();
}

/// A `basic.get` delivery's registration ends once it is settled; acking it
/// again after that is `AlreadySettled` (it was settled), not
/// `ConsumerGone` (which says it was requeued).
#[tokio::test(start_paused = true)]
async fn acking_a_fetched_delivery_twice_is_already_settled_after_its_registration_ended() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("fetched", QueueOptions::default())
            .await
            .unwrap();
        broker.publish("fetched", msg(1)).await.unwrap();
        let (d, _) = broker
            .get("fetched", AckMode::Manual)
            .await
            .unwrap()
            .expect("a message");
        d.ack().await.unwrap();
        // The queue has applied the ack and ended the registration.
        assert_eq!(
            broker
                .queue_stats("fetched")
                .await
                .unwrap()
                .stats
                .acknowledged,
            1
        );
        assert!(!d.is_live());
        assert!(matches!(
            d.ack().await,
            Err(AckError::AlreadySettled { .. })
        ));
    })
    .await;
}
