//! Errors of the log store, one enum per operation. Each names the segment file, the byte offset
//! in it and the LSN where it applies.

use std::io;
use std::path::PathBuf;

use kappakv_protocol::{DecodeError, Lsn, VerifyError};

use super::segment::RecordDamage;

/// [`LogStore::open`](super::LogStore::open) failed: the log cannot be used as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenLogError {
    /// Another process (or another open store in this one) holds the log's lock file: two
    /// appenders on one log would interleave their batches and break its recovery rule.
    #[error(
        "the log in {data_dir} is in use by another process (is kappakv serve running?); stop it first"
    )]
    Locked {
        /// The data dir (the log directory's parent).
        data_dir: PathBuf,
    },
    /// The lock file cannot be created or locked.
    #[error("locking {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The log directory cannot be created or listed.
    #[error("log directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading, truncating or creating a segment failed.
    #[error("segment {segment} at offset {offset}: {source}")]
    Io {
        /// The segment file.
        segment: PathBuf,
        /// Where in it.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A segment's name does not match the number of records before it: a segment is missing
    /// or misnamed.
    #[error(
        "segment {segment} should be named for {expected} records before it; is a segment missing?"
    )]
    SegmentBase {
        /// The segment file.
        segment: PathBuf,
        /// Records found in the segments before it.
        expected: u64,
    },
    /// A damaged record that a crash cannot have left (see [`recovery`](super::recovery)): it
    /// is in a segment that is not the last, or good records follow it and it is not a torn
    /// write (no block of zeros under it, or too far from the end). Nothing is truncated; the
    /// log needs an operator (restore, or copy the entries from a peer).
    #[error(
        "segment {segment} at offset {offset} (lsn {lsn}): {damage}, and it is not the torn end of the log{}",
        match next_good { Some(at) => format!(" (a good record follows at offset {at})"), None => String::new() }
    )]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the damaged record.
        offset: u64,
        /// The LSN the record would have.
        lsn: Lsn,
        /// What is wrong.
        damage: RecordDamage,
        /// Offset of a good record after it in the same segment, if any.
        next_good: Option<u64>,
    },
    /// A record with a good checksum whose payload is not a valid entry. A torn write cannot
    /// produce this, so it is never truncated.
    #[error("segment {segment} at offset {offset} (lsn {lsn}): {source}")]
    Decode {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Its LSN.
        lsn: Lsn,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// An entry that does not extend its author's chain as found earlier in the log.
    #[error("segment {segment} at offset {offset} (lsn {lsn}): {source}")]
    Chain {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Its LSN.
        lsn: Lsn,
        /// The cause.
        #[source]
        source: Box<VerifyError>,
    },
}

/// [`LogStore::append`](super::LogStore::append) failed. After any of these but `TooLarge`,
/// `DiskFull` and `BelowReserve`, the store refuses every later append ([`AppendError::Stopped`]): what reached the
/// disk is unknown until the log is reopened and recovered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// A payload over [`MAX_RECORD_BYTES`](kappakv_protocol::limits::MAX_RECORD_BYTES). Nothing
    /// was written.
    #[error("record payload of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing the batch failed.
    #[error("writing {len} bytes to segment {segment} at offset {offset}: {source}")]
    Write {
        /// The segment file.
        segment: PathBuf,
        /// Where the batch starts.
        offset: u64,
        /// Bytes in the batch.
        len: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file system is full (ENOSPC or EDQUOT): writing the batch, or creating the segment
    /// it needed, failed. The segment was cut back to where the batch started, so nothing of
    /// it is in the log, and the store takes appends again.
    #[error(
        "the disk is full: no space to write {len} bytes to segment {segment} at offset {offset} ({source}); nothing of the batch was kept"
    )]
    DiskFull {
        /// The segment file (the one that could not be created, at a rollover).
        segment: PathBuf,
        /// Where the batch would have started.
        offset: u64,
        /// Bytes in the batch.
        len: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The batch would leave less free space on the file system than the store keeps: the
    /// reserve ([`LogStore::set_disk_reserve`](super::LogStore::set_disk_reserve)) and the room
    /// the views need for the log they have not applied yet
    /// ([`LogStore::set_views_room`](super::LogStore::set_views_room)). Nothing was written, and
    /// the store takes appends again. The space is for what the node writes besides the log.
    #[error(
        "the disk is full: {available} bytes are free on the file system of {dir}, and a batch of {len} bytes would leave less than the {reserve} bytes kept free for the indexes and a clean shutdown{}; nothing of the batch was written",
        if *views > 0 { format!(" plus {views} bytes for the indexes to catch up with the log") } else { String::new() }
    )]
    BelowReserve {
        /// The log directory.
        dir: PathBuf,
        /// Bytes free when the batch came.
        available: u64,
        /// The reserve.
        reserve: u64,
        /// The room kept for the views on top of it.
        views: u64,
        /// Bytes in the batch.
        len: usize,
    },
    /// The file system was full while writing the batch, and cutting the segment back to where
    /// the batch started (or syncing the cut) failed as well.
    #[error(
        "the disk is full ({full}), and cutting segment {segment} back to offset {offset} failed: {source}"
    )]
    CutBack {
        /// The segment file.
        segment: PathBuf,
        /// The durable length it was being cut back to.
        offset: u64,
        /// The error of the write.
        full: io::Error,
        /// The error of the cut.
        #[source]
        source: io::Error,
    },
    /// `fdatasync` after the write failed; the batch may or may not be on disk.
    #[error("syncing segment {segment} (batch at offset {offset}): {source}")]
    Sync {
        /// The segment file.
        segment: PathBuf,
        /// Where the batch starts.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the next segment, or syncing it or the directory, failed.
    #[error("creating segment {segment}: {source}")]
    Rollover {
        /// The new segment file.
        segment: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An earlier append failed; the store accepts nothing more until it is reopened.
    #[error("the log store stopped after an earlier write failure; reopen it to recover")]
    Stopped,
}

impl AppendError {
    /// Whether the append was refused for want of space ([`DiskFull`](Self::DiskFull) or
    /// [`BelowReserve`](Self::BelowReserve)): nothing of the batch is in the log, the store takes
    /// appends again, and they succeed once there is space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::DiskFull { .. } | Self::BelowReserve { .. })
    }
}

/// Reading the log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadLogError {
    /// Listing the log directory failed.
    #[error("log directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening or reading a segment failed.
    #[error("segment {segment} at offset {offset}: {source}")]
    Io {
        /// The segment file.
        segment: PathBuf,
        /// Where in it.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record that should be durable is damaged or missing.
    #[error("segment {segment} at offset {offset} (lsn {lsn}): {damage}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// The LSN it should have.
        lsn: Lsn,
        /// What is wrong.
        damage: RecordDamage,
    },
    /// A record whose payload is not a valid entry.
    #[error("segment {segment} at offset {offset} (lsn {lsn}): {source}")]
    Decode {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Its LSN.
        lsn: Lsn,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// No segment holds `lsn`, though the range asked for includes it.
    #[error("no segment holds lsn {lsn} in {dir}")]
    Missing {
        /// The log directory.
        dir: PathBuf,
        /// The LSN.
        lsn: Lsn,
    },
}
