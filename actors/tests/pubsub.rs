//! Publish/subscribe: exchanges, bindings, routing, subscriptions.

use std::time::Duration;

use postbox::RuntimeHandle;
use postbox::testkit::local;
use postbox_actors::{
    Broker, BrokerError, ConsumeOptions, Delivery, Destination, Envelope, ExchangeOptions,
    HeadersMatch, NameError, PublishError, PublishOptions, QueueOptions,
};
use tokio::sync::mpsc;

mod common;
use common::msg;

type Got = (String, u32);

/// An auto-ack consumer factory reporting (subscriber label, payload) for each delivery.
fn collect(
    label: &str,
    tx: &mpsc::UnboundedSender<Got>,
) -> impl Fn() -> Box<dyn FnMut(Delivery) -> std::future::Ready<Result<(), postbox::Failure>>>
+ Send
+ Sync
+ 'static {
    let (label, tx) = (label.to_string(), tx.clone());
    move || {
        let (label, tx) = (label.clone(), tx.clone());
        Box::new(move |d: Delivery| {
            let n = d.decode::<u32>();
            std::future::ready(n.map_err(Into::into).map(|n| {
                let _ = tx.send((label.clone(), n));
            }))
        })
    }
}

/// Drains what has arrived once every actor is idle (virtual time makes the wait free).
async fn drain(rx: &mut mpsc::UnboundedReceiver<Got>) -> Vec<Got> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut out = Vec::new();
    while let Ok(x) = rx.try_recv() {
        out.push(x);
    }
    out
}

/// Publishes through `exchange` and returns how many queues the message reached.
async fn reach(broker: &Broker, exchange: &str, key: &str, message: Envelope) -> usize {
    broker.publish_to(exchange, key, message).await.unwrap()
}

fn of(got: &[Got], label: &str) -> Vec<u32> {
    got.iter()
        .filter(|(l, _)| l == label)
        .map(|(_, n)| *n)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn fanout_gives_every_subscriber_every_message_once_in_order() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("news", ExchangeOptions::fanout())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut subs = Vec::new();
        for label in ["s1", "s2", "s3"] {
            subs.push(
                broker
                    .subscribe(
                        "news",
                        "ignored",
                        ConsumeOptions::auto(),
                        collect(label, &tx),
                    )
                    .await
                    .unwrap(),
            );
        }
        for n in 0..100 {
            assert_eq!(
                broker.publish_to("news", "any.key", msg(n)).await.unwrap(),
                3
            );
        }
        let got = drain(&mut rx).await;
        for label in ["s1", "s2", "s3"] {
            assert_eq!(of(&got, label), (0..100).collect::<Vec<_>>(), "{label}");
        }
        assert_eq!(got.len(), 300);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn unsubscribe_late_subscribers_and_durable_subscriptions() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("user.events", ExchangeOptions::topic())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let early = broker
            .subscribe(
                "user.events",
                "user.*",
                ConsumeOptions::auto(),
                collect("early", &tx),
            )
            .await
            .unwrap();
        let email = broker
            .subscribe_durable(
                "user.events",
                "user.registered",
                "email.user.registered",
                ConsumeOptions::auto(),
                collect("email", &tx),
            )
            .await
            .unwrap();
        broker
            .publish_to("user.events", "user.registered", msg(1))
            .await
            .unwrap();
        let early_queue = early.queue().to_string();
        early.cancel().await;
        assert!(
            broker.queue(&early_queue).is_err(),
            "a cancelled subscription's queue is deleted"
        );
        email.cancel().await;
        // Nobody consumes now; only the durable queue keeps messages.
        assert_eq!(
            reach(&broker, "user.events", "user.registered", msg(2)).await,
            1
        );
        let late = broker
            .subscribe(
                "user.events",
                "user.*",
                ConsumeOptions::auto(),
                collect("late", &tx),
            )
            .await
            .unwrap();
        assert_eq!(
            broker
                .queue_stats("email.user.registered")
                .await
                .unwrap()
                .stats
                .ready,
            1
        );
        // The durable subscription resumes with what was published while it was away.
        let _email = broker
            .subscribe_durable(
                "user.events",
                "user.registered",
                "email.user.registered",
                ConsumeOptions::auto(),
                collect("email", &tx),
            )
            .await
            .unwrap();
        broker
            .publish_to("user.events", "user.registered", msg(3))
            .await
            .unwrap();
        let got = drain(&mut rx).await;
        assert_eq!(
            of(&got, "early"),
            vec![1],
            "unsubscribed: nothing after cancel"
        );
        assert_eq!(of(&got, "email"), vec![1, 2, 3]);
        assert_eq!(
            of(&got, "late"),
            vec![3],
            "a late subscriber gets nothing published before"
        );
        assert!(late.queue().starts_with("sub."));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn consumers_on_one_durable_subscription_share_its_work() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("jobs", ExchangeOptions::direct())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _a = broker
            .subscribe_durable(
                "jobs",
                "resize",
                "resizers",
                ConsumeOptions::auto().mailbox(1),
                collect("a", &tx),
            )
            .await
            .unwrap();
        let _b = broker
            .subscribe_durable(
                "jobs",
                "resize",
                "resizers",
                ConsumeOptions::auto().mailbox(1),
                collect("b", &tx),
            )
            .await
            .unwrap();
        for n in 0..20 {
            broker.publish_to("jobs", "resize", msg(n)).await.unwrap();
        }
        let got = drain(&mut rx).await;
        let (a, b) = (of(&got, "a"), of(&got, "b"));
        assert_eq!(a.len() + b.len(), 20);
        assert!(!a.is_empty() && !b.is_empty(), "both worked: {a:?} {b:?}");
        let mut all: Vec<u32> = a.into_iter().chain(b).collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>(), "each message once");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_crashing_subscriber_keeps_its_queue_and_messages() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("ticks", ExchangeOptions::fanout())
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel::<Got>();
        let crashed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = crashed.clone();
        let sub = broker
            .subscribe("ticks", "", ConsumeOptions::manual(4), move || {
                let (tx, c) = (tx.clone(), c.clone());
                move |d: Delivery| {
                    let (tx, c) = (tx.clone(), c.clone());
                    async move {
                        let n: u32 = d.decode()?;
                        if n == 2 && !c.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            panic!("tick 2");
                        }
                        d.ack().await?;
                        let _ = tx.send(("sub".into(), n));
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        for n in 0..5 {
            broker.publish_to("ticks", "", msg(n)).await.unwrap();
        }
        let mut got = of(&drain(&mut rx).await, "sub");
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(
            broker.queue(sub.queue()).is_ok(),
            "the queue survived the restart"
        );
        assert_eq!(sub.consumer().addr().stats().restarts, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn direct_headers_default_alternate_and_mandatory() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        for q in ["pdf", "reports", "errors", "unrouted", "any"] {
            broker
                .declare_queue(q, QueueOptions::default())
                .await
                .unwrap();
        }
        // direct
        broker
            .declare_exchange(
                "logs",
                ExchangeOptions::direct().alternate_exchange("fallback"),
            )
            .await
            .unwrap();
        broker
            .declare_exchange("fallback", ExchangeOptions::fanout())
            .await
            .unwrap();
        broker.bind_queue("errors", "logs", "error").await.unwrap();
        broker.bind_queue("unrouted", "fallback", "").await.unwrap();
        assert_eq!(broker.publish_to("logs", "error", msg(1)).await.unwrap(), 1);
        // alternate exchange: "info" matches no binding of "logs"
        assert_eq!(broker.publish_to("logs", "info", msg(2)).await.unwrap(), 1);
        assert_eq!(
            broker.queue_stats("errors").await.unwrap().stats.published,
            1
        );
        assert_eq!(
            broker
                .queue_stats("unrouted")
                .await
                .unwrap()
                .stats
                .published,
            1
        );
        // headers: all / any; x- arguments ignored
        broker
            .declare_exchange("docs", ExchangeOptions::headers())
            .await
            .unwrap();
        broker
            .bind_queue(
                "pdf",
                "docs",
                HeadersMatch::any([("format", "pdf"), ("x-ignored", "1")]),
            )
            .await
            .unwrap();
        broker
            .bind_queue(
                "reports",
                "docs",
                HeadersMatch::all([("format", "pdf"), ("type", "report")]),
            )
            .await
            .unwrap();
        let report = msg(3)
            .with_header("format", "pdf")
            .with_header("type", "report");
        let plain_pdf = msg(4).with_header("format", "pdf");
        let other = msg(5)
            .with_header("format", "csv")
            .with_header("type", "report");
        assert_eq!(broker.publish_to("docs", "", report).await.unwrap(), 2);
        assert_eq!(broker.publish_to("docs", "", plain_pdf).await.unwrap(), 1);
        assert_eq!(broker.publish_to("docs", "", other).await.unwrap(), 0);
        assert_eq!(broker.queue_stats("pdf").await.unwrap().stats.published, 2);
        assert_eq!(
            broker.queue_stats("reports").await.unwrap().stats.published,
            1
        );
        // default exchange: routes to the queue named by the key
        assert_eq!(broker.publish_to("", "any", msg(6)).await.unwrap(), 1);
        assert_eq!(reach(&broker, "", "no-such-queue", msg(7)).await, 0);
        // mandatory: an unroutable message comes back
        match broker
            .publish_with(
                "docs",
                "",
                msg(8).with_header("format", "txt"),
                PublishOptions::default().mandatory(),
            )
            .await
        {
            Err(PublishError::Unroutable {
                exchange, message, ..
            }) => {
                assert_eq!(exchange, "docs");
                assert_eq!(message.decode::<u32>().unwrap(), 8);
            }
            other => panic!("expected Unroutable, got {other:?}"),
        }
        assert!(matches!(
            broker
                .publish_with("", "nowhere", msg(9), PublishOptions::default().mandatory())
                .await,
            Err(PublishError::Unroutable { .. })
        ));
        // ...but a mandatory message that the alternate exchange routes is routed.
        assert_eq!(
            broker
                .publish_with(
                    "logs",
                    "debug",
                    msg(10),
                    PublishOptions::default().mandatory()
                )
                .await
                .unwrap(),
            1
        );
        // On another kind of exchange, a headers match is only arguments: part
        // of the binding's identity, as in RabbitMQ, and not matched.
        broker
            .bind_queue("pdf", "logs", HeadersMatch::all([("a", "b")]))
            .await
            .unwrap();
        // A bad x-match is refused.
        let bad = postbox_actors::BindingKey::routing_key("").argument("x-match", "most");
        assert!(matches!(
            broker.bind_queue("pdf", "docs", bad).await,
            Err(BrokerError::InvalidBinding(_))
        ));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn topic_routing_bindings_at_run_time_and_exchange_to_exchange() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("events", ExchangeOptions::topic())
            .await
            .unwrap();
        broker
            .declare_exchange("orders", ExchangeOptions::topic())
            .await
            .unwrap();
        for q in ["all", "eu", "created"] {
            broker
                .declare_queue(q, QueueOptions::default())
                .await
                .unwrap();
        }
        // e2e: everything about orders on "events" flows into "orders"
        broker
            .bind_exchange("orders", "events", "order.#")
            .await
            .unwrap();
        broker.bind_queue("all", "events", "#").await.unwrap();
        broker
            .bind_queue("eu", "orders", "order.eu.*")
            .await
            .unwrap();
        broker
            .bind_queue("created", "orders", "*.*.created")
            .await
            .unwrap();
        // several bindings of one queue match: still one copy
        broker
            .bind_queue("created", "orders", "order.#")
            .await
            .unwrap();
        broker
            .bind_queue("created", "events", "#.created")
            .await
            .unwrap();
        assert_eq!(
            reach(&broker, "events", "order.eu.created", msg(1)).await,
            3
        );
        assert_eq!(reach(&broker, "events", "order.us.paid", msg(2)).await, 2);
        assert_eq!(reach(&broker, "events", "user.created", msg(3)).await, 2);
        assert_eq!(
            broker.publish_to("events", "", msg(4)).await.unwrap(),
            1,
            "# matches the empty key"
        );
        // unbind at run time
        assert!(
            broker
                .unbind_queue("created", "orders", "order.#")
                .await
                .unwrap()
        );
        assert!(
            !broker
                .unbind_queue("created", "orders", "order.#")
                .await
                .unwrap()
        );
        assert!(
            broker
                .unbind_exchange("orders", "events", "order.#")
                .await
                .unwrap()
        );
        assert_eq!(
            reach(&broker, "events", "order.eu.created", msg(5)).await,
            2
        );
        let published = |q: &'static str| {
            let broker = broker.clone();
            async move { broker.queue_stats(q).await.unwrap().stats.published }
        };
        assert_eq!(
            (
                published("all").await,
                published("eu").await,
                published("created").await
            ),
            (5, 1, 4)
        );
        // a cycle of exchange bindings is harmless
        broker.bind_exchange("orders", "events", "#").await.unwrap();
        broker.bind_exchange("events", "orders", "#").await.unwrap();
        assert_eq!(
            reach(&broker, "events", "order.eu.created", msg(6)).await,
            3
        );
        // deleting a queue removes its bindings
        broker
            .delete_queue("all", Default::default())
            .await
            .unwrap();
        assert!(
            broker
                .bindings("events")
                .unwrap()
                .iter()
                .all(|b| b.destination != Destination::Queue("all".into()))
        );
        // deleting an exchange removes bindings to it
        assert!(matches!(
            broker.delete_exchange("orders", true).await,
            Err(BrokerError::ExchangeInUse { .. })
        ));
        broker.delete_exchange("orders", false).await.unwrap();
        assert!(
            broker
                .bindings("events")
                .unwrap()
                .iter()
                .all(|b| b.destination != Destination::Exchange("orders".into()))
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_bindings_route_exactly() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("t", ExchangeOptions::topic())
            .await
            .unwrap();
        for q in 0..10 {
            broker
                .declare_queue(&format!("q{q}"), QueueOptions::default())
                .await
                .unwrap();
        }
        // 10,000 distinct patterns spread over 10 queues; "q3" also gets a wildcard.
        for i in 0..10_000u32 {
            let pattern = format!("region{}.shop{}.*", i % 100, i / 100);
            broker
                .bind_queue(&format!("q{}", i % 10), "t", &pattern)
                .await
                .unwrap();
        }
        broker.bind_queue("q3", "t", "region7.#").await.unwrap();
        assert_eq!(broker.bindings("t").unwrap().len(), 10_001);
        // region7.shop42.* was bound by i = 4207 -> q7; region7.# -> q3
        assert_eq!(reach(&broker, "t", "region7.shop42.sale", msg(1)).await, 2);
        assert_eq!(reach(&broker, "t", "region7.shop42", msg(2)).await, 1);
        assert_eq!(reach(&broker, "t", "region8.shop42.sale", msg(3)).await, 1);
        assert_eq!(reach(&broker, "t", "region8.nope.sale", msg(4)).await, 0);
        assert_eq!(broker.queue_stats("q7").await.unwrap().stats.published, 1);
        assert_eq!(broker.queue_stats("q3").await.unwrap().stats.published, 2);
        assert_eq!(broker.queue_stats("q8").await.unwrap().stats.published, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn names_keys_and_declarations_are_validated() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        assert!(matches!(
            broker.declare_exchange("", ExchangeOptions::topic()).await,
            Err(BrokerError::DefaultExchange(_))
        ));
        assert!(matches!(
            broker
                .declare_exchange(&"e".repeat(256), ExchangeOptions::topic())
                .await,
            Err(BrokerError::InvalidName(NameError::TooLong { .. }))
        ));
        assert!(matches!(
            broker
                .declare_exchange("a\u{0}b", ExchangeOptions::topic())
                .await,
            Err(BrokerError::InvalidName(NameError::ControlChar { .. }))
        ));
        broker
            .declare_exchange("e", ExchangeOptions::topic())
            .await
            .unwrap();
        broker
            .declare_exchange("e", ExchangeOptions::topic())
            .await
            .unwrap();
        assert!(matches!(
            broker
                .declare_exchange("e", ExchangeOptions::fanout())
                .await,
            Err(BrokerError::ExchangeMismatch { .. })
        ));
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        assert!(matches!(
            broker.bind_queue("q", "e", &"k".repeat(300)).await,
            Err(BrokerError::InvalidName(NameError::TooLong { .. }))
        ));
        assert!(matches!(
            broker.bind_queue("q", "e", "a.\n").await,
            Err(BrokerError::InvalidName(NameError::ControlChar { .. }))
        ));
        assert!(matches!(
            broker.bind_queue("q", "", "q").await,
            Err(BrokerError::DefaultExchange(_))
        ));
        assert!(matches!(
            broker.bind_queue("nope", "e", "k").await,
            Err(BrokerError::QueueNotFound(_))
        ));
        assert!(matches!(
            broker.bind_queue("q", "nope", "k").await,
            Err(BrokerError::ExchangeNotFound(_))
        ));
        assert!(matches!(
            broker.publish_to("nope", "k", msg(1)).await,
            Err(PublishError::Refused(BrokerError::ExchangeNotFound(_)))
        ));
        assert!(matches!(
            broker.publish_to("e", "bad\tkey", msg(1)).await,
            Err(PublishError::Refused(BrokerError::InvalidName(
                NameError::ControlChar { .. }
            )))
        ));
        // All or nothing: too large for one target means no queue gets it.
        broker
            .declare_queue("small", QueueOptions::default().max_message_bytes(4))
            .await
            .unwrap();
        broker.bind_queue("q", "e", "#").await.unwrap();
        broker.bind_queue("small", "e", "#").await.unwrap();
        assert!(matches!(
            broker
                .publish_to("e", "k", Envelope::new(vec![0u8; 5]))
                .await,
            Err(PublishError::Refused(BrokerError::MessageTooLarge { .. }))
        ));
        assert_eq!(broker.queue_stats("q").await.unwrap().stats.published, 0);
    })
    .await;
}
