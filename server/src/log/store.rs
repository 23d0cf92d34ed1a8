//! The log store: appends batches of records to the last segment, one write and one
//! `fdatasync` per batch.

use std::fs::TryLockError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappakv_protocol::limits::MAX_RECORD_BYTES;
use kappakv_protocol::record::{RECORD_HEADER_LEN, encode_record};
use kappakv_protocol::{Lsn, Timestamp};

use super::LogConfig;
use super::error::{AppendError, OpenLogError};
use super::file::{FsLogDir, LogDir, LogFile, OpenMode};
use super::recovery::{Recovery, recover};
use super::segment::segment_name;

/// The append side of the log. Owned by exactly one thread, the writer; readers use
/// [`LogReader`](super::LogReader) on the same directory.
///
/// **Invariant:** every record at an LSN up to [`last_lsn`](Self::last_lsn) is whole in a segment
/// and was covered by a completed `fdatasync` (or was found whole at open).
pub struct LogStore {
    dir: Arc<dyn LogDir>,
    cfg: LogConfig,
    /// The last segment, the only one ever written.
    active: Box<dyn LogFile>,
    /// Records before the active segment: its name.
    active_base: u64,
    /// Bytes of whole records in the active segment; the next batch is written here.
    active_len: u64,
    /// The active segment's length: `active_len` and the zeros written ahead of it
    /// ([`LogConfig::preallocate_bytes`]).
    allocated: u64,
    last_lsn: Lsn,
    max_timestamp: Timestamp,
    /// Reused for each batch's bytes.
    buf: Vec<u8>,
    /// Set by the first failed write, sync or rollover that leaves the segment in a state the
    /// store cannot vouch for (fail-stop). A full disk does not set it: see [`append`](Self::append).
    stopped: bool,
    /// The exclusive lock on `log/LOCK`, released when the store is dropped (or the process
    /// dies). `None` for stores opened with [`open_in`](Self::open_in).
    lock: Option<std::fs::File>,
    /// Bytes of free space an append must leave on the file system; 0 checks nothing.
    disk_reserve: u64,
    /// Bytes kept free on top of the reserve for the views to apply what they are behind by.
    views_room: u64,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir.path())
            .field("active_base", &self.active_base)
            .field("active_len", &self.active_len)
            .field("last_lsn", &self.last_lsn)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log in the directory `log_dir` (`DATA_DIR/log`), creating it and the first
    /// segment if needed, takes the exclusive lock on its `LOCK` file, and recovers the tail of
    /// the last segment (see [`recovery`](super::recovery)).
    ///
    /// Fails with [`OpenLogError::Locked`] while another store holds the lock, in this process
    /// or another.
    pub fn open(log_dir: &Path, cfg: &LogConfig) -> Result<(Self, Recovery), OpenLogError> {
        Self::open_locked(Arc::new(FsLogDir::new(log_dir)), cfg)
    }

    /// [`open`](Self::open) through `dir`, a [`LogDir`] over the real directory `dir.path()`
    /// (which it creates if needed, and whose lock it takes): how a node runs on a
    /// fault-injecting directory in tests.
    pub fn open_locked(
        dir: Arc<dyn LogDir>,
        cfg: &LogConfig,
    ) -> Result<(Self, Recovery), OpenLogError> {
        let log_dir = dir.path().to_path_buf();
        let log_dir = log_dir.as_path();
        if !log_dir.is_dir() {
            let dir_err = |source| OpenLogError::Dir {
                path: log_dir.to_path_buf(),
                source,
            };
            std::fs::create_dir_all(log_dir).map_err(dir_err)?;
            // The new directory entry must survive a crash along with the segment created in it.
            if let Some(parent) = log_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(dir_err)?;
            }
        }
        // Locked before recovery, which may truncate the tail another appender is writing.
        let lock = lock_log_dir(log_dir)?;
        let (mut store, recovery) = Self::open_in(dir, cfg)?;
        store.lock = Some(lock);
        Ok((store, recovery))
    }

    /// Opens the log in `dir`, which must exist: the entry point for other [`LogDir`]
    /// implementations, such as fault-injecting ones in tests.
    pub fn open_in(
        dir: Arc<dyn LogDir>,
        cfg: &LogConfig,
    ) -> Result<(Self, Recovery), OpenLogError> {
        cfg.validate();
        let (recovered, recovery) = recover(dir.as_ref())?;
        let store = Self {
            dir,
            cfg: cfg.clone(),
            active: recovered.active,
            active_base: recovered.active_base,
            active_len: recovered.active_len,
            allocated: recovered.allocated,
            last_lsn: recovery.last_lsn,
            max_timestamp: recovery.max_timestamp,
            buf: Vec::new(),
            stopped: false,
            lock: None,
            disk_reserve: 0,
            views_room: 0,
        };
        Ok((store, recovery))
    }

    /// LSN of the last durable record (0 when the log is empty).
    pub fn last_lsn(&self) -> Lsn {
        self.last_lsn
    }

    /// The greatest entry timestamp found when the log was opened.
    pub fn max_timestamp_at_open(&self) -> Timestamp {
        self.max_timestamp
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Arc<dyn LogDir> {
        &self.dir
    }

    /// Keeps `bytes` free on the file system: from now on, an append that would leave less
    /// ([`LogDir::available_space`] minus the batch) is refused with
    /// [`AppendError::BelowReserve`] before anything is written, and the next append that fits
    /// goes through. 0, the default, checks nothing.
    ///
    /// The log is not the only file that grows: the views grow with the entries already in it,
    /// and the node writes them and its last checkpoint at shutdown. A disk filled by the log
    /// alone would leave them no room, and the index database treats a failed write as fatal
    /// until it is reopened. The reserve keeps that room.
    pub fn set_disk_reserve(&mut self, bytes: u64) {
        self.disk_reserve = bytes;
    }

    /// Keeps `bytes` free on top of the reserve, from the next append on: what the views will
    /// write to apply the part of the log they have not applied yet, which the writer knows and
    /// the store does not. Only checked while there is a reserve.
    pub fn set_views_room(&mut self, bytes: u64) {
        self.views_room = bytes;
    }

    /// [`AppendError::BelowReserve`] if a batch of `len` bytes would leave less than the reserve
    /// and the views' room free. A file system that cannot be asked (`statvfs` failing) is let through: the write
    /// itself then finds out, and a full disk is [`AppendError::DiskFull`].
    fn check_reserve(&self, len: usize) -> Result<(), AppendError> {
        if self.disk_reserve == 0 {
            return Ok(());
        }
        let available = match self.dir.available_space() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the free space of the log's file system");
                return Ok(());
            }
        };
        let keep = self.disk_reserve.saturating_add(self.views_room);
        if available < keep.saturating_add(len as u64) {
            return Err(AppendError::BelowReserve {
                dir: self.dir.path().to_path_buf(),
                available,
                reserve: self.disk_reserve,
                views: self.views_room,
                len,
            });
        }
        Ok(())
    }

    /// Appends one record per payload, in order, with one write and one `fdatasync`, and returns
    /// the LSN of the last one. The batch goes into one segment: if the active segment already
    /// holds `segment_bytes_max` bytes or more, a new one is started first.
    ///
    /// An empty batch writes nothing and returns the last LSN.
    ///
    /// A batch that would leave less free space than the reserve
    /// ([`set_disk_reserve`](Self::set_disk_reserve), plus [`set_views_room`](Self::set_views_room))
    /// is [`AppendError::BelowReserve`], with nothing written. A full file system (ENOSPC or EDQUOT) on the write, or on creating the
    /// next segment, is [`AppendError::DiskFull`]: the segment is cut back to its durable length and the cut
    /// synced, so nothing of the batch stays in the log, and the store takes appends again
    /// (they fail the same way until there is space). Every other error, and any failed
    /// `fsync`, stops the store: every later call fails with [`AppendError::Stopped`], since what
    /// reached the disk is unknown until the log is reopened and recovered. An error on a sync
    /// is never retried: after a failed `fsync` the kernel may have dropped the dirty pages and
    /// a second `fsync` would report success for data that is gone (PostgreSQL's "fsyncgate").
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<Lsn, AppendError> {
        if self.stopped {
            return Err(AppendError::Stopped);
        }
        if payloads.is_empty() {
            return Ok(self.last_lsn);
        }
        let mut total = 0;
        for p in payloads {
            let len = p.as_ref().len();
            if len > MAX_RECORD_BYTES || len == 0 {
                return Err(AppendError::TooLarge {
                    len,
                    max: MAX_RECORD_BYTES,
                });
            }
            total += RECORD_HEADER_LEN + len;
        }
        self.check_reserve(total)?;
        if self.active_len >= self.cfg.segment_bytes_max {
            self.roll_over(total).inspect_err(|e| {
                if !matches!(e, AppendError::DiskFull { .. }) {
                    self.stopped = true;
                }
            })?;
        }
        self.buf.clear();
        self.buf.reserve(total);
        for p in payloads {
            encode_record(p.as_ref(), &mut self.buf);
        }
        assert_eq!(self.buf.len(), total);
        let offset = self.active_len;
        // A batch that goes past the zeros written ahead carries the next ones after it, in
        // the same write and `fdatasync`: a full disk for them is a full disk for the batch.
        let end = offset + total as u64;
        if end > self.allocated {
            let ahead = usize::try_from(self.cfg.preallocate_bytes)
                .expect("a preallocation fits in memory");
            self.buf.resize(total + ahead, 0);
        }
        let written = self.active.write_all_at(&self.buf, offset);
        if let Err(source) = written {
            if is_disk_full(&source) {
                return Err(self.cut_back(total, source));
            }
            self.stopped = true;
            return Err(AppendError::Write {
                segment: self.active_path(),
                offset,
                len: total,
                source,
            });
        }
        self.allocated = self.allocated.max(offset + self.buf.len() as u64);
        let sync_started = std::time::Instant::now();
        let synced = self.active.sync_data();
        crate::telemetry::fsync(sync_started);
        if let Err(source) = synced {
            self.stopped = true;
            return Err(AppendError::Sync {
                segment: self.active_path(),
                offset,
                source,
            });
        }
        self.active_len += total as u64;
        self.last_lsn += payloads.len() as u64;
        Ok(self.last_lsn)
    }

    /// After a write of `len` bytes that found the file system full: cuts the active segment
    /// back to its durable length and syncs the cut, so that no byte of the failed batch can
    /// be found in the log, even after a crash. If that fails too, the store stops.
    fn cut_back(&mut self, len: usize, full: std::io::Error) -> AppendError {
        let offset = self.active_len;
        let segment = self.active_path();
        match self.cut_to_records() {
            Ok(()) => AppendError::DiskFull {
                segment,
                offset,
                len,
                source: full,
            },
            Err(source) => {
                self.stopped = true;
                AppendError::CutBack {
                    segment,
                    offset,
                    full,
                    source,
                }
            }
        }
    }

    /// Cuts the active segment to its records (the zeros written ahead of them, or a batch
    /// that did not complete) and makes the cut durable.
    fn cut_to_records(&mut self) -> std::io::Result<()> {
        self.active.set_len(self.active_len)?;
        self.active.sync_all()?;
        self.allocated = self.active_len;
        Ok(())
    }

    /// Starts a new segment after the last record, before a batch of `len` bytes: cuts the
    /// zeros off the segment it ends, creates the new one, syncs it and the directory. A full file system at the create leaves nothing behind
    /// (an exclusive create either makes the name or fails) and is [`AppendError::DiskFull`];
    /// the next append tries again.
    fn roll_over(&mut self, len: usize) -> Result<(), AppendError> {
        let base = self.last_lsn;
        let name = segment_name(base);
        let segment = self.dir.path().join(&name);
        let err = |source| AppendError::Rollover {
            segment: segment.clone(),
            source,
        };
        // Only the last segment may end in zeros: recovery takes them for damage elsewhere.
        if self.allocated > self.active_len {
            self.cut_to_records().map_err(err)?;
        }
        let mut file = self
            .dir
            .open(&name, OpenMode::CreateNew)
            .map_err(|source| {
                if is_disk_full(&source) {
                    AppendError::DiskFull {
                        segment: segment.clone(),
                        offset: 0,
                        len,
                        source,
                    }
                } else {
                    err(source)
                }
            })?;
        file.sync_all().map_err(err)?;
        self.dir.sync().map_err(err)?;
        tracing::debug!(segment = %segment.display(), "started a new log segment");
        self.active = file;
        self.active_base = base;
        self.active_len = 0;
        self.allocated = 0;
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        self.dir.path().join(segment_name(self.active_base))
    }
}

impl Drop for LogStore {
    /// Cuts the zeros written ahead, so that a log closed cleanly ends at its last record. A
    /// store that stopped after an error is left as it is, for recovery.
    fn drop(&mut self) {
        if !self.stopped
            && self.allocated > self.active_len
            && let Err(e) = self.cut_to_records()
        {
            tracing::warn!(error = %e, "cannot cut the zeros after the log's last record; the next start will");
        }
    }
}

/// Whether a write failed because the file system is full (or the user's quota is), which
/// freeing space cures; any other failure may mean the device is failing.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The exclusive lock on a log directory's `LOCK` file, the one a [`LogStore`] holds: while it
/// is held, no store appends to the log (nor recovers it). Released when dropped.
#[derive(Debug)]
pub struct LogLock {
    _file: std::fs::File,
}

impl LogLock {
    /// Takes the lock on `log_dir/LOCK`, creating the file if needed, or `None` while a store
    /// or another lock holds it, in this process or another (after the same short retry as
    /// [`LogStore::open`]).
    pub fn try_take(log_dir: &Path) -> Result<Option<Self>, OpenLogError> {
        match lock_log_dir(log_dir) {
            Ok(file) => Ok(Some(Self { _file: file })),
            Err(OpenLogError::Locked { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// How long [`LogStore::open`] retries a lock that looks held. A `flock` belongs to the open
/// file, and a child process forked by this one (a test harness spawning `kappakv`, say) holds
/// a copy of every descriptor between its fork and its exec: for that moment, a lock this process
/// has just released still looks held. A lock held by a running node stays held.
const LOCK_RETRY: Duration = Duration::from_millis(250);

/// Takes the exclusive lock on `log_dir/LOCK`, creating the file if needed. The lock is an
/// advisory `flock`, tied to the open file: it goes away with the process, so a crash never
/// leaves the log locked.
fn lock_log_dir(log_dir: &Path) -> Result<std::fs::File, OpenLogError> {
    let path = log_dir.join(super::LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| OpenLogError::Lock {
            path: path.clone(),
            source,
        })?;
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::yield_now();
            }
            Err(TryLockError::WouldBlock) => {
                return Err(OpenLogError::Locked {
                    data_dir: log_dir
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(log_dir)
                        .to_path_buf(),
                });
            }
            Err(TryLockError::Error(source)) => return Err(OpenLogError::Lock { path, source }),
        }
    }
}
