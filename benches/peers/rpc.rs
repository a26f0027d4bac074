//! Scenario 4: request-reply round trips, one at a time, with a 64-byte request
//! and a 64-byte reply; p50 and p99 over every round trip after a warm-up.
//!
//! The requester runs in an actor (or, for actix, a future) on an arbiter, and
//! the responder on the same arbiter or on another one. "Across arbiters" pins
//! the two arbiter threads to different cores (`sched_setaffinity`): left
//! alone, the OS sometimes runs both on one core, and a round trip then costs
//! a context switch instead of a cross-core wake-up, which on this kind of
//! machine (a VM) is 5–10 times cheaper. The floor row is two plain threads
//! pinned the same way, ping-ponging over `std::sync::mpsc`: the cost of two
//! cross-core wake-ups with no runtime at all.
//!
//! - actix `Addr::send().await` to an actor: the baseline;
//! - postbox `Addr::ask` to an actor (`Builder::arbiter` pins both);
//! - postbox `rpc`: `Requester::request` through a request queue to a
//!   `Broker::respond` responder (auto-ack) and back through the requester's
//!   reply queue. "Same arbiter" runs everything on a one-arbiter runtime;
//!   "across arbiters" uses a two-arbiter runtime, where the broker spreads the
//!   queues and consumers round-robin, as in production.
//! - the `direct replies` rows: the rpc with
//!   `RequesterOptions::direct_replies()`, where the responder hands the reply
//!   to the waiting request instead of publishing it to the reply queue;
//! - the `busy_poll` rows: the same across arbiters on a runtime built with
//!   `Runtime::builder().busy_poll(1 ms)`, whose arbiters keep polling instead
//!   of sleeping for 1 ms after their last message.

use std::time::Duration;

use bytes::Bytes;
use postbox::{Actor, Addr, Context, Failure, Handler, Message, Runtime};
use postbox_actors::rpc::{Request, Requester, RequesterOptions};
use postbox_actors::{Broker, ConsumeOptions, Envelope, QueueOptions};

use crate::Config;
use crate::actix_threads::ActixThreads;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{Latencies, Samples, payload, pin_current_thread, sample};

pub const S4: &str = "4 request-reply round trip";
pub const ACTIX_SAME: &str = "actix send().await, same arbiter";
pub const ACTIX_ACROSS: &str = "actix send().await, across arbiters";
pub const ASK_SAME: &str = "postbox Addr::ask, same arbiter";
pub const ASK_ACROSS: &str = "postbox Addr::ask, across arbiters";
pub const RPC_SAME: &str = "postbox rpc Requester→Responder, same arbiter";
pub const RPC_ACROSS: &str = "postbox rpc Requester→Responder, across arbiters";
pub const ASK_ACROSS_BUSY: &str = "postbox Addr::ask, across arbiters, busy_poll";
pub const RPC_ACROSS_BUSY: &str = "postbox rpc Requester→Responder, across arbiters, busy_poll";
pub const RPC_SAME_DIRECT: &str = "postbox rpc, direct replies, same arbiter";
pub const RPC_ACROSS_DIRECT_BUSY: &str = "postbox rpc, direct replies, across arbiters, busy_poll";
pub const FLOOR: &str = "floor: 2 threads ping-pong (std mpsc), across cores";

pub async fn scenario4(cfg: &Config, report: &mut Report) {
    println!("\n== {S4}");
    let n = cfg.count(200_000, 5_000) as usize;
    let warmup = n / 10;
    let row = |system: &str, l: Latencies| {
        Row::new(S4, system)
            .rate(l.rate())
            .latency(l.percentile_us(50.0), l.percentile_us(99.0))
    };
    if cfg.wants(FLOOR) {
        let l = tokio::task::spawn_blocking(move || floor(warmup, n))
            .await
            .expect("the floor threads");
        report.push(row(FLOOR, l).note("no runtime: the machine's wake-up cost"));
    }
    if cfg.wants(ACTIX_SAME) {
        report.push(row(ACTIX_SAME, actix(warmup, n, false).await));
    }
    if cfg.wants(ACTIX_ACROSS) {
        report.push(row(ACTIX_ACROSS, actix(warmup, n, true).await).vs(FLOOR, Metric::P50));
    }
    if cfg.wants(ASK_SAME) {
        report.push(row(ASK_SAME, ask(warmup, n, false, None).await).vs(ACTIX_SAME, Metric::P50));
    }
    if cfg.wants(ASK_ACROSS) {
        report
            .push(row(ASK_ACROSS, ask(warmup, n, true, None).await).vs(ACTIX_ACROSS, Metric::P50));
    }
    if cfg.wants(ASK_ACROSS_BUSY) {
        report.push(
            row(ASK_ACROSS_BUSY, ask(warmup, n, true, BUSY_POLL).await)
                .vs(ACTIX_ACROSS, Metric::P50)
                .note("Runtime::builder().busy_poll(1 ms)"),
        );
    }
    let n_rpc = cfg.count(50_000, 2_000) as usize;
    if cfg.wants(RPC_SAME) {
        report.push(
            row(
                RPC_SAME,
                rpc(warmup.min(n_rpc / 10), n_rpc, false, None, false).await,
            )
            .vs(ACTIX_SAME, Metric::P50)
            .note("1-arbiter runtime"),
        );
    }
    if cfg.wants(RPC_ACROSS) {
        report.push(
            row(
                RPC_ACROSS,
                rpc(warmup.min(n_rpc / 10), n_rpc, true, None, false).await,
            )
            .vs(ACTIX_ACROSS, Metric::P50)
            .note("2 arbiters, round-robin placement"),
        );
    }
    if cfg.wants(RPC_ACROSS_BUSY) {
        report.push(
            row(
                RPC_ACROSS_BUSY,
                rpc(warmup.min(n_rpc / 10), n_rpc, true, BUSY_POLL, false).await,
            )
            .vs(ACTIX_ACROSS, Metric::P50)
            .note("2 arbiters, round-robin placement, busy_poll(1 ms)"),
        );
    }
    if cfg.wants(RPC_SAME_DIRECT) {
        report.push(
            row(
                RPC_SAME_DIRECT,
                rpc(warmup.min(n_rpc / 10), n_rpc, false, None, true).await,
            )
            .vs(ACTIX_SAME, Metric::P50)
            .note("RequesterOptions::direct_replies(), 1-arbiter runtime"),
        );
    }
    if cfg.wants(RPC_ACROSS_DIRECT_BUSY) {
        report.push(
            row(
                RPC_ACROSS_DIRECT_BUSY,
                rpc(warmup.min(n_rpc / 10), n_rpc, true, BUSY_POLL, true).await,
            )
            .vs(ACTIX_ACROSS, Metric::P50)
            .note("direct replies, 2 arbiters, busy_poll(1 ms)"),
        );
    }
}

struct ActixEcho;

impl actix::Actor for ActixEcho {
    type Context = actix::Context<Self>;
}

struct ActixPing(Bytes);

impl actix::Message for ActixPing {
    type Result = Bytes;
}

impl actix::Handler<ActixPing> for ActixEcho {
    type Result = actix::MessageResult<ActixPing>;
    fn handle(&mut self, ping: ActixPing, _: &mut Self::Context) -> Self::Result {
        actix::MessageResult(ping.0)
    }
}

async fn actix(warmup: usize, n: usize, across: bool) -> Latencies {
    let threads = ActixThreads::start(2);
    if across {
        for (cpu, arbiter) in threads.arbiters.iter().enumerate() {
            arbiter.spawn_fn(move || pin_current_thread(cpu));
        }
    }
    let responder = &threads.arbiters[usize::from(across)];
    let echo = <ActixEcho as actix::Actor>::start_in_arbiter(responder, |_| ActixEcho);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = payload();
    threads.arbiters[0].spawn(async move {
        let samples = sample(warmup, n, || {
            let (echo, p) = (&echo, &p);
            async move {
                let reply = echo.send(ActixPing(p.clone())).await.expect("echo runs");
                assert_eq!(reply.len(), p.len());
            }
        })
        .await;
        let _ = tx.send(samples);
    });
    let (samples, elapsed) = rx.await.expect("the actix requester finished");
    Latencies::new(samples, elapsed)
}

struct Echo;

impl Actor for Echo {}

struct Ping(Bytes);

impl Message for Ping {
    type Reply = Bytes;
}

impl Handler<Ping> for Echo {
    async fn handle(&mut self, Ping(p): Ping, _: &mut Context<Self>) -> Result<Bytes, Failure> {
        Ok(p)
    }
}

/// The requesting side of the postbox cases: an actor whose handler runs the
/// whole measurement on its arbiter and replies with the samples.
struct Pinger;

impl Actor for Pinger {}

struct AskLoop {
    echo: Addr<Echo>,
    warmup: usize,
    n: usize,
}

impl Message for AskLoop {
    type Reply = Samples;
}

impl Handler<AskLoop> for Pinger {
    async fn handle(&mut self, run: AskLoop, _: &mut Context<Self>) -> Result<Samples, Failure> {
        let p = payload();
        Ok(sample(run.warmup, run.n, || {
            let (echo, p) = (&run.echo, &p);
            async move {
                let reply = echo.ask(Ping(p.clone())).await.expect("echo runs");
                assert_eq!(reply.len(), p.len());
            }
        })
        .await)
    }
}

struct RequestLoop {
    requester: Requester,
    warmup: usize,
    n: usize,
}

impl Message for RequestLoop {
    type Reply = Samples;
}

impl Handler<RequestLoop> for Pinger {
    async fn handle(
        &mut self,
        run: RequestLoop,
        _: &mut Context<Self>,
    ) -> Result<Samples, Failure> {
        let p = payload();
        Ok(sample(run.warmup, run.n, || {
            let (requester, p) = (&run.requester, &p);
            async move {
                let reply = requester
                    .request("rpc", Envelope::new(p.clone()))
                    .timeout(Duration::from_secs(10))
                    .await
                    .expect("a reply");
                assert_eq!(reply.size(), p.len());
            }
        })
        .await)
    }
}

/// The busy-polling window of the `busy_poll` rows.
const BUSY_POLL: Option<Duration> = Some(Duration::from_millis(1));

/// A postbox runtime with `arbiters` arbiters, busy-polling if asked to.
fn runtime(arbiters: usize, busy_poll: Option<Duration>) -> Runtime {
    let builder = Runtime::builder().arbiters(arbiters);
    match busy_poll {
        Some(window) => builder.busy_poll(window),
        None => builder,
    }
    .build()
    .expect("postbox runtime")
}

pub async fn ask(warmup: usize, n: usize, across: bool, busy_poll: Option<Duration>) -> Latencies {
    let rt = runtime(2, busy_poll);
    if across {
        place::pin_arbiters(&rt, |i| i).await;
    }
    let echo = rt.build(|| Some(Echo)).arbiter(usize::from(across)).spawn();
    let pinger = rt.build(|| Some(Pinger)).arbiter(0).spawn();
    let (samples, elapsed) = pinger
        .ask(AskLoop { echo, warmup, n })
        .await
        .expect("the pinger finished");
    rt.shutdown();
    Latencies::new(samples, elapsed)
}

async fn rpc(
    warmup: usize,
    n: usize,
    across: bool,
    busy_poll: Option<Duration>,
    direct: bool,
) -> Latencies {
    let rt = runtime(if across { 2 } else { 1 }, busy_poll);
    if across {
        place::pin_arbiters(&rt, |i| i).await;
    }
    let broker = Broker::new(&rt);
    broker
        .declare_queue("rpc", QueueOptions::default())
        .await
        .expect("declare the request queue");
    let _responder = broker
        .respond("rpc", ConsumeOptions::auto(), || {
            |request: Request| async move { Ok(Envelope::new(request.payload().clone())) }
        })
        .await
        .expect("respond");
    let options = if direct {
        RequesterOptions::default().direct_replies()
    } else {
        RequesterOptions::default()
    };
    let requester = broker.requester_with(options).await.expect("requester");
    let pinger = rt.build(|| Some(Pinger)).spawn();
    let (samples, elapsed) = pinger
        .ask(RequestLoop {
            requester,
            warmup,
            n,
        })
        .await
        .expect("the pinger finished");
    rt.shutdown();
    Latencies::new(samples, elapsed)
}

/// Two OS threads on different cores passing a 64-byte payload back and forth.
fn floor(warmup: usize, n: usize) -> Latencies {
    let (to_echo, requests) = std::sync::mpsc::channel::<Bytes>();
    let (to_requester, replies) = std::sync::mpsc::channel::<Bytes>();
    let echo = std::thread::spawn(move || {
        pin_current_thread(1);
        while let Ok(p) = requests.recv() {
            if to_requester.send(p).is_err() {
                break;
            }
        }
    });
    let (samples, elapsed) = std::thread::spawn(move || {
        pin_current_thread(0);
        let p = payload();
        let trip = || {
            to_echo.send(p.clone()).expect("the echo thread runs");
            let reply = replies.recv().expect("a reply");
            assert_eq!(reply.len(), p.len());
        };
        for _ in 0..warmup {
            trip();
        }
        let mut samples = Vec::with_capacity(n);
        let start = std::time::Instant::now();
        for _ in 0..n {
            let t = std::time::Instant::now();
            trip();
            samples.push(t.elapsed().as_nanos() as u64);
        }
        (samples, start.elapsed())
    })
    .join()
    .expect("the requester thread");
    echo.join().expect("the echo thread");
    Latencies::new(samples, elapsed)
}
