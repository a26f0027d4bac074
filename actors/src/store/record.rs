//! The records of the message log, and their binary form (the payload of one
//! frame each; see the `store` module documentation for the layout).

use bytes::Bytes;

use crate::envelope::{Envelope, WireError, WireReader, WireWriter};

/// Where a persisted message is: its segment and its ordinal among the
/// segment's publish records. Stable for the message's life: compaction
/// rewrites a segment in place and keeps ordinals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Loc {
    pub(crate) segment: u64,
    pub(crate) ordinal: u32,
}

impl Loc {
    /// Ordinals stay below this (a segment with this many publishes is full),
    /// so that a location packs into a `u64`.
    pub(crate) const MAX_ORDINAL: u32 = (1 << 24) - 1;
    /// Segments are numbered from 1 up to this, so that a location packs
    /// into a non-zero `u64` (recovery refuses other segment ids).
    pub(crate) const MAX_SEGMENT: u64 = (1 << 40) - 1;

    /// The location as one non-zero `u64` (segments are numbered from 1).
    pub(crate) fn pack(self) -> u64 {
        (self.segment << 24) | u64::from(self.ordinal)
    }

    /// The location packed by [`pack`](Self::pack).
    pub(crate) fn unpack(packed: u64) -> Loc {
        Loc {
            segment: packed >> 24,
            ordinal: (packed & u64::from(Self::MAX_ORDINAL)) as u32,
        }
    }
}

/// A queue's id in the store: unique per declaration, never reused (a queue
/// deleted and declared again gets a new one, so its old records are dead).
pub(crate) type QueueId = u64;

const PUBLISH: u8 = 1;
const SETTLE: u8 = 2;
const DELIVER: u8 = 3;
const ATOMIC: u8 = 4;

/// One record of the message log.
#[derive(Clone, Debug)]
pub(crate) enum Record {
    /// A persistent message entered durable queue `queue` at `seq`.
    Publish {
        queue: QueueId,
        seq: u64,
        /// Its ordinal in this record's segment (see [`Loc`]).
        ordinal: u32,
        /// Epoch ms, or `u64::MAX` for never.
        expires_at: u64,
        message: Envelope,
    },
    /// These messages left their queues (acknowledged, discarded, expired,
    /// dead-lettered, purged).
    Settle(Vec<Loc>),
    /// These messages were delivered once more each (their delivery counts).
    Deliver(Vec<Loc>),
    /// Records that apply together or not at all (a transaction's commit).
    Atomic(Vec<Record>),
}

impl Record {
    /// Appends the record's binary form.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut w = WireWriter::new(out);
        encode_into(self, &mut w);
    }

    /// Reads a record from a frame's payload. The messages it holds own
    /// their bytes: they do not keep the payload (a whole segment read into
    /// memory) alive.
    pub(crate) fn decode(payload: &Bytes) -> Result<Record, WireError> {
        let mut r = WireReader::detached(payload);
        let record = decode_from(&mut r, 0)?;
        if r.remaining() != 0 {
            return Err(WireError::Invalid("trailing bytes"));
        }
        Ok(record)
    }
}

/// Appends a publish record's fields (the writer encodes publishes in place).
pub(crate) fn encode_publish(
    w: &mut WireWriter<'_>,
    queue: QueueId,
    seq: u64,
    ordinal: u32,
    expires_at: u64,
    message: &Envelope,
) {
    w.u8(PUBLISH);
    w.varint(queue);
    w.varint(seq);
    w.varint(u64::from(ordinal));
    // +1, so that "never" (u64::MAX) wraps to a one-byte 0.
    w.varint(expires_at.wrapping_add(1));
    message.write_wire(w);
}

/// Appends an atomic record of publishes (at `locs`, all in the record's
/// segment) and settlements, as [`Record::Atomic`] encodes it.
pub(crate) fn encode_atomic(
    w: &mut WireWriter<'_>,
    publishes: &[(QueueId, u64, u64, &Envelope)],
    locs: &[Loc],
    settled: &[Loc],
) {
    w.u8(ATOMIC);
    let parts = publishes.len() + usize::from(!settled.is_empty());
    w.varint(parts as u64);
    let mut inner = Vec::new();
    for (&(queue, seq, expires_at, message), loc) in publishes.iter().zip(locs) {
        inner.clear();
        encode_publish(
            &mut WireWriter::new(&mut inner),
            queue,
            seq,
            loc.ordinal,
            expires_at,
            message,
        );
        w.bytes(&inner);
    }
    if !settled.is_empty() {
        inner.clear();
        encode_locs(&mut WireWriter::new(&mut inner), false, settled);
        w.bytes(&inner);
    }
}

/// Appends a settle or deliver record for `locs`.
pub(crate) fn encode_locs(w: &mut WireWriter<'_>, deliver: bool, locs: &[Loc]) {
    w.u8(if deliver { DELIVER } else { SETTLE });
    w.varint(locs.len() as u64);
    for loc in locs {
        w.varint(loc.segment);
        w.varint(u64::from(loc.ordinal));
    }
}

fn encode_into(record: &Record, w: &mut WireWriter<'_>) {
    match record {
        Record::Publish {
            queue,
            seq,
            ordinal,
            expires_at,
            message,
        } => encode_publish(w, *queue, *seq, *ordinal, *expires_at, message),
        Record::Settle(locs) => encode_locs(w, false, locs),
        Record::Deliver(locs) => encode_locs(w, true, locs),
        Record::Atomic(records) => {
            w.u8(ATOMIC);
            w.varint(records.len() as u64);
            for r in records {
                let mut inner = Vec::new();
                encode_into(r, &mut WireWriter::new(&mut inner));
                w.bytes(&inner);
            }
        }
    }
}

fn decode_from(r: &mut WireReader<'_>, depth: u8) -> Result<Record, WireError> {
    Ok(match r.u8()? {
        PUBLISH => {
            let queue = r.varint()?;
            let seq = r.varint()?;
            let ordinal = r.varint_u32()?;
            // The writer never goes past it, and past it the location does
            // not pack (it would name another message).
            if ordinal > Loc::MAX_ORDINAL {
                return Err(WireError::Invalid("ordinal"));
            }
            let expires_at = r.varint()?.wrapping_sub(1);
            let message = Envelope::read_wire(r)?;
            Record::Publish {
                queue,
                seq,
                ordinal,
                expires_at,
                message,
            }
        }
        tag @ (SETTLE | DELIVER) => {
            let n = r.count(2)?;
            let mut locs = Vec::with_capacity(n);
            for _ in 0..n {
                let segment = r.varint()?;
                let ordinal = r.varint_u32()?;
                locs.push(Loc { segment, ordinal });
            }
            if tag == SETTLE {
                Record::Settle(locs)
            } else {
                Record::Deliver(locs)
            }
        }
        ATOMIC if depth == 0 => {
            let n = r.count(2)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let inner = r.bytes()?;
                let mut ir = WireReader::detached(&inner);
                let record = decode_from(&mut ir, depth + 1)?;
                if ir.remaining() != 0 {
                    return Err(WireError::Invalid("trailing bytes"));
                }
                records.push(record);
            }
            Record::Atomic(records)
        }
        _ => return Err(WireError::Invalid("record type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc(segment: u64, ordinal: u32) -> Loc {
        Loc { segment, ordinal }
    }

    fn round_trip(record: &Record) -> Record {
        let mut buf = Vec::new();
        record.encode(&mut buf);
        Record::decode(&Bytes::from(buf)).expect("decodes")
    }

    #[test]
    fn records_round_trip() {
        let message = Envelope::new("m")
            .with_persistent(true)
            .with_routing_key("k");
        let publish = Record::Publish {
            queue: 7,
            seq: 1 << 40,
            ordinal: 3,
            expires_at: u64::MAX,
            message: message.clone(),
        };
        match round_trip(&publish) {
            Record::Publish {
                queue,
                seq,
                ordinal,
                expires_at,
                message: m,
            } => {
                assert_eq!((queue, seq, ordinal, expires_at), (7, 1 << 40, 3, u64::MAX));
                assert_eq!(m.id(), message.id());
                assert_eq!(m.routing_key(), "k");
            }
            other => panic!("{other:?}"),
        }
        let locs = vec![loc(1, 0), loc(u64::MAX >> 1, u32::MAX)];
        assert!(
            matches!(round_trip(&Record::Settle(locs.clone())), Record::Settle(l) if l == locs)
        );
        assert!(
            matches!(round_trip(&Record::Deliver(locs.clone())), Record::Deliver(l) if l == locs)
        );
        let atomic = Record::Atomic(vec![publish, Record::Settle(locs)]);
        assert!(matches!(round_trip(&atomic), Record::Atomic(r) if r.len() == 2));
    }

    #[test]
    fn a_commit_record_decodes_as_its_publishes_and_settlements() {
        let (a, b) = (Envelope::new("a"), Envelope::new("b"));
        let publishes = [(3, 10, u64::MAX, &a), (4, 20, 99, &b)];
        let locs = [loc(7, 5), loc(7, 6)];
        let settled = [loc(2, 1), loc(6, 9)];
        let mut buf = Vec::new();
        encode_atomic(&mut WireWriter::new(&mut buf), &publishes, &locs, &settled);
        let Record::Atomic(parts) = Record::decode(&Bytes::from(buf)).unwrap() else {
            panic!("an atomic record");
        };
        assert_eq!(parts.len(), 3);
        assert!(
            matches!(&parts[0], Record::Publish { queue: 3, seq: 10, ordinal: 5, expires_at: u64::MAX, message } if message.payload() == &b"a"[..])
        );
        assert!(matches!(
            &parts[1],
            Record::Publish {
                queue: 4,
                seq: 20,
                ordinal: 6,
                expires_at: 99,
                ..
            }
        ));
        assert!(matches!(&parts[2], Record::Settle(l) if l[..] == settled));
    }

    #[test]
    fn nested_atomic_records_and_unknown_types_are_refused() {
        let inner = Record::Atomic(vec![Record::Settle(vec![])]);
        let mut buf = Vec::new();
        Record::Atomic(vec![inner]).encode(&mut buf);
        assert!(Record::decode(&Bytes::from(buf)).is_err());
        assert!(Record::decode(&Bytes::from_static(&[9])).is_err());
        assert!(Record::decode(&Bytes::from_static(&[])).is_err());
    }

    /// Found by the `recovery` fuzz target (`fuzz/`), minimized: a publish
    /// (valid envelope, valid frame) at ordinal 107473058, past
    /// `MAX_ORDINAL`, was recovered at a location that packs as another
    /// message's (segment + 6, ordinal 0x67e8a2): settling it would have
    /// settled that one.
    #[test]
    fn publishes_past_the_last_ordinal_are_refused() {
        const FUZZED: [u8; 78] = [
            0x01, 0x01, 0x2a, 0xa2, 0xd1, 0x9f, 0x33, 0xb6, 0xea, 0x34, 0x01, 0xa2, 0x29, 0xf1,
            0x06, 0xb5, 0x74, 0xda, 0xb1, 0xad, 0x74, 0xa8, 0x9d, 0xc3, 0xa9, 0x7a, 0x12, 0x03,
            0x00, 0xb5, 0x8d, 0xc4, 0xcf, 0xa2, 0x34, 0x1e, 0x10, 0x61, 0x70, 0x70, 0x6c, 0x69,
            0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x2f, 0x6a, 0x73, 0x6f, 0x6e, 0x04, 0x63, 0x2d,
            0x34, 0x32, 0x07, 0x72, 0x65, 0x70, 0x6c, 0x69, 0x65, 0x73, 0x90, 0x1c, 0x00, 0x08,
            0x6f, 0x72, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00,
        ];
        assert_eq!(
            Record::decode(&Bytes::from_static(&FUZZED)).unwrap_err(),
            WireError::Invalid("ordinal")
        );
        let publish = |ordinal| Record::Publish {
            queue: 1,
            seq: 1,
            ordinal,
            expires_at: u64::MAX,
            message: Envelope::new("m"),
        };
        assert!(matches!(
            round_trip(&publish(Loc::MAX_ORDINAL)),
            Record::Publish {
                ordinal: Loc::MAX_ORDINAL,
                ..
            }
        ));
        let mut buf = Vec::new();
        publish(Loc::MAX_ORDINAL + 1).encode(&mut buf);
        assert!(Record::decode(&Bytes::from(buf)).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&Bytes::from(data));
        }
    }
}
