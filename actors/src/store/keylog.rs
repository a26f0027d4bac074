//! A small durable log of keys, each with a time: the duplicate windows of
//! durable queues (message ids, with the time each was accepted) and the
//! disk idempotency store (done keys, with the time each is kept until).
//!
//! One file: the 24-byte header of postbox's store files (kind 5) and
//! CRC-32C frames, one per key:
//!
//! ```text
//! 1 key  time_ms: u64 LE  key_len: u16 LE  key
//! ```
//!
//! A key's latest record wins. A record is dead once `time_ms + ttl_ms` has
//! passed. Appends from many callers share one write and one `fdatasync`: a
//! writer thread takes all that are waiting. The file is rewritten with the
//! live records once it holds many more than that (a new file, synced,
//! renamed over the old one, the directory synced). At opening a torn tail is
//! cut and a damaged record skipped, with an `error!` event.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use crate::store::StoreError;
use crate::store::disk::{Disk, RealDisk};
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};
use crate::store::log::Confirm;

/// Records appended beyond the live ones before the file is rewritten.
const REWRITE_SLACK: u64 = 1 << 16;

/// A key log open for appending (see the module docs).
pub(crate) struct KeyLog {
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for KeyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLog").field("path", &self.path).finish()
    }
}

struct Job {
    frame: Vec<u8>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A key and its time, as read back.
pub(crate) type KeyTime = (Bytes, u64);

impl KeyLog {
    /// Opens (or creates) the log at `path`; returns it with the live keys,
    /// oldest time first. `sync`: each group is `fdatasync`ed before it is
    /// confirmed (else only written to the OS).
    pub(crate) fn open(
        path: &Path,
        ttl_ms: u64,
        sync: bool,
    ) -> Result<(KeyLog, Vec<KeyTime>), StoreError> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, &e))?;
        let (records, live) = match std::fs::read(path) {
            Ok(data) => load(path, Bytes::from(data), ttl_ms)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                create(path, &[]).map_err(|e| StoreError::io("create", path, &e))?;
                RealDisk
                    .sync_dir(&dir)
                    .map_err(|e| StoreError::io("sync", &dir, &e))?;
                (0, Vec::new())
            }
            Err(err) => return Err(StoreError::io("read", path, &err)),
        };
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, &e))?;
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            path: path.to_path_buf(),
            dir,
            file,
            ttl_ms,
            sync,
            appended: records,
            live_at_rewrite: live.len() as u64,
        };
        let thread = std::thread::Builder::new()
            .name("postbox-keylog".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io("start the writer thread for", path, &e))?;
        Ok((
            KeyLog {
                writer: Mutex::new(Some(tx)),
                thread: Some(thread),
                path: path.to_path_buf(),
            },
            live,
        ))
    }

    /// Appends `key` at `time_ms`; the confirmation comes once it is
    /// written (and synced, if the log syncs) with its group.
    pub(crate) fn append(&self, key: &[u8], time_ms: u64) -> Confirm {
        let mut payload = Vec::with_capacity(11 + key.len());
        payload.push(1);
        payload.extend_from_slice(&time_ms.to_le_bytes());
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&key[..usize::from(len)]);
        let mut frame = Vec::with_capacity(payload.len() + frame::FRAME_LEN);
        frame::write_frame(&mut frame, &payload);
        let (done, confirm) = oneshot::channel();
        if let Some(tx) = self.writer.lock().as_ref()
            && let Err(mpsc::SendError(job)) = tx.send(Job { frame, done })
        {
            let _ = job.done.send(Err(StoreError::Closed));
        }
        // Closed: the sender was dropped, and the receiver says so.
        confirm
    }

    fn stop(&mut self) {
        self.writer.lock().take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for KeyLog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A record: (time_ms, key).
fn decode(payload: &[u8]) -> Option<(u64, &[u8])> {
    let (&kind, rest) = payload.split_first()?;
    if kind != 1 || rest.len() < 10 {
        return None;
    }
    let time = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let len = usize::from(u16::from_le_bytes(rest[8..10].try_into().ok()?));
    (rest.len() == 10 + len).then(|| (time, &rest[10..]))
}

/// What a read of a key log found: the live keys (latest record per key,
/// oldest time first), how many records there were, and where the valid
/// data ends if a torn tail follows it.
struct Read {
    records: u64,
    live: Vec<KeyTime>,
    torn_at: Option<usize>,
}

/// Reads the records in `data`, in one pass.
fn live_keys(file: &str, data: Bytes, ttl_ms: u64) -> Read {
    let now = postbox::clock::now_ms();
    let mut latest: FxHashMap<Bytes, u64> = FxHashMap::default();
    let mut records = 0;
    let mut scan = Scan::new(data, HEADER_LEN);
    for item in scan.by_ref() {
        match item {
            Scanned::Frame { payload, .. } => match decode(&payload) {
                Some((time, key)) => {
                    records += 1;
                    let start = payload.len() - key.len();
                    latest.insert(payload.slice(start..), time);
                }
                None => tracing::error!(file, "unreadable key record skipped"),
            },
            Scanned::Damaged { offset, len } => {
                tracing::error!(file, offset, len, "damaged key record skipped");
            }
        }
    }
    let mut live: Vec<KeyTime> = latest
        .into_iter()
        .filter(|(_, time)| time.saturating_add(ttl_ms) > now)
        .collect();
    live.sort_by_key(|(_, time)| *time);
    Read {
        records,
        live,
        torn_at: scan.torn().then(|| scan.valid_end()),
    }
}

/// Reads a log; cuts a torn tail. Returns (records, live keys).
fn load(path: &Path, data: Bytes, ttl_ms: u64) -> Result<(u64, Vec<KeyTime>), StoreError> {
    let file = path.display().to_string();
    frame::check_header(&data, FileKind::Keys, &file)?;
    let read = live_keys(&file, data, ttl_ms);
    if let Some(end) = read.torn_at {
        tracing::warn!(file, end, "torn tail of a key log cut");
        RealDisk
            .truncate(path, end as u64)
            .map_err(|e| StoreError::io("truncate", path, &e))?;
    }
    Ok((read.records, read.live))
}

/// Writes a new log at `path` holding `frames`, synced.
fn create(path: &Path, frames: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(&frame::header(FileKind::Keys, 0))?;
    file.write_all(frames)?;
    file.sync_all()
}

struct Writer {
    path: PathBuf,
    dir: PathBuf,
    file: File,
    ttl_ms: u64,
    sync: bool,
    appended: u64,
    live_at_rewrite: u64,
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
            let written = self
                .file
                .write_all(&buf)
                .map_err(|e| StoreError::io("write", &self.path, &e))
                .and_then(|()| {
                    if self.sync {
                        self.file
                            .sync_data()
                            .map_err(|e| StoreError::io("sync", &self.path, &e))
                    } else {
                        Ok(())
                    }
                });
            if written.is_ok() {
                self.appended += jobs.len() as u64;
            }
            for job in jobs {
                let _ = job.done.send(written.clone());
            }
            if self.appended > self.live_at_rewrite.saturating_mul(2) + REWRITE_SLACK
                && let Err(err) = self.rewrite()
            {
                tracing::error!(path = %self.path.display(), %err, "rewriting a key log failed: it keeps growing");
                self.live_at_rewrite = self.appended;
            }
        }
        if !self.sync {
            let _ = self.file.sync_data();
        }
    }

    /// Rewrites the log with the latest record of each live key.
    fn rewrite(&mut self) -> std::io::Result<()> {
        let data = Bytes::from(std::fs::read(&self.path)?);
        let file = self.path.display().to_string();
        let live = live_keys(&file, data, self.ttl_ms).live;
        let mut frames = Vec::new();
        for (key, time) in &live {
            let mut payload = Vec::with_capacity(11 + key.len());
            payload.push(1);
            payload.extend_from_slice(&time.to_le_bytes());
            payload.extend_from_slice(&(key.len() as u16).to_le_bytes());
            payload.extend_from_slice(key);
            frame::write_frame(&mut frames, &payload);
        }
        let tmp = self.path.with_extension("rewrite");
        create(&tmp, &frames)?;
        std::fs::rename(&tmp, &self.path)?;
        RealDisk.sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.appended = live.len() as u64;
        self.live_at_rewrite = self.appended;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_come_back_latest_record_wins_dead_ones_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let now = postbox::clock::now_ms();
        {
            let (log, live) = KeyLog::open(&path, 1000, true).unwrap();
            assert!(live.is_empty());
            let confirms = [
                log.append(b"a", now),
                log.append(b"b", now - 5000),
                log.append(b"c", now + 1),
                log.append(b"a", now + 2),
            ];
            for c in confirms {
                c.await.unwrap().unwrap();
            }
        }
        let (_log, live) = KeyLog::open(&path, 1000, true).unwrap();
        let got: Vec<(&[u8], u64)> = live.iter().map(|(k, t)| (&k[..], *t)).collect();
        assert_eq!(got, [(&b"c"[..], now + 1), (&b"a"[..], now + 2)]);
    }

    #[tokio::test]
    async fn a_rewrite_keeps_exactly_the_live_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let now = postbox::clock::now_ms();
        let n = REWRITE_SLACK + 10;
        {
            let (log, _) = KeyLog::open(&path, 60_000, false).unwrap();
            let mut last = None;
            for i in 0..n {
                // Half of them dead on arrival.
                let time = if i % 2 == 0 { now } else { now - 120_000 };
                last = Some(log.append(format!("k{i}").as_bytes(), time));
            }
            last.unwrap().await.unwrap().unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < n * 20, "rewritten: {size} bytes");
        let (_log, live) = KeyLog::open(&path, 60_000, true).unwrap();
        assert_eq!(live.len() as u64, n.div_ceil(2));
    }
}
