//! The key/value view: a multi-value register per key (rules in [`crate::mvr`]).
//!
//! [`KV_CURRENT`] holds each key's current versions with their values, in one row per key, so
//! a batch reads and writes each key it touches once. [`KV_SUPERSEDED`] holds the
//! marks that must outlive the op that made them: `(key, id)` for every version an applied op
//! superseded while that version was *not* current (not arrived yet, or already superseded).
//! A version that was current when superseded has been applied, and each LSN is applied once,
//! so removing it from the current set is all it needs; skipping its mark keeps the table tiny
//! in the common case (one writer superseding what it read), which is what keeps the
//! per-version mark lookup cheap. A batch replays each key's marks and versions in log order,
//! so the rows stored are the same whether the log arrives entry by entry or in batches of any
//! size (a rebuild equals the incremental view, row for row). Invariant: no mark names a
//! current version.

use redb::{ReadableTable, WriteTransaction};

use crate::digest::{DigestVersion, StateDigest};
use crate::error::{ApplyError, CorruptRecord};
use crate::mvr::BatchPlan;
use crate::record::{CurrentVersion, decode_current, encode_current};
use crate::tables::{
    KV_CURRENT, KV_CURRENT_NAME, KV_DIGEST, KV_DIGEST_NAME, KV_DIGEST_ROW, KV_SUPERSEDED,
    KV_SUPERSEDED_NAME, KV_VERSION, KV_VIEW,
};
use crate::view::{Batch, View};

/// Key → current versions (the multi-value register).
#[derive(Debug, Clone, Copy, Default)]
pub struct KvView;

impl View for KvView {
    fn name(&self) -> &str {
        KV_VIEW
    }

    fn version(&self) -> u64 {
        KV_VERSION
    }

    fn tables(&self) -> Vec<&str> {
        vec![KV_CURRENT_NAME, KV_SUPERSEDED_NAME, KV_DIGEST_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        let plan = BatchPlan::new(batch);
        let mut current = txn.open_table(KV_CURRENT)?;
        let mut superseded = txn.open_table(KV_SUPERSEDED)?;
        let mut digest_table = txn.open_table(KV_DIGEST)?;
        let stored = digest_table.get(KV_DIGEST_ROW)?;
        let mut digest = decode_digest(stored.as_ref().map(redb::AccessGuard::value))?;
        drop(stored);
        let mut digest_changed = false;

        let (mut marks, mut versions) = (&plan.marks[..], &plan.versions[..]);
        let mut buf = Vec::new();
        // One key at a time, in key order: both lists are sorted by key.
        loop {
            let key = match (marks.first(), versions.first()) {
                (Some(m), Some(v)) => m.key.min(v.key),
                (Some(m), None) => m.key,
                (None, Some(v)) => v.key,
                (None, None) => break,
            };
            let key_marks = take_while_key(&mut marks, |m| m.key == key);
            let key_versions = take_while_key(&mut versions, |v| v.key == key);

            let stored = current.get(key)?.map(|g| g.value().to_vec());
            let mut set: Vec<CurrentVersion<'_>> = Vec::with_capacity(key_versions.len() + 1);
            if let Some(stored) = &stored {
                decode_current(stored, &mut set)?;
            }
            let before: Vec<DigestVersion<'_>> = set.iter().map(digest_version).collect();
            // Marks and versions in log order (a mark before the version of its own entry,
            // which cannot name itself): a version current when superseded leaves the current
            // set, one that is not (not arrived yet, or already superseded) is marked, and a
            // version arrives unless marked (by this batch, just before, or earlier).
            let mut changed = false;
            let (mut m, mut v) = (0, 0);
            while m < key_marks.len() || v < key_versions.len() {
                let mark_next = match (key_marks.get(m), key_versions.get(v)) {
                    (Some(mark), Some(version)) => mark.lsn <= version.lsn,
                    (mark, _) => mark.is_some(),
                };
                if mark_next {
                    let id = key_marks[m].id;
                    m += 1;
                    match set.binary_search_by(|c| c.id.cmp(&id)) {
                        Ok(at) => {
                            set.remove(at);
                            changed = true;
                        }
                        Err(_) => {
                            superseded.insert((key, &id.0), ())?;
                        }
                    }
                    continue;
                }
                let version = &key_versions[v];
                v += 1;
                if superseded.get((key, &version.id.0))?.is_some() {
                    continue;
                }
                let Err(at) = set.binary_search_by(|c| c.id.cmp(&version.id)) else {
                    // The same entry twice in the log: the version is already current.
                    continue;
                };
                set.insert(
                    at,
                    CurrentVersion {
                        id: version.id,
                        author: version.author,
                        timestamp: version.timestamp,
                        lsn: version.lsn,
                        value: version.value,
                    },
                );
                changed = true;
            }
            if !changed {
                continue;
            }
            // The key leaves the digest as it was and comes back as it is.
            digest_changed = true;
            if !before.is_empty() {
                digest.remove(key, &before);
            }
            if !set.is_empty() {
                let after: Vec<DigestVersion<'_>> = set.iter().map(digest_version).collect();
                digest.add(key, &after);
            }
            if set.is_empty() {
                current.remove(key)?;
            } else {
                buf.clear();
                encode_current(&set, &mut buf);
                current.insert(key, buf.as_slice())?;
            }
        }
        if digest_changed {
            digest_table.insert(KV_DIGEST_ROW, digest.to_bytes().as_slice())?;
        }
        Ok(())
    }
}

/// What the state digest hashes of a current version.
fn digest_version<'v>(v: &CurrentVersion<'v>) -> DigestVersion<'v> {
    DigestVersion {
        id: v.id,
        author: v.author,
        timestamp: v.timestamp,
        value: v.value,
    }
}

/// The digest stored in the [`KV_DIGEST`] row `row`; no row is the empty view's digest.
pub(crate) fn decode_digest(row: Option<&[u8]>) -> Result<StateDigest, CorruptRecord> {
    row.map_or_else(
        || Ok(StateDigest::new()),
        |bytes| {
            StateDigest::from_bytes(bytes).ok_or(CorruptRecord {
                table: KV_DIGEST_NAME,
                reason: "a state digest of the wrong length",
            })
        },
    )
}

/// Splits off the leading items of `items` that satisfy `same`.
fn take_while_key<'s, T>(items: &mut &'s [T], same: impl Fn(&T) -> bool) -> &'s [T] {
    let n = items.iter().take_while(|item| same(item)).count();
    let (head, rest) = items.split_at(n);
    *items = rest;
    head
}
