//! The log's own lookup tables: which entries the log holds, each author's head (the version
//! vector), and where each `(author, seq)` sits in the log. The server uses them to answer "do
//! we already have entry X", to start a peer session at the first entry the peer lacks, and to
//! detect equivocation: an entry for `(author, seq ≤ head)` whose id is not in
//! [`LOG_ENTRY_LSN`] is a second, different entry for a position the log already holds.

use std::collections::BTreeMap;

use redb::{ReadableTable, WriteTransaction};

use crate::error::ApplyError;
use crate::tables::{
    LOG_AUTHOR_HEAD, LOG_AUTHOR_HEAD_NAME, LOG_AUTHOR_SEQ_LSN, LOG_AUTHOR_SEQ_LSN_NAME,
    LOG_ENTRY_LSN, LOG_ENTRY_LSN_NAME, LOG_LOOKUP_VERSION, LOG_LOOKUP_VIEW,
};
use crate::view::{Batch, View};

/// EntryId → LSN, author → (latest seq, EntryId) and (author, seq) → LSN.
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
        vec![
            LOG_ENTRY_LSN_NAME,
            LOG_AUTHOR_HEAD_NAME,
            LOG_AUTHOR_SEQ_LSN_NAME,
        ]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        let mut ids: Vec<([u8; 32], u64)> = batch.iter().map(|(lsn, se)| (se.id.0, *lsn)).collect();
        ids.sort_unstable();
        let mut heads: BTreeMap<[u8; 32], (u64, [u8; 32])> = BTreeMap::new();
        for (_, se) in batch {
            let head = heads.entry(se.entry.author.0).or_insert((0, [0; 32]));
            if se.entry.seq > head.0 {
                *head = (se.entry.seq, se.id.0);
            }
        }

        let mut entry_lsn = txn.open_table(LOG_ENTRY_LSN)?;
        for (id, lsn) in ids {
            // The log should never hold an entry twice; if it does, the first record wins.
            let earlier = entry_lsn.insert(&id, lsn)?.map(|g| g.value());
            if let Some(earlier) = earlier
                && earlier < lsn
            {
                entry_lsn.insert(&id, earlier)?;
            }
        }

        // Sorted, so that each author's rows go in at the end of its range in one pass.
        let mut seqs: Vec<([u8; 32], u64, u64)> = batch
            .iter()
            .map(|(lsn, se)| (se.entry.author.0, se.entry.seq, *lsn))
            .collect();
        seqs.sort_unstable();
        let mut seq_lsn = txn.open_table(LOG_AUTHOR_SEQ_LSN)?;
        for (author, seq, lsn) in seqs {
            let earlier = seq_lsn.insert((&author, seq), lsn)?.map(|g| g.value());
            if let Some(earlier) = earlier
                && earlier < lsn
            {
                seq_lsn.insert((&author, seq), earlier)?;
            }
        }

        let mut author_head = txn.open_table(LOG_AUTHOR_HEAD)?;
        for (author, head) in heads {
            let stored = author_head.get(&author)?.map(|g| g.value().0);
            if stored.is_none_or(|seq| head.0 > seq) {
                author_head.insert(&author, (head.0, &head.1))?;
            }
        }
        Ok(())
    }
}
