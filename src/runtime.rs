//! Where actors run: a [`Runtime`] owns an actix `System` with one arbiter (an OS
//! thread with a single-threaded tokio runtime) per core, on threads of its own.
//!
//! Because the actix system lives on its own threads, a `Runtime` works the same
//! from `#[tokio::main]`, `#[actix::main]` or a plain `fn main`: spawning an actor
//! hands its factory to an arbiter, which builds and runs it there for its whole
//! life. Addresses are `Send` and work from any thread or runtime.
//!
//! [`RuntimeHandle::local`] instead runs actors on the current thread's
//! `LocalSet` (an actix system or a tokio `LocalSet`): one thread, deterministic
//! interleaving, and tokio's paused clock if the test paused it.
//!
//! ```
//! use postbox::{Actor, Runtime};
//! struct Idle;
//! impl Actor for Idle {}
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() {
//!     let rt = Runtime::new().expect("threads");
//!     let addr = rt.spawn(Idle);
//!     assert!(!addr.is_closed());
//! }
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_rt::{Arbiter, ArbiterHandle, System};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::mailbox;

use crate::actor::Actor;
use crate::addr::{Addr, Shared};
use crate::busy_poll;
use crate::cell::{self, Cell, Factory, Parent};
use crate::supervisor::{RestartStrategy, SelfSupervision};

/// Default mailbox capacity of spawned actors.
pub const DEFAULT_MAILBOX: usize = 256;

/// Owns the actor threads; dropping it stops them (see [`Runtime::shutdown`]).
pub struct Runtime {
    handle: RuntimeHandle,
    system: Option<System>,
    thread: Option<JoinHandle<()>>,
}

impl Runtime {
    /// A runtime with one arbiter per available core.
    pub fn new() -> io::Result<Runtime> {
        Runtime::builder().build()
    }

    /// A runtime with `n` arbiters (at least one).
    pub fn with_arbiters(n: usize) -> io::Result<Runtime> {
        Runtime::builder().arbiters(n).build()
    }

    /// Configures a runtime: the number of arbiters, busy polling.
    ///
    /// ```
    /// use postbox::Runtime;
    /// use std::time::Duration;
    /// let rt = Runtime::builder()
    ///     .arbiters(2)
    ///     .busy_poll(Duration::from_micros(500))
    ///     .build()
    ///     .expect("threads");
    /// assert_eq!(rt.arbiters(), 2);
    /// ```
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            arbiters: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy_poll: None,
        }
    }

    fn start(config: RuntimeBuilder) -> io::Result<Runtime> {
        let n = config.arbiters.max(1);
        let busy_poll = config.busy_poll;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("postbox-system".into())
            .spawn(move || {
                let runner = System::new();
                let arbiters: io::Result<Vec<Arbiter>> =
                    (0..n).map(|_| Arbiter::try_new()).collect();
                match arbiters {
                    Ok(arbiters) => {
                        if let Some(window) = busy_poll {
                            for arbiter in &arbiters {
                                arbiter.spawn(busy_poll::poller(window));
                            }
                        }
                        let handles = arbiters.iter().map(Arbiter::handle).collect::<Vec<_>>();
                        if tx.send(Ok((System::current(), handles))).is_err() {
                            return;
                        }
                        let _ = runner.run();
                        for arbiter in arbiters {
                            arbiter.stop();
                            let _ = arbiter.join();
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err));
                    }
                }
            })?;
        let (system, arbiters) = rx
            .recv()
            .map_err(|_| io::Error::other("the postbox system thread died while starting"))??;
        Ok(Runtime {
            handle: RuntimeHandle {
                inner: Arc::new(Inner {
                    placement: Placement::Arbiters {
                        arbiters,
                        next: AtomicUsize::new(0),
                    },
                    lifecycle: Lifecycle::default(),
                }),
            },
            system: Some(system),
            thread: Some(thread),
        })
    }

    /// A cloneable handle for spawning actors.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Stops every arbiter and waits for their threads. Actors are dropped without
    /// their `stopped` hooks. Do not call it from an actor of this runtime.
    ///
    /// Nothing is left hanging: the [`on_shutdown`](RuntimeHandle::on_shutdown)
    /// hooks run first, then every actor ends for good, so that its
    /// [`terminated`](crate::Addr::terminated) resolves, and senders and askers
    /// still waiting on its mailbox get `Closed`, as does anything sent later.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.handle.inner.lifecycle.shut_down();
        if let Some(system) = self.system.take() {
            system.stop();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for Runtime {
    type Target = RuntimeHandle;
    fn deref(&self) -> &RuntimeHandle {
        &self.handle
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.handle.fmt(f)
    }
}

/// Settings for a [`Runtime`]; see [`Runtime::builder`].
#[derive(Clone, Debug)]
pub struct RuntimeBuilder {
    arbiters: usize,
    busy_poll: Option<Duration>,
}

impl RuntimeBuilder {
    /// The number of arbiters (threads running actors); at least one. Default:
    /// one per available core.
    pub fn arbiters(mut self, n: usize) -> Self {
        self.arbiters = n.max(1);
        self
    }

    /// Keeps each arbiter polling instead of sleeping for `window` after the
    /// last message one of its actors handled, so that a message from another
    /// thread is picked up in a microsecond or two instead of after a kernel
    /// wake-up (tens of microseconds on a VM). Costs a busy core per active
    /// arbiter; off by default. See the [`busy_poll`](crate::busy_poll) module.
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll = (!window.is_zero()).then_some(window);
        self
    }

    /// Starts the system thread and the arbiters.
    pub fn build(self) -> io::Result<Runtime> {
        Runtime::start(self)
    }
}

enum Placement {
    Arbiters {
        arbiters: Vec<ArbiterHandle>,
        next: AtomicUsize,
    },
    Local,
}

struct Inner {
    placement: Placement,
    lifecycle: Lifecycle,
}

type Hook = Box<dyn FnOnce() + Send>;

/// Whether a runtime has shut down, and who wants to know.
struct Lifecycle {
    down: AtomicBool,
    /// Wakes every [`RuntimeHandle::shut_down`] future.
    notify: Notify,
    /// [`RuntimeHandle::on_shutdown`] hooks by key; `None` once they have run.
    hooks: Mutex<Option<Vec<(u64, Hook)>>>,
    next_hook: AtomicU64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            down: AtomicBool::new(false),
            notify: Notify::new(),
            hooks: Mutex::new(Some(Vec::new())),
            next_hook: AtomicU64::new(0),
        }
    }
}

impl Lifecycle {
    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Marks the runtime down, wakes the waiters and runs the hooks (once).
    fn shut_down(&self) {
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.notify.notify_waiters();
        // Taken, and so marked as run: a hook registered from now on runs at once.
        let hooks = self.hooks.lock().take().unwrap_or_default();
        for (_, hook) in hooks {
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook)) {
                tracing::warn!(failure = %crate::Failure::from_panic(panic), "panic in a shutdown hook");
            }
        }
    }
}

/// Keeps an [`on_shutdown`](RuntimeHandle::on_shutdown) hook registered;
/// dropping it unregisters the hook.
#[must_use = "the hook is unregistered when this guard is dropped"]
pub struct ShutdownHook {
    runtime: Arc<Inner>,
    key: u64,
}

impl fmt::Debug for ShutdownHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHook")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for ShutdownHook {
    fn drop(&mut self) {
        if let Some(hooks) = self.runtime.lifecycle.hooks.lock().as_mut() {
            hooks.retain(|(key, _)| *key != self.key);
        }
    }
}

/// Spawns actors onto a [`Runtime`]'s arbiters, or onto the current thread.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.placement {
            Placement::Arbiters { arbiters, .. } => {
                write!(f, "RuntimeHandle({} arbiters)", arbiters.len())
            }
            Placement::Local => f.write_str("RuntimeHandle(local)"),
        }
    }
}

impl RuntimeHandle {
    /// Runs actors on the current thread's `LocalSet` (inside an actix system,
    /// `#[actix_rt::test]`, or a tokio `LocalSet`). Spawning outside one panics.
    pub fn local() -> RuntimeHandle {
        RuntimeHandle {
            inner: Arc::new(Inner {
                placement: Placement::Local,
                lifecycle: Lifecycle::default(),
            }),
        }
    }

    /// True once the [`Runtime`] has shut down (never for a local handle).
    pub fn is_shut_down(&self) -> bool {
        self.inner.lifecycle.is_down()
    }

    /// Resolves when the [`Runtime`] shuts down (at once if it has; never for a
    /// local handle). For code outside actors that waits on them and must not
    /// be left hanging: race it against the wait.
    ///
    /// ```
    /// # use postbox::Runtime;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let rt = Runtime::with_arbiters(1).unwrap();
    /// let handle = rt.handle();
    /// let waiter = tokio::spawn(async move { handle.shut_down().await });
    /// rt.shutdown();
    /// waiter.await.unwrap();
    /// # }
    /// ```
    pub async fn shut_down(&self) {
        let lifecycle = &self.inner.lifecycle;
        if matches!(self.inner.placement, Placement::Local) {
            return std::future::pending().await;
        }
        loop {
            let notified = lifecycle.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the flag is read: a shutdown in between wakes it.
            notified.as_mut().enable();
            if lifecycle.is_down() {
                return;
            }
            notified.await;
        }
    }

    /// Runs `hook` once when the [`Runtime`] shuts down, before its actors
    /// stop (at once if it has already shut down), until the returned guard is
    /// dropped. Hooks run on the thread that shuts the runtime down and must
    /// not block; a local handle never runs them. The broker uses this to fail
    /// publishers waiting on its queues and streams.
    pub fn on_shutdown(&self, hook: impl FnOnce() + Send + 'static) -> ShutdownHook {
        let lifecycle = &self.inner.lifecycle;
        let key = lifecycle.next_hook.fetch_add(1, Ordering::Relaxed);
        let mut hooks = lifecycle.hooks.lock();
        match hooks.as_mut() {
            Some(hooks) => hooks.push((key, Box::new(hook))),
            None => {
                drop(hooks);
                hook();
            }
        }
        ShutdownHook {
            runtime: self.inner.clone(),
            key,
        }
    }

    /// How many arbiters actors are spread over (1 for a local handle).
    pub fn arbiters(&self) -> usize {
        match &self.inner.placement {
            Placement::Arbiters { arbiters, .. } => arbiters.len(),
            Placement::Local => 1,
        }
    }

    /// Spawns `actor` with the default mailbox capacity on the next arbiter.
    /// It is not restarted if it fails: use a [`Supervisor`](crate::Supervisor) for that.
    pub fn spawn<A: Actor + Send>(&self, actor: A) -> Addr<A> {
        // Boxed: the factory, kept for the actor's life, is a pointer once
        // it has handed the actor over.
        let mut slot = Some(Box::new(actor));
        self.build(move || slot.take().map(|actor| *actor)).spawn()
    }

    /// Starts building an actor from a factory, to set its mailbox, name or arbiter.
    ///
    /// ```
    /// # use postbox::{Actor, Runtime};
    /// # struct Worker; impl Actor for Worker {}
    /// # let rt = Runtime::with_arbiters(2).unwrap();
    /// let addr = rt.build(|| Some(Worker)).mailbox(8).name("worker").arbiter(1).spawn();
    /// assert_eq!(addr.stats().capacity, 8);
    /// ```
    pub fn build<A: Actor, F>(&self, factory: F) -> Builder<A>
    where
        F: FnMut() -> Option<A> + Send + 'static,
    {
        Builder {
            runtime: self.clone(),
            factory: Box::new(factory),
            mailbox: DEFAULT_MAILBOX,
            name: None,
            arbiter: None,
            parent: None,
            own: None,
        }
    }

    fn place(
        &self,
        arbiter: Option<usize>,
        shared: &Arc<Shared>,
        start: impl FnOnce() + Send + 'static,
    ) {
        match &self.inner.placement {
            Placement::Local => start(),
            Placement::Arbiters { arbiters, next } => {
                let i = arbiter.unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed))
                    % arbiters.len();
                if self.is_shut_down() || !arbiters[i].spawn_fn(start) {
                    // The cell is dropped unstarted, which ends the actor for good.
                    tracing::warn!(actor = %shared.id, "spawn on a stopped runtime: the actor is closed");
                }
            }
        }
    }
}

/// Configures and spawns one actor; see [`RuntimeHandle::build`].
#[must_use = "call .spawn() to start the actor"]
pub struct Builder<A: Actor> {
    runtime: RuntimeHandle,
    factory: Factory<A>,
    mailbox: usize,
    name: Option<Arc<str>>,
    arbiter: Option<usize>,
    parent: Option<Parent>,
    own: Option<RestartStrategy>,
}

impl<A: Actor> fmt::Debug for Builder<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("mailbox", &self.mailbox)
            .field("name", &self.name)
            .field("arbiter", &self.arbiter)
            .field("supervise", &self.own)
            .finish()
    }
}

impl<A: Actor> Builder<A> {
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

    /// Pins the actor to arbiter `i` (modulo the number of arbiters).
    pub fn arbiter(mut self, i: usize) -> Self {
        self.arbiter = Some(i);
        self
    }

    pub(crate) fn parent(mut self, parent: Parent) -> Self {
        self.parent = Some(parent);
        self.own = None;
        self
    }

    /// Restarts the actor by `strategy` when it fails, from its factory, with
    /// no supervisor actor: cheaper than a [`SupervisorSpec`](crate::SupervisorSpec)
    /// with one child, and the address is known at once. Messages queued for
    /// it are kept across restarts.
    pub fn supervise(mut self, strategy: RestartStrategy) -> Self {
        if self.parent.is_none() {
            self.own = Some(strategy);
        }
        self
    }

    /// Starts the actor and returns its address at once.
    pub fn spawn(self) -> Addr<A> {
        let (tx, rx) = mailbox::channel(self.mailbox);
        let shared = Arc::new(Shared::new(self.name, &tx));
        let addr = Addr {
            tx,
            shared: shared.clone(),
        };
        let cell = Cell {
            factory: self.factory,
            rx,
            weak: addr.tx.downgrade(),
            shared: shared.clone(),
            runtime: self.runtime.clone(),
            oversight: cell::Oversight {
                parent: self.parent,
                own: self.own.map(|s| Box::new(SelfSupervision::new(s))),
            },
            ended: cell::Ended {
                shared: shared.clone(),
                done: false,
            },
        };
        self.runtime.place(self.arbiter, &shared, move || {
            tokio::task::spawn_local(cell::run(cell));
        });
        addr
    }
}
