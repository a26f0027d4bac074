//! `postbox_actors::actix::ActixConsumer` (feature `actix`): deliveries sent
//! to a plain actix 0.13 actor, settled by its replies. Each test runs an
//! actix `System` with postbox's actors on the same thread
//! (`RuntimeHandle::local`), in real time (a few milliseconds each).
#![cfg(feature = "actix")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use postbox::{Failure, RuntimeHandle};
use postbox_actors::actix::ActixConsumer;
use postbox_actors::{
    Broker, ConsumeOptions, Delivery, Envelope, OnError, Outcome, QueueOptions, QueueStats,
};

/// Records what it was sent; fails the first attempt of odd numbers when
/// told to; replies after `pace` when told to.
#[derive(Default)]
struct Recorder {
    seen: Vec<(u32, u32)>,
    fail_first_odd: bool,
    pace: Option<Duration>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

struct Job {
    n: u32,
    attempt: u32,
}
impl Message for Job {
    type Result = Result<u32, String>;
}

impl Handler<Job> for Recorder {
    type Result = AtomicResponse<Self, Result<u32, String>>;
    fn handle(&mut self, job: Job, _: &mut Context<Self>) -> Self::Result {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let pace = self.pace;
        AtomicResponse::new(Box::pin(
            async move {
                if let Some(pace) = pace {
                    actix::clock::sleep(pace).await;
                }
            }
            .into_actor(self)
            .map(move |(), act, _| {
                act.in_flight.fetch_sub(1, Ordering::SeqCst);
                act.seen.push((job.n, job.attempt));
                if act.fail_first_odd && job.n % 2 == 1 && job.attempt == 1 {
                    Err(format!("{} not yet", job.n))
                } else {
                    Ok(job.n)
                }
            }),
        ))
    }
}

struct Seen;
impl Message for Seen {
    type Result = Vec<(u32, u32)>;
}
impl Handler<Seen> for Recorder {
    type Result = MessageResult<Seen>;
    fn handle(&mut self, _: Seen, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.seen.clone())
    }
}

fn job(d: &Delivery) -> Result<Job, Failure> {
    Ok(Job {
        n: d.decode()?,
        attempt: d.delivery_count(),
    })
}

/// Waits (real time, up to 5 s) until `n` deliveries of `queue` were acked
/// or rejected.
async fn settled(broker: &Broker, queue: &str, n: u64) -> QueueStats {
    for _ in 0..5_000 {
        let stats = broker.queue_stats(queue).await.expect("stats").stats;
        if stats.acknowledged + stats.rejected >= n {
            return stats;
        }
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    panic!("{queue}: not settled");
}

#[test]
fn ok_acks_and_err_goes_to_the_on_error_policy() {
    System::new().block_on(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("jobs", QueueOptions::default())
            .await
            .unwrap();
        let recorder = Recorder {
            fail_first_odd: true,
            ..Recorder::default()
        }
        .start();
        let consumer = broker
            .consume(
                "jobs",
                ConsumeOptions::manual(4),
                ActixConsumer::new(recorder.clone().recipient(), job),
            )
            .await
            .unwrap();
        for n in 1..=6u32 {
            broker
                .publish("jobs", Envelope::encode(&n).unwrap())
                .await
                .unwrap();
        }
        let stats = settled(&broker, "jobs", 6).await;
        // Odd ones failed once: requeued (the default policy), then acked.
        assert_eq!(
            (stats.acknowledged, stats.requeued, stats.rejected),
            (6, 3, 0)
        );
        assert_eq!((stats.ready, stats.unacked), (0, 0));
        let seen = recorder.send(Seen).await.unwrap();
        assert_eq!(seen.len(), 9);
        let mut acked: Vec<u32> = seen
            .iter()
            .filter(|(n, attempt)| n % 2 == 0 || *attempt == 2)
            .map(|(n, _)| *n)
            .collect();
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 2, 3, 4, 5, 6]);
        let report = consumer.report();
        assert_eq!((report.handled, report.errors, report.crashes), (6, 3, 0));
        consumer.cancel().await;
    });
}

#[test]
fn dead_letter_policy_rejects_what_the_actor_refuses() {
    System::new().block_on(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("refused", QueueOptions::default())
            .await
            .unwrap();
        let recorder = Recorder {
            fail_first_odd: true,
            ..Recorder::default()
        }
        .start();
        let consumer = broker
            .consume(
                "refused",
                ConsumeOptions::manual(4).on_error(OnError::DeadLetter),
                ActixConsumer::new(recorder.recipient(), job),
            )
            .await
            .unwrap();
        for n in 1..=4u32 {
            broker
                .publish("refused", Envelope::encode(&n).unwrap())
                .await
                .unwrap();
        }
        let stats = settled(&broker, "refused", 4).await;
        assert_eq!(
            (stats.acknowledged, stats.rejected, stats.requeued),
            (2, 2, 0)
        );
        consumer.cancel().await;
    });
}

#[test]
fn one_message_at_a_time_in_the_actor_in_queue_order() {
    System::new().block_on(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("slow", QueueOptions::default())
            .await
            .unwrap();
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let recorder = Recorder {
            pace: Some(Duration::from_millis(2)),
            max_in_flight: max_in_flight.clone(),
            ..Recorder::default()
        }
        .start();
        // A prefetch of 16, but the consumer waits for each reply.
        let consumer = broker
            .consume(
                "slow",
                ConsumeOptions::manual(16),
                ActixConsumer::new(recorder.clone().recipient(), job),
            )
            .await
            .unwrap();
        for n in 0..20u32 {
            broker
                .publish("slow", Envelope::encode(&n).unwrap())
                .await
                .unwrap();
        }
        let stats = settled(&broker, "slow", 20).await;
        assert_eq!(stats.acknowledged, 20);
        assert_eq!(max_in_flight.load(Ordering::SeqCst), 1);
        let seen: Vec<u32> = recorder
            .send(Seen)
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        consumer.cancel().await;
    });
}

/// Replies with the outcome it is told.
struct Judge;
impl Actor for Judge {
    type Context = Context<Self>;
}
#[derive(serde::Deserialize)]
struct Decide(String);
impl Message for Decide {
    type Result = Outcome;
}
impl Handler<Decide> for Judge {
    type Result = MessageResult<Decide>;
    fn handle(&mut self, d: Decide, _: &mut Context<Self>) -> Self::Result {
        MessageResult(match d.0.as_str() {
            "ack" => Outcome::Ack,
            _ => Outcome::Discard,
        })
    }
}

#[test]
fn outcome_replies_and_undecodable_payloads() {
    System::new().block_on(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("decide", QueueOptions::default())
            .await
            .unwrap();
        let consumer = broker
            .consume(
                "decide",
                // Requeue on error (the default): the undecodable one is
                // rejected all the same.
                ConsumeOptions::manual(4).on_error(OnError::Requeue),
                ActixConsumer::json(Judge.start().recipient()),
            )
            .await
            .unwrap();
        for payload in [r#""ack""#, r#""drop""#, "not json", r#""ack""#] {
            broker
                .publish("decide", Envelope::new(payload))
                .await
                .unwrap();
        }
        let stats = settled(&broker, "decide", 4).await;
        assert_eq!(
            (stats.acknowledged, stats.rejected, stats.requeued),
            (2, 2, 0)
        );
        let report = consumer.report();
        assert_eq!((report.handled, report.errors), (3, 1));
        consumer.cancel().await;
    });
}

/// Stops as soon as it starts.
struct Quitter;
impl Actor for Quitter {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
impl Handler<Job> for Quitter {
    type Result = Result<u32, String>;
    fn handle(&mut self, job: Job, _: &mut Context<Self>) -> Self::Result {
        Ok(job.n)
    }
}

#[test]
fn a_stopped_actor_crashes_the_consumer_and_its_delivery_is_requeued() {
    System::new().block_on(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("orphan", QueueOptions::default())
            .await
            .unwrap();
        let recipient = Quitter.start().recipient::<Job>();
        for _ in 0..1_000 {
            if !recipient.connected() {
                break;
            }
            actix::clock::sleep(Duration::from_millis(1)).await;
        }
        assert!(!recipient.connected(), "the actor should have stopped");
        let consumer = broker
            .consume(
                "orphan",
                // One restart, then it gives up.
                ConsumeOptions::manual(4).restarts(1, Duration::from_secs(60)),
                ActixConsumer::new(recipient, job),
            )
            .await
            .unwrap();
        broker
            .publish("orphan", Envelope::encode(&1u32).unwrap())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), consumer.terminated())
            .await
            .expect("the consumer gives up");
        let stats = broker.queue_stats("orphan").await.unwrap().stats;
        // Requeued by each crash, never acknowledged: back in the queue.
        assert_eq!((stats.ready, stats.unacked, stats.acknowledged), (1, 0, 0));
        assert_eq!(stats.requeued, 2);
        let report = consumer.report();
        assert_eq!((report.crashes, report.running), (2, false));
        assert!(
            report
                .last_crash
                .as_ref()
                .is_some_and(|f| f.is_panic() && f.message().contains("stopped")),
            "{report:?}"
        );
    });
}
