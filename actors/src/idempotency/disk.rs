//! [`DiskStore`]: done keys in postbox's own storage format, so that they
//! survive a restart (and `kill -9`).
//!
//! Claims live in memory only: a claim belongs to a running consumer, and a
//! restart ends every consumer, so none is worth keeping. What must survive
//! is the record that a key was handled, and that is written and synced
//! before the layer acknowledges the delivery.
//!
//! The directory holds `LOCK` (held while a store has it open) and
//! `idempotency.log`: the 24-byte header of postbox's store files (kind 5)
//! and CRC-32C frames, one per done key:
//!
//! ```text
//! 1 done  until_ms: u64 LE  key_len: u16 LE  key
//! ```
//!
//! Concurrent completions share one `fdatasync` (a writer thread takes all
//! that are waiting). The log is rewritten with the keys still retained once
//! it holds many more records than that (atomically: a new file, synced,
//! renamed over the old one, the directory synced). At opening a torn tail
//! is cut and a damaged record skipped, with an `error!` event.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::idempotency::memory::MemoryStore;
use crate::idempotency::{Claim, ClaimToken, IdempotencyError, IdempotencyStore, validate_key};
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};

const LOG: &str = "idempotency.log";
const STORE: &str = "disk";
/// Records appended beyond the live ones before the log is rewritten.
const REWRITE_SLACK: u64 = 1 << 16;

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
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

struct Job {
    frame: Vec<u8>,
    done: oneshot::Sender<Result<(), IdempotencyError>>,
}

impl DiskStore {
    /// Opens (or creates) the store in `dir`, keeping up to 1,000,000 keys.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IdempotencyError> {
        Self::with_capacity(dir, 1_000_000)
    }

    /// Opens (or creates) the store in `dir`, keeping up to `capacity` keys.
    /// Fails if another store has the directory open, or its log is not an
    /// idempotency log of a version this code reads.
    pub fn with_capacity(dir: impl AsRef<Path>, capacity: usize) -> Result<Self, IdempotencyError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |op: &str, err: std::io::Error| {
            IdempotencyError::unavailable(STORE, format!("{op} {}: {err}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io("create", e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io("open LOCK in", e))?;
        lock.try_lock().map_err(|_| {
            IdempotencyError::unavailable(
                STORE,
                format!("{} is in use by another store", dir.display()),
            )
        })?;
        let path = dir.join(LOG);
        let keys = MemoryStore::new(capacity);
        let records = match std::fs::read(&path) {
            Ok(data) => load(&path, Bytes::from(data), &keys)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                create(&path, &[]).map_err(|e| io("create log in", e))?;
                sync_dir(&dir).map_err(|e| io("sync", e))?;
                0
            }
            Err(err) => return Err(io("read log in", err)),
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io("open log in", e))?;
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            dir: dir.clone(),
            file,
            appended: records,
            live_at_rewrite: records,
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("postbox-idempotency".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io("start the writer for", e))?;
        Ok(DiskStore {
            keys,
            writer: Mutex::new(Some(tx)),
            thread: Some(thread),
            dir,
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

    async fn persist(&self, key: &str, until_ms: u64) -> Result<(), IdempotencyError> {
        let mut payload = Vec::with_capacity(11 + key.len());
        payload.push(1);
        payload.extend_from_slice(&until_ms.to_le_bytes());
        // Keys are at most MAX_KEY_LEN (512) bytes: the length fits.
        payload.extend_from_slice(&(key.len() as u16).to_le_bytes());
        payload.extend_from_slice(key.as_bytes());
        let mut frame = Vec::with_capacity(payload.len() + frame::FRAME_LEN);
        frame::write_frame(&mut frame, &payload);
        let (done, rx) = oneshot::channel();
        let sent = self
            .writer
            .lock()
            .as_ref()
            .map(|tx| tx.send(Job { frame, done }).is_ok());
        if sent != Some(true) {
            return Err(IdempotencyError::Closed);
        }
        rx.await.unwrap_or(Err(IdempotencyError::Closed))
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.writer.lock().take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
        let until_ms =
            now_ms().saturating_add(u64::try_from(retain.as_millis()).unwrap_or(u64::MAX));
        self.persist(key, until_ms).await?;
        Ok(self.keys.complete_now(key, token, retain))
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<bool, IdempotencyError> {
        self.keys.release(key, token).await
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A done record: (until_ms, key).
fn decode(payload: &[u8]) -> Option<(u64, &str)> {
    let (&kind, rest) = payload.split_first()?;
    if kind != 1 || rest.len() < 10 {
        return None;
    }
    let until = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let len = u16::from_le_bytes(rest[8..10].try_into().ok()?) as usize;
    let key = std::str::from_utf8(rest.get(10..10 + len)?).ok()?;
    (rest.len() == 10 + len && validate_key(key).is_ok()).then_some((until, key))
}

/// Reads the log into `keys`; cuts a torn tail. Returns the records read.
fn load(path: &Path, data: Bytes, keys: &MemoryStore) -> Result<u64, IdempotencyError> {
    let file = path.display().to_string();
    frame::check_header(&data, FileKind::Idempotency, &file)
        .map_err(|e| IdempotencyError::unavailable(STORE, e))?;
    let now = now_ms();
    let mut latest: FxHashMap<&str, u64> = FxHashMap::default();
    let mut order = Vec::new();
    let mut records = 0;
    let mut scan = Scan::new(data.clone(), HEADER_LEN);
    let mut payloads = Vec::new();
    for item in scan.by_ref() {
        match item {
            Scanned::Frame { payload, .. } => payloads.push(payload),
            Scanned::Damaged { offset, len } => {
                tracing::error!(file, offset, len, "damaged idempotency record skipped");
            }
        }
    }
    for payload in &payloads {
        let Some((until, key)) = decode(payload) else {
            tracing::error!(file, "unreadable idempotency record skipped");
            continue;
        };
        records += 1;
        if latest.insert(key, until).is_none() {
            order.push(key);
        }
    }
    let instant = tokio::time::Instant::now();
    for key in order {
        let until = latest.get(key).copied().unwrap_or(0);
        if until > now {
            keys.insert_done(key, instant + Duration::from_millis(until - now));
        }
    }
    if scan.torn() {
        let end = scan.valid_end() as u64;
        tracing::warn!(file, end, "torn tail of the idempotency log cut");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(end).and_then(|()| f.sync_all()))
            .map_err(|e| IdempotencyError::unavailable(STORE, format!("truncate {file}: {e}")))?;
    }
    Ok(records)
}

/// Writes a new log at `path` holding `frames`, synced.
fn create(path: &Path, frames: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(&frame::header(FileKind::Idempotency, 0))?;
    file.write_all(frames)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Writer {
    dir: PathBuf,
    file: File,
    appended: u64,
    live_at_rewrite: u64,
    _lock: File,
}

impl Writer {
    /// Takes every job waiting, writes them, syncs once, answers them all.
    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let mut buf = Vec::new();
            for job in &jobs {
                buf.extend_from_slice(&job.frame);
            }
            let result = self
                .file
                .write_all(&buf)
                .and_then(|()| self.file.sync_data())
                .map_err(|e| IdempotencyError::unavailable(STORE, format!("write {LOG}: {e}")));
            if result.is_ok() {
                self.appended += jobs.len() as u64;
            }
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
            if self.appended > self.live_at_rewrite.saturating_mul(2) + REWRITE_SLACK
                && let Err(err) = self.rewrite()
            {
                tracing::error!(%err, "rewriting the idempotency log failed: it keeps growing");
                self.live_at_rewrite = self.appended;
            }
        }
    }

    /// Rewrites the log with the latest record of each key still retained.
    fn rewrite(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(LOG);
        let data = Bytes::from(std::fs::read(&path)?);
        let now = now_ms();
        let mut latest: FxHashMap<&str, (u64, Bytes)> = FxHashMap::default();
        let mut order = Vec::new();
        let payloads: Vec<Bytes> = Scan::new(data.clone(), HEADER_LEN)
            .filter_map(|item| match item {
                Scanned::Frame { payload, .. } => Some(payload),
                Scanned::Damaged { .. } => None,
            })
            .collect();
        for payload in &payloads {
            if let Some((until, key)) = decode(payload)
                && latest.insert(key, (until, payload.clone())).is_none()
            {
                order.push(key);
            }
        }
        let mut frames = Vec::new();
        let mut live = 0;
        for key in order {
            if let Some((until, payload)) = latest.get(key)
                && *until > now
            {
                frame::write_frame(&mut frames, payload);
                live += 1;
            }
        }
        let tmp = self.dir.join(format!("{LOG}.new"));
        create(&tmp, &frames)?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.appended = live;
        self.live_at_rewrite = live;
        Ok(())
    }
}
