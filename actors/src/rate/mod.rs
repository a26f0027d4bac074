//! Rate limits: at most so many messages per second through a publisher
//! ([`Throttled`] queue handles and brokers) or into a consumer's handler
//! (the [`Throttle`] layer), for everything that shares a [`RateLimiter`], or
//! for each key of the messages.
//!
//! A [`RateLimit`] is a token bucket, computed as GCRA by the `governor`
//! crate: permits come one per interval, and up to a burst of them are kept
//! for later. Over the limit, a [`Throttle`] waits for the next permit (the
//! default: backpressure, as Akka Streams' `throttle`) or fails fast with
//! [`RateLimited`], which says when the next permit is due.
//!
//! Time is tokio's (governor's clock is implemented on
//! `tokio::time::Instant` in `clock`, and waits are tokio timers): under a
//! paused test clock limits hold exactly in virtual time.
//!
//! ```
//! use postbox_actors::{Envelope, RateLimit};
//! # postbox::testkit::run(async {
//! let limiter = RateLimit::per_second(10).burst(1).limiter();
//! let message = Envelope::new("hello");
//! assert!(limiter.check(&message).is_ok());
//! // The next permit is due in 100 ms.
//! let refused = limiter.check(&message).unwrap_err();
//! assert_eq!(refused.retry_after.as_millis(), 100);
//! limiter.until_ready(&message).await; // 100 ms later
//! # });
//! ```

mod clock;
mod throttle;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};

pub use throttle::{Throttle, ThrottleError, Throttled};

use crate::envelope::Envelope;
use crate::partition::PartitionKey;
use clock::{TokioClock, TokioInstant};

/// The shortest interval between permits.
const MIN_INTERVAL: Duration = Duration::from_nanos(1);

/// The longest interval, and the longest a full bucket may take to fill:
/// governor counts in 64-bit nanoseconds (584 years) and must not overflow.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The default burst is what the rate allows in this long, plus one: a
/// waiter that a timer wakes a little late then keeps the rate instead of
/// losing the lateness (with a burst of 1 it would lose up to a timer tick
/// per permit).
const SLACK: Duration = Duration::from_millis(50);

/// A keyed limiter prunes the keys it tracks when there are more than this,
/// and past twice what the previous pruning kept.
const PRUNE_FLOOR: usize = 1024;

/// How fast: one permit per interval, with a burst.
///
/// Arguments are clamped rather than refused: a rate of 0 is 1, and the
/// interval lies between 1 ns and 100 years.
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::RateLimit;
///
/// let limit = RateLimit::per_second(100);
/// assert_eq!(limit.interval(), Duration::from_millis(10));
/// assert_eq!(limit.burst_size(), 6); // 50 ms of the rate, plus one
/// let even = RateLimit::per_minute(30).burst(1);
/// assert_eq!(even.interval(), Duration::from_secs(2));
/// assert_eq!(even.burst_size(), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    interval: Duration,
    /// `None`: the default burst (see [`RateLimit::burst_size`]).
    burst: Option<u32>,
}

impl RateLimit {
    /// `n` permits per second: one every 1/n s, with the default burst.
    pub fn per_second(n: u32) -> Self {
        RateLimit::per(n, Duration::from_secs(1))
    }

    /// `n` permits per minute: one every 1/n min, with the default burst.
    pub fn per_minute(n: u32) -> Self {
        RateLimit::per(n, Duration::from_secs(60))
    }

    /// `n` permits per `period`: one every `period / n`, with the default
    /// burst.
    pub fn per(n: u32, period: Duration) -> Self {
        RateLimit::every(period / n.max(1))
    }

    /// One permit every `interval`.
    pub fn every(interval: Duration) -> Self {
        RateLimit {
            interval: interval.clamp(MIN_INTERVAL, MAX_SPAN),
            burst: None,
        }
    }

    /// At most `burst` permits at once (at least 1): how many an idle
    /// limiter lets through without waiting. A burst of 1 spaces every
    /// permit by the interval; in real time a waiter then loses however late
    /// its timer wakes it (100 per second with a burst of 1 ran at about 90
    /// per second here; the default burst kept 100).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst.max(1));
        self
    }

    /// The time between two permits at the steady rate.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The burst: as set, or by default what the rate allows in 50 ms plus
    /// one (1 for 10 per second and slower, 6 for 100 per second), so that
    /// a waiter woken a little late by its timer keeps the rate. It is capped
    /// so that a full bucket takes at most 100 years to fill.
    pub fn burst_size(&self) -> u32 {
        let interval = self.interval.as_nanos().max(1);
        let burst = match self.burst {
            Some(burst) => u128::from(burst),
            None => 1 + SLACK.as_nanos() / interval,
        };
        let most = (MAX_SPAN.as_nanos() / interval).max(1);
        u32::try_from(burst.min(most)).unwrap_or(u32::MAX)
    }

    /// A limiter with one bucket: everything that holds a clone of it shares
    /// the limit (a publisher, all the publishers of a queue, a consumer).
    pub fn limiter(self) -> RateLimiter {
        let limiter = governor::RateLimiter::direct_with_clock(self.quota(), TokioClock);
        RateLimiter::new(self, Kind::Direct(limiter))
    }

    /// A limiter with a bucket per key of the messages (their routing key, a
    /// header, or a function of the message), each with this limit. The
    /// messages without a key share one bucket.
    ///
    /// Keys are grouped by a 64-bit hash (no copy of the key is kept): two
    /// keys that share a hash share a bucket. A key's bucket is forgotten
    /// once it is full again (the key was idle for about interval × burst);
    /// the limiter prunes those when the keys it tracks double (from
    /// 1,024), so it holds at most twice the keys active within that time,
    /// or 1,024 (about 40 bytes each).
    ///
    /// ```
    /// use postbox_actors::{Envelope, RateLimit};
    /// use postbox_actors::partition::PartitionKey;
    /// # postbox::testkit::run(async {
    /// let per_user = RateLimit::per_second(1).per_key(PartitionKey::Header("user".into()));
    /// let from = |user: &str| Envelope::new("event").with_header("user", user);
    /// assert!(per_user.check(&from("ann")).is_ok());
    /// assert!(per_user.check(&from("ann")).is_err()); // ann's bucket is empty
    /// assert!(per_user.check(&from("bob")).is_ok()); // bob has his own
    /// # });
    /// ```
    pub fn per_key(self, key: PartitionKey) -> RateLimiter {
        let limiter = governor::RateLimiter::hashmap_with_clock(self.quota(), TokioClock);
        RateLimiter::new(
            self,
            Kind::Keyed {
                key,
                limiter,
                prune_at: AtomicUsize::new(PRUNE_FLOOR),
            },
        )
    }

    fn quota(&self) -> governor::Quota {
        let burst =
            std::num::NonZeroU32::new(self.burst_size()).unwrap_or(std::num::NonZeroU32::MIN);
        // `every` keeps the interval above zero, so this is never `None`.
        governor::Quota::with_period(self.interval)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MAX))
            .allow_burst(burst)
    }
}

/// Refused by a rate limit that fails fast: no permit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: the next permit is due in {retry_after:?}")]
#[non_exhaustive]
pub struct RateLimited {
    /// How long until the next permit is due (for this message's key).
    /// Retrying earlier is refused again; retrying then may still be, if
    /// another caller took that permit first.
    pub retry_after: Duration,
}

/// The state of a [`RateLimit`]: one bucket, or one per key. Cheap to clone;
/// clones share the buckets. Made by [`RateLimit::limiter`] and
/// [`RateLimit::per_key`].
///
/// [`check`](Self::check) takes a permit or says when one is due;
/// [`until_ready`](Self::until_ready) waits for one. Waiters are not queued:
/// when several wait for one bucket, whichever asks first when a permit is
/// due takes it.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    limit: RateLimit,
    kind: Kind,
}

type DirectLimiter =
    governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>;

/// Buckets by the key's hash; `None` is the bucket of messages without a key.
type KeyedLimiter = governor::RateLimiter<
    Option<u64>,
    HashMapStateStore<Option<u64>>,
    TokioClock,
    NoOpMiddleware<TokioInstant>,
>;

enum Kind {
    Direct(DirectLimiter),
    Keyed {
        key: PartitionKey,
        limiter: KeyedLimiter,
        /// Prune when more keys than this are tracked.
        prune_at: AtomicUsize,
    },
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("RateLimiter");
        out.field("limit", &self.inner.limit);
        if let Kind::Keyed { key, .. } = &self.inner.kind {
            out.field("key", key)
                .field("tracked_keys", &self.tracked_keys());
        }
        out.finish()
    }
}

impl From<RateLimit> for RateLimiter {
    /// [`RateLimit::limiter`]: one bucket.
    fn from(limit: RateLimit) -> Self {
        limit.limiter()
    }
}

impl RateLimiter {
    fn new(limit: RateLimit, kind: Kind) -> Self {
        RateLimiter {
            inner: Arc::new(Inner { limit, kind }),
        }
    }

    /// The limit.
    pub fn limit(&self) -> RateLimit {
        self.inner.limit
    }

    /// Whether it has a bucket per key.
    pub fn is_keyed(&self) -> bool {
        matches!(self.inner.kind, Kind::Keyed { .. })
    }

    /// Takes a permit for `message` (from its key's bucket, for a keyed
    /// limiter) if one is available now, or says when the next is due.
    pub fn check(&self, message: &Envelope) -> Result<(), RateLimited> {
        self.acquire(self.key_of(message))
            .map_err(|retry_after| RateLimited { retry_after })
    }

    /// Waits until a permit for `message` is available, and takes it.
    pub async fn until_ready(&self, message: &Envelope) {
        let key = self.key_of(message);
        while let Err(wait) = self.acquire(key) {
            tokio::time::sleep_until(postbox::clock::deadline(wait)).await;
        }
    }

    /// How many keys a keyed limiter holds a bucket for (0 for one that is
    /// not keyed).
    pub fn tracked_keys(&self) -> usize {
        match &self.inner.kind {
            Kind::Direct(_) => 0,
            Kind::Keyed { limiter, .. } => limiter.len(),
        }
    }

    /// Forgets the buckets of a keyed limiter's idle keys (those whose
    /// bucket is full again, which a fresh one would equal) and releases
    /// their memory. The limiter does this on its own as the keys it tracks
    /// grow; this is for after a burst of keys, when the limiter goes quiet.
    pub fn prune(&self) {
        if let Kind::Keyed {
            limiter, prune_at, ..
        } = &self.inner.kind
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            let kept = limiter.len();
            prune_at.store(PRUNE_FLOOR.max(kept.saturating_mul(2)), Ordering::Relaxed);
        }
    }

    fn key_of(&self, message: &Envelope) -> Option<u64> {
        match &self.inner.kind {
            Kind::Direct(_) => None,
            Kind::Keyed { key, .. } => key.hash_of(message),
        }
    }

    /// Takes a permit from `key`'s bucket, or says how long until one is due.
    fn acquire(&self, key: Option<u64>) -> Result<(), Duration> {
        let refused = match &self.inner.kind {
            Kind::Direct(limiter) => limiter.check(),
            Kind::Keyed {
                limiter, prune_at, ..
            } => {
                let taken = limiter.check_key(&key);
                // Amortized: a pruning scans every key, and comes only after
                // their number doubled.
                if limiter.len() > prune_at.load(Ordering::Relaxed) {
                    self.prune();
                }
                taken
            }
        };
        refused.map_err(|not_until| not_until.wait_time_from(TokioClock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Envelope {
        Envelope::new("m")
    }

    #[test]
    fn arguments_are_clamped() {
        assert_eq!(RateLimit::per_second(0), RateLimit::per_second(1));
        assert_eq!(RateLimit::per(5, Duration::ZERO).interval(), MIN_INTERVAL);
        assert_eq!(RateLimit::per_second(u32::MAX).interval(), MIN_INTERVAL);
        assert_eq!(RateLimit::every(Duration::MAX).interval(), MAX_SPAN);
        assert_eq!(RateLimit::per_second(10).burst(0).burst_size(), 1);
        // A full bucket fills within MAX_SPAN.
        assert_eq!(RateLimit::every(MAX_SPAN).burst(10).burst_size(), 1);
        let fast = RateLimit::per_second(u32::MAX).burst(u32::MAX);
        assert_eq!(fast.burst_size(), u32::MAX);
    }

    #[test]
    fn default_bursts_cover_50_ms() {
        let burst = |n| RateLimit::per_second(n).burst_size();
        assert_eq!(burst(1), 1);
        assert_eq!(burst(10), 1);
        assert_eq!(burst(20), 2);
        assert_eq!(burst(100), 6);
        assert_eq!(burst(1000), 51);
        assert_eq!(RateLimit::per_minute(1).burst_size(), 1);
        assert_eq!(RateLimit::per_second(100).burst(3).burst_size(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_limits_do_not_panic() {
        let slow = RateLimit::every(Duration::MAX).burst(u32::MAX).limiter();
        assert!(slow.check(&message()).is_ok());
        let refused = slow.check(&message()).unwrap_err();
        assert_eq!(refused.retry_after, MAX_SPAN);
        let fast = RateLimit::per_second(u32::MAX).burst(u32::MAX).limiter();
        for _ in 0..1000 {
            assert!(fast.check(&message()).is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_exact_in_paused_time() {
        let limiter = RateLimit::per_second(10).burst(2).limiter();
        assert!(limiter.check(&message()).is_ok());
        assert!(limiter.check(&message()).is_ok());
        let refused = limiter.check(&message()).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(30)).await;
        let refused = limiter.check(&message()).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(70));
        tokio::time::advance(Duration::from_millis(70)).await;
        assert!(limiter.check(&message()).is_ok());
        assert!(limiter.check(&message()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_spaced_by_the_interval() {
        let limiter = RateLimit::per_second(50).burst(1).limiter();
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            limiter.until_ready(&message()).await;
            at.push(start.elapsed().as_millis());
        }
        assert_eq!(at, vec![0, 20, 40, 60, 80]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keyed_limiter_forgets_idle_keys() {
        // One bucket per routing key, 10/s: a key is idle (its bucket full)
        // 100 ms after its last permit.
        let limiter = RateLimit::per_second(10).per_key(PartitionKey::RoutingKey);
        let keyed = |n: u32| message().with_routing_key(format!("k{n}"));
        // Fewer keys than the floor: all kept.
        for n in 0..500 {
            assert!(limiter.check(&keyed(n)).is_ok());
        }
        assert_eq!(limiter.tracked_keys(), 500);
        // A new key every millisecond: about 200 are live at any time, and
        // the limiter never holds more than the floor and one.
        let mut most = 0;
        for n in 500..20_000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(
                limiter.check(&keyed(n)).is_ok(),
                "a new key has a full bucket"
            );
            most = most.max(limiter.tracked_keys());
        }
        assert!(most <= PRUNE_FLOOR + 1, "{most}");
        assert!(limiter.tracked_keys() >= 100, "recent keys are kept");
        // The recent keys still have their (empty) buckets.
        assert!(limiter.check(&keyed(19_999)).is_err());
        // Idle for a second: pruning forgets them all.
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.prune();
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_without_a_key_share_a_bucket() {
        let limiter = RateLimit::per_second(1).per_key(PartitionKey::Header("user".into()));
        assert!(limiter.check(&message()).is_ok());
        assert!(limiter.check(&message()).is_err());
        assert!(limiter.check(&message().with_header("user", "ann")).is_ok());
        assert!(limiter.is_keyed());
        assert!(!RateLimit::per_second(1).limiter().is_keyed());
    }
}
