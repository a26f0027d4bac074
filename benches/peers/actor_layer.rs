//! Scenario 8: the actor layer against kameo and ractor, the actor runtimes a
//! Rust user picks today. Same shapes for all three; each row says where it
//! is not like-for-like.
//!
//! - **tell**: one producer (the driver task) sends 1,000,000 one-way messages
//!   to one actor, which counts them; median of trials, fresh threads each.
//!   postbox and kameo with a bounded mailbox of 1,024 (the producer waits
//!   for room), ractor unbounded (it has no bounded mailbox).
//! - **ask, one thread**: asker and actor on one thread (a current-thread tokio
//!   runtime; for postbox, a `LocalSet` with `RuntimeHandle::local`).
//! - **ask across pinned threads**: asker on core 0, actor on core 1, each on
//!   a single-threaded runtime of its own (for postbox, two arbiters).
//! - **ask from a plain tokio task**: a multi-threaded tokio runtime, one
//!   worker per core, as `#[tokio::main]` builds; the asker is a task spawned
//!   on it. kameo's and ractor's actors are tasks of that runtime, and so is
//!   postbox's task actor (`spawn_task`, the like-for-like row, which the
//!   goal reads); an ordinary postbox actor runs on the arbiters of a
//!   `Runtime` (the other row: what crossing to them costs).
//! - **restart**: the actor panics on a message and its supervisor restarts
//!   it with no backoff; measured from sending the crashing message to the
//!   reply to the next ask. postbox and kameo restart in place (same address,
//!   mailbox kept); ractor's supervisor spawns a new actor and hands its
//!   reference over, which the asker awaits. One thread, as "ask, one thread".
//! - **spawn**: 100,000 idle actors, each library's default mailbox, in a
//!   child process: started per second (until every `started` hook ran) and
//!   resident bytes per actor.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kameo::actor::Spawn as _;
use postbox::{
    Actor, Backoff, ChildSpec, Context, Failure, Handler, Message, RuntimeHandle, SupervisorSpec,
};
use ractor::{ActorProcessingErr, ActorRef as RactorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

use crate::Config;
use crate::memory;
use crate::place;
use crate::report::{Metric, Report, Row};
use crate::util::{
    Done, Latencies, Samples, leak, payload, pin_current_thread, sample, throughput, timed, trials,
    worker_runtime,
};

pub const S8: &str = "8 actor layer vs kameo and ractor";

pub const TELL_POSTBOX: &str = "postbox Addr::send, mailbox 1024";
pub const TELL_KAMEO: &str = "kameo tell, bounded(1024)";
pub const TELL_RACTOR: &str = "ractor cast, unbounded";
pub const ONE_POSTBOX: &str = "postbox ask, one thread";
pub const ONE_KAMEO: &str = "kameo ask, one thread";
pub const ONE_RACTOR: &str = "ractor call, one thread";
pub const ACROSS_POSTBOX: &str = "postbox ask, across pinned threads";
pub const ACROSS_KAMEO: &str = "kameo ask, across pinned threads";
pub const ACROSS_RACTOR: &str = "ractor call, across pinned threads";
pub const TOKIO_POSTBOX: &str = "postbox ask from a tokio task, task actor (spawn_task)";
pub const TOKIO_POSTBOX_ARBITER: &str = "postbox ask from a tokio task, actor on a Runtime";
pub const TOKIO_KAMEO: &str = "kameo ask from a tokio task";
pub const TOKIO_RACTOR: &str = "ractor call from a tokio task";
pub const RESTART_POSTBOX: &str = "postbox panic → restarted → answers";
pub const RESTART_KAMEO: &str = "kameo panic → restarted → answers";
pub const RESTART_RACTOR: &str = "ractor panic → new actor → answers";

pub fn spawn_row(system: &str, n: u64) -> String {
    format!("{system} spawn {} idle actors", crate::util::thousands(n))
}

/// The tell rows' bounded mailboxes.
const CAPACITY: usize = 1024;

pub async fn scenario8(cfg: &Config, report: &mut Report) {
    println!("\n== {S8}");
    let n = cfg.count(1_000_000, 40_000);
    if cfg.wants(TELL_KAMEO) {
        let t = trials(cfg.reps, || kameo_tell(n)).await;
        report.push(Row::new(S8, TELL_KAMEO).trials(t));
    }
    if cfg.wants(TELL_RACTOR) {
        let t = trials(cfg.reps, || ractor_tell(n)).await;
        report.push(
            Row::new(S8, TELL_RACTOR)
                .trials(t)
                .note("unbounded: ractor has no bounded mailbox"),
        );
    }
    if cfg.wants(TELL_POSTBOX) {
        let t = trials(cfg.reps, || crate::p2p::postbox_actor(n)).await;
        report.push(Row::new(S8, TELL_POSTBOX).trials(t).vs(
            best_rate(report, &[TELL_KAMEO, TELL_RACTOR]),
            Metric::Throughput,
        ));
    }

    let trips = cfg.count(200_000, 5_000) as usize;
    let warmup = trips / 10;
    let row = |system: &str, l: Latencies| {
        Row::new(S8, system)
            .rate(l.rate())
            .latency(l.percentile_us(50.0), l.percentile_us(99.0))
    };
    let latency_rows: [(&str, &str, &str, Shape); 3] = [
        (ONE_KAMEO, ONE_RACTOR, ONE_POSTBOX, Shape::OneThread),
        (ACROSS_KAMEO, ACROSS_RACTOR, ACROSS_POSTBOX, Shape::Across),
        (TOKIO_KAMEO, TOKIO_RACTOR, TOKIO_POSTBOX, Shape::Tokio),
    ];
    for (kameo_row, ractor_row, postbox_row, shape) in latency_rows {
        if cfg.wants(kameo_row) {
            let l = in_shape(shape, kameo_spawn, move |echo| {
                kameo_asks(echo, warmup, trips)
            })
            .await;
            report.push(row(kameo_row, l));
        }
        if cfg.wants(ractor_row) {
            let l = in_shape(shape, ractor_spawn, move |echo| {
                ractor_asks(echo, warmup, trips)
            })
            .await;
            report.push(row(ractor_row, l));
        }
        if cfg.wants(postbox_row) {
            let l = match shape {
                Shape::OneThread => on_one_thread(postbox_local_asks(warmup, trips)).await,
                Shape::Across => crate::rpc::ask(warmup, trips, true, None).await,
                Shape::Tokio => postbox_tokio_asks(warmup, trips).await,
            };
            let best = best_p50(report, &[kameo_row, ractor_row]);
            let note = match shape {
                Shape::OneThread => "RuntimeHandle::local on a LocalSet",
                Shape::Across => "two arbiters, pinned",
                Shape::Tokio => "a task of the asker's runtime, as the peers' actors",
            };
            report.push(row(postbox_row, l).vs(best, Metric::P50).note(note));
        }
        if matches!(shape, Shape::Tokio) && cfg.wants(TOKIO_POSTBOX_ARBITER) {
            let l = postbox_arbiter_asks(warmup, trips).await;
            let best = best_p50(report, &[kameo_row, ractor_row]);
            report.push(
                row(TOKIO_POSTBOX_ARBITER, l)
                    .vs(best, Metric::P50)
                    .note("the asker's runtime hands off to an arbiter and back"),
            );
        }
    }

    let restarts = cfg.count(20_000, 1_000) as usize;
    let quiet = QuietPanics::install();
    if cfg.wants(RESTART_KAMEO) {
        let l = on_one_thread(kameo_restarts(restarts / 10, restarts)).await;
        report.push(row(RESTART_KAMEO, l).note("supervise(), restart in place"));
    }
    if cfg.wants(RESTART_RACTOR) {
        let l = on_one_thread(ractor_restarts(restarts / 10, restarts)).await;
        report.push(
            row(RESTART_RACTOR, l).note("the supervisor spawns a new actor and hands it over"),
        );
    }
    if cfg.wants(RESTART_POSTBOX) {
        let l = on_one_thread(postbox_restarts(restarts / 10, restarts)).await;
        let best = best_p50(report, &[RESTART_KAMEO, RESTART_RACTOR]);
        report.push(
            row(RESTART_POSTBOX, l)
                .vs(best, Metric::P50)
                .note("SupervisorSpec, Backoff::NONE, restart in place"),
        );
    }
    drop(quiet);

    let actors = cfg.count(100_000, 5_000);
    let kameo_spawn = spawn_row("kameo", actors);
    let ractor_spawn = spawn_row("ractor", actors);
    let postbox_spawn = spawn_row("postbox", actors);
    if cfg.wants(&kameo_spawn) {
        let m = memory::run_child("actors-kameo", actors);
        report.push(
            Row::new(S8, &kameo_spawn)
                .rate(m.rate)
                .bytes(m.bytes)
                .note("msgs/s: started per s; bytes per actor; bounded(64)"),
        );
    }
    if cfg.wants(&ractor_spawn) {
        let m = memory::run_child("actors-ractor", actors);
        report.push(
            Row::new(S8, &ractor_spawn)
                .rate(m.rate)
                .bytes(m.bytes)
                .note("msgs/s: started per s; bytes per actor; unbounded"),
        );
    }
    if cfg.wants(&postbox_spawn) {
        let m = memory::run_child("actors-postbox", actors);
        let best = best_rate(report, &[&kameo_spawn, &ractor_spawn]).to_string();
        report.push(
            Row::new(S8, &postbox_spawn)
                .rate(m.rate)
                .bytes(m.bytes)
                .vs(&best, Metric::Bytes)
                .note("msgs/s: started per s; bytes per actor; mailbox 256"),
        );
    }
}

/// The peer row with the highest rate (the one to beat).
fn best_rate<'a>(report: &Report, systems: &[&'a str]) -> &'a str {
    best(report, systems, |r| r.msgs_per_sec.map(|v| -v))
}

/// The peer row with the lowest p50.
fn best_p50<'a>(report: &Report, systems: &[&'a str]) -> &'a str {
    best(report, systems, |r| r.p50_us)
}

fn best<'a>(report: &Report, systems: &[&'a str], key: impl Fn(&Row) -> Option<f64>) -> &'a str {
    systems
        .iter()
        .filter_map(|s| Some((*s, key(report.find(S8, s)?)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(systems[0], |(s, _)| s)
}

#[derive(Clone, Copy)]
enum Shape {
    OneThread,
    Across,
    Tokio,
}

/// Runs a peer's ask loop in `shape`: `spawn` starts the actor where the
/// shape puts actors, `asks` asks it from where the shape puts the asker.
async fn in_shape<R, S, SF, A, AF>(shape: Shape, spawn: S, asks: A) -> Latencies
where
    R: Send + 'static,
    S: FnOnce() -> SF + Send + 'static,
    SF: Future<Output = R> + Send + 'static,
    A: FnOnce(R) -> AF + Send + 'static,
    AF: Future<Output = Latencies> + Send + 'static,
{
    match shape {
        Shape::OneThread => on_one_thread(async move { asks(spawn().await).await }).await,
        Shape::Tokio => {
            let rt = worker_runtime();
            let l = rt
                .spawn(async move { asks(spawn().await).await })
                .await
                .expect("the asker task");
            rt.shutdown_background();
            l
        }
        Shape::Across => {
            let actor_rt = Pinned::start(1);
            let actor = actor_rt
                .handle
                .spawn(spawn())
                .await
                .expect("the spawning task");
            let asker_rt = Pinned::start(0);
            let l = asker_rt
                .handle
                .spawn(asks(actor))
                .await
                .expect("the asker task");
            drop(asker_rt);
            drop(actor_rt);
            l
        }
    }
}

/// A current-thread runtime on a thread of its own, pinned to one core.
struct Pinned {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pinned {
    fn start(core: usize) -> Pinned {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            pin_current_thread(core);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a pinned runtime");
            let _ = handle_tx.send(rt.handle().clone());
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        Pinned {
            handle: handle_rx.recv().expect("the pinned runtime's handle"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `f` to completion on a fresh thread with a current-thread runtime
/// and a `LocalSet` (for postbox's local actors).
async fn on_one_thread<Fut>(f: Fut) -> Latencies
where
    Fut: Future<Output = Latencies> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let local = tokio::task::LocalSet::new();
        let _ = tx.send(local.block_on(&rt, f));
    });
    rx.await.expect("the one-thread run")
}

// ---- kameo ----

struct KameoSink {
    done: &'static Done,
}

impl kameo::Actor for KameoSink {
    type Args = Self;
    type Error = kameo::error::Infallible;
    async fn on_start(state: Self, _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(state)
    }
}

impl kameo::message::Message<Bytes> for KameoSink {
    type Reply = ();
    async fn handle(
        &mut self,
        _: Bytes,
        _: &mut kameo::message::Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.done.hit(1);
    }
}

async fn kameo_tell(n: u64) -> f64 {
    let rt = worker_runtime();
    let done = leak(Done::new());
    let sink = {
        let _enter = rt.enter();
        KameoSink::spawn_with_mailbox(KameoSink { done }, kameo::mailbox::bounded(CAPACITY))
    };
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (sink, p) = (&sink, &p);
        timed(async move {
            done.arm(k);
            for _ in 0..k {
                sink.tell(p.clone()).await.expect("the sink runs");
            }
            done.wait().await;
        })
    })
    .await;
    rt.shutdown_background();
    rate
}

#[derive(Default)]
struct KameoEcho {
    count: u64,
}

impl kameo::Actor for KameoEcho {
    type Args = Self;
    type Error = kameo::error::Infallible;
    async fn on_start(state: Self, _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(state)
    }
}

#[derive(kameo::Reply)]
struct Pong(Bytes);

impl kameo::message::Message<Bytes> for KameoEcho {
    type Reply = Pong;
    async fn handle(
        &mut self,
        p: Bytes,
        _: &mut kameo::message::Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.count += 1;
        Pong(p)
    }
}

struct Crash;

impl kameo::message::Message<Crash> for KameoEcho {
    type Reply = ();
    async fn handle(
        &mut self,
        _: Crash,
        _: &mut kameo::message::Context<Self, Self::Reply>,
    ) -> Self::Reply {
        panic!("crash requested");
    }
}

async fn kameo_spawn() -> kameo::actor::ActorRef<KameoEcho> {
    KameoEcho::spawn(KameoEcho::default())
}

async fn kameo_asks(echo: kameo::actor::ActorRef<KameoEcho>, warmup: usize, n: usize) -> Latencies {
    let p = payload();
    let (samples, elapsed) = sample(warmup, n, || {
        let (echo, p) = (&echo, &p);
        async move {
            let Pong(reply) = echo.ask(p.clone()).await.expect("echo runs");
            assert_eq!(reply.len(), p.len());
        }
    })
    .await;
    Latencies::new(samples, elapsed)
}

/// kameo's supervisor: spawns the echo as a supervised child and hands its
/// reference out.
struct KameoSupervisor;

impl kameo::Actor for KameoSupervisor {
    type Args = tokio::sync::oneshot::Sender<kameo::actor::ActorRef<KameoEcho>>;
    type Error = kameo::error::Infallible;
    async fn on_start(
        tx: Self::Args,
        me: kameo::actor::ActorRef<Self>,
    ) -> Result<Self, Self::Error> {
        let child = KameoEcho::supervise_with(&me, KameoEcho::default)
            .restart_policy(kameo::supervision::RestartPolicy::Permanent)
            .restart_limit(u32::MAX, Duration::from_secs(1))
            .spawn()
            .await;
        let _ = tx.send(child);
        Ok(KameoSupervisor)
    }
}

async fn kameo_restarts(warmup: usize, n: usize) -> Latencies {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _supervisor = KameoSupervisor::spawn(tx);
    let echo = rx.await.expect("the supervised echo");
    let p = payload();
    let (samples, elapsed) = sample(warmup, n, || {
        let (echo, p) = (&echo, &p);
        async move {
            echo.tell(Crash).await.expect("the echo takes the crash");
            let Pong(reply) = echo
                .ask(p.clone())
                .await
                .expect("the restarted echo answers");
            assert_eq!(reply.len(), p.len());
        }
    })
    .await;
    Latencies::new(samples, elapsed)
}

// ---- ractor ----

struct RactorSink;

impl ractor::Actor for RactorSink {
    type Msg = Bytes;
    type State = &'static Done;
    type Arguments = &'static Done;
    async fn pre_start(
        &self,
        _: RactorRef<Bytes>,
        done: &'static Done,
    ) -> Result<&'static Done, ActorProcessingErr> {
        Ok(done)
    }
    async fn handle(
        &self,
        _: RactorRef<Bytes>,
        _: Bytes,
        done: &mut &'static Done,
    ) -> Result<(), ActorProcessingErr> {
        done.hit(1);
        Ok(())
    }
}

async fn ractor_tell(n: u64) -> f64 {
    let rt = worker_runtime();
    let done = leak(Done::new());
    let (sink, _) = rt
        .spawn(ractor::Actor::spawn(None, RactorSink, done))
        .await
        .expect("the spawning task")
        .expect("the sink starts");
    let p = payload();
    let rate = throughput(n / 10, n, 1, |k| {
        let (sink, p) = (&sink, &p);
        timed(async move {
            done.arm(k);
            for _ in 0..k {
                sink.cast(p.clone()).expect("the sink runs");
            }
            done.wait().await;
        })
    })
    .await;
    sink.stop(None);
    rt.shutdown_background();
    rate
}

enum EchoMsg {
    Ping(Bytes, RpcReplyPort<Bytes>),
    Crash,
}

struct RactorEcho;

impl ractor::Actor for RactorEcho {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();
    async fn pre_start(&self, _: RactorRef<EchoMsg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }
    async fn handle(
        &self,
        _: RactorRef<EchoMsg>,
        msg: EchoMsg,
        count: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EchoMsg::Ping(p, reply) => {
                *count += 1;
                let _ = reply.send(p);
            }
            EchoMsg::Crash => panic!("crash requested"),
        }
        Ok(())
    }
}

async fn ractor_spawn() -> RactorRef<EchoMsg> {
    ractor::Actor::spawn(None, RactorEcho, ())
        .await
        .expect("the echo starts")
        .0
}

async fn ractor_asks(echo: RactorRef<EchoMsg>, warmup: usize, n: usize) -> Latencies {
    let p = payload();
    let (samples, elapsed) = sample(warmup, n, || {
        let (echo, p) = (&echo, &p);
        async move {
            let reply = ractor::call!(echo, EchoMsg::Ping, p.clone()).expect("echo runs");
            assert_eq!(reply.len(), p.len());
        }
    })
    .await;
    echo.stop(None);
    Latencies::new(samples, elapsed)
}

/// ractor's supervisor: respawns the echo when it fails and hands the new
/// reference to the asker.
struct RactorSupervisor;

impl ractor::Actor for RactorSupervisor {
    type Msg = ();
    type State = mpsc::UnboundedSender<RactorRef<EchoMsg>>;
    type Arguments = mpsc::UnboundedSender<RactorRef<EchoMsg>>;
    async fn pre_start(
        &self,
        me: RactorRef<()>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (child, _) = ractor::Actor::spawn_linked(None, RactorEcho, (), me.get_cell()).await?;
        let _ = tx.send(child);
        Ok(tx)
    }
    async fn handle_supervisor_evt(
        &self,
        me: RactorRef<()>,
        event: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(..) = event {
            let (child, _) =
                ractor::Actor::spawn_linked(None, RactorEcho, (), me.get_cell()).await?;
            let _ = tx.send(child);
        }
        Ok(())
    }
}

async fn ractor_restarts(warmup: usize, n: usize) -> Latencies {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (supervisor, _) = ractor::Actor::spawn(None, RactorSupervisor, tx)
        .await
        .expect("the supervisor starts");
    let mut echo = rx.recv().await.expect("the first echo");
    let p = payload();
    let echo_ref = &mut echo;
    let rx_ref = &mut rx;
    let mut samples = Vec::with_capacity(n);
    let mut start = Instant::now();
    for i in 0..warmup + n {
        if i == warmup {
            start = Instant::now();
        }
        let t = Instant::now();
        echo_ref
            .cast(EchoMsg::Crash)
            .expect("the echo takes the crash");
        *echo_ref = rx_ref.recv().await.expect("a new echo");
        let reply = ractor::call!(echo_ref, EchoMsg::Ping, p.clone()).expect("the new echo");
        assert_eq!(reply.len(), p.len());
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    let elapsed = start.elapsed();
    supervisor.stop(None);
    Latencies::new(samples, elapsed)
}

// ---- postbox ----

#[derive(Default)]
struct Echo {
    count: u64,
}

impl Actor for Echo {}

struct Ping(Bytes);

impl Message for Ping {
    type Reply = Bytes;
}

impl Handler<Ping> for Echo {
    async fn handle(&mut self, Ping(p): Ping, _: &mut Context<Self>) -> Result<Bytes, Failure> {
        self.count += 1;
        Ok(p)
    }
}

struct Boom;

impl Message for Boom {
    type Reply = ();
}

impl Handler<Boom> for Echo {
    async fn handle(&mut self, _: Boom, _: &mut Context<Self>) -> Result<(), Failure> {
        panic!("crash requested");
    }
}

async fn ask_loop(echo: &postbox::Addr<Echo>, warmup: usize, n: usize) -> Samples {
    let p = payload();
    sample(warmup, n, || {
        let p = &p;
        async move {
            let reply = echo.ask(Ping(p.clone())).await.expect("echo runs");
            assert_eq!(reply.len(), p.len());
        }
    })
    .await
}

async fn postbox_local_asks(warmup: usize, n: usize) -> Latencies {
    let echo = RuntimeHandle::local().spawn(Echo::default());
    let (samples, elapsed) = ask_loop(&echo, warmup, n).await;
    Latencies::new(samples, elapsed)
}

/// A task actor on the asker's own runtime, as kameo's and ractor's actors.
async fn postbox_tokio_asks(warmup: usize, n: usize) -> Latencies {
    let rt = worker_runtime();
    let (samples, elapsed) = rt
        .spawn(async move {
            let echo = postbox::spawn_task(TaskEcho::default());
            let p = payload();
            sample(warmup, n, || {
                let (echo, p) = (&echo, &p);
                async move {
                    let reply = echo.ask(Ping(p.clone())).await.expect("echo runs");
                    assert_eq!(reply.len(), p.len());
                }
            })
            .await
        })
        .await
        .expect("the asker task");
    rt.shutdown_background();
    Latencies::new(samples, elapsed)
}

/// [`Echo`] as a task actor.
#[derive(Default)]
struct TaskEcho {
    count: u64,
}

impl postbox::TaskActor for TaskEcho {}

impl postbox::TaskHandler<Ping> for TaskEcho {
    async fn handle(
        &mut self,
        Ping(p): Ping,
        _: &mut postbox::TaskContext<Self>,
    ) -> Result<Bytes, Failure> {
        self.count += 1;
        Ok(p)
    }
}

/// An ordinary actor on a `Runtime`'s arbiters, asked from a task of
/// another runtime.
async fn postbox_arbiter_asks(warmup: usize, n: usize) -> Latencies {
    let rt = worker_runtime();
    let postbox = place::postbox_runtime().await;
    let echo = postbox.spawn(Echo::default());
    let (samples, elapsed) = rt
        .spawn(async move { ask_loop(&echo, warmup, n).await })
        .await
        .expect("the asker task");
    rt.shutdown_background();
    postbox.shutdown();
    Latencies::new(samples, elapsed)
}

async fn postbox_restarts(warmup: usize, n: usize) -> Latencies {
    let rt = RuntimeHandle::local();
    let supervisor = SupervisorSpec::new("restarts")
        .intensity(usize::MAX, Duration::from_secs(1))
        .backoff(Backoff::NONE)
        .child(ChildSpec::new("echo", Echo::default))
        .spawn(&rt);
    let echo = supervisor
        .child::<Echo>("echo")
        .await
        .expect("the supervised echo");
    let p = payload();
    let (samples, elapsed) = sample(warmup, n, || {
        let (echo, p) = (&echo, &p);
        async move {
            echo.send(Boom).await.expect("the echo takes the crash");
            let reply = echo.ask(Ping(p.clone())).await.expect("the restarted echo");
            assert_eq!(reply.len(), p.len());
        }
    })
    .await;
    supervisor.stop();
    Latencies::new(samples, elapsed)
}

/// Silences the default panic hook (it prints every panic, which would cost
/// more than the restart being measured) until dropped.
struct QuietPanics {
    previous: Option<PanicHook>,
}

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

impl QuietPanics {
    fn install() -> Self {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        QuietPanics {
            previous: Some(previous),
        }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            std::panic::set_hook(previous);
        }
    }
}

// ---- spawn (memory children) ----

struct KameoIdle(&'static AtomicU64);

impl kameo::Actor for KameoIdle {
    type Args = Self;
    type Error = kameo::error::Infallible;
    async fn on_start(state: Self, _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        state.0.fetch_add(1, Ordering::Relaxed);
        Ok(state)
    }
}

/// Spawns `n` idle kameo actors (default mailbox) and waits until all run.
pub async fn kameo_idle(n: u64) -> (f64, f64) {
    let started = leak(AtomicU64::new(0));
    idle(n, started, || KameoIdle::spawn(KameoIdle(started))).await
}

struct RactorIdle;

impl ractor::Actor for RactorIdle {
    type Msg = ();
    type State = ();
    type Arguments = &'static AtomicU64;
    async fn pre_start(
        &self,
        _: RactorRef<()>,
        started: &'static AtomicU64,
    ) -> Result<(), ActorProcessingErr> {
        started.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Spawns `n` idle ractor actors and waits until all run. ractor's `spawn`
/// returns once `pre_start` ran; the spawns run as tasks, as the others'
/// do, so that the rate is of spawning, not of one-by-one round trips.
pub async fn ractor_idle(n: u64) -> (f64, f64) {
    let started = leak(AtomicU64::new(0));
    idle(n, started, || {
        tokio::spawn(async move {
            ractor::Actor::spawn(None, RactorIdle, started)
                .await
                .expect("an idle actor starts")
        })
    })
    .await
}

async fn idle<T>(n: u64, started: &'static AtomicU64, mut spawn: impl FnMut() -> T) -> (f64, f64) {
    let before = crate::util::live_rss();
    let start = Instant::now();
    let handles: Vec<T> = (0..n).map(|_| spawn()).collect();
    while started.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let after = crate::util::live_rss();
    let keep = Arc::new(handles);
    drop(keep);
    (rate, (after - before) as f64 / n as f64)
}
