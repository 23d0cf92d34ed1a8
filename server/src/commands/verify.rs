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
use kappakv_protocol::{DecodeError, Lsn, SignedEntry, StateRoot, VerifyError};

use crate::log::file::{FsLogDir, LogDir, OpenMode};
use crate::log::segment::{
    RecordCursor, RecordDamage, Scanned, find_record_after, segment_bases, segment_name,
    zeros_to_end,
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
    /// The key/value view in `indexes.redb` does not hold the state the log gives.
    #[error(
        "the key/value view in indexes.redb has state root {index_root} at lsn {lsn}, but the log gives {log_root} there; `kappakv rebuild-indexes` rebuilds the views from the log"
    )]
    StateMismatch {
        /// Where the view is.
        lsn: Lsn,
        /// The view's root.
        index_root: StateRoot,
        /// The root the log gives.
        log_root: StateRoot,
    },
    /// The key/value view's rows do not give the digest it keeps with them.
    #[error(
        "the key/value view in indexes.redb (at lsn {lsn}) keeps state root {kept}, but its rows give {rows}; `kappakv rebuild-indexes` rebuilds the views from the log"
    )]
    IndexDigest {
        /// Where the view is.
        lsn: Lsn,
        /// The root of its rows.
        rows: StateRoot,
        /// The root it keeps.
        kept: StateRoot,
    },
    /// Replaying the log into a scratch view failed.
    #[error("replaying the log to compute its state: {0}")]
    State(String),
}

/// What replaying the log into a scratch key/value view found ([`check_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCheck {
    /// Entries replayed: the whole log.
    pub lsn: Lsn,
    /// The state root the log gives.
    pub root: StateRoot,
    /// How the node's own key/value view compares.
    pub index: IndexAgreement,
}

/// How the key/value view in `indexes.redb` compares with the state the log gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexAgreement {
    /// Its state root equals the log's at the LSN it has applied.
    Agrees {
        /// The view's applied LSN.
        lsn: Lsn,
    },
    /// There is no `indexes.redb` (a start rebuilds it).
    Absent,
    /// It could not be opened, such as while a node runs on the data dir.
    NotOpened(String),
}

impl fmt::Display for StateCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state root {} at lsn {}; ", self.root, self.lsn)?;
        match &self.index {
            IndexAgreement::Agrees { lsn } => {
                write!(f, "the key/value view agrees at lsn {lsn}")
            }
            IndexAgreement::Absent => write!(f, "no indexes.redb to compare"),
            IndexAgreement::NotOpened(why) => {
                write!(f, "indexes.redb not compared ({why})")
            }
        }
    }
}

/// Entries replayed into the scratch view per transaction.
const STATE_BATCH: usize = 100_000;
/// The scratch view's file, in the data dir, removed when the check ends.
const STATE_SCRATCH: &str = "verify-state.redb";

/// Replays the log of `data_dir` into a scratch key/value view, computing the state root it
/// gives, and compares it with the node's own key/value view (`indexes.redb`) at the LSN that
/// view has applied. `progress` is told the entries replayed of the log's. Run it after
/// [`run`]: it trusts that the log verifies.
pub fn check_state(
    data_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StateCheck, VerifyLogError> {
    use kappakv_indexes::views::KvView;
    use kappakv_indexes::{Indexes, Snapshot};

    let fail = |e: &dyn fmt::Display| VerifyLogError::State(e.to_string());
    let index = match Snapshot::open_read_only(&data_dir.join("indexes.redb")) {
        Ok(Some(snapshot)) => {
            let lsn = snapshot.kv_applied_lsn().map_err(|e| fail(&e))?;
            let root = snapshot.state_digest().map_err(|e| fail(&e))?.root();
            let rows = snapshot
                .state_digest_of_rows()
                .map_err(|e| fail(&e))?
                .root();
            if rows != root {
                return Err(VerifyLogError::IndexDigest {
                    lsn,
                    rows,
                    kept: root,
                });
            }
            Ok((lsn, root))
        }
        Ok(None) => Err(IndexAgreement::Absent),
        Err(e) => Err(IndexAgreement::NotOpened(e.to_string())),
    };
    let reader =
        crate::log::LogReader::open(&crate::log::log_dir(data_dir)).map_err(|e| fail(&e))?;
    let end = reader.last_lsn().map_err(|e| fail(&e))?;
    let scratch_path = data_dir.join(STATE_SCRATCH);
    let _ = std::fs::remove_file(&scratch_path);
    let result = (|| {
        let (scratch, _) =
            Indexes::open(&scratch_path, vec![Box::new(KvView)]).map_err(|e| fail(&e))?;
        let mut agreement = index.clone().err();
        let mut at = 0;
        let mut batch: Vec<(Lsn, SignedEntry)> = Vec::with_capacity(STATE_BATCH.min(end as usize));
        let compare_at = index.as_ref().ok().map(|(lsn, _)| *lsn);
        let mut entries = reader.iter(0, end).map_err(|e| fail(&e))?;
        loop {
            let next = entries.next().transpose().map_err(|e| fail(&e))?;
            let done = next.is_none();
            if let Some((lsn, entry)) = next {
                batch.push((lsn, entry));
            }
            let last = batch.last().map(|(lsn, _)| *lsn);
            let flush = done || batch.len() >= STATE_BATCH || last == compare_at;
            if flush && !batch.is_empty() {
                let refs: Vec<(Lsn, &SignedEntry)> = batch.iter().map(|(l, e)| (*l, e)).collect();
                scratch.apply(&refs, false).map_err(|e| fail(&e))?;
                at = last.unwrap_or(at);
                batch.clear();
                progress(at, end);
            }
            if let Ok((lsn, index_root)) = &index
                && at == *lsn
                && agreement.is_none()
            {
                let log_root = scratch
                    .snapshot()
                    .and_then(|s| s.state_digest())
                    .map_err(|e| fail(&e))?
                    .root();
                if log_root != *index_root {
                    return Err(VerifyLogError::StateMismatch {
                        lsn: *lsn,
                        index_root: *index_root,
                        log_root,
                    });
                }
                agreement = Some(IndexAgreement::Agrees { lsn: *lsn });
            }
            if done {
                break;
            }
        }
        let root = scratch
            .snapshot()
            .and_then(|s| s.state_digest())
            .map_err(|e| fail(&e))?
            .root();
        let index = agreement.unwrap_or_else(|| {
            IndexAgreement::NotOpened(format!(
                "its key/value view is at lsn {}, past the log's end at {end}",
                index.as_ref().map_or(0, |(lsn, _)| *lsn)
            ))
        });
        Ok(StateCheck {
            lsn: end,
            root,
            index,
        })
    })();
    let _ = std::fs::remove_file(&scratch_path);
    result
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
                Scanned::Damaged { offset, .. }
                    if index + 1 == bases.len()
                        && zeros_to_end(file.as_ref(), offset)
                            .map_err(|e| io_err(offset, e))? =>
                {
                    // Zeros written ahead of the last record: the end of the log.
                    break;
                }
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
