//! Every redb table of the crate, with its key and value layout, and the name and definition
//! version of the view that owns it.
//!
//! Bumping a `*_VERSION` constant makes the next open drop that view's tables and rebuild them
//! from the log. There are no migrations: a layout change is a version bump.
//!
//! Conventions: ids (`EntryId`, `NodeId`) are their 32 raw bytes; integers in tuple keys and
//! values use redb's own fixed-width encoding; byte-string values with several fields use the
//! layouts in [`crate::record`], documented here.

use redb::TableDefinition;

// ---- Framework tables (owned by no view; never dropped) ------------------------------------

/// View checkpoints. Key: view name. Value: `(definition version, applied LSN)`. Written in the
/// same transaction as the view's data, so the LSN always describes exactly what the view holds.
pub const VIEW_CHECKPOINTS: TableDefinition<&str, (u64, u64)> =
    TableDefinition::new(VIEW_CHECKPOINTS_NAME);
/// Name of [`VIEW_CHECKPOINTS`].
pub const VIEW_CHECKPOINTS_NAME: &str = "meta.view_checkpoints";

/// The tables each view owned when its checkpoint was last reset. Key: `(view name, table
/// name)`. Value: `()`. Lets a later open drop the tables of a view that is no longer registered
/// or whose new definition no longer uses them.
pub const VIEW_TABLES: TableDefinition<(&str, &str), ()> = TableDefinition::new(VIEW_TABLES_NAME);
/// Name of [`VIEW_TABLES`].
pub const VIEW_TABLES_NAME: &str = "meta.view_tables";

/// Names of the framework tables; no view may claim them.
pub const FRAMEWORK_TABLES: &[&str] = &[VIEW_CHECKPOINTS_NAME, VIEW_TABLES_NAME];

// ---- Log lookup view -----------------------------------------------------------------------

/// Name of the log lookup view.
pub const LOG_LOOKUP_VIEW: &str = "log_lookup";
/// Definition version of the log lookup view.
pub const LOG_LOOKUP_VERSION: u64 = 1;

/// Which entries the log holds. Key: `EntryId`. Value: the LSN of its record (the first, should
/// the log ever hold it twice).
pub const LOG_ENTRY_LSN: TableDefinition<[u8; 32], u64> = TableDefinition::new(LOG_ENTRY_LSN_NAME);
/// Name of [`LOG_ENTRY_LSN`].
pub const LOG_ENTRY_LSN_NAME: &str = "log_lookup.entry_lsn";

/// The version vector. Key: author `NodeId`. Value: `(highest seq in the log, its EntryId)`.
pub const LOG_AUTHOR_HEAD: TableDefinition<[u8; 32], (u64, [u8; 32])> =
    TableDefinition::new(LOG_AUTHOR_HEAD_NAME);
/// Name of [`LOG_AUTHOR_HEAD`].
pub const LOG_AUTHOR_HEAD_NAME: &str = "log_lookup.author_head";

// ---- Key/value (multi-value register) view -------------------------------------------------

/// Name of the key/value view.
pub const KV_VIEW: &str = "kv";
/// Definition version of the key/value view.
pub const KV_VERSION: u64 = 1;

/// Current versions. Key: `(key, EntryId)`; tuple keys compare element-wise, so the range
/// `(k, [0; 32])..=(k, [0xff; 32])` is exactly key `k`, ids ascending. Value: a version record,
/// `author [32] | timestamp u64 LE | lsn u64 LE | kind u8 (0 delete, 1 put) | value bytes (put
/// only, the rest of the record)`.
pub const KV_CURRENT: TableDefinition<(&[u8], [u8; 32]), &[u8]> =
    TableDefinition::new(KV_CURRENT_NAME);
/// Name of [`KV_CURRENT`].
pub const KV_CURRENT_NAME: &str = "kv.current";

/// Every version any applied op has superseded, whether or not that version has arrived. Key:
/// `(key, EntryId)`. Value: `()`. Invariant: no key of [`KV_CURRENT`] is in this table.
pub const KV_SUPERSEDED: TableDefinition<(&[u8], [u8; 32]), ()> =
    TableDefinition::new(KV_SUPERSEDED_NAME);
/// Name of [`KV_SUPERSEDED`].
pub const KV_SUPERSEDED_NAME: &str = "kv.superseded";

// ---- History view --------------------------------------------------------------------------

/// Name of the history view.
pub const HISTORY_VIEW: &str = "history";
/// Definition version of the history view.
pub const HISTORY_VERSION: u64 = 1;

/// Every version ever written, tombstones included. Key: `(key, LSN)`, so a reverse range over
/// one key is newest first. Value: `id [32] | author [32] | timestamp u64 LE | kind u8 (0
/// delete, 1 put) | value bytes (put only, the rest of the record)`.
pub const HISTORY_VERSIONS: TableDefinition<(&[u8], u64), &[u8]> =
    TableDefinition::new(HISTORY_VERSIONS_NAME);
/// Name of [`HISTORY_VERSIONS`].
pub const HISTORY_VERSIONS_NAME: &str = "history.versions";
