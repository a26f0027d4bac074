//! Reading the message log back at startup: every segment in order, each
//! record applied to a map of live messages; what remains are the messages
//! of each durable queue, in publish order, with their delivery counts.

use std::path::Path;

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::envelope::Envelope;
use crate::store::StoreError;
use crate::store::disk::Disk;
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};
use crate::store::log::segment_id;
use crate::store::record::{Loc, QueueId, Record};
use crate::store::space::Segments;

/// A message of a durable queue, as recovered.
#[derive(Clone, Debug)]
pub(crate) struct Recovered {
    pub(crate) seq: u64,
    pub(crate) expires_at: u64,
    /// With its delivery count (and redelivered flag) as of the crash.
    pub(crate) message: Envelope,
    pub(crate) loc: Loc,
}

/// What the log held.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// Each queue's messages, by publish sequence number.
    pub(crate) queues: FxHashMap<QueueId, Vec<Recovered>>,
    pub(crate) segments: Segments,
    /// The id the next segment gets.
    pub(crate) next_segment: u64,
    /// Damaged records skipped (each reported).
    pub(crate) damaged: u64,
    /// Bytes of torn tails cut off.
    pub(crate) truncated: u64,
    /// Records read.
    pub(crate) records: u64,
}

struct Pending {
    loc: Loc,
    queue: QueueId,
    seq: u64,
    expires_at: u64,
    message: Envelope,
    delivered: u32,
}

/// Reads every segment in `dir`; messages of queues not in `queues` are dead.
pub(crate) fn recover(
    disk: &dyn Disk,
    dir: &Path,
    queues: &FxHashSet<QueueId>,
) -> Result<Recovery, StoreError> {
    let mut ids = Vec::new();
    for path in disk
        .list(dir)
        .map_err(|e| StoreError::io("list the log directory", dir, &e))?
    {
        if path.extension().is_some_and(|e| e == "compact") {
            // A compaction that did not finish: its segment is intact.
            let _ = disk.remove(&path);
            continue;
        }
        if let Some(id) = segment_id(&path) {
            // Not a segment the writer made: its messages' locations would
            // not pack (and the next segment's id could overflow).
            if !(1..=Loc::MAX_SEGMENT).contains(&id) {
                return Err(StoreError::Corrupt {
                    file: path.display().to_string(),
                    detail: format!(
                        "segment id {id} is out of range (1 to {})",
                        Loc::MAX_SEGMENT
                    ),
                });
            }
            ids.push((id, path));
        }
    }
    ids.sort();
    let mut out = Recovery {
        next_segment: ids.last().map_or(1, |(id, _)| id + 1),
        ..Recovery::default()
    };
    // The publishes read, in log order (settled ones become `None`), and
    // where each live one is: the map's entries stay small, so growing it
    // moves no messages.
    let mut live = Live::default();
    for (id, path) in ids {
        let name = path.display().to_string();
        let data = disk
            .read(&path)
            .map_err(|e| StoreError::io("read a segment", &path, &e))?;
        let header_id = frame::check_header(&data, FileKind::Segment, &name)?;
        if header_id != id {
            return Err(StoreError::Corrupt {
                file: name,
                detail: format!("its header says segment {header_id}"),
            });
        }
        let len = data.len();
        // Records are rarely smaller than this: fewer resizes.
        live.reserve(len / 96);
        out.segments.add(id, len as u64);
        let mut scan = Scan::new(Bytes::from(data), HEADER_LEN);
        for item in scan.by_ref() {
            match item {
                Scanned::Frame { offset, payload } => match Record::decode(&payload) {
                    Ok(record) => {
                        out.records += 1;
                        apply(record, id, &mut live, &mut out.segments);
                    }
                    Err(e) => {
                        out.damaged += 1;
                        tracing::error!(file = %name, offset, error = %e, "undecodable record skipped");
                    }
                },
                Scanned::Damaged { offset, len } => {
                    out.damaged += 1;
                    tracing::error!(file = %name, offset, len, "damaged record skipped");
                }
            }
        }
        if scan.torn() {
            let end = scan.valid_end();
            out.truncated += (len - end) as u64;
            tracing::warn!(file = %name, at = end, bytes = len - end, "torn tail cut off");
            disk.truncate(&path, end as u64)
                .map_err(|e| StoreError::io("cut a torn tail", &path, &e))?;
            if let Some(s) = out.segments.get_mut(id) {
                s.bytes = end as u64;
            }
        }
    }
    for p in live.pending.into_iter().flatten() {
        let loc = p.loc;
        if !queues.contains(&p.queue) {
            out.segments.dead(loc);
            continue;
        }
        out.segments.publish(loc);
        let mut message = p.message;
        let count = message.delivery_count().saturating_add(p.delivered);
        let redelivered = message.redelivered() || p.delivered > 0;
        message.set_delivery(count, redelivered);
        out.queues.entry(p.queue).or_default().push(Recovered {
            seq: p.seq,
            expires_at: p.expires_at,
            message,
            loc,
        });
    }
    for messages in out.queues.values_mut() {
        // Log order is publish order but for a transaction's messages
        // (positions reserved before their commit record was written).
        if !messages.is_sorted_by_key(|m| m.seq) {
            messages.sort_by_key(|m| m.seq);
        }
    }
    Ok(out)
}

/// The publishes recovery has read and not seen settled.
#[derive(Default)]
struct Live {
    pending: Vec<Option<Pending>>,
    at: FxHashMap<Loc, usize>,
}

impl Live {
    fn reserve(&mut self, more: usize) {
        self.pending.reserve(more);
        self.at.reserve(more);
    }
}

fn apply(record: Record, segment: u64, live: &mut Live, segments: &mut Segments) {
    match record {
        Record::Publish {
            queue,
            seq,
            ordinal,
            expires_at,
            message,
        } => {
            let loc = Loc { segment, ordinal };
            let pending = Pending {
                loc,
                queue,
                seq,
                expires_at,
                message,
                delivered: 0,
            };
            match live.at.get(&loc) {
                // The same location twice cannot be written; keep the last.
                Some(&i) => live.pending[i] = Some(pending),
                None => {
                    live.at.insert(loc, live.pending.len());
                    live.pending.push(Some(pending));
                }
            }
        }
        Record::Settle(locs) => {
            for loc in locs {
                if let Some(i) = live.at.remove(&loc) {
                    live.pending[i] = None;
                    segments.dead(loc);
                }
            }
        }
        Record::Deliver(locs) => {
            for loc in locs {
                if let Some(p) = live.at.get(&loc).and_then(|&i| live.pending[i].as_mut()) {
                    p.delivered = p.delivered.saturating_add(1);
                }
            }
        }
        Record::Atomic(records) => {
            for r in records {
                apply(r, segment, live, segments);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::disk::RealDisk;
    use crate::store::log::segment_path;

    /// Found by the `recovery` fuzz target (`fuzz/`), minimized to an empty
    /// file named as segment `u64::MAX`: the next segment's id overflowed (a
    /// panic in debug builds). Segment 0 or ids past 40 bits would recover
    /// messages at locations that do not pack (0 means "not stored").
    #[test]
    fn segment_ids_out_of_range_are_refused() {
        for id in [0, Loc::MAX_SEGMENT + 1, u64::MAX] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(segment_path(dir.path(), id), b"").unwrap();
            let got = recover(&RealDisk, dir.path(), &FxHashSet::default());
            assert!(
                matches!(&got, Err(StoreError::Corrupt { detail, .. }) if detail.contains("out of range")),
                "{id}: {got:?}"
            );
        }
    }
}
