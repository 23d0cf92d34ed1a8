//! [`Snapshot`]: every query, answered from one redb read transaction, so all answers of one
//! snapshot agree with each other and with the checkpoints it reports. Reads never block the
//! writer.
//!
//! A table that does not exist (a view that was just reset and has applied nothing) reads as
//! empty.

use std::ops::Bound;

use kappakv_protocol::{EntryId, KeyRange, KeyVersions, Lsn, NodeId, Version};
use redb::{
    Key, ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition, TableError, Value,
};

use crate::checkpoint;
use crate::digest::StateDigest;
use crate::error::{CorruptRecord, ReadError};
use crate::record::{CurrentVersion, HistoryRecord, decode_current};
use crate::tables::{
    HISTORY_LATEST, HISTORY_LATEST_NAME, HISTORY_RECORDS, HISTORY_RECORDS_NAME, KV_CURRENT,
    KV_DIGEST, KV_DIGEST_ROW, KV_SUPERSEDED, KV_VIEW, LOG_AUTHOR_HEAD, LOG_AUTHOR_SEQ_LSN,
    LOG_LOOKUP_VIEW, VIEW_CHECKPOINTS,
};
use crate::views::kv::decode_digest;

/// A consistent, read-only view of every index as of one commit.
pub struct Snapshot {
    txn: ReadTransaction,
    /// The database, when the snapshot opened it itself ([`Snapshot::open_read_only`]).
    _db: Option<redb::ReadOnlyDatabase>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    pub(crate) fn new(txn: ReadTransaction) -> Self {
        Self { txn, _db: None }
    }

    /// A snapshot of the index file at `path`, opened read-only: `Ok(None)` when there is no
    /// file; an error when it cannot be opened, such as while a node has it open.
    pub fn open_read_only(path: &std::path::Path) -> Result<Option<Self>, redb::Error> {
        if !path.exists() {
            return Ok(None);
        }
        use redb::ReadableDatabase as _;
        let db = redb::ReadOnlyDatabase::open(path)?;
        let txn = db.begin_read()?;
        Ok(Some(Self { txn, _db: Some(db) }))
    }

    pub(crate) fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        definition: TableDefinition<K, V>,
    ) -> Result<Option<ReadOnlyTable<K, V>>, ReadError> {
        match self.txn.open_table(definition) {
            Ok(table) => Ok(Some(table)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The LSN the view named `view` has applied in this snapshot; `0` if it has none.
    pub fn applied_lsn(&self, view: &str) -> Result<Lsn, ReadError> {
        let Some(table) = self.table(VIEW_CHECKPOINTS)? else {
            return Ok(0);
        };
        Ok(checkpoint::read(&table, view)?.map_or(0, |cp| cp.applied_lsn))
    }

    /// The LSN the key/value view has applied: every kv answer of this snapshot reflects
    /// exactly the log up to it.
    pub fn kv_applied_lsn(&self) -> Result<Lsn, ReadError> {
        self.applied_lsn(KV_VIEW)
    }

    /// The state digest of the key/value view ([`crate::digest`]), as of
    /// [`Snapshot::kv_applied_lsn`].
    pub fn state_digest(&self) -> Result<StateDigest, ReadError> {
        let Some(table) = self.table(KV_DIGEST)? else {
            return Ok(StateDigest::new());
        };
        let row = table.get(KV_DIGEST_ROW)?;
        Ok(decode_digest(row.as_ref().map(redb::AccessGuard::value))?)
    }

    /// The current versions of `key`: values without tombstones ordered by (timestamp, id),
    /// and the context (every current id, tombstones included, ascending).
    pub fn get(&self, key: &[u8]) -> Result<KeyVersions, ReadError> {
        let Some(table) = self.table(KV_CURRENT)? else {
            return Ok(key_versions(key, &[]));
        };
        let Some(row) = table.get(key)? else {
            return Ok(key_versions(key, &[]));
        };
        let mut set = Vec::new();
        decode_current(row.value(), &mut set)?;
        Ok(key_versions(key, &set))
    }

    /// Up to `limit` keys in `range` in key order, each with its current versions, leaving out
    /// keys whose current versions are all tombstones. The second value is the last key
    /// returned when more keys follow (pass it as `start_after`), else `None`. A `limit` of 0
    /// returns nothing and no resume key.
    pub fn scan(
        &self,
        range: &KeyRange,
        limit: usize,
    ) -> Result<(Vec<KeyVersions>, Option<Vec<u8>>), ReadError> {
        self.scan_within(range, limit, usize::MAX)
    }

    /// Like [`Snapshot::scan`], but the page also ends, with a resume key, once the keys and
    /// values it holds reach `bytes_max` (it always holds at least one key).
    pub fn scan_within(
        &self,
        range: &KeyRange,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<KeyVersions>, Option<Vec<u8>>), ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let Some(table) = self.table(KV_CURRENT)? else {
            return Ok((out, None));
        };
        if limit == 0 {
            return Ok((out, None));
        }
        let lower = lower_bound(range);
        if let (Some(end), Some((start, _))) = (range.end.as_deref(), lower)
            && start >= end
        {
            return Ok((out, None));
        }
        let lower = match lower {
            None => Bound::Unbounded,
            Some((key, true)) => Bound::Excluded(key),
            Some((key, false)) => Bound::Included(key),
        };
        let upper = range
            .end
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded);

        for row in table.range::<&[u8]>((lower, upper))? {
            let (k, v) = row?;
            let key = k.value();
            if range.prefix.as_deref().is_some_and(|p| !key.starts_with(p)) {
                // Every later key sorts after the prefix's range too.
                break;
            }
            if !range.contains(key) {
                continue;
            }
            let mut set = Vec::new();
            decode_current(v.value(), &mut set)?;
            if set.iter().all(|v| v.value.is_none()) {
                continue;
            }
            if out.len() == limit || bytes >= bytes_max {
                // Another visible key follows the page.
                let resume = out.last().map(|kv: &KeyVersions| kv.key.clone());
                return Ok((out, resume));
            }
            let kv = key_versions(key, &set);
            bytes += kv.key.len()
                + kv.values
                    .iter()
                    .map(|v| v.value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
            out.push(kv);
        }
        Ok((out, None))
    }

    /// Up to `limit` versions of `key` ever written, tombstones included, newest (highest LSN)
    /// first.
    pub fn history(&self, key: &[u8], limit: usize) -> Result<Vec<Version>, ReadError> {
        self.history_within(key, limit, usize::MAX)
    }

    /// Like [`Snapshot::history`], but stops once the values read reach `bytes_max` (it always
    /// returns at least one version if there is one).
    pub fn history_within(
        &self,
        key: &[u8],
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<Version>, ReadError> {
        let Some(latest) = self.table(HISTORY_LATEST)? else {
            return Ok(Vec::new());
        };
        let Some(records) = self.table(HISTORY_RECORDS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = latest.get(key)?.map(|g| g.value());
        while let Some(at) = next {
            if out.len() >= limit || bytes >= bytes_max {
                break;
            }
            let record = records.get(at)?.ok_or(CorruptRecord {
                table: HISTORY_LATEST_NAME,
                reason: "a link to a missing history record",
            })?;
            let rec = HistoryRecord::decode(record.value())?;
            // Links point back in the log, so the walk ends.
            if rec.previous.is_some_and(|previous| previous >= at) {
                return Err(CorruptRecord {
                    table: HISTORY_RECORDS_NAME,
                    reason: "a link that does not point back in the log",
                }
                .into());
            }
            next = rec.previous;
            bytes += rec.value.map_or(0, <[u8]>::len);
            out.push(Version {
                id: rec.id,
                author: rec.author,
                timestamp: rec.timestamp,
                value: rec.value.map(<[u8]>::to_vec),
            });
        }
        Ok(out)
    }

    /// Author → highest seq in the log, ascending by author.
    pub fn version_vector(&self) -> Result<Vec<(NodeId, u64)>, ReadError> {
        let Some(table) = self.table(LOG_AUTHOR_HEAD)? else {
            return Ok(Vec::new());
        };
        table
            .iter()?
            .map(|row| {
                let (k, v) = row?;
                Ok((NodeId(*k.value()), v.value().0))
            })
            .collect()
    }

    /// The author's head: its highest seq in the log and that entry's id.
    pub fn author_head(&self, author: &NodeId) -> Result<Option<(u64, EntryId)>, ReadError> {
        let Some(table) = self.table(LOG_AUTHOR_HEAD)? else {
            return Ok(None);
        };
        Ok(table.get(&author.0)?.map(|g| {
            let (seq, id) = g.value();
            (seq, EntryId(*id))
        }))
    }

    /// The entry the log holds at (`author`, `seq`): the LSN of its record and its id. The log
    /// holds an entry exactly when this names its id (an id covers the author and seq).
    pub fn entry_at(&self, author: &NodeId, seq: u64) -> Result<Option<(Lsn, EntryId)>, ReadError> {
        let Some(table) = self.table(LOG_AUTHOR_SEQ_LSN)? else {
            return Ok(None);
        };
        Ok(table.get((&author.0, seq))?.map(|g| {
            let (lsn, id) = g.value();
            (lsn, EntryId(*id))
        }))
    }

    /// The LSN of the record holding `author`'s entry `seq`, if the log holds it.
    pub fn author_seq_lsn(&self, author: &NodeId, seq: u64) -> Result<Option<Lsn>, ReadError> {
        Ok(self.entry_at(author, seq)?.map(|(lsn, _)| lsn))
    }

    /// The LSN the log lookup view has applied: its answers ([`Snapshot::version_vector`],
    /// [`Snapshot::entry_at`], [`Snapshot::author_seq_lsn`]…) reflect exactly the log up to it.
    pub fn log_lookup_applied_lsn(&self) -> Result<Lsn, ReadError> {
        self.applied_lsn(LOG_LOOKUP_VIEW)
    }

    /// The ids of every current version of `key`, tombstones included, ascending: what a write
    /// with `supersedes: None` replaces, as of [`Snapshot::kv_applied_lsn`].
    pub fn current_ids(&self, key: &[u8]) -> Result<Vec<EntryId>, ReadError> {
        let Some(table) = self.table(KV_CURRENT)? else {
            return Ok(Vec::new());
        };
        let Some(row) = table.get(key)? else {
            return Ok(Vec::new());
        };
        let mut set = Vec::new();
        decode_current(row.value(), &mut set)?;
        Ok(set.iter().map(|v| v.id).collect())
    }

    /// Whether an applied op on `key` superseded version `id` before that version was applied.
    /// Exact for versions the kv view has not applied (what the writer's overlay asks about);
    /// for an applied version, check [`Snapshot::current_ids`] instead.
    pub fn is_superseded(&self, key: &[u8], id: &EntryId) -> Result<bool, ReadError> {
        let Some(table) = self.table(KV_SUPERSEDED)? else {
            return Ok(false);
        };
        Ok(table.get((key, &id.0))?.is_some())
    }
}

/// The tightest lower bound of `range` as `(key, exclusive)`.
fn lower_bound(range: &KeyRange) -> Option<(&[u8], bool)> {
    let candidates = [
        range.prefix.as_deref().map(|k| (k, false)),
        range.start.as_deref().map(|k| (k, false)),
        range.start_after.as_deref().map(|k| (k, true)),
    ];
    // Tuples order by key, then `false < true`: on equal keys the exclusive bound is tighter.
    candidates.into_iter().flatten().max()
}

/// The answer for one key, from its current versions (ascending by id).
pub(crate) fn key_versions(key: &[u8], set: &[CurrentVersion<'_>]) -> KeyVersions {
    let mut values: Vec<Version> = set
        .iter()
        .filter_map(|v| {
            v.value.map(|value| Version {
                id: v.id,
                author: v.author,
                timestamp: v.timestamp,
                value: Some(value.to_vec()),
            })
        })
        .collect();
    values.sort_unstable_by_key(|v| (v.timestamp, v.id));
    KeyVersions {
        key: key.to_vec(),
        values,
        context: set.iter().map(|v| v.id).collect(),
    }
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::{Entry, Op, SignedEntry, Timestamp};

    use super::*;
    use crate::runner::Indexes;
    use crate::views::default_views;

    fn entry(seq: u64, op: Op) -> SignedEntry {
        let entry = Entry {
            author: NodeId([1; 32]),
            seq,
            prev: (seq > 1).then_some(EntryId([0; 32])),
            timestamp: Timestamp(100 - seq),
            ops: vec![op],
        };
        SignedEntry {
            id: entry.id(),
            entry,
            signature: None,
        }
    }

    fn put(seq: u64, key: &str, supersedes: Vec<EntryId>) -> SignedEntry {
        entry(
            seq,
            Op::Put {
                key: key.into(),
                value: key.into(),
                supersedes,
            },
        )
    }

    fn keys(page: &[KeyVersions]) -> Vec<&str> {
        page.iter()
            .map(|kv| std::str::from_utf8(&kv.key).unwrap())
            .collect()
    }

    /// Keys `a`, `b` (deleted), `ba`, `bb` (two siblings), `c`, `d` (deleted).
    fn fixture() -> Indexes {
        let (indexes, _) = Indexes::open_in_memory(default_views()).unwrap();
        let b = put(2, "b", vec![]);
        let d = put(7, "d", vec![]);
        let entries = vec![
            put(1, "a", vec![]),
            b.clone(),
            entry(
                3,
                Op::Delete {
                    key: b"b".to_vec(),
                    supersedes: vec![b.id],
                },
            ),
            put(4, "ba", vec![]),
            put(5, "bb", vec![]),
            put(6, "bb", vec![]),
            d.clone(),
            entry(
                8,
                Op::Delete {
                    key: b"d".to_vec(),
                    supersedes: vec![d.id],
                },
            ),
            put(9, "c", vec![]),
        ];
        let batch: Vec<_> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as Lsn + 1, e))
            .collect();
        indexes.apply(&batch, false).unwrap();
        indexes
    }

    #[test]
    fn get_hides_tombstones_but_keeps_them_in_the_context() {
        let indexes = fixture();
        let snap = indexes.snapshot().unwrap();
        let b = snap.get(b"b").unwrap();
        assert!(b.values.is_empty());
        assert_eq!(b.context.len(), 1);
        assert_eq!(snap.current_ids(b"b").unwrap(), b.context);
        let bb = snap.get(b"bb").unwrap();
        assert_eq!(bb.values.len(), 2);
        // Ordered by timestamp (seq 6 has the earlier one here), context by id.
        assert!(bb.values[0].timestamp < bb.values[1].timestamp);
        assert!(bb.context[0] < bb.context[1]);
        assert_eq!(snap.get(b"zz").unwrap().context, []);
        let history = snap.history(b"b", 10).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].value, None, "newest first: the delete");
        assert_eq!(snap.history(b"b", 1).unwrap().len(), 1);
        assert_eq!(snap.kv_applied_lsn().unwrap(), 9);
    }

    #[test]
    fn scan_honours_every_bound_and_skips_tombstoned_keys() {
        let indexes = fixture();
        let snap = indexes.snapshot().unwrap();
        let scan = |range: KeyRange, limit| {
            let (page, resume) = snap.scan(&range, limit).unwrap();
            (
                keys(&page).join(","),
                resume.map(|k| String::from_utf8(k).unwrap()),
            )
        };
        let r =
            |prefix: Option<&str>, start: Option<&str>, end: Option<&str>, after: Option<&str>| {
                KeyRange {
                    prefix: prefix.map(Into::into),
                    start: start.map(Into::into),
                    end: end.map(Into::into),
                    start_after: after.map(Into::into),
                }
            };
        assert_eq!(
            scan(r(None, None, None, None), 100),
            ("a,ba,bb,c".into(), None)
        );
        assert_eq!(
            scan(r(None, None, None, None), 2),
            ("a,ba".into(), Some("ba".into()))
        );
        assert_eq!(
            scan(r(None, None, None, Some("ba")), 2),
            ("bb,c".into(), None)
        );
        // The last visible key is followed only by a tombstoned key: no resume key.
        assert_eq!(scan(r(None, Some("c"), None, None), 1), ("c".into(), None));
        assert_eq!(
            scan(r(Some("b"), None, None, None), 100),
            ("ba,bb".into(), None)
        );
        assert_eq!(
            scan(r(Some("b"), Some("bb"), None, None), 100),
            ("bb".into(), None)
        );
        assert_eq!(
            scan(r(None, Some("b"), Some("c"), None), 100),
            ("ba,bb".into(), None)
        );
        assert_eq!(
            scan(r(None, None, Some("bb"), None), 100),
            ("a,ba".into(), None)
        );
        assert_eq!(
            scan(r(None, Some("b"), None, Some("b")), 100),
            ("ba,bb,c".into(), None)
        );
        assert_eq!(
            scan(r(None, Some("c"), Some("b"), None), 100),
            (String::new(), None)
        );
        assert_eq!(
            scan(r(None, None, None, Some("zz")), 100),
            (String::new(), None)
        );
        assert_eq!(scan(r(None, None, None, None), 0), (String::new(), None));
    }

    #[test]
    fn a_reset_view_reads_as_empty() {
        let indexes = fixture();
        indexes.rebuild(None).unwrap();
        let snap = indexes.snapshot().unwrap();
        assert_eq!(snap.get(b"a").unwrap().context, []);
        assert_eq!(snap.scan(&KeyRange::default(), 10).unwrap(), (vec![], None));
        assert_eq!(snap.history(b"a", 10).unwrap(), []);
        assert_eq!(snap.version_vector().unwrap(), []);
        assert!(!snap.is_superseded(b"b", &EntryId([0; 32])).unwrap());
        assert_eq!(snap.kv_applied_lsn().unwrap(), 0);
    }
}
