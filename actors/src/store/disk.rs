//! The file operations the store makes, behind a trait so that tests can make
//! them fail (a failed write, a failed sync, a full disk) where a real disk
//! rarely does on demand.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An open file the store appends to.
pub(crate) trait DiskFile: Send {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the data (and the size) reach the disk.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed write).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The file system, as the store uses it.
pub(crate) trait Disk: Send + Sync + 'static {
    /// Creates `path`, which must not exist.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens `path` to append to it.
    fn append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (files created, removed, renamed)
    /// durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Cuts `path` back to `len` bytes.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
}

/// The real file system.
pub(crate) struct RealDisk;

struct RealFile(File);

impl DiskFile for RealFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Disk for RealDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        OpenOptions::new().write(true).open(path)?.set_len(len)
    }
}

#[cfg(feature = "testkit")]
pub use faults::DiskFaults;
#[cfg(feature = "testkit")]
pub(crate) use faults::FaultyDisk;

#[cfg(feature = "testkit")]
mod faults {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{Disk, DiskFile, RealDisk};

    /// Failures to inject into the store's file operations, for tests: the n-th
    /// write or sync from now fails, or writes fail once a byte budget is spent
    /// (a full disk). Counters are shared by clones.
    ///
    /// ```
    /// # #[cfg(feature = "testkit")] {
    /// use postbox_actors::testkit::DiskFaults;
    /// let faults = DiskFaults::new().fail_sync(1); // the next sync fails
    /// # let _ = faults;
    /// # }
    /// ```
    #[derive(Clone, Debug, Default)]
    pub struct DiskFaults {
        inner: Arc<FaultState>,
    }

    #[derive(Debug, Default)]
    struct FaultState {
        /// The write that fails (1 = the next one); 0 = none.
        fail_write: AtomicU64,
        fail_sync: AtomicU64,
        writes: AtomicU64,
        syncs: AtomicU64,
        /// Bytes that may still be written; `u64::MAX` = unlimited.
        space: AtomicU64,
    }

    impl DiskFaults {
        /// No faults.
        pub fn new() -> Self {
            let faults = DiskFaults::default();
            faults.inner.space.store(u64::MAX, Ordering::Relaxed);
            faults
        }

        /// The `n`-th write from now fails (with an I/O error; the bytes are not
        /// written).
        pub fn fail_write(self, n: u64) -> Self {
            let at = self.inner.writes.load(Ordering::Relaxed) + n;
            self.inner.fail_write.store(at, Ordering::Relaxed);
            self
        }

        /// The `n`-th sync from now fails.
        pub fn fail_sync(self, n: u64) -> Self {
            let at = self.inner.syncs.load(Ordering::Relaxed) + n;
            self.inner.fail_sync.store(at, Ordering::Relaxed);
            self
        }

        /// Only `bytes` more may be written; then writes fail as on a full disk
        /// (`ENOSPC`), until [`free`](Self::free).
        pub fn disk_full_after(self, bytes: u64) -> Self {
            self.inner.space.store(bytes, Ordering::Relaxed);
            self
        }

        /// Room again: writes succeed.
        pub fn free(&self) {
            self.inner.space.store(u64::MAX, Ordering::Relaxed);
        }

        /// Writes and syncs attempted so far.
        pub fn counts(&self) -> (u64, u64) {
            (
                self.inner.writes.load(Ordering::Relaxed),
                self.inner.syncs.load(Ordering::Relaxed),
            )
        }

        fn on_write(&self, len: usize) -> io::Result<()> {
            let n = self.inner.writes.fetch_add(1, Ordering::Relaxed) + 1;
            if self.inner.fail_write.load(Ordering::Relaxed) == n {
                return Err(io::Error::other("injected write failure"));
            }
            let len = len as u64;
            let space = &self.inner.space;
            let mut left = space.load(Ordering::Relaxed);
            loop {
                if left == u64::MAX {
                    return Ok(());
                }
                if left < len {
                    return Err(io::Error::from_raw_os_error(28)); // ENOSPC
                }
                match space.compare_exchange(left, left - len, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => return Ok(()),
                    Err(now) => left = now,
                }
            }
        }

        fn on_sync(&self) -> io::Result<()> {
            let n = self.inner.syncs.fetch_add(1, Ordering::Relaxed) + 1;
            if self.inner.fail_sync.load(Ordering::Relaxed) == n {
                return Err(io::Error::other("injected sync failure"));
            }
            Ok(())
        }
    }

    /// The real file system with [`DiskFaults`] injected.
    pub(crate) struct FaultyDisk {
        pub(crate) faults: DiskFaults,
    }

    struct FaultyFile {
        file: Box<dyn DiskFile>,
        faults: DiskFaults,
    }

    impl DiskFile for FaultyFile {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.faults.on_write(buf.len())?;
            self.file.write_all(buf)
        }

        fn sync_data(&mut self) -> io::Result<()> {
            self.faults.on_sync()?;
            self.file.sync_data()
        }

        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    impl Disk for FaultyDisk {
        fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
            let file = RealDisk.create(path)?;
            Ok(Box::new(FaultyFile {
                file,
                faults: self.faults.clone(),
            }))
        }

        fn append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
            let file = RealDisk.append(path)?;
            Ok(Box::new(FaultyFile {
                file,
                faults: self.faults.clone(),
            }))
        }

        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            RealDisk.read(path)
        }

        fn remove(&self, path: &Path) -> io::Result<()> {
            RealDisk.remove(path)
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealDisk.rename(from, to)
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.faults.on_sync()?;
            RealDisk.sync_dir(dir)
        }

        fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            RealDisk.list(dir)
        }

        fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
            RealDisk.truncate(path, len)
        }
    }
}
