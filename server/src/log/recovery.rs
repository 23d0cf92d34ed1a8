//! Opening the log: scan every segment, check every record, and recover the tail of the last
//! segment.
//!
//! # What a crash leaves
//!
//! The writer appends each batch with one write and one `fdatasync`, and acknowledges it only
//! after the `fdatasync`; a batch never spans two segments. The last segment may end in zeros
//! that the store wrote ahead of its records and synced (`LogConfig::preallocate_bytes`): zeros
//! from a position to the end of the file are the end of the log, not damage, and are kept for
//! the next appends; a later batch written over them reads as zeros where it did not reach the
//! disk, as a write extending the file would. So a crash can damage only the last
//! write, at the end of the last segment, and nothing in it was acknowledged. It can leave that
//! write cut short (the file ends inside it) or with *holes*: the file system may have persisted
//! later blocks of the write but not earlier ones, and a block the write never reached reads as
//! zeros, because the write extended the file. Bytes that were synced never read back changed.
//!
//! # What the tail is
//!
//! Scanning a segment from its start, the first position that does not hold a whole record with
//! a good checksum is the *damaged position*. It is cut off, with everything after it, exactly
//! when the segment is the last one and either
//! 1. **torn tail**: no byte offset after the damaged position, up to the end of the file, starts
//!    a record with a good checksum; or
//! 2. **torn write**: good records follow, but the damaged record lies on a hole and within one
//!    write of the end: the bytes its header claims (the header, and as many payload bytes as its
//!    length field says) overlap a whole [`TORN_WRITE_BLOCK_BYTES`]-aligned block of zeros, and
//!    from the damaged position to the end of the file is at most [`TORN_WRITE_BYTES_MAX`]
//!    bytes, the most one batch write spans. A hole explains the damage: it changed bytes of
//!    the record to zeros, and a hole in the length field makes the length zero or smaller, so
//!    the bytes the header claims still overlap it. A length over the limit, or one running past
//!    the end of the file, is not a hole's doing.
//!
//! Why this keeps every acknowledged record: a torn tail is what a write cut short leaves. A hole
//! can only be in the last write, since synced blocks never read back as zeros, so a record on
//! a hole is in the last write, and so is everything after it up to the end of the file, which
//! that write extended. Any other damaged position (non-zero garbage with good records after
//! it, a hole further from the end than one write spans, damage in an earlier segment) is
//! corruption of bytes that were synced and may have been acknowledged, and opening fails with
//! the segment and offset. The check errs on the side of refusing: if the torn record's own
//! payload happens to contain the bytes of a whole record (a value holding an exported log, say),
//! or the file system leaves holes smaller than a block, opening refuses rather than guess. What
//! it cannot tell from a crash is a failing disk that zeroes a block within one write's span of
//! the end of the log, or damages the last record: those are cut as a crash would have left them.
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
use std::io;
use std::path::{Path, PathBuf};

use kappakv_protocol::FramingError;
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::record::RECORD_HEADER_LEN;
use kappakv_protocol::verify::{ChainHead, check_link};
use kappakv_protocol::{Lsn, NodeId, SignedEntry, Timestamp};

use super::error::OpenLogError;
use super::file::{LogDir, LogFile, OpenMode};
use super::segment::{
    RecordCursor, RecordDamage, Scanned, find_record_after, parse_segment_name, segment_bases,
    segment_name, zeros_to_end,
};

/// The unit in which a crash leaves a write's bytes unwritten: a file-system block, 4 KiB on
/// ext4 and XFS by default (and the page the kernel writes back on x86-64). A block of a write
/// that extended the file reads as zeros until the file system has written it, so a hole is
/// whole blocks of zeros. A file system with smaller blocks can leave smaller holes; those are
/// refused like other damage.
pub const TORN_WRITE_BLOCK_BYTES: u64 = 4096;

/// The most bytes one batch write spans at the node's default settings, and so the furthest
/// from the end of the last segment that a damaged record on a hole is taken for a torn write.
/// A batch stops taking commands once their keys and values reach `batch_bytes_max` (16 MiB by
/// default in the node's config), so it holds at most that plus one more command: one local
/// entry, or the entries of one received frame, at most [`MAX_FRAME_BYTES`]. Its records add
/// their headers, ids, links, timestamps, signatures and supersede lists to the keys and values;
/// the bound allows as many bytes again for those. A larger write (`batch_bytes_max` raised, or
/// entries that are mostly supersede lists) torn further than this from its end is refused like
/// other damage: a bound too small only ever refuses, it never cuts. The zeros a store writes
/// ahead of its records ([`super::LogConfig::preallocate_bytes`], at their default size) may
/// follow the write, and are added.
pub const TORN_WRITE_BYTES_MAX: u64 =
    2 * (16 * 1024 * 1024 + MAX_FRAME_BYTES as u64) + super::DEFAULT_PREALLOCATE_BYTES;

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
    /// The damaged position of a torn tail or a torn write, and what was wrong there.
    pub torn: Option<(u64, RecordDamage)>,
    /// How the damaged position was found to be a torn write, when good records followed it.
    pub torn_write: Option<TornWrite>,
    /// Whole records dropped because they followed the last signed-consistent point (all
    /// before the damaged position, if there is one).
    pub unsigned_records: u64,
}

/// A torn write that recovery cut although good records followed its damaged position (see the
/// module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// Offset of the first block of zeros that the damaged record overlaps: a hole.
    pub hole: u64,
    /// Offset of the first record with a good checksum after the damaged position.
    pub next_good: u64,
    /// Records with good checksums from `next_good` on, up to the next damage or the end of the
    /// file: parts of the torn write that reached the disk, cut with the rest of it.
    pub records_after: u64,
}

/// The state of the last segment after recovery, ready for appends.
pub(crate) struct Recovered {
    pub(crate) active: Box<dyn LogFile>,
    pub(crate) active_base: u64,
    pub(crate) active_len: u64,
    /// Its length: `active_len` and any zeros written ahead of its records, kept for the next
    /// appends.
    pub(crate) allocated: u64,
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
            allocated: 0,
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
        let (len, allocated) = scan_segment(file.as_ref(), &segment, base, last, &mut recovery)?;
        recovery.bytes += len;
        if last {
            active = Some(Recovered {
                active: file,
                active_base: base,
                active_len: len,
                allocated,
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
/// segment, works out the truncation (without doing it). Returns the length of the records to
/// keep, and of the file to keep: more when the records are followed by zeros written ahead of
/// them (the end of the log, kept for later appends) and nothing is truncated.
fn scan_segment(
    file: &dyn LogFile,
    segment: &Path,
    base: u64,
    last: bool,
    recovery: &mut Recovery,
) -> Result<(u64, u64), OpenLogError> {
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
    // Whether the records end where zeros written ahead of them begin.
    let mut zero_tail = false;
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
            Scanned::Damaged { offset, .. }
                if last && zeros_to_end(file, offset).map_err(|e| io_err(offset, e))? =>
            {
                zero_tail = true;
                break None;
            }
            Scanned::Damaged { offset, damage } => {
                let next_good = if last {
                    find_record_after(file, offset).map_err(|e| io_err(offset, e))?
                } else {
                    None
                };
                let hole = match next_good {
                    Some(_) => {
                        torn_write_hole(file, offset, &damage).map_err(|e| io_err(offset, e))?
                    }
                    None => None,
                };
                if !last || (next_good.is_some() && hole.is_none()) {
                    return Err(OpenLogError::Corrupt {
                        segment: segment.to_path_buf(),
                        offset,
                        lsn: lsn + 1,
                        damage,
                        next_good,
                    });
                }
                let torn_write = match (hole, next_good) {
                    (Some(hole), Some(next_good)) => Some(TornWrite {
                        hole,
                        next_good,
                        records_after: count_records(file, next_good)
                            .map_err(|e| io_err(next_good, e))?,
                    }),
                    _ => None,
                };
                break Some((offset, damage, torn_write));
            }
        }
    };
    let end = cursor.offset();
    if !last {
        recovery.last_lsn = lsn;
        return Ok((end, end));
    }
    let old_len = file.len().map_err(|e| io_err(end, e))?;
    let data_end = if zero_tail { end } else { old_len };
    let (keep, keep_lsn) = consistent;
    for (author, head) in undo.into_iter().rev() {
        match head {
            Some(h) => recovery.heads.insert(author, h),
            None => recovery.heads.remove(&author),
        };
    }
    recovery.last_lsn = keep_lsn;
    if keep < data_end {
        let unsigned_records = lsn - keep_lsn;
        let (torn, torn_write) = match torn {
            Some((offset, damage, torn_write)) => (Some((offset, damage)), torn_write),
            None => (None, None),
        };
        match (&torn, &torn_write) {
            (Some((offset, damage)), Some(w)) => tracing::warn!(
                segment = %segment.display(),
                offset,
                %damage,
                hole = w.hole,
                next_good = w.next_good,
                cut_from = keep,
                cut_to = old_len,
                bytes = old_len - keep,
                records = unsigned_records + w.records_after,
                "truncating a torn write at the end of the log: the damaged record lies on a block \
                 of zeros that its batch's write never reached, so that batch never completed its \
                 fdatasync and was not acknowledged; its records after the hole are cut with it"
            ),
            (Some((offset, damage)), None) => tracing::warn!(
                segment = %segment.display(),
                offset,
                %damage,
                cut_from = keep,
                cut_to = old_len,
                bytes = old_len - keep,
                records = unsigned_records,
                "truncating the torn tail of the log"
            ),
            (None, _) => {}
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
            torn_write,
            unsigned_records,
        });
    } else {
        assert!(
            torn.is_none() && keep == end,
            "a torn tail lies before the end of the file"
        );
        return Ok((keep, old_len));
    }
    Ok((keep, keep))
}

/// Whether the record at `offset` of the last segment, damaged as `damage` with good records
/// after it, is part of a torn write (rule 2 of the module doc). Returns the offset of the first
/// block of zeros the record overlaps, or `None` when the damage is not what a hole in the last
/// write leaves.
pub(crate) fn torn_write_hole(
    file: &dyn LogFile,
    offset: u64,
    damage: &RecordDamage,
) -> io::Result<Option<u64>> {
    const HEADER: u64 = RECORD_HEADER_LEN as u64;
    let len = file.len()?;
    if len.saturating_sub(offset) > TORN_WRITE_BYTES_MAX {
        return Ok(None);
    }
    // The bytes the header claims. A hole makes a length zero or smaller, never over the limit
    // nor past the end of the file.
    let claimed_end = match damage {
        RecordDamage::Framing(FramingError::Empty) => offset + HEADER,
        RecordDamage::Framing(FramingError::Checksum { .. }) => {
            let mut length = [0u8; 4];
            read_full_at(file, &mut length, offset)?;
            offset + HEADER + u64::from(u32::from_le_bytes(length))
        }
        _ => return Ok(None),
    };
    let mut block = vec![0u8; TORN_WRITE_BLOCK_BYTES as usize];
    let mut at = offset - offset % TORN_WRITE_BLOCK_BYTES;
    while at < claimed_end && at + TORN_WRITE_BLOCK_BYTES <= len {
        read_full_at(file, &mut block, at)?;
        if block.iter().all(|&b| b == 0) {
            return Ok(Some(at));
        }
        at += TORN_WRITE_BLOCK_BYTES;
    }
    Ok(None)
}

/// Records with good checksums from `offset` on, up to damage or the end of the file.
fn count_records(file: &dyn LogFile, offset: u64) -> io::Result<u64> {
    let mut cursor = RecordCursor::new(offset);
    let mut records = 0;
    while let Scanned::Record { .. } = cursor.next(file)? {
        records += 1;
    }
    Ok(records)
}

/// Fills `buf` from `offset`; the file ending first is an error.
fn read_full_at(file: &dyn LogFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::node::writer::DEFAULT_BATCH_BYTES_MAX;

    #[test]
    fn the_torn_write_window_spans_a_batch_at_the_default_settings() {
        for batch_bytes_max in [Config::default().batch_bytes_max, DEFAULT_BATCH_BYTES_MAX] {
            assert!(2 * (batch_bytes_max + MAX_FRAME_BYTES) as u64 <= TORN_WRITE_BYTES_MAX);
        }
    }
}
