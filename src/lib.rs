//! # postbox: actors on actix with mailboxes that push back
//!
//! `postbox` is the actor layer of the postbox messaging runtime. It runs on
//! actix's threads (an actix `System` and one `Arbiter` per core) and adds what
//! actix 0.13 leaves out:
//!
//! - **Bounded mailboxes that push back.** [`Addr::send`] waits for room;
//!   [`Addr::try_send`] fails at once with [`TrySendError::Full`] and returns the
//!   message. (actix's `Addr::send` queues past the capacity.)
//! - **Request-reply with deadlines.** [`Addr::ask`] resolves to the handler's
//!   reply; `.timeout(d)` gives [`AskError::Timeout`], and a request whose asker
//!   gave up is skipped, not executed, and counted.
//! - **Async handlers with `&mut self`.** A handler runs to completion before the
//!   next message, even across `.await`s.
//! - **Supervision.** Panics and errors in handlers are contained; a
//!   [`Supervisor`] rebuilds the child from its factory with fresh state, with
//!   restart policies, strategies, intensity limits, backoff and escalation.
//!   Messages queued for a restarting child are kept.
//! - **Death watch.** [`Context::watch`] tells an actor when another one's
//!   incarnation ends.
//! - **Works from any runtime.** A [`Runtime`] runs on threads of its own, so it
//!   is usable from `#[tokio::main]` (where actix actors cannot start) as well as
//!   from `#[actix::main]`.
//! - **Task actors.** A [`TaskActor`] (`Send`, with `Send` handler futures)
//!   runs as a task of the caller's tokio runtime instead, so that asks from
//!   that runtime's tasks stay on one thread; see [`spawn_task`].
//! - **A test kit** (feature `testkit`). `testkit` has probes that record what they receive,
//!   virtual time and a deterministic single-threaded mode.
//!
//! ```
//! use postbox::{Actor, Context, Failure, Handler, Message, Runtime};
//! use std::time::Duration;
//!
//! #[derive(Default)]
//! struct Counter { n: u64 }
//! impl Actor for Counter {}
//!
//! struct Add(u64);
//! impl Message for Add { type Reply = u64; }
//! impl Handler<Add> for Counter {
//!     async fn handle(&mut self, Add(k): Add, _: &mut Context<Self>) -> Result<u64, Failure> {
//!         self.n += k;
//!         Ok(self.n)
//!     }
//! }
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() {
//!     let rt = Runtime::new().unwrap();
//!     let counter = rt.build(|| Some(Counter::default())).mailbox(16).spawn();
//!     counter.send(Add(2)).await.unwrap();
//!     let n = counter.ask(Add(3)).timeout(Duration::from_secs(1)).await.unwrap();
//!     assert_eq!(n, 5);
//! }
//! ```

mod actor;
mod addr;
mod ask;
pub mod busy_poll;
mod cell;
pub mod clock;
mod context;
mod envelope;
mod failure;
mod mailbox;
mod runtime;
mod supervisor;
mod task;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use actor::{Actor, Handler, Message};
pub use addr::{
    ActorId, ActorStats, Addr, AnyAddr, Permit, Recipient, SendError, TrySendError, WeakAddr,
};
pub use ask::{Ask, AskError};
pub use context::Context;
pub use failure::{ExitReason, Failure, FailureKind};
pub use runtime::{Builder, DEFAULT_MAILBOX, Runtime, RuntimeBuilder, RuntimeHandle, ShutdownHook};
pub use supervisor::{
    Backoff, ChildInfo, ChildSpec, Restart, RestartStrategy, Strategy, Supervisor, SupervisorActor,
    SupervisorError, SupervisorSpec, TaskChildSpec,
};
pub use task::{TaskActor, TaskAddr, TaskAsk, TaskBuilder, TaskContext, TaskHandler, spawn_task};
