//! Running tests on one thread with a paused clock: [`run`], [`local`],
//! [`TestRuntime`], and [`advance`].
//!
//! Local-mode actors ([`RuntimeHandle::local`]) are tasks on the current thread's
//! tokio `LocalSet`. These helpers provide that `LocalSet`, and with [`run`] and
//! [`TestRuntime`] also the runtime under it: current-thread, with tokio's clock
//! paused from the start, so every timer of the test is virtual.

use std::future::Future;
use std::io;

use tokio::runtime::Runtime as TokioRuntime;
use tokio::task::LocalSet;

use crate::runtime::RuntimeHandle;

/// Moves tokio's paused clock forward by `duration`, firing every timer that
/// falls due, then yields so that the woken tasks can run.
///
/// This is [`tokio::time::advance`], re-exported. Woken tasks (a
/// [`notify_later`](crate::Context::notify_later) timer, then the actor it
/// sends to) finish running once the test awaits something that lets them,
/// such as an expectation of a [`TestProbe`](super::TestProbe).
///
/// Spawning returns at once and the actor starts the next time the test
/// yields, so a timer that an actor arms is armed only once the test has let
/// it run: wait for a reply from the actor before advancing, as below.
///
/// # Panics
///
/// If the clock is not paused (see [`run`]) or if called outside a tokio runtime.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use postbox::testkit::{self, TestProbe, advance};
/// use postbox::{Actor, Context, Failure, Handler, Message, Recipient, RuntimeHandle};
/// use tokio::time::Instant;
///
/// /// Reminds its listener after a delay.
/// struct Reminder { listener: Recipient<Reminded> }
/// impl Actor for Reminder {}
///
/// struct RemindIn(Duration);
/// impl Message for RemindIn { type Reply = (); }
/// struct Fire;
/// impl Message for Fire { type Reply = (); }
/// #[derive(Debug)]
/// struct Reminded;
/// impl Message for Reminded { type Reply = (); }
///
/// impl Handler<RemindIn> for Reminder {
///     async fn handle(&mut self, RemindIn(d): RemindIn, ctx: &mut Context<Self>) -> Result<(), Failure> {
///         ctx.notify_later(Fire, d);
///         Ok(())
///     }
/// }
/// impl Handler<Fire> for Reminder {
///     async fn handle(&mut self, _: Fire, _: &mut Context<Self>) -> Result<(), Failure> {
///         let _ = self.listener.send(Reminded).await;
///         Ok(())
///     }
/// }
///
/// testkit::run(async {
///     let rt = RuntimeHandle::local();
///     let mut probe = TestProbe::<Reminded>::new(&rt);
///     let reminder = rt.spawn(Reminder { listener: probe.recipient() });
///     let start = Instant::now();
///     reminder.ask(RemindIn(Duration::from_secs(10))).await.unwrap(); // armed
///
///     advance(Duration::from_secs(9)).await;
///     probe.expect_no_msg(Duration::ZERO).await; // 9 s: not yet
///     advance(Duration::from_secs(1)).await;
///     probe.expect_msg(Duration::from_millis(1)).await; // 10 s: reminded
///     assert_eq!(start.elapsed(), Duration::from_secs(10));
/// });
/// ```
pub use tokio::time::advance;

/// Runs `test` to completion on a fresh [`TestRuntime`]: one thread, a
/// `LocalSet` for local-mode actors, and tokio's clock paused.
///
/// Use it in a plain `#[test] fn`. Spawn actors with
/// [`RuntimeHandle::local()`]; they are dropped when `test` returns.
///
/// # Panics
///
/// If the runtime cannot be built (the OS refused a resource), if called from
/// inside another tokio runtime, or if `test` panics.
///
/// # Example
///
/// Asks with hour-long timeouts complete instantly, after exactly the virtual
/// time they would take:
///
/// ```
/// use std::time::Duration;
/// use postbox::testkit;
/// use postbox::{Actor, AskError, Context, Failure, Handler, Message, RuntimeHandle};
/// use tokio::time::Instant;
///
/// /// Answers after thinking for a while.
/// struct Thinker(Duration);
/// impl Actor for Thinker {}
/// struct Question;
/// impl Message for Question { type Reply = u32; }
/// impl Handler<Question> for Thinker {
///     async fn handle(&mut self, _: Question, _: &mut Context<Self>) -> Result<u32, Failure> {
///         tokio::time::sleep(self.0).await;
///         Ok(42)
///     }
/// }
///
/// testkit::run(async {
///     let rt = RuntimeHandle::local();
///     let hour = Duration::from_secs(3600);
///
///     let quick = rt.spawn(Thinker(hour / 2));
///     let start = Instant::now();
///     assert_eq!(quick.ask(Question).timeout(hour).await.unwrap(), 42);
///     assert_eq!(start.elapsed(), hour / 2);
///
///     let slow = rt.spawn(Thinker(2 * hour));
///     let start = Instant::now();
///     let answer = slow.ask(Question).timeout(hour).await;
///     assert!(matches!(answer, Err(AskError::Timeout(d)) if d == hour));
///     assert_eq!(start.elapsed(), hour);
/// });
/// ```
pub fn run<F: Future>(test: F) -> F::Output {
    match TestRuntime::new() {
        Ok(rt) => rt.block_on(test),
        Err(err) => panic!("postbox::testkit::run: cannot build the test runtime: {err}"),
    }
}

/// Runs `test` inside a fresh `LocalSet`, so that local-mode actors can be
/// spawned in it; for tests that already have a runtime, such as
/// `#[tokio::test(start_paused = true)]`.
///
/// Actors spawned in `test` are dropped when it returns.
///
/// # Example
///
/// ```
/// use postbox::testkit;
/// use postbox::{Actor, RuntimeHandle};
///
/// struct Idle;
/// impl Actor for Idle {}
///
/// // In a test: #[tokio::test(start_paused = true)]
/// #[tokio::main(flavor = "current_thread", start_paused = true)]
/// async fn main() {
///     testkit::local(async {
///         let idle = RuntimeHandle::local().spawn(Idle);
///         assert!(!idle.is_closed());
///     })
///     .await;
/// }
/// ```
pub async fn local<F: Future>(test: F) -> F::Output {
    LocalSet::new().run_until(test).await
}

/// A single-threaded tokio runtime with its clock paused and a `LocalSet`, for
/// tests that run in several steps.
///
/// [`run`] covers one-shot tests. A `TestRuntime` keeps its actors and its
/// clock between calls to [`block_on`](Self::block_on), so a test can set up in
/// one call, act in another, and check in a third.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use postbox::testkit::{TestProbe, TestRuntime};
///
/// #[derive(Debug, PartialEq)]
/// struct Hello;
/// impl postbox::Message for Hello { type Reply = (); }
///
/// let rt = TestRuntime::new().unwrap();
/// let mut probe = rt.block_on(async { TestProbe::<Hello>::new(&rt.handle()) });
/// let to_probe = probe.recipient();
/// rt.block_on(async { to_probe.send(Hello).await.unwrap() });
/// let got = rt.block_on(probe.expect_msg(Duration::from_secs(1)));
/// assert_eq!(got, Hello);
/// ```
pub struct TestRuntime {
    runtime: TokioRuntime,
    local: LocalSet,
}

impl std::fmt::Debug for TestRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestRuntime(current thread, paused clock)")
    }
}

impl TestRuntime {
    /// A current-thread runtime with every driver enabled and the clock paused.
    ///
    /// # Errors
    ///
    /// When the OS refuses the runtime's resources.
    pub fn new() -> io::Result<TestRuntime> {
        // Anchor `clock::now_ms` before this clock is paused: an anchor taken
        // later is ahead of the paused clock, and message timestamps (so TTLs)
        // would stand still until virtual time caught up with it.
        let _ = crate::clock::now_ms();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?;
        Ok(TestRuntime {
            runtime,
            local: LocalSet::new(),
        })
    }

    /// A handle that spawns actors on this runtime's `LocalSet` (the same as
    /// [`RuntimeHandle::local`]). Spawn from inside [`block_on`](Self::block_on).
    pub fn handle(&self) -> RuntimeHandle {
        RuntimeHandle::local()
    }

    /// Runs `future` to completion; actors spawned earlier run meanwhile.
    ///
    /// # Panics
    ///
    /// If called from inside a tokio runtime, or if `future` panics.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.local.block_on(&self.runtime, future)
    }
}
