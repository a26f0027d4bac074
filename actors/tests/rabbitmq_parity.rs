//! Where postbox used to differ from RabbitMQ, and now does what RabbitMQ
//! 3.10 does. Each behaviour was checked against the broker on this machine
//! (pika scripts; the outcome is quoted in each test's doc), and each test
//! failed before the change it guards. Consumer error handling follows
//! Spring AMQP, which the seed programs use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::rpc::{RemoteError, Request, RequestError};
use postbox_actors::testkit::DeliveryProbe;
use postbox_actors::{
    AckMode, BindingKey, Broker, BrokerError, ConsumeOptions, ConsumerId, DeathReason, Delivery,
    Envelope, ExchangeOptions, Observer, OnError, Overflow, PublishError, PublishOptions,
    QueueOptions,
};
use tokio::sync::mpsc;

mod common;
use common::{WAIT, drain, msg, settle};

/// A queue `name` with a dead-letter queue `name.dlq` behind it, through a
/// fanout exchange `name.dlx`; returns a receiver of what reaches the DLQ,
/// with each death's reason.
async fn with_dlq(
    broker: &Broker,
    name: &str,
    options: QueueOptions,
) -> mpsc::UnboundedReceiver<(u32, DeathReason)> {
    let dlx = format!("{name}.dlx");
    let dlq = format!("{name}.dlq");
    broker
        .declare_exchange(&dlx, ExchangeOptions::fanout())
        .await
        .unwrap();
    broker
        .declare_queue(&dlq, QueueOptions::default())
        .await
        .unwrap();
    broker.bind_queue(&dlq, &dlx, "").await.unwrap();
    broker
        .declare_queue(name, options.dead_letter_exchange(&dlx))
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    broker
        .consume(&dlq, ConsumeOptions::auto(), move || {
            let tx = tx.clone();
            move |d: Delivery| {
                let reason = d.deaths()[0].reason;
                let _ = tx.send((d.decode::<u32>().unwrap(), reason));
                async { Ok::<(), Failure>(()) }
            }
        })
        .await
        .unwrap();
    rx
}

/// RabbitMQ: `x-max-length` 2 holds after a requeue. Holding `1`, with `2`
/// and `3` ready, then nacking `1` with requeue: with drop-head the head (the
/// requeued `1`) is dead-lettered with reason `maxlen` and `2, 3` stay; with
/// reject-publish and reject-publish-dlx the queue stays at 3 (only new
/// publishes are refused).
#[tokio::test(start_paused = true)]
async fn length_limits_hold_after_a_requeue_as_each_overflow_mode_says() {
    local(async {
        for (overflow, ready, dead) in [
            (
                Overflow::DropHead,
                vec![2, 3],
                vec![(1, DeathReason::MaxLen)],
            ),
            (Overflow::RejectPublish, vec![1, 2, 3], vec![]),
            (Overflow::RejectPublishDlx, vec![1, 2, 3], vec![]),
        ] {
            let broker = Broker::new(&RuntimeHandle::local());
            let mut dlq = with_dlq(
                &broker,
                "q",
                QueueOptions::default().max_length(2).overflow(overflow),
            )
            .await;
            let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
            let consumer = broker
                .consume("q", ConsumeOptions::manual(1), probe.consumer())
                .await
                .unwrap();
            broker.publish("q", msg(1)).await.unwrap();
            let held = probe.expect_delivery(WAIT).await;
            broker.publish("q", msg(2)).await.unwrap();
            broker.publish("q", msg(3)).await.unwrap();
            consumer.cancel().await;
            held.nack(true).await.unwrap();
            settle().await;
            let mut left = Vec::new();
            while let Some((d, _)) = broker.get("q", AckMode::Auto).await.unwrap() {
                left.push(d.decode::<u32>().unwrap());
            }
            assert_eq!(left, ready, "{overflow:?}");
            assert_eq!(drain(&mut dlq), dead, "{overflow:?}");
        }
    })
    .await;
}

/// RabbitMQ: reject-publish-dlx refuses the publish (a nack to the
/// publisher) and dead-letters the message with reason `maxlen`.
#[tokio::test(start_paused = true)]
async fn reject_publish_dlx_refuses_and_dead_letters() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let mut dlq = with_dlq(
            &broker,
            "q",
            QueueOptions::default()
                .max_length(1)
                .overflow(Overflow::RejectPublishDlx),
        )
        .await;
        broker.publish("q", msg(1)).await.unwrap();
        assert_eq!(
            broker.publish("q", msg(2)).await,
            Err(BrokerError::QueueFull("q".into()))
        );
        settle().await;
        assert_eq!(drain(&mut dlq), [(2, DeathReason::MaxLen)]);
        let stats = broker.queue_stats("q").await.unwrap().stats;
        assert_eq!((stats.ready, stats.refused, stats.maxlen), (1, 1, 1));
    })
    .await;
}

/// RabbitMQ: with a message TTL of 0 (per queue, or per message), a message
/// is delivered if a consumer can take it at once, and expired otherwise.
#[tokio::test(start_paused = true)]
async fn ttl_zero_delivers_to_a_waiting_consumer_and_expires_otherwise() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let mut dlq = with_dlq(
            &broker,
            "zero",
            QueueOptions::default().message_ttl(Duration::ZERO),
        )
        .await;
        broker.publish("zero", msg(1)).await.unwrap();
        settle().await;
        assert_eq!(drain(&mut dlq), [(1, DeathReason::Expired)]);
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let _c = broker
            .consume("zero", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        broker.publish("zero", msg(2)).await.unwrap();
        let d = probe.expect_delivery(WAIT).await;
        assert_eq!(d.decode::<u32>().unwrap(), 2);
        // Its consumer is full now: the next one expires.
        broker.publish("zero", msg(3)).await.unwrap();
        settle().await;
        assert_eq!(drain(&mut dlq), [(3, DeathReason::Expired)]);
        // Requeued, it has had its chance: it expires.
        d.nack(true).await.unwrap();
        settle().await;
        assert_eq!(drain(&mut dlq), [(2, DeathReason::Expired)]);
        // Per message.
        broker
            .declare_queue("plain", QueueOptions::default())
            .await
            .unwrap();
        broker
            .publish("plain", msg(4).with_expiration(Duration::ZERO))
            .await
            .unwrap();
        settle().await;
        let stats = broker.queue_stats("plain").await.unwrap().stats;
        assert_eq!((stats.ready, stats.expired), (0, 1));
    })
    .await;
}

/// RabbitMQ: a message that matches a binding to another exchange is routed,
/// even if that exchange routes it nowhere: the first exchange's alternate is
/// not used, and a mandatory publish comes back; the second exchange's own
/// alternate is used.
#[tokio::test(start_paused = true)]
async fn a_match_on_an_exchange_binding_counts_as_routed() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        for (name, options) in [
            ("ae", ExchangeOptions::fanout()),
            ("ae2", ExchangeOptions::fanout()),
            ("x1", ExchangeOptions::direct().alternate_exchange("ae")),
            ("x2", ExchangeOptions::direct()),
            ("x3", ExchangeOptions::direct().alternate_exchange("ae2")),
        ] {
            broker.declare_exchange(name, options).await.unwrap();
        }
        for q in ["unrouted", "unrouted2"] {
            broker
                .declare_queue(q, QueueOptions::default())
                .await
                .unwrap();
        }
        broker.bind_queue("unrouted", "ae", "").await.unwrap();
        broker.bind_queue("unrouted2", "ae2", "").await.unwrap();
        broker.bind_exchange("x2", "x1", "k").await.unwrap();
        broker.bind_exchange("x3", "x1", "k3").await.unwrap();
        let mandatory = PublishOptions::default().mandatory();
        assert!(matches!(
            broker.publish_with("x1", "k", msg(1), mandatory).await,
            Err(PublishError::Unroutable { .. })
        ));
        assert_eq!(broker.publish_to("x1", "other", msg(2)).await.unwrap(), 1);
        assert_eq!(broker.publish_to("x1", "k3", msg(3)).await.unwrap(), 1);
        let ready = |q: &'static str| {
            let broker = broker.clone();
            async move { broker.queue_stats(q).await.unwrap().stats.ready }
        };
        assert_eq!(ready("unrouted").await, 1, "only the unmatched message");
        assert_eq!(ready("unrouted2").await, 1, "x3's own alternate");
    })
    .await;
}

/// RabbitMQ: binding arguments are part of a binding's identity on every
/// kind of exchange. Three bindings of one queue with one key and different
/// arguments still give one copy, and unbinding one leaves the others.
#[tokio::test(start_paused = true)]
async fn binding_arguments_make_distinct_bindings() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("x", ExchangeOptions::direct())
            .await
            .unwrap();
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let with = |v: i64| BindingKey::routing_key("k").argument("v", v);
        broker.bind_queue("q", "x", with(1)).await.unwrap();
        broker.bind_queue("q", "x", with(2)).await.unwrap();
        broker.bind_queue("q", "x", "k").await.unwrap();
        assert_eq!(broker.bindings("x").unwrap().len(), 3);
        assert_eq!(broker.publish_to("x", "k", msg(1)).await.unwrap(), 1);
        assert!(broker.unbind_queue("q", "x", with(1)).await.unwrap());
        assert_eq!(broker.bindings("x").unwrap().len(), 2);
        assert_eq!(broker.publish_to("x", "k", msg(2)).await.unwrap(), 1);
        assert!(broker.unbind_queue("q", "x", "k").await.unwrap());
        assert!(broker.unbind_queue("q", "x", with(2)).await.unwrap());
        assert_eq!(broker.publish_to("x", "k", msg(3)).await.unwrap(), 0);
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.ready, 2);
    })
    .await;
}

/// RabbitMQ's `basic.get`: the head message without a consumer, with auto or
/// manual ack, and the count of messages left. A manual one is held until
/// settled; dropped unsettled, it is requeued (as a closing channel does).
/// `basic.reject` with requeue puts it back.
#[tokio::test(start_paused = true)]
async fn get_fetches_one_message_without_a_consumer() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        assert!(queue.get(AckMode::Manual).await.unwrap().is_none());
        for n in 1..=3 {
            queue.publish(msg(n)).await.unwrap();
        }
        let (first, left) = queue.get(AckMode::Auto).await.unwrap().unwrap();
        assert_eq!((first.decode::<u32>().unwrap(), left), (1, 2));
        let (second, left) = queue.get(AckMode::Manual).await.unwrap().unwrap();
        assert_eq!((second.decode::<u32>().unwrap(), left), (2, 1));
        let stats = queue.snapshot().await.unwrap();
        assert_eq!((stats.stats.unacked, stats.stats.consumers), (1, 0));
        assert!(stats.consumers.is_empty(), "a get is not a consumer");
        second.reject(true).await.unwrap();
        settle().await;
        let (again, _) = queue.get(AckMode::Manual).await.unwrap().unwrap();
        assert_eq!(again.decode::<u32>().unwrap(), 2);
        assert!(again.redelivered());
        drop(again);
        settle().await;
        let (dropped, _) = queue.get(AckMode::Manual).await.unwrap().unwrap();
        assert_eq!(
            dropped.decode::<u32>().unwrap(),
            2,
            "dropped unsettled: requeued"
        );
        dropped.ack().await.unwrap();
        settle().await;
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!((stats.ready, stats.unacked, stats.acknowledged), (1, 0, 2));
    })
    .await;
}

/// RabbitMQ's `basic.cancel`: the consumer gets nothing more, and what it
/// holds stays settleable (an ack after the cancel succeeds); RabbitMQ keeps
/// the delivery with the channel until settled or closed.
#[tokio::test(start_paused = true)]
async fn a_cancelled_consumer_can_still_settle_what_it_holds() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let consumer = broker
            .consume("q", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        queue.publish(msg(1)).await.unwrap();
        queue.publish(msg(2)).await.unwrap();
        let held = probe.expect_delivery(WAIT).await;
        assert_eq!(consumer.cancel().await, 1);
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!((stats.ready, stats.unacked, stats.consumers), (1, 1, 0));
        probe.expect_no_delivery(WAIT).await;
        held.ack().await.unwrap();
        tokio::time::timeout(WAIT, consumer.terminated())
            .await
            .expect("the cancelled consumer ends once it has settled");
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!((stats.ready, stats.unacked, stats.acknowledged), (1, 0, 1));
    })
    .await;
}

/// RabbitMQ's `x-expires`: a queue unused for its expiry time is deleted. A
/// `basic.get` and a redeclaration renew the lease; publishes do not.
#[tokio::test(start_paused = true)]
async fn an_unused_expiring_queue_is_deleted() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let options = QueueOptions::default().expires(Duration::from_millis(1500));
        for renew in ["publish", "get", "declare"] {
            let queue = broker.declare_queue(renew, options.clone()).await.unwrap();
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match renew {
                    "publish" => {
                        let _ = queue.publish(msg(1)).await;
                    }
                    "get" => {
                        let _ = queue.get(AckMode::Auto).await;
                    }
                    _ => {
                        broker.declare_queue(renew, options.clone()).await.unwrap();
                    }
                }
            }
            settle().await;
            let alive = broker.queue(renew).is_ok();
            assert_eq!(alive, renew != "publish", "{renew}");
        }
        // A queue with a consumer does not expire; one it leaves does, later.
        let queue = broker.declare_queue("used", options).await.unwrap();
        let probe = DeliveryProbe::new(&RuntimeHandle::local());
        let consumer = broker
            .consume("used", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(queue.is_live());
        consumer.close().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(queue.is_live());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!queue.is_live());
        assert!(broker.queue("used").is_err());
    })
    .await;
}

/// Spring AMQP's default: a handler error requeues that one delivery and the
/// consumer keeps going (no restart, state kept). A consumer failing on half
/// of 1,000 messages processes all of them, with one redelivery per failure.
#[tokio::test(start_paused = true)]
async fn a_transient_error_requeues_that_delivery_and_the_consumer_keeps_going() {
    local(async {
        const N: u32 = 1_000;
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("work", QueueOptions::default())
            .await
            .unwrap();
        let done = Arc::new(Mutex::new(vec![0u32; N as usize]));
        let built = Arc::new(AtomicUsize::new(0));
        let (d, b) = (done.clone(), built.clone());
        let consumer = broker
            .consume("work", ConsumeOptions::manual(8), move || {
                b.fetch_add(1, Ordering::SeqCst);
                let done = d.clone();
                move |delivery: Delivery| {
                    let done = done.clone();
                    async move {
                        let n: u32 = delivery.decode()?;
                        // Every other message fails the first time (a database hiccup).
                        if n.is_multiple_of(2) && !delivery.redelivered() {
                            return Err(Failure::msg("transient"));
                        }
                        done.lock()[n as usize] += 1;
                        delivery.ack().await?;
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        for n in 0..N {
            queue.publish(msg(n)).await.unwrap();
        }
        tokio::time::sleep(WAIT).await;
        assert!(done.lock().iter().all(|&c| c == 1), "each processed once");
        let stats = queue.snapshot().await.unwrap().stats;
        assert_eq!(
            stats.redelivered,
            u64::from(N / 2),
            "one redelivery per failure"
        );
        assert_eq!((stats.ready, stats.unacked), (0, 0));
        let report = consumer.report();
        assert_eq!(
            (report.handled, report.errors),
            (u64::from(N), u64::from(N / 2))
        );
        assert_eq!((report.crashes, report.restarts), (0, 0));
        assert_eq!(built.load(Ordering::SeqCst), 1, "never rebuilt");
    })
    .await;
}

/// The other error policies: dead-letter the failed delivery, or retry it
/// after a delay and dead-letter it when its attempts are spent.
#[tokio::test(start_paused = true)]
async fn error_policies_dead_letter_or_retry() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let mut dlq = with_dlq(&broker, "q", QueueOptions::default()).await;
        let attempts = Arc::new(AtomicU64::new(0));
        let failing = |attempts: Arc<AtomicU64>| {
            move || {
                let attempts = attempts.clone();
                move |_d: Delivery| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    async { Err::<(), Failure>(Failure::msg("bad")) }
                }
            }
        };
        let c = broker
            .consume(
                "q",
                ConsumeOptions::manual(1).on_error(OnError::DeadLetter),
                failing(attempts.clone()),
            )
            .await
            .unwrap();
        broker.publish("q", msg(1)).await.unwrap();
        tokio::time::sleep(WAIT).await;
        assert_eq!(drain(&mut dlq), [(1, DeathReason::Rejected)]);
        assert_eq!(attempts.swap(0, Ordering::SeqCst), 1);
        c.close().await;
        let retry = postbox_actors::RetryPolicy::fixed(Duration::from_secs(1), 3);
        let _c = broker
            .consume(
                "q",
                ConsumeOptions::manual(1).on_error(OnError::Retry(retry)),
                failing(attempts.clone()),
            )
            .await
            .unwrap();
        broker.publish("q", msg(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            2,
            "retried after its delay"
        );
        tokio::time::sleep(WAIT).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_eq!(drain(&mut dlq), [(2, DeathReason::Rejected)]);
    })
    .await;
}

#[derive(Default)]
struct Crashes(Mutex<Vec<(ConsumerId, String, u64)>>);
impl Observer for Crashes {
    fn consumer_failed(
        &self,
        _queue: &str,
        consumer: ConsumerId,
        failure: &Failure,
        restarts: u64,
    ) {
        self.0
            .lock()
            .push((consumer, failure.message().to_string(), restarts));
    }
}

/// A consumer that panics in a loop is not abandoned silently: by default it
/// is restarted without limit, with a growing backoff, and it shows as
/// crash-looping in its report; each crash is an observer event. Restarts
/// are counted exactly.
#[tokio::test(start_paused = true)]
async fn a_crash_looping_consumer_is_visible_as_such() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let crashes = Arc::new(Crashes::default());
        let _guard = broker.observe(crashes.clone());
        let queue = broker
            .declare_queue("poison", QueueOptions::default())
            .await
            .unwrap();
        let consumer = broker
            .consume("poison", ConsumeOptions::manual(1), || {
                |_d: Delivery| async { panic!("poison message") }
            })
            .await
            .unwrap();
        queue.publish(msg(1)).await.unwrap();
        // Backoff 10 ms, 20, 40, ...: eight crashes take 10+20+...+1280 ms.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let report = consumer.report();
        assert!(report.crashes >= 8, "{report:?}");
        assert!(report.crash_looping, "{report:?}");
        assert!(report.running, "not abandoned");
        assert!(
            report
                .last_crash
                .as_ref()
                .is_some_and(|f| f.is_panic() && f.message().contains("poison"))
        );
        let events = crashes.0.lock().clone();
        assert_eq!(events.len() as u64, report.crashes);
        assert!(events.iter().all(|(_, m, _)| m.contains("poison")));
        // Restarts so far, as each crash saw them: 0, 1, 2, ...
        let restarts: Vec<u64> = events.iter().map(|e| e.2).collect();
        assert_eq!(restarts, (0..events.len() as u64).collect::<Vec<_>>());
        // Once the pending restart has happened, restarts equal crashes.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let report = consumer.report();
        assert!(report.restarts == report.crashes || report.restarts + 1 == report.crashes);
        consumer.close().await;
        let report = broker.queue_stats("poison").await.unwrap();
        assert_eq!(report.stats.ready, 1, "the poison message is still there");
    })
    .await;
}

/// Request-reply: the caller's own correlation id is kept (a second request
/// waiting with the same id is refused), and a remote error carries
/// structured details.
#[tokio::test(start_paused = true)]
async fn requests_keep_their_correlation_id_and_errors_carry_details() {
    local(async {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Invalid {
            field: String,
        }
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("svc", QueueOptions::default())
            .await
            .unwrap();
        let _responder = broker
            .respond("svc", ConsumeOptions::manual(8), || {
                |r: Request| async move {
                    let n: u32 = r.decode()?;
                    if n == 0 {
                        return Err(RemoteError::new("invalid")
                            .with_details(&Invalid { field: "n".into() })?);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(Envelope::encode(&(n * 2))?)
                }
            })
            .await
            .unwrap();
        let requester = broker.requester().await.unwrap();
        let pending = requester
            .request("svc", msg(21).with_correlation_id("order-7"))
            .send()
            .await
            .unwrap();
        assert_eq!(pending.id().to_string(), "order-7");
        assert_eq!(
            requester
                .request("svc", msg(1).with_correlation_id("order-7"))
                .await
                .unwrap_err(),
            RequestError::DuplicateCorrelationId("order-7".into())
        );
        let reply = pending.await.unwrap();
        assert_eq!(reply.correlation_id(), Some("order-7"));
        assert_eq!(reply.decode::<u32>().unwrap(), 42);
        let err = requester.request("svc", msg(0)).await.unwrap_err();
        assert!(matches!(err, RequestError::Remote { ref message, .. } if message == "invalid"));
        assert_eq!(
            err.details::<Invalid>().unwrap().unwrap(),
            Invalid { field: "n".into() }
        );
    })
    .await;
}
