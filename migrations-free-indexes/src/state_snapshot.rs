//! Snapshots of the key/value state, for a new replica that starts from a trusted peer's
//! state instead of replaying the log first.
//!
//! The sending side reads its kv view in key order ([`Snapshot::state_rows`]): every current
//! version of every key, tombstones included, without the node-local LSN. The receiving side
//! loads the rows into a file of its own ([`StateStore`], `snapshot.redb` in the data dir),
//! in the kv view's layout, so that a [`Snapshot`] of it answers `get` and `scan` like the
//! view does. It recomputes the state digest from the rows as they come and refuses rows out
//! of key order or malformed, so the root it keeps is that of what it holds, whatever the
//! peer claimed. Whether that state is what the log proves is decided later, when the node's
//! own replay of the log reaches the snapshot's version vector.
//!
//! The file holds nothing the log does not: deleting it only makes the node replay first.

use std::ops::Bound;
use std::path::Path;

use kappakv_protocol::{NodeId, StateRoot, Version};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::digest::{DigestVersion, StateDigest};
use crate::error::{CorruptRecord, ReadError, StateLoadError};
use crate::record::{CurrentVersion, decode_current, encode_current};
use crate::snapshot::Snapshot;
use crate::tables::KV_CURRENT;

/// One key of a state snapshot: its current versions, tombstones included, ascending by id.
pub type StateRow = (Vec<u8>, Vec<Version>);

/// What a loaded snapshot is: who sent it, the state at which version vector, and its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMeta {
    /// The peer that sent it.
    pub peer: NodeId,
    /// The version vector of the log the state is derived from.
    pub version_vector: Vec<(NodeId, u64)>,
    /// The root of the state's digest.
    pub root: StateRoot,
    /// Keys in the snapshot.
    pub keys: u64,
}

impl StateMeta {
    /// How many entries the log holds at the snapshot's version vector.
    pub fn entries(&self) -> u64 {
        self.version_vector.iter().map(|(_, seq)| seq).sum()
    }
}

/// The meta row of a complete snapshot. Key: `"meta"`. Value: [`StateMeta`] in MessagePack.
/// Written in the transaction that ends the load, so a file without it is incomplete.
const STATE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot.meta");
const META_ROW: &str = "meta";

/// A snapshot being loaded, or loaded, on the receiving node.
pub struct StateStore {
    db: Database,
    digest: StateDigest,
    last_key: Option<Vec<u8>>,
    keys: u64,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// A new, empty snapshot file at `path`. The caller removes any file there first: this
    /// crate leaves files to the server.
    pub fn create(path: &Path) -> Result<Self, StateLoadError> {
        let db = Database::builder()
            .set_cache_size(crate::DEFAULT_CACHE_BYTES)
            .create(path)?;
        Ok(Self {
            db,
            digest: StateDigest::new(),
            last_key: None,
            keys: 0,
        })
    }

    /// The complete snapshot at `path` and what it is; `None` when there is no file or its
    /// load never finished (the caller deletes it).
    pub fn open(path: &Path) -> Result<Option<(Self, StateMeta)>, StateLoadError> {
        if !path.exists() {
            return Ok(None);
        }
        let db = Database::builder()
            .set_cache_size(crate::DEFAULT_CACHE_BYTES)
            .create(path)?;
        let meta = {
            let txn = db.begin_read()?;
            let table = match txn.open_table(STATE_META) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let Some(row) = table.get(META_ROW)? else {
                return Ok(None);
            };
            rmp_serde::from_slice::<StateMeta>(row.value()).map_err(|_| CorruptRecord {
                table: "snapshot.meta",
                reason: "a meta row that does not decode",
            })?
        };
        let store = Self {
            db,
            digest: StateDigest::new(),
            last_key: None,
            keys: meta.keys,
        };
        Ok(Some((store, meta)))
    }

    /// Loads `rows`, which must follow every row loaded before in key order, in one
    /// transaction that is durable only with [`StateStore::finish`].
    pub fn load(&mut self, rows: &[StateRow]) -> Result<(), StateLoadError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut table = txn.open_table(KV_CURRENT)?;
            let mut buf = Vec::new();
            for (key, versions) in rows {
                if self.last_key.as_ref().is_some_and(|last| key <= last) {
                    return Err(StateLoadError::Order);
                }
                check_row(key, versions)?;
                let set: Vec<CurrentVersion<'_>> = versions
                    .iter()
                    .map(|v| CurrentVersion {
                        id: v.id,
                        author: v.author,
                        timestamp: v.timestamp,
                        lsn: 0,
                        value: v.value.as_deref(),
                    })
                    .collect();
                let digested: Vec<DigestVersion<'_>> =
                    versions.iter().map(DigestVersion::of).collect();
                self.digest.add(key, &digested);
                buf.clear();
                encode_current(&set, &mut buf);
                table.insert(key.as_slice(), buf.as_slice())?;
                self.last_key = Some(key.clone());
                self.keys += 1;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Ends the load: checks the rows against the root the peer announced in `meta` and
    /// commits everything durably with `meta`. After this, [`StateStore::open`] finds it.
    pub fn finish(&mut self, meta: &StateMeta) -> Result<(), StateLoadError> {
        let computed = self.digest.root();
        if computed != meta.root {
            return Err(StateLoadError::Root {
                computed,
                announced: meta.root,
            });
        }
        let meta = StateMeta {
            keys: self.keys,
            ..meta.clone()
        };
        let bytes = rmp_serde::to_vec(&meta).expect("the meta encodes");
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(STATE_META)?;
            table.insert(META_ROW, bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Keys loaded so far.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// A read view of the snapshot's state: `get` and `scan` answer as the kv view would.
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        Ok(Snapshot::new(self.db.begin_read()?))
    }
}

/// Checks one received row: versions present and ascending by id, key and values within the
/// protocol's limits.
fn check_row(key: &[u8], versions: &[Version]) -> Result<(), StateLoadError> {
    use kappakv_protocol::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StateLoadError::Malformed(
            "a key empty or over the key limit",
        ));
    }
    if versions.is_empty() {
        return Err(StateLoadError::Malformed("a key without versions"));
    }
    if versions.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(StateLoadError::Malformed("versions not ascending by id"));
    }
    if versions
        .iter()
        .any(|v| v.value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES))
    {
        return Err(StateLoadError::Malformed("a value over the value limit"));
    }
    Ok(())
}

impl Snapshot {
    /// How many keys the kv view holds (tombstones included).
    pub fn kv_keys(&self) -> Result<u64, ReadError> {
        use redb::ReadableTableMetadata as _;
        let Some(table) = self.table(KV_CURRENT)? else {
            return Ok(0);
        };
        Ok(table.len()?)
    }

    /// The state digest computed afresh from the kv view's rows, to check the one it keeps
    /// ([`Snapshot::state_digest`]).
    pub fn state_digest_of_rows(&self) -> Result<StateDigest, ReadError> {
        let mut digest = StateDigest::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (rows, more) = self.state_rows(after.as_deref(), 16 * 1024 * 1024)?;
            for (key, versions) in &rows {
                let versions: Vec<DigestVersion<'_>> =
                    versions.iter().map(DigestVersion::of).collect();
                digest.add(key, &versions);
            }
            after = rows.last().map(|(k, _)| k.clone());
            if !more {
                return Ok(digest);
            }
        }
    }

    /// Keys of the kv view after `start_after` (from the first when `None`), in key order,
    /// each with every current version, tombstones included: a page of a state snapshot. The
    /// page ends once it holds `bytes_max` bytes of keys and values (at least one key); the
    /// flag says whether keys follow.
    pub fn state_rows(
        &self,
        start_after: Option<&[u8]>,
        bytes_max: usize,
    ) -> Result<(Vec<StateRow>, bool), ReadError> {
        let mut out = Vec::new();
        let Some(table) = self.table(KV_CURRENT)? else {
            return Ok((out, false));
        };
        let lower = start_after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut bytes = 0usize;
        for row in table.range::<&[u8]>((lower, Bound::Unbounded))? {
            if bytes >= bytes_max {
                return Ok((out, true));
            }
            let (k, v) = row?;
            let mut set = Vec::new();
            decode_current(v.value(), &mut set)?;
            let versions: Vec<Version> = set
                .iter()
                .map(|c| Version {
                    id: c.id,
                    author: c.author,
                    timestamp: c.timestamp,
                    value: c.value.map(<[u8]>::to_vec),
                })
                .collect();
            bytes += k.value().len()
                + versions
                    .iter()
                    .map(|v| 80 + v.value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
            out.push((k.value().to_vec(), versions));
        }
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::{Entry, EntryId, KeyRange, Op, SignedEntry, Timestamp};

    use super::*;
    use crate::{Indexes, default_views};

    /// Two authors writing 300 keys, some deleted, some with siblings.
    fn source() -> Indexes {
        let (indexes, _) = Indexes::open_in_memory(default_views()).unwrap();
        let mut entries = Vec::new();
        for (a, author) in [NodeId([1; 32]), NodeId([2; 32])].into_iter().enumerate() {
            let mut prev = None;
            for seq in 1..=300u64 {
                let key = format!("key-{:04}", (seq * 7 + a as u64) % 300).into_bytes();
                let op = if seq % 11 == 0 {
                    Op::Delete {
                        key,
                        supersedes: vec![],
                    }
                } else {
                    Op::Put {
                        key,
                        value: vec![a as u8; (seq % 5) as usize],
                        supersedes: vec![],
                    }
                };
                let entry = Entry {
                    author,
                    seq,
                    prev,
                    timestamp: Timestamp(seq << 16),
                    ops: vec![op],
                };
                let id = entry.id();
                prev = Some(id);
                entries.push(SignedEntry {
                    entry,
                    id,
                    signature: None,
                });
            }
        }
        let batch: Vec<(u64, &SignedEntry)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u64 + 1, e))
            .collect();
        indexes.apply(&batch, true).unwrap();
        indexes
    }

    fn meta(root: StateRoot) -> StateMeta {
        StateMeta {
            peer: NodeId([9; 32]),
            version_vector: vec![(NodeId([1; 32]), 300), (NodeId([2; 32]), 300)],
            root,
            keys: 0,
        }
    }

    #[test]
    fn a_snapshot_sent_in_pages_answers_like_the_view() {
        let from = source().snapshot().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.redb");
        let mut store = StateStore::create(&path).unwrap();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (rows, more) = from.state_rows(after.as_deref(), 2_000).unwrap();
            assert!(!rows.is_empty());
            store.load(&rows).unwrap();
            after = rows.last().map(|(k, _)| k.clone());
            if !more {
                break;
            }
        }
        let root = from.state_digest().unwrap().root();
        store.finish(&meta(root)).unwrap();
        drop(store);

        let (store, meta) = StateStore::open(&path)
            .unwrap()
            .expect("a complete snapshot");
        assert_eq!(meta.root, root);
        assert_eq!(meta.entries(), 600);
        assert_eq!(meta.keys, 300);
        let to = store.snapshot().unwrap();
        let all = KeyRange::default();
        assert_eq!(to.scan(&all, 1000).unwrap(), from.scan(&all, 1000).unwrap());
        for k in 0..300 {
            let key = format!("key-{k:04}").into_bytes();
            assert_eq!(to.get(&key).unwrap(), from.get(&key).unwrap());
        }
    }

    #[test]
    fn a_snapshot_that_differs_from_its_root_or_order_is_refused() {
        let from = source().snapshot().unwrap();
        let root = from.state_digest().unwrap().root();
        let (mut rows, _) = from.state_rows(None, usize::MAX).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.redb");

        // One value changed, the id kept: the root gives it away.
        let v = rows[10].1[0].value.get_or_insert_with(Vec::new);
        v.push(1);
        let mut store = StateStore::create(&path).unwrap();
        store.load(&rows).unwrap();
        assert!(matches!(
            store.finish(&meta(root)),
            Err(StateLoadError::Root { .. })
        ));
        drop(store);
        // Never finished: not a snapshot.
        assert!(StateStore::open(&path).unwrap().is_none());

        // Rows out of order, across pages.
        let mut store = StateStore::create(&dir.path().join("order.redb")).unwrap();
        store.load(&rows[5..6]).unwrap();
        assert!(matches!(
            store.load(&rows[4..5]),
            Err(StateLoadError::Order)
        ));
        // Versions not ascending by id.
        let mut store = StateStore::create(&dir.path().join("ids.redb")).unwrap();
        let versions = &mut rows[0].1;
        let mut twice = versions[0].clone();
        twice.id = EntryId([0; 32]);
        versions.push(twice);
        assert!(matches!(
            store.load(&rows[..1]),
            Err(StateLoadError::Malformed(_))
        ));
    }
}
