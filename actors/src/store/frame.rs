//! Files and frames: the header every store file starts with, and the framing
//! of each record (length, checksum, payload), with a scanner that reads
//! frames back from untrusted bytes: it stops at a torn tail, and steps over
//! a damaged frame in the middle to the next valid one.

use bytes::Bytes;

use crate::store::StoreError;

/// The first bytes of every store file.
pub(crate) const MAGIC: [u8; 8] = *b"pbxstor\n";
/// The format version this code writes and reads.
pub(crate) const VERSION: u16 = 1;
/// Magic, version (u16), kind (u16), file id (u64), reserved (u32); little-endian.
pub(crate) const HEADER_LEN: usize = 24;
/// Length (u32) and checksum (u32) before each payload.
pub(crate) const FRAME_LEN: usize = 8;
/// Frames claiming more are damaged: no record is this large (messages are
/// limited to far less by the broker).
pub(crate) const MAX_PAYLOAD: usize = 1 << 30;

/// What a store file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A segment of the message log.
    Segment = 1,
    /// The topology log.
    Topology = 2,
    /// A segment of a durable stream's log (see `stream_log`).
    StreamSegment = 3,
    /// A durable stream's named subscribers' offsets (see `stream_log`).
    StreamOffsets = 4,
    /// A key log: a durable queue's duplicate window, an idempotency
    /// store's done keys (see `keylog`).
    Keys = 5,
}

/// The header of a file of `kind` numbered `id`.
pub(crate) fn header(kind: FileKind, id: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(kind as u16).to_le_bytes());
    h[12..20].copy_from_slice(&id.to_le_bytes());
    h
}

/// Checks a file's header; returns its id.
pub(crate) fn check_header(data: &[u8], kind: FileKind, file: &str) -> Result<u64, StoreError> {
    let bad = |why: &str| StoreError::Corrupt {
        file: file.to_string(),
        detail: why.to_string(),
    };
    if data.len() < HEADER_LEN {
        return Err(bad("shorter than its header"));
    }
    if data[..8] != MAGIC {
        return Err(bad("not a postbox store file (bad magic number)"));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if version != VERSION {
        return Err(StoreError::UnsupportedVersion {
            file: file.to_string(),
            version,
            supported: VERSION,
        });
    }
    if u16::from_le_bytes([data[10], data[11]]) != kind as u16 {
        return Err(bad("a different kind of store file"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&data[12..20]);
    Ok(u64::from_le_bytes(id))
}

/// The checksum of a frame: CRC-32C over the length field and the payload,
/// so that a damaged length is caught too.
fn checksum(len: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len), payload)
}

/// Appends `payload` as one frame.
pub(crate) fn write_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&checksum(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Starts a frame whose payload the caller appends, then seals it with
/// [`end_frame`]: encoding straight into the output, without a copy.
pub(crate) fn begin_frame(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    at
}

/// Seals the frame begun at `at` (see [`begin_frame`]).
pub(crate) fn end_frame(out: &mut [u8], at: usize) {
    let payload_len = out.len() - at - FRAME_LEN;
    let len = u32::try_from(payload_len).unwrap_or(u32::MAX).to_le_bytes();
    let crc = checksum(len, &out[at + FRAME_LEN..]);
    out[at..at + 4].copy_from_slice(&len);
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The frame starting at `pos`, if a valid one does: its payload's range.
fn frame_at(data: &[u8], pos: usize) -> Option<std::ops::Range<usize>> {
    let head = data.get(pos..pos.checked_add(FRAME_LEN)?)?;
    let len = [head[0], head[1], head[2], head[3]];
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_PAYLOAD {
        return None;
    }
    let start = pos + FRAME_LEN;
    let payload = data.get(start..start.checked_add(n)?)?;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (checksum(len, payload) == crc).then_some(start..start + n)
}

/// One item of a [`Scan`].
#[derive(Debug)]
pub(crate) enum Scanned {
    /// A valid frame at `offset` (of its header).
    Frame { offset: usize, payload: Bytes },
    /// Bytes at `offset` that are not a valid frame, followed by valid
    /// frames: damage in the middle, skipped.
    Damaged { offset: usize, len: usize },
}

/// Reads frames from `data` from `start` on. Ends at the end of the data or
/// at a torn tail (bytes after the last valid frame that no valid frame
/// follows); [`valid_end`](Scan::valid_end) then tells where the valid data
/// ends, for truncation.
pub(crate) struct Scan {
    data: Bytes,
    pos: usize,
    torn: Option<usize>,
}

impl Scan {
    pub(crate) fn new(data: Bytes, start: usize) -> Self {
        Scan {
            data,
            pos: start,
            torn: None,
        }
    }

    /// Where the valid data ends: the end of the data, or the start of a torn
    /// tail. Meaningful once the scan has ended.
    pub(crate) fn valid_end(&self) -> usize {
        self.torn.unwrap_or(self.data.len())
    }

    /// Whether the data ended in a torn tail.
    pub(crate) fn torn(&self) -> bool {
        self.torn.is_some()
    }

    /// The next position after `from` where a frame is valid and is followed
    /// by another valid frame or by the end of the data: two frames in a row
    /// make a false match (a 1 in 2^32 chance per position) negligible.
    fn resync(&self, from: usize) -> Option<usize> {
        let data = &self.data[..];
        (from..data.len().saturating_sub(FRAME_LEN - 1)).find(|&p| {
            frame_at(data, p)
                .is_some_and(|r| r.end == data.len() || frame_at(data, r.end).is_some())
        })
    }
}

impl Iterator for Scan {
    type Item = Scanned;

    fn next(&mut self) -> Option<Scanned> {
        if self.torn.is_some() || self.pos >= self.data.len() {
            return None;
        }
        if let Some(range) = frame_at(&self.data, self.pos) {
            let offset = self.pos;
            self.pos = range.end;
            return Some(Scanned::Frame {
                offset,
                payload: self.data.slice(range),
            });
        }
        match self.resync(self.pos + 1) {
            Some(next) => {
                let offset = self.pos;
                self.pos = next;
                Some(Scanned::Damaged {
                    offset,
                    len: next - offset,
                })
            }
            None => {
                self.torn = Some(self.pos);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            write_frame(&mut out, p);
        }
        out
    }

    fn read(data: Vec<u8>) -> (Vec<Vec<u8>>, usize, usize) {
        let mut scan = Scan::new(Bytes::from(data), 0);
        let mut got = Vec::new();
        let mut damaged = 0;
        for item in scan.by_ref() {
            match item {
                Scanned::Frame { payload, .. } => got.push(payload.to_vec()),
                Scanned::Damaged { .. } => damaged += 1,
            }
        }
        (got, damaged, scan.valid_end())
    }

    #[test]
    fn frames_round_trip_and_begin_end_matches_write() {
        let data = frames(&[b"a", b"", b"hello"]);
        let (got, damaged, end) = read(data.clone());
        assert_eq!(got, vec![b"a".to_vec(), vec![], b"hello".to_vec()]);
        assert_eq!((damaged, end), (0, data.len()));
        let mut other = Vec::new();
        let at = begin_frame(&mut other);
        other.extend_from_slice(b"hello");
        end_frame(&mut other, at);
        let mut expected = Vec::new();
        write_frame(&mut expected, b"hello");
        assert_eq!(other, expected);
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_length() {
        let data = frames(&[b"first", b"second record", b"third"]);
        let whole = data.len();
        let third = whole - (FRAME_LEN + 5);
        for len in 0..whole {
            let (got, damaged, end) = read(data[..len].to_vec());
            assert_eq!(damaged, 0, "{len}");
            let expect = if len >= third {
                2
            } else if len >= FRAME_LEN + 5 {
                1
            } else {
                0
            };
            assert_eq!(got.len(), expect, "{len}");
            assert!(end <= len);
        }
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_reported() {
        let data = frames(&[b"one", b"two", b"three", b"four"]);
        let second = FRAME_LEN + 3;
        // Every bit of the second frame, flipped in turn.
        for bit in 0..(FRAME_LEN + 3) * 8 {
            let mut d = data.clone();
            d[second + bit / 8] ^= 1 << (bit % 8);
            let (got, damaged, end) = read(d);
            assert_eq!(
                got,
                vec![b"one".to_vec(), b"three".to_vec(), b"four".to_vec()],
                "bit {bit}"
            );
            assert_eq!(damaged, 1);
            assert_eq!(end, data.len());
        }
    }

    #[test]
    fn headers_are_checked() {
        let h = header(FileKind::Segment, 42);
        assert_eq!(check_header(&h, FileKind::Segment, "f").unwrap(), 42);
        assert!(matches!(
            check_header(&h, FileKind::Topology, "f"),
            Err(StoreError::Corrupt { .. })
        ));
        let mut v2 = h;
        v2[8] = 2;
        assert!(matches!(
            check_header(&v2, FileKind::Segment, "f"),
            Err(StoreError::UnsupportedVersion { version: 2, .. })
        ));
        assert!(check_header(&h[..10], FileKind::Segment, "f").is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_scan_without_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (_, _, end) = read(data.clone());
            prop_assert!(end <= data.len());
        }

        #[test]
        fn frames_after_garbage_are_found(
            garbage in proptest::collection::vec(any::<u8>(), 1..64),
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 2..5),
        ) {
            let mut data = frames(&[b"head"]);
            data.extend_from_slice(&garbage);
            for p in &payloads {
                write_frame(&mut data, p);
            }
            let (got, _, end) = read(data.clone());
            prop_assert_eq!(end, data.len());
            // Every payload after the garbage is read back, in order.
            prop_assert!(got.ends_with(&payloads));
        }
    }
}
