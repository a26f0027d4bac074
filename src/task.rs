//! Task actors: actors that run as tasks of a tokio runtime (the caller's
//! `#[tokio::main]` one, by default) instead of on a [`Runtime`]'s arbiters.
//!
//! An ordinary [`Actor`](crate::Actor) lives on one arbiter thread for its
//! whole life, so neither it nor its handlers' futures need to be `Send`
//! (they may hold an `Rc`). The price is paid by callers on other threads:
//! an ask from a task of a `#[tokio::main]` runtime wakes the arbiter, and
//! the reply wakes the asker back, two wake-ups across threads (5 to 50 µs
//! on a VM, against under a microsecond on one thread).
//!
//! A [`TaskActor`] is `Send`, and so are the futures of its hooks and of its
//! [`TaskHandler`]s (the compiler checks it where they are written). It is
//! spawned as a task of a tokio runtime, so the runtime's scheduler runs it
//! on the worker thread that woke it: an ask from a task of the same
//! runtime, and its reply, usually stay on one thread, as kameo's and
//! ractor's do.
//!
//! It keeps what makes postbox actors what they are: a bounded mailbox
//! ([`TaskAddr::send`] waits for room, [`TaskAddr::try_send`] fails with
//! `Full`), asks with deadlines whose abandoned requests are skipped,
//! handlers that run one at a time with `&mut self` across `.await`s,
//! panics and errors contained, restarts by a [`RestartStrategy`] with the
//! mailbox kept ([`TaskBuilder::supervise`]), [`AnyAddr`] (identity, stats,
//! stop, death watch, also into its mailbox with [`TaskContext::watch`]),
//! [`Recipient`], and a place in supervision trees: a
//! [`Supervisor`](crate::Supervisor) restarts task actor children
//! ([`TaskChildSpec`](crate::TaskChildSpec)) by its strategy, alongside
//! arbiter ones. What it has not: the `drained` hook. It ends for good when
//! its runtime shuts down.
//!
//! ```
//! use postbox::{Failure, Message, TaskActor, TaskContext, TaskHandler};
//! use std::time::Duration;
//!
//! #[derive(Default)]
//! struct Counter { n: u64 }
//! impl TaskActor for Counter {}
//!
//! struct Add(u64);
//! impl Message for Add { type Reply = u64; }
//! impl TaskHandler<Add> for Counter {
//!     async fn handle(&mut self, Add(k): Add, _: &mut TaskContext<Self>) -> Result<u64, Failure> {
//!         self.n += k;
//!         Ok(self.n)
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     // A task of this runtime: no arbiter, no `Runtime` to build.
//!     let counter = postbox::spawn_task(Counter::default());
//!     counter.send(Add(2)).await.unwrap();
//!     let n = counter.ask(Add(3)).timeout(Duration::from_secs(1)).await.unwrap();
//!     assert_eq!(n, 5);
//! }
//! ```
//!
//! A handler whose future is not `Send` does not compile as a
//! [`TaskHandler`] (it can be an ordinary [`Handler`](crate::Handler)):
//!
//! ```compile_fail
//! use postbox::{Failure, Message, TaskActor, TaskContext, TaskHandler};
//! struct Local;
//! impl TaskActor for Local {}
//! struct Touch;
//! impl Message for Touch { type Reply = (); }
//! impl TaskHandler<Touch> for Local {
//!     async fn handle(&mut self, _: Touch, _: &mut TaskContext<Self>) -> Result<(), Failure> {
//!         let shared = std::rc::Rc::new(1);
//!         tokio::task::yield_now().await;
//!         drop(shared);
//!         Ok(())
//!     }
//! }
//! ```
//!
//! [`Runtime`]: crate::Runtime

use std::fmt;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::mailbox;
use futures::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::actor::Message;
use crate::addr::{
    ActorId, ActorStats, AnyAddr, Control, ControlBox, ErasedAddr, Recipient, SendError, Shared,
    TrySendError, send_into, stats_of, try_send_into,
};
use crate::ask::{AskError, exchange, with_timeout};
use crate::cell::{
    End, Ended, Oversight, Parent, build, caught, drop_caught, stopped_caught, terminate,
};
use crate::envelope::{Request, Tell};
use crate::failure::{ExitReason, Failure};
use crate::runtime::DEFAULT_MAILBOX;
use crate::supervisor::{RestartStrategy, SelfSupervision};

/// An actor that runs as a tokio task: `Send`, with `Send` hooks. Its
/// messages are handled by [`TaskHandler`] impls.
pub trait TaskActor: Send + Sized + 'static {
    /// Called when an incarnation starts, before it handles any message. An
    /// error fails the incarnation like a failing handler does.
    fn started(
        &mut self,
        ctx: &mut TaskContext<Self>,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Called when an incarnation ends for any reason, including after a
    /// failure (a panic inside `stopped` is caught and logged).
    fn stopped(&mut self, ctx: &mut TaskContext<Self>) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// Handling of message `M` by task actor `Self`; the future is `Send`.
///
/// Returning `Err` fails the actor, as for [`Handler`](crate::Handler): it
/// stops, or restarts if it was spawned with
/// [`supervise`](TaskBuilder::supervise); an ask that caused the failure
/// gets [`AskError::Failed`].
pub trait TaskHandler<M: Message>: TaskActor {
    /// Handles one message.
    fn handle(
        &mut self,
        msg: M,
        ctx: &mut TaskContext<Self>,
    ) -> impl Future<Output = Result<M::Reply, Failure>> + Send;
}

/// One queued message of a task actor, its type erased; handling it gives a
/// `Send` future.
trait TaskHandle<A: TaskActor>: Send {
    /// True when nobody waits for this message's outcome any more.
    fn cancelled(&self) -> bool {
        false
    }

    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut TaskContext<A>,
    ) -> BoxFuture<'a, Result<(), Failure>>;
}

type TaskEnvelope<A> = Box<dyn TaskHandle<A>>;

impl<A: TaskHandler<M>, M: Message> TaskHandle<A> for Tell<M> {
    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut TaskContext<A>,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move { actor.handle(self.0, ctx).await.map(|_| ()) })
    }
}

impl<A: TaskHandler<M>, M: Message> TaskHandle<A> for Request<M> {
    fn cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    fn handle<'a>(
        self: Box<Self>,
        actor: &'a mut A,
        ctx: &'a mut TaskContext<A>,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        let Request { msg, mut reply } = *self;
        Box::pin(async move { reply.answer(actor.handle(msg, ctx).await) })
    }
}

/// Spawns `actor` as a task of the current tokio runtime, with the default
/// mailbox; it is not restarted if it fails (see [`TaskBuilder::supervise`]).
/// Outside a tokio runtime the actor cannot start: the address returned is
/// closed (sends fail with `Closed`) and a warning is logged.
pub fn spawn_task<A: TaskActor>(actor: A) -> TaskAddr<A> {
    let mut slot = Some(Box::new(actor));
    TaskBuilder::new(move || slot.take().map(|actor| *actor)).spawn()
}

/// Configures and spawns one task actor, built by a factory (called again
/// for each restart).
///
/// ```
/// use postbox::{Restart, RestartStrategy, TaskActor, TaskBuilder};
/// # #[derive(Default)] struct Worker;
/// # impl TaskActor for Worker {}
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let worker = TaskBuilder::new(|| Some(Worker::default()))
///     .mailbox(64)
///     .name("worker")
///     .supervise(RestartStrategy::new(Restart::Permanent))
///     .spawn();
/// assert_eq!(worker.stats().capacity, 64);
/// # }
/// ```
#[must_use = "call .spawn() to start the actor"]
pub struct TaskBuilder<A: TaskActor> {
    factory: Box<dyn FnMut() -> Option<A> + Send>,
    mailbox: usize,
    name: Option<Arc<str>>,
    own: Option<RestartStrategy>,
    parent: Option<Parent>,
}

impl<A: TaskActor> fmt::Debug for TaskBuilder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskBuilder")
            .field("mailbox", &self.mailbox)
            .field("name", &self.name)
            .field("supervise", &self.own)
            .finish()
    }
}

impl<A: TaskActor> TaskBuilder<A> {
    /// An actor built by `factory` (`None`: it cannot be built, and stops).
    pub fn new(factory: impl FnMut() -> Option<A> + Send + 'static) -> Self {
        TaskBuilder {
            factory: Box::new(factory),
            mailbox: DEFAULT_MAILBOX,
            name: None,
            own: None,
            parent: None,
        }
    }

    /// Mailbox capacity (at least 1). A full mailbox makes `send` wait.
    pub fn mailbox(mut self, capacity: usize) -> Self {
        self.mailbox = capacity.max(1);
        self
    }

    /// A name for logs and stats.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Restarts the actor by `strategy` when it fails, from its factory;
    /// messages queued for it are kept across restarts. (Under a
    /// [`Supervisor`](crate::Supervisor), see
    /// [`TaskChildSpec`](crate::TaskChildSpec), the supervisor decides.)
    pub fn supervise(mut self, strategy: RestartStrategy) -> Self {
        if self.parent.is_none() {
            self.own = Some(strategy);
        }
        self
    }

    /// Reports each ended incarnation to a supervisor and waits for its
    /// decision, instead of deciding itself.
    pub(crate) fn parent(mut self, parent: Parent) -> Self {
        self.parent = Some(parent);
        self.own = None;
        self
    }

    /// Starts the actor as a task of the current tokio runtime and returns
    /// its address at once. Outside a runtime, see [`spawn_task`].
    pub fn spawn(self) -> TaskAddr<A> {
        match Handle::try_current() {
            Ok(runtime) => self.spawn_on(&runtime),
            Err(_) => {
                let (addr, cell) = self.prepare(None);
                tracing::warn!(actor = %addr.id(), "task actor spawned outside a tokio runtime: it is closed");
                drop(cell);
                addr
            }
        }
    }

    /// Starts the actor as a task of `runtime`.
    pub fn spawn_on(self, runtime: &Handle) -> TaskAddr<A> {
        let (addr, cell) = self.prepare(Some(runtime.clone()));
        if let Some(cell) = cell {
            runtime.spawn(run(cell));
        }
        addr
    }

    fn prepare(self, runtime: Option<Handle>) -> (TaskAddr<A>, Option<TaskCell<A>>) {
        let (tx, rx) = mailbox::channel(self.mailbox);
        let shared = Arc::new(Shared::new(self.name, &tx));
        let weak = tx.downgrade();
        let addr = TaskAddr {
            tx,
            shared: shared.clone(),
        };
        let ended = Ended {
            shared: shared.clone(),
            done: false,
        };
        // Without a runtime the cell is dropped here, which ends the actor
        // for good (its watchers fire, its mailbox closes).
        let cell = runtime.map(|runtime| TaskCell {
            factory: self.factory,
            rx,
            weak,
            shared,
            runtime,
            oversight: Oversight {
                parent: self.parent,
                own: self.own.map(|s| Box::new(SelfSupervision::new(s))),
            },
            ended,
        });
        (addr, cell)
    }
}

/// The address of a task actor: send it any message it handles.
///
/// Cloning is cheap. The actor stops when every address to it is dropped
/// (once its mailbox is drained), when it stops itself, or when it is
/// stopped.
pub struct TaskAddr<A: TaskActor> {
    tx: mailbox::Sender<TaskEnvelope<A>>,
    shared: Arc<Shared>,
}

impl<A: TaskActor> Clone for TaskAddr<A> {
    fn clone(&self) -> Self {
        TaskAddr {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<A: TaskActor> fmt::Debug for TaskAddr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskAddr")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .finish()
    }
}

impl<A: TaskActor> TaskAddr<A> {
    /// Sends a one-way message, waiting while the mailbox is full.
    pub async fn send<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        A: TaskHandler<M>,
        M: Message,
    {
        send_into(&self.tx, msg, |m| -> TaskEnvelope<A> { Box::new(Tell(m)) }).await
    }

    /// Sends a one-way message if there is room now.
    pub fn try_send<M>(&self, msg: M) -> Result<(), TrySendError<M>>
    where
        A: TaskHandler<M>,
        M: Message,
    {
        try_send_into(&self.tx, msg, |m| -> TaskEnvelope<A> { Box::new(Tell(m)) })
    }

    /// Sends a request and resolves to the handler's reply; add
    /// `.timeout(d)` to bound the wait (room in the mailbox included).
    pub fn ask<M>(&self, msg: M) -> TaskAsk<'_, A, M>
    where
        A: TaskHandler<M>,
        M: Message,
    {
        TaskAsk {
            addr: self,
            msg,
            timeout: None,
        }
    }

    /// A handle that accepts only `M`, hiding the actor type (and whether
    /// it is a task actor).
    pub fn recipient<M>(&self) -> Recipient<M>
    where
        A: TaskHandler<M>,
        M: Message,
    {
        Recipient {
            inner: Arc::new(self.clone()),
        }
    }

    /// An untyped handle: identity, stats, stop, death watch.
    pub fn any(&self) -> AnyAddr {
        AnyAddr {
            shared: self.shared.clone(),
        }
    }

    /// The actor's identity.
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// True once the actor has stopped for good.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Messages waiting in the mailbox.
    pub fn queued(&self) -> usize {
        self.tx.queued()
    }

    /// Asks the actor to stop after the message it is handling (out of
    /// band: a full mailbox does not delay it). Queued messages are dropped.
    pub fn stop(&self) {
        self.shared.control.send(Control::Stop { report: true });
    }

    /// The actor's counters.
    pub fn stats(&self) -> ActorStats {
        stats_of(&self.shared, self.queued(), self.tx.max_capacity())
    }

    /// Resolves when the actor has stopped for good, with the reason of its
    /// last incarnation.
    pub async fn terminated(&self) -> ExitReason {
        self.any().terminated().await
    }
}

impl<A: TaskHandler<M>, M: Message> ErasedAddr<M> for TaskAddr<A> {
    fn send(&self, msg: M) -> BoxFuture<'_, Result<(), SendError<M>>> {
        Box::pin(TaskAddr::send(self, msg))
    }

    fn try_send(&self, msg: M) -> Result<(), TrySendError<M>> {
        TaskAddr::try_send(self, msg)
    }

    fn ask(&self, msg: M, timeout: Option<Duration>) -> BoxFuture<'_, Result<M::Reply, AskError>> {
        let ask = TaskAddr::ask(self, msg);
        match timeout {
            Some(d) => ask.timeout(d).into_future(),
            None => ask.into_future(),
        }
    }

    fn any(&self) -> AnyAddr {
        TaskAddr::any(self)
    }

    fn is_closed(&self) -> bool {
        TaskAddr::is_closed(self)
    }
}

/// A pending request to a task actor; `.await` it, optionally after
/// `.timeout(d)`. As [`Ask`](crate::Ask): a request whose asker gave up is
/// skipped by the actor, not handled.
#[must_use = "an ask does nothing until awaited"]
pub struct TaskAsk<'a, A: TaskHandler<M>, M: Message> {
    addr: &'a TaskAddr<A>,
    msg: M,
    timeout: Option<Duration>,
}

impl<A: TaskHandler<M>, M: Message> fmt::Debug for TaskAsk<'_, A, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskAsk")
            .field("to", &self.addr.id())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<A: TaskHandler<M>, M: Message> TaskAsk<'_, A, M> {
    /// Gives up with [`AskError::Timeout`] after `d` (waiting for mailbox
    /// room included).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
}

impl<'a, A: TaskHandler<M>, M: Message> IntoFuture for TaskAsk<'a, A, M> {
    type Output = Result<M::Reply, AskError>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        let TaskAsk { addr, msg, timeout } = self;
        let ask = exchange(&addr.tx, msg, |r| -> TaskEnvelope<A> { Box::new(r) });
        match timeout {
            None => Box::pin(ask),
            Some(d) => Box::pin(with_timeout(d, ask)),
        }
    }
}

/// The context of one task actor incarnation, passed to every handler and
/// hook: its identity, its address, stopping, and tasks tied to the
/// incarnation.
pub struct TaskContext<A: TaskActor> {
    weak: mailbox::WeakSender<TaskEnvelope<A>>,
    shared: Arc<Shared>,
    runtime: Handle,
    incarnation: u64,
    stopping: bool,
    tasks: Vec<AbortHandle>,
}

impl<A: TaskActor> fmt::Debug for TaskContext<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.shared.id)
            .field("incarnation", &self.incarnation)
            .finish()
    }
}

impl<A: TaskActor> TaskContext<A> {
    /// The actor's identity (stable across restarts).
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// The actor's name, if it was spawned with one.
    pub fn name(&self) -> Option<&str> {
        self.shared.name.as_deref()
    }

    /// The current incarnation: 1 for the first, +1 for every restart.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The actor's own address; `None` only when every address to it has
    /// been dropped (it then stops once its mailbox is drained).
    pub fn addr(&self) -> Option<TaskAddr<A>> {
        self.weak.upgrade().map(|tx| TaskAddr {
            tx,
            shared: self.shared.clone(),
        })
    }

    /// The actor's untyped handle.
    pub fn any(&self) -> AnyAddr {
        AnyAddr {
            shared: self.shared.clone(),
        }
    }

    /// The tokio runtime the actor runs on.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// Stops the actor normally once the current handler returns.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// Spawns a task on the actor's runtime; it is aborted when this
    /// incarnation ends. The task does not get `&mut self`: send the actor
    /// a message for that.
    pub fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        if self.tasks.len() >= 64 {
            self.tasks.retain(|t| !t.is_finished());
        }
        self.tasks.push(self.runtime.spawn(fut).abort_handle());
    }

    /// Sends `msg` to this actor after `delay` (cancelled if the incarnation
    /// ends first). Obeys tokio's clock, so paused-time tests control it.
    pub fn notify_later<M>(&mut self, msg: M, delay: Duration)
    where
        A: TaskHandler<M>,
        M: Message,
    {
        let weak = self.weak.clone();
        let shared = self.shared.clone();
        let at = crate::clock::deadline(delay);
        self.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(tx) = weak.upgrade() {
                let _ = TaskAddr { tx, shared }.send(msg).await;
            }
        });
    }

    /// Death watch: when `target`'s given incarnation (`None`: its current
    /// one) ends, this actor receives `f(reason)`. Fires at once if it
    /// already ended. As [`Context::watch`](crate::Context::watch): the
    /// dying actor never waits on this one's full mailbox (the notice then
    /// goes from a task of this actor's runtime).
    pub fn watch<M>(
        &mut self,
        target: &AnyAddr,
        incarnation: Option<u64>,
        f: impl FnOnce(ExitReason) -> M + Send + 'static,
    ) where
        A: TaskHandler<M>,
        M: Message,
    {
        let weak = self.weak.clone();
        let shared = self.shared.clone();
        let runtime = self.runtime.clone();
        target.on_exit(incarnation, move |reason| {
            let Some(tx) = weak.upgrade() else { return };
            let addr = TaskAddr { tx, shared };
            if let Err(TrySendError::Full(msg)) = addr.try_send(f(reason)) {
                runtime.spawn(async move {
                    let _ = addr.send(msg).await;
                });
            }
        });
    }

    fn abort_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// The task that hosts one task actor for its whole life, across restarts.
struct TaskCell<A: TaskActor> {
    factory: Box<dyn FnMut() -> Option<A> + Send>,
    rx: mailbox::Receiver<TaskEnvelope<A>>,
    weak: mailbox::WeakSender<TaskEnvelope<A>>,
    shared: Arc<Shared>,
    runtime: Handle,
    oversight: Oversight,
    ended: Ended,
}

/// Runs incarnations until the actor stops for good: the arbiter cell's
/// loop (`cell::run`), with a task actor's context and incarnation.
async fn run<A: TaskActor>(mut cell: TaskCell<A>) {
    let span =
        tracing::debug_span!("actor", id = %cell.shared.id, name = cell.shared.name.as_deref());
    let last = loop {
        let incarnation = cell.shared.begin_incarnation();
        let mut ctx = TaskContext {
            weak: cell.weak.clone(),
            shared: cell.shared.clone(),
            runtime: cell.runtime.clone(),
            incarnation,
            stopping: false,
            tasks: Vec::new(),
        };
        let end = live(
            &mut cell.factory,
            &mut ctx,
            &mut cell.rx,
            &cell.shared.control,
        )
        .await;
        ctx.abort_tasks();
        let next = Box::pin(cell.oversight.after(end, incarnation, &cell.shared, &span)).await;
        if let Some(last) = next {
            break last;
        }
    };
    Box::pin(terminate(&mut cell.rx, &mut cell.ended, last, span)).await;
}

/// One incarnation: built, started, fed messages one at a time with panics
/// caught, stopped.
async fn live<A: TaskActor>(
    factory: &mut Box<dyn FnMut() -> Option<A> + Send>,
    ctx: &mut TaskContext<A>,
    rx: &mut mailbox::Receiver<TaskEnvelope<A>>,
    control: &ControlBox,
) -> End {
    let mut actor = match build(factory) {
        Ok(Some(actor)) => actor,
        Ok(None) => return End::Stop { report: false },
        Err(reason) => return End::Exit(reason),
    };
    let shared = ctx.shared.clone();
    let end = match caught(Box::pin(actor.started(ctx))).await {
        Some(reason) => End::Exit(reason),
        None => loop {
            if ctx.stopping {
                break End::Exit(ExitReason::Normal);
            }
            tokio::select! {
                biased;
                cmd = control.recv() => match cmd {
                    Control::Stop { report } => break End::Stop { report },
                    Control::Restart { incarnation, delay } if incarnation >= ctx.incarnation => {
                        break End::Restart(delay)
                    }
                    Control::Restart { .. } => {}
                },
                envelope = rx.recv() => {
                    let Some(envelope) = envelope else { break End::Exit(ExitReason::Normal) };
                    if envelope.cancelled() {
                        shared.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let failed = caught(envelope.handle(&mut actor, ctx)).await;
                    shared.handled.fetch_add(1, Ordering::Relaxed);
                    if let Some(reason) = failed {
                        break End::Exit(reason);
                    }
                }
            }
        },
    };
    stopped_caught(Box::pin(actor.stopped(ctx)), &shared).await;
    drop_caught(actor, &shared);
    end
}
