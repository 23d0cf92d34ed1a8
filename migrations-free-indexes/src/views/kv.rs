//! The key/value view: a multi-value register per key (rules in [`crate::mvr`]).
//!
//! [`KV_CURRENT`] holds the current versions with their values; [`KV_SUPERSEDED`] every
//! `(key, id)` any applied op superseded. Invariant: the two never share a key.

use redb::{ReadableTable, WriteTransaction};

use crate::error::ApplyError;
use crate::mvr::BatchPlan;
use crate::record::CurrentRecord;
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

        // Marks first: every superseded version leaves the current set for good.
        for &(key, id) in &plan.marks {
            current.remove((key, id.0))?;
            superseded.insert((key, id.0), ())?;
        }
        // Then versions, unless marked (by this batch, just above, or by anything earlier).
        let mut buf = Vec::new();
        for v in &plan.versions {
            if superseded.get((v.key, v.id.0))?.is_some() {
                continue;
            }
            buf.clear();
            CurrentRecord {
                author: v.author,
                timestamp: v.timestamp,
                lsn: v.lsn,
                value: v.value,
            }
            .encode_into(&mut buf);
            current.insert((v.key, v.id.0), buf.as_slice())?;
        }
        Ok(())
    }
}
