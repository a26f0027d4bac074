//! Priority queues (RabbitMQ's `x-max-priority`): higher priorities first,
//! FIFO within a priority, priorities above the maximum capped, a requeued
//! message back in its priority's order, and drop-head dropping the next
//! message to be delivered. Each expected order was checked against
//! RabbitMQ 3.10 on this machine (pika), as quoted in each test.

use postbox::testkit::local;
use postbox::{Runtime, RuntimeHandle};
use postbox_actors::{
    AckMode, Broker, BrokerError, DeathReason, Envelope, Overflow, QueueOptions, StorageOptions,
};

mod common;
use common::settle;

fn labelled(label: &str, priority: Option<u8>) -> Envelope {
    let m = Envelope::new(label.to_string());
    match priority {
        Some(p) => m.with_priority(p),
        None => m,
    }
}

async fn labels(broker: &Broker, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((d, _)) = broker.get(queue, AckMode::Auto).await.unwrap() {
        out.push(String::from_utf8(d.message().payload().to_vec()).unwrap());
    }
    out
}

/// The sequence of the RabbitMQ check: a1 b5 c2 d5 e9 f(none), maximum 5.
async fn publish_sequence(broker: &Broker, queue: &str) {
    let sequence = [
        ("a", Some(1)),
        ("b", Some(5)),
        ("c", Some(2)),
        ("d", Some(5)),
        ("e", Some(9)),
        ("f", None),
    ];
    for (label, priority) in sequence {
        broker
            .publish(queue, labelled(label, priority))
            .await
            .unwrap();
    }
    settle().await;
}

/// RabbitMQ: b, d, e, c, a, f (e's 9 counts as 5, after b and d).
#[tokio::test(start_paused = true)]
async fn higher_priorities_first_fifo_within_one_and_capped_at_the_maximum() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default().max_priority(5);
        broker.declare_queue("p", options).await.unwrap();
        publish_sequence(&broker, "p").await;
        assert_eq!(labels(&broker, "p").await, ["b", "d", "e", "c", "a", "f"]);
        // A FIFO queue ignores priorities.
        broker
            .declare_queue("fifo", QueueOptions::default())
            .await
            .unwrap();
        publish_sequence(&broker, "fifo").await;
        assert_eq!(
            labels(&broker, "fifo").await,
            ["a", "b", "c", "d", "e", "f"]
        );
    })
    .await;
}

/// RabbitMQ: get b and d (manual), nack b with requeue: then b, e, c, a, f
/// (d still held).
#[tokio::test(start_paused = true)]
async fn a_requeued_message_goes_back_to_its_place_in_its_priority() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default().max_priority(5);
        broker.declare_queue("p", options).await.unwrap();
        publish_sequence(&broker, "p").await;
        let (b, _) = broker.get("p", AckMode::Manual).await.unwrap().unwrap();
        let (d, _) = broker.get("p", AckMode::Manual).await.unwrap().unwrap();
        assert_eq!(b.message().payload().as_ref(), b"b");
        assert_eq!(d.message().payload().as_ref(), b"d");
        b.nack(true).await.unwrap();
        settle().await;
        assert_eq!(labels(&broker, "p").await, ["b", "e", "c", "a", "f"]);
        d.ack().await.unwrap();
    })
    .await;
}

/// RabbitMQ, maximum 5 and max-length 3, a1 b5 c2 d3 e9 f0 published: c, a,
/// f remain. Drop-head drops the next message to be delivered: b (when d
/// came), e (the highest when it came), then d.
#[tokio::test(start_paused = true)]
async fn drop_head_drops_the_highest_priority() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        common::dead_letter_queue(&broker).await;
        let options = QueueOptions::default()
            .max_priority(5)
            .max_length(3)
            .dead_letter_exchange("dlx");
        broker.declare_queue("p", options).await.unwrap();
        let sequence = [("a", 1), ("b", 5), ("c", 2), ("d", 3), ("e", 9), ("f", 0)];
        for (label, priority) in sequence {
            broker
                .publish("p", labelled(label, Some(priority)))
                .await
                .unwrap();
        }
        settle().await;
        assert_eq!(labels(&broker, "p").await, ["c", "a", "f"]);
        let mut dropped = Vec::new();
        while let Some((d, _)) = broker.get("dlq", AckMode::Auto).await.unwrap() {
            assert_eq!(d.deaths()[0].reason, DeathReason::MaxLen);
            dropped.push(String::from_utf8(d.message().payload().to_vec()).unwrap());
        }
        assert_eq!(dropped, ["b", "e", "d"]);
    })
    .await;
}

/// A consumer's crash requeues what it held, each to its priority's place.
#[tokio::test(start_paused = true)]
async fn held_messages_return_in_priority_order() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default().max_priority(3);
        broker.declare_queue("p", options).await.unwrap();
        for (i, priority) in [0u8, 3, 1, 3, 2, 0, 1].into_iter().enumerate() {
            broker
                .publish("p", labelled(&format!("{i}"), Some(priority)))
                .await
                .unwrap();
        }
        settle().await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(broker.get("p", AckMode::Manual).await.unwrap().unwrap().0);
        }
        let taken: Vec<_> = held
            .iter()
            .map(|d| String::from_utf8(d.message().payload().to_vec()).unwrap())
            .collect();
        assert_eq!(taken, ["1", "3", "4", "2"]);
        // Dropped unsettled: requeued.
        drop(held);
        settle().await;
        assert_eq!(
            labels(&broker, "p").await,
            ["1", "3", "4", "2", "6", "0", "5"]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_maximum_of_zero_and_a_spilling_priority_queue_are_refused() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        for options in [
            QueueOptions::default().max_priority(0),
            QueueOptions::default()
                .max_priority(4)
                .max_length(10)
                .overflow(Overflow::Spill),
        ] {
            let err = broker.declare_queue("p", options).await.unwrap_err();
            assert!(
                matches!(err, BrokerError::InvalidQueueOptions { .. }),
                "{err:?}"
            );
        }
        assert!(broker.queue("p").is_err(), "nothing declared");
    })
    .await;
}

/// A durable priority queue comes back in priority order.
#[tokio::test]
async fn a_durable_priority_queue_keeps_its_order_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let open = || Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    {
        let broker = open();
        let options = QueueOptions::default().durable().max_priority(5);
        broker.declare_queue("p", options).await.unwrap();
        let sequence = [("a", 1), ("b", 5), ("c", 2), ("d", 5), ("e", 9), ("f", 0)];
        for (label, priority) in sequence {
            let m = labelled(label, Some(priority)).with_persistent(true);
            broker.publish("p", m).await.unwrap();
        }
    }
    let broker = open();
    assert_eq!(labels(&broker, "p").await, ["b", "d", "e", "c", "a", "f"]);
    rt.shutdown();
}
