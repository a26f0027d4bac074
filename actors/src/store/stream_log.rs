//! The log of a durable stream on disk: its records in segment files of their
//! own, its named subscribers' offsets, the writer thread that stores both,
//! and reading them back when the broker reopens.
//!
//! # Directory
//!
//! ```text
//! <dir>/streams/<id>/                       one per durable stream declaration
//! <dir>/streams/<id>/00000000000000000000.seg, ...   segments, named by the
//!                                           offset of their first record
//! <dir>/streams/<id>/offsets                the named subscribers' offsets
//! ```
//!
//! A stream's id is unique per declaration and never reused (the topology
//! log hands it out), and deleting a stream deletes its directory: a stream
//! deleted and declared again starts empty, at offset 0. Directories of ids
//! that are not declared (a deletion interrupted by a crash) are removed
//! when the broker opens.
//!
//! # Files
//!
//! Both kinds of file have the store's 24-byte header (see the `store`
//! module documentation): magic `pbxstor\n`, the format version (1), the
//! kind (3 stream segment, 4 stream offsets), an id (a segment's first
//! offset; 0 for the offsets file) and 4 reserved bytes; a version this code
//! does not know is refused ([`StoreError::UnsupportedVersion`]). Frames
//! follow, each `len: u32 LE | crc: u32 LE | payload`, the CRC-32C covering
//! the length and the payload.
//!
//! A segment's frames are records, one each (LEB128 varints; the envelope in
//! the wire form of `envelope::wire`):
//!
//! ```text
//! 1 record   offset timestamp_ms envelope
//! ```
//!
//! Offsets increase through a segment and from one segment to the next (a
//! record that breaks this is treated as damaged). A segment is full once
//! the next record would take it past
//! [`StorageOptions::segment_bytes`](crate::StorageOptions::segment_bytes)
//! (64 MiB by default; it holds at least one record); the next record
//! starts a new one, named by its offset.
//!
//! Versioning: these layouts (the record's fields, the envelope's wire form,
//! the offsets file) are version 1 of the store's format, with the file
//! kinds 3 and 4 added to it; changing any of them means a new version
//! number, which older code then refuses rather than misreads.
//!
//! The offsets file holds one frame: `count (name offset)*` (a name is a
//! varint length and UTF-8 bytes). It is rewritten whole and atomically:
//! written to `offsets.tmp`, synced, renamed over `offsets`, and the
//! directory synced.
//!
//! # When things are written and synced
//!
//! Publishers encode their records straight into a pending buffer (under
//! the stream's lock, so that the file order is the offset order). The
//! stream's writer thread takes everything pending at once, writes it with
//! one `write` per segment, and then, per [`SyncPolicy`]: `Always` syncs
//! (`fdatasync`, and the directory after a segment was created) before the
//! records count as stored; `Interval` counts them stored once written and
//! syncs at the interval; `Never` only syncs when the broker closes. Stored
//! records become readable by subscribers and their publishers are told,
//! one sync for everyone waiting (group commit).
//!
//! If a write or a sync fails, the records not stored yet are taken back
//! from the stream (no subscriber has seen them) and their publishers get
//! the error; the files are cut back to what was stored. After a failed
//! sync (what reached the disk is unknown) the stream stores nothing more
//! until the broker is reopened.
//!
//! The named subscribers' offsets are written at most every 200 ms while
//! they move, when [`StreamHandle::sync`](crate::StreamHandle::sync) asks,
//! and when the broker closes. An offset is a subscriber's committed
//! position (what it finished handling), so after a crash it resumes there
//! or earlier: at least once, never skipping. Offsets past the last record
//! read back (records lost with an unsynced tail) are brought back to it.
//!
//! # Retention and reading back
//!
//! The records live in memory too (the stream's ring, bounded by its
//! retention); the disk holds them for after a restart. When retention trims
//! records in memory, the writer deletes the segments all of whose records
//! are trimmed, oldest first, never one still holding a retained record and
//! never the last one holding records (it tells the next offset). At
//! opening, every segment is read: a torn tail is cut off, a damaged record
//! is skipped and counted (a hole in the offsets, which subscribers step
//! over), and retention is applied again to what was read.

use crate::store::log::{WriterState, stop_writer};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rustc_hash::FxHashSet;
use tokio::sync::oneshot;

use crate::envelope::{Envelope, WireError, WireReader, WireWriter};
use crate::store::disk::{Disk, DiskFile};
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};
use crate::store::{Confirm, DataDir, StoreError, SyncPolicy};

/// A durable stream's id in the data directory: unique per declaration,
/// never reused.
pub(crate) type StreamId = u64;

/// The type byte of a record.
const RECORD: u8 = 1;
/// How often, at most, the offsets file is rewritten while offsets move.
const OFFSETS_EVERY: Duration = Duration::from_millis(200);
const OFFSETS: &str = "offsets";
const OFFSETS_TMP: &str = "offsets.tmp";

/// One record as stored.
#[derive(Debug)]
pub(crate) struct StoredRecord {
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
    pub(crate) envelope: Envelope,
}

/// Appends a record's payload (see the module docs).
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    offset: u64,
    timestamp_ms: u64,
    envelope: &Envelope,
) {
    let mut w = WireWriter::new(out);
    w.u8(RECORD);
    w.varint(offset);
    w.varint(timestamp_ms);
    envelope.write_wire(&mut w);
}

/// Reads a record from a frame's payload; the envelope owns its bytes (it
/// does not keep the segment's buffer alive).
pub(crate) fn decode_record(payload: &Bytes) -> Result<StoredRecord, WireError> {
    let mut r = WireReader::detached(payload);
    if r.u8()? != RECORD {
        return Err(WireError::Invalid("stream record type"));
    }
    let offset = r.varint()?;
    let timestamp_ms = r.varint()?;
    let envelope = Envelope::read_wire(&mut r)?;
    if r.remaining() != 0 {
        return Err(WireError::Invalid("trailing bytes"));
    }
    Ok(StoredRecord {
        offset,
        timestamp_ms,
        envelope,
    })
}

fn encode_offsets(positions: &[(String, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = WireWriter::new(&mut out);
    w.varint(positions.len() as u64);
    for (name, offset) in positions {
        w.str(name);
        w.varint(*offset);
    }
    out
}

fn decode_offsets(payload: &Bytes) -> Result<Vec<(String, u64)>, WireError> {
    let mut r = WireReader::detached(payload);
    let n = r.count(2)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.byte_string()?.to_string();
        out.push((name, r.varint()?));
    }
    if r.remaining() != 0 {
        return Err(WireError::Invalid("trailing bytes"));
    }
    Ok(out)
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The first offset of a segment file, from its name.
fn segment_first(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".seg")?
        .parse()
        .ok()
}

/// One segment, as the writer keeps account of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// The file's length.
    bytes: u64,
    /// The offset after its last record (its first offset while empty).
    end: u64,
}

/// What a stream's directory held.
#[derive(Debug, Default)]
pub(crate) struct RecoveredStream {
    /// Its records, by increasing offset (with holes where some were damaged).
    pub(crate) records: Vec<StoredRecord>,
    /// The named subscribers' offsets.
    pub(crate) positions: Vec<(String, u64)>,
    /// Damaged records skipped (each reported).
    pub(crate) damaged: u64,
    /// Bytes of torn tails cut off.
    pub(crate) truncated: u64,
}

/// Reads a stream's directory: segments in order, then the offsets file.
fn recover(
    disk: &dyn Disk,
    dir: &Path,
) -> Result<(RecoveredStream, BTreeMap<u64, Segment>), StoreError> {
    let mut files = Vec::new();
    for path in disk
        .list(dir)
        .map_err(|e| StoreError::io("list a stream directory", dir, &e))?
    {
        if path.file_name().is_some_and(|n| n == OFFSETS_TMP) {
            // An offsets rewrite that did not finish: the old file stands.
            let _ = disk.remove(&path);
        } else if let Some(first) = segment_first(&path) {
            files.push((first, path));
        }
    }
    files.sort();
    let mut out = RecoveredStream::default();
    let mut segments = BTreeMap::new();
    // The offset the next record must be at or after.
    let mut next = 0u64;
    for (first, path) in files {
        let name = path.display().to_string();
        let data = disk
            .read(&path)
            .map_err(|e| StoreError::io("read a stream segment", &path, &e))?;
        let len = data.len();
        let mut end = len;
        let before = out.records.len();
        if len >= HEADER_LEN {
            let id = frame::check_header(&data, FileKind::StreamSegment, &name)?;
            if id != first {
                return Err(StoreError::Corrupt {
                    file: name,
                    detail: format!("its header says it starts at offset {id}"),
                });
            }
            let mut scan = Scan::new(Bytes::from(data), HEADER_LEN);
            for item in scan.by_ref() {
                match item {
                    Scanned::Frame { offset, payload } => match decode_record(&payload) {
                        Ok(record) if record.offset >= next.max(first) => {
                            next = record.offset + 1;
                            out.records.push(record);
                        }
                        Ok(record) => {
                            out.damaged += 1;
                            tracing::error!(file = %name, offset, record = record.offset, "stream record out of order skipped");
                        }
                        Err(e) => {
                            out.damaged += 1;
                            tracing::error!(file = %name, offset, error = %e, "undecodable stream record skipped");
                        }
                    },
                    Scanned::Damaged { offset, len } => {
                        out.damaged += 1;
                        tracing::error!(file = %name, offset, len, "damaged stream record skipped");
                    }
                }
            }
            if scan.torn() {
                end = scan.valid_end();
                out.truncated += (len - end) as u64;
                tracing::warn!(file = %name, at = end, bytes = len - end, "torn tail of a stream segment cut off");
                disk.truncate(&path, end as u64)
                    .map_err(|e| StoreError::io("cut a torn tail", &path, &e))?;
            }
        }
        if out.records.len() == before {
            // No record (a segment just created, or cut to nothing): it
            // tells nothing, and a new segment may need its name.
            disk.remove(&path)
                .map_err(|e| StoreError::io("remove an empty stream segment", &path, &e))?;
            continue;
        }
        segments.insert(
            first,
            Segment {
                bytes: end as u64,
                end: next,
            },
        );
    }
    let path = dir.join(OFFSETS);
    match disk.read(&path) {
        Ok(data) => {
            let name = path.display().to_string();
            match frame::check_header(&data, FileKind::StreamOffsets, &name) {
                Ok(_) => {
                    let first = Scan::new(Bytes::from(data), HEADER_LEN).next();
                    match first {
                        Some(Scanned::Frame { payload, .. }) => match decode_offsets(&payload) {
                            Ok(positions) => out.positions = positions,
                            Err(e) => {
                                tracing::error!(file = %name, error = %e, "undecodable subscriber offsets ignored");
                            }
                        },
                        _ => tracing::error!(file = %name, "damaged subscriber offsets ignored"),
                    }
                }
                Err(err @ StoreError::UnsupportedVersion { .. }) => return Err(err),
                Err(err) => tracing::error!(%err, "subscriber offsets ignored"),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("read the subscriber offsets", &path, &e)),
    }
    Ok((out, segments))
}

/// What a durable stream's log asks of the stream (the stream's state is
/// behind a lock of its own, which the writer takes through these calls,
/// never while holding the log's).
pub(crate) trait StreamSink: Send + Sync + 'static {
    /// Records before `end` are stored: they may be read now.
    fn stored(&self, end: u64);
    /// Records from `from` on could not be stored: take them back. `discard`
    /// must be called while appends are held off (under the stream's lock),
    /// so that none slips in between.
    fn unstored(&self, from: u64, discard: &mut dyn FnMut());
    /// The oldest offset retention keeps: segments before it may go.
    fn first_retained(&self) -> u64;
    /// The named subscribers' committed positions.
    fn positions(&self) -> Vec<(String, u64)>;
}

/// The on-disk log of one durable stream. Cheap to clone.
#[derive(Clone)]
pub(crate) struct StreamLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLog")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

struct Shared {
    dir: PathBuf,
    sync: SyncPolicy,
    segment_bytes: u64,
    disk: Arc<dyn Disk>,
    state: Mutex<State>,
    wake: Condvar,
    /// Named subscribers moved since the offsets were last written.
    moved: AtomicBool,
    bytes_on_disk: AtomicU64,
    segments: AtomicU64,
    damaged: AtomicU64,
}

impl Shared {
    /// Publishes the segments' count and size, for the stream's stats.
    fn count(&self, segments: &BTreeMap<u64, Segment>) {
        let bytes = segments.values().map(|s| s.bytes).sum();
        self.bytes_on_disk.store(bytes, Ordering::Relaxed);
        self.segments
            .store(segments.len() as u64, Ordering::Relaxed);
    }
}

type Done = oneshot::Sender<Result<(), StoreError>>;

#[derive(Default)]
struct State {
    /// Framed records not handed to the writer yet.
    pending: Vec<u8>,
    /// Each pending record's offset and where its frame ends in `pending`.
    records: Vec<(u64, usize)>,
    /// Publishers waiting for the records before an offset to be stored.
    waiters: Vec<(u64, Done)>,
    /// Callers of `sync`: told after the next group, offsets written.
    syncs: Vec<Done>,
    /// Set when a sync failed (or a failed write could not be cut back):
    /// nothing more is stored until the broker is reopened.
    failed: Option<StoreError>,
    closing: bool,
    closed: bool,
}

/// Appends in progress (under the stream's lock too): records are framed
/// into the pending buffer; dropping it hands them to the writer.
pub(crate) struct StreamAppend<'a> {
    shared: &'a Shared,
    st: MutexGuard<'a, State>,
    wrote: bool,
}

/// A stream log whose writer has not started: what recovery found on disk.
pub(crate) struct StreamSeed {
    shared: Arc<Shared>,
    segments: BTreeMap<u64, Segment>,
    positions: Vec<(String, u64)>,
    next: u64,
}

impl StreamLog {
    fn new(
        data: &DataDir,
        dir: PathBuf,
        segments: BTreeMap<u64, Segment>,
        recovered: &RecoveredStream,
    ) -> (StreamLog, StreamSeed) {
        let shared = Arc::new(Shared {
            dir,
            sync: data.options.sync,
            segment_bytes: data.options.segment_bytes,
            disk: data.disk.clone(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            moved: AtomicBool::new(false),
            bytes_on_disk: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            damaged: AtomicU64::new(recovered.damaged),
        });
        let next = recovered.records.last().map_or(0, |r| r.offset + 1);
        let mut positions = recovered.positions.clone();
        positions.sort();
        let seed = StreamSeed {
            shared: shared.clone(),
            segments,
            positions,
            next,
        };
        seed.count();
        (StreamLog { shared }, seed)
    }

    /// Starts appending; fails if the log stores nothing more (a failed sync,
    /// or closed).
    pub(crate) fn append(&self) -> Result<StreamAppend<'_>, StoreError> {
        let st = self.shared.state.lock();
        if let Some(err) = &st.failed {
            return Err(err.clone());
        }
        if st.closing {
            return Err(StoreError::Closed);
        }
        Ok(StreamAppend {
            shared: &self.shared,
            st,
            wrote: false,
        })
    }

    /// Resolves once everything appended so far is stored (per the sync
    /// policy), the named subscribers' offsets as of now are written and
    /// synced, and the segments retention trimmed are deleted.
    pub(crate) fn sync(&self) -> Confirm {
        let (tx, rx) = oneshot::channel();
        let mut st = self.shared.state.lock();
        if let Some(err) = &st.failed {
            let _ = tx.send(Err(err.clone()));
        } else if st.closing {
            let _ = tx.send(Err(StoreError::Closed));
        } else {
            st.syncs.push(tx);
            self.shared.wake.notify_one();
        }
        rx
    }

    /// A named subscriber committed: its offset is written within 200 ms.
    pub(crate) fn moved(&self) {
        if !self.shared.moved.swap(true, Ordering::AcqRel) {
            // Under the lock: the writer cannot be between its check and its
            // wait.
            let _st = self.shared.state.lock();
            self.shared.wake.notify_one();
        }
    }

    /// Bytes of its segments, how many, and damaged records skipped when
    /// they were read back.
    pub(crate) fn stats(&self) -> (u64, usize, u64) {
        let s = &self.shared;
        (
            s.bytes_on_disk.load(Ordering::Relaxed),
            s.segments.load(Ordering::Relaxed) as usize,
            s.damaged.load(Ordering::Relaxed),
        )
    }

    /// Stores what is pending, syncs, writes the offsets, and stops the
    /// writer; appends fail from now on. Waits for the writer (bounded).
    pub(crate) fn close(&self) {
        stop_writer(&self.shared.state, &self.shared.wake, &self.shared.dir);
    }
}

impl WriterState for State {
    fn close(&mut self) {
        self.closing = true;
    }
    fn closed(&self) -> bool {
        self.closed
    }
}

impl StreamAppend<'_> {
    /// Appends a record.
    pub(crate) fn record(&mut self, offset: u64, timestamp_ms: u64, envelope: &Envelope) {
        let st = &mut *self.st;
        let at = frame::begin_frame(&mut st.pending);
        encode_record(&mut st.pending, offset, timestamp_ms, envelope);
        frame::end_frame(&mut st.pending, at);
        st.records.push((offset, st.pending.len()));
        self.wrote = true;
    }

    /// Resolves once the records before `end` are stored (or with the error
    /// that prevented it).
    pub(crate) fn confirm(mut self, end: u64) -> Confirm {
        let (tx, rx) = oneshot::channel();
        self.st.waiters.push((end, tx));
        self.wrote = true;
        rx
    }
}

impl Drop for StreamAppend<'_> {
    fn drop(&mut self) {
        if self.wrote {
            self.shared.wake.notify_one();
        }
    }
}

impl StreamSeed {
    fn count(&self) {
        self.shared.count(&self.segments);
    }

    /// Starts the writer thread, which tells `sink` what it stores.
    pub(crate) fn start(self, sink: Arc<dyn StreamSink>) -> Result<(), StoreError> {
        let dir = self.shared.dir.clone();
        let writer = Writer {
            shared: self.shared,
            sink,
            segments: self.segments,
            files: BTreeMap::new(),
            active: None,
            unsynced: BTreeSet::new(),
            dir_dirty: false,
            poisoned: false,
            stored_end: self.next,
            last_sync: Instant::now(),
            last_offsets: Instant::now()
                .checked_sub(OFFSETS_EVERY)
                .unwrap_or_else(Instant::now),
            written_positions: self.positions,
            spare: Vec::new(),
            spare_records: Vec::new(),
        };
        let shared = writer.shared.clone();
        std::thread::Builder::new()
            .name("postbox-stream".into())
            .spawn(move || writer.run())
            .map(|_| ())
            .map_err(|e| {
                // Nothing will ever be stored: appends must not wait for it.
                let mut st = shared.state.lock();
                st.closing = true;
                st.closed = true;
                StoreError::io("start a stream's writer thread", &dir, &e)
            })
    }
}

/// What the writer takes at once.
struct Group {
    bytes: Vec<u8>,
    records: Vec<(u64, usize)>,
    syncs: Vec<Done>,
    closing: bool,
    offsets_due: bool,
}

/// The writer thread's state: the segments, open files, what is unsynced.
struct Writer {
    shared: Arc<Shared>,
    sink: Arc<dyn StreamSink>,
    segments: BTreeMap<u64, Segment>,
    /// Open files: the active segment, and older ones until they are synced.
    files: BTreeMap<u64, Box<dyn DiskFile>>,
    /// The segment appended to; `None`: the next record starts one.
    active: Option<u64>,
    unsynced: BTreeSet<u64>,
    dir_dirty: bool,
    /// A failed write could not be cut back: the files hold records the
    /// stream took back.
    poisoned: bool,
    /// Records before this offset are stored.
    stored_end: u64,
    last_sync: Instant,
    last_offsets: Instant,
    written_positions: Vec<(String, u64)>,
    spare: Vec<u8>,
    spare_records: Vec<(u64, usize)>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let group = self.next_group();
            let end = group.records.last().map(|r| r.0 + 1);
            let mut result = self.write(&group.bytes, &group.records);
            let sync_now = match self.shared.sync {
                SyncPolicy::Always => true,
                SyncPolicy::Interval(every) => group.closing || self.last_sync.elapsed() >= every,
                SyncPolicy::Never => group.closing,
            };
            if result.is_ok() && sync_now {
                result = self.sync();
            }
            match result {
                Ok(()) => {
                    if let Some(end) = end {
                        self.stored_end = end;
                        self.sink.stored(end);
                    }
                    self.confirm();
                    let offsets = if group.offsets_due || group.closing || !group.syncs.is_empty() {
                        self.write_offsets()
                    } else {
                        Ok(())
                    };
                    if let Err(err) = &offsets {
                        tracing::warn!(%err, "could not write a stream's subscriber offsets");
                    }
                    self.upkeep();
                    for done in group.syncs {
                        let _ = done.send(offsets.clone());
                    }
                }
                Err(err) => self.fail(&err, group.syncs),
            }
            self.recycle(group.bytes, group.records);
            if group.closing {
                let mut st = self.shared.state.lock();
                st.closed = true;
                for (_, done) in st.waiters.drain(..) {
                    let _ = done.send(Err(StoreError::Closed));
                }
                for done in st.syncs.drain(..) {
                    let _ = done.send(Err(StoreError::Closed));
                }
                self.shared.wake.notify_all();
                return;
            }
        }
    }

    /// Waits for records, a `sync` call, offsets or a sync that are due, or
    /// closing; takes what is pending.
    fn next_group(&mut self) -> Group {
        let mut st = self.shared.state.lock();
        loop {
            if st.closing || !st.records.is_empty() || !st.syncs.is_empty() {
                break;
            }
            let mut timeout = Duration::from_secs(3600);
            if self.shared.moved.load(Ordering::Acquire) {
                timeout = timeout.min(OFFSETS_EVERY.saturating_sub(self.last_offsets.elapsed()));
            }
            if let SyncPolicy::Interval(every) = self.shared.sync
                && (!self.unsynced.is_empty() || self.dir_dirty)
            {
                timeout = timeout.min(every.saturating_sub(self.last_sync.elapsed()));
            }
            if timeout.is_zero() {
                break;
            }
            self.shared.wake.wait_for(&mut st, timeout);
        }
        let mut bytes = std::mem::take(&mut self.spare);
        let mut records = std::mem::take(&mut self.spare_records);
        std::mem::swap(&mut bytes, &mut st.pending);
        std::mem::swap(&mut records, &mut st.records);
        let syncs = std::mem::take(&mut st.syncs);
        let closing = st.closing;
        drop(st);
        Group {
            bytes,
            records,
            syncs,
            closing,
            offsets_due: self.shared.moved.load(Ordering::Acquire)
                && self.last_offsets.elapsed() >= OFFSETS_EVERY,
        }
    }

    /// Keeps a group's buffers for the next one.
    fn recycle(&mut self, mut bytes: Vec<u8>, mut records: Vec<(u64, usize)>) {
        bytes.clear();
        records.clear();
        self.spare = bytes;
        self.spare_records = records;
    }

    fn path(&self, first: u64) -> PathBuf {
        segment_path(&self.shared.dir, first)
    }

    /// Writes a group of records; on failure, cuts the files back to what
    /// they held before it.
    fn write(&mut self, bytes: &[u8], records: &[(u64, usize)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let before = self.segments.last_key_value().map(|(&id, &s)| (id, s));
        let mut created = Vec::new();
        let result = self.write_records(bytes, records, &mut created);
        if result.is_err()
            && let Err(err) = self.undo(before, &created)
        {
            tracing::error!(%err, "a stream segment could not be cut back after a failed write: the stream stores nothing more until the broker is reopened");
            self.poisoned = true;
        }
        self.count();
        result
    }

    fn write_records(
        &mut self,
        bytes: &[u8],
        records: &[(u64, usize)],
        created: &mut Vec<u64>,
    ) -> Result<(), StoreError> {
        let limit = self.shared.segment_bytes;
        let mut start = 0usize;
        let mut i = 0;
        while i < records.len() {
            let size = (records[i].1 - start) as u64;
            let segment = match self.active {
                Some(id)
                    if self
                        .segments
                        .get(&id)
                        .is_some_and(|s| s.end == id || s.bytes + size <= limit) =>
                {
                    id
                }
                _ => {
                    let id = records[i].0;
                    self.create(id)?;
                    created.push(id);
                    id
                }
            };
            // The records of the group that go into this segment: at least
            // one, then as many as fit.
            let mut len = self.segments.get(&segment).map_or(0, |s| s.bytes) + size;
            let mut j = i + 1;
            while j < records.len() {
                let next = (records[j].1 - records[j - 1].1) as u64;
                if len + next > limit {
                    break;
                }
                len += next;
                j += 1;
            }
            let stop = records[j - 1].1;
            let path = self.path(segment);
            let file = self.files.get_mut(&segment).ok_or_else(|| {
                StoreError::io(
                    "append to a stream segment",
                    &path,
                    &std::io::Error::other("the segment's file is not open"),
                )
            })?;
            file.write_all(&bytes[start..stop])
                .map_err(|e| StoreError::io("write a stream segment", &path, &e))?;
            if let Some(s) = self.segments.get_mut(&segment) {
                s.bytes = len;
                s.end = records[j - 1].0 + 1;
            }
            self.unsynced.insert(segment);
            start = stop;
            i = j;
        }
        Ok(())
    }

    /// Creates segment `first` (with its header) and makes it the active one.
    fn create(&mut self, first: u64) -> Result<(), StoreError> {
        let path = self.path(first);
        let mut file = self
            .shared
            .disk
            .create(&path)
            .map_err(|e| StoreError::io("create a stream segment", &path, &e))?;
        if let Err(e) = file.write_all(&frame::header(FileKind::StreamSegment, first)) {
            drop(file);
            let _ = self.shared.disk.remove(&path);
            return Err(StoreError::io("write a stream segment", &path, &e));
        }
        self.dir_dirty = true;
        self.files.insert(first, file);
        self.segments.insert(
            first,
            Segment {
                bytes: HEADER_LEN as u64,
                end: first,
            },
        );
        self.unsynced.insert(first);
        self.active = Some(first);
        Ok(())
    }

    /// Cuts the files back after a failed write: the segments it created go,
    /// and the one that was last is cut to its old length.
    fn undo(&mut self, before: Option<(u64, Segment)>, created: &[u64]) -> Result<(), StoreError> {
        for &id in created.iter().rev() {
            self.files.remove(&id);
            self.segments.remove(&id);
            self.unsynced.remove(&id);
            let path = self.path(id);
            self.shared
                .disk
                .remove(&path)
                .map_err(|e| StoreError::io("remove a stream segment", &path, &e))?;
        }
        if let Some((id, old)) = before
            && self.segments.get(&id).is_some_and(|s| *s != old)
        {
            let path = self.path(id);
            let file = self.files.get_mut(&id).ok_or_else(|| {
                StoreError::io(
                    "cut a stream segment back",
                    &path,
                    &std::io::Error::other("the segment's file is not open"),
                )
            })?;
            file.set_len(old.bytes)
                .map_err(|e| StoreError::io("cut a stream segment back", &path, &e))?;
            self.segments.insert(id, old);
        }
        self.active = self
            .segments
            .last_key_value()
            .map(|(&id, _)| id)
            .filter(|id| self.files.contains_key(id));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced.is_empty() && !self.dir_dirty {
            return Ok(());
        }
        for &id in &self.unsynced {
            if let Some(file) = self.files.get_mut(&id) {
                file.sync_data().map_err(|e| {
                    StoreError::io(
                        "sync a stream segment",
                        &segment_path(&self.shared.dir, id),
                        &e,
                    )
                })?;
            }
        }
        if self.dir_dirty {
            self.shared
                .disk
                .sync_dir(&self.shared.dir)
                .map_err(|e| StoreError::io("sync a stream directory", &self.shared.dir, &e))?;
            self.dir_dirty = false;
        }
        self.unsynced.clear();
        self.last_sync = Instant::now();
        // Only the active segment is appended to from now on.
        let active = self.active;
        self.files.retain(|&id, _| Some(id) == active);
        Ok(())
    }

    /// Tells the publishers whose records are stored.
    fn confirm(&mut self) {
        let stored = self.stored_end;
        let done: Vec<Done> = {
            let mut st = self.shared.state.lock();
            let (done, waiting): (Vec<_>, Vec<_>) =
                st.waiters.drain(..).partition(|(end, _)| *end <= stored);
            st.waiters = waiting;
            done.into_iter().map(|(_, done)| done).collect()
        };
        for done in done {
            // The publisher may have given up waiting: fine.
            let _ = done.send(Ok(()));
        }
    }

    /// A group could not be stored: the stream takes back everything not
    /// stored (this group and what was appended since), and their
    /// publishers are told.
    fn fail(&mut self, err: &StoreError, syncs: Vec<Done>) {
        tracing::error!(dir = %self.shared.dir.display(), %err, "a stream could not store a group of records");
        let poison = self.poisoned || err.is_sync_failure();
        let shared = self.shared.clone();
        let mut failed = Vec::new();
        self.sink.unstored(self.stored_end, &mut || {
            let mut st = shared.state.lock();
            st.pending.clear();
            st.records.clear();
            failed.extend(st.waiters.drain(..).map(|(_, done)| done));
            if poison && st.failed.is_none() {
                // What reached the disk is unknown: store nothing more until
                // the broker is reopened (PostgreSQL's rule).
                st.failed = Some(err.clone());
            }
        });
        for done in failed.into_iter().chain(syncs) {
            let _ = done.send(Err(err.clone()));
        }
    }

    /// Deletes the segments all of whose records retention trimmed, oldest
    /// first; never the last one holding records.
    fn upkeep(&mut self) {
        let Some(last) = self
            .segments
            .iter()
            .rev()
            .find(|(id, s)| s.end > **id)
            .map(|(&id, _)| id)
        else {
            return;
        };
        let first = self.sink.first_retained();
        let doomed: Vec<u64> = self
            .segments
            .range(..last)
            .take_while(|(_, s)| s.end <= first)
            .map(|(&id, _)| id)
            .collect();
        for id in doomed {
            let path = self.path(id);
            self.files.remove(&id);
            self.unsynced.remove(&id);
            if let Err(e) = self.shared.disk.remove(&path) {
                tracing::warn!(file = %path.display(), error = %e, "could not delete a stream segment");
                break;
            }
            self.segments.remove(&id);
            // One at a time, oldest first: a crash never leaves a hole.
            if let Err(e) = self.shared.disk.sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "could not sync a stream directory after deleting a segment");
                break;
            }
            tracing::debug!(file = %path.display(), "stream segment deleted");
        }
        self.count();
    }

    fn count(&self) {
        self.shared.count(&self.segments);
    }

    /// Rewrites the offsets file if the positions changed (atomically: a
    /// temporary file, synced, renamed over it, the directory synced).
    fn write_offsets(&mut self) -> Result<(), StoreError> {
        self.shared.moved.store(false, Ordering::Release);
        self.last_offsets = Instant::now();
        let positions = self.sink.positions();
        if positions == self.written_positions {
            return Ok(());
        }
        let result = self.replace_offsets(&positions);
        match result {
            Ok(()) => self.written_positions = positions,
            // Tried again later.
            Err(_) => self.shared.moved.store(true, Ordering::Release),
        }
        result
    }

    fn replace_offsets(&self, positions: &[(String, u64)]) -> Result<(), StoreError> {
        let disk = &self.shared.disk;
        let dir = &self.shared.dir;
        let tmp = dir.join(OFFSETS_TMP);
        let path = dir.join(OFFSETS);
        let mut buf = frame::header(FileKind::StreamOffsets, 0).to_vec();
        frame::write_frame(&mut buf, &encode_offsets(positions));
        let _ = disk.remove(&tmp);
        let mut file = disk
            .create(&tmp)
            .map_err(|e| StoreError::io("create the subscriber offsets", &tmp, &e))?;
        let written = file
            .write_all(&buf)
            .and_then(|()| file.sync_data())
            .map_err(|e| StoreError::io("write the subscriber offsets", &tmp, &e));
        drop(file);
        if let Err(e) = written {
            let _ = disk.remove(&tmp);
            return Err(e);
        }
        disk.rename(&tmp, &path)
            .map_err(|e| StoreError::io("replace the subscriber offsets", &path, &e))?;
        disk.sync_dir(dir)
            .map_err(|e| StoreError::io("sync a stream directory", dir, &e))
    }
}

impl DataDir {
    fn streams_dir(&self) -> PathBuf {
        self.options.dir.join("streams")
    }

    fn stream_dir(&self, id: StreamId) -> PathBuf {
        self.streams_dir().join(id.to_string())
    }

    /// Creates (and syncs) the directory of a new durable stream; returns its
    /// log, whose writer is to be started.
    pub(crate) fn create_stream(
        &self,
        id: StreamId,
    ) -> Result<(StreamLog, StreamSeed), StoreError> {
        let dir = self.stream_dir(id);
        // A leftover of a declaration that was never recorded.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| StoreError::io("clear a stream directory", &dir, &e))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io("create a stream directory", &dir, &e))?;
        let streams = self.streams_dir();
        self.disk
            .sync_dir(&streams)
            .and_then(|()| self.disk.sync_dir(&self.options.dir))
            .map_err(|e| StoreError::io("sync the streams directory", &streams, &e))?;
        Ok(StreamLog::new(
            self,
            dir,
            BTreeMap::new(),
            &RecoveredStream::default(),
        ))
    }

    /// Reads a durable stream's directory back; returns its log, whose writer
    /// is to be started, and what it held.
    pub(crate) fn open_stream(
        &self,
        id: StreamId,
    ) -> Result<(StreamLog, StreamSeed, RecoveredStream), StoreError> {
        let dir = self.stream_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io("create a stream directory", &dir, &e))?;
        let (recovered, segments) = recover(&*self.disk, &dir)?;
        let (log, seed) = StreamLog::new(self, dir, segments, &recovered);
        Ok((log, seed, recovered))
    }

    /// Deletes a durable stream's directory (its log closed, or never
    /// started).
    pub(crate) fn remove_stream(&self, id: StreamId) {
        self.remove_stream_dir(&self.stream_dir(id));
    }

    fn remove_stream_dir(&self, dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not delete a stream directory");
            return;
        }
        let streams = self.streams_dir();
        if let Err(e) = self.disk.sync_dir(&streams) {
            tracing::warn!(dir = %streams.display(), error = %e, "could not sync the streams directory");
        }
    }

    /// Deletes the directories of streams that are not declared (deletions
    /// a crash interrupted).
    pub(crate) fn remove_streams_except(&self, keep: &FxHashSet<StreamId>) {
        let Ok(entries) = std::fs::read_dir(self.streams_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<StreamId>().ok());
            if let Some(id) = id
                && !keep.contains(&id)
                && path.is_dir()
            {
                tracing::info!(dir = %path.display(), "directory of a deleted stream removed");
                self.remove_stream_dir(&path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(offset: u64, timestamp_ms: u64, envelope: &Envelope) -> StoredRecord {
        let mut buf = Vec::new();
        encode_record(&mut buf, offset, timestamp_ms, envelope);
        decode_record(&Bytes::from(buf)).expect("decodes")
    }

    #[test]
    fn records_round_trip() {
        let envelope = Envelope::new("price: 101")
            .with_routing_key("prices.eur")
            .with_header("source", "feed-3")
            .with_persistent(true);
        let got = round_trip(u64::MAX >> 1, 1_700_000_000_123, &envelope);
        assert_eq!(got.offset, u64::MAX >> 1);
        assert_eq!(got.timestamp_ms, 1_700_000_000_123);
        assert_eq!(got.envelope.id(), envelope.id());
        assert_eq!(got.envelope.payload(), envelope.payload());
        assert_eq!(got.envelope.routing_key(), "prices.eur");
        assert_eq!(got.envelope.headers(), envelope.headers());
    }

    #[test]
    fn bad_records_are_refused() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, 2, &Envelope::new("x"));
        let mut wrong_type = buf.clone();
        wrong_type[0] = 2;
        assert!(decode_record(&Bytes::from(wrong_type)).is_err());
        let mut trailing = buf.clone();
        trailing.push(0);
        assert!(decode_record(&Bytes::from(trailing)).is_err());
        for len in 0..buf.len() {
            assert!(
                decode_record(&Bytes::copy_from_slice(&buf[..len])).is_err(),
                "{len}"
            );
        }
    }

    #[test]
    fn offsets_round_trip() {
        let positions = vec![("billing".to_string(), 17), ("ünïcode".to_string(), 0)];
        let got = decode_offsets(&Bytes::from(encode_offsets(&positions))).unwrap();
        assert_eq!(got, positions);
        assert_eq!(
            decode_offsets(&Bytes::from(encode_offsets(&[]))).unwrap(),
            vec![]
        );
    }

    #[test]
    fn segment_names_carry_the_first_offset() {
        let path = segment_path(Path::new("/data/streams/3"), 4096);
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            "00000000000000004096.seg"
        );
        assert_eq!(segment_first(&path), Some(4096));
        assert_eq!(segment_first(Path::new("offsets")), None);
    }

    proptest! {
        #[test]
        fn any_record_round_trips(
            offset in any::<u64>(),
            timestamp_ms in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            key in "[a-z.]{0,20}",
            headers in proptest::collection::vec(("[a-z]{1,8}", any::<i64>()), 0..4),
        ) {
            let mut envelope = Envelope::new(payload.clone()).with_routing_key(key.clone());
            for (name, value) in &headers {
                envelope = envelope.with_header(name.clone(), *value);
            }
            let got = round_trip(offset, timestamp_ms, &envelope);
            prop_assert_eq!(got.offset, offset);
            prop_assert_eq!(got.timestamp_ms, timestamp_ms);
            prop_assert_eq!(got.envelope.id(), envelope.id());
            prop_assert_eq!(&got.envelope.payload()[..], &payload[..]);
            prop_assert_eq!(got.envelope.routing_key(), key.as_str());
            prop_assert_eq!(got.envelope.headers(), envelope.headers());
        }

        #[test]
        fn any_offsets_round_trip(
            positions in proptest::collection::vec((".{0,12}", any::<u64>()), 0..8),
        ) {
            let got = decode_offsets(&Bytes::from(encode_offsets(&positions))).unwrap();
            prop_assert_eq!(got, positions);
        }

        #[test]
        fn arbitrary_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&Bytes::from(data.clone()));
            let _ = decode_offsets(&Bytes::from(data));
        }
    }
}
