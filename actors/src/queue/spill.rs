//! Spill: the tail of a long ready queue, paged out to disk (the
//! [`Overflow::Spill`](crate::Overflow::Spill) policy; RabbitMQ's lazy
//! queues and classic queues v2 do the same).
//!
//! A spilling queue keeps at most its in-memory limit of ready messages in
//! memory: the head, which is what consumers take next. Messages published
//! past the limit are encoded (the envelope's binary form, as in the message
//! log, plus the queue's bookkeeping: sequence number, expiry, store
//! location) and appended to anonymous temporary files; as consumers drain
//! the head, batches are read back in order. A backlog of millions of
//! messages then costs a few kilobytes of memory per thousand spilled
//! messages' worth of bookkeeping: nothing per message.
//!
//! - Files are unnamed (`O_TMPFILE`, through `tempfile`): the OS reclaims
//!   them when the queue goes, even after a crash. Spilling is about memory,
//!   not durability; a durable queue's persistent messages are in the
//!   message log as well.
//! - Appends are buffered (1 MiB) and written in 64 MiB chunks; a chunk that
//!   has been read back entirely is closed (its space freed), the last one
//!   is truncated and reused, so disk use follows the spilled backlog.
//! - I/O happens on the queue's own thread, as a RabbitMQ queue process
//!   pages its own messages; a read-back costs one `pread` per batch.
//! - A write that fails (a full disk) keeps the records buffered in memory,
//!   in order, and is tried again later: nothing is lost, memory grows. A
//!   read that fails is reported (`error!`) and retried on the next read.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;

use crate::envelope::{Envelope, WireReader, WireWriter};

/// Appends are written once this much is buffered.
const WRITE_BUFFER: usize = 1 << 20;
/// A new file is started once the last one holds this much.
const CHUNK_BYTES: u64 = 64 << 20;
/// How much a read-back reads at once (more for a larger record).
const READ_BLOCK: usize = 1 << 20;

/// One spilled message, as read back.
pub(crate) struct Spilled {
    pub(crate) seq: u64,
    pub(crate) expires_at: u64,
    pub(crate) loc: u64,
    pub(crate) message: Envelope,
}

struct Chunk {
    file: File,
    written: u64,
    read: u64,
}

/// The spilled tail of a queue, in order.
pub(crate) struct Spill {
    dir: PathBuf,
    chunks: VecDeque<Chunk>,
    /// Encoded records not yet written, after everything in `chunks`.
    pending: Vec<u8>,
    len: usize,
    /// Payload bytes of the spilled messages.
    bytes: usize,
    /// A write failed and has not succeeded since (reported once).
    write_failed: bool,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("len", &self.len)
            .field("bytes", &self.bytes)
            .field("files", &self.chunks.len())
            .finish()
    }
}

impl Spill {
    /// Spills into anonymous files in `dir`.
    pub(crate) fn new(dir: PathBuf) -> Spill {
        Spill {
            dir,
            chunks: VecDeque::new(),
            pending: Vec::new(),
            len: 0,
            bytes: 0,
            write_failed: false,
        }
    }

    /// Messages spilled.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Payload bytes of the messages spilled.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes the spill files hold.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.written - c.read).sum()
    }

    /// Appends a message after every one spilled so far.
    pub(crate) fn push(&mut self, seq: u64, expires_at: u64, loc: u64, message: &Envelope) {
        let at = self.pending.len();
        self.pending.extend_from_slice(&[0; 4]);
        let mut w = WireWriter::new(&mut self.pending);
        w.varint(seq);
        // +1, so that "never" (u64::MAX) wraps to a one-byte 0.
        w.varint(expires_at.wrapping_add(1));
        w.varint(loc);
        message.write_wire(&mut w);
        let len = u32::try_from(self.pending.len() - at - 4).unwrap_or(u32::MAX);
        self.pending[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.len += 1;
        self.bytes += message.size();
        if self.pending.len() >= WRITE_BUFFER {
            self.flush();
        }
    }

    /// Writes the buffered records; on failure they stay buffered.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.write_pending() {
            Ok(()) => {
                if self.write_failed {
                    self.write_failed = false;
                    tracing::info!(dir = %self.dir.display(), "spilling works again");
                }
            }
            Err(err) => {
                if !self.write_failed {
                    self.write_failed = true;
                    tracing::error!(dir = %self.dir.display(), %err, "spilling failed: the queue's tail stays in memory");
                }
            }
        }
    }

    fn write_pending(&mut self) -> std::io::Result<()> {
        if self.chunks.back().is_none_or(|c| c.written >= CHUNK_BYTES) {
            self.chunks.push_back(Chunk {
                file: tempfile::tempfile_in(&self.dir)?,
                written: 0,
                read: 0,
            });
        }
        if let Some(chunk) = self.chunks.back_mut() {
            chunk.file.write_all_at(&self.pending, chunk.written)?;
            chunk.written += self.pending.len() as u64;
            self.pending.clear();
            if self.pending.capacity() > 2 * WRITE_BUFFER {
                self.pending.shrink_to(WRITE_BUFFER);
            }
        }
        Ok(())
    }

    /// Reads back up to `max` messages, oldest first, into `out`.
    pub(crate) fn pop_into(&mut self, max: usize, out: &mut impl FnMut(Spilled)) {
        let mut taken = 0;
        while taken < max && self.len > 0 {
            let files = self.chunks.len();
            let Some(chunk) = self.chunks.front_mut() else {
                // Everything spilled is still buffered.
                taken += self.take_pending(max - taken, out);
                continue;
            };
            if chunk.read == chunk.written {
                if files > 1 {
                    self.chunks.pop_front();
                    continue;
                }
                // The last file, read back entirely: reuse it from the start.
                if chunk.file.set_len(0).is_ok() {
                    chunk.written = 0;
                    chunk.read = 0;
                }
                taken += self.take_pending(max - taken, out);
                continue;
            }
            match Self::read_block(&chunk.file, chunk.read, chunk.written, max - taken, out) {
                Ok((n, bytes, used)) => {
                    chunk.read += used;
                    taken += n;
                    self.len -= n;
                    self.bytes -= bytes;
                }
                Err(err) => {
                    tracing::error!(dir = %self.dir.display(), %err, "reading spilled messages back failed");
                    return;
                }
            }
        }
    }

    /// Takes messages straight from the write buffer (nothing of them is on
    /// disk, and everything on disk has been read back).
    fn take_pending(&mut self, max: usize, out: &mut impl FnMut(Spilled)) -> usize {
        let data = Bytes::from(std::mem::take(&mut self.pending));
        let (n, bytes, used) = decode(&data, max, out);
        self.len -= n;
        self.bytes -= bytes;
        self.pending = data[used..].to_vec();
        if n == 0 {
            // Unreadable buffered data cannot happen (written just now);
            // never loop on it.
            tracing::error!(dir = %self.dir.display(), "undecodable spilled messages dropped");
            self.len = 0;
            self.bytes = 0;
            self.pending.clear();
        }
        n
    }

    /// Decodes up to `max` records from `file`, starting at byte `at` of
    /// its `written`: returns (messages, payload bytes, bytes read).
    fn read_block(
        file: &File,
        at: u64,
        written: u64,
        max: usize,
        out: &mut impl FnMut(Spilled),
    ) -> std::io::Result<(usize, usize, u64)> {
        let left = usize::try_from(written - at).unwrap_or(usize::MAX);
        let mut head = [0u8; 4];
        file.read_exact_at(&mut head, at)?;
        // A record larger than a block is read whole.
        let len = left
            .min(READ_BLOCK)
            .max(4 + u32::from_le_bytes(head) as usize);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, at)?;
        let (n, bytes, used) = decode(&Bytes::from(buf), max, out);
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an undecodable spilled record",
            ));
        }
        Ok((n, bytes, used as u64))
    }

    /// Every spilled message's store location, without taking them (a purge
    /// or a deletion settles them).
    pub(crate) fn locs(&mut self) -> Vec<u64> {
        let mut locs = Vec::new();
        self.each(&mut |s: Spilled| {
            if s.loc != 0 {
                locs.push(s.loc);
            }
        });
        locs
    }

    /// Reads every spilled message, in order, without taking them.
    pub(crate) fn each(&mut self, collect: &mut impl FnMut(Spilled)) {
        self.flush();
        for chunk in &self.chunks {
            let mut at = chunk.read;
            while at < chunk.written {
                match Self::read_block(&chunk.file, at, chunk.written, usize::MAX, collect) {
                    Ok((_, _, used)) => at += used,
                    Err(_) => break,
                }
            }
        }
        let data = Bytes::from(self.pending.clone());
        decode(&data, usize::MAX, collect);
    }

    /// Drops everything spilled.
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.pending = Vec::new();
        self.len = 0;
        self.bytes = 0;
    }
}

/// Decodes up to `max` whole records from the start of `data`: returns
/// (records, payload bytes, bytes used).
fn decode(data: &Bytes, max: usize, out: &mut impl FnMut(Spilled)) -> (usize, usize, usize) {
    let (mut n, mut bytes, mut at) = (0, 0, 0);
    while n < max && at + 4 <= data.len() {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let Some(end) = at.checked_add(4 + len).filter(|&e| e <= data.len()) else {
            break;
        };
        let record = data.slice(at + 4..end);
        let mut r = WireReader::detached(&record);
        let parsed = (|| {
            let seq = r.varint()?;
            let expires_at = r.varint()?.wrapping_sub(1);
            let loc = r.varint()?;
            let message = Envelope::read_wire(&mut r)?;
            Ok::<_, crate::envelope::WireError>(Spilled {
                seq,
                expires_at,
                loc,
                message,
            })
        })();
        let Ok(spilled) = parsed else { break };
        bytes += spilled.message.size();
        out(spilled);
        n += 1;
        at = end;
    }
    (n, bytes, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(spill: &mut Spill, max: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        spill.pop_into(max, &mut |s| seqs.push(s.seq));
        seqs
    }

    #[test]
    fn spilled_messages_come_back_in_order_from_buffer_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(dir.path().to_path_buf());
        let message = Envelope::new(vec![7u8; 1000]).with_persistent(true);
        // More than one write buffer: some on disk, some buffered.
        let n = 3 * WRITE_BUFFER / 1000;
        for seq in 0..n as u64 {
            spill.push(seq, u64::MAX, seq * 2, &message);
        }
        assert_eq!(spill.len(), n);
        assert!(spill.disk_bytes() > 0);
        let locs = spill.locs();
        assert_eq!(locs.len(), n - 1, "loc 0 is not persisted");
        let mut got = drain(&mut spill, 10);
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        // Interleaved with new pushes, order holds.
        spill.push(n as u64, 5, 0, &message);
        got.extend(drain(&mut spill, usize::MAX));
        assert_eq!(got, (0..=n as u64).collect::<Vec<_>>());
        assert_eq!((spill.len(), spill.bytes()), (0, 0));
        // Reused from the start once empty.
        spill.push(99, 1, 0, &Envelope::new("x"));
        assert_eq!(drain(&mut spill, 5), [99]);
    }

    #[test]
    fn a_record_larger_than_a_read_block_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(dir.path().to_path_buf());
        let big = Envelope::new(vec![1u8; 3 * READ_BLOCK]);
        spill.push(1, u64::MAX, 0, &big);
        spill.push(2, u64::MAX, 0, &Envelope::new("small"));
        let mut sizes = Vec::new();
        spill.pop_into(5, &mut |s| sizes.push(s.message.size()));
        assert_eq!(sizes, [3 * READ_BLOCK, 5]);
    }
}
