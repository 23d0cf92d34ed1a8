//! Segment files: their names, and a cursor that cuts records out of one.
//!
//! A segment is named by the number of records before it, in 20 decimal digits, with the
//! extension `.log`: the segment named `N` holds LSNs `N + 1, N + 2, …`. A segment is a plain
//! sequence of `protocol::record` records with nothing between or after them.

use std::fmt;
use std::io;

use kappakv_protocol::FramingError;
use kappakv_protocol::limits::MAX_RECORD_BYTES;
use kappakv_protocol::record::{RECORD_HEADER_LEN, RecordDecode, decode_record};

use super::file::LogFile;

/// Extension of segment files.
pub const SEGMENT_EXTENSION: &str = ".log";

/// Digits in a segment name.
const SEGMENT_NAME_DIGITS: usize = 20;

/// Bytes read from a segment at a time, unless a record needs more.
const READ_CHUNK_BYTES: usize = 256 * 1024;

const _: () = assert!(READ_CHUNK_BYTES >= RECORD_HEADER_LEN);

/// The file name of the segment that follows `base` records.
pub fn segment_name(base: u64) -> String {
    format!("{base:0SEGMENT_NAME_DIGITS$}{SEGMENT_EXTENSION}")
}

/// The number of records before the segment named `name`, or `None` if `name` is not a
/// segment name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_EXTENSION)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sorted bases of the segments among `names`; other names are left out.
pub fn segment_bases<S: AsRef<str>>(names: &[S]) -> Vec<u64> {
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_segment_name(n.as_ref()))
        .collect();
    bases.sort_unstable();
    bases
}

/// What is wrong with the bytes where a record should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordDamage {
    /// The file ends inside the record: a header or payload cut short.
    Incomplete,
    /// The header or checksum is bad (a zero length included).
    Framing(FramingError),
}

impl fmt::Display for RecordDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordDamage::Incomplete => f.write_str("the file ends inside the record"),
            RecordDamage::Framing(e) => write!(f, "{e}"),
        }
    }
}

/// What the cursor found at its position.
#[derive(Debug)]
pub enum Scanned<'a> {
    /// A record with a good checksum.
    Record {
        /// File offset of the record's header.
        offset: u64,
        /// The payload.
        payload: &'a [u8],
    },
    /// The end of the file, exactly at a record boundary.
    End,
    /// Bytes that are not a whole good record, starting at `offset`.
    Damaged {
        /// File offset where the record should start.
        offset: u64,
        /// What is wrong.
        damage: RecordDamage,
    },
}

/// Reads records one after the other from a segment file, in chunks.
///
/// The cursor owns only its buffer; the file is passed to every call, so one cursor can live
/// next to the file it reads without borrowing it.
#[derive(Debug)]
pub struct RecordCursor {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_offset: u64,
    /// Bytes of `buf` already handed out as records.
    consumed: usize,
    /// Bytes of `buf` holding file data.
    filled: usize,
}

impl RecordCursor {
    /// A cursor at file offset `offset`, which must be a record boundary.
    pub fn new(offset: u64) -> Self {
        Self {
            buf: Vec::new(),
            buf_offset: offset,
            consumed: 0,
            filled: 0,
        }
    }

    /// File offset of the next record.
    pub fn offset(&self) -> u64 {
        self.buf_offset + self.consumed as u64
    }

    /// Cuts the next record. After `End` or `Damaged` the cursor stays where it is; a later
    /// call reads again, so a reader can wait for a file that is still growing.
    pub fn next<'a>(&'a mut self, file: &dyn LogFile) -> io::Result<Scanned<'a>> {
        loop {
            let (used, needed) =
                match decode_record(&self.buf[self.consumed..self.filled], MAX_RECORD_BYTES) {
                    Ok(RecordDecode::Record { used, .. }) => (used, 0),
                    Ok(RecordDecode::NeedMore { needed }) => (0, needed),
                    Err(e) => {
                        return Ok(Scanned::Damaged {
                            offset: self.offset(),
                            damage: RecordDamage::Framing(e),
                        });
                    }
                };
            if used > 0 {
                let offset = self.offset();
                let start = self.consumed;
                self.consumed += used;
                let payload = &self.buf[start + RECORD_HEADER_LEN..start + used];
                debug_assert_eq!(payload.len() + RECORD_HEADER_LEN, used);
                return Ok(Scanned::Record { offset, payload });
            }
            if self.fill(file, needed)? == 0 {
                return Ok(if self.consumed == self.filled {
                    Scanned::End
                } else {
                    Scanned::Damaged {
                        offset: self.offset(),
                        damage: RecordDamage::Incomplete,
                    }
                });
            }
        }
    }

    /// Reads at least one more byte, room permitting `needed` more (and a chunk), unless the
    /// file ends. Returns the number of bytes read.
    fn fill(&mut self, file: &dyn LogFile, needed: usize) -> io::Result<usize> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.buf_offset += self.consumed as u64;
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        let want = self.filled + needed.max(READ_CHUNK_BYTES);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut total = 0;
        while total < needed {
            let n = file.read_at(
                &mut self.buf[self.filled..],
                self.buf_offset + self.filled as u64,
            )?;
            if n == 0 {
                break;
            }
            self.filled += n;
            total += n;
        }
        Ok(total)
    }
}

/// Looks for a record with a good checksum starting at any byte offset in `(from, end of
/// file)`. Returns the offset of the first one found.
///
/// This is how recovery tells a torn tail from damage before it: a tear leaves no whole record
/// after the damaged one; damage in the middle leaves good records after it. Zero bytes (length
/// 0) and lengths that run past the end of the file are skipped without hashing, so the search is
/// linear in practice.
pub fn find_record_after(file: &dyn LogFile, from: u64) -> io::Result<Option<u64>> {
    let len = file.len()?;
    if len <= from + 1 {
        return Ok(None);
    }
    let region_len =
        usize::try_from(len - from).map_err(|_| io::Error::other("segment too large to scan"))?;
    let mut region = vec![0u8; region_len];
    let mut got = 0;
    while got < region.len() {
        let n = file.read_at(&mut region[got..], from + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    region.truncate(got);
    for at in 1..region.len() {
        if let Ok(RecordDecode::Record { .. }) = decode_record(&region[at..], MAX_RECORD_BYTES) {
            return Ok(Some(from + at as u64));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappakv_protocol::record::encode_record;

    /// An in-memory file whose reads return at most `read_max` bytes.
    struct MemFile {
        bytes: Vec<u8>,
        read_max: usize,
    }

    impl LogFile for MemFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let start = (offset as usize).min(self.bytes.len());
            let n = buf.len().min(self.read_max).min(self.bytes.len() - start);
            buf[..n].copy_from_slice(&self.bytes[start..start + n]);
            Ok(n)
        }
        fn write_all_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
            unreachable!()
        }
        fn sync_data(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn sync_all(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.bytes.truncate(len as usize);
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.len() as u64)
        }
    }

    #[test]
    fn cursor_reads_records_across_chunks_and_short_reads() {
        let sizes = [10, 3 * READ_CHUNK_BYTES / 2, 5, 3 * READ_CHUNK_BYTES, 1];
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            offsets.push(bytes.len() as u64);
            encode_record(&vec![i as u8 + 1; n], &mut bytes);
        }
        for read_max in [7, 4096, usize::MAX] {
            let file = MemFile {
                bytes: bytes.clone(),
                read_max,
            };
            let mut cursor = RecordCursor::new(0);
            for (i, &n) in sizes.iter().enumerate() {
                match cursor.next(&file).unwrap() {
                    Scanned::Record { offset, payload } => {
                        assert_eq!(offset, offsets[i]);
                        assert_eq!(payload, &vec![i as u8 + 1; n][..]);
                    }
                    other => panic!("record {i}: {other:?}"),
                }
            }
            assert!(matches!(cursor.next(&file).unwrap(), Scanned::End));
        }
        // A cut inside the last record, and nothing whole after it.
        let file = MemFile {
            bytes: bytes[..bytes.len() - 1].to_vec(),
            read_max: usize::MAX,
        };
        let mut cursor = RecordCursor::new(offsets[4]);
        assert!(matches!(
            cursor.next(&file).unwrap(),
            Scanned::Damaged { offset, damage: RecordDamage::Incomplete } if offset == offsets[4]
        ));
        assert_eq!(find_record_after(&file, offsets[4]).unwrap(), None);
        assert_eq!(
            find_record_after(&file, offsets[2] + 1).unwrap(),
            Some(offsets[3])
        );
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(0), "00000000000000000000.log");
        assert_eq!(segment_name(1234), "00000000000000001234.log");
        assert_eq!(parse_segment_name("00000000000000001234.log"), Some(1234));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("0000000000000001234.log"), None);
        assert_eq!(parse_segment_name("0000000000000000123a.log"), None);
        assert_eq!(parse_segment_name("00000000000000001234.tmp"), None);
        assert_eq!(
            segment_bases(&["x", "00000000000000000010.log", "00000000000000000000.log"]),
            vec![0, 10]
        );
    }
}
