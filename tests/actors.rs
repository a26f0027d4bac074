//! Behaviour of the actor layer: backpressure, asks, supervision, runtimes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postbox::testkit::local;
use postbox::{
    Actor, AskError, Backoff, ChildSpec, Context, ExitReason, Failure, FailureKind, Handler,
    Message, Restart, RestartStrategy, Runtime, RuntimeHandle, Strategy, SupervisorSpec,
    TrySendError,
};
use tokio::sync::Semaphore;

/// Records messages; each `Work` waits for a permit from `gate` first.
struct Worker {
    gate: Arc<Semaphore>,
    seen: Vec<u32>,
}
impl Actor for Worker {}

struct Work(u32);
impl Message for Work {
    type Reply = u32;
}
impl Handler<Work> for Worker {
    async fn handle(&mut self, Work(n): Work, _: &mut Context<Self>) -> Result<u32, Failure> {
        self.gate.acquire().await.map_err(Failure::from)?.forget();
        self.seen.push(n);
        Ok(n)
    }
}

struct Seen;
impl Message for Seen {
    type Reply = Vec<u32>;
}
impl Handler<Seen> for Worker {
    async fn handle(&mut self, _: Seen, _: &mut Context<Self>) -> Result<Vec<u32>, Failure> {
        Ok(self.seen.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn full_mailbox_makes_send_wait_and_try_send_fail() {
    local(async {
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let addr = RuntimeHandle::local()
            .build(move || {
                Some(Worker {
                    gate: g.clone(),
                    seen: vec![],
                })
            })
            .mailbox(2)
            .spawn();
        // 1 is taken by the (blocked) handler, 2 and 3 fill the mailbox.
        addr.send(Work(1)).await.unwrap();
        tokio::task::yield_now().await;
        addr.send(Work(2)).await.unwrap();
        addr.send(Work(3)).await.unwrap();
        assert_eq!(addr.queued(), 2);
        match addr.try_send(Work(4)) {
            Err(TrySendError::Full(Work(4))) => {}
            other => panic!("expected Full(4), got {other:?}"),
        }
        // A send into the full mailbox stays pending, however long we wait...
        let pending = addr.send(Work(4));
        tokio::pin!(pending);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), &mut pending)
                .await
                .is_err()
        );
        // ...and completes once the receiver drains one message.
        gate.add_permits(1);
        pending.await.unwrap();
        gate.add_permits(3);
        assert_eq!(addr.ask(Seen).await.unwrap(), vec![1, 2, 3, 4]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn ask_times_out_and_the_abandoned_request_is_skipped() {
    local(async {
        let gate = Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let addr = RuntimeHandle::local()
            .build(move || {
                Some(Worker {
                    gate: g.clone(),
                    seen: vec![],
                })
            })
            .spawn();
        addr.send(Work(1)).await.unwrap(); // blocks the actor
        let err = addr
            .ask(Work(2))
            .timeout(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, AskError::Timeout(d) if d == Duration::from_millis(100)));
        gate.add_permits(10);
        assert_eq!(addr.ask(Work(3)).await.unwrap(), 3);
        // Work(2) was never executed, and was counted as skipped.
        assert_eq!(addr.ask(Seen).await.unwrap(), vec![1, 3]);
        assert_eq!(addr.stats().skipped_requests, 1);
    })
    .await;
}

#[tokio::test]
async fn send_to_a_stopped_actor_is_closed_and_returns_the_message() {
    local(async {
        let gate = Arc::new(Semaphore::new(100));
        let addr = RuntimeHandle::local().spawn_local_worker(gate);
        addr.stop();
        let reason = addr.terminated().await;
        assert!(matches!(reason, ExitReason::Stopped), "{reason:?}");
        assert_eq!(addr.send(Work(9)).await.unwrap_err().into_inner().0, 9);
        assert!(matches!(
            addr.try_send(Work(8)),
            Err(TrySendError::Closed(Work(8)))
        ));
        assert!(matches!(addr.ask(Seen).await, Err(AskError::Closed)));
    })
    .await;
}

trait SpawnWorker {
    fn spawn_local_worker(&self, gate: Arc<Semaphore>) -> postbox::Addr<Worker>;
}
impl SpawnWorker for RuntimeHandle {
    fn spawn_local_worker(&self, gate: Arc<Semaphore>) -> postbox::Addr<Worker> {
        self.build(move || {
            Some(Worker {
                gate: gate.clone(),
                seen: vec![],
            })
        })
        .spawn()
    }
}

/// Counts messages; `Crash` panics, `Fail` returns an error.
#[derive(Default)]
struct Fragile {
    count: u32,
}
impl Actor for Fragile {}

struct Inc;
impl Message for Inc {
    type Reply = u32;
}
impl Handler<Inc> for Fragile {
    async fn handle(&mut self, _: Inc, _: &mut Context<Self>) -> Result<u32, Failure> {
        self.count += 1;
        Ok(self.count)
    }
}

struct Crash;
impl Message for Crash {
    type Reply = ();
}
impl Handler<Crash> for Fragile {
    async fn handle(&mut self, _: Crash, _: &mut Context<Self>) -> Result<(), Failure> {
        panic!("crash requested");
    }
}

struct Fail;
impl Message for Fail {
    type Reply = ();
}
impl Handler<Fail> for Fragile {
    async fn handle(&mut self, _: Fail, _: &mut Context<Self>) -> Result<(), Failure> {
        Err(Failure::msg("fail requested"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_child_restarts_fresh_and_keeps_its_queued_messages() {
    local(async {
        let rt = RuntimeHandle::local();
        let sup = SupervisorSpec::new("sup")
            .child(ChildSpec::new("fragile", Fragile::default).mailbox(64))
            .spawn(&rt);
        let child = sup.child::<Fragile>("fragile").await.unwrap();
        let bystander = rt.spawn(Fragile::default());
        assert_eq!(child.ask(Inc).await.unwrap(), 1);
        assert_eq!(child.ask(Inc).await.unwrap(), 2);
        // Queue a crash followed by three increments before the child runs again.
        child.send(Crash).await.unwrap();
        for _ in 0..3 {
            child.send(Inc).await.unwrap();
        }
        // The increments queued behind the crash were kept and ran on fresh state.
        assert_eq!(child.ask(Inc).await.unwrap(), 4);
        let stats = child.stats();
        assert_eq!(
            (stats.failures, stats.restarts, stats.incarnation),
            (1, 1, 2)
        );
        // The thread and the other actors kept running.
        assert_eq!(bystander.ask(Inc).await.unwrap(), 1);
        // An ask whose handler panics gets a typed failure, not a timeout.
        let err = child.ask(Crash).await.unwrap_err();
        assert!(
            matches!(err, AskError::Failed(ref f) if f.is_panic()),
            "{err:?}"
        );
        // A handler error is a failure too.
        let err = child.ask(Fail).await.unwrap_err();
        assert!(
            matches!(err, AskError::Failed(ref f) if f.message() == "fail requested"),
            "{err:?}"
        );
        assert_eq!(child.ask(Inc).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_without_backoff_does_not_wait_for_a_timer_tick() {
    local(async {
        let rt = RuntimeHandle::local();
        let sup = SupervisorSpec::new("sup")
            .backoff(Backoff::NONE)
            .child(ChildSpec::new("fragile", Fragile::default))
            .spawn(&rt);
        let child = sup.child::<Fragile>("fragile").await.unwrap();
        // Off the millisecond grid: a zero-length sleep would wait for the
        // timer wheel's next tick, 700 µs away.
        tokio::time::advance(Duration::from_micros(300)).await;
        let before = tokio::time::Instant::now();
        assert!(child.ask(Crash).await.is_err());
        assert_eq!(child.ask(Inc).await.unwrap(), 1);
        assert_eq!(child.stats().restarts, 1);
        assert_eq!(tokio::time::Instant::now(), before);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn passing_the_restart_limit_escalates_to_the_parent() {
    local(async {
        let rt = RuntimeHandle::local();
        let inner = SupervisorSpec::new("inner")
            .intensity(2, Duration::from_secs(60))
            .child(ChildSpec::new("fragile", Fragile::default));
        let outer = SupervisorSpec::new("outer")
            .intensity(0, Duration::from_secs(60))
            .child(ChildSpec::supervisor(inner))
            .spawn(&rt);
        let inner_sup = outer
            .child::<postbox::SupervisorActor>("inner")
            .await
            .unwrap();
        let inner_handle = inner_sup.any();
        let children = outer.children().await.unwrap();
        assert_eq!(children.len(), 1);
        // Reach the fragile child through the inner supervisor's handle.
        let fragile = inner_fragile(&inner_sup).await;
        for _ in 0..2 {
            let _ = fragile.ask(Crash).await;
        }
        assert_eq!(
            fragile.ask(Inc).await.unwrap(),
            1,
            "two restarts are within the limit"
        );
        let _ = fragile.ask(Crash).await; // third: inner escalates, outer (limit 0) escalates too
        let reason = outer.terminated().await;
        match reason {
            ExitReason::Failed(f) => assert_eq!(f.kind(), FailureKind::Escalation, "{f}"),
            other => panic!("expected an escalation, got {other:?}"),
        }
        assert!(inner_handle.is_terminated());
        assert!(fragile.is_closed());
    })
    .await;
}

async fn inner_fragile(inner: &postbox::Addr<postbox::SupervisorActor>) -> postbox::Addr<Fragile> {
    // The nested supervisor is an actor like any other; its typed handle API is
    // available by wrapping its address.
    postbox::Supervisor::from_addr(inner.clone())
        .child::<Fragile>("fragile")
        .await
        .unwrap()
}

/// Reports its incarnation-local counter; used to see who was restarted.
#[derive(Default)]
struct Member {
    count: u32,
}
impl Actor for Member {}
impl Handler<Inc> for Member {
    async fn handle(&mut self, _: Inc, _: &mut Context<Self>) -> Result<u32, Failure> {
        self.count += 1;
        Ok(self.count)
    }
}
impl Handler<Crash> for Member {
    async fn handle(&mut self, _: Crash, _: &mut Context<Self>) -> Result<(), Failure> {
        panic!("member crash");
    }
}

async fn strategy_outcome(strategy: Strategy) -> Vec<u32> {
    let rt = RuntimeHandle::local();
    let sup = SupervisorSpec::new("s")
        .strategy(strategy)
        .child(ChildSpec::new("a", Member::default))
        .child(ChildSpec::new("b", Member::default))
        .child(ChildSpec::new("c", Member::default))
        .spawn(&rt);
    let mut members = Vec::new();
    for name in ["a", "b", "c"] {
        let m = sup.child::<Member>(name).await.unwrap();
        m.ask(Inc).await.unwrap();
        members.push(m);
    }
    let _ = members[1].ask(Crash).await;
    let mut counts = Vec::new();
    for m in &members {
        counts.push(m.ask(Inc).await.unwrap());
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn strategies_restart_the_right_children() {
    local(async {
        // 1 = restarted (fresh counter), 2 = kept its state.
        assert_eq!(strategy_outcome(Strategy::OneForOne).await, vec![2, 1, 2]);
        assert_eq!(strategy_outcome(Strategy::OneForAll).await, vec![1, 1, 1]);
        assert_eq!(strategy_outcome(Strategy::RestForOne).await, vec![2, 1, 1]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn restart_policies_and_backoff() {
    local(async {
        let rt = RuntimeHandle::local();
        let sup = SupervisorSpec::new("p")
            .backoff(Backoff::exponential(
                Duration::from_secs(1),
                Duration::from_secs(4),
            ))
            .child(ChildSpec::new("temp", Fragile::default).restart(Restart::Temporary))
            .child(ChildSpec::new("trans", Fragile::default).restart(Restart::Transient))
            .child(ChildSpec::new("perm", Fragile::default))
            .spawn(&rt);
        let temp = sup.child::<Fragile>("temp").await.unwrap();
        let trans = sup.child::<Fragile>("trans").await.unwrap();
        let perm = sup.child::<Fragile>("perm").await.unwrap();

        let _ = temp.ask(Crash).await;
        temp.terminated().await;
        assert!(
            sup.child::<Fragile>("temp").await.is_err(),
            "temporary children are not restarted"
        );

        trans.stop(); // a normal exit: transient children stay down
        trans.terminated().await;
        assert!(trans.is_closed());

        perm.stop(); // permanent children come back even after a normal stop
        assert_eq!(perm.ask(Inc).await.unwrap(), 1);
        assert_eq!(perm.stats().restarts, 1);

        // Backoff: 1 s before the 2nd consecutive restart of "perm" (it had one), then 2 s.
        let start = tokio::time::Instant::now();
        let _ = perm.ask(Crash).await;
        assert_eq!(perm.ask(Inc).await.unwrap(), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(sup.children().await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_self_supervised_actor_restarts_itself_within_its_limits() {
    local(async {
        let rt = RuntimeHandle::local();
        let strategy = RestartStrategy::new(Restart::Transient)
            .intensity(3, Duration::from_secs(60))
            .backoff(
                Backoff::exponential(Duration::from_secs(1), Duration::from_secs(8)).immediate(1),
            );
        let actor = rt
            .build(|| Some(Fragile::default()))
            .supervise(strategy)
            .spawn();
        assert_eq!(actor.ask(Inc).await.unwrap(), 1);
        // Messages queued behind a crash are kept, and run on fresh state.
        let start = tokio::time::Instant::now();
        actor.send(Crash).await.unwrap();
        actor.send(Inc).await.unwrap();
        assert_eq!(actor.ask(Inc).await.unwrap(), 2);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a first crash restarts at once"
        );
        // Consecutive crashes back off: 1 s, then 2 s.
        let start = tokio::time::Instant::now();
        let _ = actor.ask(Crash).await;
        assert_eq!(actor.ask(Inc).await.unwrap(), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        let _ = actor.ask(Fail).await;
        assert_eq!(actor.ask(Inc).await.unwrap(), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let stats = actor.stats();
        assert_eq!(
            (stats.failures, stats.restarts, stats.incarnation),
            (3, 3, 4)
        );
        // A fourth failure within the window passes the limit: it gives up.
        let _ = actor.ask(Crash).await;
        let reason = actor.terminated().await;
        assert!(
            matches!(&reason, ExitReason::Failed(f) if f.kind() == FailureKind::Escalation),
            "{reason:?}"
        );
        assert!(actor.is_closed());
        assert!(matches!(actor.ask(Inc).await, Err(AskError::Closed)));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_self_supervised_actor_stays_down_when_stopped_or_done() {
    local(async {
        let rt = RuntimeHandle::local();
        // Stopped while it waits out its backoff: it does not come back.
        let strategy = RestartStrategy::new(Restart::Permanent)
            .intensity(usize::MAX, Duration::from_secs(60))
            .backoff(Backoff::exponential(
                Duration::from_secs(10),
                Duration::from_secs(10),
            ));
        let actor = rt
            .build(|| Some(Fragile::default()))
            .supervise(strategy)
            .spawn();
        let _ = actor.ask(Crash).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        actor.stop();
        assert!(matches!(actor.terminated().await, ExitReason::Stopped));
        assert_eq!(actor.stats().restarts, 0);
        // A transient actor that exits normally is done.
        let transient = rt
            .build(|| Some(Fragile::default()))
            .supervise(RestartStrategy::new(Restart::Transient))
            .spawn();
        transient.stop();
        assert!(matches!(transient.terminated().await, ExitReason::Stopped));
        // A permanent one comes back after a normal exit, but not after stop().
        let permanent = rt
            .build(|| Some(Fragile::default()))
            .supervise(RestartStrategy::new(Restart::Permanent))
            .spawn();
        assert_eq!(permanent.ask(Inc).await.unwrap(), 1);
        permanent.stop();
        permanent.terminated().await;
        assert!(permanent.is_closed());
    })
    .await;
}

#[test]
fn works_from_a_plain_tokio_main_across_arbiters() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        let a = rt.build(|| Some(Fragile::default())).arbiter(0).spawn();
        let b = rt.build(|| Some(Fragile::default())).arbiter(1).spawn();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let target = if i % 2 == 0 { a.clone() } else { b.clone() };
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    target.ask(Inc).await.unwrap();
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(calls.load(Ordering::Relaxed), 800);
        assert_eq!(a.ask(Inc).await.unwrap(), 401);
        assert_eq!(b.ask(Inc).await.unwrap(), 401);
    });
    rt.shutdown();
}

/// Sleeps for the given time in its handler (a timer on the actor's arbiter).
struct Napper;
impl Actor for Napper {}
struct Nap(Duration);
impl Message for Nap {
    type Reply = u32;
}
impl Handler<Nap> for Napper {
    async fn handle(&mut self, Nap(d): Nap, _: &mut Context<Self>) -> Result<u32, Failure> {
        tokio::time::sleep(d).await;
        Ok(7)
    }
}

#[test]
fn busy_polling_arbiters_serve_asks_timers_and_wake_after_going_quiet() {
    let rt = Runtime::builder()
        .arbiters(2)
        .busy_poll(Duration::from_millis(1))
        .build()
        .unwrap();
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        let a = rt.build(|| Some(Fragile::default())).arbiter(0).spawn();
        let napper = rt.build(|| Some(Napper)).arbiter(1).spawn();
        for i in 1..=100 {
            assert_eq!(a.ask(Inc).await.unwrap(), i);
        }
        // Timers and I/O still run while the poller spins.
        let nap = napper.ask(Nap(Duration::from_millis(3)));
        assert_eq!(nap.timeout(Duration::from_secs(10)).await.unwrap(), 7);
        // Quiet for longer than the window: the arbiters park, and the next
        // message wakes them the usual way.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.ask(Inc).await.unwrap(), 101);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(napper.ask(Nap(Duration::ZERO)).await.unwrap(), 7);
    });
    rt.shutdown();
}

#[actix_rt::test]
async fn works_inside_an_actix_system() {
    let rt = Runtime::with_arbiters(1).unwrap();
    let a = rt.spawn(Fragile::default());
    assert_eq!(a.ask(Inc).await.unwrap(), 1);
    // Local mode uses the actix system's own thread.
    let b = RuntimeHandle::local().spawn(Fragile::default());
    assert_eq!(b.ask(Inc).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn death_watch_reports_each_incarnation() {
    struct Watcher {
        seen: Vec<String>,
    }
    impl Actor for Watcher {}
    struct Down(ExitReason);
    impl Message for Down {
        type Reply = ();
    }
    impl Handler<Down> for Watcher {
        async fn handle(&mut self, Down(r): Down, _: &mut Context<Self>) -> Result<(), Failure> {
            self.seen.push(r.to_string());
            Ok(())
        }
    }
    struct Watch(postbox::AnyAddr);
    impl Message for Watch {
        type Reply = ();
    }
    impl Handler<Watch> for Watcher {
        async fn handle(
            &mut self,
            Watch(t): Watch,
            ctx: &mut Context<Self>,
        ) -> Result<(), Failure> {
            ctx.watch(&t, None, Down);
            Ok(())
        }
    }
    impl Handler<Seen> for Watcher {
        async fn handle(&mut self, _: Seen, _: &mut Context<Self>) -> Result<Vec<u32>, Failure> {
            Ok(vec![self.seen.len() as u32])
        }
    }
    local(async {
        let rt = RuntimeHandle::local();
        let watcher = rt.spawn(Watcher { seen: vec![] });
        let target = rt.spawn(Fragile::default());
        watcher.ask(Watch(target.any())).await.unwrap();
        let _ = target.ask(Crash).await;
        target.terminated().await;
        assert_eq!(watcher.ask(Seen).await.unwrap(), vec![1]);
        // Watching something already gone fires at once.
        watcher.ask(Watch(target.any())).await.unwrap();
        assert_eq!(watcher.ask(Seen).await.unwrap(), vec![2]);
    })
    .await;
}

/// Runtime shutdown with work in flight: a busy actor, a full mailbox, askers
/// and senders waiting on it, death watchers and a supervised child. Every
/// waiting call resolves promptly, with `Closed`, and later calls fail at once.
#[test]
fn shutdown_leaves_no_call_hanging() {
    let rt = Runtime::with_arbiters(2).unwrap();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let busy = rt
        .build(move || {
            Some(Worker {
                gate: g.clone(),
                seen: vec![],
            })
        })
        .mailbox(2)
        .spawn();
    let sup = SupervisorSpec::new("sup")
        .child(ChildSpec::new("w", || Worker {
            gate: Arc::new(Semaphore::new(0)),
            seen: vec![],
        }))
        .spawn(&rt);
    let handle = rt.handle();
    let tasks = client.block_on(async {
        let mut tasks = Vec::new();
        // The handler blocks on the gate; the mailbox fills; more wait for room.
        for n in 0..6 {
            let busy = busy.clone();
            tasks.push(tokio::spawn(async move {
                match busy.ask(Work(n)).timeout(Duration::from_secs(3600)).await {
                    Err(AskError::Closed) => "closed",
                    other => panic!("ask {n}: {other:?}"),
                }
            }));
        }
        for n in 10..14 {
            let busy = busy.clone();
            tasks.push(tokio::spawn(async move {
                match busy.send(Work(n)).await {
                    Err(_) => "closed",
                    Ok(()) => "queued",
                }
            }));
        }
        let watched = busy.any();
        tasks.push(tokio::spawn(async move {
            let _ = watched.terminated().await;
            "terminated"
        }));
        let s = sup.clone();
        tasks.push(tokio::spawn(async move {
            let _ = s.terminated().await;
            "terminated"
        }));
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            h.shut_down().await;
            "shut down"
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tasks
    });
    assert!(!handle.is_shut_down());
    rt.shutdown();
    assert!(handle.is_shut_down());
    client.block_on(async {
        for task in tasks {
            let outcome = tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("a call was left hanging after shutdown")
                .unwrap();
            assert_ne!(outcome, "", "{outcome}");
        }
        // Later calls fail at once.
        assert!(matches!(busy.ask(Work(99)).await, Err(AskError::Closed)));
        assert!(busy.send(Work(99)).await.is_err());
        assert!(matches!(
            busy.try_send(Work(99)),
            Err(TrySendError::Closed(_))
        ));
        let late = tokio::time::timeout(Duration::from_secs(1), busy.terminated()).await;
        assert!(matches!(late, Ok(ExitReason::Stopped)), "{late:?}");
        assert!(busy.any().is_terminated());
        // Spawning on a stopped runtime gives a closed actor, not a hang.
        let fresh = handle.spawn(Worker {
            gate: Arc::new(Semaphore::new(1)),
            seen: vec![],
        });
        assert!(matches!(fresh.ask(Work(1)).await, Err(AskError::Closed)));
        // A hook registered after shutdown runs at once.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let _hook = handle.on_shutdown(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    });
    drop(gate);
}

/// Shutdown hooks run once, when the runtime shuts down; a dropped guard
/// unregisters its hook.
#[test]
fn shutdown_hooks_run_once_unless_unregistered() {
    let rt = Runtime::with_arbiters(1).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let (a, b) = (ran.clone(), ran.clone());
    let kept = rt.on_shutdown(move || {
        a.fetch_add(1, Ordering::SeqCst);
    });
    let dropped = rt.on_shutdown(move || {
        b.fetch_add(10, Ordering::SeqCst);
    });
    drop(dropped);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    drop(rt);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    drop(kept);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// Arms a timer for whatever delay it is given.
struct Timer;
impl Actor for Timer {}

struct Arm(Duration);
impl Message for Arm {
    type Reply = ();
}
impl Handler<Arm> for Timer {
    async fn handle(&mut self, Arm(d): Arm, ctx: &mut Context<Self>) -> Result<(), Failure> {
        ctx.notify_later(Ping, d);
        Ok(())
    }
}

struct Ping;
impl Message for Ping {
    type Reply = &'static str;
}
impl Handler<Ping> for Timer {
    async fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> Result<&'static str, Failure> {
        Ok("pong")
    }
}

/// `Duration::MAX` means "never" wherever a duration is taken: no overflow
/// panic in the caller or the actor. (`notify_later` used to add it to an
/// `Instant` and panic.)
#[tokio::test(start_paused = true)]
async fn any_duration_works_even_the_longest() {
    local(async {
        let timer = RuntimeHandle::local().spawn(Timer);
        timer
            .ask(Arm(Duration::MAX))
            .timeout(Duration::MAX)
            .await
            .unwrap();
        assert_eq!(
            timer.ask(Ping).timeout(Duration::MAX).await.unwrap(),
            "pong"
        );
        assert_eq!(timer.stats().failures, 0);
        let never = postbox::clock::deadline(Duration::MAX);
        assert!(never > tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 10));
    })
    .await;
}

/// Stops when told; answers knocks until then.
struct Quitter;
impl Actor for Quitter {}

struct Quit;
impl Message for Quit {
    type Reply = ();
}
impl Handler<Quit> for Quitter {
    async fn handle(&mut self, _: Quit, ctx: &mut Context<Self>) -> Result<(), Failure> {
        ctx.stop();
        Ok(())
    }
}

struct Knock;
impl Message for Knock {
    type Reply = ();
}
impl Handler<Knock> for Quitter {
    async fn handle(&mut self, _: Knock, _: &mut Context<Self>) -> Result<(), Failure> {
        Ok(())
    }
}

/// An ask that takes its mailbox slot just as the actor stops: the actor
/// closes its mailbox and drops what is queued, but a slot reserved before
/// the close can still deliver the request afterwards, into a mailbox that
/// nobody reads. The actor waits for such late requests before it ends, so
/// the asker gets `Closed` instead of waiting forever. (A consumer's cancel
/// hung this way, about once in a thousand runs of a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_racing_the_actor_stopping_always_gets_an_answer() {
    let rt = Runtime::new().unwrap();
    for round in 0..20_000 {
        let addr = rt.handle().build(|| Some(Quitter)).spawn();
        addr.try_send(Quit).unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(10), addr.ask(Knock)).await;
        assert!(
            matches!(asked, Ok(Ok(())) | Ok(Err(AskError::Closed))),
            "round {round}: {asked:?}"
        );
    }
}
