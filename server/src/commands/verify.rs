//! `kappakv verify`: checks the whole log, read-only.
//!
//! Every segment is read in order; every record's checksum is checked, every entry is decoded
//! (and must be in canonical form), every `prev` link and `seq` is checked, every signature
//! present is verified, and at the end each author's chain must end at a signed entry. Nothing
//! is truncated or repaired, a torn tail included: `kappakv serve` truncates that on start.
//!
//! The CLI (`kappakv verify [--data-dir D]`) prints the [`VerifySummary`] on one line on
//! standard output and exits 0, or prints `error: ` and the [`VerifyLogError`] (which names the
//! segment file, byte offset, LSN, and author and seq where they apply) on standard error and
//! exits non-zero.

use std::fmt;
use std::path::{Path, PathBuf};

use kappakv_protocol::verify::ChainChecker;
use kappakv_protocol::{DecodeError, Lsn, SignedEntry, VerifyError};

use crate::log::file::{FsLogDir, LogDir, OpenMode};
use crate::log::segment::{
    RecordCursor, RecordDamage, Scanned, find_record_after, segment_bases, segment_name,
};

/// What a successful verify found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifySummary {
    /// Entries (records) in the log.
    pub entries: u64,
    /// Distinct authors.
    pub authors: usize,
    /// Bytes of log data.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "log ok: {} entries from {} authors, {} bytes in {} segments; checksums, links and signatures verified",
            self.entries, self.authors, self.bytes, self.segments
        )
    }
}

/// The log does not verify, or cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyLogError {
    /// The log directory cannot be listed.
    #[error("log directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The log directory holds no segment.
    #[error("log directory {path} holds no segment files")]
    Empty {
        /// The directory.
        path: PathBuf,
    },
    /// Reading a segment failed.
    #[error("segment {segment} at offset {offset}: {source}")]
    Io {
        /// The segment file.
        segment: PathBuf,
        /// Where in it.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A segment is missing or misnamed.
    #[error(
        "segment {segment} should be named for {expected} records before it; is a segment missing?"
    )]
    SegmentBase {
        /// The segment file.
        segment: PathBuf,
        /// Records found before it.
        expected: u64,
    },
    /// A damaged record in the middle of the log.
    #[error("segment {segment} at offset {offset} (lsn {lsn}): {damage}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Offset of the damaged record.
        offset: u64,
        /// The LSN it would have.
        lsn: Lsn,
        /// What is wrong.
        damage: RecordDamage,
    },
    /// A torn tail: the last segment ends in a damaged record with nothing whole after it.
    /// `kappakv serve` truncates it when it opens the log.
    #[error(
        "segment {segment} at offset {offset} (lsn {lsn}): {damage}; this is a torn tail, which `kappakv serve` truncates when it starts"
    )]
    TornTail {
        /// The last segment file.
        segment: PathBuf,
        /// Offset of the damaged record.
        offset: u64,
        /// The LSN it would have.
        lsn: Lsn,
        /// What is wrong.
        damage: RecordDamage,
    },
    /// A record whose payload is not a canonical, valid entry.
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
    /// An entry that breaks its author's chain, or whose signature does not verify. The
    /// [`VerifyError`] names the author and seq.
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
    /// An author's chain ends with entries no signature covers.
    #[error("end of the log: {0}")]
    Unsigned(#[source] Box<VerifyError>),
}

/// Verifies the log in `DATA_DIR/log`. Reads only.
pub fn run(data_dir: &Path) -> Result<VerifySummary, VerifyLogError> {
    run_in(&FsLogDir::new(crate::log::log_dir(data_dir)))
}

/// Verifies the log of `data_dir` like [`run`], telling `progress` the bytes checked so far out
/// of the log's size after every segment and every few megabytes.
pub fn run_observed(
    data_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifySummary, VerifyLogError> {
    run_in_observed(&FsLogDir::new(crate::log::log_dir(data_dir)), progress)
}

/// Verifies the log in `dir`. Reads only.
pub fn run_in(dir: &dyn LogDir) -> Result<VerifySummary, VerifyLogError> {
    run_in_observed(dir, &mut |_, _| {})
}

/// Bytes between two calls of a progress callback.
const PROGRESS_EVERY_BYTES: u64 = 4 * 1024 * 1024;

fn run_in_observed(
    dir: &dyn LogDir,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifySummary, VerifyLogError> {
    let path = dir.path().to_path_buf();
    let names = dir.list().map_err(|source| VerifyLogError::Dir {
        path: path.clone(),
        source,
    })?;
    let bases = segment_bases(&names);
    if bases.is_empty() {
        return Err(VerifyLogError::Empty { path });
    }
    let mut checker = ChainChecker::default();
    let mut summary = VerifySummary {
        segments: bases.len(),
        ..VerifySummary::default()
    };
    // The log's size, for progress only: a segment that cannot be opened fails below.
    let total: u64 = bases
        .iter()
        .filter_map(|&base| dir.open(&segment_name(base), OpenMode::Read).ok())
        .filter_map(|f| f.len().ok())
        .sum();
    let mut reported = 0;
    for (index, &base) in bases.iter().enumerate() {
        let name = segment_name(base);
        let segment = path.join(&name);
        if base != summary.entries {
            return Err(VerifyLogError::SegmentBase {
                segment,
                expected: summary.entries,
            });
        }
        let io_err = |offset, source| VerifyLogError::Io {
            segment: segment.clone(),
            offset,
            source,
        };
        let file = dir.open(&name, OpenMode::Read).map_err(|e| io_err(0, e))?;
        let mut cursor = RecordCursor::new(0);
        loop {
            let at = cursor.offset();
            let lsn = summary.entries + 1;
            match cursor.next(file.as_ref()).map_err(|e| io_err(at, e))? {
                Scanned::Record { offset, payload } => {
                    let e = SignedEntry::decode_payload(payload).map_err(|source| {
                        VerifyLogError::Decode {
                            segment: segment.clone(),
                            offset,
                            lsn,
                            source,
                        }
                    })?;
                    checker.push(&e).map_err(|source| VerifyLogError::Chain {
                        segment: segment.clone(),
                        offset,
                        lsn,
                        source: Box::new(source),
                    })?;
                    summary.entries = lsn;
                    let done = summary.bytes + cursor.offset();
                    if done >= reported + PROGRESS_EVERY_BYTES {
                        reported = done;
                        progress(done, total);
                    }
                }
                Scanned::End => break,
                Scanned::Damaged { offset, damage } => {
                    let last = index + 1 == bases.len();
                    let torn = last
                        && find_record_after(file.as_ref(), offset)
                            .map_err(|e| io_err(offset, e))?
                            .is_none();
                    return Err(if torn {
                        VerifyLogError::TornTail {
                            segment,
                            offset,
                            lsn,
                            damage,
                        }
                    } else {
                        VerifyLogError::Corrupt {
                            segment,
                            offset,
                            lsn,
                            damage,
                        }
                    });
                }
            }
        }
        summary.bytes += cursor.offset();
        progress(summary.bytes, total);
    }
    checker
        .finish()
        .map_err(|e| VerifyLogError::Unsigned(Box::new(e)))?;
    summary.authors = checker.authors();
    Ok(summary)
}
