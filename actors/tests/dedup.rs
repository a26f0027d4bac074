//! Publisher duplicate windows on queues, exchanges and streams: a second
//! publish of an id inside the window is not enqueued and is reported with
//! its original; outside the window it is accepted; memory stays bounded;
//! durable queues and streams keep their windows across a restart.

use std::time::Duration;

use postbox::Runtime;
use postbox::testkit::local;
use postbox_actors::{
    AckMode, Broker, BrokerError, DedupTarget, DedupWindow, Envelope, ExchangeOptions, MessageId,
    PublishError, QueueOptions, StorageOptions, StreamError, StreamOptions, TryPublishError,
    TxError,
};

mod common;

fn window(secs: u64) -> DedupWindow {
    DedupWindow::new(Duration::from_secs(secs))
}

fn order(n: u32) -> Envelope {
    common::msg(n).with_id(MessageId::for_key(&format!("order-{n}")))
}

fn duplicate_of(result: Result<(), BrokerError>) -> Box<postbox_actors::Duplicate> {
    match result {
        Err(BrokerError::Duplicate(dup)) => dup,
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_window_refuses_duplicates_inside_it_and_accepts_them_after() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        let q = broker
            .declare_queue("orders", QueueOptions::default().dedup(window(60)))
            .await
            .unwrap();
        let t0 = postbox::clock::now_ms();
        for n in 0..3 {
            q.publish(order(n)).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let dup = duplicate_of(q.publish(order(1)).await);
        assert_eq!(dup.id, MessageId::for_key("order-1"));
        assert_eq!(dup.target, DedupTarget::Queue("orders".into()));
        assert_eq!(dup.original, 1, "the second message the window accepted");
        assert!(dup.first_published_ms >= t0 && dup.first_published_ms < t0 + 1000);
        // The non-waiting publish and the batch are refused alike.
        assert!(matches!(
            q.try_publish(order(2)),
            Err(TryPublishError::Refused(BrokerError::Duplicate(_)))
        ));
        let batch = q
            .publish_batch(vec![order(0), order(3), order(3), order(4)])
            .await;
        assert_eq!(duplicate_of(batch).id, MessageId::for_key("order-0"));
        let snap = q.snapshot().await.unwrap();
        assert_eq!(snap.stats.ready, 5, "orders 0 to 4, once each");
        assert_eq!((snap.stats.duplicates, snap.stats.dedup_ids), (4, 5));
        // Past the window: accepted again, and the old ids are forgotten.
        tokio::time::advance(Duration::from_secs(61)).await;
        q.publish(order(1)).await.unwrap();
        let snap = q.snapshot().await.unwrap();
        assert_eq!((snap.stats.ready, snap.stats.dedup_ids), (6, 1));
        // Ids the window never saw pass: a message without a chosen id gets
        // a fresh one each time.
        q.publish(Envelope::new("x")).await.unwrap();
        q.publish(Envelope::new("x")).await.unwrap();
        assert_eq!(q.snapshot().await.unwrap().stats.ready, 8);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_publish_is_forgotten_so_that_its_retry_goes_through() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        let q = broker
            .declare_queue(
                "small",
                QueueOptions::default()
                    .dedup(window(60))
                    .max_length(1)
                    .overflow(postbox_actors::Overflow::RejectPublish),
            )
            .await
            .unwrap();
        q.publish(order(1)).await.unwrap();
        assert!(matches!(
            q.publish(order(2)).await,
            Err(BrokerError::QueueFull(_))
        ));
        let (d, _) = q.get(AckMode::Auto).await.unwrap().unwrap();
        assert_eq!(d.decode::<u32>().unwrap(), 1);
        // The refused one was not remembered: its retry is accepted.
        q.publish(order(2)).await.unwrap();
        assert_eq!(q.snapshot().await.unwrap().stats.ready, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_million_distinct_ids_keep_the_window_within_its_bound() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        let q = broker
            .declare_queue(
                "firehose",
                QueueOptions::default()
                    .dedup(window(3600).max_ids(10_000))
                    .max_length(100),
            )
            .await
            .unwrap();
        let ids: Vec<MessageId> = (0..1_000_000).map(|_| MessageId::new()).collect();
        for chunk in ids.chunks(1000) {
            let batch = chunk
                .iter()
                .map(|id| Envelope::new("m").with_id(*id))
                .collect();
            q.publish_batch(batch).await.unwrap();
        }
        let stats = q.snapshot().await.unwrap().stats;
        assert_eq!(stats.dedup_ids, 10_000);
        assert_eq!(stats.published, 1_000_000);
        // The newest ids are remembered, the oldest were forgotten.
        assert!(
            q.publish(Envelope::new("m").with_id(ids[999_999]))
                .await
                .is_err()
        );
        assert!(q.publish(Envelope::new("m").with_id(ids[0])).await.is_ok());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_publishers_of_one_id_enqueue_it_once() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let broker = Broker::new(&rt.handle());
    let q = broker
        .declare_queue("race", QueueOptions::default().dedup(window(60)))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            for n in 0..500 {
                if q.publish(order(n)).await.is_ok() {
                    accepted += 1;
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(accepted, 500);
    let stats = q.snapshot().await.unwrap().stats;
    assert_eq!((stats.ready, stats.duplicates), (500, 3500));
    rt.shutdown();
}

#[tokio::test(start_paused = true)]
async fn an_exchange_window_and_queue_windows_behind_a_fanout() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        broker
            .declare_exchange("orders", ExchangeOptions::fanout().dedup(window(60)))
            .await
            .unwrap();
        broker
            .declare_exchange("events", ExchangeOptions::fanout())
            .await
            .unwrap();
        let a = broker
            .declare_queue("a", QueueOptions::default().dedup(window(60)))
            .await
            .unwrap();
        let b = broker
            .declare_queue("b", QueueOptions::default())
            .await
            .unwrap();
        // Unroutable: not remembered, so it can be published once bound.
        assert_eq!(broker.publish_to("orders", "", order(1)).await.unwrap(), 0);
        for (exchange, queue) in [
            ("orders", "a"),
            ("orders", "b"),
            ("events", "a"),
            ("events", "b"),
        ] {
            broker.bind_queue(queue, exchange, "").await.unwrap();
        }
        assert_eq!(broker.publish_to("orders", "", order(1)).await.unwrap(), 2);
        match broker.publish_to("orders", "", order(1)).await {
            Err(PublishError::Refused(BrokerError::Duplicate(dup))) => {
                assert_eq!(dup.target, DedupTarget::Exchange("orders".into()));
            }
            other => panic!("{other:?}"),
        }
        let stats = broker.exchange_dedup_stats("orders").unwrap().unwrap();
        assert_eq!((stats.ids, stats.duplicates), (1, 1));
        assert_eq!(broker.exchange_dedup_stats("events").unwrap(), None);
        // Through the exchange without a window: queue a knows the id and
        // leaves it out, b takes it.
        assert_eq!(broker.publish_to("events", "", order(1)).await.unwrap(), 1);
        // Every target a duplicate: that is the error.
        broker.unbind_queue("b", "events", "").await.unwrap();
        assert!(matches!(
            broker.publish_to("events", "", order(1)).await,
            Err(PublishError::Refused(BrokerError::Duplicate(_)))
        ));
        assert_eq!(a.snapshot().await.unwrap().stats.ready, 1);
        assert_eq!(b.snapshot().await.unwrap().stats.ready, 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_transaction_passes_the_windows_when_it_commits() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        broker
            .declare_exchange("orders", ExchangeOptions::fanout().dedup(window(60)))
            .await
            .unwrap();
        let q = broker
            .declare_queue("q", QueueOptions::default().dedup(window(60)))
            .await
            .unwrap();
        broker.bind_queue("q", "orders", "").await.unwrap();
        broker.publish_to("orders", "", order(1)).await.unwrap();
        let mut tx = broker.transaction();
        tx.publish_to("orders", "", order(2));
        tx.publish_to("orders", "", order(1));
        match tx.commit().await {
            Err(TxError::Publish(BrokerError::Duplicate(dup))) => {
                assert_eq!(dup.id, MessageId::for_key("order-1"));
            }
            other => panic!("{other:?}"),
        }
        // Nothing was applied, and order 2 was not remembered.
        assert_eq!(q.snapshot().await.unwrap().stats.ready, 1);
        let mut tx = broker.transaction();
        tx.publish_to("orders", "", order(2));
        tx.publish("q", order(1)); // the queue's window leaves it out
        let committed = tx.commit().await.unwrap();
        assert_eq!((committed.published, committed.enqueued), (2, 1));
        assert_eq!(q.snapshot().await.unwrap().stats.ready, 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_window_names_the_original_offset() {
    local(async {
        let broker = Broker::new(&postbox::RuntimeHandle::local());
        let s = broker
            .declare_stream("audit", StreamOptions::default().dedup(window(60)))
            .await
            .unwrap();
        assert_eq!(s.publish(order(7)).await.unwrap(), 0);
        assert_eq!(s.publish(order(8)).await.unwrap(), 1);
        match s.publish(order(8)).await {
            Err(StreamError::Duplicate(dup)) => {
                assert_eq!(
                    (dup.original, dup.target.clone()),
                    (1, DedupTarget::Stream("audit".into()))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.publish_batch(vec![order(9), order(7)]).await,
            Err(StreamError::Duplicate(_))
        ));
        let stats = s.stats();
        assert_eq!(
            (stats.next_offset, stats.duplicates, stats.dedup_ids),
            (3, 2, 3)
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(s.publish(order(8)).await.unwrap(), 3);
    })
    .await;
}

#[tokio::test]
async fn durable_queues_and_streams_keep_their_windows_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_arbiters(2).unwrap();
    let options = QueueOptions::default().durable().dedup(window(3600));
    let stream_options = StreamOptions::default().durable().dedup(window(3600));
    {
        let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
        let q = broker
            .declare_queue("orders", options.clone())
            .await
            .unwrap();
        let s = broker
            .declare_stream("audit", stream_options.clone())
            .await
            .unwrap();
        for n in 0..100 {
            q.publish(order(n).with_persistent(true)).await.unwrap();
            s.publish(order(n)).await.unwrap();
        }
        // A non-persistent message is lost with a restart: so is its id,
        // however it was published.
        q.publish(order(1000)).await.unwrap();
        q.try_publish(order(1001)).unwrap();
        // Consumed and acknowledged: gone from the queue, not from the window.
        for _ in 0..50 {
            let (d, _) = q.get(AckMode::Manual).await.unwrap().unwrap();
            d.ack().await.unwrap();
        }
        q.sync().await.unwrap();
    }
    let broker = Broker::open(&rt, StorageOptions::new(dir.path())).unwrap();
    let q = broker.declare_queue("orders", options).await.unwrap();
    let s = broker
        .declare_stream("audit", stream_options)
        .await
        .unwrap();
    for n in 0..100 {
        assert!(
            matches!(
                q.publish(order(n).with_persistent(true)).await,
                Err(BrokerError::Duplicate(_))
            ),
            "order {n} remembered by the queue"
        );
        match s.publish(order(n)).await {
            Err(StreamError::Duplicate(dup)) => assert_eq!(dup.original, u64::from(n)),
            other => panic!("order {n}: {other:?}"),
        }
    }
    q.publish(order(1000).with_persistent(true)).await.unwrap();
    q.publish(order(1001).with_persistent(true)).await.unwrap();
    let stats = q.snapshot().await.unwrap().stats;
    assert_eq!((stats.ready, stats.dedup_ids), (52, 102));
    // Deleting the queue deletes its window: a new queue of that name
    // starts with none.
    broker
        .delete_queue("orders", Default::default())
        .await
        .unwrap();
    let q = broker
        .declare_queue(
            "orders",
            QueueOptions::default().durable().dedup(window(3600)),
        )
        .await
        .unwrap();
    q.publish(order(1).with_persistent(true)).await.unwrap();
    drop(broker);
    rt.shutdown();
}
