//! The log's own lookup tables: each author's head (the version vector), and which entry sits
//! where in the log by `(author, seq)`. The server uses them to answer "do we already have
//! entry X" (the row of X's `(author, seq)` names X), to start a peer session at the first
//! entry the peer lacks, and to detect equivocation: an entry for `(author, seq ≤ head)` that
//! its row does not name is a second, different entry for a position the log already holds.
//!
//! Both tables are keyed by author, so applying the log appends at the end of each author's
//! range: no table here takes an insert at a random position.

use std::ops::Bound;

use redb::{ReadableTable, WriteTransaction};

use crate::error::ApplyError;
use crate::tables::{
    LOG_AUTHOR_HEAD, LOG_AUTHOR_HEAD_NAME, LOG_AUTHOR_SEQ_LSN, LOG_AUTHOR_SEQ_LSN_NAME,
    LOG_LOOKUP_VERSION, LOG_LOOKUP_VIEW,
};
use crate::view::{Batch, View};

/// author → (latest seq, EntryId) and (author, seq) → (LSN, EntryId).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogLookupView;

impl View for LogLookupView {
    fn name(&self) -> &str {
        LOG_LOOKUP_VIEW
    }

    fn version(&self) -> u64 {
        LOG_LOOKUP_VERSION
    }

    fn tables(&self) -> Vec<&str> {
        vec![LOG_AUTHOR_HEAD_NAME, LOG_AUTHOR_SEQ_LSN_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        // (author, seq, LSN, id), sorted, with the first record of each (author, seq): the log
        // should never hold an entry twice, but if it does, the first record wins.
        let mut rows: Vec<(&[u8; 32], u64, u64, &[u8; 32])> = batch
            .iter()
            .map(|(lsn, se)| (&se.entry.author.0, se.entry.seq, *lsn, &se.id.0))
            .collect();
        // A log holds each author's entries in seq order, so this is already sorted unless
        // several authors interleave.
        if !rows.is_sorted_by_key(|r| (r.0, r.1, r.2)) {
            rows.sort_unstable_by_key(|r| (r.0, r.1, r.2));
        }
        rows.dedup_by_key(|r| (r.0, r.1));

        let mut seq_lsn = txn.open_table(LOG_AUTHOR_SEQ_LSN)?;
        let mut author_head = txn.open_table(LOG_AUTHOR_HEAD)?;
        for rows in rows.chunk_by(|a, b| a.0 == b.0) {
            let author = rows[0].0;
            let last = seq_lsn
                .range((author, 0)..=(author, u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1);
            // Rows at or below the author's last seq hold an entry the log already has (or
            // the view is applying the same LSNs again): the stored row, an earlier LSN, wins.
            let split = rows.partition_point(|r| last.is_some_and(|last| r.1 <= last));
            let (again, new) = rows.split_at(split);
            for &(_, seq, lsn, id) in again {
                let earlier = seq_lsn.insert((author, seq), (lsn, id))?.map(|g| {
                    let (lsn, id) = g.value();
                    (lsn, *id)
                });
                if let Some((earlier, earlier_id)) = earlier
                    && earlier < lsn
                {
                    seq_lsn.insert((author, seq), (earlier, &earlier_id))?;
                }
            }
            // The rest sort after every stored row of the author: appended through a cursor
            // at the end of its range.
            let mut cursor = seq_lsn.upper_bound_mut(Bound::Included((author, u64::MAX)))?;
            for &(_, seq, lsn, id) in new {
                cursor.insert_before((author, seq), (lsn, id))?;
            }
            cursor.close()?;

            let &(_, seq, _, id) = rows.last().expect("chunks are not empty");
            let stored = author_head.get(author)?.map(|g| g.value().0);
            if stored.is_none_or(|stored| seq > stored) {
                author_head.insert(author, (seq, id))?;
            }
        }
        Ok(())
    }
}
