//! [`Indexes`]: the index database and its registered views. Opens the file, reconciles stored
//! view definitions with the code's (drop and rebuild, never migrate), applies batches of log
//! entries to every view with its checkpoint, and hands out read snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kappakv_protocol::Lsn;
use redb::backends::InMemoryBackend;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};

use crate::checkpoint::{self, Checkpoint};
use crate::error::{ApplyError, OpenViewError, ReadError, RebuildError};
use crate::snapshot::Snapshot;
use crate::tables::{FRAMEWORK_TABLES, VIEW_CHECKPOINTS, VIEW_TABLES};
use crate::view::{Batch, View};

/// Why a view was reset to "needs rebuild" on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The file had no checkpoint for it.
    New,
    /// Its stored definition version differs from the code's.
    VersionChanged {
        /// The version its data was derived with.
        stored: u64,
    },
}

/// The state of one registered view after open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewOpened {
    /// The view.
    pub name: String,
    /// Its definition version.
    pub version: u64,
    /// What it has applied; replay starts after this.
    pub applied_lsn: Lsn,
    /// Set when its tables were dropped on this open.
    pub reset: Option<ResetReason>,
}

/// What [`Indexes::open`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The file did not exist and was created.
    pub created: bool,
    /// Every registered view, in registration order.
    pub views: Vec<ViewOpened>,
    /// Views the file had a checkpoint for that are no longer registered; their checkpoints and
    /// tables were dropped.
    pub removed_views: Vec<String>,
    /// Tables dropped because no registered view owns them (those of removed views, those a new
    /// definition no longer uses, and strays).
    pub dropped_tables: Vec<String>,
}

impl OpenReport {
    /// Views that were reset and must be rebuilt from the start of the log.
    pub fn needs_rebuild(&self) -> impl Iterator<Item = &str> {
        self.views
            .iter()
            .filter(|v| v.reset.is_some())
            .map(|v| v.name.as_str())
    }
}

/// The index database: every view, each with its checkpoint.
///
/// One write transaction at a time (redb serialises `begin_write`); the server calls the
/// writing methods from one thread, the indexer. Snapshots may be taken from any thread and
/// never block it.
pub struct Indexes {
    db: Database,
    /// In registration order; names and table names are unique (checked on open).
    views: Vec<Box<dyn View>>,
}

impl std::fmt::Debug for Indexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Indexes")
            .field("views", &self.view_names())
            .finish_non_exhaustive()
    }
}

/// redb page cache used by [`Indexes::open`]. redb's memory grows to about two and a half
/// times this setting, and pages it does not hold are read from the operating system's page
/// cache at little cost: with 1,000,000 keys a node's RSS after a million gets was 97 MiB with
/// 16 MiB here and 242 MiB with 64 MiB, at the same get, put and catch-up rates.
pub const DEFAULT_CACHE_BYTES: usize = 16 * 1024 * 1024;

impl Indexes {
    /// Opens `path`, creating it if missing, and reconciles stored views with `views`:
    ///
    /// - a view that is new, or whose stored version differs from [`View::version`], has its
    ///   tables dropped and its checkpoint reset to 0 (reported; the caller replays the log);
    /// - a stored view that is no longer registered has its checkpoint and its tables dropped
    ///   (later, secondary index definitions that were removed go this way);
    /// - tables no registered view owns are dropped.
    ///
    /// The reconciliation commits durably before this returns.
    pub fn open(
        path: impl AsRef<Path>,
        views: Vec<Box<dyn View>>,
    ) -> Result<(Self, OpenReport), OpenViewError> {
        Self::open_with_cache(path, views, DEFAULT_CACHE_BYTES)
    }

    /// Like [`Indexes::open`], with redb's page cache capped at `cache_bytes`. The cache is
    /// most of the memory the views cost; redb's own default (1 GiB) is far more than a small
    /// node should spend.
    pub fn open_with_cache(
        path: impl AsRef<Path>,
        views: Vec<Box<dyn View>>,
        cache_bytes: usize,
    ) -> Result<(Self, OpenReport), OpenViewError> {
        let path = path.as_ref();
        let created = !path.exists();
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        Self::init(db, views, created)
    }

    /// Like [`Indexes::open`] on a fresh database held in memory (redb's `InMemoryBackend`).
    pub fn open_in_memory(views: Vec<Box<dyn View>>) -> Result<(Self, OpenReport), OpenViewError> {
        let db = Database::builder().create_with_backend(InMemoryBackend::new())?;
        Self::init(db, views, true)
    }

    fn init(
        db: Database,
        views: Vec<Box<dyn View>>,
        created: bool,
    ) -> Result<(Self, OpenReport), OpenViewError> {
        check_unique(&views)?;
        let mut report = OpenReport {
            created,
            ..OpenReport::default()
        };
        let claimed: BTreeSet<&str> = views.iter().flat_map(|v| v.tables()).collect();

        let txn = db.begin_write()?;
        {
            let mut checkpoints = txn.open_table(VIEW_CHECKPOINTS)?;
            let stored: BTreeMap<String, Checkpoint> = checkpoints
                .iter()?
                .map(|row| {
                    let (name, value) = row?;
                    let (version, applied_lsn) = value.value();
                    Ok((
                        name.value().to_owned(),
                        Checkpoint {
                            version,
                            applied_lsn,
                        },
                    ))
                })
                .collect::<Result<_, redb::StorageError>>()?;

            for view in &views {
                let name = view.name();
                let reset = match stored.get(name) {
                    Some(cp) if cp.version == view.version() => None,
                    Some(cp) => Some(ResetReason::VersionChanged { stored: cp.version }),
                    None => Some(ResetReason::New),
                };
                let applied_lsn = if reset.is_none() {
                    stored.get(name).map_or(0, |cp| cp.applied_lsn)
                } else {
                    report
                        .dropped_tables
                        .extend(reset_view(&txn, view.as_ref(), &claimed)?);
                    checkpoint::write(
                        &mut checkpoints,
                        name,
                        Checkpoint {
                            version: view.version(),
                            applied_lsn: 0,
                        },
                    )?;
                    0
                };
                report.views.push(ViewOpened {
                    name: name.to_owned(),
                    version: view.version(),
                    applied_lsn,
                    reset,
                });
            }

            for name in stored.keys() {
                if views.iter().any(|v| v.name() == name) {
                    continue;
                }
                report
                    .dropped_tables
                    .extend(forget_view(&txn, name, &claimed)?);
                checkpoints.remove(name.as_str())?;
                report.removed_views.push(name.clone());
            }
        }
        report.dropped_tables.extend(drop_strays(&txn, &claimed)?);
        txn.commit()?;
        Ok((Self { db, views }, report))
    }

    /// Names of the registered views, in registration order.
    pub fn view_names(&self) -> Vec<&str> {
        self.views.iter().map(|v| v.name()).collect()
    }

    /// Applies `batch` to every view in one write transaction, with each view's new checkpoint.
    ///
    /// `batch` must be consecutive ascending LSNs. A view whose checkpoint is already at or past
    /// an entry skips it (re-applying applied LSNs is a no-op); a view whose checkpoint is below
    /// the batch's first LSN minus one gets [`ApplyError::Gap`] and nothing commits.
    ///
    /// With `durable == false` the commit uses redb's `Durability::None`: it is visible to
    /// snapshots at once but redb writes it to disk only with a *later durable commit*. A crash
    /// loses every non-durable commit since the last durable one, checkpoints included, so the
    /// views simply resume from the older checkpoint. The server commits durably every few
    /// seconds and at shutdown (or calls [`Indexes::persist`]).
    pub fn apply(&self, batch: &Batch<'_>, durable: bool) -> Result<(), ApplyError> {
        self.apply_to(batch, durable, &|_| true)
    }

    /// Like [`Indexes::apply`], for the views `select` names only. The others are left as they
    /// are, whatever their checkpoint: this is how a view being rebuilt catches up in steps
    /// while the views that serve reads follow the log.
    pub fn apply_to(
        &self,
        batch: &Batch<'_>,
        durable: bool,
        select: &dyn Fn(&str) -> bool,
    ) -> Result<(), ApplyError> {
        for w in batch.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                return Err(ApplyError::NotConsecutive {
                    previous: w[0].0,
                    lsn: w[1].0,
                });
            }
        }
        if batch.is_empty() && !durable {
            return Ok(());
        }
        let txn = begin_write(&self.db, durable)?;
        {
            let mut checkpoints = txn.open_table(VIEW_CHECKPOINTS)?;
            for view in self.views.iter().filter(|v| select(v.name())) {
                let name = view.name();
                // `open` wrote a checkpoint for every registered view, and only `rebuild`
                // rewrites them (to 0), so a missing one means a damaged file.
                let cp =
                    checkpoint::read(&checkpoints, name)?.ok_or(crate::error::CorruptRecord {
                        table: crate::tables::VIEW_CHECKPOINTS_NAME,
                        reason: "a registered view has no checkpoint",
                    })?;
                let todo = &batch[batch.partition_point(|(lsn, _)| *lsn <= cp.applied_lsn)..];
                let Some(&(first, _)) = todo.first() else {
                    continue;
                };
                if first != cp.applied_lsn + 1 {
                    return Err(ApplyError::Gap {
                        view: name.to_owned(),
                        applied: cp.applied_lsn,
                        next: first,
                    });
                }
                view.apply(&txn, todo)?;
                let last = todo[todo.len() - 1].0;
                checkpoint::write(
                    &mut checkpoints,
                    name,
                    Checkpoint {
                        applied_lsn: last,
                        ..cp
                    },
                )?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Makes every earlier non-durable commit durable (an empty durable commit).
    pub fn persist(&self) -> Result<(), ApplyError> {
        self.apply(&[], true)
    }

    /// Drops the tables of the view named `name`, or of every view when `None`, and resets
    /// their checkpoints to 0, in one durable transaction. The caller then replays the log
    /// from [`Indexes::min_applied_lsn`]` + 1`.
    ///
    /// An interrupted rebuild needs no special care: each batch commits with its checkpoint, so
    /// a later start resumes from the last committed one and ends equal to a rebuild in one go.
    /// Returns the names of the views reset.
    pub fn rebuild(&self, name: Option<&str>) -> Result<Vec<String>, RebuildError> {
        let selected: Vec<&dyn View> = match name {
            None => self.views.iter().map(AsRef::as_ref).collect(),
            Some(name) => {
                let view = self
                    .views
                    .iter()
                    .find(|v| v.name() == name)
                    .ok_or_else(|| RebuildError::UnknownView {
                        name: name.to_owned(),
                        known: self.view_names().join(", "),
                    })?;
                vec![view.as_ref()]
            }
        };
        let claimed: BTreeSet<&str> = self.views.iter().flat_map(|v| v.tables()).collect();
        let txn = begin_write(&self.db, true)?;
        {
            let mut checkpoints = txn.open_table(VIEW_CHECKPOINTS)?;
            for view in &selected {
                reset_view(&txn, *view, &claimed)?;
                checkpoint::write(
                    &mut checkpoints,
                    view.name(),
                    Checkpoint {
                        version: view.version(),
                        applied_lsn: 0,
                    },
                )?;
            }
        }
        txn.commit()?;
        Ok(selected.iter().map(|v| v.name().to_owned()).collect())
    }

    /// The applied LSN of every registered view, in registration order.
    pub fn applied_lsns(&self) -> Result<Vec<(String, Lsn)>, ReadError> {
        let snapshot = self.snapshot()?;
        self.views
            .iter()
            .map(|v| Ok((v.name().to_owned(), snapshot.applied_lsn(v.name())?)))
            .collect()
    }

    /// The lowest applied LSN over all views: the log must be replayed from the next LSN.
    /// `0` when there are no views.
    pub fn min_applied_lsn(&self) -> Result<Lsn, ReadError> {
        Ok(self
            .applied_lsns()?
            .into_iter()
            .map(|(_, lsn)| lsn)
            .min()
            .unwrap_or(0))
    }

    /// A consistent read view of every table as of the last commit. Never blocks the writer;
    /// holding one for long keeps redb from reusing pages freed since.
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        Ok(Snapshot::new(self.db.begin_read()?))
    }
}

fn begin_write(db: &Database, durable: bool) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })?;
    Ok(txn)
}

fn check_unique(views: &[Box<dyn View>]) -> Result<(), OpenViewError> {
    let mut names = BTreeSet::new();
    let mut owners: BTreeMap<&str, &str> = FRAMEWORK_TABLES
        .iter()
        .map(|t| (*t, "the framework"))
        .collect();
    for view in views {
        if !names.insert(view.name()) {
            return Err(OpenViewError::DuplicateView {
                name: view.name().to_owned(),
            });
        }
        for table in view.tables() {
            if let Some(other) = owners.insert(table, view.name()) {
                return Err(OpenViewError::DuplicateTable {
                    table: table.to_owned(),
                    view: view.name().to_owned(),
                    other: other.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// A table handle from a name, for deleting; redb deletes by name whatever the types.
fn untyped(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// Drops the tables `view` owns now and those recorded when it was last reset (unless another
/// registered view owns them), and records its current tables. Returns the tables dropped
/// that no registered view owns any more.
fn reset_view(
    txn: &WriteTransaction,
    view: &dyn View,
    claimed: &BTreeSet<&str>,
) -> Result<Vec<String>, redb::Error> {
    let name = view.name();
    let orphaned = forget_view(txn, name, claimed)?;
    for table in view.tables() {
        txn.delete_table(untyped(table))?;
    }
    let mut owned = txn.open_table(VIEW_TABLES)?;
    for table in view.tables() {
        owned.insert((name, table), ())?;
    }
    Ok(orphaned)
}

/// Drops the tables recorded for `view` that no registered view claims, and removes the
/// records. Returns the tables dropped.
fn forget_view(
    txn: &WriteTransaction,
    view: &str,
    claimed: &BTreeSet<&str>,
) -> Result<Vec<String>, redb::Error> {
    let mut owned = txn.open_table(VIEW_TABLES)?;
    let mut recorded = Vec::new();
    for row in owned.range((view, "")..)? {
        let (key, _) = row?;
        let (owner, table) = key.value();
        if owner != view {
            break;
        }
        recorded.push(table.to_owned());
    }
    let mut dropped = Vec::new();
    for table in recorded {
        owned.remove((view, table.as_str()))?;
        if !claimed.contains(table.as_str()) && txn.delete_table(untyped(&table))? {
            dropped.push(table);
        }
    }
    Ok(dropped)
}

/// Drops every table that is neither a framework table nor claimed by a registered view.
fn drop_strays(
    txn: &WriteTransaction,
    claimed: &BTreeSet<&str>,
) -> Result<Vec<String>, redb::Error> {
    let strays: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_owned())
        .filter(|t| !claimed.contains(t.as_str()) && !FRAMEWORK_TABLES.contains(&t.as_str()))
        .collect();
    for table in &strays {
        txn.delete_table(untyped(table))?;
    }
    Ok(strays)
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::{Entry, EntryId, NodeId, Op, SignedEntry, Timestamp};
    use redb::ReadableTableMetadata;

    use super::*;
    use crate::tables::{KV_CURRENT, KV_VIEW, LOG_LOOKUP_VIEW};
    use crate::views::{HistoryView, KvView, LogLookupView};

    /// A view like another, with a different version.
    struct Versioned<V>(V, u64);

    impl<V: View> View for Versioned<V> {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn version(&self) -> u64 {
            self.1
        }
        fn tables(&self) -> Vec<&str> {
            self.0.tables()
        }
        fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
            self.0.apply(txn, batch)
        }
    }

    /// One author writing keys `k0`, `k1`, `k2` in turn, each put superseding the key's
    /// previous version.
    fn chain(n: u64) -> Vec<SignedEntry> {
        let mut prev = None;
        let mut last: [Option<EntryId>; 3] = [None; 3];
        (1..=n)
            .map(|seq| {
                let k = (seq % 3) as usize;
                let entry = Entry {
                    author: NodeId([7; 32]),
                    seq,
                    prev,
                    timestamp: Timestamp(seq),
                    ops: vec![Op::Put {
                        key: format!("k{k}").into_bytes(),
                        value: seq.to_le_bytes().to_vec(),
                        supersedes: last[k].into_iter().collect(),
                    }],
                };
                let id = entry.id();
                prev = Some(id);
                last[k] = Some(id);
                SignedEntry {
                    entry,
                    id,
                    signature: None,
                }
            })
            .collect()
    }

    fn batch(entries: &[SignedEntry], from: Lsn) -> Vec<(Lsn, &SignedEntry)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| (from + i as u64, e))
            .collect()
    }

    fn kv_rows(indexes: &Indexes) -> u64 {
        let snap = indexes.snapshot().unwrap();
        snap.table(KV_CURRENT)
            .unwrap()
            .map_or(0, |t| t.len().unwrap())
    }

    #[test]
    fn open_fresh_reports_every_view_new() {
        let (indexes, report) = Indexes::open_in_memory(default_views_for_test()).unwrap();
        assert!(report.created);
        assert_eq!(
            report.needs_rebuild().collect::<Vec<_>>(),
            ["log_lookup", "kv", "history"]
        );
        assert_eq!(indexes.min_applied_lsn().unwrap(), 0);
    }

    fn default_views_for_test() -> Vec<Box<dyn View>> {
        crate::views::default_views()
    }

    #[test]
    fn version_bump_drops_and_resets_only_that_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexes.redb");
        let entries = chain(6);
        {
            let (indexes, _) = Indexes::open(&path, default_views_for_test()).unwrap();
            indexes.apply(&batch(&entries, 1), true).unwrap();
            assert_eq!(indexes.min_applied_lsn().unwrap(), 6);
        }
        let views: Vec<Box<dyn View>> = vec![
            Box::new(LogLookupView),
            Box::new(Versioned(KvView, KV_VERSION_BUMPED)),
            Box::new(HistoryView),
        ];
        let (indexes, report) = Indexes::open(&path, views).unwrap();
        assert!(!report.created);
        assert_eq!(report.needs_rebuild().collect::<Vec<_>>(), [KV_VIEW]);
        assert_eq!(
            report.views[1].reset,
            Some(ResetReason::VersionChanged {
                stored: crate::tables::KV_VERSION
            })
        );
        assert_eq!(kv_rows(&indexes), 0, "the kv tables were dropped");
        let lsns = indexes.applied_lsns().unwrap();
        assert_eq!(
            lsns,
            [
                (LOG_LOOKUP_VIEW.into(), 6),
                (KV_VIEW.into(), 0),
                ("history".into(), 6)
            ]
        );
        assert_eq!(indexes.min_applied_lsn().unwrap(), 0);

        // Replaying the whole log only reaches the view that is behind.
        indexes.apply(&batch(&entries, 1), false).unwrap();
        assert_eq!(indexes.min_applied_lsn().unwrap(), 6);
        assert_eq!(kv_rows(&indexes), 3);
        assert_eq!(
            indexes
                .snapshot()
                .unwrap()
                .history(b"k0", 10)
                .unwrap()
                .len(),
            2
        );
    }

    const KV_VERSION_BUMPED: u64 = crate::tables::KV_VERSION + 1;

    #[test]
    fn reapplying_applied_lsns_is_a_no_op_and_gaps_are_refused() {
        let (indexes, _) = Indexes::open_in_memory(default_views_for_test()).unwrap();
        let entries = chain(5);
        let all = batch(&entries, 1);
        indexes.apply(&all[..3], false).unwrap();
        let before = indexes.snapshot().unwrap().history(b"k1", 10).unwrap();
        indexes.apply(&all[..3], false).unwrap();
        indexes.apply(&all[1..2], false).unwrap();
        assert_eq!(
            indexes.snapshot().unwrap().history(b"k1", 10).unwrap(),
            before
        );
        assert_eq!(indexes.min_applied_lsn().unwrap(), 3);

        let err = indexes.apply(&all[4..], false).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Gap {
                    applied: 3,
                    next: 5,
                    ..
                }
            ),
            "{err}"
        );
        let err = indexes.apply(&[all[3], all[0]], false).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::NotConsecutive {
                    previous: 4,
                    lsn: 1
                }
            ),
            "{err}"
        );
        // Overlapping batches apply only the new part.
        indexes.apply(&all[2..], false).unwrap();
        assert_eq!(indexes.min_applied_lsn().unwrap(), 5);
        assert_eq!(
            indexes
                .snapshot()
                .unwrap()
                .history(b"k1", 10)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn rebuild_one_or_all() {
        let (indexes, _) = Indexes::open_in_memory(default_views_for_test()).unwrap();
        let entries = chain(4);
        indexes.apply(&batch(&entries, 1), false).unwrap();
        assert_eq!(indexes.rebuild(Some(KV_VIEW)).unwrap(), [KV_VIEW]);
        assert_eq!(kv_rows(&indexes), 0);
        let snap = indexes.snapshot().unwrap();
        assert_eq!(snap.applied_lsn(KV_VIEW).unwrap(), 0);
        assert_eq!(snap.applied_lsn(LOG_LOOKUP_VIEW).unwrap(), 4);
        let author = entries[2].entry.author;
        assert_eq!(snap.entry_at(&author, 3).unwrap(), Some((3, entries[2].id)));
        drop(snap);
        let err = indexes.rebuild(Some("nope")).unwrap_err();
        assert!(err.to_string().contains("log_lookup, kv, history"), "{err}");
        assert_eq!(indexes.rebuild(None).unwrap().len(), 3);
        assert_eq!(
            indexes.snapshot().unwrap().entry_at(&author, 3).unwrap(),
            None
        );
        indexes.apply(&batch(&entries, 1), false).unwrap();
        assert_eq!(kv_rows(&indexes), 3);
    }

    #[test]
    fn removed_views_and_strays_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexes.redb");
        {
            let (indexes, _) = Indexes::open(&path, default_views_for_test()).unwrap();
            indexes.apply(&batch(&chain(2), 1), true).unwrap();
            let txn = indexes.db.begin_write().unwrap();
            txn.open_table(TableDefinition::<u64, u64>::new("stray"))
                .unwrap();
            txn.commit().unwrap();
        }
        let (indexes, report) =
            Indexes::open(&path, vec![Box::new(LogLookupView), Box::new(KvView)]).unwrap();
        assert_eq!(report.removed_views, ["history"]);
        assert_eq!(
            report.dropped_tables,
            ["history.latest", "history.records", "stray"]
        );
        assert!(report.needs_rebuild().next().is_none());
        assert_eq!(indexes.snapshot().unwrap().history(b"k1", 10).unwrap(), []);
        assert_eq!(indexes.min_applied_lsn().unwrap(), 2);
    }

    #[test]
    fn duplicate_names_and_tables_are_refused() {
        let err = Indexes::open_in_memory(vec![Box::new(KvView), Box::new(KvView)]).unwrap_err();
        assert!(matches!(err, OpenViewError::DuplicateView { .. }), "{err}");
        struct Thief;
        impl View for Thief {
            fn name(&self) -> &'static str {
                "thief"
            }
            fn version(&self) -> u64 {
                1
            }
            fn tables(&self) -> Vec<&str> {
                vec!["kv.current"]
            }
            fn apply(&self, _: &WriteTransaction, _: &Batch<'_>) -> Result<(), ApplyError> {
                Ok(())
            }
        }
        let err = Indexes::open_in_memory(vec![Box::new(KvView), Box::new(Thief)]).unwrap_err();
        assert!(matches!(err, OpenViewError::DuplicateTable { .. }), "{err}");
    }

    #[test]
    fn log_lookup_tracks_heads_and_first_lsn() {
        let (indexes, _) = Indexes::open_in_memory(default_views_for_test()).unwrap();
        let entries = chain(3);
        let other = SignedEntry {
            entry: Entry {
                author: NodeId([1; 32]),
                ..entries[0].entry.clone()
            },
            id: EntryId([9; 32]),
            signature: None,
        };
        let mut b = batch(&entries, 1);
        b.push((4, &other));
        b.push((5, &entries[1]));
        indexes.apply(&b, false).unwrap();
        let snap = indexes.snapshot().unwrap();
        assert_eq!(
            snap.version_vector().unwrap(),
            [(NodeId([1; 32]), 1), (NodeId([7; 32]), 3)]
        );
        assert_eq!(
            snap.author_head(&NodeId([7; 32])).unwrap(),
            Some((3, entries[2].id))
        );
        // Which entry each (author, seq) is, and where: the first record, should the log
        // hold it twice.
        let at = |author: u8, seq| snap.entry_at(&NodeId([author; 32]), seq).unwrap();
        assert_eq!(at(7, 2), Some((2, entries[1].id)));
        assert_eq!(at(1, 1), Some((4, EntryId([9; 32]))));
        assert_eq!(at(7, 4), None);
        let seq_lsn = |author: u8, seq| snap.author_seq_lsn(&NodeId([author; 32]), seq).unwrap();
        assert_eq!(seq_lsn(7, 1), Some(1));
        assert_eq!(seq_lsn(7, 2), Some(2));
        assert_eq!(seq_lsn(7, 3), Some(3));
        assert_eq!(seq_lsn(7, 4), None);
        assert_eq!(seq_lsn(1, 1), Some(4));
        assert_eq!(seq_lsn(2, 1), None);
        assert_eq!(snap.log_lookup_applied_lsn().unwrap(), 5);
        drop(snap);
        // Again in a later batch: the first record still wins, and the head stays.
        indexes.apply(&[(6, &entries[1])], false).unwrap();
        let snap = indexes.snapshot().unwrap();
        assert_eq!(
            snap.entry_at(&NodeId([7; 32]), 2).unwrap(),
            Some((2, entries[1].id))
        );
        assert_eq!(
            snap.author_head(&NodeId([7; 32])).unwrap(),
            Some((3, entries[2].id))
        );
    }
}
