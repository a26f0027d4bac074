//! Reliability: no message is lost without being counted, no publish is
//! accepted by a deleted queue, and no call is left hanging after the runtime
//! shuts down. Each test here failed before the fix it guards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use postbox::testkit::local;
use postbox::{Backoff, Failure, Runtime, RuntimeHandle};
use postbox_actors::rpc::{RemoteError, Request, RequestError};
use postbox_actors::testkit::DeliveryProbe;
use postbox_actors::{
    AckError, Broker, BrokerError, ConsumeOptions, Consumer, ConsumerId, DeleteOptions, Delivery,
    Envelope, ExchangeOptions, NameError, Observer, OnError, QueueOptions, StreamError,
    TryPublishError,
};
use postbox_actors::{StreamDelivery, StreamOptions, StreamStart, SubscribeOptions};

mod common;
use common::msg;

/// Long enough for anything in these tests to happen, in virtual time.
const WAIT: Duration = Duration::from_secs(60);

/// Publishes `n` messages to a queue with four auto-ack consumers whose
/// handlers fail on some messages (`fails(n)`: an error, or a panic when
/// `panics(n)`), restarting without limit, and waits until every message is
/// either handled or counted as lost. Returns (handled, lost).
async fn storm(
    rt: RuntimeHandle,
    n: u32,
    fails: fn(u32) -> bool,
    panics: fn(u32) -> bool,
) -> (u64, u64) {
    let broker = Broker::new(&rt);
    let queue = broker
        .declare_queue("storm", QueueOptions::default())
        .await
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let handled = handled.clone();
        let options = ConsumeOptions::auto()
            .restarts(usize::MAX, Duration::from_secs(1))
            .backoff(Backoff::NONE);
        let consumer = broker
            .consume("storm", options, move || {
                let handled = handled.clone();
                move |d: Delivery| {
                    let handled = handled.clone();
                    async move {
                        let n: u32 = d.decode()?;
                        if panics(n) {
                            panic!("poison {n}");
                        }
                        if fails(n) {
                            return Err(Failure::msg(format!("transient {n}")));
                        }
                        handled.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        consumers.push(consumer);
    }
    for i in 0..n {
        queue.publish(msg(i)).await.unwrap();
    }
    let accounted = async {
        loop {
            let lost = queue.snapshot().await.unwrap().auto_ack_lost;
            let done = handled.load(Ordering::Relaxed);
            if done + lost >= u64::from(n) {
                return (done, lost);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (done, lost) = tokio::time::timeout(WAIT, accounted)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "messages unaccounted for: handled {} of {n}",
                handled.load(Ordering::Relaxed)
            )
        });
    let snapshot = queue.snapshot().await.unwrap();
    assert_eq!(snapshot.stats.ready, 0);
    assert_eq!(snapshot.stats.published, u64::from(n));
    assert_eq!(snapshot.consumers.len(), 4, "every consumer is still there");
    (done, lost)
}

/// A failing handler loses the delivery it was handling (at most once), and
/// only that one: the rest of its batch goes to the restarted incarnation.
/// Before the fix the rest of the batch (up to 63 deliveries) vanished, and
/// `auto_ack_lost` read 0.
#[tokio::test(start_paused = true)]
async fn an_auto_ack_crash_storm_accounts_for_every_message() {
    local(async {
        const N: u32 = 20_000;
        let fails = |n: u32| n % 10 == 3;
        let panics = |n: u32| n % 20 == 7;
        let failures = (0..N).filter(|&n| fails(n) || panics(n)).count() as u64;
        let (handled, lost) = storm(RuntimeHandle::local(), N, fails, panics).await;
        assert_eq!(handled + lost, u64::from(N));
        assert_eq!(lost, failures, "exactly the failed deliveries are lost");
    })
    .await;
}

/// The same across real arbiters, large: run by `.ci/run` (`--ignored`).
#[test]
#[ignore = "stress: 1,000,000 messages across arbiters"]
fn an_auto_ack_crash_storm_across_arbiters_accounts_for_every_message() {
    const N: u32 = 1_000_000;
    let rt = Runtime::with_arbiters(2).unwrap();
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fails = |n: u32| n % 10 == 3;
    let panics = |n: u32| n % 1000 == 7;
    let failures = (0..N).filter(|&n| fails(n) || panics(n)).count() as u64;
    let (handled, lost) = client.block_on(storm(rt.handle(), N, fails, panics));
    assert_eq!(handled + lost, u64::from(N));
    assert_eq!(lost, failures);
}

/// Deliveries still in a consumer's mailbox when it stops for good (here: it
/// is cancelled while its handler is stuck, then its queue is deleted) are
/// counted as lost, not dropped silently.
#[tokio::test(start_paused = true)]
async fn auto_ack_deliveries_dropped_with_a_consumer_are_counted() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        let h = handled.clone();
        let consumer = broker
            .consume(
                "q",
                ConsumeOptions::auto()
                    .on_error(OnError::Restart)
                    .restarts(0, Duration::from_secs(1)),
                move || {
                    let h = h.clone();
                    move |d: Delivery| {
                        let h = h.clone();
                        async move {
                            let n: u32 = d.decode()?;
                            if n == 5 {
                                // Fails once: past its restart limit it stays down.
                                return Err(Failure::msg("fatal"));
                            }
                            h.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                    }
                },
            )
            .await
            .unwrap();
        for n in 0..100 {
            queue.publish(msg(n)).await.unwrap();
        }
        tokio::time::timeout(WAIT, consumer.terminated())
            .await
            .unwrap();
        let snapshot = queue.snapshot().await.unwrap();
        let handled = handled.load(Ordering::Relaxed);
        // Everything dispatched to it is either handled or lost; the rest is ready.
        assert_eq!(
            handled + snapshot.auto_ack_lost + snapshot.stats.ready as u64,
            100,
            "handled {handled}, {snapshot:?}"
        );
        assert!(snapshot.auto_ack_lost >= 1);
    })
    .await;
}

/// Publishes racing `delete_queue`, through every publish path of a handle
/// taken before the delete: every publish that returned `Ok` is counted in the
/// deleted queue's snapshot, and none returns `Ok` once `delete_queue` has
/// returned. (Before the fix, in most rounds publishes returned `Ok` after the
/// delete and their messages vanished.)
#[test]
fn publishes_racing_delete_are_never_accepted_and_lost() {
    const ROUNDS: usize = 2_000;
    let rt = Runtime::with_arbiters(2).unwrap();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Broker::new(&rt);
    client.block_on(async {
        for round in 0..ROUNDS {
            let name = format!("race.{round}");
            let queue = broker
                .declare_queue(&name, QueueOptions::default().mailbox(16))
                .await
                .unwrap();
            let accepted = Arc::new(AtomicU64::new(0));
            let deleted = Arc::new(AtomicBool::new(false));
            let mut publishers = Vec::new();
            for kind in 0..3 {
                let (queue, accepted, deleted) = (queue.clone(), accepted.clone(), deleted.clone());
                publishers.push(tokio::spawn(async move {
                    let mut i = 0u32;
                    loop {
                        i += 1;
                        let late = deleted.load(Ordering::SeqCst);
                        let (result, n) = match kind {
                            0 => (queue.publish(msg(i)).await, 1),
                            1 => match queue.try_publish(msg(i)) {
                                Err(TryPublishError::Full { .. }) => {
                                    tokio::task::yield_now().await;
                                    continue;
                                }
                                Err(TryPublishError::Refused(err)) => (Err(err), 1),
                                Ok(()) => (Ok(()), 1),
                            },
                            _ => (queue.publish_batch(vec![msg(i), msg(i), msg(i)]).await, 3),
                        };
                        match result {
                            Ok(()) => {
                                assert!(
                                    !late,
                                    "a publish was accepted after delete_queue returned"
                                );
                                accepted.fetch_add(n, Ordering::SeqCst);
                            }
                            Err(BrokerError::QueueNotFound(_)) => return,
                            Err(other) => panic!("unexpected {other:?}"),
                        }
                        if i.is_multiple_of(8) {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
            for _ in 0..fastrand::usize(0..40) {
                tokio::task::yield_now().await;
            }
            let snapshot = broker
                .delete_queue(&name, DeleteOptions::default())
                .await
                .unwrap();
            deleted.store(true, Ordering::SeqCst);
            for publisher in publishers {
                publisher.await.unwrap();
            }
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                snapshot.stats.published,
                "round {round}: every accepted publish is in the deleted queue"
            );
            assert!(matches!(
                queue.publish(msg(0)).await,
                Err(BrokerError::QueueNotFound(_))
            ));
        }
    });
}

/// Records what a consumer is told.
struct Cancellable {
    cancelled: Arc<AtomicUsize>,
}

impl Consumer for Cancellable {
    async fn handle(&mut self, d: Delivery) -> Result<(), Failure> {
        d.ack().await?;
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct CancelWatch(AtomicUsize);
impl Observer for CancelWatch {
    fn consumer_cancelled(&self, _queue: &str, _consumer: ConsumerId) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Deleting a queue cancels its consumers, as RabbitMQ does (`basic.cancel`):
/// they are told, they stop for good, and a queue declared again under the
/// same name has no consumer. (Before the fix they lived on, registered to
/// nothing.)
#[tokio::test(start_paused = true)]
async fn deleting_a_queue_cancels_its_consumers() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let watch = Arc::new(CancelWatch::default());
        let _guard = broker.observe(watch.clone());
        let queue = broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        let cancelled = Arc::new(AtomicUsize::new(0));
        let mut consumers = Vec::new();
        for _ in 0..2 {
            let c = cancelled.clone();
            consumers.push(
                broker
                    .consume("orders", ConsumeOptions::manual(4), move || Cancellable {
                        cancelled: c.clone(),
                    })
                    .await
                    .unwrap(),
            );
        }
        for n in 0..10 {
            queue.publish(msg(n)).await.unwrap();
        }
        broker
            .delete_queue("orders", DeleteOptions::default())
            .await
            .unwrap();
        for consumer in &consumers {
            tokio::time::timeout(WAIT, consumer.terminated())
                .await
                .expect("the consumer of a deleted queue lives on");
            assert_eq!(consumer.consumer_id().await, None);
        }
        assert_eq!(cancelled.load(Ordering::SeqCst), 2);
        assert_eq!(watch.0.load(Ordering::SeqCst), 2);
        let again = broker
            .declare_queue("orders", QueueOptions::default())
            .await
            .unwrap();
        again.publish(msg(1)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snapshot = again.snapshot().await.unwrap();
        assert_eq!(snapshot.stats.consumers, 0);
        assert_eq!(snapshot.stats.ready, 1);
        // Cancelling afterwards is harmless.
        for consumer in consumers {
            consumer.cancel().await;
        }
    })
    .await;
}

/// `if_empty` counts ready messages only, as RabbitMQ does: a queue whose
/// only message waits for its acknowledgement is empty.
#[tokio::test(start_paused = true)]
async fn delete_if_empty_counts_ready_messages_only() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let _c = broker
            .consume("q", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        queue.publish(msg(1)).await.unwrap();
        queue.publish(msg(2)).await.unwrap();
        let held = probe.expect_delivery(WAIT).await;
        let if_empty = DeleteOptions {
            if_empty: true,
            ..DeleteOptions::default()
        };
        assert_eq!(
            broker.delete_queue("q", if_empty).await.unwrap_err(),
            BrokerError::QueueNotEmpty {
                name: "q".into(),
                messages: 1
            }
        );
        // With the ready one purged, only the unacknowledged one is left.
        assert_eq!(broker.purge_queue("q").await.unwrap(), 1);
        let snapshot = broker.delete_queue("q", if_empty).await;
        assert_eq!(snapshot.unwrap().stats.unacked, 1);
        drop(held);
    })
    .await;
}

/// Shutdown with publishers, stream publishers, requesters and consumers in
/// flight: every task resolves within a second with a typed `Stopped`, and
/// every later call fails the same way at once. (Before the fix, publishers
/// waiting for room hung forever, `try_publish` said "busy", and
/// `declare_queue` returned `Ok`.)
#[test]
fn shutdown_with_traffic_in_flight_leaves_nothing_hanging() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = Broker::new(&rt);
    let (tasks, queue, stream, consumer) = client.block_on(async {
        let mut tasks: Vec<tokio::task::JoinHandle<&'static str>> = Vec::new();
        // A queue whose inbox is tiny (its backlog bounded), and a consumer
        // that holds what it gets.
        let queue = broker
            .declare_queue(
                "flood",
                QueueOptions::default().mailbox(1).max_length(10_000),
            )
            .await
            .unwrap();
        let consumer = broker
            .consume("flood", ConsumeOptions::manual(8), || {
                |_d: Delivery| std::future::pending::<Result<(), Failure>>()
            })
            .await
            .unwrap();
        // A block-mode stream whose only subscriber is stuck.
        let stream = broker
            .declare_stream("stuck", StreamOptions::default().max_len(2))
            .await
            .unwrap();
        let _sub = stream
            .subscribe(StreamStart::First, SubscribeOptions::default(), || {
                |_d: StreamDelivery| std::future::pending::<Result<(), Failure>>()
            })
            .await
            .unwrap();
        for _ in 0..3 {
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match stream.publish(msg(1)).await {
                        Ok(_) => {}
                        Err(StreamError::Stopped) => return "stream publisher stopped",
                        Err(other) => panic!("stream publisher: {other:?}"),
                    }
                }
            }));
        }
        // Requests to a responder that never answers.
        broker
            .declare_queue("rpc", QueueOptions::default())
            .await
            .unwrap();
        let _responder = broker
            .respond("rpc", ConsumeOptions::manual(8), || {
                // Never answers.
                |_r: Request| std::future::pending::<Result<Envelope, RemoteError>>()
            })
            .await
            .unwrap();
        let requester = broker.requester().await.unwrap();
        for _ in 0..3 {
            let requester = requester.clone();
            tasks.push(tokio::spawn(async move {
                match requester
                    .request("rpc", msg(1))
                    .timeout(Duration::from_secs(3600))
                    .await
                {
                    Err(RequestError::Broker(BrokerError::Stopped)) => "requester stopped",
                    other => panic!("request: {other:?}"),
                }
            }));
        }
        // Publishers flooding the queue, started last: they keep its arbiter busy.
        for _ in 0..4 {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match queue.publish_batch(vec![msg(1); 64]).await {
                        Ok(()) => {}
                        Err(BrokerError::Stopped) => return "publisher stopped",
                        Err(other) => panic!("publisher: {other:?}"),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for task in &tasks {
            assert!(
                !task.is_finished(),
                "everything is in flight before shutdown"
            );
        }
        (tasks, queue, stream, consumer)
    });
    rt.shutdown();
    client.block_on(async {
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("a call was left hanging after shutdown")
                .unwrap();
        }
        let second = Duration::from_secs(1);
        tokio::time::timeout(second, consumer.terminated())
            .await
            .unwrap();
        tokio::time::timeout(second, consumer.cancel())
            .await
            .unwrap();
        // Every later call fails at once with Stopped.
        assert_eq!(queue.publish(msg(1)).await, Err(BrokerError::Stopped));
        assert!(matches!(
            queue.try_publish(msg(1)),
            Err(TryPublishError::Refused(BrokerError::Stopped))
        ));
        assert_eq!(stream.publish(msg(1)).await, Err(StreamError::Stopped));
        assert_eq!(
            broker
                .declare_queue("new", QueueOptions::default())
                .await
                .unwrap_err(),
            BrokerError::Stopped
        );
        assert_eq!(
            broker
                .declare_stream("new", StreamOptions::default())
                .await
                .unwrap_err(),
            StreamError::Stopped
        );
        assert!(matches!(
            broker.publish_to("", "flood", msg(1)).await,
            Err(postbox_actors::PublishError::Refused(BrokerError::Stopped))
        ));
        assert_eq!(
            broker
                .declare_exchange("x", ExchangeOptions::direct())
                .await
                .unwrap_err(),
            BrokerError::Stopped
        );
        assert!(
            tokio::time::timeout(second, broker.requester())
                .await
                .unwrap()
                .is_err()
        );
        assert_eq!(
            tokio::time::timeout(
                second,
                broker.delete_queue("flood", DeleteOptions::default())
            )
            .await
            .unwrap()
            .unwrap_err(),
            BrokerError::Stopped
        );
    });
}

/// Any duration works where a caller gives one: `Duration::MAX` is "never"
/// for timeouts, and an over-long delayed requeue is refused with a typed
/// error. (Before the fix an rpc timeout of `Duration::MAX` panicked in the
/// caller, and `nack_after(Duration::MAX)` parked a message forever.)
#[tokio::test(start_paused = true)]
async fn durations_saturate_or_are_refused() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("echo", QueueOptions::default())
            .await
            .unwrap();
        let _responder = broker
            .respond("echo", ConsumeOptions::manual(8), || {
                |r: Request| async move { Ok(r.message().clone()) }
            })
            .await
            .unwrap();
        let requester = broker.requester().await.unwrap();
        let reply = requester
            .request("echo", msg(7))
            .timeout(Duration::MAX)
            .await
            .unwrap();
        assert_eq!(reply.decode::<u32>().unwrap(), 7);
        let mut pending = requester
            .request("echo", msg(8))
            .timeout(Duration::MAX)
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(pending.try_reply().unwrap().is_ok());
        let gathered = requester
            .request("echo", msg(9))
            .timeout(Duration::MAX)
            .gather(1)
            .await
            .unwrap();
        assert_eq!(gathered.len(), 1);

        // Delayed requeue: refused past the limit, and the delivery stays held.
        let queue = broker
            .declare_queue("later", QueueOptions::default().message_ttl(Duration::MAX))
            .await
            .unwrap();
        let mut probe = DeliveryProbe::new(&RuntimeHandle::local());
        let _c = broker
            .consume("later", ConsumeOptions::manual(1), probe.consumer())
            .await
            .unwrap();
        queue
            .publish(msg(1).with_expiration(Duration::MAX))
            .await
            .unwrap();
        let d = probe.expect_delivery(WAIT).await;
        assert!(matches!(
            d.nack_after(Duration::MAX).await,
            Err(AckError::DelayTooLong { .. })
        ));
        d.nack_after(postbox_actors::MAX_REQUEUE_DELAY)
            .await
            .unwrap();
        let again = probe
            .expect_delivery(postbox_actors::MAX_REQUEUE_DELAY + WAIT)
            .await;
        assert!(again.redelivered());
        again.ack().await.unwrap();
    })
    .await;
}

/// A message's size counts its headers and properties, not only its payload:
/// a 32 KiB header on a 1-byte payload does not pass a 1 KiB limit. (RabbitMQ
/// 3.10's `max_message_size` counts bodies only, but bounds headers by its
/// frame size; postbox has no frames, so it counts the whole message.)
#[tokio::test(start_paused = true)]
async fn message_size_limits_count_the_whole_message() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let queue = broker
            .declare_queue("small", QueueOptions::default().max_message_bytes(1024))
            .await
            .unwrap();
        let padded = || Envelope::new("x").with_header("pad", "y".repeat(32 << 10));
        match queue.publish(padded()).await {
            Err(BrokerError::MessageTooLarge { size, limit, .. }) => {
                assert!(size > 32 << 10);
                assert_eq!(limit, 1024);
            }
            other => panic!("{other:?}"),
        }
        assert!(queue.try_publish(padded()).is_err());
        assert!(broker.publish_to("", "small", padded()).await.is_err());
        queue.publish(Envelope::new("x")).await.unwrap();
        let stream = broker
            .declare_stream("small", StreamOptions::default().max_message_bytes(1024))
            .await
            .unwrap();
        assert!(matches!(
            stream.publish(padded()).await,
            Err(StreamError::MessageTooLarge { .. })
        ));
        stream.publish(Envelope::new("x")).await.unwrap();
        assert_eq!(queue.snapshot().await.unwrap().stats.published, 1);
    })
    .await;
}

/// Names starting with `amq.` are reserved, as in RabbitMQ: declaring a
/// queue, exchange or stream with one is refused.
#[tokio::test(start_paused = true)]
async fn amq_names_are_reserved() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        let reserved =
            |err: &BrokerError| matches!(err, BrokerError::InvalidName(NameError::Reserved { .. }));
        let err = broker
            .declare_queue("amq.gen-1", QueueOptions::default())
            .await
            .unwrap_err();
        assert!(reserved(&err), "{err:?}");
        let err = broker
            .declare_exchange("amq.orders", ExchangeOptions::topic())
            .await
            .unwrap_err();
        assert!(reserved(&err), "{err:?}");
        assert!(matches!(
            broker
                .declare_stream("amq.log", StreamOptions::default())
                .await,
            Err(StreamError::InvalidName(NameError::Reserved { .. }))
        ));
        assert!(broker.queue_names().is_empty());
        // Routing keys may use the prefix.
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        broker
            .declare_exchange("x", ExchangeOptions::direct())
            .await
            .unwrap();
        broker.bind_queue("q", "x", "amq.key").await.unwrap();
        assert_eq!(broker.publish_to("x", "amq.key", msg(1)).await.unwrap(), 1);
    })
    .await;
}
