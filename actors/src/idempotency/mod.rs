//! Idempotent consumers: a message delivered twice (a producer's retry, an
//! ack lost to a crash, a redelivery after the handler's side effect) runs its
//! handler once.
//!
//! [`Idempotent`] is a consumer [`Layer`](crate::Layer). For each delivery it takes a key
//! (the message id, or a business key such as an order id), **claims** it in
//! an [`IdempotencyStore`] before the handler runs, and then:
//!
//! | the claim | what the layer does |
//! |---|---|
//! | acquired | runs the handler; on `Ok` records the key **done** and acks; on `Err` **releases** the claim and lets the consumer's [`OnError`](crate::OnError) policy settle the delivery; on a panic (a consumer crash) releases it too |
//! | done | acks without running the handler (a duplicate, counted as skipped) |
//! | busy: another consumer holds it | requeues the delivery after a short delay, so that it is seen again once the other one has finished (then it is done, or free again) |
//! | the store failed | returns the error: the consumer's `OnError` policy settles the delivery, which is never acked unprocessed |
//!
//! A claim has a lease: a claimant that vanishes without releasing (the
//! process died) loses its claim when the lease runs out, and a redelivery
//! runs the handler then. A done key is remembered for the layer's
//! [retention](Idempotent::retain).
//!
//! Stores, all behind one trait:
//!
//! - [`MemoryStore`]: in memory, bounded, with TTLs;
//! - [`DiskStore`]: postbox's own storage, survives restarts;
//! - `RedisStore` (feature `redis`): `SET key token NX PX lease` claims, as in
//!   the usual Redis recipe;
//! - `PostgresStore` (feature `postgres`): an inbox table, and the
//!   transactional inbox, where the handler's own writes commit in the same
//!   transaction as the key;
//! - [`Tiered`]: a fast store in front of a guard store ("Redis for speed, the
//!   database as the last guard").
//!
//! What the claim protects: the handler runs at most once per key at a time,
//! and never again once it succeeded and the key was recorded. A crash
//! *between* the handler's side effect and the record of it is the one gap
//! left: the redelivery runs the handler again. Close it by making the side
//! effect and the record one transaction (the PostgreSQL transactional inbox),
//! or by a unique constraint on the side effect (the guard of [`Tiered`]).
//!
//! ```
//! use std::time::Duration;
//! use postbox_actors::{Delivery, LayerExt};
//! use postbox_actors::idempotency::{Idempotent, MemoryStore};
//!
//! let store = MemoryStore::new(100_000);
//! let charge = || |d: Delivery| async move {
//!     let _order: String = d.decode()?;
//!     // charge the customer: runs once per order id
//!     Ok(())
//! };
//! // Keyed by the order id in a header; the layer acks after recording it.
//! let factory = charge.layer(
//!     Idempotent::by_key(store, |d: &Delivery| {
//!         d.header("order-id").and_then(|v| v.as_str()).map(str::to_owned)
//!     })
//!     .retain(Duration::from_secs(24 * 3600)),
//! );
//! # let _ = factory;
//! ```

mod disk;
mod layer;
mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod tiered;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use disk::DiskStore;
pub use layer::{Idempotent, IdempotentConsumer, KeyFn};
pub use memory::MemoryStore;
pub use tiered::Tiered;

/// The longest key a store accepts, in bytes (namespace included).
pub const MAX_KEY_LEN: usize = 512;

/// Identifies one claim, so that only its claimant completes or releases it
/// (a claimant whose lease ran out cannot release its successor's claim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub uuid::Uuid);

impl ClaimToken {
    /// A fresh, random token.
    pub fn new() -> Self {
        ClaimToken(uuid::Uuid::new_v4())
    }
}

impl Default for ClaimToken {
    fn default() -> Self {
        ClaimToken::new()
    }
}

/// What a [claim](IdempotencyStore::claim) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is now claimed with the caller's token: run the handler, then
    /// complete or release the claim.
    Acquired {
        /// It was claimed before by someone whose lease ran out (a claimant
        /// that died without releasing it). Stores that cannot tell say
        /// `false`.
        expired: bool,
    },
    /// The key was handled already: skip it.
    Done,
    /// Another claimant holds the key now.
    Busy,
}

/// Why an idempotency store failed. The delivery is not acknowledged: the
/// consumer's error policy settles it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The key is empty.
    #[error("an idempotency key must not be empty")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("an idempotency key of {len} bytes exceeds the {limit}-byte limit")]
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The delivery carries no key (the key function found none).
    #[error("the delivery has no idempotency key: {0}")]
    NoKey(String),
    /// The store could not be reached or failed (a network error, a server
    /// error, an I/O error).
    #[error("idempotency store {store} failed: {message}")]
    Unavailable {
        /// Which store.
        store: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The store holds as many claims as it may and none can be evicted.
    #[error("idempotency store is full ({0} claims in progress)")]
    Full(usize),
    /// The store was closed.
    #[error("idempotency store is closed")]
    Closed,
}

impl IdempotencyError {
    /// An [`Unavailable`](Self::Unavailable) error from `store`.
    pub fn unavailable(store: &'static str, err: impl std::fmt::Display) -> Self {
        IdempotencyError::Unavailable {
            store,
            message: err.to_string(),
        }
    }
}

/// Checks a key: not empty, at most [`MAX_KEY_LEN`] bytes.
pub fn validate_key(key: &str) -> Result<(), IdempotencyError> {
    if key.is_empty() {
        return Err(IdempotencyError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(IdempotencyError::KeyTooLong {
            len: key.len(),
            limit: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Where idempotent consumers claim keys and record them done.
///
/// A key has three states: free, claimed (by one token, until its lease
/// ends), done (until its retention ends). Implementations must make
/// [`claim`](Self::claim) atomic: of concurrent claims of a free key, exactly
/// one is [`Claim::Acquired`]. Expired claims and expired done keys are free.
///
/// The futures are `Send`, so that the layer can release a crashed
/// claimant's claim from a task of its own.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `lease` with `token`, if it is free (or its claim
    /// expired).
    fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, IdempotencyError>> + Send;

    /// Records `key` done, to be remembered for `retain`, if `token` still
    /// holds its claim (or nobody does). Returns `false` if another token
    /// holds it: this claim's lease ran out and someone else took over (the
    /// handler ran twice; the layer says so with a warning).
    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> impl Future<Output = Result<bool, IdempotencyError>> + Send;

    /// Frees `key` if `token` holds its claim; returns whether it did.
    fn release(
        &self,
        key: &str,
        token: ClaimToken,
    ) -> impl Future<Output = Result<bool, IdempotencyError>> + Send;
}

impl<S: IdempotencyStore> IdempotencyStore for Arc<S> {
    fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, IdempotencyError>> + Send {
        (**self).claim(key, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> impl Future<Output = Result<bool, IdempotencyError>> + Send {
        (**self).complete(key, token, retain)
    }

    fn release(
        &self,
        key: &str,
        token: ClaimToken,
    ) -> impl Future<Output = Result<bool, IdempotencyError>> + Send {
        (**self).release(key, token)
    }
}

/// What an [`Idempotent`] layer has done, over all the consumers it wraps
/// (see [`Idempotent::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// Keys claimed, and so handlers run.
    pub claimed: u64,
    /// Keys recorded done after their handler succeeded.
    pub completed: u64,
    /// Duplicates acknowledged without running the handler.
    pub skipped: u64,
    /// Deliveries requeued because another consumer held their key.
    pub busy: u64,
    /// Claims released: the handler failed, or its consumer crashed.
    pub released: u64,
    /// Claims taken over from a claimant whose lease had run out.
    pub expired: u64,
    /// Store failures (the delivery was left to the error policy).
    pub store_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    claimed: AtomicU64,
    completed: AtomicU64,
    skipped: AtomicU64,
    busy: AtomicU64,
    released: AtomicU64,
    expired: AtomicU64,
    store_errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> IdempotencyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IdempotencyStats {
            claimed: get(&self.claimed),
            completed: get(&self.completed),
            skipped: get(&self.skipped),
            busy: get(&self.busy),
            released: get(&self.released),
            expired: get(&self.expired),
            store_errors: get(&self.store_errors),
        }
    }
}
