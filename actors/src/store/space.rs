//! Which messages each segment still holds, and so which segments can go.
//!
//! Every publish record has a live bit in its segment, cleared when its
//! message is settled. A settle record only matters while the publish it
//! settles is still on disk, so:
//!
//! - a segment is **clean** when it holds no dead publish record: every
//!   publish in it is live;
//! - a segment with no live publish can be **deleted** once every older
//!   segment is clean (its settle records then point at nothing on disk:
//!   their publishes went with their segments or with a compaction);
//! - the oldest segment that is not clean is **compacted** when enough of it
//!   is dead, or when it holds up the deletion of newer segments: rewritten
//!   in place with its live publishes and the delivery records of live
//!   messages only. Ordinals are kept, so no message moves.
//!
//! Segments are handled oldest first, so disk use follows the backlog: a
//! slow message pins its own segment's live records, not the history.

use std::collections::BTreeMap;

use crate::store::record::Loc;

/// One segment's accounting.
#[derive(Clone, Debug, Default)]
pub(crate) struct SegmentInfo {
    /// Publish records written (the next ordinal).
    pub(crate) publishes: u32,
    live: Vec<u64>,
    pub(crate) live_count: u32,
    /// Dead publish records still in the file.
    pub(crate) dead_present: u32,
    /// The file's length, pending bytes included.
    pub(crate) bytes: u64,
}

impl SegmentInfo {
    fn set(&mut self, ordinal: u32) {
        let (word, bit) = ((ordinal / 64) as usize, ordinal % 64);
        if self.live.len() <= word {
            self.live.resize(word + 1, 0);
        }
        if self.live[word] & (1 << bit) == 0 {
            self.live[word] |= 1 << bit;
            self.live_count += 1;
        }
        self.publishes = self.publishes.max(ordinal.saturating_add(1));
    }

    fn clear(&mut self, ordinal: u32) -> bool {
        let (word, bit) = ((ordinal / 64) as usize, ordinal % 64);
        match self.live.get_mut(word) {
            Some(w) if *w & (1 << bit) != 0 => {
                *w &= !(1 << bit);
                self.live_count -= 1;
                self.dead_present += 1;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn is_live(&self, ordinal: u32) -> bool {
        let (word, bit) = ((ordinal / 64) as usize, ordinal % 64);
        self.live.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    pub(crate) fn is_clean(&self) -> bool {
        self.dead_present == 0
    }
}

/// The accounting of every segment, by id.
#[derive(Clone, Debug, Default)]
pub(crate) struct Segments {
    map: BTreeMap<u64, SegmentInfo>,
}

impl Segments {
    pub(crate) fn add(&mut self, id: u64, bytes: u64) {
        self.map.entry(id).or_default().bytes = bytes;
    }

    pub(crate) fn get(&self, id: u64) -> Option<&SegmentInfo> {
        self.map.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut SegmentInfo> {
        self.map.get_mut(&id)
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.map.remove(&id);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &SegmentInfo)> {
        self.map.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.map.values().map(|s| s.bytes).sum()
    }

    /// A live publish at `loc`.
    pub(crate) fn publish(&mut self, loc: Loc) {
        self.map.entry(loc.segment).or_default().set(loc.ordinal);
    }

    /// A publish known to be on disk but dead (recovery: settled, or of a
    /// queue that is gone).
    pub(crate) fn dead(&mut self, loc: Loc) {
        let s = self.map.entry(loc.segment).or_default();
        s.publishes = s.publishes.max(loc.ordinal.saturating_add(1));
        s.dead_present += 1;
    }

    /// The message at `loc` left its queue; false if it was not live.
    pub(crate) fn settle(&mut self, loc: Loc) -> bool {
        self.map
            .get_mut(&loc.segment)
            .is_some_and(|s| s.clear(loc.ordinal))
    }

    pub(crate) fn is_live(&self, loc: Loc) -> bool {
        self.map
            .get(&loc.segment)
            .is_some_and(|s| s.is_live(loc.ordinal))
    }

    /// Segments to delete now (see the module docs); never `active`.
    pub(crate) fn deletable(&self, active: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut older_clean = true;
        for (&id, s) in &self.map {
            if id >= active {
                break;
            }
            if s.live_count == 0 && older_clean {
                out.push(id);
                continue;
            }
            if !s.is_clean() {
                older_clean = false;
            }
        }
        out
    }

    /// The segment to compact next, if one is worth it: the oldest that is
    /// not clean, when a quarter of its publishes are dead or when a newer
    /// segment without live messages waits for it. Never `active`.
    pub(crate) fn to_compact(&self, active: u64) -> Option<u64> {
        let (&oldest, s) = self
            .map
            .iter()
            .take_while(|(id, _)| **id < active)
            .find(|(_, s)| !s.is_clean())?;
        let present = s.live_count + s.dead_present;
        let mostly_dead = s.dead_present.saturating_mul(4) >= present;
        let blocking = self
            .map
            .range(oldest + 1..active)
            .any(|(_, s)| s.live_count == 0);
        (mostly_dead || blocking).then_some(oldest)
    }

    /// After `id` was compacted: its dead publishes are gone, except those
    /// of `kept` (ordinals rewritten) that died meanwhile.
    pub(crate) fn compacted(&mut self, id: u64, kept: &[u32], bytes: u64) {
        if let Some(s) = self.map.get_mut(&id) {
            s.dead_present = kept.iter().filter(|&&o| !s.is_live(o)).count() as u32;
            s.bytes = bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, ordinal: u32) -> Loc {
        Loc { segment, ordinal }
    }

    #[test]
    fn segments_go_oldest_first_once_older_ones_are_clean() {
        let mut s = Segments::default();
        for seg in 1..=4 {
            s.add(seg, 100);
            for o in 0..4 {
                s.publish(loc(seg, o));
            }
        }
        // Segment 2 dies entirely, but segment 1 holds a dead record: 2 must
        // wait (a settle in 2 may point into 1).
        for o in 0..4 {
            assert!(s.settle(loc(2, o)));
        }
        assert!(!s.settle(loc(2, 0)), "settled twice");
        assert!(s.settle(loc(1, 0)));
        assert_eq!(s.deletable(4), Vec::<u64>::new());
        // 1 is the oldest unclean one, and it blocks 2: compact it.
        assert_eq!(s.to_compact(4), Some(1));
        s.compacted(1, &[1, 2, 3], 80);
        assert!(s.get(1).is_some_and(SegmentInfo::is_clean));
        assert_eq!(s.deletable(4), vec![2]);
        s.remove(2);
        // The active segment is never deleted or compacted.
        for o in 0..4 {
            s.settle(loc(4, o));
        }
        assert_eq!(s.deletable(4), Vec::<u64>::new());
        assert_eq!(s.to_compact(4), None);
        // Everything settled: all but the active one go.
        for seg in [1, 3] {
            for o in 0..4 {
                s.settle(loc(seg, o));
            }
        }
        assert_eq!(s.deletable(4), vec![1, 3]);
    }

    #[test]
    fn a_few_dead_records_are_left_until_they_matter() {
        let mut s = Segments::default();
        for seg in 1..=3 {
            s.add(seg, 100);
            for o in 0..8 {
                s.publish(loc(seg, o));
            }
        }
        s.settle(loc(1, 0));
        assert_eq!(s.to_compact(3), None, "1 dead of 8, nothing blocked");
        s.settle(loc(1, 1));
        assert_eq!(s.to_compact(3), Some(1), "a quarter dead");
    }
}
