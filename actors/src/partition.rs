//! Partitions: which of N partitions a message belongs to, by a key taken
//! from it, with a hash that never changes between releases.
//!
//! The hash is Kafka's: [`murmur2`] (Kafka's `Utils.murmur2`, seed
//! `0x9747b28c`) and [`kafka_partition`] (its default partitioner's
//! `toPositive(murmur2(key)) % partitions`), so that a key lands in the
//! partition Kafka's producer would put it in. A partitioned queue
//! ([`Broker::declare_partitioned`](crate::Broker::declare_partitioned))
//! is N queues, each with a single active consumer: one key's messages stay
//! in one queue, in order, consumed by one consumer at a time.
//!
//! ```
//! use postbox_actors::partition::{kafka_partition, murmur2};
//! assert_eq!(murmur2(b"21"), -973932308); // Kafka's own test vector
//! assert_eq!(kafka_partition(b"user-42", 4), kafka_partition(b"user-42", 4));
//! assert!(kafka_partition(b"user-42", 4) < 4);
//! ```

use std::sync::Arc;

use crate::envelope::Envelope;

/// Kafka's 32-bit murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`).
#[must_use]
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes lengths as Java ints: keys past 2 GiB wrap, as there.
    let len = data.len() as u32;
    let mut h = SEED ^ len;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        h ^= u32::from(first);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives `key` among
/// `partitions` (at least 1): `(murmur2(key) & 0x7fffffff) % partitions`.
#[must_use]
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1)
}

/// A function that takes a partition key from a message.
pub type KeyOf = Arc<dyn Fn(&Envelope) -> Option<Vec<u8>> + Send + Sync>;

/// Where a message's partition key comes from.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum PartitionKey {
    /// Its routing key (the default).
    #[default]
    RoutingKey,
    /// A string header (its UTF-8 bytes).
    Header(String),
    /// A function of the message (`None`: it has no key).
    Fn(KeyOf),
}

impl std::fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionKey::RoutingKey => f.write_str("RoutingKey"),
            PartitionKey::Header(name) => f.debug_tuple("Header").field(name).finish(),
            PartitionKey::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

impl PartitionKey {
    /// A key computed from the message.
    pub fn from_fn(key: impl Fn(&Envelope) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
        PartitionKey::Fn(Arc::new(key))
    }

    /// A 64-bit hash of `message`'s key, without copying the key (for
    /// grouping by key in memory: two keys that share a hash are grouped
    /// together, which costs parallelism, never order).
    pub(crate) fn hash_of(&self, message: &Envelope) -> Option<u64> {
        use std::hash::BuildHasher;
        let hash = |bytes: &[u8]| rustc_hash::FxBuildHasher.hash_one(bytes);
        match self {
            PartitionKey::RoutingKey => {
                let key = message.routing_key();
                (!key.is_empty()).then(|| hash(key.as_bytes()))
            }
            PartitionKey::Header(name) => message
                .header(name)
                .and_then(|v| v.as_str())
                .map(|s| hash(s.as_bytes())),
            PartitionKey::Fn(key) => key(message).map(|k| hash(&k)),
        }
    }

    /// [`hash_of`](Self::hash_of) for a message delivered from `queue`. One
    /// published to the queue by name without a key of its own carries the
    /// queue's name as its routing key (as through RabbitMQ's default
    /// exchange): that is no key either.
    pub(crate) fn hash_of_delivered(&self, message: &Envelope, queue: &str) -> Option<u64> {
        if let PartitionKey::RoutingKey = self
            && message.exchange().is_empty()
            && message.routing_key() == queue
        {
            return None;
        }
        self.hash_of(message)
    }

    /// The key of `message`, if it has one (an empty routing key is none).
    pub fn of(&self, message: &Envelope) -> Option<Vec<u8>> {
        match self {
            PartitionKey::RoutingKey => {
                let key = message.routing_key();
                (!key.is_empty()).then(|| key.as_bytes().to_vec())
            }
            PartitionKey::Header(name) => message
                .header(name)
                .and_then(|v| v.as_str())
                .map(|s| s.as_bytes().to_vec()),
            PartitionKey::Fn(key) => key(message),
        }
    }
}

/// The header that carries a message's sequence number within its key
/// (see [`Sequencer`]).
pub const SEQUENCE_HEADER: &str = "x-key-seq";

/// Numbers the messages of each key, 1, 2, 3..., in a header
/// ([`SEQUENCE_HEADER`]), so that a consumer can tell a gap or a reorder in
/// one key's flow ([`SequenceCheck`]). Shared by clones: every publisher of
/// one key should use the same sequencer (a partitioned queue's, with
/// [`PartitionOptions::sequence`](crate::PartitionOptions::sequence)). It
/// remembers every key it numbered: memory grows with the keys.
///
/// ```
/// use postbox_actors::Envelope;
/// use postbox_actors::partition::{SequenceCheck, Sequencer, Sequenced};
/// let seq = Sequencer::default();
/// let a = seq.stamp(b"user-1", Envelope::new("created"));
/// let b = seq.stamp(b"user-1", Envelope::new("paid"));
/// let mut check = SequenceCheck::default();
/// assert_eq!(check.observe(b"user-1", &a), Sequenced::InOrder(1));
/// assert_eq!(check.observe(b"user-1", &b), Sequenced::InOrder(2));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Sequencer {
    next: Arc<parking_lot::Mutex<rustc_hash::FxHashMap<Vec<u8>, u64>>>,
}

impl Sequencer {
    /// The next number of `key` (from 1).
    pub fn next(&self, key: &[u8]) -> u64 {
        let mut next = self.next.lock();
        let n = next.entry(key.to_vec()).or_insert(0);
        *n += 1;
        *n
    }

    /// `message` with the next number of `key` in [`SEQUENCE_HEADER`].
    pub fn stamp(&self, key: &[u8], message: Envelope) -> Envelope {
        let n = self.next(key);
        message.with_header(SEQUENCE_HEADER, i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// What [`SequenceCheck::observe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sequenced {
    /// The number that was due.
    InOrder(u64),
    /// Later than due: the ones between are missing (or will come late).
    Gap {
        /// The number due.
        expected: u64,
        /// The number seen.
        got: u64,
    },
    /// Earlier than due: seen before (a redelivery), or overtaken.
    Behind {
        /// The number due.
        expected: u64,
        /// The number seen.
        got: u64,
    },
    /// The message has no sequence number.
    Unnumbered,
}

/// A consumer's view of each key's sequence: which number is due next.
#[derive(Clone, Debug, Default)]
pub struct SequenceCheck {
    due: rustc_hash::FxHashMap<Vec<u8>, u64>,
}

impl SequenceCheck {
    /// Checks `message`'s number against `key`'s due one, and moves the due
    /// one past it if it was not behind.
    pub fn observe(&mut self, key: &[u8], message: &Envelope) -> Sequenced {
        let Some(got) = message
            .header(SEQUENCE_HEADER)
            .and_then(|v| v.as_int())
            .and_then(|n| u64::try_from(n).ok())
        else {
            return Sequenced::Unnumbered;
        };
        let due = self.due.entry(key.to_vec()).or_insert(1);
        let expected = *due;
        match got.cmp(&expected) {
            std::cmp::Ordering::Equal => {
                *due = got + 1;
                Sequenced::InOrder(got)
            }
            std::cmp::Ordering::Greater => {
                *due = got + 1;
                Sequenced::Gap { expected, got }
            }
            std::cmp::Ordering::Less => Sequenced::Behind { expected, got },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_test_vectors() {
        // Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, hash) in cases {
            assert_eq!(murmur2(data), hash, "{}", String::from_utf8_lossy(data));
        }
        // Every tail length (Akka's vectors, computed with Kafka's code).
        let more: [(&str, i32); 5] = [
            ("1", -1_993_445_489),
            ("12", 126_087_238),
            ("123", -267_702_483),
            ("1234", -1_614_185_708),
            ("12345", -1_188_365_604),
        ];
        for (data, hash) in more {
            assert_eq!(murmur2(data.as_bytes()), hash, "{data}");
        }
    }

    #[test]
    fn sequences_tell_gaps_and_reorders() {
        let seq = Sequencer::default();
        let m: Vec<Envelope> = (0..4)
            .map(|_| seq.stamp(b"k", Envelope::new("x")))
            .collect();
        let other = seq.stamp(b"other", Envelope::new("y"));
        let mut check = SequenceCheck::default();
        assert_eq!(check.observe(b"k", &m[0]), Sequenced::InOrder(1));
        assert_eq!(
            check.observe(b"k", &m[2]),
            Sequenced::Gap {
                expected: 2,
                got: 3
            }
        );
        assert_eq!(
            check.observe(b"k", &m[1]),
            Sequenced::Behind {
                expected: 4,
                got: 2
            }
        );
        assert_eq!(check.observe(b"k", &m[3]), Sequenced::InOrder(4));
        assert_eq!(check.observe(b"other", &other), Sequenced::InOrder(1));
        assert_eq!(
            check.observe(b"k", &Envelope::new("z")),
            Sequenced::Unnumbered
        );
    }

    #[test]
    fn partitions_are_kafkas() {
        // toPositive(murmur2) % n, computed by hand from the vectors above.
        assert_eq!(
            kafka_partition(b"21", 4),
            ((-973_932_308i32 as u32) & 0x7fff_ffff) % 4
        );
        assert_eq!(kafka_partition(b"abc", 7), 479_470_107 % 7);
        assert_eq!(
            kafka_partition(b"anything", 0),
            0,
            "0 partitions treated as 1"
        );
    }
}
