//! Task actors (`TaskActor`, `spawn_task`): actors that run as tasks of the
//! caller's tokio runtime. The same contract as arbiter actors: a bounded
//! mailbox that pushes back, asks with deadlines whose abandoned requests
//! are skipped, one handler at a time, panics contained, restarts that keep
//! the mailbox, and no caller left hanging when the actor or its runtime
//! ends.

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postbox::{
    AskError, ExitReason, Failure, FailureKind, Message, Restart, RestartStrategy, TaskActor,
    TaskAddr, TaskBuilder, TaskContext, TaskHandler, TrySendError, spawn_task,
};
use tokio::sync::Semaphore;

/// Records what it handles; each `Work` first waits for a permit of `gate`.
struct Worker {
    gate: Arc<Semaphore>,
    seen: Vec<u32>,
    started: Arc<AtomicUsize>,
}

impl TaskActor for Worker {
    async fn started(&mut self, _: &mut TaskContext<Self>) -> Result<(), Failure> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Work(u32);
impl Message for Work {
    type Reply = u32;
}
impl TaskHandler<Work> for Worker {
    async fn handle(&mut self, Work(n): Work, _: &mut TaskContext<Self>) -> Result<u32, Failure> {
        self.gate.acquire().await.map_err(Failure::from)?.forget();
        self.seen.push(n);
        Ok(n)
    }
}

struct Seen;
impl Message for Seen {
    type Reply = Vec<u32>;
}
impl TaskHandler<Seen> for Worker {
    async fn handle(&mut self, _: Seen, _: &mut TaskContext<Self>) -> Result<Vec<u32>, Failure> {
        Ok(self.seen.clone())
    }
}

/// Panics when it handles `n == 13`.
struct Crash(u32);
impl Message for Crash {
    type Reply = u32;
}
impl TaskHandler<Crash> for Worker {
    async fn handle(&mut self, Crash(n): Crash, _: &mut TaskContext<Self>) -> Result<u32, Failure> {
        assert_ne!(n, 13, "thirteen");
        self.seen.push(n);
        Ok(n)
    }
}

fn worker(gate: &Arc<Semaphore>, started: &Arc<AtomicUsize>) -> TaskBuilder<Worker> {
    let (gate, started) = (gate.clone(), started.clone());
    TaskBuilder::new(move || {
        Some(Worker {
            gate: gate.clone(),
            seen: Vec::new(),
            started: started.clone(),
        })
    })
}

fn open_gate() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_from_many_tasks_of_the_runtime_are_each_answered_once_in_each_senders_order() {
    let started = Arc::default();
    let addr = worker(&open_gate(), &started).mailbox(16).spawn();
    let mut askers = Vec::new();
    for t in 0..8u32 {
        let addr = addr.clone();
        askers.push(tokio::spawn(async move {
            for i in 0..500u32 {
                let n = t * 1_000 + i;
                assert_eq!(addr.ask(Work(n)).await.unwrap(), n);
            }
        }));
    }
    for asker in askers {
        asker.await.unwrap();
    }
    let seen = addr.ask(Seen).await.unwrap();
    assert_eq!(seen.len(), 4_000, "each handled once");
    for t in 0..8u32 {
        let mine: Vec<u32> = seen.iter().copied().filter(|n| n / 1_000 == t).collect();
        assert_eq!(mine, (0..500).map(|i| t * 1_000 + i).collect::<Vec<_>>());
    }
    // A message counts as handled once its handler returned, just after its
    // reply went out: every `Work` is counted by now, the `Seen` maybe not.
    let handled = addr.stats().handled;
    assert!((4_000..=4_001).contains(&handled), "{handled}");
    assert_eq!(started.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_mailbox_makes_send_wait_and_try_send_fail_with_the_message() {
    let gate = Arc::new(Semaphore::new(0));
    let addr = worker(&gate, &Arc::default()).mailbox(2).spawn();
    // 1 is taken by the (blocked) handler, 2 and 3 fill the mailbox.
    addr.send(Work(1)).await.unwrap();
    tokio::task::yield_now().await;
    addr.send(Work(2)).await.unwrap();
    addr.send(Work(3)).await.unwrap();
    match addr.try_send(Work(4)) {
        Err(TrySendError::Full(Work(4))) => {}
        other => panic!("expected Full(4), got {:?}", other.map_err(|e| e.is_full())),
    }
    // A send waits while the mailbox is full...
    let waiting = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.send(Work(4)).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!waiting.is_finished(), "send waits for room");
    // ...and goes through once the actor makes room.
    gate.add_permits(10);
    assert!(waiting.await.unwrap());
    assert_eq!(addr.ask(Seen).await.unwrap(), [1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn an_ask_that_times_out_is_skipped_not_handled() {
    let gate = Arc::new(Semaphore::new(0));
    let addr = worker(&gate, &Arc::default()).spawn();
    addr.send(Work(1)).await.unwrap();
    let late = addr.ask(Work(2)).timeout(Duration::from_millis(100)).await;
    assert!(matches!(late, Err(AskError::Timeout(_))), "{late:?}");
    gate.add_permits(10);
    assert_eq!(
        addr.ask(Seen).await.unwrap(),
        [1],
        "the abandoned request is not run"
    );
    assert_eq!(addr.stats().skipped_requests, 1);
}

#[tokio::test(start_paused = true)]
async fn a_supervised_task_actor_restarts_fresh_and_keeps_its_mailbox() {
    let started = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let addr = worker(&gate, &started)
        .supervise(RestartStrategy::new(Restart::Permanent))
        .spawn();
    addr.send(Work(1)).await.unwrap();
    // Queued behind the blocked handler: the crash, then two more.
    let crash = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(Crash(13)).await })
    };
    tokio::task::yield_now().await;
    addr.send(Crash(2)).await.unwrap();
    let after = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(Crash(3)).await })
    };
    tokio::task::yield_now().await;
    gate.add_permits(10);
    match crash.await.unwrap() {
        Err(AskError::Failed(failure)) => assert_eq!(failure.kind(), FailureKind::Panic),
        other => panic!("the crashing ask gets the failure, not {other:?}"),
    }
    assert_eq!(after.await.unwrap().unwrap(), 3);
    // Fresh state: the first incarnation's 1 is gone; what was queued is not.
    assert_eq!(addr.ask(Seen).await.unwrap(), [2, 3]);
    let stats = addr.stats();
    assert_eq!(
        (stats.failures, stats.restarts, stats.incarnation),
        (1, 1, 2)
    );
    assert_eq!(started.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unsupervised_task_actor_that_panics_ends_and_closes_its_mailbox() {
    let addr = worker(&open_gate(), &Arc::default()).spawn();
    let crashed = addr.ask(Crash(13)).await;
    assert!(matches!(crashed, Err(AskError::Failed(_))), "{crashed:?}");
    match addr.terminated().await {
        ExitReason::Failed(failure) => assert_eq!(failure.kind(), FailureKind::Panic),
        other => panic!("{other:?}"),
    }
    assert!(addr.is_closed());
    assert!(matches!(addr.ask(Seen).await, Err(AskError::Closed)));
    assert!(matches!(
        addr.try_send(Work(1)),
        Err(TrySendError::Closed(Work(1)))
    ));
}

#[tokio::test(start_paused = true)]
async fn stop_ends_it_for_good_and_queued_asks_get_closed() {
    let gate = Arc::new(Semaphore::new(0));
    let addr = worker(&gate, &Arc::default())
        .supervise(RestartStrategy::new(Restart::Permanent))
        .spawn();
    addr.send(Work(1)).await.unwrap();
    let queued = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(Work(2)).await })
    };
    tokio::task::yield_now().await;
    addr.stop();
    gate.add_permits(10);
    assert!(matches!(addr.terminated().await, ExitReason::Stopped));
    assert!(matches!(queued.await.unwrap(), Err(AskError::Closed)));
    assert!(matches!(addr.ask(Seen).await, Err(AskError::Closed)));
}

#[test]
fn spawned_outside_a_runtime_it_is_closed_and_nothing_hangs() {
    let addr = spawn_task(Worker {
        gate: open_gate(),
        seen: Vec::new(),
        started: Arc::default(),
    });
    assert!(addr.is_closed());
    assert!(addr.any().is_terminated());
    assert!(matches!(
        addr.try_send(Work(1)),
        Err(TrySendError::Closed(_))
    ));
}

#[test]
fn when_its_runtime_shuts_down_the_actor_ends_and_its_watchers_fire() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let addr: TaskAddr<Worker> =
        rt.block_on(async { worker(&open_gate(), &Arc::default()).spawn() });
    let exits = Arc::new(AtomicUsize::new(0));
    let seen = exits.clone();
    addr.any().on_exit(Some(u64::MAX), move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(rt.block_on(addr.ask(Work(7)).into_future()).unwrap(), 7);
    drop(rt);
    assert!(addr.any().is_terminated());
    assert_eq!(exits.load(Ordering::SeqCst), 1);
    assert!(addr.is_closed());
}

/// Counts ticks sent to itself with `notify_later`; its spawned task runs
/// until the incarnation ends.
struct Ticker {
    ticks: u32,
    alive: Arc<AtomicUsize>,
}

impl TaskActor for Ticker {
    async fn started(&mut self, ctx: &mut TaskContext<Self>) -> Result<(), Failure> {
        ctx.notify_later(Tick, Duration::from_secs(1));
        let alive = self.alive.clone();
        ctx.spawn(async move {
            alive.fetch_add(1, Ordering::SeqCst);
            struct Down(Arc<AtomicUsize>);
            impl Drop for Down {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _down = Down(alive);
            std::future::pending::<()>().await;
        });
        Ok(())
    }
}

struct Tick;
impl Message for Tick {
    type Reply = ();
}
impl TaskHandler<Tick> for Ticker {
    async fn handle(&mut self, _: Tick, ctx: &mut TaskContext<Self>) -> Result<(), Failure> {
        self.ticks += 1;
        if self.ticks == 3 {
            ctx.stop();
        } else {
            ctx.notify_later(Tick, Duration::from_secs(1));
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn notify_later_follows_the_clock_and_tasks_end_with_the_incarnation() {
    let alive = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let addr = spawn_task(Ticker {
        ticks: 0,
        alive: alive.clone(),
    });
    tokio::task::yield_now().await;
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    assert!(matches!(addr.terminated().await, ExitReason::Normal));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(3),
        "three ticks a second apart"
    );
    tokio::task::yield_now().await;
    assert_eq!(alive.load(Ordering::SeqCst), 0, "its task was aborted");
    assert_eq!(addr.stats().handled, 3);
}

#[tokio::test(start_paused = true)]
async fn a_recipient_hides_that_it_is_a_task_actor() {
    let addr = worker(&open_gate(), &Arc::default()).spawn();
    let recipient = addr.recipient::<Work>();
    recipient.send(Work(1)).await.unwrap();
    assert_eq!(
        recipient
            .ask(Work(2), Some(Duration::from_secs(1)))
            .await
            .unwrap(),
        2
    );
    assert_eq!(recipient.any().id(), addr.id());
    assert_eq!(addr.ask(Seen).await.unwrap(), [1, 2]);
}

/// The race of the arbiter cell's hang fix, on task actors: an ask that
/// reserved its slot just before the actor stopped gets an answer.
struct Quitter;
impl TaskActor for Quitter {}
struct Quit;
impl Message for Quit {
    type Reply = ();
}
impl TaskHandler<Quit> for Quitter {
    async fn handle(&mut self, _: Quit, ctx: &mut TaskContext<Self>) -> Result<(), Failure> {
        ctx.stop();
        Ok(())
    }
}
struct Knock;
impl Message for Knock {
    type Reply = ();
}
impl TaskHandler<Knock> for Quitter {
    async fn handle(&mut self, _: Knock, _: &mut TaskContext<Self>) -> Result<(), Failure> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_racing_the_task_actor_stopping_always_gets_an_answer() {
    for round in 0..5_000 {
        let addr = spawn_task(Quitter);
        addr.try_send(Quit).unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(10), addr.ask(Knock)).await;
        assert!(
            matches!(asked, Ok(Ok(())) | Ok(Err(AskError::Closed))),
            "round {round}: {asked:?}"
        );
    }
}

/// Records the deaths it is told of.
struct Watcher {
    deaths: Vec<(&'static str, String)>,
}
impl TaskActor for Watcher {}

struct Died(&'static str, ExitReason);
impl Message for Died {
    type Reply = ();
}
impl TaskHandler<Died> for Watcher {
    async fn handle(
        &mut self,
        Died(who, why): Died,
        _: &mut TaskContext<Self>,
    ) -> Result<(), Failure> {
        let why = match why {
            ExitReason::Failed(failure) => format!("failed: {:?}", failure.kind()),
            other => format!("{other:?}"),
        };
        self.deaths.push((who, why));
        Ok(())
    }
}

/// Asks the watcher to watch `target`.
struct Watch(&'static str, postbox::AnyAddr);
impl Message for Watch {
    type Reply = ();
}
impl TaskHandler<Watch> for Watcher {
    async fn handle(
        &mut self,
        Watch(who, target): Watch,
        ctx: &mut TaskContext<Self>,
    ) -> Result<(), Failure> {
        ctx.watch(&target, None, move |why| Died(who, why));
        Ok(())
    }
}

struct Deaths;
impl Message for Deaths {
    type Reply = Vec<(&'static str, String)>;
}
impl TaskHandler<Deaths> for Watcher {
    async fn handle(
        &mut self,
        _: Deaths,
        _: &mut TaskContext<Self>,
    ) -> Result<Vec<(&'static str, String)>, Failure> {
        Ok(self.deaths.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_actor_is_told_when_a_watched_actor_ends() {
    let watcher = spawn_task(Watcher { deaths: Vec::new() });
    let crasher = worker(&open_gate(), &Arc::default()).spawn();
    let stopped = worker(&open_gate(), &Arc::default()).spawn();
    watcher.ask(Watch("crasher", crasher.any())).await.unwrap();
    watcher.ask(Watch("stopped", stopped.any())).await.unwrap();
    assert!(crasher.ask(Crash(13)).await.is_err());
    crasher.terminated().await;
    stopped.stop();
    stopped.terminated().await;
    // Already ended: told at once.
    watcher.ask(Watch("late", crasher.any())).await.unwrap();
    tokio::task::yield_now().await;
    let mut deaths = watcher.ask(Deaths).await.unwrap();
    deaths.sort();
    assert_eq!(
        deaths,
        [
            ("crasher", "failed: Panic".to_string()),
            ("late", "failed: Panic".to_string()),
            ("stopped", "Stopped".to_string()),
        ]
    );
}

/// An arbiter actor that counts in its state and panics on request, a
/// sibling of task actors under one supervisor.
#[derive(Default)]
struct Arbitered {
    n: u32,
}
impl postbox::Actor for Arbitered {}
impl postbox::Handler<Crash> for Arbitered {
    async fn handle(
        &mut self,
        Crash(n): Crash,
        _: &mut postbox::Context<Self>,
    ) -> Result<u32, Failure> {
        assert_ne!(n, 13, "thirteen");
        self.n += 1;
        Ok(self.n)
    }
}

fn plain_worker() -> Worker {
    Worker {
        gate: open_gate(),
        seen: Vec::new(),
        started: Arc::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_restarts_a_crashed_task_child_and_its_address_keeps_working() {
    postbox::testkit::local(async {
        let here = tokio::runtime::Handle::current();
        let sup = postbox::SupervisorSpec::new("tasks")
            .task_child(postbox::TaskChildSpec::new("worker", &here, plain_worker))
            .spawn(&postbox::RuntimeHandle::local());
        let worker = sup.task_child::<Worker>("worker").await.unwrap();
        assert_eq!(worker.ask(Work(1)).await.unwrap(), 1);
        assert!(matches!(
            worker.ask(Crash(13)).await,
            Err(AskError::Failed(_))
        ));
        // Restarted in place by the supervisor: same address, fresh state.
        assert_eq!(worker.ask(Work(2)).await.unwrap(), 2);
        assert_eq!(worker.ask(Seen).await.unwrap(), [2]);
        let stats = worker.stats();
        assert_eq!(
            (stats.failures, stats.restarts, stats.incarnation),
            (1, 1, 2)
        );
        // Asked as the wrong kind or type, the supervisor says so.
        assert!(matches!(
            sup.child::<Arbitered>("worker").await,
            Err(postbox::SupervisorError::WrongType(_))
        ));
        assert!(matches!(
            sup.task_child::<Quitter>("worker").await,
            Err(postbox::SupervisorError::WrongType(_))
        ));
        sup.stop();
        sup.terminated().await;
        worker.terminated().await;
        assert!(
            worker.is_closed(),
            "a supervisor's stop ends its task children"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn one_for_all_restarts_task_children_when_an_arbiter_sibling_fails() {
    postbox::testkit::local(async {
        let here = tokio::runtime::Handle::current();
        let sup = postbox::SupervisorSpec::new("mixed")
            .strategy(postbox::Strategy::OneForAll)
            .task_child(postbox::TaskChildSpec::new("task", &here, plain_worker))
            .child(postbox::ChildSpec::new("arbiter", Arbitered::default))
            .spawn(&postbox::RuntimeHandle::local());
        let task = sup.task_child::<Worker>("task").await.unwrap();
        let arbiter = sup.child::<Arbitered>("arbiter").await.unwrap();
        assert_eq!(task.ask(Work(7)).await.unwrap(), 7);
        assert_eq!(arbiter.ask(Crash(1)).await.unwrap(), 1);
        // The arbiter child fails: the healthy task child restarts too.
        assert!(arbiter.ask(Crash(13)).await.is_err());
        assert_eq!(arbiter.ask(Crash(2)).await.unwrap(), 1, "fresh state");
        assert_eq!(
            task.ask(Seen).await.unwrap(),
            Vec::<u32>::new(),
            "fresh state"
        );
        let stats = task.stats();
        assert_eq!((stats.failures, stats.restarts), (0, 1));
        let names: Vec<String> = sup
            .children()
            .await
            .unwrap()
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(names, ["task", "arbiter"]);
        // Started at run time too.
        let late = sup
            .start_task_child(postbox::TaskChildSpec::new("late", &here, plain_worker))
            .await
            .unwrap();
        assert_eq!(late.ask(Work(3)).await.unwrap(), 3);
    })
    .await;
}
