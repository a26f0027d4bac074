//! Giving memory back: a queue that held millions of messages and drained (or
//! was purged) should not keep the buffers it needed then.
//!
//! `VecDeque` and `Vec` never shrink on their own. [`release`] shrinks a
//! large deque once seven eighths of its capacity stand empty, to four times
//! what it holds: each shrink costs a copy of what is left, and most of the
//! old capacity had to be removed since the last one, so the cost is
//! amortized constant per removal. Deques below [`KEEP`] entries are left
//! alone, and the wide gap between shrinking (an eighth full) and growing
//! again (full) keeps a queue whose backlog swings under load from
//! reallocating back and forth. A queue's backlog is released later still,
//! once it has stayed small for a moment (see `QueueActor`): a backlog that
//! drains and refills at once (bursts) keeps its buffer and its pages.

use std::collections::VecDeque;

/// Capacity up to which nothing is given back: buffers this small (well
/// under a megabyte of queue entries) are cheap to keep, and a queue bouncing
/// around a few thousand messages should not reallocate.
const KEEP: usize = 16 * 1024;

/// Shrinks `deque` if most of its capacity is unused (see the module docs).
#[inline]
pub(crate) fn release<T>(deque: &mut VecDeque<T>) {
    if is_spare(deque) {
        shrink(deque);
    }
}

/// Whether [`release`] would shrink `deque`: for owners that release later
/// (a queue's backlog, which may be about to swing back up).
#[inline]
pub(crate) fn is_spare<T>(deque: &VecDeque<T>) -> bool {
    let capacity = deque.capacity();
    capacity > KEEP && deque.len() < capacity / 8
}

#[cold]
fn shrink<T>(deque: &mut VecDeque<T>) {
    let target = (deque.len() * 4).max(KEEP);
    deque.shrink_to(target);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_deque_gives_its_memory_back_and_a_steady_one_keeps_it() {
        let mut d: VecDeque<u64> = (0..1_000_000).collect();
        let big = d.capacity();
        while d.len() > 10 {
            d.pop_front();
            release(&mut d);
        }
        assert!(d.capacity() <= KEEP, "{} of {big}", d.capacity());
        // Steady at 100,000: pushing and popping never shrinks below what it holds.
        let mut d: VecDeque<u64> = (0..100_000).collect();
        d.push_back(0);
        d.pop_front();
        let cap = d.capacity();
        for i in 0..100_000 {
            d.push_back(i);
            d.pop_front();
            release(&mut d);
        }
        assert_eq!(d.capacity(), cap);
        d.clear();
        release(&mut d);
        assert!(d.capacity() <= KEEP);
    }
}
