//! Supervision trees: a [`Supervisor`] owns children built from factories and
//! rebuilds them, with fresh state, when they fail.
//!
//! What a supervisor decides, per child exit:
//! - **Restart policy** ([`Restart`]): `Permanent` children are always restarted,
//!   `Transient` ones only after a failure, `Temporary` ones never (and they are
//!   not restarted when a sibling's failure restarts the others either).
//! - **Strategy** ([`Strategy`]): restart only the failed child (one-for-one), all
//!   children (one-for-all), or it and those started after it (rest-for-one).
//! - **Intensity** ([`SupervisorSpec::intensity`]): more than `max` restarts
//!   within `window` and the supervisor gives up: it stops its children and fails
//!   itself with [`FailureKind::Escalation`](crate::FailureKind), which its own
//!   parent handles like any child failure.
//! - **Backoff** ([`Backoff`]): the delay before a restart grows with each
//!   consecutive failure of the same child.
//!
//! A restarted child keeps its mailbox and address: messages queued while it was
//! down are handled by the new incarnation. Children of a supervisor that is
//! itself restarted are started anew (new addresses).
//!
//! ```
//! use postbox::{Actor, ChildSpec, Context, Failure, Handler, Message, Restart, Runtime, SupervisorSpec};
//!
//! #[derive(Default)]
//! struct Worker { seen: u32 }
//! impl Actor for Worker {}
//! struct Job(u32);
//! impl Message for Job { type Reply = u32; }
//! impl Handler<Job> for Worker {
//!     async fn handle(&mut self, job: Job, _: &mut Context<Self>) -> Result<u32, Failure> {
//!         if job.0 == 0 { panic!("bad job"); }
//!         self.seen += 1;
//!         Ok(self.seen)
//!     }
//! }
//!
//! # futures::executor::block_on(async {
//! let rt = Runtime::with_arbiters(1).unwrap();
//! let sup = SupervisorSpec::new("workers")
//!     .child(ChildSpec::new("w", Worker::default).restart(Restart::Permanent))
//!     .spawn(&rt);
//! let w = sup.child::<Worker>("w").await.unwrap();
//! assert_eq!(w.ask(Job(1)).await.unwrap(), 1);
//! assert!(w.ask(Job(0)).await.is_err());        // panics: contained, restarted
//! assert_eq!(w.ask(Job(1)).await.unwrap(), 1);  // fresh state, same address
//! # });
//! ```

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::actor::{Actor, Handler, Message};
use crate::addr::{Addr, AnyAddr, Control, WeakAddr};
use crate::cell::Parent;
use crate::context::Context;
use crate::failure::{ExitReason, Failure, FailureKind};
use crate::runtime::{DEFAULT_MAILBOX, RuntimeHandle};
use crate::task::{TaskActor, TaskAddr, TaskBuilder};

/// When a child is restarted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Restart {
    /// Always: after a failure, a normal stop, or an external stop.
    #[default]
    Permanent,
    /// Only after a failure.
    Transient,
    /// Never.
    Temporary,
}

/// Which children restart when one fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Only the child that exited.
    #[default]
    OneForOne,
    /// Every child.
    OneForAll,
    /// The child that exited and every child started after it.
    RestForOne,
}

/// Delay before a restart: `min * 2^(n-1)` for the n-th consecutive restart of a
/// child, capped at `max`; the first [`immediate`](Backoff::immediate) ones
/// have none. A child that ran for a whole intensity window (after its
/// restart) without failing starts again from the beginning.
///
/// ```
/// use std::time::Duration;
/// use postbox::Backoff;
/// let b = Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1)).immediate(1);
/// assert_eq!(b.delay(1), Duration::ZERO); // a one-off crash restarts at once
/// assert_eq!(b.delay(2), Duration::from_millis(10));
/// assert_eq!(b.delay(3), Duration::from_millis(20));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    immediate: u32,
}

impl Backoff {
    /// No delay.
    pub const NONE: Backoff = Backoff {
        min: Duration::ZERO,
        max: Duration::ZERO,
        immediate: 0,
    };

    /// Exponential backoff from `min` to `max`.
    pub fn exponential(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            immediate: 0,
        }
    }

    /// The first `n` consecutive restarts happen at once; the backoff starts
    /// after them.
    pub fn immediate(mut self, n: u32) -> Backoff {
        self.immediate = n;
        self
    }

    /// The delay before the `n`-th consecutive restart (from 1).
    pub fn delay(&self, n: u32) -> Duration {
        if n <= self.immediate {
            return Duration::ZERO;
        }
        let n = n - self.immediate;
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// Errors of the supervisor's API.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No child has that name.
    #[error("no child named {0:?}")]
    NoSuchChild(String),
    /// A child with that name exists already.
    #[error("a child named {0:?} exists already")]
    DuplicateChild(String),
    /// The child exists but is another actor type.
    #[error("child {0:?} is not of the requested actor type")]
    WrongType(String),
    /// The supervisor has stopped.
    #[error("the supervisor has stopped")]
    Stopped,
}

/// How to build and restart one child.
pub struct ChildSpec<A: Actor> {
    name: Arc<str>,
    factory: Arc<dyn Fn() -> A + Send + Sync>,
    restart: Restart,
    mailbox: usize,
    arbiter: Option<usize>,
}

impl<A: Actor> Clone for ChildSpec<A> {
    fn clone(&self) -> Self {
        ChildSpec {
            name: self.name.clone(),
            factory: self.factory.clone(),
            restart: self.restart,
            mailbox: self.mailbox,
            arbiter: self.arbiter,
        }
    }
}

impl<A: Actor> fmt::Debug for ChildSpec<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("mailbox", &self.mailbox)
            .finish()
    }
}

impl<A: Actor> ChildSpec<A> {
    /// A permanent child named `name`, built by `factory` at each (re)start.
    pub fn new(name: impl Into<Arc<str>>, factory: impl Fn() -> A + Send + Sync + 'static) -> Self {
        ChildSpec {
            name: name.into(),
            factory: Arc::new(factory),
            restart: Restart::Permanent,
            mailbox: DEFAULT_MAILBOX,
            arbiter: None,
        }
    }

    /// The restart policy.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// The mailbox capacity.
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = capacity.max(1);
        self
    }

    /// Pins the child to an arbiter.
    pub fn arbiter(mut self, i: usize) -> Self {
        self.arbiter = Some(i);
        self
    }
}

impl ChildSpec<SupervisorActor> {
    /// A nested supervisor as a child: its escalation is this supervisor's child failure.
    pub fn supervisor(spec: SupervisorSpec) -> Self {
        let name = spec.name.clone();
        ChildSpec::new(name, move || SupervisorActor::new(spec.clone()))
    }
}

/// A running child: its untyped handle, and a way to hand out its typed address
/// (holding one keeps the child's mailbox open while the supervisor lives).
struct Started {
    any: AnyAddr,
    typed: Box<dyn Fn() -> Box<dyn Any + Send> + Send>,
}

trait ErasedSpec: Send + Sync {
    fn name(&self) -> &Arc<str>;
    fn restart(&self) -> Restart;
    fn start(&self, rt: &RuntimeHandle, parent: WeakAddr<SupervisorActor>, key: u64) -> Started;
}

impl<A: Actor> ErasedSpec for ChildSpec<A> {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn restart(&self) -> Restart {
        self.restart
    }

    fn start(&self, rt: &RuntimeHandle, parent: WeakAddr<SupervisorActor>, key: u64) -> Started {
        let factory = self.factory.clone();
        let mut builder = rt
            .build(move || Some(factory()))
            .mailbox(self.mailbox)
            .name(self.name.clone())
            .parent(report_to(parent, key));
        if let Some(i) = self.arbiter {
            builder = builder.arbiter(i);
        }
        let addr = builder.spawn();
        Started {
            any: addr.any(),
            typed: Box::new(move || Box::new(addr.clone())),
        }
    }
}

/// How a child tells its supervisor that an incarnation ended: false if the
/// supervisor is gone (the child then stops for good).
fn report_to(parent: WeakAddr<SupervisorActor>, key: u64) -> Parent {
    Box::new(move |incarnation, reason| {
        let parent = parent.clone();
        Box::pin(async move {
            match parent.upgrade() {
                Some(sup) => sup
                    .send(ChildExited {
                        key,
                        incarnation,
                        reason,
                    })
                    .await
                    .is_ok(),
                None => false,
            }
        })
    })
}

/// How to build and restart one [task actor](crate::TaskActor) child: as
/// [`ChildSpec`], and the tokio runtime it runs on (a supervisor lives on an
/// arbiter; its task children live where their askers are).
///
/// ```
/// use postbox::{Restart, Runtime, Strategy, SupervisorSpec, TaskActor, TaskChildSpec};
/// # #[derive(Default)] struct Cache;
/// # impl TaskActor for Cache {}
/// # #[tokio::main] async fn main() {
/// let rt = Runtime::with_arbiters(1).unwrap();
/// let here = tokio::runtime::Handle::current();
/// let sup = SupervisorSpec::new("caches")
///     .strategy(Strategy::OneForAll)
///     .task_child(TaskChildSpec::new("users", &here, Cache::default))
///     .task_child(TaskChildSpec::new("orders", &here, Cache::default).restart(Restart::Transient))
///     .spawn(&rt);
/// let users = sup.task_child::<Cache>("users").await.unwrap();
/// assert!(!users.is_closed());
/// # }
/// ```
pub struct TaskChildSpec<A: TaskActor> {
    name: Arc<str>,
    factory: Arc<dyn Fn() -> A + Send + Sync>,
    restart: Restart,
    mailbox: usize,
    runtime: Handle,
}

impl<A: TaskActor> Clone for TaskChildSpec<A> {
    fn clone(&self) -> Self {
        TaskChildSpec {
            name: self.name.clone(),
            factory: self.factory.clone(),
            restart: self.restart,
            mailbox: self.mailbox,
            runtime: self.runtime.clone(),
        }
    }
}

impl<A: TaskActor> fmt::Debug for TaskChildSpec<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .field("mailbox", &self.mailbox)
            .finish()
    }
}

impl<A: TaskActor> TaskChildSpec<A> {
    /// A permanent child named `name`, a task of `runtime`, built by
    /// `factory` at each (re)start.
    pub fn new(
        name: impl Into<Arc<str>>,
        runtime: &Handle,
        factory: impl Fn() -> A + Send + Sync + 'static,
    ) -> Self {
        TaskChildSpec {
            name: name.into(),
            factory: Arc::new(factory),
            restart: Restart::Permanent,
            mailbox: DEFAULT_MAILBOX,
            runtime: runtime.clone(),
        }
    }

    /// The restart policy.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// The mailbox capacity.
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = capacity.max(1);
        self
    }
}

impl<A: TaskActor> ErasedSpec for TaskChildSpec<A> {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn restart(&self) -> Restart {
        self.restart
    }

    fn start(&self, _: &RuntimeHandle, parent: WeakAddr<SupervisorActor>, key: u64) -> Started {
        let factory = self.factory.clone();
        let addr = TaskBuilder::new(move || Some(factory()))
            .mailbox(self.mailbox)
            .name(self.name.clone())
            .parent(report_to(parent, key))
            .spawn_on(&self.runtime);
        Started {
            any: addr.any(),
            typed: Box::new(move || Box::new(addr.clone())),
        }
    }
}

/// How an actor restarts itself when it fails, with no supervisor actor of its
/// own (as Akka Typed's `Behaviors.supervise` wraps one actor): the policy of
/// a [`ChildSpec`] and the limits of a [`SupervisorSpec`], for one actor. Set
/// it with [`Builder::supervise`](crate::Builder::supervise).
///
/// Past the restart limit the actor stops for good with an
/// [`Escalation`](FailureKind::Escalation) failure; [`Addr::stop`] stops it
/// for good too, even while it waits out a backoff.
///
/// ```
/// use std::time::Duration;
/// use postbox::{Actor, Backoff, Restart, RestartStrategy, RuntimeHandle};
/// # struct Worker; impl Actor for Worker {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # let rt = postbox::Runtime::with_arbiters(1).unwrap();
/// let strategy = RestartStrategy::new(Restart::Transient)
///     .intensity(10, Duration::from_secs(60))
///     .backoff(Backoff::exponential(Duration::from_millis(10), Duration::from_secs(5)).immediate(1));
/// let worker = rt.build(|| Some(Worker)).supervise(strategy).spawn();
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartStrategy {
    restart: Restart,
    max_restarts: usize,
    window: Duration,
    backoff: Backoff,
}

impl RestartStrategy {
    /// Restarts by `restart`, at most 5 times in 10 seconds, with no backoff
    /// (the defaults of [`SupervisorSpec::new`]).
    pub fn new(restart: Restart) -> Self {
        RestartStrategy {
            restart,
            max_restarts: 5,
            window: Duration::from_secs(10),
            backoff: Backoff::NONE,
        }
    }

    /// At most `max_restarts` restarts within `window`; one more and the
    /// actor stops for good.
    pub fn intensity(mut self, max_restarts: usize, window: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.window = window;
        self
    }

    /// Delay between restarts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// Whether `restart` restarts after an incarnation ended with `reason`.
fn restarts_after(restart: Restart, reason: &ExitReason) -> bool {
    match restart {
        Restart::Permanent => true,
        Restart::Transient => reason.is_failure(),
        Restart::Temporary => false,
    }
}

/// The restarts counted against an intensity limit: those within the window.
#[derive(Debug, Default)]
struct RestartLimit {
    restarts: VecDeque<Instant>,
}

impl RestartLimit {
    /// Counts a restart; false when it would pass `max` within `window`.
    fn allow(&mut self, max: usize, window: Duration) -> bool {
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() >= max {
            return false;
        }
        self.restarts.push_back(now);
        true
    }
}

/// Consecutive restarts of one actor, for its backoff.
#[derive(Debug, Default)]
struct BackoffClock {
    consecutive: u32,
    last_restart: Option<Instant>,
}

impl BackoffClock {
    /// The delay before the next restart.
    fn next(&mut self, backoff: &Backoff, window: Duration) -> Duration {
        let now = Instant::now();
        if self
            .last_restart
            .is_some_and(|t| now.duration_since(t) >= window)
        {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        let delay = backoff.delay(self.consecutive);
        // When the new incarnation starts: one that then runs for a whole
        // window without failing starts again from the smallest delay. (From
        // the failure instead, a backoff longer than the window would reset
        // itself at every crash.)
        self.last_restart = Some(now.checked_add(delay).unwrap_or(now));
        delay
    }
}

/// A self-supervised actor's strategy and restart history, kept by its cell.
#[derive(Debug)]
pub(crate) struct SelfSupervision {
    strategy: RestartStrategy,
    limit: RestartLimit,
    clock: BackoffClock,
}

impl SelfSupervision {
    pub(crate) fn new(strategy: RestartStrategy) -> Self {
        SelfSupervision {
            strategy,
            limit: RestartLimit::default(),
            clock: BackoffClock::default(),
        }
    }

    /// After an incarnation ended with `reason`: `Ok(delay)` to restart after
    /// `delay`, or `Err(final reason)` to stop for good.
    pub(crate) fn decide(&mut self, reason: ExitReason) -> Result<Duration, ExitReason> {
        let s = self.strategy;
        if !restarts_after(s.restart, &reason) {
            return Err(reason);
        }
        if !self.limit.allow(s.max_restarts, s.window) {
            tracing::error!(%reason, max_restarts = s.max_restarts, window = ?s.window, "restart limit passed: the actor gives up");
            return Err(ExitReason::Failed(Failure::with_kind(
                FailureKind::Escalation,
                format!(
                    "{reason}, and the limit of {} restarts in {:?} is passed",
                    s.max_restarts, s.window
                ),
            )));
        }
        let delay = self.clock.next(&s.backoff, s.window);
        tracing::info!(%reason, ?delay, "restarting");
        Ok(delay)
    }
}

/// A supervisor's configuration; [`spawn`](SupervisorSpec::spawn) starts it.
#[derive(Clone)]
pub struct SupervisorSpec {
    name: Arc<str>,
    strategy: Strategy,
    max_restarts: usize,
    window: Duration,
    backoff: Backoff,
    auto_shutdown: bool,
    children: Vec<Arc<dyn ErasedSpec>>,
}

impl fmt::Debug for SupervisorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorSpec")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("max_restarts", &self.max_restarts)
            .field("window", &self.window)
            .field("backoff", &self.backoff)
            .field("auto_shutdown", &self.auto_shutdown)
            .field(
                "children",
                &self
                    .children
                    .iter()
                    .map(|c| c.name().clone())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SupervisorSpec {
    /// A one-for-one supervisor allowing 5 restarts in 10 seconds, no backoff.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy: Strategy::OneForOne,
            max_restarts: 5,
            window: Duration::from_secs(10),
            backoff: Backoff::NONE,
            auto_shutdown: false,
            children: Vec::new(),
        }
    }

    /// The restart strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// At most `max_restarts` restarts within `window`; one more escalates.
    pub fn intensity(mut self, max_restarts: usize, window: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.window = window;
        self
    }

    /// Delay between restarts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Stops the supervisor, normally, once its last child has exited and is
    /// not restarted (OTP's `auto_shutdown`): a supervisor that exists only
    /// to look after one child goes with it, and whoever waits for the
    /// supervisor to terminate learns of it. Off by default. A child removed
    /// with [`Supervisor::terminate_child`] does not count.
    pub fn auto_shutdown(mut self, on: bool) -> Self {
        self.auto_shutdown = on;
        self
    }

    /// Adds a child; children start in the order they are added.
    pub fn child<A: Actor>(mut self, spec: ChildSpec<A>) -> Self {
        self.children.push(Arc::new(spec));
        self
    }

    /// Adds a [task actor](crate::TaskActor) child (started in order with
    /// the others, restarted by the same strategy).
    pub fn task_child<A: TaskActor>(mut self, spec: TaskChildSpec<A>) -> Self {
        self.children.push(Arc::new(spec));
        self
    }

    /// Starts the supervisor (and its children) as a top-level actor.
    pub fn spawn(self, rt: &RuntimeHandle) -> Supervisor {
        let name = self.name.clone();
        let mut spec = Some(self);
        let addr = rt
            .build(move || spec.take().map(SupervisorActor::new))
            .name(name)
            .spawn();
        Supervisor { addr }
    }
}

struct Slot {
    key: u64,
    spec: Arc<dyn ErasedSpec>,
    started: Started,
    incarnation: u64,
    backoff: BackoffClock,
}

/// The supervisor actor. Use it through [`Supervisor`], or nest it with
/// [`ChildSpec::supervisor`].
pub struct SupervisorActor {
    spec: SupervisorSpec,
    children: Vec<Slot>,
    restarts: RestartLimit,
}

impl fmt::Debug for SupervisorActor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorActor")
            .field("spec", &self.spec)
            .field("children", &self.children.len())
            .finish()
    }
}

impl SupervisorActor {
    fn new(spec: SupervisorSpec) -> Self {
        SupervisorActor {
            spec,
            children: Vec::new(),
            restarts: RestartLimit::default(),
        }
    }

    fn start(
        &mut self,
        ctx: &Context<Self>,
        spec: Arc<dyn ErasedSpec>,
    ) -> Result<&Slot, SupervisorError> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        let Some(me) = ctx.addr() else {
            return Err(SupervisorError::Stopped);
        };
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        let started = spec.start(ctx.runtime(), me.downgrade(), key);
        self.children.push(Slot {
            key,
            spec,
            started,
            incarnation: 1,
            backoff: BackoffClock::default(),
        });
        self.children.last().ok_or(SupervisorError::Stopped)
    }

    /// Counts a restart against the intensity; false when the limit is passed.
    fn allow_restart(&mut self) -> bool {
        self.restarts
            .allow(self.spec.max_restarts, self.spec.window)
    }

    fn delay_for(&mut self, i: usize) -> Duration {
        let (backoff, window) = (self.spec.backoff, self.spec.window);
        self.children[i].backoff.next(&backoff, window)
    }

    fn restart_slot(slot: &mut Slot, delay: Duration) {
        slot.started.any.shared.control.send(Control::Restart {
            incarnation: slot.incarnation,
            delay,
        });
        slot.incarnation += 1;
    }

    fn stop_slot(slot: &Slot) {
        slot.started
            .any
            .shared
            .control
            .send(Control::Stop { report: false });
    }
}

impl Actor for SupervisorActor {
    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), Failure> {
        for spec in self.spec.children.clone() {
            self.start(ctx, spec)?;
        }
        Ok(())
    }

    async fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Children stop in reverse start order, each given a moment to finish.
        for slot in self.children.drain(..).rev() {
            Self::stop_slot(&slot);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), slot.started.any.terminated()).await;
        }
    }
}

/// A child's incarnation ended (sent by the child's cell).
struct ChildExited {
    key: u64,
    incarnation: u64,
    reason: ExitReason,
}

impl Message for ChildExited {
    type Reply = ();
}

impl Handler<ChildExited> for SupervisorActor {
    async fn handle(&mut self, msg: ChildExited, ctx: &mut Context<Self>) -> Result<(), Failure> {
        let Some(i) = self.children.iter().position(|s| s.key == msg.key) else {
            return Ok(());
        };
        if msg.incarnation < self.children[i].incarnation {
            return Ok(()); // already restarted by a strategy: stale report
        }
        let restart = restarts_after(self.children[i].spec.restart(), &msg.reason);
        let name = self.children[i].spec.name().clone();
        if !restart {
            let slot = self.children.remove(i);
            Self::stop_slot(&slot);
            if self.spec.auto_shutdown && self.children.is_empty() {
                tracing::debug!(supervisor = %self.spec.name, child = %name, "last child exited: supervisor stops");
                ctx.stop();
            }
            return Ok(());
        }
        if !self.allow_restart() {
            tracing::error!(supervisor = %self.spec.name, child = %name, reason = %msg.reason, "restart intensity exceeded: escalating");
            return Err(Failure::with_kind(
                FailureKind::Escalation,
                format!(
                    "supervisor {:?}: child {:?} {} and the limit of {} restarts in {:?} is passed",
                    self.spec.name, name, msg.reason, self.spec.max_restarts, self.spec.window
                ),
            ));
        }
        let delay = self.delay_for(i);
        tracing::info!(supervisor = %self.spec.name, child = %name, reason = %msg.reason, ?delay, "restarting");
        let range = match self.spec.strategy {
            Strategy::OneForOne => i..i + 1,
            Strategy::OneForAll => 0..self.children.len(),
            Strategy::RestForOne => i..self.children.len(),
        };
        let mut j = range.start;
        let mut end = range.end;
        while j < end {
            if j != i && self.children[j].spec.restart() == Restart::Temporary {
                let slot = self.children.remove(j);
                Self::stop_slot(&slot);
                end -= 1;
                continue;
            }
            Self::restart_slot(&mut self.children[j], delay);
            j += 1;
        }
        Ok(())
    }
}

struct GetChild(Arc<str>);
impl Message for GetChild {
    type Reply = Option<Box<dyn Any + Send>>;
}
impl Handler<GetChild> for SupervisorActor {
    async fn handle(
        &mut self,
        msg: GetChild,
        _: &mut Context<Self>,
    ) -> Result<Option<Box<dyn Any + Send>>, Failure> {
        Ok(self
            .children
            .iter()
            .find(|s| s.spec.name() == &msg.0)
            .map(|s| clone_any(&s.started)))
    }
}

fn clone_any(started: &Started) -> Box<dyn Any + Send> {
    (started.typed)()
}

struct StartChild(Arc<dyn ErasedSpec>);
impl Message for StartChild {
    type Reply = Result<Box<dyn Any + Send>, SupervisorError>;
}
impl Handler<StartChild> for SupervisorActor {
    async fn handle(
        &mut self,
        msg: StartChild,
        ctx: &mut Context<Self>,
    ) -> Result<Result<Box<dyn Any + Send>, SupervisorError>, Failure> {
        if self.children.iter().any(|s| s.spec.name() == msg.0.name()) {
            return Ok(Err(SupervisorError::DuplicateChild(
                msg.0.name().to_string(),
            )));
        }
        self.spec.children.push(msg.0.clone());
        Ok(self.start(ctx, msg.0).map(|slot| clone_any(&slot.started)))
    }
}

struct TerminateChild(Arc<str>);
impl Message for TerminateChild {
    type Reply = Result<(), SupervisorError>;
}
impl Handler<TerminateChild> for SupervisorActor {
    async fn handle(
        &mut self,
        msg: TerminateChild,
        _: &mut Context<Self>,
    ) -> Result<Result<(), SupervisorError>, Failure> {
        let Some(i) = self.children.iter().position(|s| s.spec.name() == &msg.0) else {
            return Ok(Err(SupervisorError::NoSuchChild(msg.0.to_string())));
        };
        let slot = self.children.remove(i);
        self.spec.children.retain(|c| c.name() != &msg.0);
        Self::stop_slot(&slot);
        let _ = slot.started.any.terminated().await;
        Ok(Ok(()))
    }
}

/// What [`Supervisor::children`] reports of one child.
#[derive(Clone, Debug)]
pub struct ChildInfo {
    /// The child's name.
    pub name: Arc<str>,
    /// Its untyped handle.
    pub addr: AnyAddr,
    /// The restart policy.
    pub restart: Restart,
}

struct Children;
impl Message for Children {
    type Reply = Vec<ChildInfo>;
}
impl Handler<Children> for SupervisorActor {
    async fn handle(
        &mut self,
        _: Children,
        _: &mut Context<Self>,
    ) -> Result<Vec<ChildInfo>, Failure> {
        Ok(self
            .children
            .iter()
            .map(|s| ChildInfo {
                name: s.spec.name().clone(),
                addr: s.started.any.clone(),
                restart: s.spec.restart(),
            })
            .collect())
    }
}

/// A handle to a running supervisor.
#[derive(Clone, Debug)]
pub struct Supervisor {
    addr: Addr<SupervisorActor>,
}

impl Supervisor {
    /// Wraps a supervisor's address, e.g. a nested supervisor found with
    /// [`Supervisor::child`].
    pub fn from_addr(addr: Addr<SupervisorActor>) -> Self {
        Supervisor { addr }
    }

    /// The typed address of the child named `name`.
    pub async fn child<A: Actor>(&self, name: &str) -> Result<Addr<A>, SupervisorError> {
        downcast(self.find(name).await?, name)
    }

    /// The address of the task actor child named `name`.
    pub async fn task_child<A: TaskActor>(
        &self,
        name: &str,
    ) -> Result<TaskAddr<A>, SupervisorError> {
        downcast(self.find(name).await?, name)
    }

    /// Starts another task actor child.
    pub async fn start_task_child<A: TaskActor>(
        &self,
        spec: TaskChildSpec<A>,
    ) -> Result<TaskAddr<A>, SupervisorError> {
        let name = spec.name.to_string();
        let started = self
            .addr
            .ask(StartChild(Arc::new(spec)))
            .await
            .map_err(|_| SupervisorError::Stopped)??;
        downcast(started, &name)
    }

    async fn find(&self, name: &str) -> Result<Box<dyn Any + Send>, SupervisorError> {
        self.addr
            .ask(GetChild(Arc::from(name)))
            .await
            .map_err(|_| SupervisorError::Stopped)?
            .ok_or_else(|| SupervisorError::NoSuchChild(name.to_string()))
    }

    /// Starts another child.
    pub async fn start_child<A: Actor>(
        &self,
        spec: ChildSpec<A>,
    ) -> Result<Addr<A>, SupervisorError> {
        let name = spec.name.to_string();
        let started = self
            .addr
            .ask(StartChild(Arc::new(spec)))
            .await
            .map_err(|_| SupervisorError::Stopped)??;
        downcast(started, &name)
    }

    /// Stops a child for good and forgets it.
    pub async fn terminate_child(&self, name: &str) -> Result<(), SupervisorError> {
        self.addr
            .ask(TerminateChild(Arc::from(name)))
            .await
            .map_err(|_| SupervisorError::Stopped)?
    }

    /// The children, in start order.
    pub async fn children(&self) -> Result<Vec<ChildInfo>, SupervisorError> {
        self.addr
            .ask(Children)
            .await
            .map_err(|_| SupervisorError::Stopped)
    }

    /// The supervisor's own address.
    pub fn addr(&self) -> &Addr<SupervisorActor> {
        &self.addr
    }

    /// Stops the supervisor and its children.
    pub fn stop(&self) {
        self.addr.stop();
    }

    /// Resolves when the supervisor has stopped for good; an escalation shows as
    /// `ExitReason::Failed` with [`FailureKind::Escalation`].
    pub async fn terminated(&self) -> ExitReason {
        self.addr.terminated().await
    }
}

/// A child's address, as the type it was started with (`Addr<A>` or
/// `TaskAddr<A>`).
fn downcast<T: Any>(found: Box<dyn Any + Send>, name: &str) -> Result<T, SupervisorError> {
    found
        .downcast::<T>()
        .map(|b| *b)
        .map_err(|_| SupervisorError::WrongType(name.to_string()))
}
