//! Entry points for fuzzing the store's readers (feature `fuzzing`, used by
//! the `fuzz/` crate at the workspace root; not a public API).
//!
//! Each function takes untrusted bytes and runs the code that reads them in
//! production (`frame`, `record`, `recover`, `meta`, and the envelope's wire
//! codec), on an in-memory disk. Damaged input is fine; a panic means a bug:
//! in the readers, or one of the properties checked here.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashSet;

use crate::store::disk::{Disk, DiskFile};
use crate::store::frame::{self, FRAME_LEN, FileKind, HEADER_LEN, Scan, Scanned};
use crate::store::log::segment_path;
use crate::store::meta::{self, MetaLog};
use crate::store::record::{Loc, Record};
use crate::store::recover;

/// Reads one segment file as recovery does: the header, every frame (damage
/// skipped, a torn tail found), each record decoded with the envelopes of its
/// publishes. Checks that the frames and damaged regions tile the file up to
/// where its valid data ends, and that a decoded record encodes to bytes
/// that decode and encode again to the same bytes.
pub fn read_segment(data: &[u8]) {
    if frame::check_header(data, FileKind::Segment, "fuzz.seg").is_err() {
        return;
    }
    let mut scan = Scan::new(Bytes::copy_from_slice(data), HEADER_LEN);
    let mut end = HEADER_LEN;
    for item in scan.by_ref() {
        match item {
            Scanned::Frame { offset, payload } => {
                assert_eq!(offset, end, "a frame where the last item ended");
                end = offset + FRAME_LEN + payload.len();
                if let Ok(record) = Record::decode(&payload) {
                    round_trip(&record);
                }
            }
            Scanned::Damaged { offset, len } => {
                assert_eq!(offset, end, "damage where the last item ended");
                assert!(len > 0);
                end = offset + len;
                assert!(end < data.len(), "damage is followed by a frame");
            }
        }
    }
    assert_eq!(
        scan.valid_end(),
        end,
        "the valid data ends after the last item"
    );
}

fn round_trip(record: &Record) {
    let mut once = Vec::new();
    record.encode(&mut once);
    let again = Record::decode(&Bytes::from(once.clone())).expect("an encoded record decodes");
    let mut twice = Vec::new();
    again.encode(&mut twice);
    assert_eq!(once, twice, "a decoded record encodes the same twice");
}

/// A segment file as the writer makes it: the header of segment `id`, then
/// each payload in a valid frame. For fuzz targets that must get past the
/// checksums to reach the records.
pub fn segment_file(id: u64, payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = frame::header(FileKind::Segment, id).to_vec();
    for p in payloads {
        frame::write_frame(&mut out, p);
    }
    out
}

/// Recovers a message log made of `files` (segment id, file bytes) with the
/// durable queues `queues` declared, as [`Broker::open`](crate::Broker::open)
/// does (the same `recover`, on an in-memory directory). Checks the
/// recovered state (every message of a declared queue, live, at a location
/// the queues can pack, in publish order, and counted by the segments'
/// accounting), runs the space accounting the writer starts with, and
/// recovers again: the first recovery left nothing more to cut.
pub fn recover_dir(files: &[(u64, &[u8])], queues: &[u64]) {
    let disk = MemDisk::default();
    let dir = Path::new("/fuzz/log");
    for &(id, data) in files {
        disk.files
            .lock()
            .insert(segment_path(dir, id), data.to_vec());
    }
    let queues: FxHashSet<u64> = queues.iter().copied().collect();
    let Ok(got) = recover::recover(&disk, dir, &queues) else {
        return;
    };
    let mut messages = 0u64;
    for (queue, list) in &got.queues {
        assert!(queues.contains(queue), "only declared queues get messages");
        assert!(list.windows(2).all(|w| w[0].seq <= w[1].seq), "in order");
        for m in list {
            assert!(got.segments.is_live(m.loc), "{:?} is live", m.loc);
            assert!(m.loc.segment < got.next_segment);
            let packed = m.loc.pack();
            assert!(
                packed != 0 && Loc::unpack(packed) == m.loc,
                "{:?} packs into a u64",
                m.loc
            );
            messages += 1;
        }
    }
    let live: u64 = got
        .segments
        .iter()
        .map(|(_, s)| u64::from(s.live_count))
        .sum();
    assert_eq!(live, messages, "the accounting counts every message");
    let _ = got.segments.deletable(got.next_segment);
    let _ = got.segments.to_compact(got.next_segment);
    let again = recover::recover(&disk, dir, &queues).expect("a recovered log recovers again");
    assert_eq!(again.truncated, 0, "torn tails were cut the first time");
}

/// Opens a topology log holding `data` as a broker does (the entries are
/// opaque to the store: the broker decodes them). Checks that reopening
/// cuts nothing more, and that a snapshot of the entries (the log's
/// rewrite) reads back as exactly those entries.
pub fn read_meta(data: &[u8]) {
    let disk = Arc::new(MemDisk::default());
    let dir = Path::new("/fuzz");
    let path = dir.join(meta::FILE);
    disk.files.lock().insert(path.clone(), data.to_vec());
    let Ok((log, entries)) = MetaLog::open(disk.clone(), dir) else {
        return;
    };
    let len = disk.files.lock()[&path].len();
    drop(MetaLog::open(disk.clone(), dir).expect("an opened topology log opens again"));
    assert_eq!(disk.files.lock()[&path].len(), len, "nothing more to cut");
    let snapshot: Vec<Vec<u8>> = entries.iter().map(|e| e.to_vec()).collect();
    log.rewrite(&snapshot)
        .expect("a rewrite in memory succeeds");
    let (_, back) = MetaLog::open(disk, dir).expect("a rewritten log opens");
    assert_eq!(back, entries, "a snapshot reads back as its entries");
}

/// A directory in memory: files by path.
#[derive(Default)]
struct MemDisk {
    files: Arc<Mutex<BTreeMap<PathBuf, Vec<u8>>>>,
}

struct MemFile {
    files: Arc<Mutex<BTreeMap<PathBuf, Vec<u8>>>>,
    path: PathBuf,
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

impl DiskFile for MemFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut files = self.files.lock();
        files
            .get_mut(&self.path)
            .ok_or_else(not_found)?
            .extend_from_slice(buf);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut files = self.files.lock();
        let file = files.get_mut(&self.path).ok_or_else(not_found)?;
        file.resize(len as usize, 0);
        Ok(())
    }
}

impl MemDisk {
    fn file(&self, path: &Path) -> Box<dyn DiskFile> {
        Box::new(MemFile {
            files: self.files.clone(),
            path: path.to_path_buf(),
        })
    }
}

impl Disk for MemDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let mut files = self.files.lock();
        if files.contains_key(path) {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        files.insert(path.to_path_buf(), Vec::new());
        Ok(self.file(path))
    }

    fn append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        if !self.files.lock().contains_key(path) {
            return Err(not_found());
        }
        Ok(self.file(path))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files.lock().get(path).cloned().ok_or_else(not_found)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files
            .lock()
            .remove(path)
            .map(drop)
            .ok_or_else(not_found)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files.lock();
        let data = files.remove(from).ok_or_else(not_found)?;
        files.insert(to.to_path_buf(), data);
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let files = self.files.lock();
        Ok(files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect())
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut files = self.files.lock();
        let file = files.get_mut(path).ok_or_else(not_found)?;
        file.resize(len as usize, 0);
        Ok(())
    }
}
