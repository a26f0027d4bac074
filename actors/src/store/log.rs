//! The message log: queue actors append records (encoded straight into the
//! pending buffer, under one short lock); a writer thread writes what is
//! pending with one `write` per segment and one `fdatasync` for everyone
//! waiting (group commit), then confirms; and between groups it deletes or
//! compacts old segments (see [`space`](super::space)).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

use crate::envelope::{Envelope, WireWriter};
use crate::store::disk::{Disk, DiskFile};
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};
use crate::store::record::{self, Loc, QueueId, Record};
use crate::store::space::Segments;
use crate::store::{StorageOptions, StorageStats, StoreError, SyncPolicy};

/// How long acks and deliveries may wait, unsynced, when nothing else makes
/// the writer sync (they are allowed to be lost: a redelivery, not a loss).
const LAZY_SYNC: Duration = Duration::from_millis(200);

/// The confirmation of an append: resolves once it is durable per the sync
/// policy, or with the error that prevented it.
pub(crate) type Confirm = oneshot::Receiver<Result<(), StoreError>>;

/// Waits for a confirmation, if there is one: a writer that went away
/// without answering was closed.
pub(crate) async fn confirmed(confirm: Option<Confirm>) -> Result<(), StoreError> {
    match confirm {
        None => Ok(()),
        Some(confirm) => confirm.await.unwrap_or(Err(StoreError::Closed)),
    }
}

/// The message log of one broker. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    options: StorageOptions,
    disk: Arc<dyn Disk>,
    state: Mutex<State>,
    wake: Condvar,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    syncs: AtomicU64,
    bytes_written: AtomicU64,
    bytes_synced: AtomicU64,
    confirms: AtomicU64,
    confirm_wait_us: AtomicU64,
    confirm_wait_max_us: AtomicU64,
    compactions: AtomicU64,
    deleted: AtomicU64,
    write_errors: AtomicU64,
    damaged: AtomicU64,
}

struct State {
    chunks: Vec<Chunk>,
    /// The segment appends go to, and its length with what is pending.
    active: u64,
    active_len: u64,
    /// Whether the active segment's file exists (or is pending creation).
    active_created: bool,
    /// Bytes appended since the store opened: the tickets of confirms.
    appended: u64,
    waiters: Vec<Waiter>,
    segments: Segments,
    /// Set when a sync failed: the log's durable state is unknown, so
    /// nothing more is confirmed until the broker is reopened.
    failed: Option<StoreError>,
    closing: bool,
    closed: bool,
}

struct Chunk {
    segment: u64,
    create: bool,
    bytes: Vec<u8>,
}

struct Waiter {
    ticket: u64,
    since: Instant,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Appends in progress: records written through it are framed into the
/// pending buffer under the store's lock; [`finish`](Append::finish) hands
/// them to the writer.
pub(crate) struct Append<'a> {
    shared: &'a Shared,
    st: MutexGuard<'a, State>,
    wrote: bool,
}

impl Store {
    /// Starts the log in `dir` (the `log` directory of a data directory),
    /// after recovery: `segments` is what recovery found on disk, and appends
    /// go to a new segment after the last one.
    pub(crate) fn start(
        dir: PathBuf,
        options: StorageOptions,
        disk: Arc<dyn Disk>,
        segments: Segments,
        next_segment: u64,
        damaged: u64,
    ) -> Result<Store, StoreError> {
        let shared = Arc::new(Shared {
            dir,
            options,
            disk,
            state: Mutex::new(State {
                chunks: Vec::new(),
                active: next_segment,
                active_len: 0,
                active_created: false,
                appended: 0,
                waiters: Vec::new(),
                segments,
                failed: None,
                closing: false,
                closed: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        shared.counters.damaged.store(damaged, Ordering::Relaxed);
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("postbox-store".into())
            .spawn(move || Writer::new(writer).run())
            .map_err(|e| StoreError::io("start the writer thread", &shared.dir, &e))?;
        Ok(Store { shared })
    }

    /// Where durable queue `id` keeps its duplicate window (a key log beside
    /// the message log).
    pub(crate) fn dedup_path(&self, id: crate::store::QueueId) -> PathBuf {
        let data = self.shared.dir.parent().unwrap_or(&self.shared.dir);
        data.join("dedup").join(format!("{id}.log"))
    }

    /// Whether confirmations wait for `fdatasync` (the sync policy is not
    /// `Never`).
    pub(crate) fn syncs(&self) -> bool {
        self.shared.options.sync != SyncPolicy::Never
    }

    /// Starts appending; fails if the log can no longer confirm anything.
    pub(crate) fn append(&self) -> Result<Append<'_>, StoreError> {
        let st = self.shared.state.lock();
        if let Some(err) = &st.failed {
            return Err(err.clone());
        }
        if st.closing {
            return Err(StoreError::Closed);
        }
        Ok(Append {
            shared: &self.shared,
            st,
            wrote: false,
        })
    }

    /// Records settlements (and deliveries) without waiting for anything:
    /// they are written with the next group, and synced lazily. Ignored once
    /// the log has failed or closed (a lost settle is a redelivery).
    pub(crate) fn record(&self, settled: &[Loc], delivered: &[Loc]) {
        if settled.is_empty() && delivered.is_empty() {
            return;
        }
        if let Ok(mut append) = self.append() {
            append.deliver(delivered);
            append.settle(settled);
            append.finish(None);
        }
    }

    /// The log's counters.
    pub(crate) fn stats(&self) -> StorageStats {
        let c = &self.shared.counters;
        let st = self.shared.state.lock();
        let syncs = c.syncs.load(Ordering::Relaxed);
        let confirms = c.confirms.load(Ordering::Relaxed);
        StorageStats {
            bytes_on_disk: st.segments.bytes(),
            segments: st.segments.len(),
            live_messages: st
                .segments
                .iter()
                .map(|(_, s)| u64::from(s.live_count))
                .sum(),
            syncs,
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_per_sync: c
                .bytes_synced
                .load(Ordering::Relaxed)
                .checked_div(syncs)
                .unwrap_or(0),
            confirms,
            confirm_latency_avg_us: c
                .confirm_wait_us
                .load(Ordering::Relaxed)
                .checked_div(confirms)
                .unwrap_or(0),
            confirm_latency_max_us: c.confirm_wait_max_us.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            segments_deleted: c.deleted.load(Ordering::Relaxed),
            damaged_records: c.damaged.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            failed: st.failed.as_ref().map(ToString::to_string),
        }
    }

    /// Writes and syncs what is pending, and stops the writer; appends fail
    /// from now on. Waits for the writer (bounded: it finishes its group).
    pub(crate) fn close(&self) {
        stop_writer(&self.shared.state, &self.shared.wake, &self.shared.dir);
    }
}

/// What a writer thread and its owner share to stop it.
pub(crate) trait WriterState {
    /// Tells the writer to finish what is pending and stop.
    fn close(&mut self);
    /// Whether the writer has stopped.
    fn closed(&self) -> bool;
}

impl WriterState for State {
    fn close(&mut self) {
        self.closing = true;
    }
    fn closed(&self) -> bool {
        self.closed
    }
}

/// Stops a writer thread and waits for it (at most 30 s: it finishes its
/// group, syncs and answers its waiters).
pub(crate) fn stop_writer<S: WriterState>(state: &Mutex<S>, wake: &Condvar, dir: &Path) {
    let mut st = state.lock();
    st.close();
    wake.notify_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !st.closed() {
        if wake.wait_until(&mut st, deadline).timed_out() {
            tracing::error!(dir = %dir.display(), "a storage writer did not stop in 30 s");
            return;
        }
    }
}

impl Append<'_> {
    /// The buffer for the next record: the active segment's, after rolling
    /// over to a new segment if the active one is full.
    fn buffer(&mut self, roll_ok: bool) -> &mut Vec<u8> {
        let st = &mut *self.st;
        let full = st.active_len >= self.shared.options.segment_bytes
            || st
                .segments
                .get(st.active)
                .is_some_and(|s| s.publishes >= Loc::MAX_ORDINAL);
        if roll_ok && full && st.active_created {
            st.active += 1;
            st.active_len = 0;
            st.active_created = false;
        }
        if !st.active_created {
            st.active_created = true;
            st.segments.add(st.active, HEADER_LEN as u64);
            st.active_len = HEADER_LEN as u64;
            st.appended += HEADER_LEN as u64;
            st.chunks.push(Chunk {
                segment: st.active,
                create: true,
                bytes: frame::header(FileKind::Segment, st.active).to_vec(),
            });
        } else if st.chunks.last().is_none_or(|c| c.segment != st.active) {
            st.chunks.push(Chunk {
                segment: st.active,
                create: false,
                bytes: Vec::new(),
            });
        }
        self.wrote = true;
        // Just pushed, or checked above.
        &mut st
            .chunks
            .last_mut()
            .expect("a chunk for the active segment")
            .bytes
    }

    /// Accounts for a record of `len` bytes just framed into the buffer.
    fn grew(&mut self, len: usize) {
        let st = &mut *self.st;
        st.active_len += len as u64;
        st.appended += len as u64;
        if let Some(s) = st.segments.get_mut(st.active) {
            s.bytes += len as u64;
        }
    }

    /// Appends a publish record; returns where the message is.
    pub(crate) fn publish(
        &mut self,
        queue: QueueId,
        seq: u64,
        expires_at: u64,
        message: &Envelope,
    ) -> Loc {
        let segment = {
            self.buffer(true);
            self.st.active
        };
        let ordinal = self.st.segments.get(segment).map_or(0, |s| s.publishes);
        let buf = self.buffer(false);
        let start = buf.len();
        let at = frame::begin_frame(buf);
        record::encode_publish(
            &mut WireWriter::new(buf),
            queue,
            seq,
            ordinal,
            expires_at,
            message,
        );
        frame::end_frame(buf, at);
        let len = buf.len() - start;
        self.grew(len);
        let loc = Loc { segment, ordinal };
        self.st.segments.publish(loc);
        loc
    }

    /// Appends one atomic record (a transaction's commit): `publishes` as
    /// `(queue, seq, expires_at, message)`, and `settled`. Recovery applies
    /// all of it or, if the record is not intact, none of it. Returns where
    /// each published message is, in order.
    pub(crate) fn atomic(
        &mut self,
        publishes: &[(QueueId, u64, u64, &Envelope)],
        settled: &[Loc],
    ) -> Vec<Loc> {
        let mut segment = {
            self.buffer(true);
            self.st.active
        };
        let mut first = self.st.segments.get(segment).map_or(0, |s| s.publishes);
        // Every ordinal of the record must fit in the segment it is in.
        if u64::from(first) + publishes.len() as u64 > u64::from(Loc::MAX_ORDINAL) {
            self.st.active += 1;
            self.st.active_len = 0;
            self.st.active_created = false;
            self.buffer(true);
            segment = self.st.active;
            first = 0;
        }
        let locs: Vec<Loc> = (0..publishes.len())
            .map(|i| Loc {
                segment,
                ordinal: first + i as u32,
            })
            .collect();
        let buf = self.buffer(false);
        let start = buf.len();
        let at = frame::begin_frame(buf);
        record::encode_atomic(&mut WireWriter::new(buf), publishes, &locs, settled);
        frame::end_frame(buf, at);
        let len = buf.len() - start;
        self.grew(len);
        for &loc in &locs {
            self.st.segments.publish(loc);
        }
        for &loc in settled {
            self.st.segments.settle(loc);
        }
        locs
    }

    /// Appends a settle record: these messages left their queues.
    pub(crate) fn settle(&mut self, locs: &[Loc]) {
        self.locs(false, locs);
        for &loc in locs {
            self.st.segments.settle(loc);
        }
    }

    /// Appends a delivery record: these messages were delivered once more.
    pub(crate) fn deliver(&mut self, locs: &[Loc]) {
        self.locs(true, locs);
    }

    fn locs(&mut self, deliver: bool, locs: &[Loc]) {
        if locs.is_empty() {
            return;
        }
        let buf = self.buffer(true);
        let start = buf.len();
        let at = frame::begin_frame(buf);
        record::encode_locs(&mut WireWriter::new(buf), deliver, locs);
        frame::end_frame(buf, at);
        let len = buf.len() - start;
        self.grew(len);
    }

    /// Hands the records to the writer; with `confirm`, it is told once they
    /// are durable (per the sync policy).
    pub(crate) fn finish(mut self, confirm: Option<oneshot::Sender<Result<(), StoreError>>>) {
        let waiter = confirm.is_some();
        if let Some(done) = confirm {
            let ticket = self.st.appended;
            self.st.waiters.push(Waiter {
                ticket,
                since: Instant::now(),
                done,
            });
        }
        if self.wrote || waiter {
            self.shared.wake.notify_one();
        }
    }
}

pub(crate) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// The segment id of a file name, if it is a segment.
pub(crate) fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".seg")?.parse().ok()
}

/// The writer thread's state: open files and what is not synced yet.
struct Writer {
    shared: Arc<Shared>,
    files: BTreeMap<u64, Box<dyn DiskFile>>,
    /// Bytes of each open file known to be written (to cut back to after a
    /// failed write).
    lengths: BTreeMap<u64, u64>,
    unsynced: BTreeSet<u64>,
    unsynced_bytes: u64,
    dir_dirty: bool,
    last_sync: Instant,
    /// How long the last sync took, and how many confirmations the last
    /// group carried: see [`gather`](Self::gather).
    sync_cost: Duration,
    last_waiters: usize,
}

/// The longest a group waits for more publishers to join it.
const GATHER_AT_MOST: Duration = Duration::from_millis(2);
/// How long a gathering group waits for the next publisher, at least and at
/// most.
const GATHER_GAP: (Duration, Duration) = (Duration::from_micros(10), Duration::from_micros(100));

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        Writer {
            shared,
            files: BTreeMap::new(),
            lengths: BTreeMap::new(),
            unsynced: BTreeSet::new(),
            unsynced_bytes: 0,
            dir_dirty: false,
            last_sync: Instant::now(),
            sync_cost: Duration::ZERO,
            last_waiters: 0,
        }
    }

    fn policy(&self) -> SyncPolicy {
        self.shared.options.sync
    }

    fn run(mut self) {
        loop {
            let (chunks, ticket, waiting, closing) = self.next_group();
            let wrote = self.write(chunks);
            let lazy_due = !self.unsynced.is_empty() && self.last_sync.elapsed() >= LAZY_SYNC;
            let sync_now = match self.policy() {
                SyncPolicy::Always => waiting || closing || lazy_due,
                SyncPolicy::Interval(every) => closing || self.last_sync.elapsed() >= every,
                SyncPolicy::Never => closing,
            };
            let result = wrote.and_then(|()| if sync_now { self.sync() } else { Ok(()) });
            let durable = match self.policy() {
                SyncPolicy::Always => sync_now,
                SyncPolicy::Interval(_) | SyncPolicy::Never => true,
            };
            self.complete(ticket, &result, durable);
            if closing {
                let mut st = self.shared.state.lock();
                st.closed = true;
                for w in st.waiters.drain(..) {
                    let _ = w.done.send(Err(StoreError::Closed));
                }
                self.shared.wake.notify_all();
                return;
            }
            if result.is_ok() {
                self.upkeep();
            }
        }
    }

    /// Waits for something to write (or a sync that is due); takes it.
    fn next_group(&mut self) -> (Vec<Chunk>, u64, bool, bool) {
        let shared = self.shared.clone();
        let mut st = shared.state.lock();
        loop {
            // Waiters with nothing left to write wait for a sync only.
            if !st.chunks.is_empty() || st.closing || !st.waiters.is_empty() {
                break;
            }
            let pending_sync = !self.unsynced.is_empty() || self.dir_dirty;
            let timeout = match (pending_sync, self.policy()) {
                (true, SyncPolicy::Always) => LAZY_SYNC.saturating_sub(self.last_sync.elapsed()),
                (true, SyncPolicy::Interval(every)) => {
                    every.saturating_sub(self.last_sync.elapsed())
                }
                _ => Duration::from_secs(3600),
            };
            if pending_sync && timeout.is_zero() && self.policy() != SyncPolicy::Never {
                break;
            }
            self.shared.wake.wait_for(&mut st, timeout);
        }
        self.gather(&mut st);
        let chunks = std::mem::take(&mut st.chunks);
        (chunks, st.appended, !st.waiters.is_empty(), st.closing)
    }

    /// Group commit under concurrency (PostgreSQL's `commit_delay`): when
    /// the last group confirmed several publishers, they are likely to
    /// publish again at once, and the group that starts now would miss them
    /// by a few microseconds and take a sync of its own. So it waits while
    /// they keep coming: until none has joined for a short gap (an eighth
    /// of a sync), and never longer than a sync takes. With N publishers
    /// each waiting for its confirm, groups then carry about N messages
    /// instead of N/2. A lone publisher never waits.
    fn gather(&mut self, st: &mut MutexGuard<'_, State>) {
        if self.policy() != SyncPolicy::Always || st.closing || self.last_waiters < 2 {
            self.last_waiters = st.waiters.len();
            return;
        }
        let hard = Instant::now() + self.sync_cost.min(GATHER_AT_MOST);
        let gap = (self.sync_cost / 8).clamp(GATHER_GAP.0, GATHER_GAP.1);
        loop {
            let joined = st.waiters.len();
            // Asleep, not on the condition variable: woken by every append,
            // this thread would take CPU from the publishers it waits for.
            MutexGuard::unlocked(st, || std::thread::sleep(gap));
            if st.closing || st.waiters.len() == joined || Instant::now() >= hard {
                break;
            }
        }
        self.last_waiters = st.waiters.len();
    }

    fn write(&mut self, chunks: Vec<Chunk>) -> Result<(), StoreError> {
        let dir = self.shared.dir.clone();
        let mut total = 0u64;
        for chunk in chunks {
            let path = segment_path(&dir, chunk.segment);
            if chunk.create {
                let file = self
                    .shared
                    .disk
                    .create(&path)
                    .map_err(|e| StoreError::io("create a segment", &path, &e))?;
                self.files.insert(chunk.segment, file);
                self.lengths.insert(chunk.segment, 0);
                self.dir_dirty = true;
            }
            let Some(file) = self.files.get_mut(&chunk.segment) else {
                // Its file could not be created earlier: nothing to append to.
                return Err(StoreError::io(
                    "append to a segment",
                    &path,
                    &std::io::Error::other("the segment's file is not open"),
                ));
            };
            if let Err(e) = file.write_all(&chunk.bytes) {
                self.shared
                    .counters
                    .write_errors
                    .fetch_add(1, Ordering::Relaxed);
                // Cut the partial write back, so that what follows is framed
                // from a clean end (a torn tail would be cut at reopening,
                // but later records must not land behind it).
                let good = self.lengths.get(&chunk.segment).copied().unwrap_or(0);
                let _ = file.set_len(good);
                return Err(StoreError::io("write a segment", &path, &e));
            }
            let len = chunk.bytes.len() as u64;
            *self.lengths.entry(chunk.segment).or_default() += len;
            self.unsynced.insert(chunk.segment);
            self.unsynced_bytes += len;
            total += len;
        }
        self.shared
            .counters
            .bytes_written
            .fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced.is_empty() && !self.dir_dirty {
            return Ok(());
        }
        let dir = self.shared.dir.clone();
        let started = Instant::now();
        for &id in &self.unsynced {
            if let Some(file) = self.files.get_mut(&id) {
                file.sync_data()
                    .map_err(|e| StoreError::io("sync a segment", &segment_path(&dir, id), &e))?;
            }
        }
        if self.dir_dirty {
            self.shared
                .disk
                .sync_dir(&dir)
                .map_err(|e| StoreError::io("sync the log directory", &dir, &e))?;
            self.dir_dirty = false;
        }
        let c = &self.shared.counters;
        c.syncs.fetch_add(1, Ordering::Relaxed);
        c.bytes_synced
            .fetch_add(self.unsynced_bytes, Ordering::Relaxed);
        self.unsynced.clear();
        self.unsynced_bytes = 0;
        self.last_sync = Instant::now();
        self.sync_cost = self.last_sync - started;
        // Only the active segment is appended to from now on.
        let active = self.shared.state.lock().active;
        self.files.retain(|&id, _| id >= active);
        self.lengths.retain(|&id, _| id >= active);
        Ok(())
    }

    /// Confirms (or fails) the waiters the group covered.
    fn complete(&mut self, ticket: u64, result: &Result<(), StoreError>, durable: bool) {
        let mut st = self.shared.state.lock();
        let err = match result {
            Ok(()) if !durable => return,
            Ok(()) => {
                let now = Instant::now();
                let c = &self.shared.counters;
                let (done, waiting): (Vec<Waiter>, Vec<Waiter>) =
                    st.waiters.drain(..).partition(|w| w.ticket <= ticket);
                st.waiters = waiting;
                drop(st);
                for w in done {
                    let waited = now.duration_since(w.since).as_micros() as u64;
                    c.confirms.fetch_add(1, Ordering::Relaxed);
                    c.confirm_wait_us.fetch_add(waited, Ordering::Relaxed);
                    c.confirm_wait_max_us.fetch_max(waited, Ordering::Relaxed);
                    // Free without a recorder installed (see crate::monitor).
                    metrics::histogram!("postbox_confirm_latency_seconds")
                        .record(waited as f64 / 1e6);
                    // The publisher may have given up waiting: fine.
                    let _ = w.done.send(Ok(()));
                }
                return;
            }
            Err(err) => err,
        };
        tracing::error!(%err, "the store could not write or sync a group of records");
        if err.is_sync_failure() {
            // What reached the disk is unknown after a failed sync: confirm
            // nothing more until the broker is reopened (PostgreSQL's rule).
            st.failed = Some(err.clone());
        } else if !self.files.contains_key(&st.active) {
            // The active segment's file could not be created: the next
            // appends start a new one.
            st.active += 1;
            st.active_created = false;
        }
        // Everything of this group failed (nothing after the cut reached the
        // file); what was appended since is written by the next group,
        // unless the log has failed.
        let poisoned = st.failed.is_some();
        let (failed, waiting): (Vec<Waiter>, Vec<Waiter>) = st
            .waiters
            .drain(..)
            .partition(|w| poisoned || w.ticket <= ticket);
        st.waiters = waiting;
        drop(st);
        for w in failed {
            let _ = w.done.send(Err(err.clone()));
        }
    }

    /// Deletes segments nothing needs, then compacts at most one.
    fn upkeep(&mut self) {
        let (deletable, compact) = {
            let st = self.shared.state.lock();
            (
                st.segments.deletable(st.active),
                st.segments
                    .to_compact(st.active)
                    .filter(|id| !self.unsynced.contains(id)),
            )
        };
        let dir = self.shared.dir.clone();
        for id in deletable {
            if self.unsynced.contains(&id) {
                break;
            }
            let path = segment_path(&dir, id);
            self.files.remove(&id);
            self.lengths.remove(&id);
            match self.shared.disk.remove(&path) {
                Ok(()) => {
                    // One at a time: a later segment's removal must not be
                    // durable before an earlier one's (its settle records
                    // may be what kept the earlier one's messages dead).
                    if let Err(e) = self.shared.disk.sync_dir(&dir) {
                        tracing::warn!(error = %e, "could not sync the log directory after removing a segment");
                        break;
                    }
                    self.shared.state.lock().segments.remove(id);
                    self.shared.counters.deleted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(segment = id, "segment deleted");
                }
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "could not delete a segment");
                    break;
                }
            }
        }
        if let Some(id) = compact
            && let Err(e) = self.compact(id)
        {
            tracing::warn!(segment = id, error = %e, "could not compact a segment");
        }
    }

    /// Rewrites segment `id` in place with its live publishes and the
    /// deliveries of live messages (see [`space`](super::space)).
    fn compact(&mut self, id: u64) -> Result<(), StoreError> {
        let dir = self.shared.dir.clone();
        let path = segment_path(&dir, id);
        let data = self
            .shared
            .disk
            .read(&path)
            .map_err(|e| StoreError::io("read a segment to compact", &path, &e))?;
        let name = path.display().to_string();
        frame::check_header(&data, FileKind::Segment, &name)?;
        let live = self.shared.state.lock().segments.clone();
        let mut out = frame::header(FileKind::Segment, id).to_vec();
        let mut kept = Vec::new();
        let mut keep = |record: Record, out: &mut Vec<u8>| match record {
            Record::Publish { ordinal, .. }
                if live.is_live(Loc {
                    segment: id,
                    ordinal,
                }) =>
            {
                kept.push(ordinal);
                let at = frame::begin_frame(out);
                record.encode(out);
                frame::end_frame(out, at);
            }
            Record::Deliver(mut locs) => {
                locs.retain(|&l| live.is_live(l));
                if !locs.is_empty() {
                    let at = frame::begin_frame(out);
                    Record::Deliver(locs).encode(out);
                    frame::end_frame(out, at);
                }
            }
            // Settles point at dead publishes, which go now (or went with
            // older segments, all clean).
            _ => {}
        };
        for item in Scan::new(bytes::Bytes::from(data), HEADER_LEN) {
            let Scanned::Frame { payload, .. } = item else {
                continue;
            };
            match Record::decode(&payload) {
                Ok(Record::Atomic(records)) => {
                    for r in records {
                        keep(r, &mut out);
                    }
                }
                Ok(record) => keep(record, &mut out),
                Err(_) => {}
            }
        }
        let tmp = dir.join(format!("{id:020}.compact"));
        let _ = self.shared.disk.remove(&tmp);
        let mut file = self
            .shared
            .disk
            .create(&tmp)
            .map_err(|e| StoreError::io("create a compacted segment", &tmp, &e))?;
        let written = file
            .write_all(&out)
            .and_then(|()| file.sync_data())
            .map_err(|e| StoreError::io("write a compacted segment", &tmp, &e));
        drop(file);
        if let Err(e) = written {
            let _ = self.shared.disk.remove(&tmp);
            return Err(e);
        }
        self.shared
            .disk
            .rename(&tmp, &path)
            .map_err(|e| StoreError::io("replace a compacted segment", &path, &e))?;
        self.shared
            .disk
            .sync_dir(&dir)
            .map_err(|e| StoreError::io("sync the log directory", &dir, &e))?;
        self.shared
            .state
            .lock()
            .segments
            .compacted(id, &kept, out.len() as u64);
        self.shared
            .counters
            .compactions
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(segment = id, kept = kept.len(), "segment compacted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rustc_hash::FxHashSet;

    use super::*;
    use crate::store::DataDir;

    /// A commit record whose publishes would not all fit below the last
    /// ordinal of the active segment starts a new segment: past it, a
    /// location would not pack (and recovery refuses such a record).
    #[test]
    fn a_commit_record_never_passes_a_segments_last_ordinal() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = DataDir::open(StorageOptions::new(dir.path())).unwrap();
        let (store, _) = data.start_log(&FxHashSet::default()).unwrap();
        let message = Envelope::new("m");
        let mut append = store.append().unwrap();
        let first = append.publish(1, 1, u64::MAX, &message);
        // As if the segment already held almost all it can.
        let active = append.st.active;
        if let Some(s) = append.st.segments.get_mut(active) {
            s.publishes = Loc::MAX_ORDINAL - 1;
        }
        let publishes: Vec<(QueueId, u64, u64, &Envelope)> =
            (2..5).map(|seq| (1, seq, u64::MAX, &message)).collect();
        let locs = append.atomic(&publishes, &[]);
        append.finish(None);
        assert!(
            locs.iter().all(|l| l.ordinal <= Loc::MAX_ORDINAL),
            "{locs:?}"
        );
        assert!(
            locs.iter().all(|l| l.segment == first.segment + 1),
            "{locs:?}"
        );
        assert_eq!(locs[0].ordinal, 0);
        store.close();
    }
}
