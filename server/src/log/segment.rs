//! Segment files: their names, and a cursor that cuts records out of one.
//!
//! A segment is named by the number of records before it, in 20 decimal digits, with the
//! extension `.log`: the segment named `N` holds LSNs `N + 1, N + 2, …`. A segment is a plain
//! sequence of `protocol::record` records with nothing between or after them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
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
/// after the damaged one; damage in the middle leaves good records after it.
///
/// The search reads each byte once and holds one read chunk plus the candidates it has not
/// checked yet. A *candidate* is an offset whose header claims a length that can be a record
/// (not zero, at most [`MAX_RECORD_BYTES`], within the file); hashing each candidate's payload
/// on its own would be quadratic when many offsets claim long payloads. Instead one running
/// CRC-32C goes over the bytes, and a candidate's checksum follows from the running CRCs at the
/// two ends of its payload: CRC-32C is linear, so for a prefix `A` and a payload `B`,
/// `crc(B) = crc(A‖B) ⊕ shift(crc(A), |B|)`, where `shift` feeds `|B|` zero bytes to the CRC
/// register (`crc_shift`: four table lookups per bit of `|B|`). A candidate waits in a min-heap
/// by its end offset until the running CRC gets there, so the work is linear in the bytes read,
/// with a heap push and pop per candidate. Once one checks out, no later offset can be the
/// first, so the search only finishes the candidates that start before it. The candidates
/// waiting at a time start in the last `MAX_RECORD_BYTES + RECORD_HEADER_LEN` bytes, 24 bytes
/// each: in real segments a few, and in bytes crafted so that most offsets claim a long payload
/// at most about 100 MiB, whatever the size of the region.
pub fn find_record_after(file: &dyn LogFile, from: u64) -> io::Result<Option<u64>> {
    RecordSearch::new(file, from + 1)?.run()
}

/// Whether every byte from `from` to the end of the file is zero (true for none): the zeros a
/// store writes ahead of its last record ([`super::LogConfig::preallocate_bytes`]), which end
/// the log, since no record is all zeros.
pub fn zeros_to_end(file: &dyn LogFile, from: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
}

/// A candidate record of [`find_record_after`], waiting for the running CRC to reach its end.
/// Ordered by `end` first, for the heap.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    /// File offset just past its payload.
    end: u64,
    /// Its payload length, as its header claims.
    len: u32,
    /// The running CRC at `end` if the checksum is good: the stored checksum xor the running
    /// CRC at the payload's start shifted over the payload.
    expected: u32,
    /// The furthest `end` of the candidates found before this one (which all start before it).
    reach_before: u64,
}

impl Candidate {
    fn start(&self) -> u64 {
        self.end - u64::from(self.len) - RECORD_HEADER_LEN as u64
    }
}

/// The state of one [`find_record_after`].
struct RecordSearch<'f> {
    file: &'f dyn LogFile,
    /// Where the file ends (as it was when the search began).
    len: u64,
    /// A window of the file: `buf[..filled]` holds the bytes from `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    filled: usize,
    /// The CRC-32C of the bytes from the first candidate offset up to `crc_at`.
    crc: u32,
    crc_at: u64,
    /// The next offset to consider as a candidate.
    next: u64,
    /// Candidates not checked yet, by end offset.
    pending: BinaryHeap<Reverse<Candidate>>,
    /// The furthest end of any candidate so far.
    reach: u64,
    /// The first start found good so far, and the furthest end of the candidates that start
    /// before it: once the running CRC is there, that start is the answer.
    found: Option<(u64, u64)>,
}

impl<'f> RecordSearch<'f> {
    fn new(file: &'f dyn LogFile, first: u64) -> io::Result<Self> {
        Ok(Self {
            file,
            len: file.len()?,
            buf: Vec::new(),
            buf_start: first,
            filled: 0,
            crc: 0,
            crc_at: first,
            next: first,
            pending: BinaryHeap::new(),
            reach: 0,
            found: None,
        })
    }

    fn run(mut self) -> io::Result<Option<u64>> {
        const HEADER: u64 = RECORD_HEADER_LEN as u64;
        // The smallest record is a header and one byte.
        if self.len < self.next + HEADER + 1 {
            return Ok(None);
        }
        let window = (self.len - self.next).min(READ_CHUNK_BYTES as u64) as usize;
        self.buf = vec![0; window];
        loop {
            let at_end = self.read_more()?;
            let window_end = self.buf_start + self.filled as u64;
            while self.found.is_none() && self.next + HEADER <= window_end {
                self.consider(self.next);
                self.next += 1;
            }
            self.settle(window_end);
            match self.found {
                Some((start, reach)) if self.crc_at >= reach => return Ok(Some(start)),
                found if at_end => return Ok(found.map(|(start, _)| start)),
                _ => {}
            }
        }
    }

    /// Moves the window past what is no longer needed and reads on. Returns whether the window
    /// now reaches the end of the file.
    fn read_more(&mut self) -> io::Result<bool> {
        // The running CRC is at the window's end; only the headers of offsets not considered
        // yet (fewer than a header's length) stay.
        let keep_from = if self.found.is_none() {
            self.next.min(self.crc_at)
        } else {
            self.crc_at
        };
        debug_assert!(keep_from >= self.buf_start);
        let drop = (keep_from - self.buf_start) as usize;
        self.buf.copy_within(drop..self.filled, 0);
        self.filled -= drop;
        self.buf_start = keep_from;
        let want = (self.len - self.buf_start).min(self.buf.len() as u64) as usize;
        while self.filled < want {
            let n = self.file.read_at(
                &mut self.buf[self.filled..want],
                self.buf_start + self.filled as u64,
            )?;
            if n == 0 {
                // The file shrank: what is gone cannot hold a record.
                self.len = self.buf_start + self.filled as u64;
                break;
            }
            self.filled += n;
        }
        Ok(self.buf_start + self.filled as u64 >= self.len)
    }

    /// Registers `at` as a candidate if its header claims a length that fits. Its header is in
    /// the window.
    fn consider(&mut self, at: u64) {
        let i = (at - self.buf_start) as usize;
        let header = &self.buf[i..i + RECORD_HEADER_LEN];
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let stored = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let end = at + RECORD_HEADER_LEN as u64 + u64::from(len);
        if len == 0 || len as usize > MAX_RECORD_BYTES || end > self.len {
            return;
        }
        self.settle(at + RECORD_HEADER_LEN as u64);
        if self.found.is_some() {
            return;
        }
        self.pending.push(Reverse(Candidate {
            end,
            len,
            expected: stored ^ crc_shift(self.crc, len as usize),
            reach_before: self.reach,
        }));
        self.reach = self.reach.max(end);
    }

    /// Checks every candidate that ends by `to`, in order of their ends, and moves the running
    /// CRC to `to`, which is in the window.
    fn settle(&mut self, to: u64) {
        while let Some(Reverse(c)) = self.pending.peek()
            && c.end <= to
        {
            let Reverse(c) = self.pending.pop().expect("peeked");
            if self.found.is_some_and(|(start, _)| c.start() >= start) {
                continue;
            }
            self.advance(c.end);
            if self.crc == c.expected {
                self.found = Some((c.start(), c.reach_before));
            }
        }
        self.advance(to);
    }

    fn advance(&mut self, to: u64) {
        debug_assert!(self.crc_at <= to && to <= self.buf_start + self.filled as u64);
        let from = (self.crc_at - self.buf_start) as usize;
        let upto = (to - self.buf_start) as usize;
        self.crc = crc32c::crc32c_append(self.crc, &self.buf[from..upto]);
        self.crc_at = to;
    }
}

/// The CRC-32C polynomial, bit-reversed: the form in which the register shifts right.
const CRC32C_POLY_REVERSED: u32 = 0x82F6_3B78;

/// Levels of [`CRC_SHIFT_TABLES`]: enough to shift over any payload length.
const CRC_SHIFT_LEVELS: usize = (usize::BITS - MAX_RECORD_BYTES.leading_zeros()) as usize;

/// `CRC_SHIFT_TABLES[i]` feeds `2^i` zero bytes to a CRC-32C register. That is a linear map of
/// the register's 32 bits, so it is stored as one table per byte of the register: the image of
/// a register is the xor of the images of its four bytes.
static CRC_SHIFT_TABLES: [[[u32; 256]; 4]; CRC_SHIFT_LEVELS] = crc_shift_tables();

// Only ever evaluated at compile time, for the static: the array is never on a stack.
#[allow(clippy::large_stack_arrays)]
const fn crc_shift_tables() -> [[[u32; 256]; 4]; CRC_SHIFT_LEVELS] {
    let mut tables = [[[0u32; 256]; 4]; CRC_SHIFT_LEVELS];
    // The image of each bit of the register under one zero byte: eight steps of the register,
    // each shifting a bit out and folding the polynomial in when that bit was set.
    let mut columns = [0u32; 32];
    let mut bit = 0;
    while bit < 32 {
        let mut v = 1u32 << bit;
        let mut step = 0;
        while step < 8 {
            v = if v & 1 == 1 {
                (v >> 1) ^ CRC32C_POLY_REVERSED
            } else {
                v >> 1
            };
            step += 1;
        }
        columns[bit] = v;
        bit += 1;
    }
    let mut level = 0;
    while level < CRC_SHIFT_LEVELS {
        let mut byte = 0;
        while byte < 4 {
            let mut value = 1usize;
            while value < 256 {
                let lowest = value.trailing_zeros() as usize;
                tables[level][byte][value] =
                    tables[level][byte][value & (value - 1)] ^ columns[8 * byte + lowest];
                value += 1;
            }
            byte += 1;
        }
        // Feeding 2^(i+1) zero bytes is feeding 2^i twice: the next level's image of a bit is
        // this level's map applied to this level's image of it.
        let mut next = [0u32; 32];
        bit = 0;
        while bit < 32 {
            next[bit] = apply_crc_shift(&tables[level], columns[bit]);
            bit += 1;
        }
        columns = next;
        level += 1;
    }
    tables
}

const fn apply_crc_shift(table: &[[u32; 256]; 4], crc: u32) -> u32 {
    table[0][(crc & 0xff) as usize]
        ^ table[1][((crc >> 8) & 0xff) as usize]
        ^ table[2][((crc >> 16) & 0xff) as usize]
        ^ table[3][(crc >> 24) as usize]
}

/// What `crc32c::crc32c_combine(crc, 0, n)` computes, by table: the CRC-32C `crc` of some bytes
/// `A` turned into `crc(A‖B) ⊕ crc(B)` for any `n` bytes `B`. `n` is at most
/// [`MAX_RECORD_BYTES`].
fn crc_shift(crc: u32, n: usize) -> u32 {
    debug_assert!(
        n >> CRC_SHIFT_LEVELS == 0,
        "no table level for a shift of {n} bytes"
    );
    let mut crc = crc;
    let mut rest = n;
    let mut level = 0;
    while rest != 0 {
        if rest & 1 == 1 {
            crc = apply_crc_shift(&CRC_SHIFT_TABLES[level], crc);
        }
        rest >>= 1;
        level += 1;
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappakv_protocol::record::encode_record;
    use proptest::prelude::*;

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

    /// The search as it was: a decode at every offset.
    fn find_record_after_by_decoding(bytes: &[u8], from: u64) -> Option<u64> {
        (from as usize + 1..bytes.len())
            .find(|&at| {
                matches!(
                    decode_record(&bytes[at..], MAX_RECORD_BYTES),
                    Ok(RecordDecode::Record { .. })
                )
            })
            .map(|at| at as u64)
    }

    /// Deterministic bytes that look like nothing in particular.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn crc_shift_is_crc32c_combine() {
        for n in [
            0,
            1,
            2,
            3,
            7,
            8,
            255,
            256,
            4096,
            65_537,
            MAX_RECORD_BYTES - 1,
            MAX_RECORD_BYTES,
        ] {
            for crc in [0, 1, 0x8000_0000, 0xdead_beef, u32::MAX] {
                assert_eq!(
                    crc_shift(crc, n),
                    crc32c::crc32c_combine(crc, 0, n),
                    "crc {crc:#x}, {n} bytes"
                );
            }
        }
        let data = noise(10_000, 1);
        for cut in [0, 1, 100, 9_999, 10_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(
                crc32c::crc32c(b),
                crc32c::crc32c(&data) ^ crc_shift(crc32c::crc32c(a), b.len())
            );
        }
    }

    /// 2 MiB of `10 00 10 00 …`: every even offset claims a payload of 1 MiB + 16 bytes (length
    /// 0x00100010), and about 540,000 of those claims fit in the file. Checking each claim on its
    /// own hashes about 540,000 × 1 MiB, over 500 GiB; the search reads the bytes once.
    #[test]
    fn find_record_after_is_linear_when_every_other_offset_claims_a_long_payload() {
        let pattern = |len: usize| [0x10u8, 0].repeat(len / 2);
        let mut bytes = pattern(2 * 1024 * 1024);
        let good = bytes.len() as u64;
        encode_record(b"the first good record", &mut bytes);
        bytes.extend(pattern(64 * 1024));
        for read_max in [4099, usize::MAX] {
            let file = MemFile {
                bytes: bytes.clone(),
                read_max,
            };
            assert_eq!(find_record_after(&file, 0).unwrap(), Some(good));
            assert_eq!(find_record_after(&file, good - 3).unwrap(), Some(good));
            assert_eq!(find_record_after(&file, good).unwrap(), None);
        }
        // Without the good record, nothing is found.
        let file = MemFile {
            bytes: pattern(2 * 1024 * 1024),
            read_max: usize::MAX,
        };
        assert_eq!(find_record_after(&file, 0).unwrap(), None);
    }

    /// A record whose payload holds a record: the inner one checks out first (it ends first),
    /// but the outer one starts first, in a payload longer than a read chunk.
    #[test]
    fn find_record_after_returns_the_first_start_not_the_first_end() {
        let mut inner = Vec::new();
        encode_record(b"inner", &mut inner);
        let mut outer_payload = noise(100, 2);
        outer_payload.extend(&inner);
        outer_payload.extend(noise(READ_CHUNK_BYTES + 1000, 3));
        let mut bytes = vec![0xff; 5];
        let outer_at = bytes.len() as u64;
        encode_record(&outer_payload, &mut bytes);
        let inner_at = outer_at + RECORD_HEADER_LEN as u64 + 100;
        let file = MemFile {
            bytes,
            read_max: 1000,
        };
        assert_eq!(find_record_after(&file, 0).unwrap(), Some(outer_at));
        assert_eq!(find_record_after(&file, outer_at).unwrap(), Some(inner_at));
        assert_eq!(find_record_after(&file, inner_at).unwrap(), None);
    }

    /// Records among noise, around read-chunk boundaries, found as a decode at every offset
    /// finds them, whatever the reads return at a time.
    #[test]
    fn find_record_after_agrees_with_decoding_at_every_offset_across_chunks() {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for (i, at) in [
            READ_CHUNK_BYTES - 3,
            READ_CHUNK_BYTES + 100,
            2 * READ_CHUNK_BYTES - 9,
            3 * READ_CHUNK_BYTES + 1,
        ]
        .into_iter()
        .enumerate()
        {
            bytes.extend(noise(at - bytes.len(), i as u64 + 10));
            starts.push(bytes.len() as u64);
            encode_record(&noise(40 + 7000 * i, i as u64 + 20), &mut bytes);
        }
        bytes.extend(noise(5000, 30));
        let mut froms = vec![0, 1, READ_CHUNK_BYTES as u64, bytes.len() as u64 - 10];
        froms.extend(starts.iter().flat_map(|&s| [s - 1, s, s + 1]));
        for read_max in [7, 4096, usize::MAX] {
            let file = MemFile {
                bytes: bytes.clone(),
                read_max,
            };
            for &from in &froms {
                assert_eq!(
                    find_record_after(&file, from).unwrap(),
                    find_record_after_by_decoding(&bytes, from),
                    "from {from}, reads of {read_max}"
                );
            }
        }
    }

    /// Pieces of a damaged segment.
    #[derive(Debug, Clone)]
    enum Piece {
        Record(Vec<u8>),
        /// A record whose payload is a record.
        Nested(Vec<u8>),
        /// A record cut short by `.1` bytes.
        Cut(Vec<u8>, usize),
        /// A record with the byte at `.1` flipped.
        Flipped(Vec<u8>, usize),
        /// A header claiming `.0` bytes with checksum `.1`, and nothing else.
        Claim(u32, u32),
        Noise(Vec<u8>),
        Zeros(usize),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        let payload = || prop::collection::vec(any::<u8>(), 1..48);
        prop_oneof![
            payload().prop_map(Piece::Record),
            payload().prop_map(Piece::Nested),
            (payload(), 1..8usize).prop_map(|(p, n)| Piece::Cut(p, n)),
            (payload(), any::<usize>()).prop_map(|(p, i)| Piece::Flipped(p, i)),
            (1..120u32, any::<u32>()).prop_map(|(len, crc)| Piece::Claim(len, crc)),
            prop::collection::vec(any::<u8>(), 0..24).prop_map(Piece::Noise),
            (0..24usize).prop_map(Piece::Zeros),
        ]
    }

    fn assemble(pieces: &[Piece]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Record(p) => encode_record(p, &mut bytes),
                Piece::Nested(p) => {
                    let mut inner = Vec::new();
                    encode_record(p, &mut inner);
                    encode_record(&inner, &mut bytes);
                }
                Piece::Cut(p, n) => {
                    encode_record(p, &mut bytes);
                    bytes.truncate(bytes.len() - n);
                }
                Piece::Flipped(p, i) => {
                    let at = bytes.len();
                    encode_record(p, &mut bytes);
                    let i = at + i % (bytes.len() - at);
                    bytes[i] ^= 0x21;
                }
                Piece::Claim(len, crc) => {
                    bytes.extend(len.to_le_bytes());
                    bytes.extend(crc.to_le_bytes());
                }
                Piece::Noise(n) => bytes.extend(n),
                Piece::Zeros(n) => bytes.extend(std::iter::repeat_n(0, *n)),
            }
        }
        bytes
    }

    proptest::proptest! {
        #[test]
        fn find_record_after_agrees_with_decoding_at_every_offset(
            pieces in prop::collection::vec(piece(), 0..12),
            read_max in prop_oneof![Just(1usize), Just(5), Just(usize::MAX)],
        ) {
            let bytes = assemble(&pieces);
            let file = MemFile { bytes: bytes.clone(), read_max };
            for from in 0..bytes.len() as u64 + 2 {
                proptest::prop_assert_eq!(
                    find_record_after(&file, from).unwrap(),
                    find_record_after_by_decoding(&bytes, from),
                    "from {}", from
                );
            }
        }
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
