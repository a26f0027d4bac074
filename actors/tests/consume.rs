//! `Broker::consume` on an embedded queue returns without waiting for the
//! queue: what it promises anyway. The consumer counts and has its id at
//! once, gets what is published next, in order; an exclusive consumer and
//! shared ones racing for a queue never both win; a responder answers a
//! request sent the moment `respond` returns; a consumer whose queue goes
//! away before taking its registration is cancelled, not left hanging.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use postbox::{Failure, Runtime, RuntimeHandle};
use postbox_actors::rpc::Request;
use postbox_actors::{
    Broker, BrokerError, ConsumeOptions, Consumer, DeleteOptions, Delivery, Envelope, QueueOptions,
};
use tokio::sync::mpsc;

mod common;
use common::{WAIT, msg};

/// Runs `test` on a current-thread driver, its queues and consumers on
/// two arbiters of their own (real threads: real races).
fn across_arbiters<F: Future<Output = ()>>(test: impl FnOnce(RuntimeHandle) -> F) {
    let rt = Runtime::with_arbiters(2).expect("runtime");
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("driver");
    driver.block_on(test(rt.handle()));
}

#[test]
fn a_consumer_counts_and_receives_as_soon_as_consume_returns() {
    across_arbiters(|rt| async move {
        let broker = Broker::new(&rt);
        for round in 0..50 {
            let name = format!("at-once-{round}");
            let queue = broker
                .declare_queue(&name, QueueOptions::default())
                .await
                .unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let consumer = broker
                .consume(&name, ConsumeOptions::manual(8), move || {
                    let tx = tx.clone();
                    move |d: Delivery| {
                        let tx = tx.clone();
                        async move {
                            tx.send(d.decode::<u32>()?).ok();
                            d.ack().await?;
                            Ok::<(), Failure>(())
                        }
                    }
                })
                .await
                .unwrap();
            assert_eq!(queue.consumer_count(), 1, "counted at once");
            assert!(consumer.consumer_id().await.is_some(), "registered");
            for n in 0..20 {
                queue.publish(msg(n)).await.unwrap();
            }
            let mut got = Vec::new();
            while got.len() < 20 {
                let n = tokio::time::timeout(WAIT, rx.recv())
                    .await
                    .unwrap()
                    .unwrap();
                got.push(n);
            }
            assert_eq!(got, (0..20).collect::<Vec<_>>());
            let snap = broker.queue_stats(&name).await.unwrap();
            assert_eq!(snap.consumers.len(), 1);
            assert_eq!((snap.stats.consumers, snap.stats.ready), (1, 0));
            consumer.close().await;
            assert_eq!(queue.consumer_count(), 0);
        }
    });
}

#[test]
fn an_exclusive_consumer_and_shared_ones_racing_never_both_win() {
    across_arbiters(|rt| async move {
        let broker = Broker::new(&rt);
        let (mut exclusive_won, mut shared_won) = (0, 0);
        for round in 0..100 {
            let name = format!("race-{round}");
            let queue = broker
                .declare_queue(&name, QueueOptions::default())
                .await
                .unwrap();
            let consume = |exclusive: bool, head_start: usize| {
                let (broker, name) = (&broker, &name);
                async move {
                    yields(head_start).await;
                    let options = if exclusive {
                        ConsumeOptions::auto().exclusive()
                    } else {
                        ConsumeOptions::auto()
                    };
                    broker
                        .consume(name, options, || {
                            |_: Delivery| async { Ok::<(), Failure>(()) }
                        })
                        .await
                }
            };
            // The exclusive one goes in at a different place each round, the
            // shared ones after a different head start; every tenth round
            // it has finished before they start.
            let at = round % 5;
            let results = if round % 10 == 0 {
                let first = consume(true, 0).await;
                let mut results = Vec::new();
                for i in 0..5 {
                    results.push(if i == at {
                        None
                    } else {
                        Some(consume(false, 0).await)
                    });
                }
                results[at] = Some(first);
                results.into_iter().flatten().collect::<Vec<_>>()
            } else {
                let calls = (0..5).map(|i| consume(i == at, if i == at { 0 } else { round * 3 }));
                futures::future::join_all(calls).await
            };
            let exclusive = &results[at];
            let shared: Vec<_> = results
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != at)
                .map(|(_, r)| r)
                .collect();
            let shared_ok = shared.iter().filter(|r| r.is_ok()).count();
            for refused in results.iter().filter_map(|r| r.as_ref().err()) {
                assert!(
                    matches!(refused, BrokerError::ExclusiveConsumer { .. }),
                    "{refused:?}"
                );
            }
            match exclusive {
                Ok(_) => {
                    assert_eq!(shared_ok, 0, "round {round}: both won");
                    exclusive_won += 1;
                }
                Err(_) => {
                    assert!(shared_ok > 0, "round {round}: refused for nothing");
                    shared_won += 1;
                }
            }
            let winners = results.iter().filter(|r| r.is_ok()).count();
            let snap = broker.queue_stats(&name).await.unwrap();
            assert_eq!(snap.stats.consumers, winners, "round {round}");
            assert_eq!(queue.consumer_count(), winners, "round {round}");
            broker
                .delete_queue(&name, DeleteOptions::default())
                .await
                .unwrap();
        }
        // Both outcomes happen.
        assert!(
            exclusive_won > 0 && shared_won > 0,
            "{exclusive_won} / {shared_won}"
        );
    });
}

#[test]
fn a_responder_answers_a_request_sent_the_moment_respond_returns() {
    across_arbiters(|rt| async move {
        let broker = Broker::new(&rt);
        let requester = broker.requester().await.unwrap();
        for round in 0..50 {
            let name = format!("respond-{round}");
            broker
                .declare_queue(&name, QueueOptions::default())
                .await
                .unwrap();
            let _responder = broker
                .respond(&name, ConsumeOptions::auto(), || {
                    |req: Request| async move { Ok(Envelope::new(req.payload().clone())) }
                })
                .await
                .unwrap();
            let reply = requester
                .request(name.as_str(), msg(round))
                .timeout(WAIT)
                .await
                .unwrap();
            assert_eq!(reply.decode::<u32>().unwrap(), round);
        }
    });
}

async fn yields(n: usize) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// Counts its `cancelled` calls.
struct Watched(Arc<AtomicUsize>);

impl Consumer for Watched {
    async fn handle(&mut self, _: Delivery) -> Result<(), Failure> {
        Ok(())
    }

    async fn cancelled(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_consumer_racing_its_queues_deletion_is_refused_or_cancelled() {
    across_arbiters(|rt| async move {
        let broker = Broker::new(&rt);
        let (mut refused, mut cancelled) = (0, 0);
        for round in 0..200 {
            let name = format!("gone-{round}");
            let queue = broker
                .declare_queue(&name, QueueOptions::default())
                .await
                .unwrap();
            let told = Arc::new(AtomicUsize::new(0));
            let factory = {
                let told = told.clone();
                move || Watched(told.clone())
            };
            // Either goes first, after a different head start each round.
            let (wait_consume, wait_delete) = if round % 2 == 0 {
                (round % 7, 0)
            } else {
                (0, round % 7)
            };
            let (consumed, deleted) = tokio::join!(
                async {
                    yields(wait_consume).await;
                    broker.consume(&name, ConsumeOptions::auto(), factory).await
                },
                async {
                    yields(wait_delete).await;
                    broker.delete_queue(&name, DeleteOptions::default()).await
                }
            );
            deleted.unwrap();
            match consumed {
                Ok(consumer) => {
                    tokio::time::timeout(WAIT, consumer.terminated())
                        .await
                        .expect("a consumer of a deleted queue stops");
                    assert_eq!(told.load(Ordering::Relaxed), 1, "round {round}: told once");
                    cancelled += 1;
                }
                Err(err) => {
                    assert!(matches!(err, BrokerError::QueueNotFound(_)), "{err:?}");
                    assert_eq!(told.load(Ordering::Relaxed), 0);
                    refused += 1;
                }
            }
            // Nothing is left claimed.
            assert_eq!(queue.consumer_count(), 0, "round {round}");
        }
        assert!(refused > 0 && cancelled > 0, "{refused} / {cancelled}");
    });
}
