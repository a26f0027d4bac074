//! Dead letters, TTL, delivery limits, delayed redelivery, retry policies and
//! transactions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::{
    AckError, Broker, BrokerError, ConsumeOptions, Delivery, Envelope, ExchangeOptions, LayerExt,
    QueueOptions, RetryPolicy, TxError,
};
use postbox_actors::{DeathReason, Overflow};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn text(s: &str) -> Envelope {
    Envelope::encode(s).unwrap()
}

fn body(e: &Envelope) -> String {
    e.decode().unwrap()
}

/// A consumer factory that forwards every delivery to the test.
fn forward(
    tx: mpsc::UnboundedSender<Delivery>,
) -> impl Fn() -> Box<dyn FnMut(Delivery) -> std::future::Ready<Result<(), Failure>>> + Send + Sync
{
    move || {
        let tx = tx.clone();
        Box::new(move |d| {
            let _ = tx.send(d);
            std::future::ready(Ok(()))
        })
    }
}

/// A broker with a fanout dead-letter exchange "dlx" feeding queue "dlq",
/// consumed by the test through the returned channel.
async fn with_dlq() -> (Broker, mpsc::UnboundedReceiver<Delivery>) {
    let broker = Broker::new(&RuntimeHandle::local());
    broker
        .declare_exchange("dlx", ExchangeOptions::fanout())
        .await
        .unwrap();
    broker
        .declare_queue("dlq", QueueOptions::default())
        .await
        .unwrap();
    broker.bind_queue("dlq", "dlx", "").await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    broker
        .consume("dlq", ConsumeOptions::auto(), forward(tx))
        .await
        .unwrap();
    (broker, rx)
}

#[tokio::test(start_paused = true)]
async fn every_reason_dead_letters_with_its_history() {
    local(async {
        let (broker, mut dlq) = with_dlq().await;
        let dl = || QueueOptions::default().dead_letter_exchange("dlx");
        broker.declare_queue("rej", dl()).await.unwrap();
        broker
            .declare_queue("ttl", dl().message_ttl(Duration::from_secs(1)))
            .await
            .unwrap();
        broker
            .declare_queue("len", dl().max_length(1))
            .await
            .unwrap();
        broker
            .declare_queue("lim", dl().delivery_limit(2))
            .await
            .unwrap();
        broker
            .declare_exchange("in", ExchangeOptions::direct())
            .await
            .unwrap();
        for q in ["rej", "ttl", "len", "lim"] {
            broker.bind_queue(q, "in", q).await.unwrap();
        }

        // rejected
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = broker
            .consume("rej", ConsumeOptions::manual(1), forward(tx.clone()))
            .await
            .unwrap();
        broker.publish_to("in", "rej", text("r")).await.unwrap();
        rx.recv().await.unwrap().reject(false).await.unwrap();
        // expired
        broker.publish_to("in", "ttl", text("t")).await.unwrap();
        // maxlen: "l1" makes room for "l2"
        broker.publish_to("in", "len", text("l1")).await.unwrap();
        broker.publish_to("in", "len", text("l2")).await.unwrap();
        // delivery_limit: returned after its 2nd delivery
        let c2 = broker
            .consume("lim", ConsumeOptions::manual(1), forward(tx))
            .await
            .unwrap();
        broker.publish_to("in", "lim", text("d")).await.unwrap();
        for _ in 0..2 {
            rx.recv().await.unwrap().nack(true).await.unwrap();
        }

        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(dlq.recv().await.unwrap());
        }
        got.sort_by_key(|d| body(d.message()));
        let expect = [
            ("d", "lim", DeathReason::DeliveryLimit),
            ("l1", "len", DeathReason::MaxLen),
            ("r", "rej", DeathReason::Rejected),
            ("t", "ttl", DeathReason::Expired),
        ];
        for (d, (payload, queue, reason)) in got.iter().zip(expect) {
            assert_eq!(body(d.message()), payload);
            let deaths = d.deaths();
            assert_eq!(deaths.len(), 1, "{deaths:?}");
            let death = &deaths[0];
            assert_eq!(
                (&*death.queue, death.reason, death.count),
                (queue, reason, 1)
            );
            assert_eq!(&*death.exchange, "in");
            assert_eq!(
                death.routing_keys,
                vec![bytestring::ByteString::from(queue)]
            );
            assert_eq!(d.first_death(), Some(death));
            assert_eq!(
                d.exchange(),
                "dlx",
                "republished through the dead-letter exchange"
            );
            assert!(
                !d.redelivered(),
                "a fresh delivery in the dead-letter queue"
            );
        }
        for q in ["rej", "ttl", "len", "lim"] {
            let snap = broker.queue_stats(q).await.unwrap();
            assert_eq!(
                (snap.dead_lettered, snap.dead_letters_dropped),
                (1, 0),
                "{q}"
            );
        }
        let _ = (c, c2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_loop_accumulates_history_and_without_a_dlx_messages_are_dropped_and_counted() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        // work --reject--> retry (ttl 1s) --expire--> back to work, by dead-letter routing keys.
        broker
            .declare_queue(
                "work",
                QueueOptions::default()
                    .dead_letter_exchange("")
                    .dead_letter_routing_key("retry"),
            )
            .await
            .unwrap();
        broker
            .declare_queue(
                "retry",
                QueueOptions::default()
                    .message_ttl(Duration::from_secs(1))
                    .dead_letter_exchange("")
                    .dead_letter_routing_key("work"),
            )
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _c = broker
            .consume("work", ConsumeOptions::manual(1), forward(tx))
            .await
            .unwrap();
        broker.publish("work", text("job")).await.unwrap();
        let first = rx.recv().await.unwrap();
        assert!(first.deaths().is_empty());
        first.reject(false).await.unwrap();
        let second = rx.recv().await.unwrap();
        second.reject(false).await.unwrap();
        let third = rx.recv().await.unwrap();
        let deaths: Vec<_> = third
            .deaths()
            .iter()
            .map(|d| (d.queue.to_string(), d.reason, d.count))
            .collect();
        assert_eq!(
            deaths,
            vec![
                ("retry".to_string(), DeathReason::Expired, 2),
                ("work".to_string(), DeathReason::Rejected, 2),
            ],
            "most recent first, one entry per (queue, reason)"
        );
        let first_death = third.first_death().unwrap();
        assert_eq!(
            (&*first_death.queue, first_death.reason, first_death.count),
            ("work", DeathReason::Rejected, 1)
        );
        third.ack().await.unwrap();

        // No dead-letter exchange: dropped and counted.
        broker
            .declare_queue("plain", QueueOptions::default().max_length(1))
            .await
            .unwrap();
        broker.publish("plain", text("a")).await.unwrap();
        broker.publish("plain", text("b")).await.unwrap();
        let snap = broker.queue_stats("plain").await.unwrap();
        assert_eq!(
            (
                snap.stats.maxlen,
                snap.dead_letters_dropped,
                snap.stats.ready
            ),
            (1, 1, 1)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn ttl_in_virtual_time_and_a_requeue_does_not_reset_it() {
    local(async {
        let (broker, mut dlq) = with_dlq().await;
        broker
            .declare_queue(
                "q",
                QueueOptions::default()
                    .message_ttl(Duration::from_secs(3))
                    .dead_letter_exchange("dlx"),
            )
            .await
            .unwrap();
        let t0 = postbox::clock::now_ms();
        broker.publish("q", text("queue-ttl")).await.unwrap();
        broker
            .publish("q", text("own-ttl").with_expiration(Duration::from_secs(1)))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = broker
            .consume("q", ConsumeOptions::manual(1), forward(tx))
            .await
            .unwrap();
        let held = rx.recv().await.unwrap();
        assert_eq!(body(held.message()), "queue-ttl");
        // While it is held, "own-ttl" (1 s) expires behind it, and is never delivered.
        tokio::time::sleep(Duration::from_secs(2)).await;
        held.nack(true).await.unwrap();
        let d = dlq.recv().await.unwrap();
        assert_eq!(
            (body(d.message()), d.deaths()[0].reason),
            ("own-ttl".into(), DeathReason::Expired)
        );
        // "queue-ttl" is back, redelivered at 2 s; requeued again it still expires at 3 s.
        let again = rx.recv().await.unwrap();
        assert!(again.redelivered());
        again.nack(true).await.unwrap();
        let again = rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        again.nack(true).await.unwrap();
        let d = dlq.recv().await.unwrap();
        assert_eq!(body(d.message()), "queue-ttl");
        // Due at 3 s, but held by the consumer then: an unacknowledged message does
        // not expire. It did the moment the nack at 3.5 s put it back at the head.
        assert_eq!(d.deaths()[0].time_ms - t0, 3500);
        assert!(
            rx.try_recv().is_err(),
            "expired messages are never delivered"
        );
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.expired, stats.ready, stats.unacked), (2, 0, 0));
        let _ = c;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn nack_with_delay_redelivers_after_the_delay_and_not_before() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _c = broker
            .consume("q", ConsumeOptions::manual(4), forward(tx))
            .await
            .unwrap();
        broker.publish("q", text("later")).await.unwrap();
        let d = rx.recv().await.unwrap();
        let start = Instant::now();
        d.nack_after(Duration::from_secs(5)).await.unwrap();
        assert!(matches!(
            d.ack().await,
            Err(AckError::AlreadySettled { .. })
        ));
        broker.publish("q", text("meanwhile")).await.unwrap();
        assert_eq!(body(rx.recv().await.unwrap().message()), "meanwhile");
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.delayed, stats.ready, stats.unacked), (1, 0, 1));
        assert!(
            tokio::time::timeout(Duration::from_millis(4999), rx.recv())
                .await
                .is_err(),
            "not before"
        );
        let again = rx.recv().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(body(again.message()), "later");
        assert!(again.redelivered());
        assert_eq!(again.delivery_count(), 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_policy_exhausts_into_the_dlq_after_exactly_n_attempts() {
    local(async {
        let (broker, mut dlq) = with_dlq().await;
        broker
            .declare_queue("jobs", QueueOptions::default().dead_letter_exchange("dlx"))
            .await
            .unwrap();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let a = attempts.clone();
        let start = Instant::now();
        let policy = RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60), 4);
        let _c = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(8),
                (move || {
                    let a = a.clone();
                    move |d: Delivery| {
                        a.lock().push((d.delivery_count(), start.elapsed()));
                        async move { Err::<(), _>(Failure::msg("downstream unavailable")) }
                    }
                })
                .layer(policy),
            )
            .await
            .unwrap();
        broker.publish("jobs", text("charge")).await.unwrap();
        let dead = dlq.recv().await.unwrap();
        assert_eq!(body(dead.message()), "charge");
        assert_eq!(dead.deaths()[0].reason, DeathReason::Rejected);
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(
            *attempts.lock(),
            vec![(1, secs(0)), (2, secs(1)), (3, secs(3)), (4, secs(7))],
            "4 attempts, 1 s, 2 s and 4 s apart"
        );
        let stats = broker.queue_stats("jobs").await.unwrap().stats;
        assert_eq!(
            (stats.rejected, stats.ready, stats.unacked, stats.delayed),
            (1, 0, 0, 0)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_successful_retry_stops_retrying() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let _c = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(8),
                (move || {
                    let c = c.clone();
                    move |d: Delivery| {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            if n < 3 {
                                return Err(Failure::msg("flaky"));
                            }
                            d.ack().await?;
                            Ok(())
                        }
                    }
                })
                .layer(RetryPolicy::fixed(Duration::from_millis(100), 5)),
            )
            .await
            .unwrap();
        broker.publish("jobs", text("x")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let stats = broker.queue_stats("jobs").await.unwrap().stats;
        assert_eq!(
            (stats.acknowledged, stats.rejected, stats.requeued),
            (1, 0, 2)
        );
    })
    .await;
}

/// A broker with queues "in", "out-a", "out-b"; one message on "in", held by
/// the test's consumer (manual acks).
async fn tx_setup() -> (Broker, Delivery, mpsc::UnboundedReceiver<Delivery>) {
    let broker = Broker::new(&RuntimeHandle::local());
    for q in ["in", "out-a", "out-b"] {
        broker
            .declare_queue(q, QueueOptions::default())
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    broker
        .consume("in", ConsumeOptions::manual(8), forward(tx))
        .await
        .unwrap();
    broker.publish("in", text("order")).await.unwrap();
    let d = rx.recv().await.unwrap();
    (broker, d, rx)
}

async fn counts(broker: &Broker) -> (usize, usize, usize, u64) {
    let a = broker.queue_stats("out-a").await.unwrap().stats.ready;
    let b = broker.queue_stats("out-b").await.unwrap().stats.ready;
    let input = broker.queue_stats("in").await.unwrap().stats;
    (a, b, input.unacked, input.acknowledged)
}

#[tokio::test(start_paused = true)]
async fn a_transaction_commits_all_or_leaves_no_trace() {
    local(async {
        // Commit: both publishes and the ack.
        let (broker, d, _rx) = tx_setup().await;
        let mut tx = broker.transaction();
        tx.publish("out-a", text("a"))
            .publish("out-b", text("b"))
            .ack(&d);
        let done = tx.commit().await.unwrap();
        assert_eq!((done.published, done.enqueued, done.settled), (2, 2, 1));
        assert_eq!(counts(&broker).await, (1, 1, 0, 1));
        assert!(matches!(
            d.ack().await,
            Err(AckError::AlreadySettled { .. })
        ));

        // Rollback keeping the delivery: nothing happened.
        let (broker, d, _rx) = tx_setup().await;
        let mut tx = broker.transaction();
        tx.publish("out-a", text("a"))
            .publish("out-b", text("b"))
            .ack(&d);
        tx.rollback(false).await;
        assert_eq!(counts(&broker).await, (0, 0, 1, 0));
        d.ack().await.unwrap();

        // Rollback with requeue: the delivery comes back.
        let (broker, d, mut rx) = tx_setup().await;
        let mut tx = broker.transaction();
        tx.publish("out-a", text("a")).ack(&d);
        tx.rollback(true).await;
        let again = rx.recv().await.unwrap();
        assert!(again.redelivered());
        assert_eq!(counts(&broker).await, (0, 0, 1, 0));

        // A failing commit (unknown exchange) applies nothing, the ack included.
        let (broker, d, mut rx) = tx_setup().await;
        let mut tx = broker.transaction();
        tx.ack(&d)
            .publish("out-a", text("a"))
            .publish_to("nope", "k", text("x"));
        assert!(matches!(
            tx.commit().await,
            Err(TxError::Publish(BrokerError::ExchangeNotFound(_)))
        ));
        assert_eq!(counts(&broker).await, (0, 0, 1, 0));
        // A failing settlement (already settled) undoes the others, and publishes nothing.
        d.ack().await.unwrap();
        broker.publish("in", text("second")).await.unwrap();
        let second = rx.recv().await.unwrap();
        let mut tx = broker.transaction();
        tx.ack(&second).ack(&d).publish("out-a", text("a"));
        assert!(matches!(
            tx.commit().await,
            Err(TxError::Settle(AckError::AlreadySettled { .. }))
        ));
        assert_eq!(counts(&broker).await, (0, 0, 1, 1));
        second
            .ack()
            .await
            .expect("the first ack of the failed transaction was undone");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_handler_panic_mid_transaction_leaves_no_trace() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        for q in ["in", "out-a", "out-b"] {
            broker
                .declare_queue(q, QueueOptions::default())
                .await
                .unwrap();
        }
        let crashed = Arc::new(AtomicBool::new(false));
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let (b, c) = (broker.clone(), crashed.clone());
        let _consumer = broker
            .consume("in", ConsumeOptions::manual(1), move || {
                let (b, c, done_tx) = (b.clone(), c.clone(), done_tx.clone());
                move |d: Delivery| {
                    let (b, c, done_tx) = (b.clone(), c.clone(), done_tx.clone());
                    async move {
                        let mut tx = b.transaction();
                        tx.publish("out-a", text("a"));
                        tx.ack(&d);
                        if !c.swap(true, Ordering::SeqCst) {
                            panic!("crash between building and committing the transaction");
                        }
                        tx.publish("out-b", text("b"));
                        tx.commit().await?;
                        let _ = done_tx.send(d.redelivered());
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        broker.publish("in", text("order")).await.unwrap();
        // The crashed attempt left nothing; the redelivery committed once.
        assert!(done.recv().await.unwrap(), "committed on the redelivery");
        assert_eq!(counts(&broker).await, (1, 1, 0, 1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn reject_publish_overflow_tells_the_publisher() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue(
                "bounded",
                QueueOptions::default()
                    .max_length(2)
                    .overflow(Overflow::RejectPublish),
            )
            .await
            .unwrap();
        broker.publish("bounded", text("1")).await.unwrap();
        broker.publish("bounded", text("2")).await.unwrap();
        assert_eq!(
            broker.publish("bounded", text("3")).await,
            Err(BrokerError::QueueFull("bounded".into()))
        );
        let stats = broker.queue_stats("bounded").await.unwrap().stats;
        assert_eq!((stats.ready, stats.refused), (2, 1));
        let mut tx = broker.transaction();
        tx.publish("bounded", text("4"));
        assert!(matches!(
            tx.commit().await,
            Err(TxError::RejectPublishQueue(_))
        ));
    })
    .await;
}
