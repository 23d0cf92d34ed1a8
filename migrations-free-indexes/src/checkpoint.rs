//! Per-view checkpoints: `(definition version, applied LSN)`, stored in
//! [`crate::tables::VIEW_CHECKPOINTS`] in the same write transaction as the view's data.
//!
//! Because a checkpoint commits atomically with the data it describes, a view is always
//! consistent with its checkpoint, whatever happened before a crash: a non-durable commit that
//! was lost takes its checkpoint with it, and an interrupted rebuild resumes from the last
//! committed checkpoint instead of starting over.

use kappakv_protocol::Lsn;
use redb::{ReadableTable, StorageError, Table};

/// What a view has stored about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The definition version its data was derived with.
    pub version: u64,
    /// The highest LSN applied; `0` for nothing.
    pub applied_lsn: Lsn,
}

pub(crate) fn read(
    table: &impl ReadableTable<&'static str, (u64, u64)>,
    view: &str,
) -> Result<Option<Checkpoint>, StorageError> {
    Ok(table.get(view)?.map(|guard| {
        let (version, applied_lsn) = guard.value();
        Checkpoint {
            version,
            applied_lsn,
        }
    }))
}

pub(crate) fn write(
    table: &mut Table<'_, &'static str, (u64, u64)>,
    view: &str,
    checkpoint: Checkpoint,
) -> Result<(), StorageError> {
    table.insert(view, (checkpoint.version, checkpoint.applied_lsn))?;
    Ok(())
}
