//! governor's [`Clock`] on tokio's clock. governor's own clocks read the
//! system's monotonic clock, which a paused tokio clock does not move, so a
//! limit would neither refill in a test's virtual time nor follow
//! `tokio::time::advance`; on [`tokio::time::Instant`] it does both, and in
//! production it is the same monotonic clock.

use std::ops::Add;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;
use tokio::time::Instant;

/// Reads [`tokio::time::Instant::now`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TokioClock;

/// A reading of [`TokioClock`]. (governor's [`Reference`] cannot be
/// implemented for tokio's `Instant` here: both are foreign.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TokioInstant(pub(crate) Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;

    fn add(self, nanos: Nanos) -> TokioInstant {
        // `RateLimit` clamps its spans far below what an Instant holds: the
        // fallbacks only keep this from panicking.
        let d = Duration::from(nanos);
        TokioInstant(
            self.0
                .checked_add(d)
                .or_else(|| self.0.checked_add(FAR_FUTURE))
                .unwrap_or(self.0),
        )
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        nanos(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

/// About 30 years (tokio's own "far future").
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `d` in governor's nanoseconds, saturating at 584 years (its `From`
/// panics past that).
pub(crate) fn nanos(d: Duration) -> Nanos {
    Nanos::from(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_time() {
        let clock = TokioClock;
        let before = clock.now();
        tokio::time::advance(Duration::from_millis(250)).await;
        let after = clock.now();
        assert_eq!(
            after.duration_since(before),
            Nanos::from(Duration::from_millis(250))
        );
        assert_eq!(before.duration_since(after), Nanos::from(Duration::ZERO));
        assert_eq!(before + Nanos::from(Duration::from_millis(250)), after);
        assert_eq!(
            after.saturating_sub(Nanos::from(Duration::from_millis(250))),
            before
        );
    }
}
