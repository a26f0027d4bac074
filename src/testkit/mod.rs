//! A test kit for actors: probes that record what they receive, virtual time,
//! and a deterministic single-threaded mode.
//!
//! Rust has no standard equivalent of Akka's `ActorTestKit`; this module is
//! postbox's. It is part of the public crate (as `tokio-test` is a plain crate),
//! so applications use it in their own tests. The messaging layer adds its own
//! helpers on top (a capturing broker, a delivery probe, fault injection for
//! consumers) in `postbox_actors::testkit`.
//!
//! # The pieces
//!
//! - [`TestProbe`]: an actor whose address (or [`Recipient`](crate::Recipient))
//!   you hand to the code under test. It records every message it receives;
//!   [`expect_msg`](TestProbe::expect_msg),
//!   [`expect_msg_matching`](TestProbe::expect_msg_matching),
//!   [`expect_no_msg`](TestProbe::expect_no_msg) and
//!   [`receive_n`](TestProbe::receive_n) wait for them with a timeout and fail
//!   with a message that shows what arrived instead. Each has a `try_` variant
//!   that returns a [`ProbeError`] instead of panicking.
//! - [`run`], [`local`] and [`TestRuntime`]: run a test on one thread, with
//!   actors in local mode ([`RuntimeHandle::local`](crate::RuntimeHandle::local))
//!   and tokio's clock paused.
//! - [`advance`]: move the paused clock forward by hand.
//!
//! # Virtual time
//!
//! Every timer in postbox goes through tokio's clock: ask timeouts
//! ([`Ask::timeout`](crate::Ask::timeout)), supervisor backoff
//! ([`Backoff`](crate::Backoff)), [`Context::notify_later`](crate::Context::notify_later),
//! message timestamps and the TTLs and deadlines counted from them (see
//! [`clock`](crate::clock)), and whatever handlers await with `tokio::time`. When the clock is paused
//! and every task is waiting, tokio jumps the clock to the next timer instead of
//! sleeping, so a test that waits for an hour-long timeout finishes at once and
//! observes exactly one hour on [`tokio::time::Instant`]. [`advance`] moves the
//! clock by a chosen amount instead, firing the timers that fall due.
//!
//! Two ways to get a paused clock with postbox's actors on the test's thread:
//!
//! ```
//! use postbox::testkit;
//!
//! // In a plain `#[test] fn`: `run` builds a current-thread runtime with the
//! // clock paused, and the LocalSet that local-mode actors run on.
//! testkit::run(async {
//!     // RuntimeHandle::local() spawns actors here.
//! });
//! ```
//!
//! ```
//! use postbox::testkit;
//!
//! // In a test: #[tokio::test(start_paused = true)]
//! #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn main() {
//!     // The attribute paused the clock; `local` adds the LocalSet.
//!     testkit::local(async {
//!         // RuntimeHandle::local() spawns actors here.
//!     })
//!     .await;
//! }
//! ```
//!
//! Paused time only governs the test's own thread. Actors on a real
//! [`Runtime`](crate::Runtime) run on arbiter threads with clocks of their own;
//! worse, a paused test clock jumps ahead whenever the test thread waits for
//! them, so its timeouts fire early. Tests that use real arbiters should not
//! pause the clock.
//!
//! # Determinism
//!
//! In local mode everything runs on the test's thread, so a test's outcome does
//! not depend on the machine or on the OS scheduler:
//!
//! - one thread: no two handlers ever run at the same time;
//! - mailboxes are FIFO, and an actor handles one message at a time, to
//!   completion, even across `.await`s;
//! - the `LocalSet` runs tasks in the order they become ready, and actors are
//!   tasks started in spawn order; with a paused clock, timers fire in deadline
//!   order, and nothing depends on how long the code takes to run.
//!
//! Running the same test twice gives the same interleaving of all its actors.
//! What stays non-deterministic: values drawn from randomness (message ids),
//! absolute epoch timestamps (they start from the real time of day; differences
//! between them are virtual), the iteration order of hash maps, and anything
//! that runs on other threads. Across the arbiters of a real
//! [`Runtime`](crate::Runtime), only each actor's own order is guaranteed (FIFO
//! per sender, one message at a time); how actors on different threads
//! interleave is up to the OS.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use postbox::testkit::{self, TestProbe};
//! use postbox::{Actor, Context, Failure, Handler, Message, Recipient, RuntimeHandle};
//!
//! /// Doubles numbers and reports them to a listener.
//! struct Doubler { out: Recipient<Doubled> }
//! impl Actor for Doubler {}
//!
//! struct Num(u32);
//! impl Message for Num { type Reply = (); }
//!
//! #[derive(Debug, PartialEq)]
//! struct Doubled(u32);
//! impl Message for Doubled { type Reply = (); }
//!
//! impl Handler<Num> for Doubler {
//!     async fn handle(&mut self, Num(n): Num, _: &mut Context<Self>) -> Result<(), Failure> {
//!         self.out.send(Doubled(n * 2)).await.map_err(|_| Failure::msg("listener gone"))
//!     }
//! }
//!
//! testkit::run(async {
//!     let rt = RuntimeHandle::local();
//!     let mut probe = TestProbe::<Doubled>::new(&rt);
//!     let doubler = rt.spawn(Doubler { out: probe.recipient() });
//!     doubler.send(Num(2)).await.unwrap();
//!     doubler.send(Num(5)).await.unwrap();
//!     assert_eq!(probe.expect_msg(Duration::from_secs(1)).await, Doubled(4));
//!     probe.expect_msg_eq(Doubled(10), Duration::from_secs(1)).await;
//!     probe.expect_no_msg(Duration::from_secs(1)).await;
//! });
//! ```

mod probe;
mod time;

pub use probe::{ProbeActor, ProbeError, ProbeErrorKind, TestProbe};
pub use time::{TestRuntime, advance, local, run};
