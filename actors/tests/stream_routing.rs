//! Exchanges that route to streams: bindings of every kind next to queues, one
//! record per stream per message, counts, `mandatory`, unbinding and deletion,
//! dead-letter exchanges, transactions, block-mode backpressure and typed
//! errors.
//!
//! Everything runs in local mode on tokio's paused clock (one thread,
//! deterministic, no wall-clock waits).

use std::time::Duration;

use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::NameKind;
use postbox_actors::{
    AckError, Binding, Broker, BrokerConfig, BrokerError, ConsumeOptions, Delivery, Destination,
    Envelope, ExchangeOptions, HeadersMatch, NameError, PublishError, QueueOptions, StreamError,
    TxError,
};
use postbox_actors::{
    PublishOptions, StreamDelivery, StreamOptions, StreamStart, SubscribeOptions,
};
use tokio::sync::mpsc;

mod common;
use common::{drain, gated, msg, records, settle, values};

/// A queue consumed by the test: every delivery's value goes to the channel.
async fn queue(broker: &Broker, name: &str) -> mpsc::UnboundedReceiver<u32> {
    broker
        .declare_queue(name, QueueOptions::default())
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    broker
        .consume(name, ConsumeOptions::auto(), move || {
            let tx = tx.clone();
            move |d: Delivery| {
                let _ = tx.send(d.decode::<u32>().unwrap());
                async { Ok::<(), Failure>(()) }
            }
        })
        .await
        .unwrap();
    rx
}

#[tokio::test(start_paused = true)]
async fn fanout_to_a_stream_and_queues_at_once() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("fan", ExchangeOptions::fanout())
            .await
            .unwrap();
        let log = broker
            .declare_stream("log", StreamOptions::default())
            .await
            .unwrap();
        let mut qa = queue(&broker, "qa").await;
        let mut qb = queue(&broker, "qb").await;
        broker.bind_queue("qa", "fan", "").await.unwrap();
        broker.bind_queue("qb", "fan", "").await.unwrap();
        broker.bind_stream("log", "fan", "").await.unwrap();
        // Two more bindings to the same stream (fanout ignores the key): still
        // one record per message.
        broker.bind_stream("log", "fan", "other").await.unwrap();
        broker.bind_stream("log", "fan", "third").await.unwrap();
        // Binding twice is a no-op.
        broker.bind_stream("log", "fan", "").await.unwrap();
        assert_eq!(broker.bindings("fan").unwrap().len(), 5);

        for i in 0..3 {
            assert_eq!(broker.publish_to("fan", "k", msg(i)).await.unwrap(), 3);
        }
        settle().await;
        assert_eq!(drain(&mut qa), [0, 1, 2]);
        assert_eq!(drain(&mut qb), [0, 1, 2]);
        assert_eq!(records(&log).await, [0, 1, 2]);
        assert_eq!(log.stats().published, 3);
        // The record carries the exchange and routing key, as a queue's copy does.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sub = log
            .subscribe(StreamStart::First, SubscribeOptions::default(), move || {
                let tx = tx.clone();
                move |d: StreamDelivery| {
                    let e = d.envelope();
                    let _ = tx.send((e.exchange().to_string(), e.routing_key().to_string()));
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .unwrap();
        settle().await;
        assert_eq!(rx.try_recv().unwrap(), ("fan".to_string(), "k".to_string()));
        sub.cancel().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn topic_to_streams_and_queues_one_copy_each() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("events", ExchangeOptions::topic())
            .await
            .unwrap();
        let all = broker
            .declare_stream("all", StreamOptions::default())
            .await
            .unwrap();
        let eu = broker
            .declare_stream("eu", StreamOptions::default())
            .await
            .unwrap();
        let mut orders = queue(&broker, "orders").await;
        broker.bind_stream("all", "events", "#").await.unwrap();
        // Several patterns that all match one key: one record.
        broker
            .bind_stream("all", "events", "order.#")
            .await
            .unwrap();
        broker.bind_stream("all", "events", "*.*.*").await.unwrap();
        broker.bind_stream("eu", "events", "*.eu.*").await.unwrap();
        broker
            .bind_queue("orders", "events", "order.#")
            .await
            .unwrap();

        assert_eq!(
            broker
                .publish_to("events", "order.eu.created", msg(1))
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            broker
                .publish_to("events", "order.us.created", msg(2))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            broker
                .publish_to("events", "invoice.eu.paid", msg(3))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            broker.publish_to("events", "ping", msg(4)).await.unwrap(),
            1
        );
        settle().await;
        assert_eq!(records(&all).await, [1, 2, 3, 4]);
        assert_eq!(records(&eu).await, [1, 3]);
        assert_eq!(drain(&mut orders), [1, 2]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn direct_headers_and_exchange_to_exchange_reach_streams() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("direct", ExchangeOptions::direct())
            .await
            .unwrap();
        broker
            .declare_exchange("hdr", ExchangeOptions::headers())
            .await
            .unwrap();
        broker
            .declare_exchange("front", ExchangeOptions::fanout())
            .await
            .unwrap();
        let s = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        broker.bind_stream("s", "direct", "k").await.unwrap();
        broker
            .bind_stream("s", "hdr", HeadersMatch::all([("kind", "pdf")]))
            .await
            .unwrap();
        // Two paths from "front" to the stream: one record.
        broker.bind_exchange("direct", "front", "").await.unwrap();
        broker.bind_exchange("hdr", "front", "").await.unwrap();

        assert_eq!(broker.publish_to("direct", "k", msg(1)).await.unwrap(), 1);
        assert_eq!(broker.publish_to("direct", "x", msg(99)).await.unwrap(), 0);
        let pdf = msg(2).with_header("kind", "pdf");
        assert_eq!(broker.publish_to("hdr", "", pdf).await.unwrap(), 1);
        let both = msg(3).with_header("kind", "pdf");
        assert_eq!(broker.publish_to("front", "k", both).await.unwrap(), 1);
        settle().await;
        assert_eq!(records(&s).await, [1, 2, 3]);
        assert!(
            broker
                .unbind_stream("s", "hdr", HeadersMatch::all([("kind", "pdf")]))
                .await
                .unwrap()
        );
        assert!(broker.bindings("hdr").unwrap().is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn mandatory_with_only_a_stream_bound_is_routed() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("x", ExchangeOptions::direct())
            .await
            .unwrap();
        let s = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        broker.bind_stream("s", "x", "k").await.unwrap();
        assert_eq!(
            broker
                .publish_with("x", "k", msg(1), PublishOptions::default().mandatory())
                .await
                .unwrap(),
            1
        );
        match broker
            .publish_with("x", "other", msg(2), PublishOptions::default().mandatory())
            .await
        {
            Err(PublishError::Unroutable { message, .. }) => {
                assert_eq!(message.decode::<u32>().unwrap(), 2)
            }
            other => panic!("expected Unroutable, got {other:?}"),
        }
        // An alternate exchange is not used when a stream took the message.
        broker
            .declare_exchange("alt", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker
            .declare_exchange("y", ExchangeOptions::direct().alternate_exchange("alt"))
            .await
            .unwrap();
        let lost = broker
            .declare_stream("lost", StreamOptions::default())
            .await
            .unwrap();
        broker.bind_stream("lost", "alt", "").await.unwrap();
        broker.bind_stream("s", "y", "k").await.unwrap();
        assert_eq!(
            broker
                .publish_with("y", "k", msg(3), PublishOptions::default().mandatory())
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            broker
                .publish_with("y", "z", msg(4), PublishOptions::default().mandatory())
                .await
                .unwrap(),
            1
        );
        settle().await;
        assert_eq!(records(&s).await, [1, 3]);
        assert_eq!(records(&lost).await, [4]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn unbind_and_delete_stream_remove_bindings() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("fan", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker
            .declare_exchange("topic", ExchangeOptions::topic())
            .await
            .unwrap();
        let s = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        broker.bind_stream("s", "fan", "").await.unwrap();
        broker.bind_stream("s", "topic", "a.*").await.unwrap();
        assert_eq!(
            broker.bindings("fan").unwrap(),
            vec![Binding {
                destination: Destination::Stream("s".into()),
                key: "".into(),
                arguments: Default::default(),
            }]
        );
        assert_eq!(broker.publish_to("fan", "", msg(1)).await.unwrap(), 1);
        assert!(broker.unbind_stream("s", "fan", "").await.unwrap());
        assert!(!broker.unbind_stream("s", "fan", "").await.unwrap());
        assert_eq!(broker.publish_to("fan", "", msg(2)).await.unwrap(), 0);
        assert_eq!(broker.publish_to("topic", "a.b", msg(3)).await.unwrap(), 1);
        settle().await;
        assert_eq!(records(&s).await, [1, 3]);

        // A queue and a stream may share a name; unbinding one keeps the other.
        let _q = queue(&broker, "s").await;
        broker.bind_queue("s", "topic", "a.*").await.unwrap();
        assert_eq!(broker.publish_to("topic", "a.b", msg(4)).await.unwrap(), 2);

        broker.delete_stream("s").await.unwrap();
        assert_eq!(
            broker.bindings("topic").unwrap(),
            vec![Binding {
                destination: Destination::Queue("s".into()),
                key: "a.*".into(),
                arguments: Default::default(),
            }],
            "deleting the stream removed its bindings, not the queue's"
        );
        assert_eq!(broker.publish_to("topic", "a.b", msg(5)).await.unwrap(), 1);
        // A new stream of the same name starts unbound.
        let again = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        broker.delete_queue("s", Default::default()).await.unwrap();
        assert_eq!(broker.publish_to("topic", "a.b", msg(6)).await.unwrap(), 0);
        assert!(records(&again).await.is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_exchange_routes_to_a_stream() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("dlx", ExchangeOptions::fanout())
            .await
            .unwrap();
        // Block mode with room for 2 while the gated reader holds record 0:
        // the third dead letter finds the stream full and must not stall the
        // queue.
        let dead = broker
            .declare_stream("dead", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        broker.bind_stream("dead", "dlx", "").await.unwrap();
        let (gate, mut rx, reader) = gated(&dead).await;
        broker
            .declare_queue("work", QueueOptions::default().dead_letter_exchange("dlx"))
            .await
            .unwrap();
        let (dtx, mut deliveries) = mpsc::unbounded_channel();
        let _consumer = broker
            .consume("work", ConsumeOptions::manual(16), move || {
                let dtx = dtx.clone();
                move |d: Delivery| {
                    let _ = dtx.send(d);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .unwrap();
        for i in 0..4 {
            broker.publish("work", msg(i)).await.unwrap();
        }
        settle().await;
        for _ in 0..4 {
            let d = deliveries.recv().await.unwrap();
            d.reject(false).await.unwrap();
        }
        settle().await;
        // The queue went on: it is still responsive and counted every dead letter.
        let stats = broker.queue_stats("work").await.unwrap();
        assert_eq!(stats.dead_lettered, 4);
        assert_eq!(stats.stats.ready + stats.stats.unacked, 0);
        assert_eq!(dead.stats().next_offset, 2, "two appended, two waiting");
        // Once the reader moves on, the waiting dead letters are appended.
        gate.add_permits(100);
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut got = values(drain(&mut rx));
        got.sort();
        assert_eq!(got, [0, 1, 2, 3]);
        let record = records(&dead).await;
        assert!(!record.is_empty());
        reader.cancel().await;
        // The death history travels with the record.
        let (htx, mut hrx) = mpsc::unbounded_channel();
        let sub = dead
            .subscribe(StreamStart::Last, SubscribeOptions::default(), move || {
                let htx = htx.clone();
                move |d: StreamDelivery| {
                    let _ = htx.send(d.envelope().deaths().len());
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .unwrap();
        settle().await;
        assert_eq!(hrx.try_recv().unwrap(), 1);
        sub.cancel().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transactions_publish_to_streams_on_commit_only() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("fan", ExchangeOptions::fanout())
            .await
            .unwrap();
        let s = broker
            // 48 bytes of fixed fields, the exchange's name, the content type
            // and a small payload fit.
            .declare_stream("s", StreamOptions::default().max_message_bytes(80))
            .await
            .unwrap();
        let mut out = queue(&broker, "out").await;
        broker.bind_stream("s", "fan", "").await.unwrap();
        broker.bind_queue("out", "fan", "").await.unwrap();
        broker
            .declare_queue("in", QueueOptions::default())
            .await
            .unwrap();
        let (dtx, mut deliveries) = mpsc::unbounded_channel();
        let _consumer = broker
            .consume("in", ConsumeOptions::manual(16), move || {
                let dtx = dtx.clone();
                move |d: Delivery| {
                    let _ = dtx.send(d);
                    async { Ok::<(), Failure>(()) }
                }
            })
            .await
            .unwrap();
        for i in 0..3 {
            broker.publish("in", msg(i)).await.unwrap();
        }
        let d0 = deliveries.recv().await.unwrap();
        let d1 = deliveries.recv().await.unwrap();
        let d2 = deliveries.recv().await.unwrap();

        // Rollback: nothing reaches the stream or the queue.
        let mut tx = broker.transaction();
        tx.publish_to("fan", "", msg(10)).ack(&d0);
        tx.rollback(false).await;
        settle().await;
        assert_eq!(s.stats().published, 0);
        assert!(drain(&mut out).is_empty());

        // Commit: the stream and the queue get their copy, the ack is applied.
        let mut tx = broker.transaction();
        tx.publish_to("fan", "", msg(11))
            .publish_to("fan", "", msg(12))
            .ack(&d0);
        let done = tx.commit().await.unwrap();
        assert_eq!((done.published, done.enqueued, done.settled), (2, 4, 1));
        settle().await;
        assert_eq!(records(&s).await, [11, 12]);
        assert_eq!(drain(&mut out), [11, 12]);
        assert!(matches!(
            d0.ack().await,
            Err(AckError::AlreadySettled { .. })
        ));

        // A message too large for the stream fails the whole commit before
        // anything is applied: no publish, no ack.
        let mut tx = broker.transaction();
        tx.ack(&d1).publish_to("fan", "", msg(13)).publish_to(
            "fan",
            "",
            Envelope::new(vec![0u8; 40]),
        );
        assert_eq!(
            tx.commit().await.unwrap_err(),
            TxError::Publish(BrokerError::Stream(StreamError::MessageTooLarge {
                stream: "s".into(),
                size: 91,
                limit: 80,
            }))
        );
        settle().await;
        assert_eq!(s.stats().published, 2);
        assert!(drain(&mut out).is_empty());
        d1.ack().await.expect("the failed commit did not ack");

        // A stream deleted before commit simply gets no copy.
        let mut tx = broker.transaction();
        tx.publish_to("fan", "", msg(14)).ack(&d2);
        broker.delete_stream("s").await.unwrap();
        let done = tx.commit().await.unwrap();
        assert_eq!((done.published, done.enqueued, done.settled), (1, 1, 1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_full_block_mode_stream_makes_publish_to_wait() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("fan", ExchangeOptions::fanout())
            .await
            .unwrap();
        let s = broker
            .declare_stream("s", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        broker.bind_stream("s", "fan", "").await.unwrap();
        let (gate, mut rx, _slow) = gated(&s).await;
        // The reader takes record 0 and waits: two records fit.
        for i in 0..2 {
            assert_eq!(broker.publish_to("fan", "", msg(i)).await.unwrap(), 1);
            settle().await;
        }
        let publisher = {
            let broker = broker.clone();
            tokio::task::spawn_local(async move { broker.publish_to("fan", "", msg(2)).await })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!publisher.is_finished(), "publish_to waits for room");
        assert_eq!(s.stats().next_offset, 2);
        assert!(s.stats().blocked >= 1);
        gate.add_permits(100);
        assert_eq!(publisher.await.unwrap().unwrap(), 1);
        settle().await;
        assert_eq!(values(drain(&mut rx)), [0, 1, 2]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bad_stream_bindings_are_typed_errors() {
    local(async {
        let mut config = BrokerConfig::default();
        // 48 bytes of fixed fields, the exchange and the key, 8 of payload.
        config.max_message_bytes = 58;
        let broker = Broker::with_config(&RuntimeHandle::local(), config);
        broker
            .declare_exchange("x", ExchangeOptions::topic())
            .await
            .unwrap();
        broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        assert_eq!(
            broker.bind_stream("nope", "x", "a").await.unwrap_err(),
            BrokerError::Stream(StreamError::NotFound("nope".into()))
        );
        assert_eq!(
            broker.bind_stream("s", "nope", "a").await.unwrap_err(),
            BrokerError::ExchangeNotFound("nope".into())
        );
        assert_eq!(
            broker.bind_stream("s", "", "a").await.unwrap_err(),
            BrokerError::DefaultExchange("bound to")
        );
        assert!(matches!(
            broker.bind_stream("s", "x", "a\nb").await,
            Err(BrokerError::InvalidName(NameError::ControlChar {
                kind: NameKind::BindingKey,
                ..
            }))
        ));
        // On a topic exchange a headers match is only arguments (RabbitMQ).
        broker
            .bind_stream("s", "x", HeadersMatch::all([("k", "v")]))
            .await
            .unwrap();
        assert!(
            broker
                .unbind_stream("s", "x", HeadersMatch::all([("k", "v")]))
                .await
                .unwrap()
        );
        assert_eq!(
            broker.unbind_stream("s", "nope", "a").await.unwrap_err(),
            BrokerError::ExchangeNotFound("nope".into())
        );
        // A queue of that name is not a stream.
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        assert_eq!(
            broker.bind_stream("q", "x", "a").await.unwrap_err(),
            BrokerError::Stream(StreamError::NotFound("q".into()))
        );
        assert!(broker.bindings("x").unwrap().is_empty());
        // Too large for a stream it reaches: refused, nothing appended anywhere.
        broker.bind_stream("s", "x", "a").await.unwrap();
        broker.bind_queue("q", "x", "a").await.unwrap();
        match broker
            .publish_to("x", "a", Envelope::new("123456789"))
            .await
        {
            Err(PublishError::Refused(BrokerError::Stream(StreamError::MessageTooLarge {
                stream,
                size: 59,
                limit: 58,
            }))) => assert_eq!(stream, "s"),
            Err(PublishError::Refused(BrokerError::MessageTooLarge { .. })) => {}
            other => panic!("expected a size refusal, got {other:?}"),
        }
        assert_eq!(broker.stream("s").unwrap().stats().published, 0);
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn many_paths_to_many_targets_still_make_one_copy_each() {
    local(async {
        // More targets than a route holds inline, reached through several
        // exchanges and bindings each.
        let broker = Broker::new(&RuntimeHandle::local());
        for (name, options) in [
            ("front", ExchangeOptions::fanout()),
            ("fan", ExchangeOptions::fanout()),
            ("hdr", ExchangeOptions::headers()),
            ("topic", ExchangeOptions::topic()),
        ] {
            broker.declare_exchange(name, options).await.unwrap();
        }
        for x in ["fan", "hdr", "topic"] {
            broker.bind_exchange(x, "front", "").await.unwrap();
        }
        let mut queues = Vec::new();
        for i in 0..40 {
            let name = format!("q{i}");
            queues.push(queue(&broker, &name).await);
            broker.bind_queue(&name, "fan", "").await.unwrap();
            broker.bind_queue(&name, "fan", "other").await.unwrap();
            broker
                .bind_queue(&name, "hdr", HeadersMatch::any([("a", "1")]))
                .await
                .unwrap();
            broker
                .bind_queue(&name, "hdr", HeadersMatch::any([("b", "2")]))
                .await
                .unwrap();
            broker.bind_queue(&name, "topic", "#").await.unwrap();
            broker.bind_queue(&name, "topic", "k.*").await.unwrap();
        }
        let s = broker
            .declare_stream("s", StreamOptions::default())
            .await
            .unwrap();
        broker.bind_stream("s", "fan", "").await.unwrap();
        broker.bind_stream("s", "topic", "#").await.unwrap();
        let m = msg(7).with_header("a", "1").with_header("b", "2");
        assert_eq!(broker.publish_to("front", "k.x", m).await.unwrap(), 41);
        assert_eq!(
            broker
                .publish_to(
                    "hdr",
                    "",
                    msg(8).with_header("a", "1").with_header("b", "2")
                )
                .await
                .unwrap(),
            40
        );
        assert_eq!(broker.publish_to("topic", "k.x", msg(9)).await.unwrap(), 41);
        settle().await;
        for q in &mut queues {
            assert_eq!(drain(q), [7, 8, 9]);
        }
        assert_eq!(records(&s).await, [7, 9]);
    })
    .await;
}
