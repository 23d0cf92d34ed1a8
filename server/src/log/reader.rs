//! Reading the log by LSN, from any thread, while the writer appends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kappakv_protocol::record::RECORD_HEADER_LEN;
use kappakv_protocol::{Lsn, SignedEntry};

use super::error::ReadLogError;
use super::file::{FsLogDir, LogDir, LogFile, OpenMode};
use super::segment::{RecordCursor, Scanned, segment_bases, segment_name};

/// Every this many LSNs, the reader remembers where the record after it starts.
const INDEX_STRIDE: u64 = 4096;
/// Most positions remembered; past this the index is dropped and rebuilt as reads go.
const INDEX_POINTS_MAX: usize = 64 * 1024;

/// Where a record starts: the LSN before it, and its segment and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    lsn_before: Lsn,
    base: u64,
    offset: u64,
}

/// Reads entries by LSN. Any number of readers may run next to the writer: a reader only reads
/// records up to the LSN it is given, which must be durable (published by the writer after its
/// `fdatasync`), so it never sees a record being written.
///
/// A read starts from the nearest position the reader knows: the start of the segment holding
/// the LSN (segment names give their first LSN), a sparse in-memory index of positions it has
/// read past, or where its previous read ended (so tailing the log costs only the new records).
/// The reader is `Sync`; that memory sits behind a mutex held only between reads.
pub struct LogReader {
    dir: Arc<dyn LogDir>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Known segment bases, ascending; listed again when a read runs past the last one.
    bases: Vec<u64>,
    /// The segment file read last, lent to one read at a time.
    file: Option<(u64, Box<dyn LogFile>)>,
    /// Positions of every `INDEX_STRIDE`-th LSN read so far, by `lsn_before`.
    index: BTreeMap<Lsn, (u64, u64)>,
    /// Where the last read ended.
    tail: Option<Position>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl LogReader {
    /// A reader of the log directory `log_dir` (`DATA_DIR/log`), which must exist.
    pub fn open(log_dir: &Path) -> Result<Self, ReadLogError> {
        Self::open_in(Arc::new(FsLogDir::new(log_dir)))
    }

    /// A reader of the log in `dir`.
    pub fn open_in(dir: Arc<dyn LogDir>) -> Result<Self, ReadLogError> {
        let reader = Self {
            dir,
            cache: Mutex::new(Cache::default()),
        };
        let bases = reader.list()?;
        reader.cache().bases = bases;
        Ok(reader)
    }

    /// The entries with LSNs in `(after, upto]`, in LSN order. `upto` must not be above the
    /// durable LSN. The iterator ends after the first error; finding where to start can fail
    /// before it exists, hence the `Result` around it.
    #[allow(clippy::iter_not_returning_iterator)]
    pub fn iter(&self, after: Lsn, upto: Lsn) -> Result<Entries<'_>, ReadLogError> {
        let done = after >= upto;
        let (pos, file) = if done {
            (
                Position {
                    lsn_before: after,
                    base: 0,
                    offset: 0,
                },
                None,
            )
        } else {
            let pos = self.start(after)?;
            let mut cache = self.cache();
            let file = cache.file.take().filter(|(b, _)| *b == pos.base);
            (pos, file)
        };
        Ok(Entries {
            reader: self,
            after,
            upto,
            pos,
            cursor: RecordCursor::new(pos.offset),
            file,
            done,
        })
    }

    /// The LSN of the last whole record in the log, counting the records of the last segment.
    /// A damaged record ends the count (the store's recovery decides what it is). Meant for
    /// offline use: next to a running writer, use the durable LSN it publishes instead.
    pub fn last_lsn(&self) -> Result<Lsn, ReadLogError> {
        let bases = self.list()?;
        let Some(&base) = bases.last() else {
            return Err(ReadLogError::Missing {
                dir: self.dir.path().to_path_buf(),
                lsn: 1,
            });
        };
        let mut slot = None;
        let file = segment_file(&mut slot, self, base)?;
        let mut cursor = RecordCursor::new(0);
        let mut lsn = base;
        loop {
            let at = cursor.offset();
            match cursor.next(file).map_err(|source| ReadLogError::Io {
                segment: self.segment_path(base),
                offset: at,
                source,
            })? {
                Scanned::Record { .. } => lsn += 1,
                Scanned::End | Scanned::Damaged { .. } => break,
            }
        }
        self.cache().bases = bases;
        Ok(lsn)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache holds no invariant a panicking reader could break half-way.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn list(&self) -> Result<Vec<u64>, ReadLogError> {
        let names = self.dir.list().map_err(|source| ReadLogError::Dir {
            path: self.dir.path().to_path_buf(),
            source,
        })?;
        Ok(segment_bases(&names))
    }

    /// The best known position at or before the record after `after`.
    fn start(&self, after: Lsn) -> Result<Position, ReadLogError> {
        let mut cache = self.cache();
        if cache.bases.is_empty() {
            cache.bases = self.list()?;
        }
        let segment = cache
            .bases
            .iter()
            .rev()
            .find(|&&b| b <= after)
            .map(|&b| Position {
                lsn_before: b,
                base: b,
                offset: 0,
            });
        let indexed =
            cache
                .index
                .range(..=after)
                .next_back()
                .map(|(&lsn_before, &(base, offset))| Position {
                    lsn_before,
                    base,
                    offset,
                });
        let tail = cache.tail.filter(|t| t.lsn_before <= after);
        [segment, indexed, tail]
            .into_iter()
            .flatten()
            .max_by_key(|p| p.lsn_before)
            .ok_or_else(|| ReadLogError::Missing {
                dir: self.dir.path().to_path_buf(),
                lsn: after + 1,
            })
    }

    /// Whether a segment starts after `lsn_before` records, listing the directory again if it
    /// is not known yet.
    fn has_segment(&self, lsn_before: Lsn) -> Result<bool, ReadLogError> {
        if self.cache().bases.contains(&lsn_before) {
            return Ok(true);
        }
        let bases = self.list()?;
        let found = bases.contains(&lsn_before);
        self.cache().bases = bases;
        Ok(found)
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.path().join(segment_name(base))
    }
}

/// The entries of a range, from [`LogReader::iter`].
pub struct Entries<'r> {
    reader: &'r LogReader,
    after: Lsn,
    upto: Lsn,
    /// Where the cursor stands.
    pos: Position,
    cursor: RecordCursor,
    /// The file of segment `pos.base`, once opened.
    file: Option<(u64, Box<dyn LogFile>)>,
    done: bool,
}

/// The file of segment `base`, opening it unless `slot` holds it.
fn segment_file<'f>(
    slot: &'f mut Option<(u64, Box<dyn LogFile>)>,
    reader: &LogReader,
    base: u64,
) -> Result<&'f dyn LogFile, ReadLogError> {
    if slot.as_ref().is_none_or(|(b, _)| *b != base) {
        let f = reader
            .dir
            .open(&segment_name(base), OpenMode::Read)
            .map_err(|source| ReadLogError::Io {
                segment: reader.segment_path(base),
                offset: 0,
                source,
            })?;
        *slot = Some((base, f));
    }
    Ok(slot.as_ref().expect("just opened").1.as_ref())
}

impl Entries<'_> {
    fn step(&mut self) -> Result<Option<(Lsn, SignedEntry)>, ReadLogError> {
        loop {
            if self.pos.lsn_before >= self.upto {
                return Ok(None);
            }
            let at = self.cursor.offset();
            let base = self.pos.base;
            let file = segment_file(&mut self.file, self.reader, base)?;
            let scanned = self.cursor.next(file).map_err(|source| ReadLogError::Io {
                segment: self.reader.segment_path(base),
                offset: at,
                source,
            })?;
            match scanned {
                Scanned::Record { offset, payload } => {
                    let lsn = self.pos.lsn_before + 1;
                    let end = offset + (RECORD_HEADER_LEN + payload.len()) as u64;
                    self.pos = Position {
                        lsn_before: lsn,
                        base,
                        offset: end,
                    };
                    if lsn.is_multiple_of(INDEX_STRIDE) {
                        let mut cache = self.reader.cache();
                        if cache.index.len() >= INDEX_POINTS_MAX {
                            cache.index.clear();
                        }
                        cache.index.insert(lsn, (base, self.pos.offset));
                    }
                    if lsn <= self.after {
                        continue;
                    }
                    let entry = SignedEntry::decode_payload(payload).map_err(|source| {
                        ReadLogError::Decode {
                            segment: self.reader.segment_path(base),
                            offset,
                            lsn,
                            source,
                        }
                    })?;
                    return Ok(Some((lsn, entry)));
                }
                Scanned::End => {
                    let next = self.pos.lsn_before;
                    // An empty segment is only ever the last one: nothing can follow it yet.
                    if next == base || !self.reader.has_segment(next)? {
                        return Err(ReadLogError::Missing {
                            dir: self.reader.dir.path().to_path_buf(),
                            lsn: next + 1,
                        });
                    }
                    self.pos = Position {
                        lsn_before: next,
                        base: next,
                        offset: 0,
                    };
                    self.cursor = RecordCursor::new(0);
                }
                Scanned::Damaged { offset, damage } => {
                    return Err(ReadLogError::Corrupt {
                        segment: self.reader.segment_path(base),
                        offset,
                        lsn: self.pos.lsn_before + 1,
                        damage,
                    });
                }
            }
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<(Lsn, SignedEntry), ReadLogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        let mut cache = self.reader.cache();
        if self.pos.lsn_before > self.after {
            cache.tail = Some(self.pos);
        }
        if let Some(file) = self.file.take() {
            cache.file = Some(file);
        }
    }
}
