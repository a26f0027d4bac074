//! The broker-wide memory budget: past it, the publishers of the queue
//! causing it wait (and only them), an event says so, and once consumers
//! bring it back under they resume, losing nothing; past 1.25 times it,
//! because many small queues add up, every queue's publishers wait.

use std::time::Duration;

use futures::FutureExt;
use postbox::RuntimeHandle;
use postbox::testkit::local;
use postbox_actors::{AckMode, Broker, BrokerConfig, Envelope, QueueOptions, TryPublishError};

mod common;
use common::settle;

fn kib(n: u32) -> Envelope {
    let mut body = n.to_be_bytes().to_vec();
    body.resize(1024, 0);
    Envelope::new(body)
}

fn number(d: &postbox_actors::Delivery) -> u32 {
    let p = d.message().payload();
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}

fn broker(budget: usize) -> Broker {
    let config = BrokerConfig::default().memory_budget(Some(budget));
    Broker::with_config(&RuntimeHandle::local(), config)
}

#[tokio::test(start_paused = true)]
async fn the_queue_causing_it_waits_others_flow_and_all_resume_under_the_budget() {
    local(async {
        let broker = broker(100 * 1024);
        let mut events = broker.memory_events().expect("a budget");
        let small_mailbox = QueueOptions::default().mailbox(8);
        broker
            .declare_queue("big", small_mailbox.clone())
            .await
            .unwrap();
        broker
            .declare_queue("small", QueueOptions::default())
            .await
            .unwrap();
        // 100 KiB fit; the 101st message passes the budget.
        for n in 0..101 {
            broker.publish("big", kib(n)).await.unwrap();
        }
        settle().await;
        let over = events.try_recv().expect("an event");
        assert!(over.over, "{over:?}");
        assert!(broker.memory().unwrap().over);
        // big's publishers wait: its inbox fills, then publish waits.
        let big = broker.queue("big").unwrap();
        assert!(matches!(
            big.try_publish(kib(999)),
            Err(TryPublishError::Full { .. })
        ));
        let mut waiting = Box::pin(async {
            for n in 101..120 {
                broker.publish("big", kib(n)).await.unwrap();
            }
        });
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "big's publisher waits"
        );
        settle().await;
        assert!((&mut waiting).now_or_never().is_none(), "still");
        assert_eq!(broker.queue_stats("big").await.unwrap().stats.ready, 101);
        // A queue holding little still takes publishes.
        for n in 0..5 {
            broker.publish("small", kib(n)).await.unwrap();
        }
        settle().await;
        assert_eq!(broker.queue_stats("small").await.unwrap().stats.ready, 5);
        // Consumers bring it back under: an event, and big takes the rest.
        let mut got = Vec::new();
        for _ in 0..60 {
            let (d, _) = broker.get("big", AckMode::Auto).await.unwrap().unwrap();
            got.push(number(&d));
        }
        tokio::time::timeout(Duration::from_secs(1), &mut waiting)
            .await
            .expect("the publisher resumes");
        let under = events.recv().await.unwrap();
        assert!(!under.over, "{under:?}");
        settle().await;
        while let Some((d, _)) = broker.get("big", AckMode::Auto).await.unwrap() {
            got.push(number(&d));
        }
        assert_eq!(got, (0..120).collect::<Vec<_>>(), "nothing lost, in order");
        assert!(!broker.memory().unwrap().over);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn many_small_queues_past_the_hard_limit_all_wait() {
    local(async {
        let broker = broker(40 * 1024);
        // 20 queues of 3 KiB each: none holds an eighth (5 KiB), together
        // 60 KiB, past 1.25 times the budget (50 KiB).
        for q in 0..20 {
            let name = format!("q{q}");
            broker
                .declare_queue(&name, QueueOptions::default().mailbox(4))
                .await
                .unwrap();
            for n in 0..3 {
                broker.publish(&name, kib(n)).await.unwrap();
            }
        }
        settle().await;
        let memory = broker.memory().unwrap();
        assert!(memory.over && memory.used >= 50 * 1024, "{memory:?}");
        broker
            .declare_queue("fresh", QueueOptions::default().mailbox(4))
            .await
            .unwrap();
        broker.publish("fresh", kib(0)).await.unwrap();
        settle().await;
        let fresh = broker.queue("fresh").unwrap();
        assert!(matches!(
            fresh.try_publish(kib(1)),
            Err(TryPublishError::Full { .. })
        ));
        assert_eq!(broker.queue_stats("fresh").await.unwrap().stats.ready, 0);
        // Purging brings it under: the fresh queue takes its message.
        for q in 0..20 {
            broker.purge_queue(&format!("q{q}")).await.unwrap();
        }
        settle().await;
        assert_eq!(broker.queue_stats("fresh").await.unwrap().stats.ready, 1);
        assert!(fresh.try_publish(kib(2)).is_ok());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_queue_gives_its_bytes_back() {
    local(async {
        let broker = broker(1 << 20);
        broker
            .declare_queue("q", QueueOptions::default())
            .await
            .unwrap();
        for n in 0..10 {
            broker.publish("q", kib(n)).await.unwrap();
        }
        settle().await;
        assert_eq!(broker.memory().unwrap().used, 10 * 1024);
        broker.delete_queue("q", Default::default()).await.unwrap();
        settle().await;
        assert_eq!(broker.memory().unwrap().used, 0);
    })
    .await;
}
