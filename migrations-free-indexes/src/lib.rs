//! kappakv's materialized views: everything derived from the log, in one redb file
//! (`indexes.redb`), dropped and rebuilt rather than migrated.
//!
//! The server feeds batches of `(Lsn, &SignedEntry)` to [`Indexes::apply`]; each view applies
//! the entries past its checkpoint, and the checkpoint commits in the same transaction as the
//! data. Reads go through a [`Snapshot`] (one redb read transaction), which never blocks the
//! writer.
//!
//! # Layout
//!
//! - [`view`]: the [`View`] trait (name, version, tables, batch apply).
//! - [`checkpoint`]: per-view `(definition version, applied LSN)`, committed with the data.
//! - [`runner`]: [`Indexes`]: open (drop views whose definition changed), apply, rebuild,
//!   snapshots.
//! - [`tables`]: every table definition with its key/value layout, and the views' names and
//!   versions. `record` (private) encodes and decodes the multi-field values.
//! - [`views`]: the built-in views: [`views::log_lookup`] (EntryId → LSN, version vector),
//!   [`views::kv`] (the multi-value register) and [`views::history`]; and the declared
//!   secondary indexes, [`views::secondary`] (one view per [`IndexDef`], versioned by a hash
//!   of the definition), with [`document`] for reading fields and encoding index keys.
//! - [`digest`]: the state digest of the kv view, a homomorphic set hash kept up to date as
//!   batches apply.
//! - [`mvr`]: the multi-value register rules with no storage. [`overlay`]: [`KvOverlay`], which
//!   lets the server's writer resolve plain puts while the indexer lags.
//! - [`state_snapshot`]: a peer's kv state sent in key order and loaded by a new replica
//!   ([`StateStore`]), which answers reads while the log behind it replays.
//! - [`snapshot`]: every query (secondary index queries are in [`views::secondary`]). [`error`]: one error enum per operation.
//!
//! # Crash safety
//!
//! Nothing here is precious: `rm indexes.redb` is always safe. Commits on the hot path are
//! non-durable; after a crash every view resumes from its last durable checkpoint, which always
//! describes exactly the data committed with it. An interrupted rebuild therefore resumes where
//! its last commit left it and ends equal to a rebuild in one go.
//!
//! # What this crate does not do
//!
//! It never opens log files, spawns threads, uses tokio or QUIC, or validates entries
//! (signatures, chains): the server reads and verifies the log and decides when to apply,
//! commit durably, and rebuild. Equivocation is detected by the server using
//! [`Snapshot::author_head`] and [`Snapshot::entry_at`].

pub mod checkpoint;
pub mod digest;
pub mod document;
pub mod error;
pub mod mvr;
pub mod overlay;
mod record;
pub mod runner;
pub mod snapshot;
pub mod state_snapshot;
pub mod tables;
pub mod view;
pub mod views;

pub use checkpoint::Checkpoint;
pub use digest::StateDigest;
pub use error::{
    ApplyError, CorruptRecord, OpenViewError, QueryError, ReadError, RebuildError, StateLoadError,
};
pub use overlay::KvOverlay;
pub use runner::{DEFAULT_CACHE_BYTES, Indexes, OpenReport, ResetReason, ViewOpened};
pub use snapshot::Snapshot;
pub use state_snapshot::{StateMeta, StateRow, StateStore};
pub use view::{Batch, View};
pub use views::secondary::{IndexStats, QueryPage};
pub use views::{
    IndexDef, IndexDefError, IndexKind, SERVING_VIEWS, SecondaryIndexView, configured_views,
    default_views,
};

// The server moves these across threads: the indexer owns `Indexes`, readers take snapshots.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Indexes>();
    send::<Snapshot>();
    send_sync::<KvOverlay>();
};
