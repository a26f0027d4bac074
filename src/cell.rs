//! The cell: the task that hosts one actor for its whole life, across restarts.
//!
//! The cell owns the mailbox, so messages queued for an actor survive its
//! restarts. Each incarnation is built from the factory, runs `started`, handles
//! messages one at a time with panics caught, and runs `stopped`. When an
//! incarnation ends, the cell fires its death watchers and, if the actor is
//! supervised, reports to the parent and waits for its decision (restart after a
//! delay, or stop) in its out-of-band control inbox.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::mailbox;
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::actor::Actor;
use crate::addr::{Control, ControlBox, Shared};
use crate::busy_poll;
use crate::context::Context;
use crate::envelope::Envelope;
use crate::failure::{ExitReason, Failure};
use crate::runtime::RuntimeHandle;
use crate::supervisor::SelfSupervision;

/// Builds a fresh actor for each incarnation; `None` means it cannot be rebuilt.
pub(crate) type Factory<A> = Box<dyn FnMut() -> Option<A> + Send>;

/// Tells the parent how an incarnation ended; resolves to false if the parent is gone.
pub(crate) type Parent = Box<dyn FnMut(u64, ExitReason) -> BoxFuture<'static, bool> + Send>;

pub(crate) struct Cell<A: Actor> {
    pub(crate) factory: Factory<A>,
    pub(crate) rx: mailbox::Receiver<Envelope<A>>,
    pub(crate) weak: mailbox::WeakSender<Envelope<A>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) runtime: RuntimeHandle,
    pub(crate) oversight: Oversight,
    pub(crate) ended: Ended,
}

/// Ends the actor for good if its cell is dropped before it finished: when
/// its runtime shuts down (the arbiter drops its tasks), or when it could not
/// be started at all. Its death watchers fire and `terminated()` resolves; the
/// mailbox closes with the cell, so senders and askers get `Closed`.
pub(crate) struct Ended {
    pub(crate) shared: Arc<Shared>,
    pub(crate) done: bool,
}

impl Drop for Ended {
    fn drop(&mut self) {
        if !self.done {
            self.shared
                .end_incarnation(u64::MAX, &ExitReason::Stopped, true);
        }
    }
}

/// How one incarnation ended, from the cell's point of view.
pub(crate) enum End {
    /// On its own (stop, failure, mailbox closed): the parent decides what next.
    Exit(ExitReason),
    /// Restart ordered by the supervisor.
    Restart(Duration),
    /// Stop ordered from outside.
    Stop { report: bool },
}

/// What a supervisor decided about an ended incarnation.
enum Decision {
    Restart(Duration),
    Stop,
}

/// Who decides whether an ended incarnation is followed by another: the
/// actor's supervisor, its own restart strategy, or nobody (it ends). The
/// same for arbiter actors and task actors.
pub(crate) struct Oversight {
    pub(crate) parent: Option<Parent>,
    /// Restarts without a parent (see [`crate::RestartStrategy`]).
    pub(crate) own: Option<Box<SelfSupervision>>,
}

impl Oversight {
    /// After incarnation `incarnation` ended with `end`: `None` once the
    /// next one may start (its backoff waited out), or the reason the actor
    /// ends for good.
    pub(crate) async fn after(
        &mut self,
        end: End,
        incarnation: u64,
        shared: &Shared,
        span: &tracing::Span,
    ) -> Option<ExitReason> {
        let (reason, from_outside) = match end {
            End::Exit(reason) => (reason, false),
            End::Restart(delay) => {
                shared.end_incarnation(incarnation, &ExitReason::Restarted, false);
                pause(delay).await;
                return None;
            }
            End::Stop { report: false } => return Some(ExitReason::Stopped),
            End::Stop { report: true } => (ExitReason::Stopped, true),
        };
        if let ExitReason::Failed(failure) = &reason {
            shared.failures.fetch_add(1, Ordering::Relaxed);
            span.in_scope(|| tracing::warn!(incarnation, %failure, "actor failed"));
        }
        shared.end_incarnation(incarnation, &reason, false);
        if let Some(own) = self.own.as_mut() {
            // Stopped from outside: for good, whatever the strategy.
            if from_outside {
                return Some(reason);
            }
            return match span.in_scope(|| own.decide(reason)) {
                Ok(delay) if pause_unless_stopped(delay, &shared.control).await => None,
                Ok(_) => Some(ExitReason::Stopped),
                Err(reason) => Some(reason),
            };
        }
        let Some(parent) = self.parent.as_mut() else {
            return Some(reason);
        };
        if !parent(incarnation, reason.clone()).await {
            return Some(reason);
        }
        match decision(&shared.control, incarnation).await {
            Decision::Restart(delay) => {
                pause(delay).await;
                None
            }
            Decision::Stop => Some(reason),
        }
    }
}

pub(crate) async fn run<A: Actor>(mut cell: Cell<A>) {
    let span =
        tracing::debug_span!("actor", id = %cell.shared.id, name = cell.shared.name.as_deref());
    let last = loop {
        let incarnation = cell.shared.begin_incarnation();
        let mut ctx = Context::new(
            cell.weak.clone(),
            cell.shared.clone(),
            cell.runtime.clone(),
            incarnation,
        );
        let end = live(
            &mut cell.factory,
            &mut ctx,
            &mut cell.rx,
            &cell.shared.control,
        )
        .await;
        ctx.abort_tasks();
        // Boxed, as `terminate`: the supervisor's round trip and the backoff
        // are rare, and their state would otherwise grow every idle actor's
        // task.
        let next = Box::pin(cell.oversight.after(end, incarnation, &cell.shared, &span)).await;
        if let Some(last) = next {
            break last;
        }
    };
    // Boxed: what lives across its await would otherwise grow every idle
    // actor's task.
    Box::pin(terminate(&mut cell.rx, &mut cell.ended, last, span)).await;
}

/// Ends the actor for good. Closing the mailbox drops what is queued:
/// pending asks get `Closed`. A sender that reserved its slot before the
/// close may still deliver after it: `recv` ends only once no such slot is
/// outstanding, so a late request is dropped here too instead of waiting
/// forever in a mailbox nobody reads (`try_recv` until empty missed it).
pub(crate) async fn terminate<E>(
    rx: &mut mailbox::Receiver<E>,
    ended: &mut Ended,
    last: ExitReason,
    span: tracing::Span,
) {
    rx.close();
    while rx.recv().await.is_some() {}
    ended.shared.end_incarnation(u64::MAX, &last, true);
    ended.done = true;
    span.in_scope(|| tracing::debug!(reason = %last, "actor terminated"));
}

/// Waits out a restart's backoff. No delay costs nothing: a zero-length
/// sleep would still wait for the timer wheel's next tick (a millisecond).
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        // Boxed: a timer entry is large, and every idle actor's task would
        // otherwise reserve room for one.
        Box::pin(tokio::time::sleep(delay)).await;
    }
}

/// A self-supervised actor's backoff: true when it is over, false if the
/// actor was stopped meanwhile (it then stays stopped).
async fn pause_unless_stopped(delay: Duration, control: &ControlBox) -> bool {
    if delay.is_zero() {
        return true;
    }
    let sleep = Box::pin(tokio::time::sleep(delay));
    let stopped = Box::pin(async {
        loop {
            if let Control::Stop { .. } = control.recv().await {
                return;
            }
        }
    });
    matches!(
        futures::future::select(sleep, stopped).await,
        futures::future::Either::Left(_)
    )
}

/// Waits in the control inbox for the supervisor's decision about
/// `incarnation` (a restart ordered for an earlier one is stale).
async fn decision(control: &ControlBox, incarnation: u64) -> Decision {
    loop {
        match control.recv().await {
            Control::Restart {
                incarnation: target,
                delay,
            } if target >= incarnation => return Decision::Restart(delay),
            Control::Restart { .. } => continue,
            Control::Stop { .. } => return Decision::Stop,
        }
    }
}

/// One incarnation: built from the factory, started, fed messages, stopped.
/// The actor lives only in this future's state (built here, not moved in),
/// and the once-per-incarnation hooks are boxed, so that the cell's task
/// stays small: an idle actor costs its state and little more.
async fn live<A: Actor>(
    factory: &mut Factory<A>,
    ctx: &mut Context<A>,
    rx: &mut mailbox::Receiver<Envelope<A>>,
    control: &ControlBox,
) -> End {
    let mut actor = match build(factory) {
        Ok(Some(actor)) => actor,
        Ok(None) => return End::Stop { report: false },
        Err(reason) => return End::Exit(reason),
    };
    let shared = ctx.any().shared;
    let end = match caught(Box::pin(actor.started(ctx))).await {
        Some(reason) => End::Exit(reason),
        None => loop {
            if ctx.is_stopping() {
                break End::Exit(ExitReason::Normal);
            }
            tokio::select! {
                biased;
                cmd = control.recv() => match cmd {
                    Control::Stop { report } => break End::Stop { report },
                    Control::Restart { incarnation, delay } if incarnation >= ctx.incarnation() => {
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
                    busy_poll::note_handled();
                    if let Some(reason) = failed {
                        break End::Exit(reason);
                    }
                    if rx.is_empty() && let Some(reason) = caught(actor.drained(ctx)).await {
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

/// A fresh actor from the factory: `Ok(None)` if it cannot be built, `Err`
/// if the factory panicked.
pub(crate) fn build<A>(
    factory: &mut (dyn FnMut() -> Option<A> + Send),
) -> Result<Option<A>, ExitReason> {
    std::panic::catch_unwind(AssertUnwindSafe(factory))
        .map_err(|panic| ExitReason::Failed(Failure::from_panic(panic)))
}

/// Runs a hook's or a handler's future with its panic caught: the reason
/// the incarnation ends if it failed or panicked, `None` if it went well.
/// (A combinator, not an `async fn`: no second copy of `run` in the state
/// of every idle actor's task.)
pub(crate) fn caught(
    run: impl Future<Output = Result<(), Failure>>,
) -> impl Future<Output = Option<ExitReason>> {
    AssertUnwindSafe(run)
        .catch_unwind()
        .map(|outcome| match outcome {
            Ok(Ok(())) => None,
            Ok(Err(failure)) => Some(ExitReason::Failed(failure)),
            Err(panic) => Some(ExitReason::Failed(Failure::from_panic(panic))),
        })
}

/// Runs the `stopped` hook; its panic is logged (the incarnation is over
/// anyway).
pub(crate) fn stopped_caught<'a>(
    stopped: impl Future<Output = ()> + 'a,
    shared: &'a Shared,
) -> impl Future<Output = ()> + 'a {
    AssertUnwindSafe(stopped).catch_unwind().map(move |outcome| {
        if let Err(panic) = outcome {
            tracing::warn!(actor = %shared.id, failure = %Failure::from_panic(panic), "panic in stopped()");
        }
    })
}

/// Drops an incarnation's actor; a panic in its `Drop` is logged.
pub(crate) fn drop_caught<A>(actor: A, shared: &Shared) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(actor))) {
        tracing::warn!(actor = %shared.id, failure = %Failure::from_panic(panic), "panic in drop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeHandle;

    struct Big([u64; 32]);
    impl Actor for Big {
        async fn started(&mut self, _: &mut Context<Self>) -> Result<(), Failure> {
            // A large local held across an await: a large `started` future.
            let scratch = [1u8; 512];
            tokio::task::yield_now().await;
            self.0[0] = u64::from(scratch[7]);
            Ok(())
        }
    }

    /// An idle actor's task is its state plus a fixed overhead: the actor is
    /// stored once (not moved in and copied), and the once-per-incarnation
    /// hooks and backoff timers are boxed. A regression here multiplies by
    /// every queue and consumer of an application.
    #[test]
    fn a_cell_task_costs_its_actor_plus_a_small_fixed_overhead() {
        let (tx, rx) = mailbox::channel::<Envelope<Big>>(1);
        let shared = Arc::new(Shared::new(None, &tx));
        let cell = Cell {
            factory: Box::new(|| Some(Big([0; 32]))),
            rx,
            weak: tx.downgrade(),
            shared: shared.clone(),
            runtime: RuntimeHandle::local(),
            oversight: Oversight {
                parent: None,
                own: None,
            },
            ended: Ended { shared, done: true },
        };
        let size = std::mem::size_of_val(&run(cell));
        let overhead = size - std::mem::size_of::<Big>();
        assert!(
            overhead <= 640,
            "{size} bytes for a {}-byte actor",
            std::mem::size_of::<Big>()
        );
    }
}
