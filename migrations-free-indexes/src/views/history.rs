//! Every version of every key, tombstones included, newest first by LSN.
//!
//! Two tables: the records themselves in log order ([`HISTORY_RECORDS`], appended through a
//! cursor at the end of the tree, never inserted in the middle), and a small per-key index
//! ([`HISTORY_BY_KEY`]) that takes the random-position inserts. Keeping values out of the
//! random-insert table is what keeps a rebuild from rewriting most of the file every batch.

use std::ops::Bound;

use redb::WriteTransaction;

use crate::error::ApplyError;
use crate::record::HistoryRecord;
use crate::tables::{
    HISTORY_BY_KEY, HISTORY_BY_KEY_NAME, HISTORY_RECORDS, HISTORY_RECORDS_NAME, HISTORY_VERSION,
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
        vec![HISTORY_BY_KEY_NAME, HISTORY_RECORDS_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        let mut records = txn.open_table(HISTORY_RECORDS)?;
        let mut cursor = records.upper_bound_mut(Bound::<(u64, u32)>::Unbounded)?;
        let mut buf = Vec::new();
        for &(lsn, se) in batch {
            for (index, op) in se.entry.ops.iter().enumerate() {
                buf.clear();
                HistoryRecord {
                    id: se.id,
                    author: se.entry.author,
                    timestamp: se.entry.timestamp,
                    value: op.value(),
                }
                .encode_into(&mut buf);
                // The runner hands each LSN to a view once, in ascending order, so every
                // record sorts after the last one stored.
                cursor.insert_before((lsn, index as u32), buf.as_slice())?;
            }
        }
        cursor.close()?;
        drop(records);

        let mut rows: Vec<(&[u8], u64, u32)> = batch
            .iter()
            .flat_map(|(lsn, se)| {
                se.entry
                    .ops
                    .iter()
                    .enumerate()
                    .map(move |(i, op)| (op.key(), *lsn, i as u32))
            })
            .collect();
        rows.sort_unstable();
        let mut by_key = txn.open_table(HISTORY_BY_KEY)?;
        for (key, lsn, index) in rows {
            by_key.insert((key, lsn), index)?;
        }
        Ok(())
    }
}
