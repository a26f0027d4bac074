//! How a consumer or a stream subscriber is kept running: each restarts
//! itself (a [`RestartStrategy`], no supervisor actor) with fresh state when
//! it fails, within a restart limit and with backoff; and something must
//! hold its address while it runs, whether or not its handle is kept
//! ([`Kept`]).

use std::any::Any;
use std::time::Duration;

use postbox::{Actor, Addr, AnyAddr, Backoff, Restart, RestartStrategy};

/// How a consumer, or a stream subscriber, is restarted after it fails: at
/// most `max_restarts` within `window`, `backoff` apart.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Supervision {
    pub(crate) max_restarts: usize,
    pub(crate) window: Duration,
    pub(crate) backoff: Backoff,
}

impl Default for Supervision {
    /// Never give up. A first crash restarts at once (in microseconds); a
    /// crash loop backs off from 10 ms, doubling with each consecutive crash,
    /// to 30 s (a consumer that ran for a whole minute starts again from an
    /// immediate restart). A crash-looping consumer costs little and stays
    /// visible; one that gave up would leave its queue without a consumer,
    /// silently.
    fn default() -> Self {
        Supervision {
            max_restarts: usize::MAX,
            window: Duration::from_secs(60),
            backoff: Backoff::exponential(Duration::from_millis(10), Duration::from_secs(30))
                .immediate(1),
        }
    }
}

impl Supervision {
    /// The strategy the actor restarts itself by: after failures only (a
    /// consumer that stops normally, cancelled or its queue gone, is done).
    pub(crate) fn strategy(&self) -> RestartStrategy {
        RestartStrategy::new(Restart::Transient)
            .intensity(self.max_restarts, self.window)
            .backoff(self.backoff)
    }
}

/// A running consumer or subscriber, kept by its broker or stream: its
/// untyped handle, and its typed address, which keeps its mailbox open until
/// it stops for good.
pub(crate) struct Kept {
    pub(crate) any: AnyAddr,
    _addr: Box<dyn Any + Send>,
}

impl Kept {
    pub(crate) fn new<A: Actor>(addr: &Addr<A>) -> Self {
        Kept {
            any: addr.any(),
            _addr: Box::new(addr.clone()),
        }
    }
}
