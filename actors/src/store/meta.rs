//! The metadata log: the broker's durable topology (queues, exchanges,
//! bindings, streams) as a log of operations, each synced before the
//! declaration that made it returns. Its entries are opaque here (the broker
//! encodes them); at opening it is read back, and rewritten as a snapshot
//! when it has grown well past what it describes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::store::StoreError;
use crate::store::disk::{Disk, DiskFile};
use crate::store::frame::{self, FileKind, HEADER_LEN, Scan, Scanned};

pub(crate) const FILE: &str = "topology.log";

/// The metadata log of a data directory.
pub(crate) struct MetaLog {
    path: PathBuf,
    dir: PathBuf,
    disk: Arc<dyn Disk>,
    file: Mutex<Option<Box<dyn DiskFile>>>,
}

impl MetaLog {
    /// Opens (or creates) the log in `dir`; returns it and its entries.
    pub(crate) fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
    ) -> Result<(MetaLog, Vec<Bytes>), StoreError> {
        let path = dir.join(FILE);
        let mut entries = Vec::new();
        match disk.read(&path) {
            Ok(data) => {
                let name = path.display().to_string();
                frame::check_header(&data, FileKind::Topology, &name)?;
                let len = data.len();
                let mut scan = Scan::new(Bytes::from(data), HEADER_LEN);
                for item in scan.by_ref() {
                    match item {
                        Scanned::Frame { payload, .. } => entries.push(payload),
                        Scanned::Damaged { offset, len } => {
                            tracing::error!(file = %name, offset, len, "damaged topology entry skipped");
                        }
                    }
                }
                if scan.torn() {
                    let end = scan.valid_end();
                    tracing::warn!(file = %name, bytes = len - end, "torn tail of the topology log cut off");
                    disk.truncate(&path, end as u64)
                        .map_err(|e| StoreError::io("cut a torn tail", &path, &e))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_new(&*disk, dir, &path, &[])?;
            }
            Err(e) => return Err(StoreError::io("read the topology log", &path, &e)),
        }
        let file = disk
            .append(&path)
            .map_err(|e| StoreError::io("open the topology log", &path, &e))?;
        Ok((
            MetaLog {
                path,
                dir: dir.to_path_buf(),
                disk,
                file: Mutex::new(Some(file)),
            },
            entries,
        ))
    }

    /// Appends an entry and syncs it.
    pub(crate) fn append(&self, entry: &[u8]) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(entry.len() + frame::FRAME_LEN);
        frame::write_frame(&mut buf, entry);
        let mut file = self.file.lock();
        let Some(f) = file.as_mut() else {
            return Err(StoreError::Closed);
        };
        f.write_all(&buf)
            .and_then(|()| f.sync_data())
            .map_err(|e| StoreError::io("append to the topology log", &self.path, &e))
    }

    /// Replaces the log with `entries` (a snapshot of what it described).
    pub(crate) fn rewrite(&self, entries: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut file = self.file.lock();
        *file = None;
        let tmp = self.dir.join(format!("{FILE}.new"));
        let _ = self.disk.remove(&tmp);
        write_new(&*self.disk, &self.dir, &tmp, entries)?;
        self.disk
            .rename(&tmp, &self.path)
            .map_err(|e| StoreError::io("replace the topology log", &self.path, &e))?;
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| StoreError::io("sync the data directory", &self.dir, &e))?;
        *file = Some(
            self.disk
                .append(&self.path)
                .map_err(|e| StoreError::io("open the topology log", &self.path, &e))?,
        );
        Ok(())
    }
}

/// Creates `path` with a header and `entries`, synced (file and directory).
fn write_new(
    disk: &dyn Disk,
    dir: &Path,
    path: &Path,
    entries: &[Vec<u8>],
) -> Result<(), StoreError> {
    let mut buf = frame::header(FileKind::Topology, 0).to_vec();
    for e in entries {
        frame::write_frame(&mut buf, e);
    }
    let mut file = disk
        .create(path)
        .map_err(|e| StoreError::io("create the topology log", path, &e))?;
    file.write_all(&buf)
        .and_then(|()| file.sync_data())
        .map_err(|e| StoreError::io("write the topology log", path, &e))?;
    disk.sync_dir(dir)
        .map_err(|e| StoreError::io("sync the data directory", dir, &e))
}
