//! The [`View`] trait: a materialized view of the log, applied in batches inside the runner's
//! write transaction.

use kappakv_protocol::{Lsn, SignedEntry};
use redb::WriteTransaction;

use crate::error::ApplyError;

/// A batch of log entries: consecutive LSNs, ascending.
pub type Batch<'a> = [(Lsn, &'a SignedEntry)];

/// A materialized view of the log.
///
/// A view derives all of its tables from log entries alone, so dropping them and replaying the
/// log rebuilds it exactly. The runner ([`crate::Indexes`]) owns the checkpoint: it hands each
/// view only entries past the view's applied LSN, and commits the view's writes together with
/// its new checkpoint.
///
/// Name and version are read at run time (not `&'static`), so views configured at run time
/// (secondary indexes) can compute them from their definition.
pub trait View: Send + Sync {
    /// Unique among registered views; stored with the checkpoint.
    fn name(&self) -> &str;

    /// The definition version. When it differs from the stored one, the view's tables are
    /// dropped and it is rebuilt from the log.
    fn version(&self) -> u64;

    /// Names of every table the view writes. The runner drops exactly these (and those listed
    /// when the view was last reset) when the view is rebuilt; a view must not write any other
    /// table, and no two views may share one.
    fn tables(&self) -> Vec<&str>;

    /// Applies entries the view has not seen yet. `batch` is non-empty, its LSNs consecutive and
    /// ascending, and its first LSN is one past the view's checkpoint. Tables should be opened
    /// once per batch, not per entry.
    ///
    /// An error aborts the whole transaction: no view and no checkpoint moves.
    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError>;
}
