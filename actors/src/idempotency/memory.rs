//! [`MemoryStore`]: claims and done keys in a bounded table in memory, with
//! TTLs; also the claim table of the [`DiskStore`](super::DiskStore).

use std::collections::{VecDeque, hash_map};
use std::hash::{BuildHasher, RandomState};
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
    hasher: RandomState,
}

impl MemoryStore {
    /// A store of at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            table: Mutex::new(Table::new(capacity)),
            hasher: RandomState::new(),
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

    /// A key's 128-bit digest: SipHash-1-3 under a random key, and FxHash.
    /// Holding digests instead of strings keeps an entry small and
    /// allocation-free; two distinct keys share a digest only if both
    /// hashes collide (the keyed one alone: about n²/2⁶⁵, a few in a
    /// hundred million for a million keys; both together: none in practice).
    fn digest(&self, key: &str) -> u128 {
        let fx = rustc_hash::FxBuildHasher.hash_one(key);
        (u128::from(self.hasher.hash_one(key)) << 64) | u128::from(fx)
    }

    /// Records `key` done until `until` without a claim (a store loading
    /// what it recorded before).
    pub(crate) fn insert_done(&self, key: &str, until: Instant) {
        let key = self.digest(key);
        let mut table = self.table.lock();
        let now = Instant::now();
        table.make_room(now);
        table.set(key, State::Done, until);
    }

    /// Whether a token other than `token` holds `key`'s claim now.
    pub(crate) fn held_by_other(&self, key: &str, token: ClaimToken) -> bool {
        let key = self.digest(key);
        let table = self.table.lock();
        let now = Instant::now();
        matches!(table.map.get(&key), Some(e) if e.until > now && matches!(e.state, State::Claimed(t) if t != token))
    }

    fn claim_now(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        validate_key(key)?;
        let key = self.digest(key);
        let now = Instant::now();
        let mut table = self.table.lock();
        // Full: make room first (one key early at worst), so that the
        // lookup and the insert are one probe.
        if table.map.len() >= table.capacity {
            table.make_room(now);
        }
        let stamp = table.next_stamp;
        let capacity = table.capacity;
        let len = table.map.len();
        let expired = match table.map.entry(key) {
            hash_map::Entry::Occupied(mut e) => {
                let entry = e.get_mut();
                if entry.until > now {
                    return Ok(match entry.state {
                        State::Done => Claim::Done,
                        State::Claimed(_) => Claim::Busy,
                    });
                }
                let expired = matches!(entry.state, State::Claimed(_));
                *entry = Entry {
                    state: State::Claimed(token),
                    until: now + lease,
                    stamp,
                };
                expired
            }
            hash_map::Entry::Vacant(e) => {
                if len >= capacity {
                    return Err(IdempotencyError::Full(len));
                }
                e.insert(Entry {
                    state: State::Claimed(token),
                    until: now + lease,
                    stamp,
                });
                false
            }
        };
        table.placed(key, stamp);
        Ok(Claim::Acquired { expired })
    }

    pub(crate) fn complete_now(&self, key: &str, token: ClaimToken, retain: Duration) -> bool {
        let key = self.digest(key);
        let now = Instant::now();
        let mut table = self.table.lock();
        match table.map.get_mut(&key) {
            // The usual case: still ours (its lease may have run out, but
            // nobody took it over): done in place, keeping its place in the
            // eviction order.
            Some(e) if e.state == State::Claimed(token) => {
                e.state = State::Done;
                e.until = now + retain;
                true
            }
            Some(e) if e.until > now => false,
            // Nobody holds it (expired, or evicted): record it all the same.
            _ => {
                if !table.map.contains_key(&key) {
                    table.make_room(now);
                }
                table.set(key, State::Done, now + retain);
                true
            }
        }
    }

    fn release_now(&self, key: &str, token: ClaimToken) -> bool {
        let key = self.digest(key);
        let mut table = self.table.lock();
        let ours = matches!(table.map.get(&key), Some(e) if e.state == State::Claimed(token));
        if ours {
            table.map.remove(&key);
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
    /// Keys by their 128-bit digest (see [`Table::digest`]).
    map: FxHashMap<u128, Entry>,
    order: VecDeque<(u128, u64)>,
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

    fn set(&mut self, key: u128, state: State, until: Instant) {
        let stamp = self.next_stamp;
        self.map.insert(
            key,
            Entry {
                state,
                until,
                stamp,
            },
        );
        self.placed(key, stamp);
    }

    /// Records that `key` was set with `stamp`, last in the eviction order.
    fn placed(&mut self, key: u128, stamp: u64) {
        self.next_stamp = stamp + 1;
        self.order.push_back((key, stamp));
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
            // One probe: look and remove through the entry.
            if let hash_map::Entry::Occupied(entry) = self.map.entry(key)
                && entry.get().stamp == stamp
            {
                if entry.get().until <= now || entry.get().state == State::Done {
                    entry.remove();
                } else {
                    self.order.push_back((key, stamp));
                }
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
        let store = std::sync::Arc::new(MemoryStore::new(1024));
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
