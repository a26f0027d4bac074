//! How a consumer or a stream subscriber is kept running: each gets a
//! supervisor of its own, built from a [`Supervision`], that restarts it with
//! fresh state when it fails, within a restart limit and with backoff, and
//! that goes away with it.

use std::sync::Arc;
use std::time::Duration;

use postbox::{Backoff, SupervisorSpec};

/// How a consumer, or a stream subscriber, is restarted after it fails: at
/// most `max_restarts` within `window`, `backoff` apart. Each gets a
/// supervisor of its own built from this.
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
    /// A supervisor named `name` with these limits; add the child and spawn it.
    pub(crate) fn spec(&self, name: impl Into<Arc<str>>) -> SupervisorSpec {
        SupervisorSpec::new(name)
            .intensity(self.max_restarts, self.window)
            .backoff(self.backoff)
            // It exists for its one child: when that stops for good (cancelled,
            // or its queue or stream went away), so does the supervisor.
            .auto_shutdown(true)
    }
}
