//! Wall-clock time that obeys tokio's clock.
//!
//! Timestamps, TTLs and request deadlines travel inside messages as Unix-epoch
//! milliseconds. [`now_ms`] reads the system clock once, at first use, and from
//! then on advances with tokio's monotonic [`Instant`]. Two consequences:
//!
//! - Under tokio's paused clock (`#[tokio::test(start_paused = true)]`), message
//!   timestamps, expirations and deadlines move with virtual time, so tests of
//!   TTLs and deadlines need no real waiting.
//! - In production it is monotonic: a system clock step (NTP) does not make
//!   messages expire early or late. It drifts from the system clock only as far
//!   as the monotonic clock does.
//!
//! ```
//! let a = postbox::clock::now_ms();
//! let b = postbox::clock::now_ms();
//! assert!(b >= a);
//! assert!(a > 1_600_000_000_000); // a real epoch timestamp
//! ```

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

struct Anchor {
    epoch_ms: u64,
    at: std::time::Instant,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| Anchor {
        epoch_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        at: std::time::Instant::now(),
    })
}

/// Milliseconds since the Unix epoch, on tokio's clock (see the module docs).
pub fn now_ms() -> u64 {
    let anchor = anchor();
    // tokio's Instant is std's, shifted by however far a paused clock was advanced.
    // It can be earlier than the anchor (a runtime paused before the anchor was
    // taken), so the offset is signed.
    let now = Instant::now().into_std();
    match now.checked_duration_since(anchor.at) {
        Some(ahead) => anchor.epoch_ms.saturating_add(ahead.as_millis() as u64),
        None => anchor
            .epoch_ms
            .saturating_sub(anchor.at.duration_since(now).as_millis() as u64),
    }
}

/// How long until the epoch-millisecond `deadline_ms`; zero if it has passed.
pub fn until(deadline_ms: u64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(now_ms()))
}

/// The tokio [`Instant`] `d` from now. Any duration works: one reaching past
/// what an `Instant` can hold (`Duration::MAX`, say) gives a deadline about 30
/// years away, which never comes, instead of overflowing.
///
/// ```
/// use std::time::Duration;
/// let never = postbox::clock::deadline(Duration::MAX);
/// assert!(never > tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
/// ```
pub fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`deadline`] gives for durations too long to represent (tokio's own
/// "far future").
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The epoch-millisecond time `d` from now.
pub fn after(d: Duration) -> u64 {
    now_ms().saturating_add(d.as_millis().min(u64::MAX as u128) as u64)
}
