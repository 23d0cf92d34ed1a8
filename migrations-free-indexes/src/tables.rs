//! Every redb table of the crate, with its key and value layout, and the name and definition
//! version of the view that owns it.
//!
//! Bumping a `*_VERSION` constant makes the next open drop that view's tables and rebuild them
//! from the log. There are no migrations: a layout change is a version bump.
//!
//! Conventions: ids (`EntryId`, `NodeId`) are their 32 raw bytes, typed `&[u8; 32]`, which
//! redb compares with one `memcmp` (a `[u8; 32]` is compared byte by byte); integers in tuple
//! keys and values use redb's own fixed-width encoding; byte-string values with several fields
//! use the layouts documented here (encoded by the private `record` module).

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
/// Definition version of the log lookup view. 2: adds [`LOG_AUTHOR_SEQ_LSN`]. 3: drops the
/// EntryId → LSN table (1M random 32-byte keys, the costliest table to build); the id of each
/// entry is in [`LOG_AUTHOR_SEQ_LSN`].
pub const LOG_LOOKUP_VERSION: u64 = 3;

/// The version vector. Key: author `NodeId`. Value: `(highest seq in the log, its EntryId)`.
pub const LOG_AUTHOR_HEAD: TableDefinition<&[u8; 32], (u64, &[u8; 32])> =
    TableDefinition::new(LOG_AUTHOR_HEAD_NAME);
/// Name of [`LOG_AUTHOR_HEAD`].
pub const LOG_AUTHOR_HEAD_NAME: &str = "log_lookup.author_head";

/// Which entries the log holds, and where. Key: `(author NodeId, seq)`. Value: `(LSN, EntryId)`:
/// the record holding that entry (the first, should the log ever hold it twice) and the
/// entry's id. Since an entry's id covers its author and seq, the log holds entry X exactly
/// when X's `(author, seq)` row names X. A peer session starts reading the log at the first
/// entry the peer lacks, found here from the peer's version vector alone. Keys of one author
/// grow with the log, so applying the log only ever appends at the end of each author's range.
pub const LOG_AUTHOR_SEQ_LSN: TableDefinition<AuthorSeq, (u64, &[u8; 32])> =
    TableDefinition::new(LOG_AUTHOR_SEQ_LSN_NAME);
/// Key of [`LOG_AUTHOR_SEQ_LSN`]: `(author NodeId, seq)`.
pub type AuthorSeq = (&'static [u8; 32], u64);
/// Name of [`LOG_AUTHOR_SEQ_LSN`].
pub const LOG_AUTHOR_SEQ_LSN_NAME: &str = "log_lookup.author_seq_lsn";

// ---- Key/value (multi-value register) view -------------------------------------------------

/// Name of the key/value view.
pub const KV_VIEW: &str = "kv";
/// Definition version of the key/value view. 2: a batch replays each key's supersede marks
/// and versions in log order, so the stored rows no longer depend on batch boundaries. 3: adds
/// [`KV_DIGEST`]. 4: the digest hashes each key with all its versions
/// ([`crate::digest::DIGEST_VERSION`] 2).
pub const KV_VERSION: u64 = 4;

/// Current versions, one row per key that has any. Key: the key. Value: its current versions
/// ascending by id, `count u32 LE` then per version `id [32] | author [32] | timestamp u64 LE |
/// lsn u64 LE | kind u8 (0 delete, 1 put) | value length u32 LE | value bytes`. One row per
/// key makes a put that supersedes what it read one read and one write of one row.
pub const KV_CURRENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new(KV_CURRENT_NAME);
/// Name of [`KV_CURRENT`].
pub const KV_CURRENT_NAME: &str = "kv.current";

/// Versions superseded before they were applied. Key: `(key, EntryId)`. Value: `()`. Holds
/// `(k, id)` for every `id` an applied op on `k` superseded while `id` was not current (not
/// arrived yet, or already superseded); a version that was current when superseded is only
/// removed from [`KV_CURRENT`]. So a version that arrives is current exactly when no mark for
/// it exists. Invariant: no `(k, id)` here is among the current versions of `k`.
pub const KV_SUPERSEDED: TableDefinition<(&[u8], &[u8; 32]), ()> =
    TableDefinition::new(KV_SUPERSEDED_NAME);
/// Name of [`KV_SUPERSEDED`].
pub const KV_SUPERSEDED_NAME: &str = "kv.superseded";

/// The state digest of [`KV_CURRENT`] ([`crate::digest`]). Key: [`KV_DIGEST_ROW`]. Value: the
/// digest's lanes ([`crate::digest::DIGEST_BYTES`] bytes). No row: the empty view's digest.
pub const KV_DIGEST: TableDefinition<&str, &[u8]> = TableDefinition::new(KV_DIGEST_NAME);
/// Name of [`KV_DIGEST`].
pub const KV_DIGEST_NAME: &str = "kv.digest";
/// The one row of [`KV_DIGEST`].
pub const KV_DIGEST_ROW: &str = "current";

// ---- History view --------------------------------------------------------------------------

/// Name of the history view.
pub const HISTORY_VIEW: &str = "history";
/// Definition version of the history view. 2: each record points at the key's version
/// before it, and a row per key at its newest ([`HISTORY_LATEST`]), instead of a row per
/// version keyed by `(key, LSN)`, which took a random-position insert per op.
pub const HISTORY_VERSION: u64 = 2;

/// Where each key's history starts. Key: the key. Value: `(LSN, op index)` of its newest
/// version, the key of its record in [`HISTORY_RECORDS`]. One row per key ever written, so a
/// batch reads and writes each key it touches once, however many versions it adds.
pub const HISTORY_LATEST: TableDefinition<&[u8], (u64, u32)> =
    TableDefinition::new(HISTORY_LATEST_NAME);
/// Name of [`HISTORY_LATEST`].
pub const HISTORY_LATEST_NAME: &str = "history.latest";

/// Every version ever written, tombstones included, in log order. Key: `(LSN, op index)`, so
/// applying the log only ever appends. Value: `id [32] | author [32] | timestamp u64 LE |
/// previous LSN u64 LE | previous op index u32 LE | kind u8 (0 delete, 1 put) | value bytes
/// (put only, the rest of the record)`, where `(previous LSN, previous op index)` is the key
/// of the record of the same key's version before this one, LSN 0 for none: a key's history,
/// newest first, is a walk from [`HISTORY_LATEST`] along these links.
pub const HISTORY_RECORDS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new(HISTORY_RECORDS_NAME);
/// Name of [`HISTORY_RECORDS`].
pub const HISTORY_RECORDS_NAME: &str = "history.records";

// ---- Secondary index views (declared at run time) ------------------------------------------

/// Prefix of the name of every secondary index view and of its tables, so that a declared
/// index never shares a name with a built-in view.
pub const SECONDARY_VIEW_PREFIX: &str = "idx.";

/// Name of the view of the secondary index declared as `index`.
pub fn secondary_view_name(index: &str) -> String {
    format!("{SECONDARY_VIEW_PREFIX}{index}")
}

/// The postings of a secondary index: one row per (index value, key). Key: `(encoded value,
/// key)`, the value a tuple of one component per field, each encoded so that byte order is
/// value order (layout in `document`). Value: `()`. Named `idx.NAME.postings`.
pub fn secondary_postings(table: &str) -> TableDefinition<'_, (&'static [u8], &'static [u8]), ()> {
    TableDefinition::new(table)
}

/// What each key is posted under, to remove its postings when it changes. Key: the key.
/// Value: `flags u8 (bit 0: a current value was skipped)` then per posted value `length u32 LE
/// | encoded value`, ascending. A key has a row only when it has postings or is skipped. Named
/// `idx.NAME.by_key`.
pub fn secondary_by_key(table: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(table)
}

/// Counters of a secondary index. Key: `documents`, `postings` or `skipped`. Value: the count.
/// Named `idx.NAME.stats`.
pub fn secondary_stats(table: &str) -> TableDefinition<'_, &'static str, u64> {
    TableDefinition::new(table)
}
