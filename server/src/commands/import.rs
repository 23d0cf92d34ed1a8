//! `kappakv import`: appends every verifiable entry of export files that the log lacks, offline.
//!
//! # Steps
//!
//! 1. Open the log with [`LogStore::open`], which takes its exclusive lock: the node must not
//!    be running. Its recovery gives each author's chain head.
//! 2. Read every record of every input (the format of [`super::export`]; concatenated files are
//!    just more records). A record that does not decode to a canonical entry is rejected; a
//!    damaged or torn record ends its file, the other files still count.
//! 3. Group the entries by author and seq, merging copies of one entry (keeping a signature if
//!    any copy has one). The order of the input does not matter.
//! 4. Per author, entries at or below the log's head are compared with the log: the same id is
//!    *already present*, another id is an *equivocation*. Above the head, the chain is followed
//!    from the head by seq and `prev`; every signature met is verified, and an entry is
//!    accepted only once a verified signature at or after it in the chain covers it (DESIGN.md,
//!    "Signatures cover chains"). Where the chain breaks (a gap, a bad link, a bad signature,
//!    two different entries for one seq), the rest of that author's entries are rejected with
//!    the reason, and so are unsigned entries before the break.
//! 5. Append the accepted entries with [`LogStore::append`], interleaving authors by timestamp
//!    a signed run at a time (which follows causality for entries written on nodes that had
//!    seen each other, and keeps one author's run open at a time, as the writer does), in
//!    batches that each end with every author's run at a signed entry: the log's recovery
//!    relies on that (see [`recovery`](crate::log::recovery)).
//!
//! With the node's `writers` allow-list, entries of other authors are rejected, as they are
//! from peers.
//!
//! The views are not touched: the node's indexer catches up from the log when it next starts.
//!
//! Importing is idempotent: a second run of the same input finds everything already present.
//! Inputs are held in memory while they are checked.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use kappakv_protocol::limits::{MAX_RECORD_BYTES, MAX_UNSIGNED_RUN_BYTES};
use kappakv_protocol::record::{RecordDecode, decode_record};
use kappakv_protocol::sign::verify_signature;
use kappakv_protocol::verify::{ChainHead, check_link};
use kappakv_protocol::{EntryId, Lsn, NodeId, SignedEntry, Timestamp, VerifyError};

use crate::log::{
    AppendError, LogConfig, LogReader, LogStore, OpenLogError, ReadLogError, Recovery,
};

/// A batch is appended once it holds this many entries and every author in it ends signed.
const BATCH_ENTRIES_MAX: usize = 4096;
/// A batch is appended once it holds this many bytes and every author in it ends signed.
const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

/// One input: a name for messages (a path, or `-` for standard input) and its bytes.
#[derive(Debug, Clone)]
pub struct ImportSource {
    /// How messages name it.
    pub name: String,
    /// Its records.
    pub bytes: Vec<u8>,
}

impl ImportSource {
    /// Reads the file `path`, or standard input when it is `-`.
    pub fn read(path: &Path) -> Result<Self, ImportError> {
        let name = path.display().to_string();
        let read_err = |source| ImportError::Input {
            file: name.clone(),
            source,
        };
        let bytes = if path.as_os_str() == "-" {
            let mut buf = Vec::new();
            io::stdin().lock().read_to_end(&mut buf).map_err(read_err)?;
            buf
        } else {
            std::fs::read(path).map_err(read_err)?
        };
        Ok(Self { name, bytes })
    }
}

/// Why an entry was not imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The node's `writers` allow-list does not name the author.
    #[error("the author is not on the node's `writers` list")]
    NotAllowed,
    /// The log has a different entry for this (author, seq).
    #[error("equivocation: the log has a different entry ({existing}) for this seq")]
    Equivocation {
        /// The entry in the log.
        existing: EntryId,
    },
    /// The input has more than one entry for this (author, seq) that extends the chain.
    #[error("equivocation: the input holds {count} different entries for this seq")]
    Fork {
        /// How many.
        count: usize,
    },
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The author id is not an ed25519 public key.
    #[error("the author id is not a valid ed25519 public key")]
    BadAuthorKey,
    /// `prev` is not the id of the previous entry of the chain.
    #[error("prev link does not match the previous entry of the chain ({})", expected.map_or_else(|| "none".to_string(), |id| id.to_string()))]
    BadLink {
        /// The id of the previous entry (in the log or accepted from the input).
        expected: Option<EntryId>,
    },
    /// An earlier seq is in neither the log nor the input.
    #[error("gap: seq {missing} of this author is in neither the log nor the input")]
    Gap {
        /// The first missing seq.
        missing: u64,
    },
    /// An earlier entry of the chain was rejected.
    #[error("follows seq {seq}, which was rejected")]
    AfterRejected {
        /// The rejected seq.
        seq: u64,
    },
    /// It is part of a run of unsigned entries longer than the protocol lets a log hold.
    #[error("part of an unsigned run of more than {max} bytes, which no peer would take")]
    RunTooLong {
        /// The protocol's bound, `MAX_UNSIGNED_RUN_BYTES`.
        max: usize,
    },
    /// No verified signature covers it.
    #[error("not covered by a signature: {}", match broken_at {
        Some(seq) => format!("the chain breaks at seq {seq} before a valid signature"),
        None => "no signed entry follows it in the input".to_string(),
    })]
    Unsigned {
        /// Where the chain broke, if it did.
        broken_at: Option<u64>,
    },
}

/// Something in the input that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A record that cannot be read or decoded.
    Record {
        /// The input.
        file: String,
        /// Byte offset of the record in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A decoded entry.
    Entry {
        /// Its author.
        author: NodeId,
        /// Its seq.
        seq: u64,
        /// Its id.
        id: EntryId,
        /// Why.
        reason: RejectReason,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Record {
                file,
                offset,
                reason,
            } => write!(f, "{file} at offset {offset}: {reason}"),
            Rejection::Entry {
                author,
                seq,
                id,
                reason,
            } => write!(f, "author {author} seq {seq} (entry {id}): {reason}"),
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportSummary {
    /// Records read from the inputs.
    pub records: u64,
    /// Entries appended to the log.
    pub new: u64,
    /// Distinct entries of the input that the log already had.
    pub present: u64,
    /// What was not imported, records first, then entries by author and seq.
    pub rejected: Vec<Rejection>,
    /// The log's last LSN afterwards.
    pub last_lsn: Lsn,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} new, {} already present, {} rejected",
            self.new,
            self.present,
            self.rejected.len()
        )
    }
}

/// The import could not run, or failed part-way (what was appended before stays: every batch
/// is a complete, signed extension of the log).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// Opening the log failed; [`OpenLogError::Locked`] when the node is running.
    #[error(transparent)]
    Open(#[from] OpenLogError),
    /// An input cannot be read.
    #[error("reading {file}: {source}")]
    Input {
        /// The input.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the log back (to compare entries it already has) failed.
    #[error("reading the log: {0}")]
    ReadLog(#[from] ReadLogError),
    /// Appending failed.
    #[error("appending to the log: {0}")]
    Append(#[from] AppendError),
}

/// Imports the files `paths` (`-` is standard input) into the log of `data_dir`. With
/// `writers`, only entries of those authors are taken, as from peers.
#[allow(clippy::implicit_hasher)]
pub fn run(
    data_dir: &Path,
    paths: &[PathBuf],
    writers: Option<HashSet<NodeId>>,
) -> Result<ImportSummary, ImportError> {
    run_observed(data_dir, paths, writers, &mut |_, _| {})
}

/// Imports like [`run`], telling `progress` the bytes of the files decoded so far out of their
/// total (standard input counts once it is read).
#[allow(clippy::implicit_hasher)]
pub fn run_observed(
    data_dir: &Path,
    paths: &[PathBuf],
    writers: Option<HashSet<NodeId>>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportSummary, ImportError> {
    let mut importer = Importer::open(data_dir, writers)?;
    let mut total: u64 = paths
        .iter()
        .filter(|p| p.as_os_str() != "-")
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut done = 0;
    for path in paths {
        let source = ImportSource::read(path)?;
        if path.as_os_str() == "-" {
            total += source.bytes.len() as u64;
        }
        importer.add(&source, &mut |at| progress(done + at, total));
        done += source.bytes.len() as u64;
    }
    progress(done, total.max(done));
    importer.finish()
}

/// Imports in-memory inputs into the log of `data_dir` (see [`run`]).
#[allow(clippy::implicit_hasher)]
pub fn run_sources(
    data_dir: &Path,
    sources: &[ImportSource],
    writers: Option<HashSet<NodeId>>,
) -> Result<ImportSummary, ImportError> {
    let mut importer = Importer::open(data_dir, writers)?;
    for source in sources {
        importer.add(source, &mut |_| {});
    }
    importer.finish()
}

/// An import in progress: the locked log and the decoded inputs.
struct Importer {
    log_dir: PathBuf,
    store: LogStore,
    recovery: Recovery,
    /// Distinct entries of the input, by author and seq.
    input: BTreeMap<NodeId, BTreeMap<u64, Vec<SignedEntry>>>,
    summary: ImportSummary,
    record_rejections: Vec<Rejection>,
    /// When set, only these authors' entries are taken.
    writers: Option<HashSet<NodeId>>,
}

impl Importer {
    fn open(data_dir: &Path, writers: Option<HashSet<NodeId>>) -> Result<Self, ImportError> {
        let log_dir = crate::log::log_dir(data_dir);
        let (store, recovery) = LogStore::open(&log_dir, &LogConfig::default())?;
        Ok(Self {
            log_dir,
            store,
            recovery,
            input: BTreeMap::new(),
            summary: ImportSummary::default(),
            record_rejections: Vec::new(),
            writers,
        })
    }

    /// Decodes every record of `source`, telling `progress` the bytes decoded now and then.
    fn add(&mut self, source: &ImportSource, progress: &mut dyn FnMut(u64)) {
        const PROGRESS_BYTES: usize = 4 * 1024 * 1024;
        let bytes = &source.bytes[..];
        let mut at = 0;
        let mut told = 0;
        while at < bytes.len() {
            if at >= told + PROGRESS_BYTES {
                told = at;
                progress(at as u64);
            }
            let reject = |reason: String| Rejection::Record {
                file: source.name.clone(),
                offset: at as u64,
                reason,
            };
            match decode_record(&bytes[at..], MAX_RECORD_BYTES) {
                Ok(RecordDecode::Record { payload, used }) => {
                    self.summary.records += 1;
                    match SignedEntry::decode_payload(payload) {
                        Ok(e) => self.add_entry(e),
                        Err(e) => self.record_rejections.push(reject(e.to_string())),
                    }
                    at += used;
                }
                Ok(RecordDecode::NeedMore { needed }) => {
                    self.record_rejections.push(reject(format!(
                        "torn record at the end of the file ({needed} bytes missing)"
                    )));
                    break;
                }
                Err(e) => {
                    // The length cannot be trusted, so neither can anything after it.
                    self.record_rejections.push(reject(format!(
                        "damaged record ({e}); the remaining {} bytes of the file are skipped",
                        bytes.len() - at
                    )));
                    break;
                }
            }
        }
    }

    fn add_entry(&mut self, e: SignedEntry) {
        let copies = self
            .input
            .entry(e.entry.author)
            .or_default()
            .entry(e.entry.seq)
            .or_default();
        let Some(same) = copies.iter_mut().find(|c| c.id == e.id) else {
            copies.push(e);
            return;
        };
        // Copies of one entry: keep a signature that verifies, if any copy has one.
        let keep_new = match (&same.signature, &e.signature) {
            (None, Some(_)) => true,
            (Some(old), Some(new)) if old != new => {
                verify_signature(&same.entry.author, same.entry.seq, &same.id, old).is_err()
            }
            _ => false,
        };
        if keep_new {
            same.signature = e.signature;
        }
    }

    fn finish(mut self) -> Result<ImportSummary, ImportError> {
        let known = self.known_ids()?;
        let input = std::mem::take(&mut self.input);
        let mut rejected = Vec::new();
        let mut accepted = Vec::new();
        for (author, by_seq) in input {
            if self.writers.as_ref().is_some_and(|w| !w.contains(&author)) {
                rejected.extend(by_seq.into_values().flatten().map(|e| Rejection::Entry {
                    author,
                    seq: e.entry.seq,
                    id: e.id,
                    reason: RejectReason::NotAllowed,
                }));
                continue;
            }
            let head = self.recovery.heads.get(&author).copied();
            let plan = plan_author(author, by_seq, head, &known);
            self.summary.present += plan.present;
            rejected.extend(plan.rejected);
            if !plan.accepted.is_empty() {
                accepted.push(VecDeque::from(plan.accepted));
            }
        }
        rejected.sort_by_key(|r| match r {
            Rejection::Entry { author, seq, .. } => Some((*author, *seq)),
            Rejection::Record { .. } => None,
        });
        self.summary.new = append_interleaved(&mut self.store, accepted)?;
        self.summary.last_lsn = self.store.last_lsn();
        let mut summary = self.summary;
        summary.rejected = self.record_rejections;
        summary.rejected.extend(rejected);
        Ok(summary)
    }

    /// The ids the log holds at the (author, seq)s of the input at or below the author's head.
    /// The head itself is known from recovery; anything older is read back from the log.
    fn known_ids(&self) -> Result<HashMap<(NodeId, u64), EntryId>, ImportError> {
        let mut wanted = HashSet::new();
        for (author, by_seq) in &self.input {
            if let Some(head) = self.recovery.heads.get(author) {
                wanted.extend(by_seq.range(..head.seq).map(|(seq, _)| (*author, *seq)));
            }
        }
        let mut known = HashMap::with_capacity(wanted.len());
        if wanted.is_empty() {
            return Ok(known);
        }
        let reader = LogReader::open(&self.log_dir)?;
        for item in reader.iter(0, self.store.last_lsn())? {
            let (_, e) = item?;
            let key = (e.entry.author, e.entry.seq);
            if wanted.contains(&key) {
                known.insert(key, e.id);
                if known.len() == wanted.len() {
                    break;
                }
            }
        }
        Ok(known)
    }
}

/// What to do with one author's entries.
#[derive(Debug, Default)]
struct AuthorPlan {
    /// To append, in seq order, extending the log's head; ends at a signed entry.
    accepted: Vec<SignedEntry>,
    present: u64,
    rejected: Vec<Rejection>,
}

/// Follows `author`'s chain through the input from the log's `head`.
fn plan_author(
    author: NodeId,
    mut by_seq: BTreeMap<u64, Vec<SignedEntry>>,
    head: Option<ChainHead>,
    known: &HashMap<(NodeId, u64), EntryId>,
) -> AuthorPlan {
    let mut plan = AuthorPlan::default();
    let reject = |plan: &mut AuthorPlan, e: &SignedEntry, reason: RejectReason| {
        plan.rejected.push(Rejection::Entry {
            author,
            seq: e.entry.seq,
            id: e.id,
            reason,
        });
    };
    let head_seq = head.map_or(0, |h| h.seq);
    let above = by_seq.split_off(&(head_seq + 1));
    for (seq, copies) in by_seq {
        let existing = if seq == head_seq {
            head.map(|h| h.id)
        } else {
            known.get(&(author, seq)).copied()
        };
        let existing = existing.expect("the log holds every seq up to its head");
        for e in copies {
            if e.id == existing {
                plan.present += 1;
            } else {
                reject(&mut plan, &e, RejectReason::Equivocation { existing });
            }
        }
    }

    let mut cursor = head;
    // Entries that link but wait for a signature, and their record payload bytes.
    let mut waiting: Vec<SignedEntry> = Vec::new();
    let mut waiting_bytes = 0usize;
    // Once the chain breaks, why every later entry is rejected.
    let mut broken: Option<(u64, RejectReason)> = None;
    for (seq, copies) in above {
        if let Some((_, reason)) = &broken {
            for e in &copies {
                reject(&mut plan, e, reason.clone());
            }
            continue;
        }
        let expected = cursor.map_or(1, |h| h.seq + 1);
        if seq != expected {
            let reason = RejectReason::Gap { missing: expected };
            for e in &copies {
                reject(&mut plan, e, reason.clone());
            }
            broken = Some((expected, reason));
            continue;
        }
        let (mut linking, unlinked): (Vec<_>, Vec<_>) = copies
            .into_iter()
            .partition(|e| check_link(cursor.as_ref(), &e.entry).is_ok());
        for e in &unlinked {
            let expected = cursor.map(|h| h.id);
            reject(&mut plan, e, RejectReason::BadLink { expected });
        }
        if linking.len() != 1 {
            let count = linking.len();
            for e in &linking {
                reject(&mut plan, e, RejectReason::Fork { count });
            }
            broken = Some((seq, RejectReason::AfterRejected { seq }));
            continue;
        }
        let e = linking.pop().expect("exactly one");
        if let Some(sig) = &e.signature {
            if let Err(err) = verify_signature(&author, seq, &e.id, sig) {
                let reason = match err {
                    VerifyError::BadAuthorKey { .. } => RejectReason::BadAuthorKey,
                    _ => RejectReason::BadSignature,
                };
                reject(&mut plan, &e, reason);
                broken = Some((seq, RejectReason::AfterRejected { seq }));
                continue;
            }
            plan.accepted.append(&mut waiting);
            waiting_bytes = 0;
            cursor = Some(ChainHead { seq, id: e.id });
            plan.accepted.push(e);
        } else {
            // A run longer than the protocol allows would be refused by every peer of this
            // node, for good: it is not taken in.
            waiting_bytes += e.encode_payload().len();
            if waiting_bytes > MAX_UNSIGNED_RUN_BYTES {
                let reason = RejectReason::RunTooLong {
                    max: MAX_UNSIGNED_RUN_BYTES,
                };
                for w in waiting.drain(..).chain(std::iter::once(e)) {
                    reject(&mut plan, &w, reason.clone());
                }
                broken = Some((seq, RejectReason::AfterRejected { seq }));
                continue;
            }
            cursor = Some(ChainHead { seq, id: e.id });
            waiting.push(e);
        }
    }
    let broken_at = broken.map(|(seq, _)| seq);
    for e in &waiting {
        reject(&mut plan, e, RejectReason::Unsigned { broken_at });
    }
    plan
}

/// Appends every author's accepted entries, interleaved by timestamp one signed run at a time
/// (each author's in seq order): the run whose first entry is oldest goes next, whole, so only
/// one author's run is open at any point of the log, as the writer keeps it (a peer replicating
/// this log waits for one run's signature at a time). Batches end between runs, so every batch
/// leaves each author's chain at a signed entry. Returns how many entries were appended.
fn append_interleaved(
    store: &mut LogStore,
    mut queues: Vec<VecDeque<SignedEntry>>,
) -> Result<u64, AppendError> {
    let front = |queues: &[VecDeque<SignedEntry>], i: usize| -> Option<(Timestamp, usize)> {
        queues[i].front().map(|e| (e.entry.timestamp, i))
    };
    let mut fronts: BTreeSet<(Timestamp, usize)> = (0..queues.len())
        .filter_map(|i| front(&queues, i))
        .collect();
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut batch_bytes = 0;
    let mut appended = 0;
    while let Some((_, i)) = fronts.pop_first() {
        loop {
            let e = queues[i]
                .pop_front()
                .expect("an accepted run ends at a signed entry");
            let signed = e.signature.is_some();
            let payload = e.encode_payload();
            batch_bytes += payload.len();
            batch.push(payload);
            if signed {
                break;
            }
        }
        if let Some(next) = front(&queues, i) {
            fronts.insert(next);
        }
        if batch.len() >= BATCH_ENTRIES_MAX || batch_bytes >= BATCH_BYTES_MAX {
            appended += batch.len() as u64;
            store.append(&batch)?;
            batch.clear();
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        appended += batch.len() as u64;
        store.append(&batch)?;
    }
    Ok(appended)
}
