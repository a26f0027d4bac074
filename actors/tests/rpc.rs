//! Request-reply: round trips, deadlines, late replies, remote errors, no
//! responders, async and callback forms, scatter-gather, crashes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use postbox::testkit::local;
use postbox::{Actor, Context, Failure, Handler, Runtime, RuntimeHandle};
use postbox_actors::rpc::{RemoteError, ReplyEvent, Request, RequestError, Target};
use postbox_actors::{Broker, ConsumeOptions, Envelope, ExchangeOptions, QueueOptions};
use tokio::time::Instant;

fn text(s: &str) -> Envelope {
    Envelope::encode(s).unwrap()
}

/// A broker with a queue "svc" answered by `n` echo responders ("<who>:<request>").
async fn echo_service(rt: &RuntimeHandle, n: usize) -> Broker {
    let broker = Broker::new(rt);
    broker
        .declare_queue("svc", QueueOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let who = format!("r{i}");
        broker
            .respond("svc", ConsumeOptions::manual(32), move || {
                let who = who.clone();
                move |req: Request| {
                    let who = who.clone();
                    async move {
                        let body: String = req.decode()?;
                        Ok(Envelope::encode(&format!("{who}:{body}"))?)
                    }
                }
            })
            .await
            .unwrap();
    }
    broker
}

#[tokio::test(start_paused = true)]
async fn round_trip() {
    local(async {
        let broker = echo_service(&RuntimeHandle::local(), 1).await;
        let client = broker.requester().await.unwrap();
        let reply = client
            .request("svc", text("hi"))
            .timeout(Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(reply.decode::<String>().unwrap(), "r0:hi");
        assert!(reply.correlation_id().is_some());
        assert_eq!(client.stats().replies, 1);
        assert_eq!(client.stats().pending, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn timeouts_late_replies_and_expired_requests() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker.declare_queue("slow", QueueOptions::default()).await.unwrap();
        let left = Arc::new(Mutex::new(Vec::new()));
        let l = left.clone();
        let responder = broker
            .respond("slow", ConsumeOptions::manual(1), move || {
                let l = l.clone();
                move |req: Request| {
                    let l = l.clone();
                    async move {
                        l.lock().push(req.time_left());
                        let secs: u64 = req.decode()?;
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                        Ok(Envelope::encode(&secs)?)
                    }
                }
            })
            .await
            .unwrap();
        let client = broker.requester().await.unwrap();
        // A: takes 5 s, but the client waits only 2 s.
        let a = client.request("slow", Envelope::encode(&5u64).unwrap()).timeout(Duration::from_secs(2)).send().await.unwrap();
        let a_id = a.id().to_string();
        // B: queued behind A with a 1 s deadline: expired by the time the responder is free.
        let b = client.request("slow", Envelope::encode(&0u64).unwrap()).timeout(Duration::from_secs(1)).send().await.unwrap();
        let start = Instant::now();
        let err_b = b.await.unwrap_err();
        assert!(matches!(err_b, RequestError::Timeout { after, .. } if after == Duration::from_secs(1)));
        let err_a = a.await.unwrap_err();
        assert!(matches!(err_a, RequestError::Timeout { ref correlation_id, .. } if *correlation_id == a_id));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Let A's late reply arrive and B be skipped.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let stats = client.stats();
        assert_eq!((stats.late, stats.replies, stats.pending), (1, 0, 0));
        assert_eq!(client.late_replies(), vec![a_id]);
        let r = responder.stats();
        assert_eq!((r.replied, r.expired), (1, 1), "A answered late, B skipped");
        // The handler saw A's remaining time: its full 2 s.
        assert_eq!(*left.lock(), vec![Some(Duration::from_secs(2))]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_handler_error_is_a_typed_remote_error_not_a_timeout() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker.declare_queue("strict", QueueOptions::default()).await.unwrap();
        let responder = broker
            .respond("strict", ConsumeOptions::manual(4), || |req: Request| async move {
                let n: i64 = req.decode()?;
                if n < 0 {
                    return Err(RemoteError::new(format!("negative input {n}")));
                }
                Ok(Envelope::encode(&(n * 2))?)
            })
            .await
            .unwrap();
        let client = broker.requester().await.unwrap();
        let start = Instant::now();
        let err = client.request("strict", Envelope::encode(&-3i64).unwrap()).timeout(Duration::from_secs(30)).await.unwrap_err();
        assert!(matches!(err, RequestError::Remote { ref message, .. } if message == "negative input -3"), "{err:?}");
        assert_eq!(start.elapsed(), Duration::ZERO, "no waiting for the timeout");
        // Undecodable input is a remote error too.
        let err = client.request("strict", text("not a number")).await.unwrap_err();
        assert!(matches!(err, RequestError::Remote { .. }));
        let ok = client.request("strict", Envelope::encode(&21i64).unwrap()).await.unwrap();
        assert_eq!(ok.decode::<i64>().unwrap(), 42);
        assert_eq!((responder.stats().errors, responder.stats().replied), (2, 1));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_responders_fails_at_once_unless_told_to_wait() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("idle", QueueOptions::default())
            .await
            .unwrap();
        broker
            .declare_exchange("rpc", ExchangeOptions::direct())
            .await
            .unwrap();
        let client = broker.requester().await.unwrap();
        let start = Instant::now();
        for target in [
            Target::from("idle"),
            Target::from("missing"),
            Target::exchange("rpc", "nobody"),
        ] {
            let err = client
                .request(target, text("x"))
                .timeout(Duration::from_secs(60))
                .await
                .unwrap_err();
            assert!(matches!(err, RequestError::NoResponders { .. }), "{err:?}");
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(
            broker.queue_stats("idle").await.unwrap().stats.published,
            0,
            "nothing was enqueued"
        );
        // Told to wait: a responder that shows up in time answers.
        let pending = client
            .request("idle", text("later"))
            .timeout(Duration::from_secs(5))
            .wait_for_responders()
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _r = broker
            .respond("idle", ConsumeOptions::manual(1), || {
                |req: Request| async move { Ok(req.message().clone()) }
            })
            .await
            .unwrap();
        assert_eq!(pending.await.unwrap().decode::<String>().unwrap(), "later");
    })
    .await;
}

/// (correlation id, decoded reply or error text) per callback received.
type Received = Arc<Mutex<Vec<(String, Result<String, String>)>>>;

struct Inbox(Received);
impl Actor for Inbox {}
impl Handler<ReplyEvent> for Inbox {
    async fn handle(&mut self, e: ReplyEvent, _: &mut Context<Self>) -> Result<(), Failure> {
        let result = e
            .result
            .map(|r| r.decode::<String>().unwrap_or_default())
            .map_err(|e| e.to_string());
        self.0.lock().push((e.id.to_string(), result));
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn async_handles_polling_and_callback_actors() {
    local(async {
        let rt = RuntimeHandle::local();
        let broker = echo_service(&rt, 1).await;
        let client = broker.requester().await.unwrap();
        // Handle returned at once; polled before and after the reply.
        let mut pending = client.request("svc", text("report")).send().await.unwrap();
        assert!(
            pending.try_reply().is_none(),
            "nothing yet: the responder has not run"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        let reply = pending.try_reply().unwrap().unwrap();
        assert_eq!(reply.decode::<String>().unwrap(), "r0:report");
        // Callback actor, as in report generation: reply or timeout delivered as a message.
        let got = Arc::new(Mutex::new(Vec::new()));
        let inbox = rt.spawn(Inbox(got.clone()));
        let id = client
            .request("svc", text("monthly"))
            .send_to(inbox.recipient())
            .await
            .unwrap();
        broker
            .declare_queue("void", QueueOptions::default())
            .await
            .unwrap();
        let timeout_id = client
            .request("void", text("never"))
            .timeout(Duration::from_secs(3))
            .wait_for_responders()
            .send_to(inbox.recipient())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let got = got.lock().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (id.to_string(), Ok("r0:monthly".to_string())));
        assert_eq!(got[1].0, timeout_id.to_string());
        assert!(
            got[1]
                .1
                .as_ref()
                .unwrap_err()
                .contains("no reply within 3s"),
            "{:?}",
            got[1]
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn scatter_gather_collects_up_to_n_replies_within_the_timeout() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_exchange("quotes", ExchangeOptions::fanout())
            .await
            .unwrap();
        for (i, delay) in [1u64, 2, 30].into_iter().enumerate() {
            let q = format!("supplier{i}");
            broker
                .declare_queue(&q, QueueOptions::default())
                .await
                .unwrap();
            broker.bind_queue(&q, "quotes", "").await.unwrap();
            broker
                .respond(&q, ConsumeOptions::manual(1), move || {
                    move |_req: Request| async move {
                        tokio::time::sleep(Duration::from_secs(delay)).await;
                        Ok(Envelope::encode(&delay)?)
                    }
                })
                .await
                .unwrap();
        }
        let client = broker.requester().await.unwrap();
        let start = Instant::now();
        let two = client
            .request(Target::exchange("quotes", ""), text("price?"))
            .timeout(Duration::from_secs(10))
            .gather(2)
            .await
            .unwrap();
        let delays: Vec<u64> = two
            .iter()
            .map(|r| r.as_ref().unwrap().decode().unwrap())
            .collect();
        assert_eq!(delays, vec![1, 2]);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "returns as soon as it has 2"
        );
        let start = Instant::now();
        let all = client
            .request(Target::exchange("quotes", ""), text("price?"))
            .timeout(Duration::from_secs(10))
            .gather(5)
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "the 30 s supplier misses the 10 s window");
        assert!(start.elapsed() >= Duration::from_secs(10));
    })
    .await;
}

async fn many_clients(rt: RuntimeHandle, clients: usize, per_client: usize) {
    let broker = echo_service(&rt, 2).await;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = broker.requester().await.unwrap();
        tasks.push(async move {
            let requests = (0..per_client).map(|i| {
                let client = &client;
                async move {
                    let body = format!("c{c}-{i}");
                    let reply = client
                        .request("svc", text(&body))
                        .timeout(Duration::from_secs(60))
                        .await
                        .unwrap();
                    let reply: String = reply.decode().unwrap();
                    assert!(
                        reply.ends_with(&format!(":{body}")),
                        "{reply} answers {body}"
                    );
                }
            });
            futures::future::join_all(requests).await;
            let stats = client.stats();
            assert_eq!(
                (stats.replies, stats.late, stats.pending),
                (per_client as u64, 0, 0)
            );
        });
    }
    futures::future::join_all(tasks).await;
    assert_eq!(
        broker.queue_stats("svc").await.unwrap().stats.acknowledged,
        (clients * per_client) as u64
    );
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_concurrent_requests_from_eight_clients() {
    local(many_clients(RuntimeHandle::local(), 8, 1250)).await;
}

#[test]
fn concurrent_requests_across_arbiters() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    driver.block_on(many_clients(rt.handle(), 8, 250));
}

#[tokio::test(start_paused = true)]
async fn a_responder_that_crashes_mid_request_has_it_redelivered_and_one_reply_arrives() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("fragile", QueueOptions::default())
            .await
            .unwrap();
        let crashed = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU32::new(0));
        let mut responders = Vec::new();
        for who in ["a", "b"] {
            let (crashed, attempts) = (crashed.clone(), attempts.clone());
            responders.push(
                broker
                    .respond("fragile", ConsumeOptions::manual(1), move || {
                        let (crashed, attempts) = (crashed.clone(), attempts.clone());
                        move |req: Request| {
                            let (crashed, attempts) = (crashed.clone(), attempts.clone());
                            async move {
                                attempts.fetch_add(1, Ordering::SeqCst);
                                if !crashed.swap(true, Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    panic!("responder {who} crashes mid-request");
                                }
                                assert!(req.redelivered(), "the retry is a redelivery");
                                Ok(Envelope::encode(&format!("{who} answered"))?)
                            }
                        }
                    })
                    .await
                    .unwrap(),
            );
        }
        let client = broker.requester().await.unwrap();
        let reply = client
            .request("fragile", text("job"))
            .timeout(Duration::from_secs(5))
            .await
            .unwrap();
        assert!(reply.decode::<String>().unwrap().ends_with("answered"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        let stats = client.stats();
        assert_eq!((stats.replies, stats.late), (1, 0), "exactly one reply");
        let restarts: u64 = responders
            .iter()
            .map(|r| r.consumer().addr().stats().restarts)
            .sum();
        assert_eq!(restarts, 1);
    })
    .await;
}

/// Adds to `broker` a queue "slow" whose responder answers after 3 s (an echo,
/// or a remote error for "fail"), and an empty queue "late.replies". Dropping
/// the responder's handle does not stop it.
async fn slow_service(broker: &Broker) {
    for queue in ["slow", "late.replies"] {
        broker
            .declare_queue(queue, QueueOptions::default())
            .await
            .unwrap();
    }
    broker
        .respond("slow", ConsumeOptions::manual(1), || {
            |req: Request| async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if req.decode::<String>()? == "fail" {
                    return Err(RemoteError::new("refused"));
                }
                Ok(req.message().clone())
            }
        })
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn late_replies_can_be_forwarded_to_a_dead_letter_queue() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        slow_service(&broker).await;
        let client = broker
            .requester_with(
                postbox_actors::rpc::RequesterOptions::default()
                    .late_replies_to("", "late.replies"),
            )
            .await
            .unwrap();
        let err = client
            .request("slow", text("too slow"))
            .timeout(Duration::from_secs(1))
            .await
            .unwrap_err();
        let RequestError::Timeout { correlation_id, .. } = err else {
            panic!("{err:?}")
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _c = broker
            .consume("late.replies", ConsumeOptions::auto(), move || {
                let tx = tx.clone();
                move |d: postbox_actors::Delivery| {
                    let _ = tx.send(d.into_message());
                    async { Ok(()) }
                }
            })
            .await
            .unwrap();
        let late = rx.recv().await.unwrap();
        assert_eq!(late.correlation_id(), Some(correlation_id.as_str()));
        assert_eq!(
            late.header(postbox_actors::rpc::LATE_HEADER),
            Some(&true.into())
        );
        assert_eq!(late.decode::<String>().unwrap(), "too slow");
        assert_eq!(client.stats().late, 1);
    })
    .await;
}

/// Direct replies skip the reply queue: replies, remote errors and late replies
/// all reach the requester, and the reply queue never sees a message.
#[tokio::test(start_paused = true)]
async fn direct_replies_bypass_the_reply_queue() {
    local(async {
        let broker = echo_service(&RuntimeHandle::local(), 1).await;
        slow_service(&broker).await;
        let client = broker
            .requester_with(
                postbox_actors::rpc::RequesterOptions::default()
                    .direct_replies()
                    .late_replies_to("", "late.replies"),
            )
            .await
            .unwrap();
        for i in 0..10 {
            let reply = client
                .request("svc", text(&format!("n{i}")))
                .timeout(Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(reply.decode::<String>().unwrap(), format!("r0:n{i}"));
        }
        let err = client
            .request("slow", text("fail"))
            .timeout(Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RequestError::Remote { message, .. } if message == "refused"),
            "{err:?}"
        );
        // Late: the requester gave up after 1 s, the reply comes at 3 s.
        let err = client
            .request("slow", text("too slow"))
            .timeout(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, RequestError::Timeout { .. }), "{err:?}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(client.stats().replies, 11);
        assert_eq!(client.stats().late, 1);
        let forwarded = broker.queue_stats("late.replies").await.unwrap();
        assert_eq!(forwarded.stats.ready, 1, "the late reply was forwarded");
        let reply_queue = broker.queue_stats(client.reply_queue()).await.unwrap();
        assert_eq!(
            reply_queue.stats.published, 0,
            "nothing went through the queue"
        );
    })
    .await;
}

/// Once a direct-reply requester is gone, replies for it take the ordinary
/// path (and find no queue): nothing is delivered to a dead requester.
#[tokio::test(start_paused = true)]
async fn a_dropped_direct_requester_is_forgotten() {
    local(async {
        let broker = Broker::new(&RuntimeHandle::local());
        broker
            .declare_queue("svc", QueueOptions::default())
            .await
            .unwrap();
        let responder = broker
            .respond("svc", ConsumeOptions::manual(8), || {
                |req: Request| async move { Ok(req.message().clone()) }
            })
            .await
            .unwrap();
        let direct = broker
            .requester_with(postbox_actors::rpc::RequesterOptions::default().direct_replies())
            .await
            .unwrap();
        let queued = broker.requester().await.unwrap();
        let reply = direct.request("svc", text("a")).await.unwrap();
        assert_eq!(reply.decode::<String>().unwrap(), "a");
        // An ordinary requester on the same broker still uses its queue.
        let reply = queued.request("svc", text("b")).await.unwrap();
        assert_eq!(reply.decode::<String>().unwrap(), "b");
        let via_queue = broker.queue_stats(queued.reply_queue()).await.unwrap();
        assert_eq!(via_queue.stats.published, 1);
        let name = direct.reply_queue().to_string();
        drop(direct);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            broker.queue_stats(&name).await.is_err(),
            "its reply queue went with it"
        );
        // A request carrying the dropped requester's reply_to gets its reply
        // published, which reaches no queue: counted as undeliverable.
        assert_eq!(responder.stats().undeliverable, 0);
        broker
            .publish(
                "svc",
                text("orphan")
                    .with_reply_to(name.clone())
                    .with_correlation_id("x"),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(responder.stats().undeliverable, 1);
        assert_eq!(responder.stats().replied, 3);
    })
    .await;
}
