//! The actix-web orders example (`examples/actix_web_orders.rs`), tested
//! over real HTTP on a loopback port: its server (actix-web on an actix
//! system of its own thread), its queue (bounded, overflow block), and the
//! actix actor that consumes through `postbox_actors::actix::ActixConsumer`.
//!
//! The actor is held at a gate until the queue has filled and the endpoint
//! has answered 503, so that the test does not depend on the machine's
//! speed; then it is let go, and every accepted order must be booked exactly
//! once and acknowledged.

#[path = "../examples/actix_web_orders.rs"]
#[allow(dead_code, unreachable_pub)]
mod app;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use app::{OrderBook, WebOptions};
use postbox::Runtime;
use postbox_actors::{Broker, DeleteOptions, Overflow, QueueOptions, QueueStats};
use tokio::sync::watch;

const MAX_LENGTH: usize = 4;
const INBOX: usize = 2;
const PREFETCH: u32 = 1;

/// Waits (up to 10 s) until the queue has acknowledged `n` deliveries and
/// holds nothing.
async fn drained(broker: &Broker, n: u64) -> QueueStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = broker.queue_stats(app::QUEUE).await.expect("stats").stats;
        let done = stats.acknowledged >= n && stats.ready + stats.unacked + stats.delayed == 0;
        if done || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn full_queue_answers_503_and_every_accepted_order_is_booked_once() {
    let rt = Runtime::with_arbiters(2).expect("runtime");
    let broker = Broker::new(&rt.handle());
    let queue = broker
        .declare_queue(
            app::QUEUE,
            QueueOptions::default()
                .max_length(MAX_LENGTH)
                .overflow(Overflow::Block)
                .mailbox(INBOX),
        )
        .await
        .unwrap();
    let (open, gate) = watch::channel(false);
    // Turns away the first attempt of every third order.
    let book = OrderBook::new(Duration::ZERO, 3).gated(gate);
    let web = app::start_web(
        queue,
        book,
        WebOptions {
            port: 0,
            retry_after: 2,
        },
    )
    .await
    .expect("server");
    assert!(web.addr.ip().is_loopback());
    let addr = web.addr;
    let consumer = app::consume_orders(&broker, app::QUEUE, &web.book, PREFETCH)
        .await
        .unwrap();

    // Orders until the queue is full and the endpoint pushes back.
    let mut accepted = BTreeSet::new();
    let mut refused = None;
    for id in 1..=100u64 {
        let answer = app::post(addr, "/orders", &app::order_json(id))
            .await
            .unwrap();
        match answer.status {
            202 => {
                accepted.insert(id);
            }
            503 => {
                refused = Some((id, answer));
                break;
            }
            other => panic!("order {id}: {other} {}", answer.body),
        }
    }
    let (first_refused, answer) = refused.expect("a 503 once the queue is full");
    assert_eq!(answer.retry_after.as_deref(), Some("2"), "{answer:?}");
    assert!(answer.json_error().is_some(), "{answer:?}");
    // The bound: the queue's limit, what the consumer holds (in the actor),
    // and the publishes that may wait in the inbox in front of the queue.
    assert!(
        accepted.len() >= MAX_LENGTH && accepted.len() <= MAX_LENGTH + PREFETCH as usize + INBOX,
        "accepted {} before the first 503",
        accepted.len()
    );
    // While the actor is held, the queue stays full: every order is refused.
    for id in first_refused + 1..first_refused + 6 {
        let answer = app::post(addr, "/orders", &app::order_json(id))
            .await
            .unwrap();
        assert_eq!(answer.status, 503, "order {id}: {answer:?}");
        assert_eq!(answer.retry_after_secs(), Some(2));
    }
    let held = broker.queue_stats(app::QUEUE).await.unwrap().stats;
    assert!(held.ready <= MAX_LENGTH, "{held:?}");

    // Bad bodies: 400 with a JSON error, nothing published.
    for body in [
        "{\"id\": 1, \"item\": ",
        r#"{"id": 7, "item": "lamp", "quantity": 0}"#,
        r#"{"id": 7, "item": " ", "quantity": 1}"#,
        r#"{"id": -1, "item": "lamp", "quantity": 1}"#,
    ] {
        let answer = app::post(addr, "/orders", body).await.unwrap();
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        assert!(answer.json_error().is_some(), "{body}: {answer:?}");
    }

    // Let the actor go: every accepted order is booked, once, and acked.
    open.send(true).unwrap();
    let stats = drained(&broker, accepted.len() as u64).await;
    let ledger = web.book.send(app::GetLedger).await.unwrap();
    assert!(
        ledger.booked.keys().copied().eq(accepted.iter().copied()),
        "booked {:?}, accepted {accepted:?}",
        ledger.booked.keys()
    );
    assert!(ledger.booked.values().all(|&n| n == 1), "{ledger:?}");
    let turned_away = accepted.iter().filter(|id| *id % 3 == 0).count() as u64;
    assert_eq!(u64::from(ledger.turned_away), turned_away);
    assert_eq!(stats.published, accepted.len() as u64);
    assert_eq!(stats.acknowledged, accepted.len() as u64);
    assert_eq!((stats.requeued, stats.rejected), (turned_away, 0));
    let report = consumer.report();
    assert_eq!(
        (report.handled, report.errors, report.crashes),
        (accepted.len() as u64, turned_away, 0)
    );

    // Drained, the endpoint takes orders again.
    let answer = app::post(addr, "/orders", &app::order_json(1_000))
        .await
        .unwrap();
    assert_eq!(answer.status, 202, "{answer:?}");
    drained(&broker, accepted.len() as u64 + 1).await;
    let ledger = web.book.send(app::GetLedger).await.unwrap();
    assert_eq!(ledger.booked.get(&1_000), Some(&1));

    // Any other failure is a 500 with a JSON error: here the queue is gone.
    broker
        .delete_queue(app::QUEUE, DeleteOptions::default())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), consumer.terminated())
        .await
        .expect("deleting the queue cancels its consumer");
    let answer = app::post(addr, "/orders", &app::order_json(1_001))
        .await
        .unwrap();
    assert_eq!(answer.status, 500, "{answer:?}");
    assert!(answer.json_error().is_some_and(|e| e.contains("not found")));

    web.stop().await;
    rt.shutdown();
}

#[tokio::test]
async fn a_port_in_use_is_an_error_not_a_hang() {
    let rt = Runtime::with_arbiters(1).expect("runtime");
    let broker = Broker::new(&rt.handle());
    let queue = broker
        .declare_queue(app::QUEUE, QueueOptions::default())
        .await
        .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = app::start_web(
        queue,
        OrderBook::new(Duration::ZERO, 0),
        WebOptions {
            port,
            retry_after: 1,
        },
    )
    .await
    .expect_err("the port is taken");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    rt.shutdown();
}
