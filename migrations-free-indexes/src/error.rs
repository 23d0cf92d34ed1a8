//! Errors, one enum per operation. redb's many error types are folded into one `Storage`
//! variant per enum (as `redb::Error`), so callers match on what went wrong in *our* terms.

use kappakv_protocol::Lsn;

/// A stored record that does not decode. The index file is damaged; it is derived data, so the
/// fix is to drop it (`rm indexes.redb` or `kappakv rebuild-indexes`) and replay the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record in index table {table}: {reason}; rebuild the indexes")]
pub struct CorruptRecord {
    /// The table holding the record.
    pub table: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Opening the index database and reconciling stored view definitions with the code's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenViewError {
    /// The file could not be opened or created (missing directory, held by another process,
    /// unrecoverable damage).
    #[error("cannot open the index database: {0}")]
    Database(#[from] redb::DatabaseError),
    /// A read or write inside the database failed.
    #[error("index storage failed while opening: {0}")]
    Storage(#[source] redb::Error),
    /// Two registered views share a name.
    #[error("two registered views are named {name:?}")]
    DuplicateView {
        /// The name.
        name: String,
    },
    /// Two registered views claim the same table, or a view claims a framework table.
    #[error("table {table:?} is claimed by view {view:?} and by {other:?}")]
    DuplicateTable {
        /// The table.
        table: String,
        /// One view claiming it.
        view: String,
        /// The other claimant.
        other: String,
    },
}

/// Applying a batch of log entries to the views.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A read or write inside the database failed; nothing of the batch was committed.
    #[error("index storage failed while applying: {0}")]
    Storage(#[source] redb::Error),
    /// The batch's LSNs are not consecutive and ascending.
    #[error("batch LSNs must be consecutive: LSN {lsn} follows {previous}")]
    NotConsecutive {
        /// The LSN before.
        previous: Lsn,
        /// The LSN that does not follow it.
        lsn: Lsn,
    },
    /// The batch starts after the view's checkpoint: entries in between would be missed.
    #[error("view {view:?} has applied up to LSN {applied}, but the batch continues at {next}")]
    Gap {
        /// The view.
        view: String,
        /// Its checkpoint.
        applied: Lsn,
        /// The first LSN of the batch it would have to apply.
        next: Lsn,
    },
    /// A stored record does not decode.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
}

/// Dropping views so they are rebuilt from the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// A read or write inside the database failed; nothing was dropped.
    #[error("index storage failed while dropping views: {0}")]
    Storage(#[source] redb::Error),
    /// No registered view has this name.
    #[error("no index named {name:?}; known indexes: {known}")]
    UnknownView {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
}

/// Reading from a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A read inside the database failed.
    #[error("index storage failed while reading: {0}")]
    Storage(#[source] redb::Error),
    /// A stored record does not decode.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    /// An overlay was asked to resolve against a snapshot older than ops it has already pruned:
    /// the caller must take a fresh snapshot.
    #[error(
        "snapshot at LSN {snapshot_lsn} is older than the overlay, pruned through LSN {pruned_lsn}"
    )]
    StaleSnapshot {
        /// The kv view's applied LSN in the snapshot.
        snapshot_lsn: Lsn,
        /// The overlay's pruning point.
        pruned_lsn: Lsn,
    },
}

/// Querying a secondary index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The query does not fit the index (too many values for its fields, a cursor from
    /// elsewhere).
    #[error("invalid query: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl From<redb::StorageError> for QueryError {
    fn from(e: redb::StorageError) -> Self {
        Self::Read(e.into())
    }
}

impl From<CorruptRecord> for QueryError {
    fn from(e: CorruptRecord) -> Self {
        Self::Read(e.into())
    }
}

/// A snapshot's rows do not make a state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateLoadError {
    /// A row's key does not sort after the one before it.
    #[error("snapshot rows out of key order")]
    Order,
    /// A key with no versions, versions not ascending by id, or a key or value over the
    /// protocol's limits.
    #[error("malformed snapshot row: {0}")]
    Malformed(&'static str),
    /// The rows' digest is not the root the peer announced.
    #[error("the snapshot's rows give state root {computed}, not the {announced} announced")]
    Root {
        /// The root of the rows received.
        computed: kappakv_protocol::StateRoot,
        /// The root the peer sent.
        announced: kappakv_protocol::StateRoot,
    },
    /// The file failed.
    #[error("snapshot file: {0}")]
    Storage(#[source] redb::Error),
    /// The file cannot be opened or created.
    #[error("snapshot file: {0}")]
    Database(#[from] redb::DatabaseError),
    /// The meta row does not decode.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
}

/// Implements `From<redb sub-error>` for our enums through `redb::Error`.
macro_rules! from_redb {
    ($($ours:ident),+) => {$(
        impl From<redb::Error> for $ours {
            fn from(e: redb::Error) -> Self {
                Self::Storage(e)
            }
        }
        from_redb!(@each $ours: redb::TransactionError, redb::TableError, redb::StorageError,
            redb::CommitError, redb::SetDurabilityError, redb::CursorError);
    )+};
    (@each $ours:ident: $($theirs:ty),+) => {$(
        impl From<$theirs> for $ours {
            fn from(e: $theirs) -> Self {
                Self::Storage(e.into())
            }
        }
    )+};
}

from_redb!(
    OpenViewError,
    ApplyError,
    RebuildError,
    ReadError,
    StateLoadError
);
