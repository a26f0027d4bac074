//! The shared log behind a stream: records with consecutive `u64` offsets, the
//! readers' positions, and retention, as a plain state machine (no actors, no
//! locks, no clock: the time is passed in), so that it can be tested on its own.
//!
//! - Records live in a ring (`VecDeque<Arc<Record>>`): one copy per record, and
//!   a reader's batch holds `Arc`s to it, so reading copies nothing and a
//!   trimmed record stays alive exactly as long as a batch still holds it.
//! - A reader's `cursor` is its *committed* position: the offset of the first
//!   record it has not finished handling. Readers fetch from their cursor and
//!   commit when a batch is handled (or at the record that failed).
//! - Retention (`max_len`, `max_bytes`, `max_age`) trims the oldest records. In
//!   block mode it never trims a record at or after the lowest live cursor: an
//!   append that would have to fails with `Refusal::Full` and the publisher
//!   waits. In drop-oldest mode it trims anyway, and a reader whose cursor fell
//!   behind the oldest record skips to it on its next read, which reports how
//!   many records it missed.
//! - Age is enforced lazily, at every append, read and stats call; append times
//!   never go backwards.
//! - A durable stream's records become readable only once they are stored
//!   (`confirm`, from the stream's disk writer): readers read up to the
//!   *visible* offset, not the next one. Records that could not be stored are
//!   taken back (`rollback`), which no reader can notice: it never saw them.
//! - Offsets increase but may have holes: a durable stream restored from disk
//!   (`restore`) lacks the records that were damaged there. Readers step over
//!   a hole; a record is found by its offset (directly when the offsets are
//!   consecutive, by binary search otherwise).
//!
//! The lowest live cursor is kept as a lower bound (`min_hint`) that is only
//! recomputed (a scan of the readers) when a trim would cross it: cursors only
//! move forward, so in the steady state an append that trims one record costs
//! a comparison.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::envelope::Envelope;
use crate::stream::options::{StreamOptions, StreamOverflow, StreamStart};

/// One record of the log: a message and where and when it was appended.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
    pub(crate) envelope: Envelope,
}

/// The retention limits and overflow policy of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_len: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_age_ms: Option<u64>,
    pub(crate) block: bool,
}

impl Limits {
    pub(crate) fn of(options: &StreamOptions) -> Limits {
        Limits {
            max_len: options.max_len.map_or(usize::MAX, |n| n.max(1)),
            max_bytes: options.max_bytes.map_or(usize::MAX, |n| n.max(1)),
            max_age_ms: options
                .max_age
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            block: options.overflow == StreamOverflow::Block,
        }
    }
}

/// A reader's identity: a slot index and that slot's generation, so that an id
/// whose reader was removed never reaches a reader that reuses the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ReaderId {
    index: usize,
    generation: u64,
}

#[derive(Debug)]
struct Reader<W> {
    cursor: u64,
    parked: bool,
    waker: Option<W>,
    delivered: u64,
    skipped: u64,
    /// The record a failed handler was on, and how many times it failed.
    redeliver: Option<(u64, u32)>,
    redeliveries: u64,
    name: Option<String>,
}

#[derive(Debug)]
struct Slot<W> {
    generation: u64,
    reader: Option<Reader<W>>,
}

/// Why an append was refused; the message is handed back.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Block mode, and retention would trim a record a live reader has not read.
    Full(Envelope),
    /// The stream was deleted.
    Closed,
    /// The stream's duplicate window knew the message's id.
    Duplicate(Box<crate::dedup::Duplicate>),
}

/// What a read found besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Read {
    /// Records the reader missed (drop-oldest) before the first one returned.
    pub(crate) skipped: u64,
    /// 0, or how many times the first record returned has failed before.
    pub(crate) attempt: u32,
    /// A blocked publisher may have room now: wake the publishers.
    pub(crate) notify: bool,
    /// Nothing to read: the reader is parked until the next append wakes it.
    pub(crate) parked: bool,
    /// The reader was removed or the stream closed.
    pub(crate) gone: bool,
}

/// A stream's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// The oldest retained offset.
    pub first_offset: u64,
    /// The offset the next record will get.
    pub next_offset: u64,
    /// Records retained.
    pub len: usize,
    /// Payload bytes retained.
    pub bytes: usize,
    /// Live subscribers (a crashed one that is restarting counts).
    pub subscribers: usize,
    /// Records appended since the stream was declared.
    pub published: u64,
    /// Records trimmed by retention.
    pub trimmed: u64,
    /// Records subscribers skipped because they were trimmed before being read
    /// (drop-oldest), summed over all subscribers.
    pub skipped: u64,
    /// Appends refused because the slowest subscriber had not read what
    /// retention would trim (block mode): each is a publisher that waited or a
    /// `try_publish` that failed.
    pub blocked: u64,
    /// A durable stream's bytes on disk (its segment files); 0 for a stream
    /// kept in memory only.
    pub bytes_on_disk: u64,
    /// A durable stream's segment files.
    pub segments: usize,
    /// Damaged records a durable stream skipped when it was read back from
    /// disk (each is a hole in the offsets).
    pub damaged_records: u64,
    /// Publishes refused by the stream's duplicate window.
    pub duplicates: u64,
    /// Message ids its duplicate window remembers now.
    pub dedup_ids: usize,
}

/// One subscriber's position and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// The committed position: the first record not yet handled.
    pub offset: u64,
    /// Records appended that it has not handled yet.
    pub lag: u64,
    /// Records handled.
    pub delivered: u64,
    /// Records it missed because they were trimmed first (drop-oldest).
    pub skipped: u64,
    /// Records handed to it again after its handler failed on them.
    pub redeliveries: u64,
}

/// The log: records, readers, retention. `W` is how a parked reader is woken
/// (the subscriber actor's address; `()` in tests).
#[derive(Debug)]
pub(crate) struct LogState<W> {
    records: VecDeque<Arc<Record>>,
    /// The oldest retained offset (`next` when there are no records).
    first: u64,
    /// The offset the next record gets.
    next: u64,
    /// Records stored on disk before being readable (see the module docs).
    durable: bool,
    /// A durable log's readable end: offsets before it are stored.
    visible: u64,
    bytes: usize,
    limits: Limits,
    slots: Vec<Slot<W>>,
    free: Vec<usize>,
    live: usize,
    /// A lower bound of the live readers' cursors (`u64::MAX`: none).
    min_hint: u64,
    parked: usize,
    publisher_waiting: bool,
    closed: bool,
    last_ts: u64,
    published: u64,
    trimmed: u64,
    skipped: u64,
    blocked: u64,
    stored: HashMap<String, u64>,
    /// The publishers' duplicate window, if the stream has one: rebuilt
    /// from the retained records after a restart, as JetStream's.
    dedup: Option<crate::dedup::Window>,
}

impl<W: Clone> LogState<W> {
    /// Gives the stream a duplicate window.
    pub(crate) fn set_dedup(&mut self, window: crate::dedup::Window) {
        self.dedup = Some(window);
    }

    pub(crate) fn new(limits: Limits) -> Self {
        LogState {
            records: VecDeque::new(),
            first: 0,
            next: 0,
            durable: false,
            visible: 0,
            bytes: 0,
            limits,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            min_hint: u64::MAX,
            parked: 0,
            publisher_waiting: false,
            closed: false,
            last_ts: 0,
            published: 0,
            trimmed: 0,
            skipped: 0,
            blocked: 0,
            stored: HashMap::new(),
            dedup: None,
        }
    }

    /// The oldest retained offset.
    pub(crate) fn first(&self) -> u64 {
        self.first
    }

    /// The offset the next record gets.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Makes records readable only once [`confirm`](Self::confirm)ed.
    pub(crate) fn set_durable(&mut self) {
        self.durable = true;
        self.visible = self.next;
    }

    /// Where readers stop: the next offset, or a durable log's stored end.
    fn readable(&self) -> u64 {
        if self.durable {
            self.visible
        } else {
            self.next
        }
    }

    /// The index in the ring of the first record at or after `offset`.
    fn index_of(&self, offset: u64) -> usize {
        let guess = usize::try_from(offset.saturating_sub(self.first)).unwrap_or(usize::MAX);
        match self.records.get(guess) {
            Some(r) if r.offset == offset => guess,
            _ => self.records.partition_point(|r| r.offset < offset),
        }
    }

    /// The record appended last.
    pub(crate) fn newest(&self) -> Option<&Arc<Record>> {
        self.records.back()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    fn reader(&self, id: ReaderId) -> Option<&Reader<W>> {
        self.slots
            .get(id.index)
            .filter(|s| s.generation == id.generation)?
            .reader
            .as_ref()
    }

    fn reader_mut(&mut self, id: ReaderId) -> Option<&mut Reader<W>> {
        self.slots
            .get_mut(id.index)
            .filter(|s| s.generation == id.generation)?
            .reader
            .as_mut()
    }

    /// True if every record before offset `upto` may be trimmed.
    fn may_trim_before(&mut self, upto: u64) -> bool {
        if !self.limits.block || upto <= self.min_hint {
            return true;
        }
        self.min_hint = self
            .slots
            .iter()
            .filter_map(|s| s.reader.as_ref())
            .map(|r| r.cursor)
            .min()
            .unwrap_or(u64::MAX);
        upto <= self.min_hint
    }

    fn pop_front(&mut self) {
        if let Some(record) = self.records.pop_front() {
            self.bytes -= record.envelope.size();
            self.first = self.records.front().map_or(self.next, |r| r.offset);
            self.trimmed += 1;
            crate::spare::release(&mut self.records);
        }
    }

    /// Trims records older than the age limit (in block mode, not those a live
    /// reader still needs).
    pub(crate) fn expire(&mut self, now_ms: u64) {
        let Some(age) = self.limits.max_age_ms else {
            return;
        };
        while let Some(front) = self.records.front() {
            let (timestamp_ms, offset) = (front.timestamp_ms, front.offset);
            if now_ms.saturating_sub(timestamp_ms) < age || !self.may_trim_before(offset + 1) {
                break;
            }
            self.pop_front();
        }
    }

    /// Appends a record at `now_ms`, trimming what retention requires, and
    /// pushes the wakers of the readers parked at the tail onto `wake`.
    pub(crate) fn append(
        &mut self,
        envelope: Envelope,
        now_ms: u64,
        wake: &mut Vec<W>,
    ) -> Result<u64, Refusal> {
        if self.closed {
            return Err(Refusal::Closed);
        }
        self.expire(now_ms);
        let size = envelope.size();
        let len = self.records.len();
        // How many of the oldest records must go for this one to fit.
        let mut k = (len + 1).saturating_sub(self.limits.max_len).min(len);
        let mut after = self.bytes.saturating_add(size);
        if self.limits.max_bytes != usize::MAX {
            after -= self
                .records
                .iter()
                .take(k)
                .map(|r| r.envelope.size())
                .sum::<usize>();
            while after > self.limits.max_bytes && k < len {
                after -= self.records[k].envelope.size();
                k += 1;
            }
        }
        if k > 0 && !self.may_trim_before(self.records[k - 1].offset + 1) {
            self.publisher_waiting = true;
            self.blocked += 1;
            return Err(Refusal::Full(envelope));
        }
        let timestamp_ms = now_ms.max(self.last_ts);
        if let Some(dedup) = &mut self.dedup {
            dedup
                .admit(envelope.id(), timestamp_ms, Some(self.next))
                .map_err(Refusal::Duplicate)?;
        }
        for _ in 0..k {
            self.pop_front();
        }
        let offset = self.next;
        self.last_ts = timestamp_ms;
        self.bytes += size;
        self.published += 1;
        self.next += 1;
        self.records.push_back(Arc::new(Record {
            offset,
            timestamp_ms,
            envelope,
        }));
        if !self.durable {
            self.wake_parked(wake);
        }
        Ok(offset)
    }

    /// Pushes the wakers of the parked readers onto `wake`, unparking them.
    fn wake_parked(&mut self, wake: &mut Vec<W>) {
        if self.parked > 0 {
            self.parked = 0;
            for slot in &mut self.slots {
                if let Some(reader) = slot.reader.as_mut().filter(|r| r.parked) {
                    reader.parked = false;
                    if let Some(waker) = &reader.waker {
                        wake.push(waker.clone());
                    }
                }
            }
        }
    }

    /// A durable log's records before `end` are stored: they become
    /// readable, and the readers parked at the old end are woken.
    pub(crate) fn confirm(&mut self, end: u64, wake: &mut Vec<W>) {
        let end = end.min(self.next);
        if end > self.visible {
            self.visible = end;
            self.wake_parked(wake);
        }
    }

    /// Takes back the records from offset `from` on, which could not be
    /// stored (no reader has seen them: they were never readable); the next
    /// record gets `from`. Returns whether publishers should be woken (the
    /// records taken back made room).
    pub(crate) fn rollback(&mut self, from: u64) -> bool {
        if from >= self.next {
            return false;
        }
        while let Some(back) = self.records.back() {
            if back.offset < from {
                break;
            }
            let size = back.envelope.size();
            if let Some(dedup) = &mut self.dedup {
                dedup.forget(back.envelope.id());
            }
            self.records.pop_back();
            self.bytes -= size;
            self.published = self.published.saturating_sub(1);
        }
        self.next = from;
        self.first = self.records.front().map_or(from, |r| r.offset);
        self.visible = self.visible.min(from);
        self.min_hint = self.min_hint.min(from);
        for reader in self.slots.iter_mut().filter_map(|s| s.reader.as_mut()) {
            reader.cursor = reader.cursor.min(from);
        }
        for offset in self.stored.values_mut() {
            *offset = (*offset).min(from);
        }
        std::mem::take(&mut self.publisher_waiting)
    }

    /// Puts back a record read from disk (recovery, before any reader):
    /// offsets increase, with holes where records were lost. Retention is
    /// applied by [`restored`](Self::restored), once they are all back.
    pub(crate) fn restore(&mut self, offset: u64, timestamp_ms: u64, envelope: Envelope) {
        if offset < self.next {
            return;
        }
        if self.records.is_empty() {
            self.first = offset;
        }
        self.bytes += envelope.size();
        self.last_ts = self.last_ts.max(timestamp_ms);
        if let Some(dedup) = &mut self.dedup {
            dedup.restore(
                envelope.id(),
                timestamp_ms,
                offset,
                postbox::clock::now_ms(),
            );
        }
        self.next = offset + 1;
        self.visible = self.next;
        self.records.push_back(Arc::new(Record {
            offset,
            timestamp_ms,
            envelope,
        }));
    }

    /// Ends a recovery: applies retention to the records put back, and sets
    /// the named readers' stored positions (never past the records: those
    /// after the last one stored were lost with it).
    pub(crate) fn restored(&mut self, positions: Vec<(String, u64)>, now_ms: u64) {
        self.expire(now_ms);
        while self.records.len() > self.limits.max_len || self.bytes > self.limits.max_bytes {
            self.pop_front();
        }
        self.first = self.records.front().map_or(self.next, |r| r.offset);
        self.visible = self.next;
        // Counted since the declaration: every offset handed out, and those
        // no longer held.
        self.published = self.next;
        self.trimmed = self.next - self.records.len() as u64;
        for (name, offset) in positions {
            self.stored.insert(name, offset.min(self.next));
        }
    }

    /// The position of every named reader: live ones' committed cursors, and
    /// the stored positions of the others.
    pub(crate) fn named_positions(&self) -> Vec<(String, u64)> {
        let mut positions = self.stored.clone();
        for reader in self.slots.iter().filter_map(|s| s.reader.as_ref()) {
            if let Some(name) = &reader.name {
                positions.insert(name.clone(), reader.cursor);
            }
        }
        let mut out: Vec<(String, u64)> = positions.into_iter().collect();
        out.sort();
        out
    }

    /// Where `start` points now.
    /// Positions are within the readable records (a durable log's stored
    /// ones).
    pub(crate) fn resolve(&self, start: StreamStart) -> u64 {
        let (first, end) = (self.first, self.readable());
        let first = first.min(end);
        let at = |index: usize| self.records.get(index).map_or(end, |r| r.offset.min(end));
        match start {
            StreamStart::First => first,
            StreamStart::Last => match self.index_of(end) {
                0 => end,
                i => at(i - 1),
            },
            StreamStart::Next => end,
            StreamStart::Offset(o) => o.clamp(first, end),
            StreamStart::Timestamp(ms) => at(self.records.partition_point(|r| r.timestamp_ms < ms)),
        }
    }

    /// Adds a reader at `start` (a named reader resumes at its stored position
    /// instead, if it has one). `Err(())` if a live reader has that name.
    #[allow(clippy::result_unit_err)]
    pub(crate) fn add_reader(
        &mut self,
        start: StreamStart,
        name: Option<String>,
        now_ms: u64,
    ) -> Result<ReaderId, ()> {
        if let Some(name) = &name
            && self
                .slots
                .iter()
                .filter_map(|s| s.reader.as_ref())
                .any(|r| r.name.as_ref() == Some(name))
        {
            return Err(());
        }
        self.expire(now_ms);
        let stored = name.as_ref().and_then(|n| self.stored.get(n)).copied();
        let cursor = match stored {
            Some(offset) => self.resolve(StreamStart::Offset(offset)),
            None => self.resolve(start),
        };
        let reader = Reader {
            cursor,
            parked: false,
            waker: None,
            delivered: 0,
            skipped: 0,
            redeliver: None,
            redeliveries: 0,
            name,
        };
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    reader: None,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[index];
        slot.generation += 1;
        slot.reader = Some(reader);
        self.live += 1;
        self.min_hint = self.min_hint.min(cursor);
        Ok(ReaderId {
            index,
            generation: slot.generation,
        })
    }

    /// Sets how a parked reader is woken; false if the reader is gone.
    pub(crate) fn set_waker(&mut self, id: ReaderId, waker: W) -> bool {
        match self.reader_mut(id) {
            Some(reader) => {
                reader.waker = Some(waker);
                true
            }
            None => false,
        }
    }

    /// Removes a reader (a named one's position is stored). Returns its final
    /// stats, and whether publishers should be woken.
    pub(crate) fn remove_reader(&mut self, id: ReaderId) -> Option<(SubscriberStats, bool)> {
        let stats = self.reader_stats(id)?;
        let slot = &mut self.slots[id.index];
        let reader = slot.reader.take()?;
        self.free.push(id.index);
        self.live -= 1;
        if reader.parked {
            self.parked -= 1;
        }
        if let Some(name) = reader.name {
            self.stored.insert(name, reader.cursor);
        }
        let notify = std::mem::take(&mut self.publisher_waiting);
        Some((stats, notify))
    }

    fn commit_inner(&mut self, id: ReaderId, done: u64) -> bool {
        let min_hint = self.min_hint;
        let Some(reader) = self.reader_mut(id) else {
            return false;
        };
        if done <= reader.cursor {
            return false;
        }
        let was = reader.cursor;
        reader.delivered += done - was;
        reader.cursor = done;
        if reader.redeliver.is_some_and(|(o, _)| o < done) {
            reader.redeliver = None;
        }
        // Only the slowest reader's progress can make room.
        if self.publisher_waiting && was <= min_hint {
            self.publisher_waiting = false;
            return true;
        }
        false
    }

    /// Commits `done` (if any), then reads up to `max` records from the
    /// reader's position into `out`, or parks it if there are none.
    pub(crate) fn read(
        &mut self,
        id: ReaderId,
        done: Option<u64>,
        max: usize,
        now_ms: u64,
        out: &mut Vec<Arc<Record>>,
    ) -> Read {
        let mut read = Read::default();
        if let Some(done) = done {
            read.notify = self.commit_inner(id, done);
        }
        if self.closed || self.reader(id).is_none() {
            read.gone = true;
            return read;
        }
        self.expire(now_ms);
        let (first, end) = (self.first, self.readable());
        let Some(reader) = self.reader_mut(id) else {
            read.gone = true;
            return read;
        };
        if reader.cursor < first {
            read.skipped = first - reader.cursor;
            reader.skipped += read.skipped;
            reader.cursor = first;
        }
        let cursor = reader.cursor;
        read.attempt = match reader.redeliver {
            Some((offset, attempt)) if offset == cursor => attempt,
            _ => 0,
        };
        let available = if cursor < end {
            self.index_of(cursor)..self.index_of(end)
        } else {
            0..0
        };
        if available.is_empty() {
            // At the end (or in a hole before it: the next confirm wakes it).
            if let Some(reader) = self.reader_mut(id)
                && !reader.parked
            {
                reader.parked = true;
                self.parked += 1;
            }
            read.parked = true;
        } else {
            let to = available.end.min(available.start.saturating_add(max));
            out.extend(self.records.range(available.start..to).cloned());
        }
        self.skipped += read.skipped;
        read
    }

    /// The handler failed on record `offset`: commit up to it and mark it for
    /// redelivery. Returns whether publishers should be woken.
    pub(crate) fn fail(&mut self, id: ReaderId, offset: u64) -> bool {
        let notify = self.commit_inner(id, offset);
        if let Some(reader) = self.reader_mut(id)
            && reader.cursor == offset
        {
            let attempt = match reader.redeliver {
                Some((o, a)) if o == offset => a.saturating_add(1),
                _ => 1,
            };
            reader.redeliver = Some((offset, attempt));
            reader.redeliveries += 1;
        }
        notify
    }

    /// Closes the log: appends and reads fail from now on. Returns whether
    /// publishers should be woken.
    pub(crate) fn close(&mut self) -> bool {
        self.closed = true;
        std::mem::take(&mut self.publisher_waiting)
    }

    /// The stored position of a named reader that is not live.
    pub(crate) fn stored_offset(&self, name: &str) -> Option<u64> {
        self.stored.get(name).copied()
    }

    pub(crate) fn reader_stats(&self, id: ReaderId) -> Option<SubscriberStats> {
        self.reader(id).map(|r| self.stats_of(r))
    }

    /// Every live reader's name (for a named one) and stats, in slot order.
    pub(crate) fn readers(&self) -> Vec<(Option<String>, SubscriberStats)> {
        self.slots
            .iter()
            .filter_map(|s| s.reader.as_ref())
            .map(|r| (r.name.clone(), self.stats_of(r)))
            .collect()
    }

    fn stats_of(&self, r: &Reader<W>) -> SubscriberStats {
        SubscriberStats {
            offset: r.cursor,
            lag: self.next().saturating_sub(r.cursor),
            delivered: r.delivered,
            skipped: r.skipped,
            redeliveries: r.redeliveries,
        }
    }

    pub(crate) fn stats(&mut self, now_ms: u64) -> StreamStats {
        self.expire(now_ms);
        StreamStats {
            first_offset: self.first,
            next_offset: self.next(),
            len: self.records.len(),
            bytes: self.bytes,
            subscribers: self.live,
            published: self.published,
            trimmed: self.trimmed,
            skipped: self.skipped,
            blocked: self.blocked,
            duplicates: self.dedup.as_ref().map_or(0, |d| d.stats().duplicates),
            dedup_ids: self.dedup.as_mut().map_or(0, |d| {
                d.expire(now_ms);
                d.stats().ids
            }),
            ..StreamStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(max_len: usize, max_bytes: usize, max_age_ms: Option<u64>, block: bool) -> Limits {
        Limits {
            max_len,
            max_bytes,
            max_age_ms,
            block,
        }
    }

    fn env(size: usize) -> Envelope {
        Envelope::new(vec![0u8; size])
    }

    fn offsets(out: &[Arc<Record>]) -> Vec<u64> {
        out.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn block_refuses_to_trim_unread_records_and_wakes_after_commit() {
        let mut log = LogState::<u32>::new(limits(3, usize::MAX, None, true));
        let r = log.add_reader(StreamStart::Next, None, 0).unwrap();
        log.set_waker(r, 7);
        let mut wake = Vec::new();
        let mut out = Vec::new();
        assert!(log.read(r, None, 64, 0, &mut out).parked);
        for i in 0..3 {
            assert_eq!(log.append(env(1), 0, &mut wake).unwrap(), i);
        }
        assert_eq!(wake, vec![7], "woken once, by the first append");
        assert!(matches!(
            log.append(env(1), 0, &mut wake),
            Err(Refusal::Full(_))
        ));
        let read = log.read(r, None, 2, 0, &mut out);
        assert_eq!((offsets(&out), read.notify), (vec![0, 1], false));
        out.clear();
        // Committing makes room, and says so because a publisher waits.
        let read = log.read(r, Some(2), 64, 0, &mut out);
        assert!(read.notify);
        assert_eq!(offsets(&out), vec![2]);
        assert_eq!(log.append(env(1), 0, &mut wake).unwrap(), 3);
        assert_eq!(log.append(env(1), 0, &mut wake).unwrap(), 4);
        assert!(matches!(
            log.append(env(1), 0, &mut wake),
            Err(Refusal::Full(_))
        ));
        assert_eq!(log.stats(0).blocked, 2);
    }

    #[test]
    fn drop_oldest_trims_and_the_reader_skips() {
        let mut log = LogState::<()>::new(limits(2, usize::MAX, None, false));
        let r = log.add_reader(StreamStart::First, None, 0).unwrap();
        let mut wake = Vec::new();
        for _ in 0..5 {
            log.append(env(1), 0, &mut wake).unwrap();
        }
        let mut out = Vec::new();
        let read = log.read(r, None, 64, 0, &mut out);
        assert_eq!((read.skipped, offsets(&out)), (3, vec![3, 4]));
        assert_eq!(log.reader_stats(r).unwrap().skipped, 3);
    }

    #[test]
    fn failures_are_redelivered_with_an_attempt_count() {
        let mut log = LogState::<()>::new(limits(usize::MAX, usize::MAX, None, true));
        let r = log.add_reader(StreamStart::First, None, 0).unwrap();
        for _ in 0..3 {
            log.append(env(1), 0, &mut Vec::new()).unwrap();
        }
        let mut out = Vec::new();
        log.read(r, None, 64, 0, &mut out);
        log.fail(r, 1);
        log.fail(r, 1);
        out.clear();
        let read = log.read(r, None, 64, 0, &mut out);
        assert_eq!((read.attempt, offsets(&out)), (2, vec![1, 2]));
        out.clear();
        let read = log.read(r, Some(3), 64, 0, &mut out);
        assert_eq!(read.attempt, 0);
        let stats = log.reader_stats(r).unwrap();
        assert_eq!(
            (stats.offset, stats.delivered, stats.redeliveries),
            (3, 3, 2)
        );
    }

    #[test]
    fn starts_and_named_positions() {
        let mut log = LogState::<()>::new(limits(usize::MAX, usize::MAX, None, true));
        for t in [10, 20, 30] {
            log.append(env(1), t, &mut Vec::new()).unwrap();
        }
        assert_eq!(log.resolve(StreamStart::First), 0);
        assert_eq!(log.resolve(StreamStart::Last), 2);
        assert_eq!(log.resolve(StreamStart::Next), 3);
        assert_eq!(log.resolve(StreamStart::Offset(99)), 3);
        assert_eq!(log.resolve(StreamStart::Timestamp(15)), 1);
        assert_eq!(log.resolve(StreamStart::Timestamp(31)), 3);
        let r = log
            .add_reader(StreamStart::First, Some("a".into()), 30)
            .unwrap();
        assert!(
            log.add_reader(StreamStart::First, Some("a".into()), 30)
                .is_err()
        );
        log.read(r, Some(2), 0, 30, &mut Vec::new());
        log.remove_reader(r);
        assert_eq!(log.stored_offset("a"), Some(2));
        let again = log
            .add_reader(StreamStart::Next, Some("a".into()), 30)
            .unwrap();
        assert_eq!(log.reader_stats(again).unwrap().offset, 2);
        // A stale id does not reach the reader that reuses its slot.
        assert!(log.reader_stats(r).is_none());
    }

    #[test]
    fn a_durable_log_reads_only_confirmed_records_and_takes_back_the_others() {
        let mut log = LogState::<u32>::new(limits(usize::MAX, usize::MAX, None, true));
        log.set_durable();
        let r = log
            .add_reader(StreamStart::Next, Some("a".into()), 0)
            .unwrap();
        log.set_waker(r, 7);
        let mut out = Vec::new();
        assert!(log.read(r, None, 64, 0, &mut out).parked);
        let mut wake = Vec::new();
        for i in 0..4 {
            assert_eq!(log.append(env(1), 0, &mut wake).unwrap(), i);
        }
        assert!(wake.is_empty(), "nothing is readable before it is stored");
        log.confirm(2, &mut wake);
        assert_eq!(wake, vec![7]);
        assert_eq!(log.resolve(StreamStart::Next), 2);
        assert_eq!(log.resolve(StreamStart::Offset(9)), 2);
        let read = log.read(r, None, 64, 0, &mut out);
        assert_eq!((offsets(&out), read.parked), (vec![0, 1], false));
        out.clear();
        // 2 and 3 could not be stored: taken back; the next append reuses 2.
        log.read(r, Some(2), 64, 0, &mut out);
        log.rollback(2);
        let stats = log.stats(0);
        assert_eq!((stats.next_offset, stats.len, stats.published), (2, 2, 2));
        assert_eq!(log.append(env(1), 0, &mut wake).unwrap(), 2);
        log.confirm(3, &mut wake);
        out.clear();
        assert_eq!(
            offsets(&{
                log.read(r, None, 64, 0, &mut out);
                out
            }),
            vec![2]
        );
        assert_eq!(log.named_positions(), vec![("a".to_string(), 2)]);
    }

    #[test]
    fn restored_records_keep_their_offsets_and_readers_step_over_holes() {
        let mut log = LogState::<()>::new(limits(5, usize::MAX, Some(1000), true));
        for (offset, ts) in [(3, 10), (4, 20), (6, 1500), (7, 1600), (8, 2000), (9, 2001)] {
            log.restore(offset, ts, env(1));
        }
        log.restored(vec![("a".into(), 5), ("b".into(), 99)], 2100);
        log.set_durable();
        // Age trimmed 3 and 4 (the length limit alone, 3).
        let stats = log.stats(2100);
        assert_eq!(
            (stats.first_offset, stats.next_offset, stats.len),
            (6, 10, 4)
        );
        assert_eq!(log.stored_offset("a"), Some(5));
        assert_eq!(log.stored_offset("b"), Some(10), "never past the records");
        assert_eq!(log.resolve(StreamStart::Last), 9);
        assert_eq!(log.resolve(StreamStart::Timestamp(1550)), 7);
        let r = log
            .add_reader(StreamStart::First, Some("a".into()), 2100)
            .unwrap();
        let mut out = Vec::new();
        log.read(r, None, 64, 2100, &mut out);
        assert_eq!(offsets(&out), vec![6, 7, 8, 9]);
        let mut wake = Vec::new();
        assert_eq!(log.append(env(1), 2100, &mut wake).unwrap(), 10);
    }

    #[test]
    fn age_trims_lazily_but_not_unread_records_in_block_mode() {
        let mut log = LogState::<()>::new(limits(usize::MAX, usize::MAX, Some(100), true));
        for t in [0, 50] {
            log.append(env(1), t, &mut Vec::new()).unwrap();
        }
        assert_eq!(log.stats(120).first_offset, 1);
        let r = log.add_reader(StreamStart::First, None, 120).unwrap();
        assert_eq!(log.stats(1000).first_offset, 1, "held by the reader");
        log.read(r, Some(2), 0, 1000, &mut Vec::new());
        assert_eq!(log.stats(1000).len, 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(usize),
        Read(usize, usize),
        Fail(usize),
        Add(u8),
        Remove(usize),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..20).prop_map(Op::Append),
            4 => (0usize..4, 1usize..6).prop_map(|(r, n)| Op::Read(r, n)),
            1 => (0usize..4).prop_map(Op::Fail),
            1 => (0u8..4).prop_map(Op::Add),
            1 => (0usize..4).prop_map(Op::Remove),
            1 => (0u64..50).prop_map(Op::Tick),
        ]
    }

    /// A model reader: its committed cursor and what it has been handed.
    struct ModelReader {
        id: ReaderId,
        cursor: u64,
        fetched: Vec<u64>,
        /// Every offset handled, in order, with skips reported.
        seen: Vec<u64>,
        skipped: u64,
    }

    proptest! {
        /// Against a model (a `VecDeque` of (offset, size, time) and plain
        /// cursors): offsets are consecutive, retention holds after every append,
        /// block mode never trims what a live reader has not committed, and each
        /// reader sees every offset in order exactly once, except the ones it is
        /// told it skipped (drop-oldest) and the ones redelivered after a failure.
        #[test]
        fn log_matches_model(
            max_len in 1usize..8,
            max_bytes in prop_oneof![Just(usize::MAX), 20usize..60],
            max_age in prop_oneof![Just(None), (10u64..100).prop_map(Some)],
            block in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let lim = limits(max_len, max_bytes, max_age, block);
            let mut log = LogState::<()>::new(lim);
            let mut model: VecDeque<(u64, usize, u64)> = VecDeque::new();
            let mut next = 0u64;
            let mut now = 0u64;
            let mut readers: Vec<ModelReader> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(size) => {
                        let size = size.min(max_bytes);
                        let min = readers.iter().map(|r| r.cursor).min().unwrap_or(u64::MAX);
                        // Model: age first (bounded by min in block mode), then len/bytes.
                        let mut m = model.clone();
                        let mut first = m.front().map_or(next, |r| r.0);
                        if let Some(age) = max_age {
                            while let Some(&(o, _, t)) = m.front() {
                                if now - t < age || (block && o >= min) { break; }
                                m.pop_front();
                                first = o + 1;
                            }
                        }
                        let _ = first;
                        let mut k = 0;
                        let fits = |m: &VecDeque<(u64, usize, u64)>, k: usize| {
                            let len = m.len() - k + 1;
                            let bytes: usize = m.iter().skip(k).map(|r| r.1).sum::<usize>() + size;
                            len <= max_len && bytes <= max_bytes
                        };
                        while !fits(&m, k) { k += 1; }
                        let refused = block && k > 0 && m[k - 1].0 >= min;
                        let result = log.append(env(size), now, &mut Vec::new());
                        if refused {
                            prop_assert!(matches!(result, Err(Refusal::Full(_))));
                            // The age trim happened anyway.
                            model = m;
                        } else {
                            prop_assert_eq!(result.ok(), Some(next));
                            for _ in 0..k { m.pop_front(); }
                            m.push_back((next, size, now));
                            next += 1;
                            model = m;
                        }
                    }
                    Op::Read(i, n) if !readers.is_empty() => {
                        let nr = readers.len();
                        let r = &mut readers[i % nr];
                        // Handle what was fetched, then commit and fetch again.
                        let done = r.fetched.last().map(|o| o + 1);
                        r.seen.append(&mut r.fetched);
                        if let Some(done) = done { r.cursor = r.cursor.max(done); }
                        let mut out = Vec::new();
                        let read = log.read(r.id, done, n, now, &mut out);
                        if let Some(age) = max_age {
                            let min = readers.iter().map(|r| r.cursor).min().unwrap_or(u64::MAX);
                            while let Some(&(o, _, t)) = model.front() {
                                if now - t < age || (block && o >= min) { break; }
                                model.pop_front();
                            }
                        }
                        let r = &mut readers[i % nr];
                        let first = model.front().map_or(next, |x| x.0);
                        let expect_skip = first.saturating_sub(r.cursor);
                        prop_assert_eq!(read.skipped, expect_skip);
                        if block { prop_assert_eq!(expect_skip, 0); }
                        r.skipped += expect_skip;
                        r.cursor = r.cursor.max(first);
                        let expect: Vec<u64> = (r.cursor..next).take(n).collect();
                        prop_assert_eq!(offsets(&out), expect.clone());
                        prop_assert_eq!(read.parked, expect.is_empty());
                        r.fetched = expect;
                    }
                    Op::Fail(i) if !readers.is_empty() => {
                        let nr = readers.len();
                        let r = &mut readers[i % nr];
                        if let Some(&failed) = r.fetched.first() {
                            // Nothing of the batch was handled: redelivered from its start.
                            r.fetched.clear();
                            log.fail(r.id, failed);
                            r.cursor = r.cursor.max(failed);
                        }
                    }
                    Op::Add(start) => {
                        let start = match start {
                            0 => StreamStart::First,
                            1 => StreamStart::Last,
                            2 => StreamStart::Next,
                            _ => StreamStart::Offset(next / 2),
                        };
                        let expected = log.resolve(start);
                        let id = log.add_reader(start, None, now).unwrap();
                        // add_reader expires first; resolve may have been before that.
                        let cursor = log.reader_stats(id).unwrap().offset;
                        prop_assert!(cursor >= expected.min(log.first()));
                        readers.push(ModelReader { id, cursor, fetched: Vec::new(), seen: Vec::new(), skipped: 0 });
                        if let Some(age) = max_age {
                            let min = readers.iter().map(|r| r.cursor).min().unwrap_or(u64::MAX);
                            while let Some(&(o, _, t)) = model.front() {
                                if now - t < age || (block && o >= min) { break; }
                                model.pop_front();
                            }
                        }
                    }
                    Op::Remove(i) if !readers.is_empty() => {
                        let nr = readers.len();
                        let r = readers.remove(i % nr);
                        prop_assert!(log.remove_reader(r.id).is_some());
                        // Everything it saw is consecutive, apart from reported skips.
                        let mut expect_next = None;
                        let mut gaps = 0;
                        for &o in &r.seen {
                            if let Some(e) = expect_next {
                                prop_assert!(o >= e, "out of order: {} after {}", o, e);
                                gaps += o - e;
                            }
                            expect_next = Some(o + 1);
                        }
                        prop_assert!(gaps <= r.skipped);
                    }
                    Op::Tick(ms) => now += ms,
                    _ => {}
                }
                let stats = log.stats(now);
                if let Some(age) = max_age {
                    let min = readers.iter().map(|r| r.cursor).min().unwrap_or(u64::MAX);
                    while let Some(&(o, _, t)) = model.front() {
                        if now - t < age || (block && o >= min) { break; }
                        model.pop_front();
                    }
                }
                let first = model.front().map_or(next, |x| x.0);
                prop_assert_eq!(stats.first_offset, first);
                prop_assert_eq!(stats.next_offset, next);
                prop_assert_eq!(stats.len, model.len());
                prop_assert_eq!(stats.bytes, model.iter().map(|r| r.1).sum::<usize>());
                prop_assert!(stats.len <= max_len);
                prop_assert!(stats.bytes <= max_bytes);
                if block {
                    for r in &readers {
                        prop_assert!(r.cursor >= first, "block mode trimmed unread records");
                    }
                }
            }
        }
    }
}
