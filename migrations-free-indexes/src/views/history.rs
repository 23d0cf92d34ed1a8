//! Every version of every key, tombstones included, newest first by LSN.
//!
//! Two tables: the records themselves in log order ([`HISTORY_RECORDS`], appended through a
//! cursor at the end of the tree, never inserted in the middle), each pointing at the record of
//! the same key's version before it, and one row per key pointing at its newest record
//! ([`HISTORY_LATEST`]). A key's history is a walk along those links, one record lookup per
//! version, as a range over a per-version index followed by a record lookup per version was.
//! Applying a batch reads and writes each key's row once however many versions the batch adds,
//! where a per-version index took a random-position insert per op, which rewrote most of that
//! index every batch.

use std::ops::Bound;

use kappakv_protocol::Lsn;
use redb::{Table, WriteTransaction};

use crate::error::ApplyError;
use crate::record::HistoryRecord;
use crate::tables::{
    HISTORY_LATEST, HISTORY_LATEST_NAME, HISTORY_RECORDS, HISTORY_RECORDS_NAME, HISTORY_VERSION,
    HISTORY_VIEW,
};
use crate::view::{Batch, View};

/// Key → every version ever written.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryView;

impl View for HistoryView {
    fn name(&self) -> &str {
        HISTORY_VIEW
    }

    fn version(&self) -> u64 {
        HISTORY_VERSION
    }

    fn tables(&self) -> Vec<&str> {
        vec![HISTORY_LATEST_NAME, HISTORY_RECORDS_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        apply_in_steps(txn, batch, OPS_PER_STEP)
    }
}

/// Applies `batch` in steps of whole entries, about `ops_per_step` ops each.
fn apply_in_steps(
    txn: &WriteTransaction,
    batch: &Batch<'_>,
    ops_per_step: usize,
) -> Result<(), ApplyError> {
    let mut latest = txn.open_table(HISTORY_LATEST)?;
    let mut records = txn.open_table(HISTORY_RECORDS)?;
    let mut rest = batch;
    while !rest.is_empty() {
        let mut ops = 0;
        let n = rest
            .iter()
            .take_while(|(_, se)| {
                let fits = ops == 0 || ops + se.entry.ops.len() <= ops_per_step;
                ops += se.entry.ops.len();
                fits
            })
            .count();
        let (step, after) = rest.split_at(n);
        apply_step(&mut latest, &mut records, step)?;
        rest = after;
    }
    Ok(())
}

/// Ops linked and appended per step of a batch, so that a batch's memory here stays small
/// however large the batch (the node's indexer applies up to 64 MiB of keys and values at
/// once); the rows stored do not depend on where the steps fall.
const OPS_PER_STEP: usize = 65_536;

/// An op of a step: key prefix, key, LSN, op index, position in log order.
type StepOp<'a> = (u128, &'a [u8], Lsn, u32, u32);

/// Applies entries to the history tables.
fn apply_step(
    latest: &mut Table<'_, &'static [u8], (u64, u32)>,
    records: &mut Table<'_, (u64, u32), &'static [u8]>,
    step: &Batch<'_>,
) -> Result<(), ApplyError> {
    // Every op, sorted by key and then in log order. An entry has one op per key (a valid
    // entry does); should one have more, its last op on the key is the version history keeps,
    // the others get records that nothing links to.
    let mut ops: Vec<StepOp<'_>> = Vec::with_capacity(step.len());
    for &(lsn, se) in step {
        for (index, op) in se.entry.ops.iter().enumerate() {
            let key = op.key();
            let at = ops.len() as u32;
            ops.push((key_prefix(key), key, lsn, index as u32, at));
        }
    }
    ops.sort_unstable_by(|a, b| {
        compare_keys((a.0, a.1), (b.0, b.1)).then((a.2, a.3).cmp(&(b.2, b.3)))
    });

    // The link of each op in log order: the key's version before it, in the step or, for the
    // key's first op of the step, the newest stored. Keys in order, so the rows are written in
    // one ascending pass: the key's last op here is its newest version, and the row it replaces
    // is what the first op links to, so one insert per key both reads and writes its row.
    let mut previous: Vec<Option<(Lsn, u32)>> = vec![None; ops.len()];
    for key_ops in ops.chunk_by(|a, b| compare_keys((a.0, a.1), (b.0, b.1)).is_eq()) {
        let &(_, key, lsn, index, _) = key_ops.last().expect("chunks are not empty");
        let mut last = latest.insert(key, (lsn, index))?.map(|g| g.value());
        for (i, &(_, _, lsn, index, at)) in key_ops.iter().enumerate() {
            previous[at as usize] = last;
            let overwritten = key_ops.get(i + 1).is_some_and(|next| next.2 == lsn);
            if !overwritten {
                last = Some((lsn, index));
            }
        }
    }
    drop(ops);

    let mut cursor = records.upper_bound_mut(Bound::<(u64, u32)>::Unbounded)?;
    let mut buf = Vec::new();
    let mut previous = previous.into_iter();
    for &(lsn, se) in step {
        for (index, op) in se.entry.ops.iter().enumerate() {
            buf.clear();
            HistoryRecord {
                id: se.id,
                author: se.entry.author,
                timestamp: se.entry.timestamp,
                previous: previous.next().flatten(),
                value: op.value(),
            }
            .encode_into(&mut buf);
            // The runner hands each LSN to a view once, in ascending order, so every record
            // sorts after the last one stored.
            cursor.insert_before((lsn, index as u32), buf.as_slice())?;
        }
    }
    cursor.close()?;
    Ok(())
}

/// The first 16 bytes of `key`, zero-padded, as a number, for [`compare_keys`].
fn key_prefix(key: &[u8]) -> u128 {
    let mut bytes = [0; 16];
    let n = key.len().min(16);
    bytes[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(bytes)
}

/// Compares two keys given with their [`key_prefix`], as the keys compare. Most comparisons of
/// a sort end at the prefixes, and those of two keys of at most 16 bytes at their lengths,
/// without reading the keys (which lie all over memory) again.
fn compare_keys(a: (u128, &[u8]), b: (u128, &[u8])) -> std::cmp::Ordering {
    a.0.cmp(&b.0).then_with(|| {
        if a.1.len() <= 16 && b.1.len() <= 16 {
            // Equal but for the zero padding: the shorter is a prefix of the longer.
            a.1.len().cmp(&b.1.len())
        } else {
            a.1.cmp(b.1)
        }
    })
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::{Entry, EntryId, NodeId, Op, SignedEntry, Timestamp};

    use super::*;
    use crate::Indexes;

    fn entry(seq: u64, ops: Vec<Op>) -> SignedEntry {
        let entry = Entry {
            author: NodeId([1; 32]),
            seq,
            prev: None,
            timestamp: Timestamp(seq),
            ops,
        };
        SignedEntry {
            id: entry.id(),
            entry,
            signature: None,
        }
    }

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            supersedes: vec![],
        }
    }

    /// The history view applying its batches in steps of `ops` ops.
    struct Stepped(usize);

    impl View for Stepped {
        fn name(&self) -> &str {
            HistoryView.name()
        }
        fn version(&self) -> u64 {
            HistoryView.version()
        }
        fn tables(&self) -> Vec<&str> {
            HistoryView.tables()
        }
        fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
            apply_in_steps(txn, batch, self.0)
        }
    }

    /// Every row of the history tables.
    type Rows = (Vec<(Vec<u8>, (u64, u32))>, Vec<((u64, u32), Vec<u8>)>);

    fn rows(indexes: &Indexes) -> Rows {
        use redb::ReadableTable as _;
        let snap = indexes.snapshot().unwrap();
        let latest = snap.table(HISTORY_LATEST).unwrap().unwrap();
        let records = snap.table(HISTORY_RECORDS).unwrap().unwrap();
        (
            latest
                .iter()
                .unwrap()
                .map(|row| {
                    let (k, v) = row.unwrap();
                    (k.value().to_vec(), v.value())
                })
                .collect(),
            records
                .iter()
                .unwrap()
                .map(|row| {
                    let (k, v) = row.unwrap();
                    (k.value(), v.value().to_vec())
                })
                .collect(),
        )
    }

    /// The histories of `a` and `b` and every row.
    type Outcome = (Vec<Vec<(EntryId, Option<Vec<u8>>)>>, Rows);

    /// `a` written by four entries (the second with two ops on `a`, one on `b`), applied in
    /// the given batch sizes by the history view applying batches in steps of `step` ops.
    fn history_of(chunks: &[usize], step: usize) -> Outcome {
        let entries = [
            entry(1, vec![put("a", "1")]),
            entry(2, vec![put("a", "2a"), put("b", "x"), put("a", "2b")]),
            entry(
                3,
                vec![Op::Delete {
                    key: b"a".to_vec(),
                    supersedes: vec![],
                }],
            ),
            entry(4, vec![put("a", "4")]),
        ];
        let (indexes, _) = Indexes::open_in_memory(vec![Box::new(Stepped(step))]).unwrap();
        let log: Vec<(Lsn, &SignedEntry)> = (1..).zip(&entries).collect();
        let mut at = 0;
        for &n in chunks.iter().cycle() {
            if at == log.len() {
                break;
            }
            let end = (at + n).min(log.len());
            indexes.apply(&log[at..end], false).unwrap();
            at = end;
        }
        let snap = indexes.snapshot().unwrap();
        let ids = |key: &[u8], limit, bytes_max| {
            snap.history_within(key, limit, bytes_max)
                .unwrap()
                .into_iter()
                .map(|v| (v.id, v.value))
                .collect::<Vec<_>>()
        };
        let a = ids(b"a", 10, usize::MAX);
        let expected = vec![
            (entries[3].id, Some(b"4".to_vec())),
            (entries[2].id, None),
            (entries[1].id, Some(b"2b".to_vec())),
            (entries[0].id, Some(b"1".to_vec())),
        ];
        assert_eq!(a, expected, "newest first; an entry's last op on a key");
        assert_eq!(ids(b"a", 2, usize::MAX), expected[..2]);
        assert_eq!(ids(b"a", 10, 1), expected[..1], "stops at the byte bound");
        assert_eq!(ids(b"zz", 10, usize::MAX), []);
        let histories = vec![a, ids(b"b", 10, usize::MAX)];
        drop(snap);
        (histories, rows(&indexes))
    }

    #[test]
    fn prefix_comparison_is_key_order() {
        let keys: [&[u8]; 10] = [
            b"",
            b"\0",
            b"\0\0",
            b"a",
            b"a\0",
            b"ab",
            b"abcdefghijklmnop",
            b"abcdefghijklmnop\0",
            b"abcdefghijklmnopq",
            b"abcdefghijklmnoq",
        ];
        for a in keys {
            for b in keys {
                assert_eq!(
                    compare_keys((key_prefix(a), a), (key_prefix(b), b)),
                    a.cmp(b),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    #[test]
    fn a_key_history_walks_back_across_batches_and_steps() {
        let one = history_of(&[4], OPS_PER_STEP);
        assert_eq!(one.0[1].len(), 1);
        for step in [1, 2, 3, OPS_PER_STEP] {
            for chunks in [&[1][..], &[3, 1], &[1, 2], &[4]] {
                assert_eq!(
                    history_of(chunks, step),
                    one,
                    "{chunks:?} in steps of {step}"
                );
            }
        }
    }
}
