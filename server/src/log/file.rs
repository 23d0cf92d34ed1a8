//! The I/O boundary of the log: a directory of segment files and the few operations the store
//! and its readers need. [`FsLogDir`] is the real implementation; a fault-injecting one (EIO or
//! ENOSPC on write, fsync or create, torn writes) implements the same two traits, as redb's
//! `StorageBackend` does.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How [`LogDir::open`] opens a segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading only.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// A new file for reading and writing; fails if the name exists.
    CreateNew,
}

/// One segment file.
///
/// Reads take `&self` so that a reader never needs exclusive access; every method that changes
/// the file takes `&mut self`, and only the store's owning thread holds a writable file.
pub trait LogFile: Send + Sync {
    /// Reads into `buf` from `offset`, returning how many bytes were read; 0 means end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`. The store only ever writes at the end of its data.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every byte written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;

    /// Makes the data and all metadata durable (`fsync`), for a newly created file.
    fn sync_all(&mut self) -> io::Result<()>;

    /// Cuts or extends the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;

    /// The file's current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The directory holding the segment files.
pub trait LogDir: Send + Sync {
    /// The directory's path, for error messages.
    fn path(&self) -> &Path;

    /// Names of every file in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;

    /// Opens the file `name` in the directory.
    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Box<dyn LogFile>>;

    /// Makes the directory's entries durable (`fsync` of the directory), after a create.
    fn sync(&self) -> io::Result<()>;

    /// Bytes an unprivileged process may still write on the file system holding the directory,
    /// for the store's free-space reserve ([`LogStore::set_disk_reserve`]). A directory that
    /// cannot tell answers `u64::MAX`, which no reserve is above.
    ///
    /// [`LogStore::set_disk_reserve`]: super::LogStore::set_disk_reserve
    fn available_space(&self) -> io::Result<u64> {
        Ok(u64::MAX)
    }
}

/// A log directory on the real file system.
#[derive(Debug, Clone)]
pub struct FsLogDir {
    path: PathBuf,
}

impl FsLogDir {
    /// The directory at `path`, which must exist.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl LogDir for FsLogDir {
    fn path(&self) -> &Path {
        &self.path
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in fs::read_dir(&self.path)? {
            let item = item?;
            if let Ok(name) = item.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                opts.write(true);
            }
            OpenMode::CreateNew => {
                opts.write(true).create_new(true);
            }
        }
        Ok(Box::new(FsLogFile {
            file: opts.open(self.path.join(name))?,
        }))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    /// The least of the log directory's file system and its parent's: the parent is the data
    /// dir, whose file system holds the views (`indexes.redb`), and the log directory may be a
    /// mount or a link of its own.
    fn available_space(&self) -> io::Result<u64> {
        let own = available_space(&self.path)?;
        match self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => Ok(own.min(available_space(parent)?)),
            None => Ok(own),
        }
    }
}

/// Bytes an unprivileged process may still write on the file system holding `path`
/// (`statvfs`: available blocks times the fragment size). Blocks kept for the superuser are
/// not counted, so a node running as root stops short of them.
pub fn available_space(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A segment file on the real file system.
#[derive(Debug)]
pub struct FsLogFile {
    file: File,
}

impl LogFile for FsLogFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}
