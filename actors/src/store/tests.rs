//! Recovery against a model: random publishes, settlements and deliveries
//! are written through the real log (writer thread and all), then the log is
//! cut at a random byte (a crash at a record boundary or in the middle of a
//! record) or has a random byte flipped, and what recovery returns is
//! compared with the model applied to the records that survived.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use rustc_hash::FxHashSet;

use super::disk::RealDisk;
use super::frame::{HEADER_LEN, Scan, Scanned};
use super::{DataDir, QueueId, StorageOptions, SyncPolicy};
use crate::envelope::Envelope;
use crate::store::record::Loc;

#[derive(Clone, Debug)]
enum Op {
    Publish(QueueId),
    /// Settles the message of that publish (by index, modulo), live or not.
    Settle(usize),
    /// Records one more delivery of it.
    Deliver(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (1u64..3).prop_map(Op::Publish),
        2 => any::<usize>().prop_map(Op::Settle),
        1 => any::<usize>().prop_map(Op::Deliver),
    ];
    // The first op publishes, so that settlements have something to pick.
    (1u64..3, proptest::collection::vec(op, 0..60)).prop_map(|(q, mut ops)| {
        ops.insert(0, Op::Publish(q));
        ops
    })
}

const QUEUES: [QueueId; 2] = [1, 2];

/// Each queue's live messages as `(seq, deliveries)`, in order.
type State = BTreeMap<QueueId, Vec<(u64, u32)>>;

/// What the ops that `keep` says survived leave behind.
fn model(ops: &[Op], keep: impl Fn(usize) -> bool) -> State {
    // Publish index -> (queue, seq, deliveries, live).
    let mut published: Vec<(QueueId, u64, u32, bool)> = Vec::new();
    let mut seqs: BTreeMap<QueueId, u64> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Publish(q) => {
                let seq = seqs.entry(*q).or_default();
                *seq += 1;
                // A publish that did not survive leaves a hole: later
                // records naming it find nothing.
                published.push((*q, *seq, 0, keep(i)));
            }
            Op::Settle(p) if keep(i) => {
                let n = published.len();
                published[p % n].3 = false;
            }
            Op::Deliver(p) if keep(i) => {
                let n = published.len();
                published[p % n].2 += 1;
            }
            _ => {}
        }
    }
    let mut state = State::new();
    for (q, seq, deliveries, live) in published {
        if live {
            state.entry(q).or_default().push((seq, deliveries));
        }
    }
    state
}

/// Writes `ops` through a store in `dir`; returns the segment's bytes.
fn write(dir: &Path, ops: &[Op]) -> Vec<u8> {
    let options = StorageOptions::new(dir).sync(SyncPolicy::Never);
    let (data, _) = DataDir::open(options).unwrap();
    let queues: FxHashSet<QueueId> = QUEUES.into_iter().collect();
    let (store, _) = data.start_log(&queues).unwrap();
    let mut locs: Vec<Loc> = Vec::new();
    let mut seqs: BTreeMap<QueueId, u64> = BTreeMap::new();
    for op in ops {
        let mut append = store.append().unwrap();
        match op {
            Op::Publish(q) => {
                let seq = seqs.entry(*q).or_default();
                *seq += 1;
                let message = Envelope::new(format!("{q}/{seq}"));
                locs.push(append.publish(*q, *seq, u64::MAX, &message));
            }
            Op::Settle(p) => append.settle(&[locs[p % locs.len()]]),
            Op::Deliver(p) => append.deliver(&[locs[p % locs.len()]]),
        }
        append.finish(None);
    }
    store.close();
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "one segment: {segments:?}");
    std::fs::read(segments.remove(0)).unwrap()
}

/// Where each record's frame ends.
fn frame_ends(data: &[u8]) -> Vec<usize> {
    Scan::new(Bytes::copy_from_slice(data), HEADER_LEN)
        .map(|item| match item {
            Scanned::Frame { offset, payload } => offset + 8 + payload.len(),
            Scanned::Damaged { .. } => panic!("the log as written is intact"),
        })
        .collect()
}

/// Recovers `segment` (put back in `dir`) and returns what each queue holds.
fn recover(dir: &Path, segment: &[u8]) -> (State, u64, u64) {
    let log = dir.join("log");
    let path = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    std::fs::write(&path, segment).unwrap();
    let queues: FxHashSet<QueueId> = QUEUES.into_iter().collect();
    let recovery = super::recover::recover(&RealDisk, &log, &queues).unwrap();
    let mut state = State::new();
    for (q, messages) in recovery.queues {
        let mut got: Vec<(u64, u32)> = messages
            .iter()
            .map(|m| (m.seq, m.message.delivery_count()))
            .collect();
        got.sort_unstable();
        // Each message is the one published at that seq.
        for m in &messages {
            assert_eq!(m.message.payload(), format!("{q}/{}", m.seq).as_bytes());
        }
        state.insert(q, got);
    }
    (state, recovery.damaged, recovery.truncated)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A crash at any byte: every record before it applies, none after.
    #[test]
    fn recovery_after_a_crash_at_any_byte_matches_the_model(ops in ops(), at in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let full = write(dir.path(), &ops);
        let ends = frame_ends(&full);
        prop_assert_eq!(ends.len(), ops.len());
        let cut = HEADER_LEN + at.index(full.len() - HEADER_LEN + 1);
        let survived = ends.iter().filter(|&&end| end <= cut).count();
        let (state, damaged, truncated) = recover(dir.path(), &full[..cut]);
        prop_assert_eq!(state, model(&ops, |i| i < survived));
        prop_assert_eq!(damaged, 0);
        prop_assert_eq!(truncated as usize, cut - ends.get(survived.wrapping_sub(1)).copied().unwrap_or(HEADER_LEN));
    }

    /// A flipped byte in a record: that record is skipped (reported), the
    /// rest apply.
    #[test]
    fn recovery_skips_a_damaged_record_and_keeps_the_rest(
        ops in ops(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut data = write(dir.path(), &ops);
        let ends = frame_ends(&data);
        let pos = HEADER_LEN + at.index(data.len() - HEADER_LEN);
        data[pos] ^= flip;
        let hit = ends.iter().position(|&end| pos < end).unwrap();
        let (state, damaged, truncated) = recover(dir.path(), &data);
        prop_assert_eq!(state, model(&ops, |i| i != hit));
        // In the middle: skipped and counted; at the end: a torn tail.
        if hit + 1 < ends.len() {
            prop_assert_eq!((damaged, truncated), (1, 0));
        } else {
            prop_assert_eq!(damaged, 0);
            prop_assert!(truncated > 0);
        }
    }
}

/// Truncation at every offset of a small log never panics and always
/// recovers a prefix of what was written.
#[test]
fn truncation_at_every_offset_recovers_a_prefix() {
    let ops = [
        Op::Publish(1),
        Op::Publish(2),
        Op::Deliver(0),
        Op::Publish(1),
        Op::Settle(1),
        Op::Publish(2),
        Op::Deliver(3),
        Op::Settle(0),
    ];
    let dir = tempfile::tempdir().unwrap();
    let full = write(dir.path(), &ops);
    let ends = frame_ends(&full);
    for cut in HEADER_LEN..=full.len() {
        let survived = ends.iter().filter(|&&end| end <= cut).count();
        let (state, damaged, _) = recover(dir.path(), &full[..cut]);
        assert_eq!(state, model(&ops, |i| i < survived), "cut at {cut}");
        assert_eq!(damaged, 0);
    }
}
