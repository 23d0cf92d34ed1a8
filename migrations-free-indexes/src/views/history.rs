//! Every version of every key, tombstones included, newest first by LSN.

use redb::WriteTransaction;

use crate::error::ApplyError;
use crate::record::HistoryRecord;
use crate::tables::{HISTORY_VERSION, HISTORY_VERSIONS, HISTORY_VERSIONS_NAME, HISTORY_VIEW};
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
        vec![HISTORY_VERSIONS_NAME]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        // (key, lsn, op index within the batch): sorted so inserts run in key order.
        let mut rows: Vec<(&[u8], u64, usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, (lsn, se))| {
                se.entry
                    .ops
                    .iter()
                    .enumerate()
                    .map(move |(j, op)| (op.key(), *lsn, i, j))
            })
            .collect();
        rows.sort_unstable();

        let mut table = txn.open_table(HISTORY_VERSIONS)?;
        let mut buf = Vec::new();
        for (key, lsn, i, j) in rows {
            let se = batch[i].1;
            buf.clear();
            HistoryRecord {
                id: se.id,
                author: se.entry.author,
                timestamp: se.entry.timestamp,
                value: se.entry.ops[j].value(),
            }
            .encode_into(&mut buf);
            table.insert((key, lsn), buf.as_slice())?;
        }
        Ok(())
    }
}
