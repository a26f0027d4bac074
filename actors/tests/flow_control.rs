//! Flow control: what each overflow policy does with the same sequence of
//! publishes to a full queue, and `block`, which makes publishers wait so
//! that a producer faster than its consumer never takes the queue past its
//! limit and loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use postbox::testkit::local;
use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::{
    AckMode, Broker, ConsumeOptions, DeathReason, Delivery, Overflow, QueueOptions, StorageOptions,
    TryPublishError,
};
use tokio::sync::mpsc;

mod common;
use common::{msg, settle};

/// Queue `q` (at most 3 ready messages, the given overflow) with a
/// dead-letter queue behind it.
async fn limited(broker: &Broker, overflow: Overflow) {
    common::dead_letter_queue(broker).await;
    let options = QueueOptions::default()
        .max_length(3)
        .overflow(overflow)
        .dead_letter_exchange("dlx");
    broker.declare_queue("q", options).await.unwrap();
}

/// Every ready message of `queue`, taken, with the reason of its last death.
async fn drain(broker: &Broker, queue: &str) -> Vec<(u32, Option<DeathReason>)> {
    let mut out = Vec::new();
    while let Some((d, _)) = broker.get(queue, AckMode::Auto).await.unwrap() {
        out.push((d.decode().unwrap(), d.deaths().first().map(|d| d.reason)));
    }
    out
}

/// Publishes 1..=5 to `q`; returns which publishes failed.
async fn publish_five(broker: &Broker) -> Vec<u32> {
    let mut failed = Vec::new();
    for n in 1..=5 {
        if broker.publish("q", msg(n)).await.is_err() {
            failed.push(n);
        }
    }
    settle().await;
    failed
}

#[tokio::test(start_paused = true)]
async fn each_overflow_policy_gives_its_exact_result_for_the_same_sequence() {
    let maxlen = Some(DeathReason::MaxLen);
    // (policy, publishes refused, left in the queue, dead-lettered)
    type Case = (Overflow, &'static [u32], &'static [u32], &'static [u32]);
    let cases: [Case; 5] = [
        (Overflow::DropHead, &[], &[3, 4, 5], &[1, 2]),
        (Overflow::DropNew, &[], &[1, 2, 3], &[4, 5]),
        (Overflow::RejectPublish, &[4, 5], &[1, 2, 3], &[]),
        (Overflow::RejectPublishDlx, &[4, 5], &[1, 2, 3], &[4, 5]),
        (Overflow::Spill, &[], &[1, 2, 3, 4, 5], &[]),
    ];
    for (overflow, refused, kept, dead) in cases {
        local(async {
            let broker = Broker::new(&RuntimeHandle::local());
            limited(&broker, overflow).await;
            assert_eq!(
                publish_five(&broker).await,
                refused,
                "{overflow:?}: refused"
            );
            let left = drain(&broker, "q").await;
            assert_eq!(
                left.iter().map(|m| m.0).collect::<Vec<_>>(),
                kept,
                "{overflow:?}: kept"
            );
            let dlq = drain(&broker, "dlq").await;
            assert_eq!(
                dlq.iter().map(|m| m.0).collect::<Vec<_>>(),
                dead,
                "{overflow:?}: dead-lettered"
            );
            assert!(dlq.iter().all(|m| m.1 == maxlen), "{overflow:?}: {dlq:?}");
        })
        .await;
    }
}

/// Block: the fourth publish waits (and `try_publish` fails with `Full`)
/// until a message leaves; nothing is dropped and the order holds.
#[tokio::test(start_paused = true)]
async fn block_makes_the_publisher_wait_until_there_is_room() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        limited(&broker, Overflow::Block).await;
        for n in 1..=3 {
            broker.publish("q", msg(n)).await.unwrap();
        }
        settle().await;
        let q = broker.queue("q").unwrap();
        assert!(matches!(
            q.try_publish(msg(99)),
            Err(TryPublishError::Full { .. })
        ));
        // The publish joins the inbox; the queue leaves it waiting there.
        broker.publish("q", msg(4)).await.unwrap();
        settle().await;
        let snap = broker.queue_stats("q").await.unwrap();
        assert_eq!((snap.stats.ready, snap.waiting_publishes), (3, 1));
        // A publisher that gets past the inbox's room waits for the queue:
        // fill the inbox (its capacity is the mailbox's), then one more.
        let mailbox = QueueOptions::default().mailbox;
        let mut blocked = Box::pin(async {
            for n in 5..(5 + mailbox as u32 + 1) {
                broker.publish("q", msg(n)).await.unwrap();
            }
        });
        assert!(
            (&mut blocked).now_or_never().is_none(),
            "publish waits at the limit"
        );
        settle().await;
        assert!((&mut blocked).now_or_never().is_none(), "still waiting");
        let snap = broker.queue_stats("q").await.unwrap();
        assert_eq!(snap.stats.ready, 3, "the queue stays at its limit");
        // Taking messages makes room: everything comes, in order.
        let mut got = Vec::new();
        loop {
            let done = (&mut blocked).now_or_never().is_some();
            while let Some((d, _)) = broker.get("q", AckMode::Auto).await.unwrap() {
                got.push(d.decode::<u32>().unwrap());
                assert!(broker.queue_stats("q").await.unwrap().stats.ready <= 3);
            }
            if done {
                break;
            }
            settle().await;
        }
        settle().await;
        while let Some((d, _)) = broker.get("q", AckMode::Auto).await.unwrap() {
            got.push(d.decode::<u32>().unwrap());
        }
        let want: Vec<u32> = (1..(5 + mailbox as u32 + 1)).collect();
        assert_eq!(got, want, "nothing lost, nothing reordered");
        assert!(drain(&broker, "dlq").await.is_empty(), "nothing dropped");
        assert!(q.try_publish(msg(1000)).is_ok(), "room again");
    })
    .await;
}

/// A producer ten times faster than its consumer, under block: the queue
/// never holds more than its limit, the producer's publish is seen waiting,
/// and every message is consumed once, in order.
async fn fast_producer_slow_consumer(total: u32) {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let limit = 100;
        let options = QueueOptions::default()
            .max_length(limit)
            .overflow(Overflow::Block);
        broker.declare_queue("work", options).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _consumer = broker
            .consume("work", ConsumeOptions::manual(10), move || {
                let tx = tx.clone();
                move |d: Delivery| {
                    let tx = tx.clone();
                    async move {
                        // One message a millisecond.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let _ = tx.send(d.decode::<u32>()?);
                        d.ack().await?;
                        Ok::<(), Failure>(())
                    }
                }
            })
            .await
            .unwrap();
        let peak = Arc::new(AtomicUsize::new(0));
        let sampler = {
            let (broker, peak) = (broker.clone(), peak.clone());
            tokio::task::spawn_local(async move {
                loop {
                    let snap = broker.queue_stats("work").await.unwrap();
                    peak.fetch_max(snap.stats.ready, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let queue = broker.queue("work").unwrap();
        let mut pending = 0u32;
        for n in 0..total {
            // Ten messages a millisecond.
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut publish = Box::pin(queue.publish(msg(n)));
            if (&mut publish).now_or_never().is_none() {
                pending += 1;
                publish.await.unwrap();
            }
        }
        let mut got = Vec::with_capacity(total as usize);
        while got.len() < total as usize {
            got.push(rx.recv().await.unwrap());
        }
        sampler.abort();
        assert!(pending > 0, "the producer never waited");
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak <= limit, "ready reached {peak}, limit {limit}");
        assert!(
            got.iter().copied().eq(0..total),
            "all of them, once, in order"
        );
        let snap = broker.queue_stats("work").await.unwrap();
        assert_eq!((snap.stats.ready, snap.stats.maxlen), (0, 0));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn block_bounds_a_queue_under_a_ten_times_faster_producer() {
    fast_producer_slow_consumer(20_000).await;
}

#[tokio::test(start_paused = true)]
#[ignore = "stress: 1,000,000 messages (run by .ci/run with --ignored)"]
async fn block_bounds_a_queue_under_a_ten_times_faster_producer_for_a_million_messages() {
    fast_producer_slow_consumer(1_000_000).await;
}

/// On a durable queue, a persistent publish that has to wait is confirmed
/// only once it is in the queue and stored: after a restart it is there.
#[tokio::test]
async fn a_blocked_persistent_publish_is_confirmed_once_stored() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let open = || Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    {
        let broker = open();
        let options = QueueOptions::default()
            .durable()
            .max_length(2)
            .overflow(Overflow::Block);
        broker.declare_queue("orders", options).await.unwrap();
        for n in 0..2 {
            broker
                .publish("orders", msg(n).with_persistent(true))
                .await
                .unwrap();
        }
        let third = broker.publish("orders", msg(2).with_persistent(true));
        let mut third = Box::pin(third);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!((&mut third).now_or_never().is_none(), "waits for room");
        let (first, _) = broker
            .get("orders", AckMode::Manual)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.decode::<u32>().unwrap(), 0);
        first.ack().await.unwrap();
        third.await.unwrap();
        let snap = broker.queue_stats("orders").await.unwrap();
        assert_eq!((snap.stats.ready, snap.waiting_publishes), (2, 0));
    }
    let broker = open();
    let got = drain(&broker, "orders").await;
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
    rt.shutdown();
}

/// Block does not hang on a message larger than the byte limit: it enters
/// an empty queue.
#[tokio::test(start_paused = true)]
async fn an_oversize_message_enters_an_empty_blocking_queue() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default()
            .max_length_bytes(4)
            .overflow(Overflow::Block);
        broker.declare_queue("q", options).await.unwrap();
        let big = postbox_actors::Envelope::new(vec![7u8; 64]);
        tokio::time::timeout(Duration::from_secs(1), broker.publish("q", big))
            .await
            .expect("not stuck")
            .unwrap();
        settle().await;
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 1);
    })
    .await;
}

/// Load shedding: once the queue is overloaded (depth or age), publishes
/// below the priority are dropped, dead-lettered or deferred; the others
/// still enter. Every message stays accounted for.
#[tokio::test(start_paused = true)]
async fn low_priority_publishes_are_shed_at_the_threshold() {
    use postbox_actors::{DeathReason, Shedding};
    for action in ["drop", "dead-letter", "defer"] {
        local(async {
            let broker = Broker::new(&RuntimeHandle::local());
            limited(&broker, Overflow::DropHead).await;
            let shedding = Shedding::below_priority(5).at_depth(2);
            let shedding = match action {
                "drop" => shedding,
                "dead-letter" => shedding.dead_letter(),
                _ => shedding.defer(Duration::from_secs(10)),
            };
            let options = QueueOptions::default()
                .shed(shedding)
                .dead_letter_exchange("dlx");
            broker.declare_queue("shed", options).await.unwrap();
            // Under the threshold: everything enters, whatever its priority.
            broker.publish("shed", msg(1)).await.unwrap();
            broker
                .publish("shed", msg(2).with_priority(9))
                .await
                .unwrap();
            // Overloaded: low priorities are shed, high ones enter.
            broker.publish("shed", msg(3)).await.unwrap();
            broker
                .publish("shed", msg(4).with_priority(5))
                .await
                .unwrap();
            broker
                .publish("shed", msg(5).with_priority(4))
                .await
                .unwrap();
            settle().await;
            let stats = broker.queue_stats("shed").await.unwrap().stats;
            assert_eq!(stats.published, 5, "{action}");
            assert_eq!(stats.ready, 3, "{action}");
            let dead = drain(&broker, "dlq").await;
            match action {
                "drop" => {
                    assert_eq!((stats.shed, stats.delayed), (2, 0));
                    assert!(dead.is_empty());
                }
                "dead-letter" => {
                    assert_eq!((stats.shed, stats.delayed), (2, 0));
                    assert_eq!(
                        dead,
                        [(3, Some(DeathReason::Shed)), (5, Some(DeathReason::Shed))]
                    );
                }
                _ => {
                    assert_eq!((stats.shed, stats.delayed), (0, 2));
                    tokio::time::sleep(Duration::from_secs(11)).await;
                    let back = broker.queue_stats("shed").await.unwrap().stats;
                    assert_eq!((back.ready, back.delayed), (5, 0));
                }
            }
            let kept: Vec<u32> = drain(&broker, "shed").await.iter().map(|m| m.0).collect();
            let want: &[u32] = if action == "defer" {
                &[1, 2, 3, 4, 5]
            } else {
                &[1, 2, 4]
            };
            assert_eq!(kept, want, "{action}");
        })
        .await;
    }
}

/// The age threshold: once the next message has waited that long, low
/// priorities are shed; when it is taken, they enter again.
#[tokio::test(start_paused = true)]
async fn shedding_by_the_age_of_the_next_message() {
    use postbox_actors::Shedding;
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let shedding = Shedding::below_priority(1).at_age(Duration::from_secs(5));
        let options = QueueOptions::default().shed(shedding);
        broker.declare_queue("q", options).await.unwrap();
        broker.publish("q", msg(1)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        broker.publish("q", msg(2)).await.unwrap();
        broker.publish("q", msg(3).with_priority(1)).await.unwrap();
        settle().await;
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.shed, 1);
        assert_eq!(
            drain(&broker, "q")
                .await
                .iter()
                .map(|m| m.0)
                .collect::<Vec<_>>(),
            [1, 3]
        );
        broker.publish("q", msg(4)).await.unwrap();
        settle().await;
        assert_eq!(
            drain(&broker, "q")
                .await
                .iter()
                .map(|m| m.0)
                .collect::<Vec<_>>(),
            [4]
        );
    })
    .await;
}
