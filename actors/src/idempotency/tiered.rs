//! [`Tiered`]: a fast store in front of a guard store.

use std::time::Duration;

use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore};

/// Two stores in tiers: `fast` (Redis, memory) answers most duplicates;
/// `guard` (a database) is the last word, asked for every key the fast tier
/// lets through. A claim must be won in both; a key is done if either says
/// so; completing writes the guard first. This is the usual "Redis for
/// speed, the database as the last guard" combination: if the fast tier
/// forgets a key (evicted, restarted, flushed), the guard still knows it.
///
/// ```
/// use postbox_actors::idempotency::{DiskStore, Idempotent, MemoryStore, Tiered};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("pbx-tiered-doc-{}", std::process::id()));
/// let store = Tiered::new(MemoryStore::new(100_000), DiskStore::open(&dir)?);
/// let layer = Idempotent::by_message_id(store);
/// # let _ = layer; let _ = std::fs::remove_dir_all(&dir);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Tiered<F, G> {
    fast: F,
    guard: G,
}

impl<F: IdempotencyStore, G: IdempotencyStore> Tiered<F, G> {
    /// `fast` in front of `guard`.
    pub fn new(fast: F, guard: G) -> Self {
        Tiered { fast, guard }
    }

    /// The fast tier.
    pub fn fast(&self) -> &F {
        &self.fast
    }

    /// The guard tier.
    pub fn guard(&self) -> &G {
        &self.guard
    }
}

impl<F: IdempotencyStore, G: IdempotencyStore> IdempotencyStore for Tiered<F, G> {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        let fast_expired = match self.fast.claim(key, token, lease).await? {
            Claim::Acquired { expired } => expired,
            other => return Ok(other),
        };
        let guarded = self.guard.claim(key, token, lease).await;
        match guarded {
            Ok(Claim::Acquired { expired }) => Ok(Claim::Acquired {
                expired: expired || fast_expired,
            }),
            Ok(Claim::Done) => {
                // The fast tier forgot it: teach it again, for as long as a
                // lease (the guard keeps the real retention).
                let _ = self.fast.complete(key, token, lease).await;
                Ok(Claim::Done)
            }
            other => {
                let _ = self.fast.release(key, token).await;
                other
            }
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        let ours = self.guard.complete(key, token, retain).await?;
        if let Err(err) = self.fast.complete(key, token, retain).await {
            // The guard has it: a duplicate costs a trip to the guard.
            tracing::debug!(%key, %err, "the fast tier did not record a done key");
        }
        Ok(ours)
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        let released = self.guard.release(key, token).await;
        let _ = self.fast.release(key, token).await;
        released
    }
}
