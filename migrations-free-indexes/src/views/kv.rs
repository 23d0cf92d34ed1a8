//! The key/value view: a multi-value register per key (rules in [`crate::mvr`]).
//!
//! [`KV_CURRENT`] holds each key's current versions with their values, in one row per key, so
//! a batch reads and writes each key it touches once. [`KV_SUPERSEDED`] holds the
//! marks that must outlive the op that made them: `(key, id)` for every version an applied op
//! superseded while that version was *not* current (not arrived yet, or already superseded).
//! A version that was current when superseded has been applied, and each LSN is applied once,
//! so removing it from the current set is all it needs; skipping its mark keeps the table tiny
//! in the common case (one writer superseding what it read), which is what keeps the
//! per-version mark lookup cheap. Invariant: no mark names a current version.

use redb::{ReadableTable, WriteTransaction};

use crate::error::ApplyError;
use crate::mvr::BatchPlan;
use crate::record::{CurrentVersion, decode_current, encode_current};
use crate::tables::{
    KV_CURRENT, KV_CURRENT_NAME, KV_SUPERSEDED, KV_SUPERSEDED_NAME, KV_VERSION, KV_VIEW,
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
        vec![KV_CURRENT_NAME, KV_SUPERSEDED_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        let plan = BatchPlan::new(batch);
        let mut current = txn.open_table(KV_CURRENT)?;
        let mut superseded = txn.open_table(KV_SUPERSEDED)?;

        let (mut marks, mut versions) = (&plan.marks[..], &plan.versions[..]);
        let mut buf = Vec::new();
        // One key at a time, in key order: both lists are sorted by key.
        loop {
            let key = match (marks.first(), versions.first()) {
                (Some(m), Some(v)) => m.0.min(v.key),
                (Some(m), None) => m.0,
                (None, Some(v)) => v.key,
                (None, None) => break,
            };
            let key_marks = take_while_key(&mut marks, |m| m.0 == key);
            let key_versions = take_while_key(&mut versions, |v| v.key == key);

            let stored = current.get(key)?.map(|g| g.value().to_vec());
            let mut set: Vec<CurrentVersion<'_>> = Vec::with_capacity(key_versions.len() + 1);
            if let Some(stored) = &stored {
                decode_current(stored, &mut set)?;
            }
            let before = set.len();
            // Marks first: a superseded version leaves the current set for good; one that is
            // not current may still arrive (or arrive later in this batch), so it is marked.
            for &(_, id) in key_marks {
                match set.binary_search_by(|v| v.id.cmp(&id)) {
                    Ok(at) => {
                        set.remove(at);
                    }
                    Err(_) => {
                        superseded.insert((key, &id.0), ())?;
                    }
                }
            }
            let mut changed = set.len() != before;
            // Then versions, unless marked (by this batch, just above, or earlier).
            for v in key_versions {
                if superseded.get((key, &v.id.0))?.is_some() {
                    continue;
                }
                let Err(at) = set.binary_search_by(|c| c.id.cmp(&v.id)) else {
                    // The same entry twice in the log: the version is already current.
                    continue;
                };
                set.insert(
                    at,
                    CurrentVersion {
                        id: v.id,
                        author: v.author,
                        timestamp: v.timestamp,
                        lsn: v.lsn,
                        value: v.value,
                    },
                );
                changed = true;
            }
            if !changed {
                continue;
            }
            if set.is_empty() {
                current.remove(key)?;
            } else {
                buf.clear();
                encode_current(&set, &mut buf);
                current.insert(key, buf.as_slice())?;
            }
        }
        Ok(())
    }
}

/// Splits off the leading items of `items` that satisfy `same`.
fn take_while_key<'s, T>(items: &mut &'s [T], same: impl Fn(&T) -> bool) -> &'s [T] {
    let n = items.iter().take_while(|item| same(item)).count();
    let (head, rest) = items.split_at(n);
    *items = rest;
    head
}
