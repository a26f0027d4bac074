//! Busy polling: an opt-in arbiter mode that trades CPU for latency.
//!
//! An idle arbiter thread sleeps in the kernel, and waking it from another
//! thread costs an inter-processor wake-up: 20–50 µs on a virtual machine, far
//! more than the work a message usually takes. A request-reply across arbiters
//! pays it twice.
//!
//! With [`RuntimeBuilder::busy_poll`](crate::RuntimeBuilder::busy_poll), each
//! arbiter runs a poller task that keeps the thread awake for a window after the
//! last message any of its actors handled: it yields to the scheduler in a loop,
//! so tokio keeps polling its timers and I/O driver and picks up work woken from
//! other threads within a microsecond or two, without a kernel wake-up. Once the
//! arbiter has been quiet for the whole window, the poller parks until an actor
//! on the thread handles a message again, and the thread sleeps as usual.
//!
//! The cost is one core kept busy while traffic flows (and for the window after
//! it). It suits latency-critical request-reply on machines with a core to
//! spare per arbiter; leave it off otherwise (the default).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Messages handled by actors on this thread, for the poller to notice activity.
    static HANDLED: Cell<u64> = const { Cell::new(0) };
    /// The parked poller of this thread, woken by the next handled message.
    static PARKED: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// Whether a poller runs on this thread (no waker bookkeeping otherwise).
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

/// Records that an actor on this thread handled a message.
#[inline]
pub(crate) fn note_handled() {
    HANDLED.with(|h| h.set(h.get().wrapping_add(1)));
    if POLLING.with(Cell::get)
        && let Some(waker) = PARKED.with(|p| p.borrow_mut().take())
    {
        waker.wake();
    }
}

/// How many poll rounds pass between clock reads.
const ROUNDS_PER_CLOCK_READ: u32 = 32;

/// The poller: spawned once on each arbiter of a busy-polling runtime.
pub(crate) async fn poller(window: Duration) {
    POLLING.with(|p| p.set(true));
    loop {
        // Hot: yield until no message has been handled for `window`.
        let mut seen = HANDLED.with(Cell::get);
        let mut quiet_since = Instant::now();
        let mut rounds = 0u32;
        loop {
            tokio::task::yield_now().await;
            let now = HANDLED.with(Cell::get);
            if now != seen {
                seen = now;
                rounds = 0;
                quiet_since = Instant::now();
                continue;
            }
            rounds += 1;
            if rounds.is_multiple_of(ROUNDS_PER_CLOCK_READ) && quiet_since.elapsed() >= window {
                break;
            }
        }
        // Cold: sleep until an actor here handles a message (woken the usual way).
        poll_fn(|cx| {
            if HANDLED.with(Cell::get) != seen {
                return Poll::Ready(());
            }
            PARKED.with(|p| *p.borrow_mut() = Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked() -> bool {
        PARKED.with(|p| p.borrow().is_some())
    }

    #[test]
    fn the_poller_spins_while_busy_parks_when_quiet_and_wakes_on_the_next_message() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            tokio::task::spawn_local(poller(Duration::from_millis(2)));
            tokio::task::yield_now().await;
            assert!(POLLING.with(Cell::get));
            // Busy: messages keep coming, so the poller keeps yielding.
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(10) {
                note_handled();
                tokio::task::yield_now().await;
                assert!(!parked(), "parked while messages were being handled");
            }
            // Quiet: after the window the poller parks (bounded wait, no timing assumption).
            let start = Instant::now();
            while !parked() && start.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(parked(), "the poller never parked");
            // The next handled message wakes it.
            note_handled();
            assert!(!parked());
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            assert!(!parked());
        });
    }
}
