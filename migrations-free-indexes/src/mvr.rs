//! The multi-value register rules, with no storage.
//!
//! A *version* of a key is the pair (EntryId, key). The rules:
//!
//! - A version is **current** when it has been applied and no applied op on the same key names
//!   its id in `supersedes`.
//! - An op's `supersedes` may name ids that have not arrived (yet, or ever); the mark is kept so
//!   that the version never becomes current when it does arrive.
//! - A delete is a tombstone version: current like any other, in the context, hidden from the
//!   values a read returns.
//!
//! "Current" is thus (versions applied) minus (ids superseded), per key: a set difference over
//! everything applied, so the state does not depend on the order entries are applied in. The
//! kv view ([`crate::views::kv`]) stores the current set and the marks that can still matter
//! (for versions not yet applied); [`BatchPlan`] is how it applies a batch, and
//! [`resolve_current`] is how the server's writer sees past the indexer (see
//! [`crate::overlay`]).

use std::collections::BTreeSet;

use kappakv_protocol::{EntryId, Lsn, NodeId, Timestamp};

use crate::view::Batch;

/// A version written by an op of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewVersion<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The entry that wrote it.
    pub id: EntryId,
    /// The entry's LSN.
    pub lsn: Lsn,
    /// The entry's author.
    pub author: NodeId,
    /// The entry's timestamp.
    pub timestamp: Timestamp,
    /// The value, `None` for a tombstone.
    pub value: Option<&'a [u8]>,
}

/// A supersede mark made by an op of the batch: the op at `lsn` names `id` among the versions
/// of `key` it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The LSN of the entry whose op makes the mark.
    pub lsn: Lsn,
    /// The superseded id.
    pub id: EntryId,
}

/// A batch of entries as the kv view applies it: its supersede marks and its new versions,
/// each sorted by key and then by LSN.
///
/// Which versions are current after the batch does not depend on the order marks and versions
/// are applied in (the rules are a set difference), but which marks the view must store does:
/// a version that was current when an op superseded it only leaves the current set, while one
/// that was not is marked. So the view replays each key's marks and versions in log order, and
/// stores the same rows whether the log reaches it entry by entry or in batches of any size.
/// Grouping by key lets it read and write each key it touches once, and turns random B-tree
/// inserts into ascending runs, which roughly doubles redb's insert rate.
#[derive(Debug, Default)]
pub struct BatchPlan<'a> {
    /// Ascending by `(key, lsn, id)`.
    pub marks: Vec<Mark<'a>>,
    /// New versions, ascending by `(key, lsn)`.
    pub versions: Vec<NewVersion<'a>>,
}

impl<'a> BatchPlan<'a> {
    /// Collects and sorts the marks and versions of every op in `batch`.
    pub fn new(batch: &Batch<'a>) -> Self {
        let ops = batch.iter().map(|(_, se)| se.entry.ops.len()).sum();
        let mut plan = Self {
            marks: Vec::with_capacity(ops),
            versions: Vec::with_capacity(ops),
        };
        for &(lsn, se) in batch {
            for op in &se.entry.ops {
                let key = op.key();
                plan.marks
                    .extend(op.supersedes().iter().map(|&id| Mark { key, lsn, id }));
                plan.versions.push(NewVersion {
                    key,
                    id: se.id,
                    lsn,
                    author: se.entry.author,
                    timestamp: se.entry.timestamp,
                    value: op.value(),
                });
            }
        }
        plan.marks.sort_unstable();
        plan.versions
            .sort_unstable_by(|a, b| (a.key, a.lsn).cmp(&(b.key, b.lsn)));
        plan
    }
}

/// The current ids of one key after applying `ops` on top of a base state.
///
/// `base_current` are the key's current ids in the base (a snapshot of the kv view);
/// `base_superseded(id)` says whether an op applied in the base superseded the not yet applied
/// version `(key, id)`; `ops` are `(id, supersedes)` of the ops on this key that the base has
/// not applied. The result is ascending.
///
/// It is the MVR rule restricted to one key: (base current ∪ op ids) minus (op supersedes ∪
/// base marks). Base current ids are by definition not superseded in the base, so only op ids
/// are looked up there.
pub fn resolve_current<'o, E>(
    base_current: Vec<EntryId>,
    mut base_superseded: impl FnMut(&EntryId) -> Result<bool, E>,
    ops: impl IntoIterator<Item = (&'o EntryId, &'o [EntryId])> + Clone,
) -> Result<Vec<EntryId>, E> {
    let marks: BTreeSet<&EntryId> = ops
        .clone()
        .into_iter()
        .flat_map(|(_, supersedes)| supersedes)
        .collect();
    let mut current: BTreeSet<EntryId> = base_current
        .into_iter()
        .filter(|id| !marks.contains(id))
        .collect();
    for (id, _) in ops {
        if !marks.contains(id) && !current.contains(id) && !base_superseded(id)? {
            current.insert(*id);
        }
    }
    Ok(current.into_iter().collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;

    use kappakv_protocol::{Entry, Op, SignedEntry};

    use super::*;

    fn id(n: u8) -> EntryId {
        EntryId([n; 32])
    }

    /// A one-put entry of author 1 at `seq`.
    pub(crate) fn put(seq: u64, key: &[u8], supersedes: Vec<EntryId>) -> SignedEntry {
        let entry = Entry {
            author: NodeId([1; 32]),
            seq,
            prev: None,
            timestamp: Timestamp(seq),
            ops: vec![Op::Put {
                key: key.to_vec(),
                value: vec![seq as u8],
                supersedes,
            }],
        };
        SignedEntry {
            id: entry.id(),
            entry,
            signature: None,
        }
    }

    #[test]
    fn plan_sorts_by_key_then_lsn() {
        let a = put(1, b"b", vec![id(2), id(1)]);
        let b = put(2, b"a", vec![id(1)]);
        let c = put(3, b"b", vec![id(1)]);
        let batch = [(1, &a), (2, &b), (3, &c)];
        let plan = BatchPlan::new(&batch);
        let marks: Vec<_> = plan.marks.iter().map(|m| (m.key, m.lsn, m.id)).collect();
        assert_eq!(
            marks,
            vec![
                (&b"a"[..], 2, id(1)),
                (&b"b"[..], 1, id(1)),
                (&b"b"[..], 1, id(2)),
                (&b"b"[..], 3, id(1)),
            ]
        );
        let keys: Vec<_> = plan.versions.iter().map(|v| (v.key, v.lsn)).collect();
        assert_eq!(keys, [(&b"a"[..], 2), (&b"b"[..], 1), (&b"b"[..], 3)]);
    }

    #[test]
    fn resolve_applies_ops_over_base() {
        let no_marks = |_: &EntryId| Ok::<_, Infallible>(false);
        // Base {1, 2}; op 3 supersedes 1; op 4 supersedes nothing (a sibling).
        let s3 = [id(1)];
        let ops = [(&id(3), &s3[..]), (&id(4), &[][..])];
        assert_eq!(
            resolve_current(vec![id(1), id(2)], no_marks, ops),
            Ok(vec![id(2), id(3), id(4)])
        );
        // An op superseded by a later op of the overlay, and an op marked in the base.
        let s5 = [id(3)];
        let ops = [(&id(3), &[][..]), (&id(5), &s5[..]), (&id(6), &[][..])];
        let marked = |i: &EntryId| Ok::<_, Infallible>(*i == id(6));
        assert_eq!(resolve_current(vec![], marked, ops), Ok(vec![id(5)]));
        // An op arriving after the op that superseded it.
        let s7 = [id(8)];
        let ops = [(&id(7), &s7[..]), (&id(8), &[][..])];
        assert_eq!(resolve_current(vec![], no_marks, ops), Ok(vec![id(7)]));
    }
}
