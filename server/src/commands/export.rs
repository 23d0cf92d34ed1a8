//! `kappakv export`: writes log entries to a file, for offline sync with `kappakv import`.
//!
//! # File format
//!
//! An export is a sequence of log records, byte for byte the log's own format:
//! `u32 length LE | u32 crc32c LE | payload`, where the payload is
//! [`SignedEntry::encode_payload`] (the entry's canonical bytes and its signature or nil). The
//! records follow the log's order, so every author's entries ascend by seq. There is no header,
//! so concatenated exports are one valid export, and an export is readable by the same record
//! cursor as a segment.
//!
//! # What is exported
//!
//! Every entry of the log, or with a version vector (`--since`), only the entries whose seq is
//! above the vector's seq for their author. Each author's exported chain ends at a signed entry:
//! the export stops at the last record boundary where every author's last exported entry
//! carries a signature (a *consistent point*). Every batch the writer completes ends at one,
//! so what is left out is only a batch being written at that moment.
//!
//! # Next to a running node
//!
//! The export only reads, through [`LogReader`], and never takes a record the node has not
//! acknowledged as durable ([`live::bound`]): with the log's lock free, it holds the lock while
//! it reads and takes every whole record; with the lock held by `kappakv serve`, it asks that
//! node for its durable LSN and reads no further, failing if the node does not answer. Records
//! past the durable LSN may still be cut back out of the log (a full disk) and their seqs given
//! to other entries, so taking them could export an equivocation of the node's own log.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kappakv_protocol::record::encode_record;
use kappakv_protocol::{Lsn, NodeId, SignedEntry};

use super::live::{self, BoundError};
use crate::log::{LogReader, ReadLogError};

/// Author → highest seq the receiving side already has.
pub type VersionVector = HashMap<NodeId, u64>;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportSummary {
    /// Entries written.
    pub entries: u64,
    /// Distinct authors among them.
    pub authors: usize,
    /// Bytes written.
    pub bytes: u64,
    /// The LSN of the last log record the export covers.
    pub through_lsn: Lsn,
    /// Entries of the log after `through_lsn` that were left out because their chains did not
    /// end at a signed entry yet (a batch being written).
    pub held_back: u64,
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exported {} entries from {} authors, {} bytes (log through lsn {})",
            self.entries, self.authors, self.bytes, self.through_lsn
        )?;
        if self.held_back > 0 {
            write!(
                f,
                "; left out {} later entries not yet covered by a signature",
                self.held_back
            )?;
        }
        Ok(())
    }
}

/// The export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The data dir holds no log.
    #[error("no log in {data_dir}: is that a kappakv data dir? (pass --data-dir)")]
    NoLog {
        /// The data dir.
        data_dir: PathBuf,
    },
    /// Reading the log failed.
    #[error("reading the log: {0}")]
    Read(#[from] ReadLogError),
    /// How far the log is durable could not be found out (see [`live`]).
    #[error(transparent)]
    Bound(#[from] BoundError),
    /// The version vector file cannot be read or does not hold a version vector.
    #[error("version vector {path}: {reason}")]
    Since {
        /// The file.
        path: PathBuf,
        /// What is wrong, in one line.
        reason: String,
    },
    /// Writing the output failed.
    #[error("writing {to}: {source}")]
    Write {
        /// The output file, or "standard output".
        to: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Reads a version vector from a JSON file: either `{"NODEID": seq, ...}`, or any object with
/// such a `version_vector` field (the output of `kappactl status --json`).
pub fn read_version_vector(path: &Path) -> Result<VersionVector, ExportError> {
    let since_err = |reason: String| ExportError::Since {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| since_err(e.to_string()))?;
    parse_version_vector(&text).map_err(since_err)
}

/// Parses a version vector from JSON text (see [`read_version_vector`]); the error is one line.
pub fn parse_version_vector(text: &str) -> Result<VersionVector, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let object = match value.get("version_vector") {
        Some(inner) => inner,
        None => &value,
    };
    let object = object.as_object().ok_or_else(|| {
        "expected a JSON object {\"NODEID\": seq, ...} or one with a \"version_vector\" field"
            .to_string()
    })?;
    let mut vv = VersionVector::with_capacity(object.len());
    for (key, seq) in object {
        let author: NodeId = key
            .parse()
            .map_err(|e| format!("key {key:?} is not a node id: {e}"))?;
        let seq = seq
            .as_u64()
            .ok_or_else(|| format!("seq of {key} is not a non-negative integer: {seq}"))?;
        vv.insert(author, seq);
    }
    Ok(vv)
}

/// Exports the log of the data dir `data_dir` to `out`: every entry, or those above `since`,
/// up to what is durable (see the module docs). `to` names the output in errors. `out` is
/// flushed but not synced.
pub fn run(
    data_dir: &Path,
    since: Option<&VersionVector>,
    out: &mut dyn Write,
    to: &str,
) -> Result<ExportSummary, ExportError> {
    run_observed(data_dir, since, out, to, &mut |_, _| {})
}

/// Exports like [`run`], telling `progress` the entries read so far out of those to read.
pub fn run_observed(
    data_dir: &Path,
    since: Option<&VersionVector>,
    out: &mut dyn Write,
    to: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary, ExportError> {
    let log_dir = crate::log::log_dir(data_dir);
    if !log_dir.is_dir() {
        return Err(ExportError::NoLog {
            data_dir: data_dir.to_path_buf(),
        });
    }
    // Held until the export is written: while the lock is ours, nobody appends.
    let bound = live::bound(data_dir)?;
    let reader = LogReader::open(&log_dir)?;
    let on_disk = reader.last_lsn()?;
    bound.check_on_disk(&log_dir, on_disk)?;
    let upto = bound.durable_lsn().unwrap_or(on_disk);
    export_log(&reader, upto, since, out, to, progress)
}

/// Exports the entries of `reader` up to `upto`, which must be durable (see [`run`]), telling
/// `progress` the entries read.
fn export_log(
    reader: &LogReader,
    upto: Lsn,
    since: Option<&VersionVector>,
    out: &mut dyn Write,
    to: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary, ExportError> {
    let write_err = |source| ExportError::Write {
        to: to.to_string(),
        source,
    };
    let mut cut = ConsistentCut::default();
    let mut summary = ExportSummary::default();
    let mut authors = HashSet::new();
    for item in reader.iter(0, upto)? {
        let (lsn, e) = item?;
        if lsn % PROGRESS_EVERY == 0 {
            progress(lsn, upto);
        }
        let wanted =
            since.is_none_or(|vv| e.entry.seq > vv.get(&e.entry.author).copied().unwrap_or(0));
        if wanted {
            cut.push(&e);
        }
        if cut.is_consistent() {
            summary.through_lsn = lsn;
            if !cut.pending.is_empty() {
                out.write_all(&cut.pending).map_err(write_err)?;
                summary.entries += cut.pending_entries;
                summary.bytes += cut.pending.len() as u64;
                authors.extend(cut.pending_authors.drain());
                cut.pending.clear();
                cut.pending_entries = 0;
            }
        }
    }
    out.flush().map_err(write_err)?;
    progress(upto, upto);
    summary.authors = authors.len();
    summary.held_back = cut.pending_entries;
    Ok(summary)
}

/// Entries between two calls of a progress callback.
const PROGRESS_EVERY: Lsn = 4096;

/// The records since the last consistent point, and which authors' exported chains end
/// unsigned.
#[derive(Default)]
struct ConsistentCut {
    /// Encoded records after the last consistent point.
    pending: Vec<u8>,
    pending_entries: u64,
    pending_authors: HashSet<NodeId>,
    /// Authors whose last exported entry has no signature.
    unsigned: HashSet<NodeId>,
}

impl ConsistentCut {
    fn push(&mut self, e: &SignedEntry) {
        encode_record(&e.encode_payload(), &mut self.pending);
        self.pending_entries += 1;
        self.pending_authors.insert(e.entry.author);
        if e.signature.is_some() {
            self.unsigned.remove(&e.entry.author);
        } else {
            self.unsigned.insert(e.entry.author);
        }
    }

    fn is_consistent(&self) -> bool {
        self.unsigned.is_empty()
    }
}
