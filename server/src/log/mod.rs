//! The log store: the append-only segment files that are the source of truth.
//!
//! - [`segment`]: segment names (the number of records before them) and the record cursor.
//! - [`file`]: the I/O boundary, [`LogDir`] and [`LogFile`], with the real implementation.
//! - [`fault`]: a [`LogDir`] that fails chosen calls with EIO or ENOSPC, for tests.
//! - [`store`]: [`LogStore`], owned by the writer thread: one write and one `fdatasync` per batch.
//! - [`recovery`]: what [`LogStore::open`] checks and truncates; defines the torn tail.
//! - [`reader`]: [`LogReader`], reading `(after, upto]` by LSN next to the writer.
//!
//! Layout: `DATA_DIR/log/NNNNNNNNNNNNNNNNNNNN.log`, each a sequence of
//! `u32 len LE | u32 crc32c LE | payload` records whose payload is
//! [`SignedEntry::encode_payload`](kappakv_protocol::SignedEntry::encode_payload). A record's
//! LSN is its 1-based ordinal in the whole log.
//!
//! **Invariant:** the segment named `N` starts at LSN `N + 1`, and a batch never spans two
//! segments.
//!
//! **Invariant:** at most one [`LogStore`] appends to a log directory: it holds an exclusive
//! lock on `log/LOCK` (see [`LOCK_FILE_NAME`]). Readers take no lock.

pub mod error;
pub mod fault;
pub mod file;
pub mod reader;
pub mod recovery;
pub mod segment;
pub mod store;

use std::path::{Path, PathBuf};

pub use error::{AppendError, OpenLogError, ReadLogError};
pub use file::{FsLogDir, LogDir, LogFile, OpenMode};
pub use reader::{Entries, LogReader};
pub use recovery::{Recovery, Truncation};
pub use store::LogStore;

/// Name of the log directory inside the data dir.
pub const LOG_DIR_NAME: &str = "log";

/// Name of the lock file inside the log directory. [`LogStore::open`] holds an exclusive lock
/// on it for as long as the store lives, so that two processes never append to one log.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Default for [`LogConfig::segment_bytes_max`]: 128 MiB.
pub const DEFAULT_SEGMENT_BYTES_MAX: u64 = 128 * 1024 * 1024;

/// Default for [`LogConfig::preallocate_bytes`]: 1 MiB.
pub const DEFAULT_PREALLOCATE_BYTES: u64 = 1024 * 1024;

/// The log directory of a data dir.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_DIR_NAME)
}

/// Settings of the log store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A new segment is started before a batch once the current one holds at least this many
    /// bytes. A segment can exceed it by one batch.
    pub segment_bytes_max: u64,
    /// Zeros written ahead of the last record, so that a batch's `fdatasync` finds the file's
    /// size and blocks already durable and flushes only data, not the file system's journal:
    /// on ext4 that halves its latency. When a batch goes past the zeros, this many more are
    /// written after it, in the same write's `fdatasync`. 0 writes none. A segment is cut to
    /// its records before the next one starts and when the store is dropped; recovery and
    /// `verify` take zeros after the last record for the end of the log.
    pub preallocate_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: DEFAULT_SEGMENT_BYTES_MAX,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
        }
    }
}

impl LogConfig {
    /// Asserts the settings are usable.
    pub fn validate(&self) {
        assert!(
            self.segment_bytes_max > 0,
            "segment_bytes_max must be positive"
        );
    }
}
