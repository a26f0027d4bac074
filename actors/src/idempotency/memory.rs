//! [`MemoryStore`]: claims and done keys in a bounded table in memory, with
//! TTLs; also the claim table of the [`DiskStore`](super::DiskStore).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore, validate_key};

/// An idempotency store in memory: fast, bounded, gone with the process.
///
/// It holds at most `capacity` keys. When full, the oldest done or expired
/// key makes room (so a duplicate arriving after more than `capacity` newer
/// keys were handled is no longer recognized: size it for the keys that a
/// redelivery window spans). Keys being claimed are never evicted: when all
/// `capacity` keys are claims in progress, a claim fails with
/// [`IdempotencyError::Full`]. Time is tokio's clock (paused time in tests).
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::idempotency::{Claim, ClaimToken, IdempotencyStore, MemoryStore};
/// # postbox::testkit::run(async {
/// let store = MemoryStore::new(10_000);
/// let (a, b) = (ClaimToken::new(), ClaimToken::new());
/// let lease = Duration::from_secs(30);
/// assert_eq!(store.claim("order-1", a, lease).await?, Claim::Acquired { expired: false });
/// assert_eq!(store.claim("order-1", b, lease).await?, Claim::Busy);
/// store.complete("order-1", a, Duration::from_secs(3600)).await?;
/// assert_eq!(store.claim("order-1", b, lease).await?, Claim::Done);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    table: Mutex<Table>,
}

impl MemoryStore {
    /// A store of at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            table: Mutex::new(Table::new(capacity)),
        }
    }

    /// How many keys it holds (claimed or done, expired ones not yet evicted
    /// included).
    pub fn len(&self) -> usize {
        self.table.lock().map.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `key` done until `until` without a claim (a store loading
    /// what it recorded before).
    pub(crate) fn insert_done(&self, key: &str, until: Instant) {
        let mut table = self.table.lock();
        let now = Instant::now();
        table.make_room(now);
        table.set(Arc::from(key), State::Done, until);
    }

    /// Whether a token other than `token` holds `key`'s claim now.
    pub(crate) fn held_by_other(&self, key: &str, token: ClaimToken) -> bool {
        let table = self.table.lock();
        let now = Instant::now();
        matches!(table.map.get(key), Some(e) if e.until > now && matches!(e.state, State::Claimed(t) if t != token))
    }

    fn claim_now(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        validate_key(key)?;
        let now = Instant::now();
        let mut table = self.table.lock();
        let expired = match table.map.get(key) {
            Some(e) if e.until > now => {
                return Ok(match e.state {
                    State::Done => Claim::Done,
                    State::Claimed(_) => Claim::Busy,
                });
            }
            Some(e) => matches!(e.state, State::Claimed(_)),
            None => {
                table.make_room(now);
                if table.map.len() >= table.capacity {
                    return Err(IdempotencyError::Full(table.map.len()));
                }
                false
            }
        };
        table.set(Arc::from(key), State::Claimed(token), now + lease);
        Ok(Claim::Acquired { expired })
    }

    pub(crate) fn complete_now(&self, key: &str, token: ClaimToken, retain: Duration) -> bool {
        let now = Instant::now();
        let mut table = self.table.lock();
        let ours = match table.map.get(key) {
            Some(e) if e.until > now => e.state == State::Claimed(token),
            // Nobody holds it (expired, or evicted): record it all the same.
            _ => true,
        };
        if ours {
            if !table.map.contains_key(key) {
                table.make_room(now);
            }
            table.set(Arc::from(key), State::Done, now + retain);
        }
        ours
    }

    fn release_now(&self, key: &str, token: ClaimToken) -> bool {
        let mut table = self.table.lock();
        let ours = matches!(table.map.get(key), Some(e) if e.state == State::Claimed(token));
        if ours {
            table.map.remove(key);
        }
        ours
    }
}

impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        self.claim_now(key, token, lease)
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        Ok(self.complete_now(key, token, retain))
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        Ok(self.release_now(key, token))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Claimed(ClaimToken),
    Done,
}

#[derive(Debug)]
struct Entry {
    state: State,
    until: Instant,
    /// Matches the entry's latest place in `Table::order`.
    stamp: u64,
}

/// Keys with their state and expiry, and the order they were last set in
/// (for eviction, oldest first; stale places are skipped).
#[derive(Debug)]
struct Table {
    map: FxHashMap<Arc<str>, Entry>,
    order: VecDeque<(Arc<str>, u64)>,
    next_stamp: u64,
    capacity: usize,
}

impl Table {
    fn new(capacity: usize) -> Self {
        Table {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            next_stamp: 0,
            capacity: capacity.max(1),
        }
    }

    fn set(&mut self, key: Arc<str>, state: State, until: Instant) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.push_back((key.clone(), stamp));
        self.map.insert(
            key,
            Entry {
                state,
                until,
                stamp,
            },
        );
        // Stale places pile up as keys are set again: drop them now and then.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|e| e.stamp == *s));
        }
    }

    /// Evicts, oldest first, until a new key fits: expired keys and done
    /// keys go; claims in progress are kept (moved to the back).
    fn make_room(&mut self, now: Instant) {
        let mut budget = self.order.len();
        while self.map.len() >= self.capacity && budget > 0 {
            budget -= 1;
            let Some((key, stamp)) = self.order.pop_front() else {
                break;
            };
            let Some(entry) = self.map.get(&key) else {
                continue;
            };
            if entry.stamp != stamp {
                continue;
            }
            if entry.until <= now || entry.state == State::Done {
                self.map.remove(&key);
            } else {
                self.order.push_back((key, stamp));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn claims_expire_and_done_keys_expire() {
        let store = MemoryStore::new(16);
        let (a, b) = (ClaimToken::new(), ClaimToken::new());
        let lease = Duration::from_secs(10);
        assert_eq!(
            store.claim("k", a, lease).await,
            Ok(Claim::Acquired { expired: false })
        );
        assert_eq!(store.claim("k", b, lease).await, Ok(Claim::Busy));
        tokio::time::advance(Duration::from_secs(11)).await;
        // a's lease ran out: b takes over, and a can neither release nor
        // complete b's claim.
        assert_eq!(
            store.claim("k", b, lease).await,
            Ok(Claim::Acquired { expired: true })
        );
        assert_eq!(store.release("k", a).await, Ok(false));
        assert_eq!(store.complete("k", a, lease).await, Ok(false));
        assert_eq!(
            store.complete("k", b, Duration::from_secs(5)).await,
            Ok(true)
        );
        assert_eq!(store.claim("k", a, lease).await, Ok(Claim::Done));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            store.claim("k", a, lease).await,
            Ok(Claim::Acquired { expired: false })
        );
        assert_eq!(store.release("k", a).await, Ok(true));
        assert_eq!(
            store.claim("k", b, lease).await,
            Ok(Claim::Acquired { expired: false })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_done_keys_evicted_oldest_first_claims_kept() {
        let store = MemoryStore::new(100);
        let lease = Duration::from_secs(60);
        let held = ClaimToken::new();
        assert!(matches!(
            store.claim("held", held, lease).await,
            Ok(Claim::Acquired { .. })
        ));
        for i in 0..10_000 {
            let key = format!("k{i}");
            let t = ClaimToken::new();
            assert!(matches!(
                store.claim(&key, t, lease).await,
                Ok(Claim::Acquired { .. })
            ));
            assert_eq!(
                store.complete(&key, t, Duration::from_secs(3600)).await,
                Ok(true)
            );
            assert!(store.len() <= 100);
        }
        // The claim in progress survived; the newest done keys are known.
        assert_eq!(
            store.claim("held", ClaimToken::new(), lease).await,
            Ok(Claim::Busy)
        );
        assert_eq!(
            store.claim("k9999", ClaimToken::new(), lease).await,
            Ok(Claim::Done)
        );
        assert!(store.table.lock().order.len() <= 2 * 100 + 64);
    }

    #[tokio::test(start_paused = true)]
    async fn full_of_claims_is_a_typed_error_and_bad_keys_refused() {
        let store = MemoryStore::new(2);
        let lease = Duration::from_secs(60);
        for k in ["a", "b"] {
            assert!(store.claim(k, ClaimToken::new(), lease).await.is_ok());
        }
        assert_eq!(
            store.claim("c", ClaimToken::new(), lease).await,
            Err(IdempotencyError::Full(2))
        );
        assert_eq!(
            store.claim("", ClaimToken::new(), lease).await,
            Err(IdempotencyError::EmptyKey)
        );
        let long = "x".repeat(crate::idempotency::MAX_KEY_LEN + 1);
        assert!(matches!(
            store.claim(&long, ClaimToken::new(), lease).await,
            Err(IdempotencyError::KeyTooLong { .. })
        ));
    }

    #[test]
    fn one_of_many_concurrent_claimants_wins() {
        let store = Arc::new(MemoryStore::new(1024));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                            .expect("runtime");
                        rt.block_on(async {
                            (0..100)
                                .filter(|i| {
                                    matches!(
                                        store.claim_now(
                                            &format!("key-{i}"),
                                            ClaimToken::new(),
                                            Duration::from_secs(60)
                                        ),
                                        Ok(Claim::Acquired { .. })
                                    )
                                })
                                .count()
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(
            winners, 100,
            "each of 100 keys claimed by exactly one of 8 threads"
        );
    }
}
