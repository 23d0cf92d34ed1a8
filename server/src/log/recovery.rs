//! Opening the log: scan every segment, check every record, and recover the tail of the last
//! segment.
//!
//! # What the tail is
//!
//! Scanning a segment from its start, the first position that does not hold a whole record with
//! a good checksum is the *damaged position*. It is the **torn tail** exactly when
//! 1. the segment is the last one, and
//! 2. no byte offset after the damaged position, up to the end of the file, starts a record with a
//!    good checksum.
//!
//! A torn tail is what a crash during the last batch's write leaves; nothing there was
//! acknowledged, because a batch is acknowledged only after its `fdatasync`. It is truncated.
//! Any other damaged position is corruption of data that may have been acknowledged, and opening
//! fails with the segment and offset. The check errs on the side of refusing: if the torn
//! record's own payload happens to contain the bytes of a whole record (a value holding an
//! exported log, say), opening refuses rather than guess.
//!
//! # Signed-consistent end
//!
//! Every batch the writer appends leaves each author's chain ending at a signed entry: the
//! writer signs the last local entry of each batch, and accepts remote runs only when they end
//! at a signed entry. So a completed batch always ends at a *consistent point*: a record
//! boundary where every author with entries in the last segment has its last one signed. The
//! segment start is one too, since the segment was created after every earlier batch was synced.
//! Whole records after the last consistent point belong to a batch whose `fdatasync` never
//! completed; they are truncated as well, so that no chain ends unsigned.

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kappakv_protocol::verify::{ChainHead, check_link};
use kappakv_protocol::{Lsn, NodeId, SignedEntry, Timestamp};

use super::error::OpenLogError;
use super::file::{LogDir, LogFile, OpenMode};
use super::segment::{
    RecordCursor, RecordDamage, Scanned, find_record_after, parse_segment_name, segment_bases,
    segment_name,
};

/// What opening the log found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The head of each author's chain: the version vector of the log.
    pub heads: HashMap<NodeId, ChainHead>,
    /// LSN of the last record (0 for an empty log).
    pub last_lsn: Lsn,
    /// The greatest entry timestamp in the log.
    pub max_timestamp: Timestamp,
    /// Number of segment files.
    pub segments: usize,
    /// Bytes of log data kept, over all segments.
    pub bytes: u64,
    /// What was cut off the end of the last segment, if anything.
    pub truncated: Option<Truncation>,
}

/// What recovery cut off the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub segment: PathBuf,
    /// Its length before.
    pub old_len: u64,
    /// Its length after.
    pub new_len: u64,
    /// The damaged position of a torn tail, and what was wrong there.
    pub torn: Option<(u64, RecordDamage)>,
    /// Whole records dropped because they followed the last signed-consistent point.
    pub unsigned_records: u64,
}

/// The state of the last segment after recovery, ready for appends.
pub(crate) struct Recovered {
    pub(crate) active: Box<dyn LogFile>,
    pub(crate) active_base: u64,
    pub(crate) active_len: u64,
}

/// Scans and recovers the log in `dir`, creating its first segment if it has none.
pub(crate) fn recover(dir: &dyn LogDir) -> Result<(Recovered, Recovery), OpenLogError> {
    let path = dir.path().to_path_buf();
    let names = dir.list().map_err(|source| OpenLogError::Dir {
        path: path.clone(),
        source,
    })?;
    let bases = segment_bases(&names);
    for name in names
        .iter()
        .filter(|n| parse_segment_name(n).is_none() && n.as_str() != super::LOCK_FILE_NAME)
    {
        tracing::warn!(dir = %path.display(), file = %name, "ignoring a file that is not a log segment");
    }
    if bases.is_empty() {
        let name = segment_name(0);
        let io_err = |source| OpenLogError::Io {
            segment: path.join(segment_name(0)),
            offset: 0,
            source,
        };
        let mut file = dir.open(&name, OpenMode::CreateNew).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        dir.sync().map_err(io_err)?;
        let recovered = Recovered {
            active: file,
            active_base: 0,
            active_len: 0,
        };
        return Ok((
            recovered,
            Recovery {
                segments: 1,
                ..Recovery::default()
            },
        ));
    }

    let mut recovery = Recovery {
        segments: bases.len(),
        ..Recovery::default()
    };
    let mut active = None;
    for (index, &base) in bases.iter().enumerate() {
        let name = segment_name(base);
        let segment = path.join(&name);
        if base != recovery.last_lsn {
            return Err(OpenLogError::SegmentBase {
                segment,
                expected: recovery.last_lsn,
            });
        }
        let last = index + 1 == bases.len();
        let mode = if last {
            OpenMode::ReadWrite
        } else {
            OpenMode::Read
        };
        let file = dir.open(&name, mode).map_err(|source| OpenLogError::Io {
            segment: segment.clone(),
            offset: 0,
            source,
        })?;
        let len = scan_segment(file.as_ref(), &segment, base, last, &mut recovery)?;
        recovery.bytes += len;
        if last {
            active = Some(Recovered {
                active: file,
                active_base: base,
                active_len: len,
            });
        }
    }
    let mut recovered = active.expect("the last segment was scanned");
    if let Some(t) = &recovery.truncated {
        assert_eq!(t.new_len, recovered.active_len);
        let io_err = |source| OpenLogError::Io {
            segment: t.segment.clone(),
            offset: t.new_len,
            source,
        };
        recovered.active.set_len(t.new_len).map_err(io_err)?;
        recovered.active.sync_all().map_err(io_err)?;
    }
    Ok((recovered, recovery))
}

/// Scans one segment, checking every record and link and updating `recovery`. In the last
/// segment, works out the truncation (without doing it) and returns the length to keep.
fn scan_segment(
    file: &dyn LogFile,
    segment: &Path,
    base: u64,
    last: bool,
    recovery: &mut Recovery,
) -> Result<u64, OpenLogError> {
    let io_err = |offset, source| OpenLogError::Io {
        segment: segment.to_path_buf(),
        offset,
        source,
    };
    let mut cursor = RecordCursor::new(0);
    let mut lsn = base;
    // Authors whose last entry in this segment is unsigned.
    let mut unsigned: HashSet<NodeId> = HashSet::new();
    // Heads as they were before each change since the last consistent point, to undo them.
    let mut undo: Vec<(NodeId, Option<ChainHead>)> = Vec::new();
    let mut consistent = (0u64, base);
    let torn = loop {
        let offset = cursor.offset();
        match cursor.next(file).map_err(|e| io_err(offset, e))? {
            Scanned::Record { offset, payload } => {
                lsn += 1;
                let e = SignedEntry::decode_payload(payload).map_err(|source| {
                    OpenLogError::Decode {
                        segment: segment.to_path_buf(),
                        offset,
                        lsn,
                        source,
                    }
                })?;
                let author = e.entry.author;
                let head = recovery.heads.get(&author);
                check_link(head, &e.entry).map_err(|source| OpenLogError::Chain {
                    segment: segment.to_path_buf(),
                    offset,
                    lsn,
                    source: Box::new(source),
                })?;
                if last {
                    undo.push((author, head.copied()));
                    if e.signature.is_some() {
                        unsigned.remove(&author);
                    } else {
                        unsigned.insert(author);
                    }
                }
                recovery.heads.insert(
                    author,
                    ChainHead {
                        seq: e.entry.seq,
                        id: e.id,
                    },
                );
                recovery.max_timestamp = recovery.max_timestamp.max(e.entry.timestamp);
                if last && unsigned.is_empty() {
                    consistent = (cursor.offset(), lsn);
                    undo.clear();
                }
            }
            Scanned::End => break None,
            Scanned::Damaged { offset, damage } => {
                let next_good = if last {
                    find_record_after(file, offset).map_err(|e| io_err(offset, e))?
                } else {
                    None
                };
                if !last || next_good.is_some() {
                    return Err(OpenLogError::Corrupt {
                        segment: segment.to_path_buf(),
                        offset,
                        lsn: lsn + 1,
                        damage,
                        next_good,
                    });
                }
                break Some((offset, damage));
            }
        }
    };
    let end = cursor.offset();
    if !last {
        recovery.last_lsn = lsn;
        return Ok(end);
    }
    let old_len = file.len().map_err(|e| io_err(end, e))?;
    let (keep, keep_lsn) = consistent;
    for (author, head) in undo.into_iter().rev() {
        match head {
            Some(h) => recovery.heads.insert(author, h),
            None => recovery.heads.remove(&author),
        };
    }
    recovery.last_lsn = keep_lsn;
    if keep < old_len {
        let unsigned_records = lsn - keep_lsn;
        if let Some((offset, damage)) = &torn {
            tracing::warn!(segment = %segment.display(), offset, %damage, "truncating the torn tail of the log");
        }
        if unsigned_records > 0 {
            tracing::warn!(
                segment = %segment.display(),
                offset = keep,
                records = unsigned_records,
                "truncating records after the last point where every chain ends signed"
            );
        }
        recovery.truncated = Some(Truncation {
            segment: segment.to_path_buf(),
            old_len,
            new_len: keep,
            torn,
            unsigned_records,
        });
    } else {
        assert!(
            torn.is_none() && keep == end,
            "a torn tail lies before the end of the file"
        );
    }
    Ok(keep)
}
