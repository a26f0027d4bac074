//! [`DiskStore`]: done keys in postbox's own storage format, so that they
//! survive a restart (and `kill -9`).
//!
//! Claims live in memory only: a claim belongs to a running consumer, and a
//! restart ends every consumer, so none is worth keeping. What must survive
//! is the record that a key was handled, and that is written and synced
//! before the layer acknowledges the delivery.
//!
//! The directory holds `LOCK` (held while a store has it open) and
//! `idempotency.log`, a key log (postbox's file header and CRC-32C frames,
//! one record per done key with the time it is kept until; see the storage
//! docs). Concurrent completions share one `fdatasync`; the log is rewritten
//! with the keys still retained once it holds many more records than that.
//! At opening a torn tail is cut and a damaged record skipped, with an
//! `error!` event.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::idempotency::memory::MemoryStore;
use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore, validate_key};
use crate::store::keylog::KeyLog;

const LOG: &str = "idempotency.log";
const STORE: &str = "disk";

/// An idempotency store on disk: claims in memory, done keys in a log in
/// `dir` that survives restarts. At most `capacity` keys are kept (as
/// [`MemoryStore`]: the oldest done keys make room).
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::idempotency::{Claim, ClaimToken, DiskStore, IdempotencyStore};
/// # postbox::testkit::run(async {
/// # let dir = std::env::temp_dir().join(format!("pbx-disk-doc-{}", std::process::id()));
/// let store = DiskStore::open(&dir)?;
/// let token = ClaimToken::new();
/// store.claim("order-7", token, Duration::from_secs(30)).await?;
/// store.complete("order-7", token, Duration::from_secs(3600)).await?;
/// drop(store);
/// let reopened = DiskStore::open(&dir)?;
/// let again = reopened.claim("order-7", ClaimToken::new(), Duration::from_secs(30)).await?;
/// assert_eq!(again, Claim::Done);
/// # drop(reopened); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct DiskStore {
    keys: MemoryStore,
    log: KeyLog,
    dir: PathBuf,
    _lock: std::fs::File,
}

impl DiskStore {
    /// Opens (or creates) the store in `dir`, keeping up to 1,000,000 keys.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IdempotencyError> {
        Self::with_capacity(dir, 1_000_000)
    }

    /// Opens (or creates) the store in `dir`, keeping up to `capacity` keys.
    /// Fails if another store has the directory open, or its log is not a
    /// key log of a version this code reads.
    pub fn with_capacity(dir: impl AsRef<Path>, capacity: usize) -> Result<Self, IdempotencyError> {
        let dir = dir.as_ref().to_path_buf();
        let unavailable = |err: String| IdempotencyError::unavailable(STORE, err);
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("create {}: {e}", dir.display())))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| unavailable(format!("open {}/LOCK: {e}", dir.display())))?;
        lock.try_lock()
            .map_err(|_| unavailable(format!("{} is in use by another store", dir.display())))?;
        let (log, live) =
            KeyLog::open(&dir.join(LOG), 0, true).map_err(|e| unavailable(e.to_string()))?;
        let keys = MemoryStore::new(capacity);
        let now = postbox::clock::now_ms();
        let instant = tokio::time::Instant::now();
        for (key, until) in live {
            match std::str::from_utf8(&key) {
                Ok(key) if validate_key(key).is_ok() => {
                    keys.insert_done(
                        key,
                        instant + Duration::from_millis(until.saturating_sub(now)),
                    );
                }
                _ => {
                    tracing::error!(dir = %dir.display(), "a done key that is not a valid key skipped")
                }
            }
        }
        Ok(DiskStore {
            keys,
            log,
            dir,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many keys it holds in memory (claimed or done).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl IdempotencyStore for DiskStore {
    async fn claim(
        &self,
        key: &str,
        token: ClaimToken,
        lease: Duration,
    ) -> Result<Claim, IdempotencyError> {
        self.keys.claim(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        retain: Duration,
    ) -> Result<bool, IdempotencyError> {
        validate_key(key)?;
        if self.keys.held_by_other(key, token) {
            // Another claimant took over: it records the key.
            return Ok(false);
        }
        let retain_ms = u64::try_from(retain.as_millis()).unwrap_or(u64::MAX);
        let until = postbox::clock::now_ms().saturating_add(retain_ms);
        crate::store::confirmed(Some(self.log.append(key.as_bytes(), until)))
            .await
            .map_err(|err| match err {
                crate::store::StoreError::Closed => IdempotencyError::Closed,
                err => IdempotencyError::unavailable(STORE, err),
            })?;
        Ok(self.keys.complete_now(key, token, retain))
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        self.keys.release(key, token).await
    }
}
