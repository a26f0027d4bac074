//! [`ById`]: what a queue keeps per consumer, found by id. Most queues have
//! one consumer or two, so the entries are a short list until there are
//! [`MANY`] of them, and a hash map after: a hash map's smallest table
//! (four slots) would cost every queue a few hundred bytes for its one
//! consumer.

use rustc_hash::FxHashMap;

use crate::queue::ack::ConsumerId;

/// From this many entries on, a hash map holds them; below, a list that is
/// scanned.
pub(crate) const MANY: usize = 8;

/// Entries by consumer id: a scanned list of the few, a hash map of the
/// many. Iteration order is unspecified.
#[derive(Debug)]
pub(crate) struct ById<V> {
    /// The entries while there are fewer than [`MANY`] (empty after).
    few: Vec<(ConsumerId, V)>,
    /// The entries once there were [`MANY`] (empty before).
    many: FxHashMap<ConsumerId, V>,
}

impl<V> Default for ById<V> {
    fn default() -> Self {
        ById {
            few: Vec::new(),
            many: FxHashMap::default(),
        }
    }
}

impl<V> ById<V> {
    /// The entry of `id`.
    pub(crate) fn get(&self, id: &ConsumerId) -> Option<&V> {
        if self.many.is_empty() {
            self.few.iter().find(|(k, _)| k == id).map(|(_, v)| v)
        } else {
            self.many.get(id)
        }
    }

    /// The entry of `id`, to change.
    pub(crate) fn get_mut(&mut self, id: &ConsumerId) -> Option<&mut V> {
        if self.many.is_empty() {
            self.few.iter_mut().find(|(k, _)| k == id).map(|(_, v)| v)
        } else {
            self.many.get_mut(id)
        }
    }

    /// Whether `id` has an entry.
    pub(crate) fn contains_key(&self, id: &ConsumerId) -> bool {
        self.get(id).is_some()
    }

    /// Inserts or replaces the entry of `id`; returns the replaced value.
    pub(crate) fn insert(&mut self, id: ConsumerId, value: V) -> Option<V> {
        if !self.many.is_empty() {
            return self.many.insert(id, value);
        }
        if let Some(slot) = self.get_mut(&id) {
            return Some(std::mem::replace(slot, value));
        }
        if self.few.len() + 1 < MANY {
            // Room for one at first: most queues never have a second.
            if self.few.capacity() == 0 {
                self.few.reserve_exact(1);
            }
            self.few.push((id, value));
        } else {
            self.many = std::mem::take(&mut self.few).into_iter().collect();
            self.many.insert(id, value);
        }
        None
    }

    /// Removes the entry of `id`. The map goes back to a list below
    /// `MANY / 2`; in the list, the last entry takes the removed one's
    /// place (iteration order is unspecified anyway).
    pub(crate) fn remove(&mut self, id: &ConsumerId) -> Option<V> {
        if !self.many.is_empty() {
            let removed = self.many.remove(id);
            if self.many.len() < MANY / 2 {
                // Back to a list (not at MANY - 1: a count going up and
                // down across it would move the entries every time).
                self.few = std::mem::take(&mut self.many).into_iter().collect();
            }
            return removed;
        }
        let at = self.few.iter().position(|(k, _)| k == id)?;
        Some(self.few.swap_remove(at).1)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.few.len() + self.many.len()
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ConsumerId, &V)> {
        let few = self.few.iter().map(|(k, v)| (k, v));
        few.chain(self.many.iter())
    }

    /// Every id, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &ConsumerId> {
        self.iter().map(|(k, _)| k)
    }

    /// Every entry's value, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Takes every entry out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (ConsumerId, V)> + use<V> {
        let few = std::mem::take(&mut self.few);
        let many = std::mem::take(&mut self.many);
        few.into_iter().chain(many)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Against a BTreeMap, through growth past MANY and shrinking back:
    /// inserts (new, and replacing in both forms), removals (present and
    /// absent), lookups, changes in place, and a drain of a map.
    #[test]
    fn behaves_as_a_map_with_few_and_with_many() {
        let mut map = ById::default();
        let mut model = BTreeMap::new();
        fn check(map: &ById<u64>, model: &BTreeMap<ConsumerId, u64>) {
            assert_eq!(map.len(), model.len());
            let mut seen: Vec<(ConsumerId, u64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
            seen.sort();
            assert_eq!(
                seen,
                model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>()
            );
            for id in 0..40 {
                let id = ConsumerId(id);
                assert_eq!(map.get(&id), model.get(&id));
                assert_eq!(map.contains_key(&id), model.contains_key(&id));
            }
        }
        fn insert(map: &mut ById<u64>, model: &mut BTreeMap<ConsumerId, u64>, id: u64, value: u64) {
            let id = ConsumerId(id);
            assert_eq!(map.insert(id, value), model.insert(id, value));
            check(map, model);
        }
        // A few, each inserted twice: replaced in the list.
        for id in [5, 3, 9, 5, 3] {
            insert(&mut map, &mut model, id, id * 10 + 1);
        }
        assert!(map.many.is_empty());
        // Past MANY in no particular order (17 is invertible mod 29), then
        // replacements in the map.
        for step in 0..20 {
            insert(&mut map, &mut model, (step * 17) % 29, step);
        }
        for id in [0, 17, 5] {
            insert(&mut map, &mut model, id, 1000 + id);
        }
        assert!(!map.many.is_empty(), "past MANY, a hash map holds them");
        // Removals, present and absent, down to the list and back up.
        for step in 0..31 {
            if model.len() <= 2 {
                break;
            }
            let id = ConsumerId((step * 13) % 31);
            assert_eq!(map.remove(&id), model.remove(&id));
            if let Some(v) = map.get_mut(&ConsumerId(step % 29)) {
                *v += 1000;
                *model.get_mut(&ConsumerId(step % 29)).unwrap() += 1000;
            }
            check(&map, &model);
        }
        assert!(map.many.is_empty(), "below MANY / 2, a list holds them");
        assert_eq!(map.len(), 2);
        for id in 30..40 {
            insert(&mut map, &mut model, id, id);
        }
        assert!(!map.many.is_empty());
        let mut drained: Vec<(ConsumerId, u64)> = map.drain().collect();
        drained.sort();
        assert_eq!(
            drained,
            std::mem::take(&mut model).into_iter().collect::<Vec<_>>()
        );
        assert_eq!(map.len(), 0);
        check(&map, &model);
    }
}
