//! Durable storage: the data directory of a broker opened with
//! [`Broker::open`](crate::Broker::open), written for this product. Durable
//! queues keep their persistent messages in one shared, append-only,
//! segmented message log (as RabbitMQ's quorum queues share a write-ahead
//! log), so that publishes to any queues share one `fdatasync`; the topology
//! is a small log of its own.
//!
//! # Directory
//!
//! ```text
//! <dir>/LOCK                      held (flock) while a broker has it open
//! <dir>/topology.log              durable queues, exchanges, bindings, streams
//! <dir>/log/00000000000000000001.seg, ...   the message log
//! <dir>/streams/<id>/...          each durable stream's own log (`stream_log`)
//! <dir>/dedup/<queue id>.log      a durable queue's duplicate window (`keylog`)
//! ```
//!
//! # Files and records
//!
//! Every file starts with a 24-byte header: the magic `pbxstor\n`, the format
//! version (u16, little-endian: 1), the file kind (u16: 1 segment, 2
//! topology, 3 stream segment, 4 stream offsets, 5 key log), the file's id (u64) and 4
//! reserved bytes. A reader refuses a
//! version it does not know ([`StoreError::UnsupportedVersion`]).
//!
//! Records follow, each framed as
//!
//! ```text
//! len: u32 LE | crc: u32 LE | payload: len bytes
//! ```
//!
//! where `crc` is CRC-32C over the four length bytes and the payload, so a
//! damaged length is caught too. At opening, a torn tail (a frame cut short
//! by a crash, or garbage after the last valid frame) is cut off; a damaged
//! frame followed by valid ones is reported (an `error!` event, and
//! [`StorageStats::damaged_records`]) and skipped, never a panic.
//!
//! A message-log record's payload is a type byte and fields (LEB128 varints;
//! the envelope as in `envelope::wire`):
//!
//! ```text
//! 1 publish  queue_id seq ordinal expires_at+1 envelope
//! 2 settle   count (segment ordinal)*       these messages left their queues
//! 3 deliver  count (segment ordinal)*       delivered once more each
//! 4 atomic   count (len record)*            applied together or not at all
//! ```
//!
//! A message is identified by where its publish record is: segment and
//! ordinal (its rank among the segment's publishes). Queue ids are unique
//! per declaration and never reused, so a deleted queue's records are dead.
//! Acks and deliveries are written with the next group and synced lazily
//! (within 200 ms, or with the next confirm): after a crash an acknowledged
//! message may come back, flagged redelivered, but a confirmed one never
//! disappears. Segments whose messages have all left are deleted, and the
//! oldest segment kept alive by a few messages is compacted in place (see
//! `space`), so disk use follows the backlog.
//!
//! # Durability
//!
//! [`SyncPolicy`] decides when a publish is confirmed: after the group's
//! `fdatasync` (the default), once written to the OS with a sync at an
//! interval, or once written to the OS and never synced until closing.

mod disk;
pub(crate) mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod keylog;
mod log;
mod meta;
mod record;
mod recover;
mod space;
pub(crate) mod stream_log;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashSet;

#[cfg(feature = "testkit")]
pub use disk::DiskFaults;
pub(crate) use log::{Append, Confirm, Store, confirmed};
pub(crate) use meta::MetaLog;
pub(crate) use record::{Loc, QueueId};
pub(crate) use recover::{Recovered, Recovery};

use disk::{Disk, RealDisk};

/// When a persistent message counts as stored: when `publish` returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Confirmed after the `fdatasync` of its group: survives a power loss.
    /// Concurrent publishes, to any queues, share one sync. The default, and
    /// RabbitMQ's behaviour for persistent messages with confirms.
    #[default]
    Always,
    /// Confirmed once written to the OS (survives a crash of the process);
    /// synced at this interval, so a power loss may lose the last interval.
    /// JetStream's default behaviour (it syncs every 2 minutes).
    Interval(Duration),
    /// Confirmed once written to the OS; synced only when the broker closes.
    /// Survives a crash of the process, not a power loss.
    Never,
}

/// Where and how a broker keeps its durable state; see
/// [`Broker::open`](crate::Broker::open).
///
/// ```
/// use std::time::Duration;
/// use postbox_actors::{StorageOptions, SyncPolicy};
/// let options = StorageOptions::new("/var/lib/orders")
///     .sync(SyncPolicy::Interval(Duration::from_millis(100)))
///     .segment_bytes(16 << 20);
/// assert_eq!(options.segment_bytes, 16 << 20);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StorageOptions {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// When publishes are confirmed.
    pub sync: SyncPolicy,
    /// Size at which the message log starts a new segment (64 MiB).
    pub segment_bytes: u64,
    #[cfg(feature = "testkit")]
    faults: Option<DiskFaults>,
}

impl StorageOptions {
    /// Storage in `dir`, synced before confirming, 64 MiB segments.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StorageOptions {
            dir: dir.into(),
            sync: SyncPolicy::Always,
            segment_bytes: 64 << 20,
            #[cfg(feature = "testkit")]
            faults: None,
        }
    }

    /// Sets the [`SyncPolicy`].
    pub fn sync(mut self, sync: SyncPolicy) -> Self {
        self.sync = sync;
        self
    }

    /// Sets [`segment_bytes`](Self::segment_bytes) (at least 4 KiB).
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(4096);
        self
    }

    /// Injects I/O failures into the store's file operations (tests).
    #[cfg(feature = "testkit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
    pub fn faults(mut self, faults: DiskFaults) -> Self {
        self.faults = Some(faults);
        self
    }
}

/// Why storage failed. Every variant says which file and what happened.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed.
    #[error("could not {op} ({path}): {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS's error.
        source: Arc<std::io::Error>,
    },
    /// Another broker (in this or another process) has the directory open.
    #[error("the data directory {dir} is in use by another broker")]
    Locked {
        /// The directory.
        dir: String,
    },
    /// A file is not what it should be (and cannot be read past).
    #[error("{file} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong.
        detail: String,
    },
    /// A file was written by a format version this code does not know.
    #[error("{file} has storage format version {version}; this postbox reads version {supported}")]
    UnsupportedVersion {
        /// The file.
        file: String,
        /// Its version.
        version: u16,
        /// The version this code reads and writes.
        supported: u16,
    },
    /// The store was closed (the broker shut down).
    #[error("the store is closed")]
    Closed,
}

/// Errors compare by what they say (an I/O error has no equality of its own).
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, err: &std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.display().to_string(),
            source: Arc::new(std::io::Error::new(err.kind(), err.to_string())),
        }
    }

    /// A failed sync: what reached the disk is unknown.
    pub(crate) fn is_sync_failure(&self) -> bool {
        matches!(self, StoreError::Io { op, .. } if op.starts_with("sync"))
    }

    /// Whether the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(28)
            || source.kind() == std::io::ErrorKind::StorageFull)
    }
}

/// A broker's storage counters: [`Broker::storage_stats`](crate::Broker::storage_stats).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct StorageStats {
    /// Bytes of the message log's segments.
    pub bytes_on_disk: u64,
    /// Segments in the message log.
    pub segments: usize,
    /// Persistent messages in durable queues, on disk.
    pub live_messages: u64,
    /// `fdatasync`s of the message log.
    pub syncs: u64,
    /// Bytes written to the message log.
    pub bytes_written: u64,
    /// Bytes written per sync, on average (how well publishes share syncs).
    pub bytes_per_sync: u64,
    /// Publishes (or batches) confirmed.
    pub confirms: u64,
    /// From append to confirm, on average.
    pub confirm_latency_avg_us: u64,
    /// From append to confirm, the longest.
    pub confirm_latency_max_us: u64,
    /// Segments compacted in place.
    pub compactions: u64,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Damaged records skipped when the log was read back.
    pub damaged_records: u64,
    /// Writes that failed (their publishes were told).
    pub write_errors: u64,
    /// Set when a sync failed: the store confirms nothing more until the
    /// broker is reopened.
    pub failed: Option<String>,
}

/// An open data directory: the lock, the topology log, and (once started)
/// the message log.
pub(crate) struct DataDir {
    pub(crate) options: StorageOptions,
    disk: Arc<dyn Disk>,
    log_dir: PathBuf,
    pub(crate) meta: MetaLog,
    _lock: File,
}

impl fmt::Debug for DataDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataDir")
            .field("dir", &self.options.dir)
            .finish()
    }
}

impl DataDir {
    /// Opens `options.dir` (creating it), takes its lock, and reads the
    /// topology log; returns its entries.
    pub(crate) fn open(options: StorageOptions) -> Result<(DataDir, Vec<Bytes>), StoreError> {
        let dir = options.dir.clone();
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| StoreError::io("create the data directory", &log_dir, &e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open the lock file", &lock_path, &e))?;
        // A broker of this process that was just dropped may still be
        // letting go (an actor finishing on another thread): wait a moment
        // before calling the directory taken.
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Locked {
                        dir: dir.display().to_string(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::io("lock the data directory", &lock_path, &e));
                }
            }
        }
        let disk: Arc<dyn Disk> = Arc::new(RealDisk);
        #[cfg(feature = "testkit")]
        let disk: Arc<dyn Disk> = match &options.faults {
            Some(faults) => Arc::new(disk::FaultyDisk {
                faults: faults.clone(),
            }),
            None => disk,
        };
        let (meta, entries) = MetaLog::open(disk.clone(), &dir)?;
        Ok((
            DataDir {
                options,
                disk,
                log_dir,
                meta,
                _lock: lock,
            },
            entries,
        ))
    }

    /// Reads the message log back (messages of queues not in `queues` are
    /// dead) and starts its writer.
    pub(crate) fn start_log(
        &self,
        queues: &FxHashSet<QueueId>,
    ) -> Result<(Store, Recovery), StoreError> {
        let mut recovery = recover::recover(&*self.disk, &self.log_dir, queues)?;
        let segments = std::mem::take(&mut recovery.segments);
        let store = Store::start(
            self.log_dir.clone(),
            self.options.clone(),
            self.disk.clone(),
            segments,
            recovery.next_segment,
            recovery.damaged,
        )?;
        Ok((store, recovery))
    }
}
