//! `kappakv backup`: copies a consistent prefix of the log and the node's identity into a new
//! directory, while the node serves or not. The indexes are never copied: a restored node
//! rebuilds them from the log.
//!
//! A backup directory has the layout of a data dir (so `kappakv verify --data-dir BACKUP`
//! checks it), plus [`MANIFEST_FILE`]:
//!
//! ```text
//! BACKUP/
//!   backup.json     format, node id, LSN, version vector, time, segment sizes (written last)
//!   identity.key    0600
//!   tokens          0600, if the data dir has one
//!   peers           if the data dir has one
//!   log/NNNNNNNNNNNNNNNNNNNN.log
//! ```
//!
//! **Consistency:** the backup ends at the last record after which every author's chain ends at
//! a signed entry, as recovery requires, and never after what the node has acknowledged as
//! durable ([`live::bound`]). Next to a running node, that is the durable LSN the node reports
//! when asked: a batch written but not yet synced is left out, and so is one the node will cut
//! back out on a full disk and replace with other entries under the same seqs. With the log's
//! lock free, the backup holds it while it scans for the cut (after syncing the last segment),
//! then copies below the cut, which no later appender or recovery changes. Each source segment
//! is synced again before it is copied. So a restored node never has an entry its source could
//! lose or replace (which would let the source write a different entry with the same seq).
//!
//! **Invariant:** the manifest is written last, after every other file and directory is
//! synced; `kappakv restore` refuses a directory without it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use kappakv_protocol::{DecodeError, Lsn, NodeId, SignedEntry};
use serde::{Deserialize, Serialize};

use super::live::{self, BoundError};
use crate::log::file::{FsLogDir, LogDir, LogFile, OpenMode};
use crate::log::segment::{RecordCursor, RecordDamage, Scanned, segment_bases, segment_name};

/// Name of the manifest in a backup directory.
pub const MANIFEST_FILE: &str = "backup.json";
/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
/// Files of the data dir a backup carries besides the log: (name, required, secret).
pub const IDENTITY_FILES: [(&str, bool, bool); 3] = [
    (crate::identity::IDENTITY_FILE, true, true),
    ("tokens", false, true),
    ("peers", false, false),
];
/// Bytes copied per read.
const COPY_CHUNK_BYTES: usize = 1024 * 1024;

/// What a backup holds, written to [`MANIFEST_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The kappakv version that wrote it.
    pub kappakv_version: String,
    /// The node whose data dir this is.
    pub node_id: NodeId,
    /// The LSN of the last record in the backup.
    pub lsn: Lsn,
    /// Author → last seq in the backup.
    pub version_vector: BTreeMap<NodeId, u64>,
    /// When the backup was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Every segment file and its length in bytes, in log order.
    pub segments: Vec<(String, u64)>,
    /// The other files copied.
    pub files: Vec<String>,
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backup of node {}: {} entries (LSN {}) from {} authors, {} bytes in {} segments",
            self.node_id,
            self.lsn,
            self.lsn,
            self.version_vector.len(),
            self.segments.iter().map(|(_, b)| b).sum::<u64>(),
            self.segments.len()
        )
    }
}

/// The backup could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The output directory exists and is not empty.
    #[error("{path} exists and is not empty; give a new or empty directory to --out")]
    OutNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The data dir has no log or no identity.
    #[error("{path} is not a kappakv data dir: {what} is missing")]
    NotADataDir {
        /// The data dir.
        path: PathBuf,
        /// What is missing.
        what: &'static str,
    },
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A segment before the last is damaged.
    #[error(
        "segment {segment} is damaged at offset {offset} ({damage}); run `kappakv verify` on the data dir"
    )]
    Damaged {
        /// The segment.
        segment: PathBuf,
        /// Where.
        offset: u64,
        /// What.
        damage: RecordDamage,
    },
    /// A record that does not decode.
    #[error("segment {segment} at offset {offset}: {source}")]
    Decode {
        /// The segment.
        segment: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The identity file.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// How far the log is durable could not be found out (see [`live`]).
    #[error(transparent)]
    Bound(#[from] BoundError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the consistent prefix of the log ends.
#[derive(Debug, Clone, Copy, Default)]
struct Cut {
    /// Index of the segment holding the last record of the prefix.
    segment: usize,
    /// Bytes of that segment in the prefix.
    offset: u64,
    lsn: Lsn,
}

/// Scans the log for its consistent prefix: each segment's length in whole records (up to
/// the segment holding the cut, at least), the cut, and the version vector at the cut.
struct Scan {
    bases: Vec<u64>,
    lengths: Vec<u64>,
    cut: Option<Cut>,
    version_vector: BTreeMap<NodeId, u64>,
}

/// Scans the whole records of `log`, or only those up to `durable` (the LSN a running node
/// reports as durable; the log must hold it), telling `progress` the bytes read so far.
fn scan(
    log: &FsLogDir,
    bound: &live::Bound,
    progress: &mut dyn FnMut(u64),
) -> Result<Scan, BackupError> {
    let durable = bound.durable_lsn();
    let names = log.list().map_err(io_err(log.path()))?;
    let bases = segment_bases(&names);
    let mut lengths = Vec::with_capacity(bases.len());
    let mut cut = None;
    let mut version_vector = BTreeMap::new();
    // Authors whose chain ends unsigned since the last consistent point, and the heads seen
    // since then.
    let mut unsigned: HashSet<NodeId> = HashSet::new();
    let mut since_cut: Vec<(NodeId, u64)> = Vec::new();
    let mut lsn = bases.first().copied().unwrap_or(0);
    // Bytes of the segments before this one, and when progress was last told.
    let mut before = 0;
    let mut told = 0;
    'segments: for (i, &base) in bases.iter().enumerate() {
        let name = segment_name(base);
        let path = log.path().join(&name);
        let file = log.open(&name, OpenMode::Read).map_err(io_err(&path))?;
        let mut cursor = RecordCursor::new(0);
        loop {
            let at = cursor.offset();
            // Past the durable LSN, records may still be cut back out and replaced.
            if durable.is_some_and(|d| lsn >= d) {
                lengths.push(at);
                break 'segments;
            }
            match cursor.next(file.as_ref()).map_err(io_err(&path))? {
                Scanned::Record { offset, payload } => {
                    if before + offset >= told + PROGRESS_BYTES {
                        told = before + offset;
                        progress(told);
                    }
                    let entry = SignedEntry::decode_payload(payload).map_err(|source| {
                        BackupError::Decode {
                            segment: path.clone(),
                            offset,
                            source,
                        }
                    })?;
                    lsn += 1;
                    let author = entry.entry.author;
                    since_cut.push((author, entry.entry.seq));
                    if entry.signature.is_some() {
                        unsigned.remove(&author);
                    } else {
                        unsigned.insert(author);
                    }
                    if unsigned.is_empty() {
                        version_vector.extend(since_cut.drain(..));
                        cut = Some(Cut {
                            segment: i,
                            offset: cursor.offset(),
                            lsn,
                        });
                    }
                }
                Scanned::End => {
                    lengths.push(at);
                    before += at;
                    break;
                }
                Scanned::Damaged { offset, damage } => {
                    // Only the last segment may end in a record being written (or torn).
                    if i + 1 < bases.len() {
                        return Err(BackupError::Damaged {
                            segment: path,
                            offset,
                            damage,
                        });
                    }
                    lengths.push(at);
                    break;
                }
            }
        }
    }
    bound.check_on_disk(log.path(), lsn)?;
    Ok(Scan {
        bases,
        lengths,
        cut,
        version_vector,
    })
}

/// Bytes between two calls of a progress callback.
const PROGRESS_BYTES: u64 = 4 * 1024 * 1024;

/// Copies the first `len` bytes of `from` (a segment being read) to the new file `to`, after
/// syncing `from` so that what is copied is durable on the source, then syncs `to`. `progress`
/// is told the bytes copied after each chunk.
fn copy_prefix(
    from: &mut dyn LogFile,
    from_path: &Path,
    to: &Path,
    len: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), BackupError> {
    from.sync_data().map_err(io_err(from_path))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(io_err(to))?;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len {
        let want = ((len - at) as usize).min(buf.len());
        let n = from
            .read_at(&mut buf[..want], at)
            .map_err(io_err(from_path))?;
        if n == 0 {
            return Err(BackupError::Io {
                path: from_path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("segment shrank below {len} bytes while copying"),
                ),
            });
        }
        out.write_all(&buf[..n]).map_err(io_err(to))?;
        at += n as u64;
        progress(at);
    }
    out.sync_all().map_err(io_err(to))
}

/// Fsyncs a directory, so the entries created in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Whether `dir` is missing or empty.
pub(crate) fn is_missing_or_empty(dir: &Path) -> Result<bool, std::io::Error> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Backs up the data dir `data_dir` into the new or empty directory `out`.
pub fn run(data_dir: &Path, out: &Path) -> Result<Manifest, BackupError> {
    run_observed(data_dir, out, &mut |_, _| {})
}

/// Backs up like [`run`], telling `progress` the bytes of the log read so far (scanned, then
/// copied) out of those to read.
pub fn run_observed(
    data_dir: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, BackupError> {
    if !is_missing_or_empty(out).map_err(io_err(out))? {
        return Err(BackupError::OutNotEmpty {
            path: out.to_path_buf(),
        });
    }
    let log_path = crate::log::log_dir(data_dir);
    if !log_path.is_dir() {
        return Err(BackupError::NotADataDir {
            path: data_dir.to_path_buf(),
            what: "the log directory",
        });
    }
    let identity_path = data_dir.join(crate::identity::IDENTITY_FILE);
    if !identity_path.is_file() {
        return Err(BackupError::NotADataDir {
            path: data_dir.to_path_buf(),
            what: "identity.key",
        });
    }
    let node_id = crate::identity::load(&identity_path)?.node_id();

    let log = FsLogDir::new(&log_path);
    let bound = live::bound(data_dir)?;
    // The log's size, for progress only: the copy reads each segment up to the cut again.
    let log_bytes: u64 = log
        .list()
        .map_err(io_err(&log_path))?
        .iter()
        .filter_map(|name| std::fs::metadata(log_path.join(name)).ok())
        .map(|m| m.len())
        .sum();
    let scan = scan(&log, &bound, &mut |done| progress(done, 2 * log_bytes))?;
    // Below the cut nothing changes any more, not even with a node started now on a log that
    // was not locked: the lock, if ours, can go.
    drop(bound);
    let out_log = crate::log::log_dir(out);
    std::fs::create_dir_all(&out_log).map_err(io_err(&out_log))?;
    let mut segments = Vec::new();
    // Segments up to the one holding the cut; with no record at all, an empty first segment.
    let keep = scan.cut.map_or(1.min(scan.bases.len()), |c| c.segment + 1);
    let copy_len = |i: usize| match scan.cut {
        Some(c) if c.segment == i => c.offset,
        Some(_) => scan.lengths[i],
        None => 0,
    };
    let total = log_bytes + (0..keep).map(copy_len).sum::<u64>();
    let mut copied = 0;
    for i in 0..keep {
        let name = segment_name(scan.bases[i]);
        let from_path = log_path.join(&name);
        let len = copy_len(i);
        let mut from = log
            .open(&name, OpenMode::Read)
            .map_err(io_err(&from_path))?;
        copy_prefix(
            from.as_mut(),
            &from_path,
            &out_log.join(&name),
            len,
            &mut |n| progress(log_bytes + copied + n, total),
        )?;
        copied += len;
        segments.push((name, len));
    }
    progress(total, total);
    sync_dir(&out_log)?;

    let mut files = Vec::new();
    for (name, required, secret) in IDENTITY_FILES {
        let from = data_dir.join(name);
        let bytes = match std::fs::read(&from) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(e) => return Err(io_err(&from)(e)),
        };
        let to = out.join(name);
        write_file(&to, &bytes, secret)?;
        files.push(name.to_string());
    }

    let manifest = Manifest {
        format: FORMAT,
        kappakv_version: env!("CARGO_PKG_VERSION").to_string(),
        node_id,
        lsn: scan.cut.map_or(0, |c| c.lsn),
        version_vector: scan.version_vector,
        created_unix_ms: crate::unix_now_ms(),
        segments,
        files,
    };
    sync_dir(out)?;
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    write_file(&out.join(MANIFEST_FILE), &json, false)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(manifest)
}

/// Writes a new file and syncs it and its directory; `secret` files get mode 0600.
pub(crate) fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), BackupError> {
    if secret {
        return crate::auth::write_private(path, bytes).map_err(io_err(path));
    }
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}
