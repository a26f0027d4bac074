//! Behaviour conformance: the broker API's behaviours, each written once and
//! run on both backends: embedded (`Broker::new`) and RabbitMQ
//! (`Broker::connect`, feature `amqp`).
//!
//! Each test is a plain `async fn(&Fixture)`; [`conformance!`] generates a
//! `#[tokio::test]` for it in `mod embedded` and, with feature `amqp`, in
//! `mod rabbitmq`. The RabbitMQ variants read `AMQP_URL` and pass, saying so,
//! when it is not set:
//!
//! ```text
//! cargo test -p postbox-actors --test conformance
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo test -p postbox-actors --features amqp --test conformance
//! ```
//!
//! Time is real (RabbitMQ is): TTLs are short and every wait is bounded.
//! Names are unique per run ([`Fixture::name`]), since a RabbitMQ server is
//! shared between runs, and the fixture deletes what it named afterwards,
//! whether the test passed or not. Where the backends differ on purpose, a
//! test asserts each one's own behaviour in a `match fx.backend()`, with the
//! reason.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use parking_lot::Mutex;
use postbox::{Backoff, Failure, Runtime};
use postbox_actors::idempotency::{Idempotent, MemoryStore};
use postbox_actors::partition::{PartitionKey, kafka_partition};
use postbox_actors::rpc::{RemoteError, Request, RequestError, Target};
use postbox_actors::{
    AckError, AckMode, Backend, Broker, BrokerError, ConsumeOptions, Consumer, DeathReason,
    DedupTarget, DedupWindow, DeleteOptions, Delivery, Envelope, ExchangeOptions, HeadersMatch,
    KeyOrdered, LayerExt, NameError, NameKind, OnError, Overflow, PartitionOptions, PublishError,
    PublishOptions, QueueOptions, RetryPolicy, StreamDelivery, StreamError, StreamHandle,
    StreamOptions, StreamStart, StreamSubscription, SubscribeOptions,
};
use postbox_actors::{ConsumerPool, PoolOptions};
use tokio::sync::mpsc;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Long enough for anything that should happen to happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that should not happen.
const QUIET: Duration = Duration::from_millis(300);
/// The most a test may take, cleanup aside.
const TEST_LIMIT: Duration = Duration::from_secs(25);

// ---------------------------------------------------------------------------
// The fixture and the harness.

/// What each test gets: a broker on one backend, and unique names that are
/// deleted after the test.
struct Fixture {
    broker: Broker,
    names: Mutex<Vec<String>>,
}

impl Fixture {
    fn backend(&self) -> Backend {
        self.broker.backend()
    }

    /// A unique name starting with `base`, deleted (as a queue and as an
    /// exchange) after the test.
    fn name(&self, base: &str) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("conformance.{base}.{}", &id[..8]);
        self.track(&name);
        name
    }

    /// Deletes `name` after the test too (a name the broker chose).
    fn track(&self, name: &str) {
        self.names.lock().push(name.to_string());
    }

    /// Best effort: deletes every queue and exchange it named, newest first.
    async fn cleanup(&self) {
        let names: Vec<String> = self.names.lock().drain(..).rev().collect();
        for name in names {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = self
                    .broker
                    .delete_queue(&name, DeleteOptions::default())
                    .await;
                let _ = self.broker.delete_exchange(&name, false).await;
                let _ = self.broker.delete_stream(&name).await;
            })
            .await;
        }
    }
}

/// A test body: a function of the fixture.
type Body = for<'a> fn(&'a Fixture) -> LocalBoxFuture<'a, TestResult>;

/// Runs `body` on `backend`, then cleans up whatever happened, then reports.
async fn run(backend: Backend, test: &str, body: Body) {
    let rt = Runtime::new().expect("a postbox runtime");
    let broker = match backend {
        Backend::RabbitMq => {
            let Ok(url) = std::env::var("AMQP_URL") else {
                eprintln!("{test}: AMQP_URL is not set, the RabbitMQ run is skipped");
                return;
            };
            Broker::connect(&rt, &url)
                .await
                .expect("connect to RabbitMQ at AMQP_URL")
        }
        _ => Broker::new(&rt),
    };
    assert_eq!(broker.backend(), backend);
    let fx = Fixture {
        broker,
        names: Mutex::default(),
    };
    let outcome = AssertUnwindSafe(tokio::time::timeout(TEST_LIMIT, body(&fx)))
        .catch_unwind()
        .await;
    fx.cleanup().await;
    // The runtime shuts down (closing the RabbitMQ connection) while the
    // broker is still there.
    drop(rt);
    drop(fx);
    match outcome {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => panic!("{test} on {backend:?}: {err}"),
        Ok(Err(_)) => panic!("{test} on {backend:?}: still running after {TEST_LIMIT:?}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// For each test function named, a `#[tokio::test]` on each backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    fn body(fx: &super::Fixture) -> super::LocalBoxFuture<'_, super::TestResult> {
                        Box::pin(super::$name(fx))
                    }
                    super::run(super::Backend::Embedded, stringify!($name), body).await;
                }
            )*
        }

        #[cfg(feature = "amqp")]
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    fn body(fx: &super::Fixture) -> super::LocalBoxFuture<'_, super::TestResult> {
                        Box::pin(super::$name(fx))
                    }
                    super::run(super::Backend::RabbitMq, stringify!($name), body).await;
                }
            )*
        }
    };
}

conformance!(
    // routing
    direct_routes_by_exact_key,
    fanout_copies_to_every_bound_queue,
    topic_star_is_one_word_and_hash_zero_or_more,
    headers_match_all_and_any,
    exchange_to_exchange_binding_routes_through,
    alternate_exchange_takes_what_routes_nowhere,
    unbinding_stops_routing,
    mandatory_unroutable_hands_the_message_back,
    publish_to_a_missing_exchange_is_exchange_not_found,
    publish_to_a_missing_queue_is_queue_not_found,
    publishing_to_a_queue_routes_by_its_name,
    // confirms
    a_confirmed_publish_is_counted_ready,
    publish_batch_through_the_queue_handle,
    // acknowledgements
    nack_with_requeue_redelivers_flagged,
    requeue_returns_to_the_original_position,
    double_ack_is_already_settled,
    ack_multiple_settles_every_earlier_delivery,
    dropping_an_unsettled_get_requeues_it,
    // consumers
    competing_consumers_share_the_work,
    prefetch_bounds_unacknowledged_deliveries,
    a_panicking_consumer_has_its_delivery_redelivered,
    cancel_stops_deliveries_and_keeps_held_ones_settleable,
    close_requeues_what_the_consumer_held,
    single_active_consumer_gets_everything_until_it_goes,
    // dead letters
    rejected_and_nacked_messages_are_dead_lettered_with_their_death,
    a_dead_letter_cycle_counts_each_death,
    dead_letter_routing_key_replaces_the_key,
    // TTL
    queue_ttl_expires_to_the_dead_letter_exchange,
    per_message_expiration_is_never_delivered,
    // length limits
    max_length_drops_the_head_to_the_dead_letter_exchange,
    reject_publish_refuses_when_full,
    reject_publish_dlx_refuses_and_dead_letters,
    max_length_bytes_counts_payload_bytes,
    // priorities
    priority_queue_delivers_highest_first,
    // request-reply
    request_gets_its_reply,
    request_gets_the_responders_error,
    request_times_out,
    a_request_nothing_can_take_fails_at_once,
    // bad input
    invalid_names_are_refused,
    delete_if_empty_refuses_a_non_empty_queue,
    delete_if_unused_refuses_a_queue_with_consumers,
    redeclaring_with_other_options_is_a_mismatch,
    // on top of RabbitMQ (README, "postbox on RabbitMQ": what RabbitMQ
    // lacks, provided on this side with the embedded semantics)
    a_queue_dedup_window_refuses_a_second_publish_of_an_id,
    a_refused_publish_is_not_remembered_by_the_window,
    an_exchange_dedup_window_refuses_a_second_publish_of_an_id,
    nack_after_redelivers_once_the_delay_has_passed,
    a_retry_policy_dead_letters_after_its_attempts,
    key_ordered_consumption_keeps_each_keys_order,
    an_idempotent_consumer_handles_a_duplicate_once,
    block_makes_publishers_wait_and_bounds_the_queue,
    drop_new_keeps_the_oldest_and_dead_letters_the_rest,
    a_partitioned_queue_keeps_each_key_in_one_partition_in_order,
    a_consumer_pool_grows_under_a_backlog_and_shrinks_when_it_clears,
    // streams (RabbitMQ stream queues, read over AMQP 0-9-1)
    a_stream_is_read_from_where_each_subscriber_starts,
    a_failing_stream_subscriber_gets_the_record_again,
    a_named_stream_subscriber_resumes_where_it_stopped,
    a_subscribe_given_up_leaves_no_subscriber,
    a_stream_bound_to_an_exchange_gets_what_routes_to_it,
    a_stream_subscriber_can_start_at_a_time,
    a_deleted_stream_stops_its_subscribers_and_refuses_publishes,
    stream_retention_rabbitmq_lacks_is_refused,
);

// ---------------------------------------------------------------------------
// Helpers.

/// A message carrying `n`, JSON-encoded.
fn msg(n: u32) -> Envelope {
    Envelope::encode(&n).expect("encode")
}

/// The number a [`msg`] carries.
fn num(message: &Envelope) -> u32 {
    message.decode().expect("a number")
}

/// Polls `check` until it holds or `within` has passed; whether it held.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next item on `rx`, if one comes within `within`.
async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, within: Duration) -> Option<T> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// The ready messages of `queue` (`usize::MAX` if it cannot be read, the
/// error printed: a failing read must say why).
async fn ready(fx: &Fixture, queue: &str) -> usize {
    match fx.broker.queue_stats(queue).await {
        Ok(snapshot) => snapshot.stats.ready,
        Err(err) => {
            eprintln!("queue_stats({queue}) failed: {err} ({err:?})");
            usize::MAX
        }
    }
}

/// The registered consumers of `queue` (`usize::MAX` if it cannot be read,
/// the error printed).
async fn consumers(fx: &Fixture, queue: &str) -> usize {
    match fx.broker.queue_stats(queue).await {
        Ok(snapshot) => snapshot.stats.consumers,
        Err(err) => {
            eprintln!("queue_stats({queue}) failed: {err} ({err:?})");
            usize::MAX
        }
    }
}

/// Takes every ready message of `queue` (auto-ack), in order.
async fn take_all(fx: &Fixture, queue: &str) -> Result<Vec<Envelope>, BrokerError> {
    let mut out = Vec::new();
    while let Some((d, _)) = fx.broker.get(queue, AckMode::Auto).await? {
        out.push(d.into_message());
    }
    Ok(out)
}

/// The numbers of every ready message of `queue`, in order.
async fn numbers(fx: &Fixture, queue: &str) -> Result<Vec<u32>, BrokerError> {
    Ok(take_all(fx, queue).await?.iter().map(num).collect())
}

/// Waits until `queue` holds exactly `n` ready messages.
async fn wait_ready(fx: &Fixture, queue: &str, n: usize) -> Result<(), String> {
    if eventually(WAIT, || async { ready(fx, queue).await == n }).await {
        Ok(())
    } else {
        Err(format!(
            "{queue} never held {n} ready message(s); it holds {}",
            ready(fx, queue).await
        ))
    }
}

/// A consumer that hands each delivery to the test, unsettled.
struct Forward(mpsc::UnboundedSender<Delivery>);

impl Consumer for Forward {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let _ = self.0.send(delivery);
        Ok(())
    }
}

/// A factory of [`Forward`] consumers, and what they receive.
fn forward() -> (
    impl Fn() -> Forward + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Delivery>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (move || Forward(tx.clone()), rx)
}

/// A consumer that reports `(label, number)` for each delivery, holds it
/// for `hold`, then acknowledges it.
struct Labelled {
    label: &'static str,
    hold: Duration,
    tx: mpsc::UnboundedSender<(&'static str, u32)>,
}

impl Consumer for Labelled {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let _ = self.tx.send((self.label, delivery.decode()?));
        tokio::time::sleep(self.hold).await;
        delivery.ack().await?;
        Ok(())
    }
}

fn labelled(
    label: &'static str,
    hold: Duration,
    tx: &mpsc::UnboundedSender<(&'static str, u32)>,
) -> impl Fn() -> Labelled + Send + Sync + 'static {
    let tx = tx.clone();
    move || Labelled {
        label,
        hold,
        tx: tx.clone(),
    }
}

/// A dead-letter exchange (fanout) with a queue bound to it; returns
/// (exchange, queue).
async fn dead_letter_queue(fx: &Fixture, base: &str) -> Result<(String, String), BrokerError> {
    let dlx = fx.name(&format!("{base}.dlx"));
    let dlq = fx.name(&format!("{base}.dlq"));
    fx.broker
        .declare_exchange(&dlx, ExchangeOptions::fanout())
        .await?;
    fx.broker
        .declare_queue(&dlq, QueueOptions::default())
        .await?;
    fx.broker.bind_queue(&dlq, &dlx, "").await?;
    Ok((dlx, dlq))
}

/// Each message's number with its most recent death's queue, reason and
/// count.
fn deaths_of(messages: &[Envelope]) -> Vec<(u32, String, DeathReason, u64)> {
    messages
        .iter()
        .map(|m| {
            let death = m.deaths().first().expect("a death history");
            (num(m), death.queue.to_string(), death.reason, death.count)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Routing.

async fn direct_routes_by_exact_key(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let x = fx.name("direct");
    let (qa, qb) = (fx.name("a"), fx.name("b"));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    for (q, key) in [(&qa, "a"), (&qb, "b")] {
        b.declare_queue(q, QueueOptions::default()).await?;
        b.bind_queue(q, &x, key).await?;
    }
    assert_eq!(b.publish_to(&x, "a", msg(1)).await?, 1);
    assert_eq!(b.publish_to(&x, "b", msg(2)).await?, 1);
    assert_eq!(b.publish_to(&x, "a", msg(3)).await?, 1);
    // Exact keys only: no pattern, no prefix.
    assert_eq!(b.publish_to(&x, "a.b", msg(4)).await?, 0);
    assert_eq!(b.publish_to(&x, "A", msg(5)).await?, 0);
    assert_eq!(b.publish_to(&x, "", msg(6)).await?, 0);
    let got = take_all(fx, &qa).await?;
    assert_eq!(got.iter().map(num).collect::<Vec<_>>(), [1, 3]);
    assert_eq!((got[0].exchange(), got[0].routing_key()), (x.as_str(), "a"));
    assert_eq!(numbers(fx, &qb).await?, [2]);
    Ok(())
}

async fn fanout_copies_to_every_bound_queue(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let x = fx.name("fanout");
    let queues = [fx.name("f1"), fx.name("f2"), fx.name("f3")];
    b.declare_exchange(&x, ExchangeOptions::fanout()).await?;
    for q in &queues {
        b.declare_queue(q, QueueOptions::default()).await?;
        b.bind_queue(q, &x, "ignored").await?;
    }
    let taken = b.publish_to(&x, "any.key", msg(1)).await?;
    match fx.backend() {
        // Embedded, publish_to says how many queues took the message.
        Backend::Embedded => assert_eq!(taken, 3),
        // RabbitMQ's confirm does not say how many queues took it: 1 means
        // routed (documented on amqp::publish's publish_to_exchange).
        _ => assert_eq!(taken, 1),
    }
    let sent = b.publish_to(&x, "", msg(2)).await?;
    assert_eq!(sent, taken);
    for q in &queues {
        assert_eq!(numbers(fx, q).await?, [1, 2], "{q}");
    }
    Ok(())
}

async fn topic_star_is_one_word_and_hash_zero_or_more(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let x = fx.name("topic");
    let (star, hash, eu) = (fx.name("star"), fx.name("hash"), fx.name("eu"));
    b.declare_exchange(&x, ExchangeOptions::topic()).await?;
    for (q, pattern) in [(&star, "orders.*"), (&hash, "orders.#"), (&eu, "#.eu")] {
        b.declare_queue(q, QueueOptions::default()).await?;
        b.bind_queue(q, &x, pattern).await?;
    }
    // (number, routing key, how many queues it reaches)
    let sends = [
        (1, "orders", 1),        // hash: # is zero words
        (2, "orders.new", 2),    // star, hash
        (3, "orders.new.eu", 2), // hash, eu (* is exactly one word)
        (4, "orders.eu", 3),     // star, hash, eu
        (5, "eu", 1),            // eu: # is zero words
        (6, "payments.new", 0),  // none
        (7, "ordersx.new", 0),   // words, not prefixes
    ];
    for (n, key, reached) in sends {
        let taken = b.publish_to(&x, key, msg(n)).await?;
        match fx.backend() {
            Backend::Embedded => assert_eq!(taken, reached, "{key}"),
            // RabbitMQ does not say how many queues took it: 1 if routed.
            _ => assert_eq!(taken, reached.min(1), "{key}"),
        }
    }
    assert_eq!(numbers(fx, &star).await?, [2, 4]);
    assert_eq!(numbers(fx, &hash).await?, [1, 2, 3, 4]);
    assert_eq!(numbers(fx, &eu).await?, [3, 4, 5]);
    Ok(())
}

async fn headers_match_all_and_any(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let x = fx.name("headers");
    let (all, any) = (fx.name("all"), fx.name("any"));
    b.declare_exchange(&x, ExchangeOptions::headers()).await?;
    let wanted = [("format", "pdf"), ("type", "report")];
    b.declare_queue(&all, QueueOptions::default()).await?;
    b.bind_queue(&all, &x, HeadersMatch::all(wanted)).await?;
    b.declare_queue(&any, QueueOptions::default()).await?;
    b.bind_queue(&any, &x, HeadersMatch::any(wanted)).await?;
    let sends = [
        (1, vec![("format", "pdf"), ("type", "report")]),
        (2, vec![("format", "pdf")]),
        (3, vec![("type", "invoice")]),
        (
            4,
            vec![("type", "report"), ("format", "pdf"), ("lang", "en")],
        ),
        (5, vec![("format", "doc"), ("type", "report")]),
        (6, vec![]),
    ];
    for (n, headers) in sends {
        let mut m = msg(n);
        for (k, v) in headers {
            m = m.with_header(k, v);
        }
        // The routing key plays no part.
        b.publish_to(&x, "whatever", m).await?;
    }
    assert_eq!(numbers(fx, &all).await?, [1, 4]);
    assert_eq!(numbers(fx, &any).await?, [1, 2, 4, 5]);
    Ok(())
}

async fn exchange_to_exchange_binding_routes_through(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (source, dest) = (fx.name("source"), fx.name("dest"));
    let (q, direct) = (fx.name("q"), fx.name("direct"));
    b.declare_exchange(&source, ExchangeOptions::topic())
        .await?;
    b.declare_exchange(&dest, ExchangeOptions::fanout()).await?;
    b.bind_exchange(&dest, &source, "a.#").await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.bind_queue(&q, &dest, "").await?;
    // A queue bound to the source directly gets its own copy too.
    b.declare_queue(&direct, QueueOptions::default()).await?;
    b.bind_queue(&direct, &source, "#").await?;
    // (number, routing key, how many queues it reaches)
    for (n, key, reached) in [(1, "a.b", 2), (2, "b", 1), (3, "a", 2)] {
        let taken = b.publish_to(&source, key, msg(n)).await?;
        match fx.backend() {
            Backend::Embedded => assert_eq!(taken, reached, "{key}"),
            // RabbitMQ does not say how many queues took it: 1 if routed.
            _ => assert_eq!(taken, 1, "{key}"),
        }
    }
    assert_eq!(numbers(fx, &q).await?, [1, 3]);
    assert_eq!(numbers(fx, &direct).await?, [1, 2, 3]);
    // Unbinding the exchanges stops that path.
    assert!(b.unbind_exchange(&dest, &source, "a.#").await?);
    b.publish_to(&source, "a.c", msg(4)).await?;
    assert_eq!(numbers(fx, &q).await?, Vec::<u32>::new());
    assert_eq!(numbers(fx, &direct).await?, [4]);
    Ok(())
}

async fn alternate_exchange_takes_what_routes_nowhere(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (x, ae) = (fx.name("main"), fx.name("ae"));
    let (q, unrouted) = (fx.name("q"), fx.name("unrouted"));
    b.declare_exchange(&ae, ExchangeOptions::fanout()).await?;
    b.declare_queue(&unrouted, QueueOptions::default()).await?;
    b.bind_queue(&unrouted, &ae, "").await?;
    b.declare_exchange(&x, ExchangeOptions::direct().alternate_exchange(&ae))
        .await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.bind_queue(&q, &x, "k").await?;
    assert_eq!(b.publish_to(&x, "k", msg(1)).await?, 1);
    assert_eq!(b.publish_to(&x, "other", msg(2)).await?, 1);
    // Routed by the alternate exchange: not unroutable.
    let mandatory = PublishOptions::default().mandatory();
    assert_eq!(b.publish_with(&x, "z", msg(3), mandatory).await?, 1);
    assert_eq!(numbers(fx, &q).await?, [1]);
    let got = take_all(fx, &unrouted).await?;
    assert_eq!(got.iter().map(num).collect::<Vec<_>>(), [2, 3]);
    // The message keeps its routing key through the alternate exchange.
    assert_eq!(got[0].routing_key(), "other");
    Ok(())
}

async fn unbinding_stops_routing(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (x, q) = (fx.name("x"), fx.name("q"));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.bind_queue(&q, &x, "k").await?;
    // Binding twice is one binding.
    b.bind_queue(&q, &x, "k").await?;
    assert_eq!(b.publish_to(&x, "k", msg(1)).await?, 1);
    assert!(b.unbind_queue(&q, &x, "k").await?);
    assert_eq!(b.publish_to(&x, "k", msg(2)).await?, 0);
    assert_eq!(numbers(fx, &q).await?, [1]);
    Ok(())
}

async fn mandatory_unroutable_hands_the_message_back(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (x, q) = (fx.name("x"), fx.name("q"));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.bind_queue(&q, &x, "bound").await?;
    let sent = msg(7).with_header("h", "v").with_correlation_id("c-7");
    let id = sent.id();
    let mandatory = PublishOptions::default().mandatory();
    match b.publish_with(&x, "unbound", sent, mandatory).await {
        Err(PublishError::Unroutable {
            exchange,
            routing_key,
            message,
        }) => {
            assert_eq!(
                (exchange.as_str(), routing_key.as_str()),
                (x.as_str(), "unbound")
            );
            assert_eq!(message.id(), id);
            assert_eq!(num(&message), 7);
            assert_eq!(message.correlation_id(), Some("c-7"));
            assert_eq!(message.header("h").and_then(|v| v.as_str()), Some("v"));
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    // Without mandatory it is dropped and counted as reaching nothing.
    assert_eq!(b.publish_to(&x, "unbound", msg(8)).await?, 0);
    // The channel is still good for routable publishes.
    assert_eq!(b.publish_with(&x, "bound", msg(9), mandatory).await?, 1);
    assert_eq!(numbers(fx, &q).await?, [9]);
    Ok(())
}

async fn publish_to_a_missing_exchange_is_exchange_not_found(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (missing, q) = (fx.name("missing"), fx.name("q"));
    match b.publish_to(&missing, "k", msg(1)).await {
        Err(PublishError::Refused(BrokerError::ExchangeNotFound(name))) => {
            assert_eq!(name, missing)
        }
        other => panic!("expected ExchangeNotFound, got {other:?}"),
    }
    b.declare_queue(&q, QueueOptions::default()).await?;
    assert_eq!(
        b.bind_queue(&q, &missing, "k").await,
        Err(BrokerError::ExchangeNotFound(missing.clone()))
    );
    // The broker is still usable afterwards.
    b.publish(&q, msg(2)).await?;
    assert_eq!(numbers(fx, &q).await?, [2]);
    Ok(())
}

async fn publish_to_a_missing_queue_is_queue_not_found(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (missing, x) = (fx.name("missing"), fx.name("x"));
    assert_eq!(
        b.publish(&missing, msg(1)).await,
        Err(BrokerError::QueueNotFound(missing.clone()))
    );
    assert_eq!(
        b.queue_stats(&missing).await.map(|s| s.stats),
        Err(BrokerError::QueueNotFound(missing.clone()))
    );
    assert!(matches!(
        b.get(&missing, AckMode::Auto).await,
        Err(BrokerError::QueueNotFound(name)) if name == missing
    ));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    assert_eq!(
        b.bind_queue(&missing, &x, "k").await,
        Err(BrokerError::QueueNotFound(missing.clone()))
    );
    Ok(())
}

async fn publishing_to_a_queue_routes_by_its_name(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (q, missing) = (fx.name("q"), fx.name("missing"));
    b.declare_queue(&q, QueueOptions::default()).await?;
    // `publish` goes through the default exchange, whose routing key is the
    // queue's name (AMQP's default exchange: every queue bound by its name).
    b.publish(&q, msg(1)).await?;
    assert_eq!(b.publish_to("", &q, msg(2)).await?, 1);
    assert_eq!(b.publish_to("", &missing, msg(3)).await?, 0);
    let got = take_all(fx, &q).await?;
    assert_eq!(got.iter().map(num).collect::<Vec<_>>(), [1, 2]);
    for m in &got {
        assert_eq!(
            (m.exchange(), m.routing_key()),
            ("", q.as_str()),
            "{}",
            num(m)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Confirms.

async fn a_confirmed_publish_is_counted_ready(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    for n in 1..=3 {
        b.publish(&q, msg(n)).await?;
        // No waiting: once publish returns, the queue has it.
        assert_eq!(ready(fx, &q).await, n as usize);
    }
    if fx.backend() == Backend::Embedded {
        // RabbitMQ's passive declaration reports only ready messages and
        // consumers (QueueHandle::snapshot's docs).
        assert_eq!(b.queue_stats(&q).await?.stats.published, 3);
    }
    assert_eq!(numbers(fx, &q).await?, [1, 2, 3]);
    Ok(())
}

async fn publish_batch_through_the_queue_handle(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    let handle = b.declare_queue(&q, QueueOptions::default()).await?;
    assert_eq!(handle.name(), q);
    handle.publish_batch((1..=5).map(msg).collect()).await?;
    assert_eq!(ready(fx, &q).await, 5);
    handle.publish(msg(6)).await?;
    assert_eq!(handle.snapshot().await?.stats.ready, 6);
    assert_eq!(numbers(fx, &q).await?, [1, 2, 3, 4, 5, 6]);
    // A handle by name works too.
    b.queue(&q)?.publish_batch(vec![msg(7), msg(8)]).await?;
    assert_eq!(numbers(fx, &q).await?, [7, 8]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Acknowledgements.

async fn nack_with_requeue_redelivers_flagged(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(1), factory).await?;
    b.publish(&q, msg(7)).await?;
    let first = recv(&mut rx, WAIT).await.ok_or("no delivery")?;
    assert_eq!(num(&first), 7);
    assert!(!first.redelivered());
    assert_eq!(first.delivery_count(), 1);
    first.nack(true).await?;
    let again = recv(&mut rx, WAIT).await.ok_or("no redelivery")?;
    assert_eq!(again.id(), first.id());
    assert_eq!(num(&again), 7);
    assert!(again.redelivered());
    assert_eq!(again.delivery_count(), 2);
    again.ack().await?;
    // Settled: nothing more comes.
    assert!(recv(&mut rx, QUIET).await.is_none());
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn requeue_returns_to_the_original_position(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    for n in 1..=5 {
        b.publish(&q, msg(n)).await?;
    }
    let (one, left) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!((num(&one), left), (1, 4));
    let (two, left) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!((num(&two), left), (2, 3));
    one.nack(true).await?;
    // The requeue is applied by the queue (on RabbitMQ, on the delivery's
    // own channel): wait for it before the next get.
    wait_ready(fx, &q, 4).await?;
    let (again, left) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!((num(&again), left), (1, 3), "back at the head, before 3");
    assert!(again.redelivered());
    assert_eq!(again.id(), one.id());
    let (three, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!(num(&three), 3);
    assert!(!three.redelivered());
    for d in [&again, &two, &three] {
        d.ack().await?;
    }
    assert_eq!(numbers(fx, &q).await?, [4, 5]);
    Ok(())
}

async fn double_ack_is_already_settled(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.publish(&q, msg(1)).await?;
    let (d, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    d.ack().await?;
    let already = |err: AckError| {
        assert_eq!(
            err,
            AckError::AlreadySettled {
                tag: d.tag(),
                queue: q.as_str().into(),
            }
        )
    };
    already(d.ack().await.expect_err("a second ack"));
    already(d.nack(true).await.expect_err("a nack after the ack"));
    already(d.reject(false).await.expect_err("a reject after the ack"));
    drop(d);
    // The ack held: nothing comes back when the delivery goes.
    tokio::time::sleep(QUIET).await;
    assert_eq!(ready(fx, &q).await, 0);
    // An auto-ack delivery has nothing to settle.
    b.publish(&q, msg(2)).await?;
    let (auto, _) = b.get(&q, AckMode::Auto).await?.ok_or("empty")?;
    assert!(matches!(auto.ack().await, Err(AckError::AutoAck { .. })));
    Ok(())
}

async fn ack_multiple_settles_every_earlier_delivery(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    for n in 1..=4 {
        b.publish(&q, msg(n)).await?;
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(recv(&mut rx, WAIT).await.ok_or("a delivery")?);
    }
    assert_eq!(
        held.iter().map(|d| num(d)).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(held[2].ack_multiple().await?, 3);
    assert!(matches!(
        held[0].ack().await,
        Err(AckError::AlreadySettled { .. })
    ));
    if fx.backend() == Backend::Embedded {
        // Only the embedded snapshot counts unacknowledged deliveries.
        assert!(
            eventually(WAIT, || async {
                b.queue_stats(&q).await.is_ok_and(|s| s.stats.unacked == 1)
            })
            .await
        );
    }
    // Closing requeues what is still held: message 4 only.
    consumer.close().await;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 0 }).await);
    wait_ready(fx, &q, 1).await?;
    let back = take_all(fx, &q).await?;
    assert_eq!(back.iter().map(num).collect::<Vec<_>>(), [4]);
    assert!(back[0].redelivered());
    Ok(())
}

async fn dropping_an_unsettled_get_requeues_it(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.publish(&q, msg(1)).await?;
    b.publish(&q, msg(2)).await?;
    let (d, left) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!((num(&d), left), (1, 1));
    assert_eq!(ready(fx, &q).await, 1);
    drop(d);
    wait_ready(fx, &q, 2).await?;
    let (again, left) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    assert_eq!((num(&again), left), (1, 1), "back at its place");
    assert!(again.redelivered());
    again.ack().await?;
    assert_eq!(numbers(fx, &q).await?, [2]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Consumers.

async fn competing_consumers_share_the_work(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hold = Duration::from_millis(20);
    let a = b
        .consume(&q, ConsumeOptions::manual(1), labelled("a", hold, &tx))
        .await?;
    let c = b
        .consume(&q, ConsumeOptions::manual(1), labelled("b", hold, &tx))
        .await?;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 2 }).await);
    for n in 1..=10 {
        b.publish(&q, msg(n)).await?;
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(recv(&mut rx, WAIT).await.ok_or("a delivery")?);
    }
    assert!(recv(&mut rx, QUIET).await.is_none(), "each message once");
    let of = |label| {
        got.iter()
            .filter(|(l, _)| *l == label)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    let (to_a, to_b) = (of("a"), of("b"));
    let mut all: Vec<u32> = got.iter().map(|(_, n)| *n).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
    // Each holds one at a time for 20 ms: they take turns.
    assert!(to_a.len() >= 3 && to_b.len() >= 3, "a {to_a:?}, b {to_b:?}");
    // Each consumer sees its share in queue order.
    assert!(
        to_a.is_sorted() && to_b.is_sorted(),
        "a {to_a:?}, b {to_b:?}"
    );
    a.close().await;
    c.close().await;
    Ok(())
}

async fn prefetch_bounds_unacknowledged_deliveries(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(2), factory).await?;
    for n in 1..=3 {
        b.publish(&q, msg(n)).await?;
    }
    let first = recv(&mut rx, WAIT).await.ok_or("a first delivery")?;
    let second = recv(&mut rx, WAIT).await.ok_or("a second delivery")?;
    assert_eq!((num(&first), num(&second)), (1, 2));
    assert!(recv(&mut rx, QUIET).await.is_none(), "past the prefetch");
    assert_eq!(ready(fx, &q).await, 1);
    if fx.backend() == Backend::Embedded {
        // Only the embedded snapshot lists consumers and unacked counts.
        let snapshot = b.queue_stats(&q).await?;
        assert_eq!(snapshot.stats.unacked, 2);
        assert_eq!(snapshot.consumers[0].unacked, 2);
        assert_eq!(snapshot.consumers[0].prefetch, 2);
    }
    // One ack makes room for exactly one more.
    first.ack().await?;
    let third = recv(&mut rx, WAIT).await.ok_or("a third delivery")?;
    assert_eq!(num(&third), 3);
    assert_eq!(ready(fx, &q).await, 0);
    // Closing requeues the two held, in their places.
    consumer.close().await;
    wait_ready(fx, &q, 2).await?;
    assert!(matches!(
        second.ack().await,
        Err(AckError::ConsumerGone { .. })
    ));
    let back = take_all(fx, &q).await?;
    assert_eq!(back.iter().map(num).collect::<Vec<_>>(), [2, 3]);
    assert!(back.iter().all(|m| m.redelivered()));
    Ok(())
}

/// Panics on its first delivery ever (across restarts), reports and acks
/// the others.
struct PanicsOnce {
    panicked: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<(u32, bool)>,
}

impl Consumer for PanicsOnce {
    async fn handle(&mut self, delivery: Delivery) -> Result<(), Failure> {
        let _ = self.tx.send((delivery.decode()?, delivery.redelivered()));
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("conformance: a consumer crash, on purpose");
        }
        delivery.ack().await?;
        Ok(())
    }
}

async fn a_panicking_consumer_has_its_delivery_redelivered(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let panicked = Arc::new(AtomicBool::new(false));
    let options = ConsumeOptions::manual(1).backoff(Backoff::exponential(
        Duration::from_millis(1),
        Duration::from_millis(50),
    ));
    let consumer = b
        .consume(&q, options, move || PanicsOnce {
            panicked: panicked.clone(),
            tx: tx.clone(),
        })
        .await?;
    b.publish(&q, msg(1)).await?;
    assert_eq!(recv(&mut rx, WAIT).await, Some((1, false)));
    // Redelivered, flagged, to the restarted consumer, which acks it.
    assert_eq!(recv(&mut rx, WAIT).await, Some((1, true)));
    b.publish(&q, msg(2)).await?;
    assert_eq!(recv(&mut rx, WAIT).await, Some((2, false)));
    assert!(
        eventually(WAIT, || async {
            let r = consumer.report();
            r.crashes == 1 && r.restarts == 1 && r.running
        })
        .await,
        "{:?}",
        consumer.report()
    );
    consumer.close().await;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 0 }).await);
    assert_eq!(ready(fx, &q).await, 0, "both were acknowledged");
    Ok(())
}

async fn cancel_stops_deliveries_and_keeps_held_ones_settleable(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    b.publish(&q, msg(1)).await?;
    let held = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
    assert_eq!(consumer.cancel().await, 1, "it held one when cancelled");
    b.publish(&q, msg(2)).await?;
    assert!(recv(&mut rx, QUIET).await.is_none(), "cancelled");
    assert_eq!(ready(fx, &q).await, 1);
    // Still settleable after the cancel; then the consumer is gone.
    held.ack().await?;
    tokio::time::timeout(WAIT, consumer.terminated())
        .await
        .map_err(|_| "the cancelled consumer never terminated")?;
    assert!(!consumer.report().running);
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 0 }).await);
    assert_eq!(numbers(fx, &q).await?, [2], "1 was acknowledged");
    Ok(())
}

async fn close_requeues_what_the_consumer_held(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    b.publish(&q, msg(1)).await?;
    b.publish(&q, msg(2)).await?;
    let one = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
    let two = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
    one.ack().await?;
    consumer.close().await;
    assert!(matches!(
        two.ack().await,
        Err(AckError::ConsumerGone { .. })
    ));
    wait_ready(fx, &q, 1).await?;
    let back = take_all(fx, &q).await?;
    assert_eq!(back.iter().map(num).collect::<Vec<_>>(), [2]);
    assert!(back[0].redelivered());
    assert_eq!(consumers(fx, &q).await, 0);
    Ok(())
}

async fn single_active_consumer_gets_everything_until_it_goes(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().single_active_consumer())
        .await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hold = Duration::from_millis(1);
    let first = b
        .consume(&q, ConsumeOptions::manual(1), labelled("first", hold, &tx))
        .await?;
    let standby = b
        .consume(
            &q,
            ConsumeOptions::manual(1),
            labelled("standby", hold, &tx),
        )
        .await?;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 2 }).await);
    for n in 1..=4 {
        b.publish(&q, msg(n)).await?;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut rx, WAIT).await.ok_or("a delivery")?);
    }
    assert_eq!(
        got,
        [("first", 1), ("first", 2), ("first", 3), ("first", 4)]
    );
    // The standby takes over when the active consumer goes.
    first.close().await;
    for n in 5..=6 {
        b.publish(&q, msg(n)).await?;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(recv(&mut rx, WAIT).await.ok_or("a delivery")?);
    }
    assert_eq!(got, [("standby", 5), ("standby", 6)]);
    standby.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Dead letters.

async fn rejected_and_nacked_messages_are_dead_lettered_with_their_death(
    fx: &Fixture,
) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "rej").await?;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().dead_letter_exchange(&dlx))
        .await?;
    // Through the default exchange, with the queue's name as the key.
    for n in 1..=3 {
        assert_eq!(b.publish_to("", &q, msg(n)).await?, 1);
    }
    let (one, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    one.reject(false).await?;
    let (two, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    two.nack(false).await?;
    let (three, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    three.ack().await?;
    wait_ready(fx, &dlq, 2).await?;
    let dead = take_all(fx, &dlq).await?;
    assert_eq!(
        deaths_of(&dead),
        [
            (1, q.clone(), DeathReason::Rejected, 1),
            (2, q.clone(), DeathReason::Rejected, 1),
        ]
    );
    for m in &dead {
        assert_eq!(m.deaths().len(), 1, "{:?}", m.deaths());
        let death = &m.deaths()[0];
        // Published through the default exchange, with the queue's name as
        // its routing key.
        assert_eq!(&*death.exchange, "");
        assert_eq!(
            death.routing_keys,
            vec![bytestring::ByteString::from(q.as_str())]
        );
        assert_eq!(m.first_death(), Some(death));
        // Republished through the dead-letter exchange, keeping its key.
        assert_eq!((m.exchange(), m.routing_key()), (dlx.as_str(), q.as_str()));
        assert!(!m.redelivered());
    }
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn a_dead_letter_cycle_counts_each_death(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    // work --reject--> retry (TTL) --expire--> work, by dead-letter routing
    // keys through the default exchange.
    let (work, retry) = (fx.name("work"), fx.name("retry"));
    b.declare_queue(
        &work,
        QueueOptions::default()
            .dead_letter_exchange("")
            .dead_letter_routing_key(&retry),
    )
    .await?;
    b.declare_queue(
        &retry,
        QueueOptions::default()
            .message_ttl(Duration::from_millis(100))
            .dead_letter_exchange("")
            .dead_letter_routing_key(&work),
    )
    .await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&work, ConsumeOptions::manual(1), factory).await?;
    b.publish(&work, msg(1)).await?;
    let first = recv(&mut rx, WAIT).await.ok_or("a first delivery")?;
    assert!(first.deaths().is_empty());
    assert!(first.first_death().is_none());
    first.reject(false).await?;
    let second = recv(&mut rx, WAIT).await.ok_or("a second delivery")?;
    let history = |d: &Delivery| {
        d.deaths()
            .iter()
            .map(|d| (d.queue.to_string(), d.reason, d.count))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        history(&second),
        [
            (retry.clone(), DeathReason::Expired, 1),
            (work.clone(), DeathReason::Rejected, 1),
        ]
    );
    second.reject(false).await?;
    let third = recv(&mut rx, WAIT).await.ok_or("a third delivery")?;
    // One entry per (queue, reason), most recent first, counting (as
    // RabbitMQ 3.10's x-death does).
    assert_eq!(
        history(&third),
        [
            (retry.clone(), DeathReason::Expired, 2),
            (work.clone(), DeathReason::Rejected, 2),
        ]
    );
    // The first death is never changed.
    let first_death = third.first_death().ok_or("a first death")?;
    assert_eq!(
        (&*first_death.queue, first_death.reason, first_death.count),
        (work.as_str(), DeathReason::Rejected, 1)
    );
    assert_eq!(
        third.routing_key(),
        work,
        "the last dead-letter routing key"
    );
    third.ack().await?;
    consumer.close().await;
    Ok(())
}

async fn dead_letter_routing_key_replaces_the_key(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq, q) = (fx.name("dlx"), fx.name("dlq"), fx.name("q"));
    b.declare_exchange(&dlx, ExchangeOptions::direct()).await?;
    b.declare_queue(&dlq, QueueOptions::default()).await?;
    b.bind_queue(&dlq, &dlx, "dead").await?;
    b.declare_queue(
        &q,
        QueueOptions::default()
            .dead_letter_exchange(&dlx)
            .dead_letter_routing_key("dead"),
    )
    .await?;
    assert_eq!(b.publish_to("", &q, msg(1)).await?, 1);
    let (d, _) = b.get(&q, AckMode::Manual).await?.ok_or("empty")?;
    d.reject(false).await?;
    wait_ready(fx, &dlq, 1).await?;
    let dead = take_all(fx, &dlq).await?;
    assert_eq!(deaths_of(&dead), [(1, q.clone(), DeathReason::Rejected, 1)]);
    assert_eq!(
        (dead[0].exchange(), dead[0].routing_key()),
        (dlx.as_str(), "dead")
    );
    // The death keeps the key it was published with.
    assert_eq!(
        dead[0].deaths()[0].routing_keys,
        vec![bytestring::ByteString::from(q.as_str())]
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// TTL.

async fn queue_ttl_expires_to_the_dead_letter_exchange(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "ttl").await?;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .message_ttl(Duration::from_millis(100))
            .dead_letter_exchange(&dlx),
    )
    .await?;
    b.publish(&q, msg(1)).await?;
    b.publish(&q, msg(2)).await?;
    wait_ready(fx, &dlq, 2).await?;
    assert_eq!(ready(fx, &q).await, 0);
    assert_eq!(b.get(&q, AckMode::Auto).await?.map(|(d, _)| num(&d)), None);
    let dead = take_all(fx, &dlq).await?;
    assert_eq!(
        deaths_of(&dead),
        [
            (1, q.clone(), DeathReason::Expired, 1),
            (2, q.clone(), DeathReason::Expired, 1),
        ]
    );
    assert_eq!(dead[0].first_death(), Some(&dead[0].deaths()[0]));
    Ok(())
}

async fn per_message_expiration_is_never_delivered(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "exp").await?;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().dead_letter_exchange(&dlx))
        .await?;
    b.publish(&q, msg(1).with_expiration(Duration::from_millis(50)))
        .await?;
    b.publish(&q, msg(2)).await?;
    wait_ready(fx, &dlq, 1).await?;
    // 1 expired at the head: a consumer never sees it.
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    let d = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
    assert_eq!(num(&d), 2);
    d.ack().await?;
    assert!(recv(&mut rx, QUIET).await.is_none());
    consumer.close().await;
    let dead = take_all(fx, &dlq).await?;
    assert_eq!(deaths_of(&dead), [(1, q.clone(), DeathReason::Expired, 1)]);
    // Dead-lettering removes the message's own expiration (so it does not
    // expire again where it goes), as RabbitMQ does.
    assert_eq!(dead[0].expiration(), None);
    Ok(())
}

// ---------------------------------------------------------------------------
// Length limits.

async fn max_length_drops_the_head_to_the_dead_letter_exchange(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "len").await?;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length(2)
            .dead_letter_exchange(&dlx),
    )
    .await?;
    for n in 1..=4 {
        b.publish(&q, msg(n)).await?;
    }
    assert_eq!(ready(fx, &q).await, 2);
    wait_ready(fx, &dlq, 2).await?;
    assert_eq!(numbers(fx, &q).await?, [3, 4]);
    assert_eq!(
        deaths_of(&take_all(fx, &dlq).await?),
        [
            (1, q.clone(), DeathReason::MaxLen, 1),
            (2, q.clone(), DeathReason::MaxLen, 1),
        ]
    );
    Ok(())
}

async fn reject_publish_refuses_when_full(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length(2)
            .overflow(Overflow::RejectPublish),
    )
    .await?;
    b.publish(&q, msg(1)).await?;
    b.publish(&q, msg(2)).await?;
    assert_eq!(
        b.publish(&q, msg(3)).await,
        Err(BrokerError::QueueFull(q.clone()))
    );
    assert_eq!(ready(fx, &q).await, 2);
    if fx.backend() == Backend::Embedded {
        // Only the embedded snapshot counts refusals.
        assert_eq!(b.queue_stats(&q).await?.stats.refused, 1);
    }
    // Room again once one is taken.
    let (one, _) = b.get(&q, AckMode::Auto).await?.ok_or("empty")?;
    assert_eq!(num(&one), 1);
    b.publish(&q, msg(4)).await?;
    assert_eq!(numbers(fx, &q).await?, [2, 4]);
    Ok(())
}

async fn reject_publish_dlx_refuses_and_dead_letters(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "rpdlx").await?;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length(1)
            .overflow(Overflow::RejectPublishDlx)
            .dead_letter_exchange(&dlx),
    )
    .await?;
    b.publish(&q, msg(1)).await?;
    assert_eq!(
        b.publish(&q, msg(2)).await,
        Err(BrokerError::QueueFull(q.clone()))
    );
    wait_ready(fx, &dlq, 1).await?;
    assert_eq!(numbers(fx, &q).await?, [1]);
    assert_eq!(
        deaths_of(&take_all(fx, &dlq).await?),
        [(2, q.clone(), DeathReason::MaxLen, 1)]
    );
    Ok(())
}

async fn max_length_bytes_counts_payload_bytes(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "bytes").await?;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length_bytes(10)
            .dead_letter_exchange(&dlx),
    )
    .await?;
    // Headers do not count, payloads do (as RabbitMQ counts bodies).
    for body in ["aaaa", "bbbb", "cccc"] {
        b.publish(&q, Envelope::new(body).with_header("pad", "x".repeat(100)))
            .await?;
    }
    assert_eq!(ready(fx, &q).await, 2);
    if fx.backend() == Backend::Embedded {
        // Only the embedded snapshot counts bytes (RabbitMQ's passive
        // declaration reports messages and consumers only).
        assert_eq!(b.queue_stats(&q).await?.stats.ready_bytes, 8);
    }
    let bodies = |ms: Vec<Envelope>| {
        ms.iter()
            .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(bodies(take_all(fx, &q).await?), ["bbbb", "cccc"]);
    wait_ready(fx, &dlq, 1).await?;
    let dead = take_all(fx, &dlq).await?;
    assert_eq!(dead[0].deaths()[0].reason, DeathReason::MaxLen);
    assert_eq!(bodies(dead), ["aaaa"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Priorities.

async fn priority_queue_delivers_highest_first(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().max_priority(5))
        .await?;
    // (number, priority); 9 is above the maximum and counts as 5.
    let sends = [
        (1, 1),
        (2, 5),
        (3, 3),
        (4, 0),
        (5, 5),
        (6, 9),
        (7, 2),
        (8, 3),
    ];
    for (n, priority) in sends {
        b.publish(&q, msg(n).with_priority(priority)).await?;
    }
    let got = take_all(fx, &q).await?;
    assert_eq!(
        got.iter().map(num).collect::<Vec<_>>(),
        [2, 5, 6, 3, 8, 7, 1, 4],
        "highest first, FIFO within a priority"
    );
    let priorities: Vec<u8> = got.iter().map(|m| m.priority()).collect();
    assert_eq!(priorities, [5, 5, 9, 3, 3, 2, 1, 0], "as published");
    Ok(())
}

// ---------------------------------------------------------------------------
// Request-reply.

/// A request that reaches no queue, or only a full one, fails at once with
/// the reason, both awaited and sent, and never waits out its timeout (on
/// RabbitMQ, an awaited request races its confirm against the reply).
async fn a_request_nothing_can_take_fails_at_once(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (x, full) = (fx.name("x"), fx.name("full"));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    b.declare_queue(
        &full,
        QueueOptions::default()
            .max_length(1)
            .overflow(Overflow::RejectPublish),
    )
    .await?;
    b.publish(&full, msg(0)).await?;
    let client = b.requester().await?;
    fx.track(client.reply_queue());
    let start = Instant::now();
    let unbound = || Target::exchange(x.as_str(), "nobody");
    match client.request(unbound(), msg(1)).timeout(WAIT).await {
        Err(RequestError::NoResponders { .. }) => {}
        other => panic!("expected NoResponders, got {other:?}"),
    }
    match client.request(unbound(), msg(2)).timeout(WAIT).send().await {
        Err(RequestError::NoResponders { .. }) => {}
        other => panic!("expected NoResponders, got {other:?}"),
    }
    let refused = client
        .request(full.as_str(), msg(3))
        .wait_for_responders()
        .timeout(WAIT)
        .await;
    assert_eq!(
        refused.err(),
        Some(RequestError::Broker(BrokerError::QueueFull(full.clone())))
    );
    assert!(start.elapsed() < WAIT / 2, "{:?}", start.elapsed());
    assert_eq!(client.stats().pending, 0);
    assert_eq!(ready(fx, &full).await, 1);
    Ok(())
}

async fn request_gets_its_reply(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("reports");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let responder = b
        .respond(&q, ConsumeOptions::manual(8), || {
            |req: Request| async move {
                let month: String = req.decode()?;
                Ok(Envelope::encode(&format!("report for {month}"))?)
            }
        })
        .await?;
    let client = b.requester().await?;
    fx.track(client.reply_queue());
    for month in ["2026-10", "2026-11"] {
        let reply = client
            .request(q.as_str(), Envelope::encode(month)?)
            .timeout(WAIT)
            .await?;
        assert_eq!(reply.decode::<String>()?, format!("report for {month}"));
        assert!(reply.correlation_id().is_some());
    }
    assert_eq!(client.stats().pending, 0);
    responder.cancel().await;
    Ok(())
}

async fn request_gets_the_responders_error(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("orders");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let _responder = b
        .respond(&q, ConsumeOptions::manual(8), || {
            |req: Request| async move {
                let id: u32 = req.decode()?;
                if id == 0 {
                    return Err(RemoteError::new("no such order"));
                }
                Ok(Envelope::encode(&id)?)
            }
        })
        .await?;
    let client = b.requester().await?;
    fx.track(client.reply_queue());
    match client.request(q.as_str(), msg(0)).timeout(WAIT).await {
        Err(RequestError::Remote {
            message, details, ..
        }) => {
            assert_eq!(message, "no such order");
            assert_eq!(details, None);
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    // The responder keeps answering.
    let reply = client.request(q.as_str(), msg(5)).timeout(WAIT).await?;
    assert_eq!(num(&reply), 5);
    Ok(())
}

async fn request_times_out(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("slow");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let _responder = b
        .respond(&q, ConsumeOptions::manual(8), || {
            |req: Request| async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                Ok(Envelope::new(req.payload().clone()))
            }
        })
        .await?;
    let client = b.requester().await?;
    fx.track(client.reply_queue());
    let limit = Duration::from_millis(150);
    let start = Instant::now();
    match client.request(q.as_str(), msg(1)).timeout(limit).await {
        Err(RequestError::Timeout { after, .. }) => assert_eq!(after, limit),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let waited = start.elapsed();
    assert!(
        waited >= limit && waited < Duration::from_millis(550),
        "{waited:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Bad input.

async fn invalid_names_are_refused(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let invalid = |err: NameError| Err(BrokerError::InvalidName(err));
    let declare = |name: String| async move {
        b.declare_queue(&name, QueueOptions::default())
            .await
            .map(|_| ())
    };
    assert_eq!(
        declare(String::new()).await,
        invalid(NameError::Empty {
            kind: NameKind::Queue
        })
    );
    assert_eq!(
        declare("x".repeat(256)).await,
        invalid(NameError::TooLong {
            kind: NameKind::Queue,
            len: 256
        })
    );
    assert_eq!(
        declare("bad\nname".into()).await,
        invalid(NameError::ControlChar {
            kind: NameKind::Queue,
            name: "bad\nname".into(),
            index: 3
        })
    );
    assert_eq!(
        declare("amq.mine".into()).await,
        invalid(NameError::Reserved {
            kind: NameKind::Queue,
            name: "amq.mine".into()
        })
    );
    assert_eq!(
        b.declare_exchange("amq.mine", ExchangeOptions::direct())
            .await,
        invalid(NameError::Reserved {
            kind: NameKind::Exchange,
            name: "amq.mine".into()
        })
    );
    assert_eq!(
        b.declare_exchange("", ExchangeOptions::direct()).await,
        Err(BrokerError::DefaultExchange("declared"))
    );
    let (x, q) = (fx.name("x"), fx.name("q"));
    b.declare_exchange(&x, ExchangeOptions::topic()).await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    assert_eq!(
        b.bind_queue(&q, &x, "k".repeat(256).as_str()).await,
        invalid(NameError::TooLong {
            kind: NameKind::BindingKey,
            len: 256
        })
    );
    match b.publish_to(&x, "bad\u{7f}key", msg(1)).await {
        Err(PublishError::Refused(BrokerError::InvalidName(NameError::ControlChar {
            kind: NameKind::RoutingKey,
            index: 3,
            ..
        }))) => {}
        other => panic!("expected an invalid routing key, got {other:?}"),
    }
    // Nothing was changed: the valid ones still work.
    b.bind_queue(&q, &x, "k").await?;
    assert_eq!(b.publish_to(&x, "k", msg(2)).await?, 1);
    assert_eq!(numbers(fx, &q).await?, [2]);
    Ok(())
}

async fn delete_if_empty_refuses_a_non_empty_queue(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.publish(&q, msg(1)).await?;
    b.publish(&q, msg(2)).await?;
    let if_empty = DeleteOptions {
        if_empty: true,
        ..DeleteOptions::default()
    };
    assert_eq!(
        b.delete_queue(&q, if_empty).await.map(|s| s.stats),
        Err(BrokerError::QueueNotEmpty {
            name: q.clone(),
            messages: 2
        })
    );
    // Nothing changed.
    assert_eq!(ready(fx, &q).await, 2);
    let deleted = b.delete_queue(&q, DeleteOptions::default()).await?;
    assert_eq!(deleted.stats.ready, 2, "the last snapshot");
    assert_eq!(
        b.publish(&q, msg(3)).await,
        Err(BrokerError::QueueNotFound(q.clone()))
    );
    // An empty queue goes with if_empty.
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.delete_queue(&q, if_empty).await?;
    assert_eq!(
        b.queue_stats(&q).await.map(|s| s.stats),
        Err(BrokerError::QueueNotFound(q.clone()))
    );
    Ok(())
}

async fn delete_if_unused_refuses_a_queue_with_consumers(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, _rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(1), factory).await?;
    let if_unused = DeleteOptions {
        if_unused: true,
        ..DeleteOptions::default()
    };
    assert_eq!(
        b.delete_queue(&q, if_unused).await.map(|s| s.stats),
        Err(BrokerError::QueueInUse {
            name: q.clone(),
            consumers: 1
        })
    );
    consumer.close().await;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 0 }).await);
    b.delete_queue(&q, if_unused).await?;
    Ok(())
}

async fn redeclaring_with_other_options_is_a_mismatch(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (q, x) = (fx.name("q"), fx.name("x"));
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.publish(&q, msg(1)).await?;
    let other = QueueOptions::default().max_length(5);
    match b.declare_queue(&q, other.clone()).await {
        Err(BrokerError::QueueMismatch {
            name,
            existing,
            requested,
        }) => {
            assert_eq!(name, q);
            assert_eq!(*existing, QueueOptions::default());
            assert_eq!(*requested, other);
        }
        other => panic!("expected QueueMismatch, got {other:?}"),
    }
    // The same options again are fine, and the queue is untouched.
    b.declare_queue(&q, QueueOptions::default()).await?;
    assert_eq!(ready(fx, &q).await, 1);
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    assert!(matches!(
        b.declare_exchange(&x, ExchangeOptions::fanout()).await,
        Err(BrokerError::ExchangeMismatch { name, .. }) if name == x
    ));
    b.declare_exchange(&x, ExchangeOptions::direct()).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// On top of RabbitMQ: duplicate windows, delayed requeue and retries,
// key-ordered and idempotent consumers, block and drop-new overflow,
// partitions. RabbitMQ has none of these; the backend provides them on this
// side with the embedded semantics (README, "postbox on RabbitMQ").

/// A window long enough to outlast any test.
fn window() -> DedupWindow {
    DedupWindow::new(Duration::from_secs(60))
}

/// Shared with the consumers a test starts: what they saw.
type Log<T> = Arc<Mutex<Vec<T>>>;

async fn a_queue_dedup_window_refuses_a_second_publish_of_an_id(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().dedup(window()))
        .await?;
    let first = msg(1);
    b.publish(&q, first.clone()).await?;
    // The same envelope again (a producer's retry): not enqueued, and said so.
    match b.publish(&q, first.clone()).await {
        Err(BrokerError::Duplicate(dup)) => {
            assert_eq!(dup.id, first.id());
            assert_eq!(dup.target, DedupTarget::Queue(q.clone()));
            assert_eq!(dup.original, 0, "the first the window accepted");
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // Another id passes.
    b.publish(&q, msg(2)).await?;
    assert_eq!(ready(fx, &q).await, 2);
    if fx.backend() == Backend::Embedded {
        // Only the embedded snapshot counts duplicates (RabbitMQ's passive
        // declaration reports messages and consumers only).
        let stats = b.queue_stats(&q).await?.stats;
        assert_eq!((stats.duplicates, stats.dedup_ids), (1, 2));
    }
    // Consumed once.
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    for n in [1, 2] {
        let d = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
        assert_eq!(num(&d), n);
        d.ack().await?;
    }
    assert!(recv(&mut rx, QUIET).await.is_none(), "each message once");
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn a_refused_publish_is_not_remembered_by_the_window(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .dedup(window())
            .max_length(1)
            .overflow(Overflow::RejectPublish),
    )
    .await?;
    let second = msg(2);
    b.publish(&q, msg(1)).await?;
    assert_eq!(
        b.publish(&q, second.clone()).await,
        Err(BrokerError::QueueFull(q.clone()))
    );
    let (one, _) = b.get(&q, AckMode::Auto).await?.ok_or("empty")?;
    assert_eq!(num(&one), 1);
    // The refused publish was forgotten: its retry goes through, once.
    b.publish(&q, second.clone()).await?;
    assert!(matches!(
        b.publish(&q, second).await,
        Err(BrokerError::Duplicate(_))
    ));
    assert_eq!(numbers(fx, &q).await?, [2]);
    Ok(())
}

async fn an_exchange_dedup_window_refuses_a_second_publish_of_an_id(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (x, q) = (fx.name("x"), fx.name("q"));
    b.declare_exchange(&x, ExchangeOptions::direct().dedup(window()))
        .await?;
    b.declare_queue(&q, QueueOptions::default()).await?;
    b.bind_queue(&q, &x, "k").await?;
    let first = msg(1);
    assert_eq!(b.publish_to(&x, "k", first.clone()).await?, 1);
    match b.publish_to(&x, "k", first.clone()).await {
        Err(PublishError::Refused(BrokerError::Duplicate(dup))) => {
            assert_eq!(dup.id, first.id());
            assert_eq!(dup.target, DedupTarget::Exchange(x.clone()));
            assert_eq!(dup.original, 0);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // A publish that reached nothing is forgotten: its retry, routed, goes
    // through.
    let second = msg(2);
    assert_eq!(b.publish_to(&x, "nowhere", second.clone()).await?, 0);
    assert_eq!(b.publish_to(&x, "k", second).await?, 1);
    let stats = b.exchange_dedup_stats(&x)?.ok_or("no window")?;
    assert_eq!((stats.ids, stats.duplicates), (2, 1));
    assert_eq!(numbers(fx, &q).await?, [1, 2]);
    Ok(())
}

async fn nack_after_redelivers_once_the_delay_has_passed(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    let (factory, mut rx) = forward();
    let consumer = b.consume(&q, ConsumeOptions::manual(10), factory).await?;
    b.publish(&q, msg(1)).await?;
    let first = recv(&mut rx, WAIT).await.ok_or("a delivery")?;
    assert!(!first.redelivered());
    let delay = Duration::from_millis(300);
    let start = Instant::now();
    first.nack_after(delay).await?;
    assert!(matches!(
        first.ack().await,
        Err(AckError::AlreadySettled { .. })
    ));
    // The queue goes on meanwhile.
    b.publish(&q, msg(2)).await?;
    let two = recv(&mut rx, WAIT).await.ok_or("a second delivery")?;
    assert_eq!(num(&two), 2);
    two.ack().await?;
    // Not back at half the delay...
    let half = (start + delay / 2).saturating_duration_since(Instant::now());
    assert!(
        recv(&mut rx, half).await.is_none(),
        "redelivered before its delay"
    );
    // ...and back after it, flagged.
    let again = recv(&mut rx, WAIT).await.ok_or("no redelivery")?;
    let waited = start.elapsed();
    assert!(waited >= delay - Duration::from_millis(20), "{waited:?}");
    assert_eq!(again.id(), first.id());
    assert_eq!(num(&again), 1);
    assert!(again.redelivered());
    assert_eq!(again.delivery_count(), 2);
    again.ack().await?;
    assert!(recv(&mut rx, QUIET).await.is_none(), "settled");
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn a_retry_policy_dead_letters_after_its_attempts(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "retry").await?;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default().dead_letter_exchange(&dlx))
        .await?;
    // (delivery count, redelivered) of each attempt.
    let attempts: Log<(u32, bool)> = Arc::default();
    let failing = {
        let attempts = attempts.clone();
        move || {
            let attempts = attempts.clone();
            move |d: Delivery| {
                attempts.lock().push((d.delivery_count(), d.redelivered()));
                async { Err::<(), _>(Failure::msg("conformance: failing on purpose")) }
            }
        }
    };
    let policy = RetryPolicy::fixed(Duration::from_millis(100), 3);
    let options = ConsumeOptions::manual(1).on_error(OnError::Retry(policy));
    let consumer = b.consume(&q, options, failing).await?;
    b.publish(&q, msg(1)).await?;
    if let Err(err) = wait_ready(fx, &dlq, 1).await {
        let seen = attempts.lock().clone();
        let (n, first) = (seen.len(), &seen[..seen.len().min(4)]);
        return Err(format!(
            "{err}; {n} attempts, the first (delivery count, redelivered): {first:?}"
        )
        .into());
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        *attempts.lock(),
        [(1, false), (2, true), (3, true)],
        "3 attempts, then rejected"
    );
    assert_eq!(
        deaths_of(&take_all(fx, &dlq).await?),
        [(1, q.clone(), DeathReason::Rejected, 1)]
    );
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn key_ordered_consumption_keeps_each_keys_order(fx: &Fixture) -> TestResult {
    const KEYS: u32 = 10;
    const PER_KEY: u32 = 20;
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    // Published to the queue by name with a routing key of their own: on
    // RabbitMQ that key travels in the `x-postbox-key` header (README,
    // "postbox on RabbitMQ"), else every message would carry the queue's
    // name and be one key.
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("key-{k}");
            b.publish(
                &q,
                Envelope::encode(&(&key, seq))?.with_routing_key(key.as_str()),
            )
            .await?;
        }
    }
    // (key, sequence, the delivery's routing key), as handled.
    let log: Log<(String, u32, String)> = Arc::default();
    let (busy, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = {
        let (log, busy, peak) = (log.clone(), busy.clone(), peak.clone());
        move || {
            let (log, busy, peak) = (log.clone(), busy.clone(), peak.clone());
            move |d: Delivery| {
                let (log, busy, peak) = (log.clone(), busy.clone(), peak.clone());
                async move {
                    let (key, seq): (String, u32) = d.decode()?;
                    log.lock().push((key, seq, d.routing_key().to_string()));
                    peak.fetch_max(busy.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=4))).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let consumer = b
        .consume(
            &q,
            ConsumeOptions::manual(32),
            KeyOrdered::new(4, PartitionKey::RoutingKey, handler),
        )
        .await?;
    let total = (KEYS * PER_KEY) as usize;
    let all = eventually(WAIT, || async { log.lock().len() >= total }).await;
    assert!(all, "{} of {total} handled", log.lock().len());
    tokio::time::sleep(QUIET).await;
    let log = log.lock().clone();
    assert_eq!(log.len(), total, "each message once");
    let mut by_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (key, seq, routing_key) in &log {
        assert_eq!(routing_key, key, "the message's own routing key");
        by_key.entry(key.clone()).or_default().push(*seq);
    }
    assert_eq!(by_key.len(), KEYS as usize);
    for (key, seqs) in &by_key {
        assert_eq!(*seqs, (0..PER_KEY).collect::<Vec<_>>(), "{key} in order");
    }
    // Different keys ran in parallel.
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak > 1, "at most {peak} handler(s) at once");
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0, "all acknowledged");
    Ok(())
}

/// A pool sizes itself from the queue's backlog on both backends (on
/// RabbitMQ, the ready count of a passive declare plus what the pool holds
/// unhandled): 1 worker grows to 4 under 160 jobs of 25 ms, every job is
/// handled once, and once the queue is empty the pool goes back to 1.
async fn a_consumer_pool_grows_under_a_backlog_and_shrinks_when_it_clears(
    fx: &Fixture,
) -> TestResult {
    const JOBS: u32 = 160;
    let b = &fx.broker;
    let q = fx.name("q");
    b.declare_queue(&q, QueueOptions::default()).await?;
    for n in 0..JOBS {
        b.publish(&q, msg(n)).await?;
    }
    let options = PoolOptions::new(1, 4)?
        .backlog_per_worker(5)
        .check_interval(Duration::from_millis(100))
        .consecutive_active_trigger(2)
        .start_consumer_min_interval(Duration::from_millis(100))
        .consecutive_idle_trigger(3)
        .stop_consumer_min_interval(Duration::from_millis(200));
    let log: Log<u32> = Arc::default();
    let handler = {
        let log = log.clone();
        move || {
            let log = log.clone();
            move |d: Delivery| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    log.lock().push(num(d.message()));
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let pool = ConsumerPool::new(options, handler);
    let watch = pool.watch();
    let consumer = b.consume(&q, pool.consume_options(), pool).await?;
    // 160 jobs of 25 ms: 4 s for one worker, 1 s for four.
    let all = eventually(Duration::from_secs(15), || async {
        log.lock().len() >= JOBS as usize
    })
    .await;
    assert!(all, "{} of {JOBS} handled", log.lock().len());
    let stats = watch.stats();
    assert_eq!(
        stats.peak, 4,
        "grew to its maximum under the backlog: {stats:?}"
    );
    assert!(stats.scaled_up >= 3, "{stats:?}");
    // Idle: back to the minimum, one step at a time.
    let shrunk = eventually(Duration::from_secs(8), || async { watch.workers() == 1 }).await;
    assert!(
        shrunk,
        "still {} workers when idle: {:?}",
        watch.workers(),
        watch.stats()
    );
    let mut handled = log.lock().clone();
    handled.sort_unstable();
    assert_eq!(handled, (0..JOBS).collect::<Vec<_>>(), "each job once");
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0, "all acknowledged");
    Ok(())
}

async fn an_idempotent_consumer_handles_a_duplicate_once(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let q = fx.name("q");
    // No window: both copies are enqueued and delivered.
    b.declare_queue(&q, QueueOptions::default()).await?;
    let first = msg(1);
    b.publish(&q, first.clone()).await?;
    b.publish(&q, first.clone()).await?;
    b.publish(&q, msg(2)).await?;
    assert_eq!(ready(fx, &q).await, 3);
    let layer = Idempotent::by_message_id(MemoryStore::new(1_000));
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The handler does not ack: the layer acks once the key is recorded.
    let handler = move || {
        let tx = tx.clone();
        move |d: Delivery| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((num(&d), d.id()));
                Ok::<(), Failure>(())
            }
        }
    };
    let consumer = b
        .consume(&q, ConsumeOptions::manual(1), handler.layer(layer.clone()))
        .await?;
    assert_eq!(recv(&mut rx, WAIT).await, Some((1, first.id())));
    let (two, _) = recv(&mut rx, WAIT).await.ok_or("a second message")?;
    assert_eq!(two, 2);
    assert!(recv(&mut rx, QUIET).await.is_none(), "the duplicate ran");
    let stats = layer.stats();
    assert_eq!(
        (stats.claimed, stats.completed, stats.skipped),
        (2, 2, 1),
        "{stats:?}"
    );
    // The duplicate was acknowledged too: nothing comes back on close.
    consumer.close().await;
    assert!(eventually(WAIT, || async { consumers(fx, &q).await == 0 }).await);
    tokio::time::sleep(QUIET).await;
    assert_eq!(ready(fx, &q).await, 0, "all three acknowledged");
    Ok(())
}

async fn block_makes_publishers_wait_and_bounds_the_queue(fx: &Fixture) -> TestResult {
    const TOTAL: u32 = 30;
    const LIMIT: usize = 5;
    let b = &fx.broker;
    let q = fx.name("q");
    // Embedded, a publish returns once it is in the queue's inbox, which
    // holds up to `mailbox` publishes in front of the one waiting (README,
    // Semantics: block); a mailbox of 1 makes the producer wait at once.
    // RabbitMQ has no inbox: the option changes nothing there.
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length(LIMIT)
            .overflow(Overflow::Block)
            .mailbox(1),
    )
    .await?;
    let seen: Log<u32> = Arc::default();
    let slow = {
        let seen = seen.clone();
        move || {
            let seen = seen.clone();
            move |d: Delivery| {
                let seen = seen.clone();
                async move {
                    seen.lock().push(d.decode()?);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let consumer = b.consume(&q, ConsumeOptions::manual(1), slow).await?;
    let done = Cell::new(false);
    let producer = async {
        let mut published = Ok(());
        for n in 1..=TOTAL {
            if let Err(err) = b.publish(&q, msg(n)).await {
                published = Err(err);
                break;
            }
        }
        done.set(true);
        // How many the consumer had taken when the last publish returned.
        (published, seen.lock().len())
    };
    let sampler = async {
        let mut samples = Vec::new();
        while !done.get() {
            samples.push(ready(fx, &q).await);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        samples
    };
    let ((published, taken), samples) = tokio::join!(producer, sampler);
    published?;
    assert!(samples.len() >= 3, "sampled {samples:?}");
    assert!(
        samples.iter().all(|&n| n <= LIMIT),
        "ready passed {LIMIT}: {samples:?}"
    );
    // The producer waited for the consumer: it finished only once most
    // messages had been taken.
    assert!(
        taken >= TOTAL as usize - 2 * LIMIT,
        "{taken} taken when the producer finished"
    );
    let all = eventually(WAIT, || async { seen.lock().len() >= TOTAL as usize }).await;
    assert!(all, "{} of {TOTAL} consumed", seen.lock().len());
    assert_eq!(
        *seen.lock(),
        (1..=TOTAL).collect::<Vec<_>>(),
        "all, once, in order"
    );
    consumer.close().await;
    assert_eq!(ready(fx, &q).await, 0);
    Ok(())
}

async fn drop_new_keeps_the_oldest_and_dead_letters_the_rest(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let (dlx, dlq) = dead_letter_queue(fx, "dropnew").await?;
    let q = fx.name("q");
    b.declare_queue(
        &q,
        QueueOptions::default()
            .max_length(3)
            .overflow(Overflow::DropNew)
            .dead_letter_exchange(&dlx),
    )
    .await?;
    // The publisher is not told.
    for n in 1..=5 {
        b.publish(&q, msg(n)).await?;
    }
    assert_eq!(ready(fx, &q).await, 3);
    wait_ready(fx, &dlq, 2).await?;
    assert_eq!(numbers(fx, &q).await?, [1, 2, 3]);
    assert_eq!(
        deaths_of(&take_all(fx, &dlq).await?),
        [
            (4, q.clone(), DeathReason::MaxLen, 1),
            (5, q.clone(), DeathReason::MaxLen, 1),
        ]
    );
    Ok(())
}

async fn a_partitioned_queue_keeps_each_key_in_one_partition_in_order(fx: &Fixture) -> TestResult {
    const PARTITIONS: u32 = 3;
    const PER_KEY: u32 = 10;
    let b = &fx.broker;
    let name = fx.name("parts");
    for p in 0..PARTITIONS {
        fx.track(&format!("{name}.{p}"));
    }
    let parts = b
        .declare_partitioned(&name, PartitionOptions::new(PARTITIONS))
        .await?;
    assert_eq!(parts.partitions(), PARTITIONS);
    let keys: Vec<String> = (0..6).map(|k| format!("user-{k}")).collect();
    let partition = |key: &str| kafka_partition(key.as_bytes(), PARTITIONS);
    let mut expected = vec![0; PARTITIONS as usize];
    for seq in 0..PER_KEY {
        for key in &keys {
            let m = Envelope::encode(&(key, seq))?.with_routing_key(key.as_str());
            assert_eq!(parts.partition_of(&m)?, partition(key));
            assert_eq!(parts.publish(m).await?, partition(key), "{key}");
            expected[partition(key) as usize] += 1;
        }
    }
    for (p, n) in expected.iter().enumerate() {
        assert_eq!(ready(fx, &format!("{name}.{p}")).await, *n, "partition {p}");
    }
    // (queue, key, sequence, the delivery's routing key), as handled.
    let log: Log<(String, String, u32, String)> = Arc::default();
    let handler = {
        let log = log.clone();
        move || {
            let log = log.clone();
            move |d: Delivery| {
                let log = log.clone();
                async move {
                    let (key, seq): (String, u32) = d.decode()?;
                    let queue = d.queue().to_string();
                    log.lock()
                        .push((queue, key, seq, d.routing_key().to_string()));
                    d.ack().await?;
                    Ok::<(), Failure>(())
                }
            }
        }
    };
    let consumers = parts.consume(b, ConsumeOptions::manual(1), handler).await?;
    assert_eq!(consumers.len(), PARTITIONS as usize);
    let total = keys.len() * PER_KEY as usize;
    let all = eventually(WAIT, || async { log.lock().len() >= total }).await;
    assert!(all, "{} of {total} handled", log.lock().len());
    let log = log.lock().clone();
    assert_eq!(log.len(), total);
    for key in &keys {
        let home = format!("{name}.{}", partition(key));
        let mine: Vec<_> = log.iter().filter(|(_, k, _, _)| k == key).collect();
        assert!(
            mine.iter()
                .all(|(queue, _, _, rk)| *queue == home && rk == key),
            "{key}: {mine:?}"
        );
        let seqs: Vec<u32> = mine.iter().map(|(_, _, seq, _)| *seq).collect();
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "{key} in order");
    }
    for consumer in consumers {
        consumer.close().await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Streams. RabbitMQ's are stream queues read over AMQP 0-9-1: the same
// offsets from 0, the same start positions; a publish there returns
// `StreamHandle::UNKNOWN_OFFSET` (AMQP's confirms do not say the offset).

/// A stream both backends can hold: no limit by count (RabbitMQ retains by
/// bytes and age only).
fn stream_options() -> StreamOptions {
    StreamOptions::unbounded()
}

/// What a subscriber saw: offset, number carried, attempt.
type Seen = mpsc::UnboundedSender<(u64, u32, u32)>;

/// A subscriber sending what it handles to `tx`.
async fn reader(
    stream: &StreamHandle,
    start: StreamStart,
    options: SubscribeOptions,
    tx: Seen,
) -> Result<StreamSubscription<impl postbox_actors::StreamConsumer>, StreamError> {
    stream
        .subscribe(start, options, move || {
            let tx = tx.clone();
            move |d: StreamDelivery| {
                let _ = tx.send((d.offset(), num(&d), d.attempt()));
                async { Ok::<(), Failure>(()) }
            }
        })
        .await
}

/// The next `n` records a subscriber reported, within [`WAIT`].
async fn seen(rx: &mut mpsc::UnboundedReceiver<(u64, u32, u32)>, n: usize) -> Vec<(u64, u32, u32)> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(one)) => got.push(one),
            _ => break,
        }
    }
    got
}

/// What a publish returns on `backend` for a record at `offset`.
fn published_at(fx: &Fixture, offset: u64) -> u64 {
    match fx.backend() {
        Backend::RabbitMq => StreamHandle::UNKNOWN_OFFSET,
        _ => offset,
    }
}

async fn a_stream_is_read_from_where_each_subscriber_starts(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    stream.publish_batch(vec![msg(0), msg(1), msg(2)]).await?;
    assert_eq!(stream.publish(msg(3)).await?, published_at(fx, 3));
    let (tx, mut from_first) = mpsc::unbounded_channel();
    let first = reader(&stream, StreamStart::First, SubscribeOptions::default(), tx).await?;
    let (tx, mut from_next) = mpsc::unbounded_channel();
    let next = reader(&stream, StreamStart::Next, SubscribeOptions::default(), tx).await?;
    let (tx, mut from_two) = mpsc::unbounded_channel();
    let two = reader(
        &stream,
        StreamStart::Offset(2),
        SubscribeOptions::default(),
        tx,
    )
    .await?;
    assert_eq!(stream.publish(msg(4)).await?, published_at(fx, 4));
    let all: Vec<_> = (0..5).map(|n| (n as u64, n, 0)).collect();
    assert_eq!(seen(&mut from_first, 5).await, all);
    assert_eq!(seen(&mut from_two, 3).await, all[2..]);
    // Subscribed after record 3 was confirmed: only what came after.
    assert_eq!(seen(&mut from_next, 1).await, all[4..]);
    tokio::time::sleep(QUIET).await;
    assert!(from_first.try_recv().is_err() && from_next.try_recv().is_err());
    assert_eq!(stream.stats().published, 5);
    let stats = first.cancel().await.ok_or("first was live")?;
    assert_eq!((stats.offset, stats.delivered), (5, 5));
    next.cancel().await;
    two.cancel().await;
    Ok(())
}

async fn a_failing_stream_subscriber_gets_the_record_again(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    stream.publish_batch((0..4).map(msg).collect()).await?;
    let failed = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let options = SubscribeOptions::default().backoff(Backoff::NONE);
    let sub = stream
        .subscribe(StreamStart::First, options, move || {
            let (tx, failed) = (tx.clone(), failed.clone());
            move |d: StreamDelivery| {
                let _ = tx.send((d.offset(), num(&d), d.attempt()));
                let fail = num(&d) == 1 && !failed.swap(true, Ordering::SeqCst);
                async move {
                    if fail {
                        // Long enough for the records after it to be on
                        // their way to the subscriber (on RabbitMQ, in its
                        // mailbox): they must not overtake it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Err(Failure::msg("not this time"));
                    }
                    Ok(())
                }
            }
        })
        .await?;
    // At least once, in order: the record that failed comes again, flagged,
    // and nothing after it came first.
    assert_eq!(
        seen(&mut rx, 5).await,
        [(0, 0, 0), (1, 1, 0), (1, 1, 1), (2, 2, 0), (3, 3, 0)]
    );
    let stats = sub.cancel().await.ok_or("live")?;
    assert_eq!(
        (stats.offset, stats.delivered, stats.redeliveries),
        (4, 4, 1)
    );
    Ok(())
}

async fn a_named_stream_subscriber_resumes_where_it_stopped(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    stream.publish_batch((0..3).map(msg).collect()).await?;
    let named = || SubscribeOptions::default().named("audit");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let audit = reader(&stream, StreamStart::First, named(), tx.clone()).await?;
    assert_eq!(seen(&mut rx, 3).await.len(), 3);
    let again = reader(&stream, StreamStart::First, named(), tx.clone()).await;
    assert!(
        matches!(again, Err(StreamError::SubscriberExists { .. })),
        "{:?}",
        again.err()
    );
    audit.cancel().await;
    assert_eq!(stream.stored_offset("audit"), Some(3));
    stream.publish_batch(vec![msg(3), msg(4)]).await?;
    // From its stored position, whatever start it asks for.
    let audit = reader(&stream, StreamStart::First, named(), tx).await?;
    assert_eq!(seen(&mut rx, 2).await, [(3, 3, 0), (4, 4, 0)]);
    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err());
    audit.cancel().await;
    assert_eq!(stream.stored_offset("audit"), Some(5));
    Ok(())
}

/// A `subscribe` whose caller gives up (a timeout, a dropped future) at any
/// moment leaves no subscriber behind and its name free.
async fn a_subscribe_given_up_leaves_no_subscriber(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    stream.publish_batch((0..3).map(msg).collect()).await?;
    let named = || SubscribeOptions::default().named("audit");
    let mut given_up = 0;
    for micros in [
        0, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000,
    ] {
        let (tx, _rx) = mpsc::unbounded_channel();
        let subscribe = reader(&stream, StreamStart::Next, named(), tx);
        match tokio::time::timeout(Duration::from_micros(micros), subscribe).await {
            Err(_) => given_up += 1,
            Ok(subscribed) => {
                subscribed?.cancel().await;
            }
        }
        // The name is free at once, whichever way the call ended.
        let (tx, _rx) = mpsc::unbounded_channel();
        reader(&stream, StreamStart::Next, named(), tx)
            .await
            .map_err(|e| format!("after {micros} us: {e}"))?
            .cancel()
            .await;
    }
    // Embedded, `subscribe` never waits: nothing to give up on.
    assert!(
        given_up > 0 || fx.backend() == Backend::Embedded,
        "no subscribe was given up: the test proves nothing"
    );
    assert!(
        eventually(WAIT, || async { stream.stats().subscribers == 0 }).await,
        "{} subscribers left",
        stream.stats().subscribers
    );
    // And the name reads as any: from its start, what comes next.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let audit = reader(&stream, StreamStart::Next, named(), tx).await?;
    stream.publish(msg(3)).await?;
    assert_eq!(seen(&mut rx, 1).await, [(3, 3, 0)]);
    audit.cancel().await;
    Ok(())
}

async fn a_stream_bound_to_an_exchange_gets_what_routes_to_it(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let x = fx.name("x");
    b.declare_exchange(&x, ExchangeOptions::topic()).await?;
    let stream = b.declare_stream(&name, stream_options()).await?;
    b.bind_stream(&name, &x, "order.*").await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = reader(&stream, StreamStart::First, SubscribeOptions::default(), tx).await?;
    assert_eq!(b.publish_to(&x, "order.created", msg(1)).await?, 1);
    assert_eq!(b.publish_to(&x, "user.created", msg(2)).await?, 0);
    assert_eq!(b.publish_to(&x, "order.paid", msg(3)).await?, 1);
    assert_eq!(seen(&mut rx, 2).await, [(0, 1, 0), (1, 3, 0)]);
    assert!(b.unbind_stream(&name, &x, "order.*").await?);
    assert_eq!(b.publish_to(&x, "order.created", msg(4)).await?, 0);
    sub.cancel().await;
    Ok(())
}

async fn a_deleted_stream_stops_its_subscribers_and_refuses_publishes(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    let (tx, _rx) = mpsc::unbounded_channel();
    let sub = reader(&stream, StreamStart::First, SubscribeOptions::default(), tx).await?;
    b.delete_stream(&name).await?;
    tokio::time::timeout(WAIT, sub.terminated()).await?;
    assert!(stream.is_deleted());
    let err = stream.publish(msg(1)).await.unwrap_err();
    assert!(matches!(err, StreamError::NotFound(_)), "{err}");
    let err = b.delete_stream(&name).await.unwrap_err();
    assert!(matches!(err, StreamError::NotFound(_)), "{err}");
    Ok(())
}

async fn stream_retention_rabbitmq_lacks_is_refused(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let by_count = StreamOptions::default().max_len(10);
    let blocking = StreamOptions::unbounded().max_bytes(1 << 20);
    let trimming = blocking
        .clone()
        .overflow(postbox_actors::StreamOverflow::DropOldest);
    for options in [by_count, blocking] {
        let declared = b.declare_stream(&fx.name("stream"), options).await;
        match fx.backend() {
            // A RabbitMQ stream retains by bytes and age, whatever its
            // readers have read.
            Backend::RabbitMq => assert!(
                matches!(declared, Err(StreamError::Unsupported(_))),
                "{declared:?}"
            ),
            _ => assert!(declared.is_ok(), "{declared:?}"),
        }
    }
    let stream = b.declare_stream(&fx.name("stream"), trimming).await?;
    assert_eq!(stream.publish(msg(1)).await?, published_at(fx, 0));
    Ok(())
}

async fn a_stream_subscriber_can_start_at_a_time(fx: &Fixture) -> TestResult {
    let b = &fx.broker;
    let name = fx.name("stream");
    let stream = b.declare_stream(&name, stream_options()).await?;
    stream.publish_batch(vec![msg(0), msg(1)]).await?;
    // Past the milliseconds of the first two (RabbitMQ's start is by the
    // second; the subscriber skips what its second holds before this).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let from = postbox::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stream.publish_batch(vec![msg(2), msg(3)]).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sub = reader(
        &stream,
        StreamStart::Timestamp(from),
        SubscribeOptions::default(),
        tx,
    )
    .await?;
    assert_eq!(seen(&mut rx, 2).await, [(2, 2, 0), (3, 3, 0)]);
    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err());
    sub.cancel().await;
    Ok(())
}
