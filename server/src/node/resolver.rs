//! The writer's supersede resolution. A plain put or delete supersedes every version current on
//! this node when the write is ordered into the log. The kv view may lag the log, so the
//! resolver reads a view snapshot and lays over it the ops of every entry appended after the
//! snapshot's applied LSN ([`KvOverlay`]); the result is exact whatever the lag.
//!
//! Most writes go to keys written a moment before: the resolver keeps the current versions of
//! the keys it resolved ([`Known`]), and brings them up to date with each local entry, so that
//! such a write needs no read of the view at all.
//!
//! When the view cannot be read, the write is refused rather than resolved to nothing; once
//! the indexer has stopped after an error, every write is ([`SupersedeResolver::refusal`]): the
//! overlay would grow without end, and nothing written could be read back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappakv_indexes::{Indexes, KvOverlay, Snapshot};
use kappakv_protocol::{EntryId, Lsn, SignedEntry};

use super::indexer::IndexerShared;
use super::writer::SupersedeResolver;

/// How long the resolver reuses one snapshot before taking a newer one and pruning the overlay.
const SNAPSHOT_REFRESH: Duration = Duration::from_millis(20);

/// Most ops the overlay holds before the writer waits for the indexer ([`KvResolver::hold`]).
/// An op costs the overlay about 250 bytes, so this bounds it to about 16 MiB, plus the ops of
/// one writer batch. The indexer applies this many in a fraction of a second, so a burst of
/// writes is still taken at once, and a longer one at the rate the views apply it.
pub const OVERLAY_OPS_MAX: usize = 65_536;

/// How long one wait for the indexer lasts before the writer looks again.
const HOLD_WAIT: Duration = Duration::from_millis(100);

/// Bytes of keys and ids [`Known`] holds at most before it starts again empty: about 25,000
/// keys of 64 bytes with one version each.
const KNOWN_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The current versions of recently resolved keys, exact as of the last entry appended.
///
/// A local entry's op makes its key's versions `(current - supersedes) + {its id}`: nothing
/// can have superseded an id just made. A received entry may be superseded by one that came
/// before it, so its keys are forgotten, and read through the view again when next written.
#[derive(Default)]
struct Known {
    ids: HashMap<Vec<u8>, Vec<EntryId>>,
    bytes: usize,
}

impl Known {
    fn cost(key: &[u8], ids: &[EntryId]) -> usize {
        key.len() + std::mem::size_of_val(ids) + 64
    }

    fn insert(&mut self, key: &[u8], ids: Vec<EntryId>) {
        let cost = Self::cost(key, &ids);
        if self.bytes + cost > KNOWN_BYTES_MAX {
            self.clear();
        }
        self.bytes += cost;
        if let Some(old) = self.ids.insert(key.to_vec(), ids) {
            self.bytes -= Self::cost(key, &old);
        }
    }

    fn appended(&mut self, entry: &SignedEntry, local: bool) {
        for op in &entry.entry.ops {
            let key = op.key();
            if !local {
                if let Some(old) = self.ids.remove(key) {
                    self.bytes -= Self::cost(key, &old);
                }
                continue;
            }
            if let Some(ids) = self.ids.get_mut(key) {
                let before = Self::cost(key, ids);
                ids.retain(|id| !op.supersedes().contains(id));
                if let Err(at) = ids.binary_search(&entry.id) {
                    ids.insert(at, entry.id);
                }
                self.bytes = self.bytes - before + Self::cost(key, ids);
            }
        }
    }

    fn clear(&mut self) {
        self.ids = HashMap::new();
        self.bytes = 0;
    }
}

/// Resolves plain writes from the kv view plus an overlay of entries it has not applied yet.
pub struct KvResolver {
    indexes: Arc<Indexes>,
    overlay: KvOverlay,
    known: Known,
    snapshot: Option<(Instant, Snapshot)>,
    /// How far the indexer has come, and its error once it stops after one.
    views: Arc<IndexerShared>,
}

impl KvResolver {
    /// A resolver over `indexes`, whose kv view must be caught up with the log, which the
    /// indexer thread applies the log to, telling `views`.
    pub fn new(indexes: Arc<Indexes>, views: Arc<IndexerShared>) -> Self {
        Self {
            indexes,
            overlay: KvOverlay::default(),
            known: Known::default(),
            snapshot: None,
            views,
        }
    }

    fn snapshot(&mut self) -> Option<&Snapshot> {
        let stale = self
            .snapshot
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= SNAPSHOT_REFRESH);
        if stale {
            match self.indexes.snapshot() {
                Ok(snap) => {
                    if let Ok(applied) = snap.kv_applied_lsn() {
                        self.overlay.prune(applied);
                    }
                    self.snapshot = Some((Instant::now(), snap));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the kv view; keeping the previous snapshot");
                }
            }
        }
        self.snapshot.as_ref().map(|(_, s)| s)
    }

    /// Reads the view through the overlay with `read`, on a fresh enough snapshot; a failure
    /// to `purpose` is logged, and the write refused.
    fn read_view<T>(
        &mut self,
        purpose: &str,
        read: impl FnOnce(&KvOverlay, &Snapshot) -> Result<T, kappakv_indexes::ReadError>,
    ) -> Result<T, String> {
        self.snapshot();
        let Some((_, snap)) = self.snapshot.as_ref() else {
            return Err("no snapshot of the view could be taken".to_string());
        };
        read(&self.overlay, snap).map_err(|e| {
            tracing::error!(error = %e, "cannot read the kv view to {purpose}; it is refused");
            e.to_string()
        })
    }
}

impl SupersedeResolver for KvResolver {
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String> {
        if let Some(ids) = self.known.ids.get(key) {
            return Ok(ids.clone());
        }
        let ids = self.read_view("resolve a write", |overlay, snap| {
            overlay.current(key, snap)
        })?;
        self.known.insert(key, ids.clone());
        Ok(ids)
    }

    fn current_versions(&mut self, key: &[u8]) -> Result<Vec<(EntryId, bool)>, String> {
        self.read_view("check a conditional write", |overlay, snap| {
            overlay.current_versions(key, snap)
        })
    }

    /// Waits while the overlay holds more than [`OVERLAY_OPS_MAX`] ops, pruning it as the
    /// indexer applies them; returns at once if the indexer has stopped after an error (every
    /// write is then refused).
    fn hold(&mut self) {
        if self.overlay.len() <= OVERLAY_OPS_MAX {
            return;
        }
        let started = Instant::now();
        // The cached snapshot is older than what is pruned now.
        self.snapshot = None;
        let mut applied = self.views.applied();
        loop {
            self.overlay.prune(applied);
            if self.overlay.len() <= OVERLAY_OPS_MAX || self.views.failure().is_some() {
                break;
            }
            applied = self.views.wait_applied_past(applied, HOLD_WAIT);
        }
        crate::telemetry::writer_held(started.elapsed());
    }

    fn refusal(&mut self) -> Option<Arc<str>> {
        self.views.failure().map(Arc::from)
    }

    fn views_checkpoint(&mut self) -> Option<Lsn> {
        Some(self.views.checkpoint())
    }

    fn appended(&mut self, lsn: Lsn, entry: &SignedEntry, local: bool) {
        self.overlay.record(lsn, entry);
        self.known.appended(entry, local);
    }

    fn discarded(&mut self, after: Lsn) {
        self.overlay.discard_after(after);
        self.known.clear();
    }

    /// Forgets what the views have applied (as the indexer publishes it: no read of the view)
    /// and lets go of the snapshot, so that neither the overlay nor an open read transaction
    /// (which keeps redb from reusing freed pages) outlives the batch. Every op is recorded,
    /// remote ones and those with a context included, so this runs after every batch, not only
    /// when a plain write needs a snapshot.
    fn batch_done(&mut self) {
        self.snapshot = None;
        self.overlay.prune(self.views.applied());
    }
}

#[cfg(test)]
mod tests {
    use kappakv_indexes::default_views;
    use kappakv_protocol::{Entry, NodeId, Op, Timestamp};

    use super::*;

    /// An entry of 1024 plain puts, appended at `lsn`.
    fn entry(lsn: Lsn) -> SignedEntry {
        let ops = (0..1024u32)
            .map(|i| Op::Put {
                key: format!("{lsn}/{i}").into_bytes(),
                value: b"v".to_vec(),
                supersedes: vec![],
            })
            .collect();
        let entry = Entry {
            author: NodeId([1; 32]),
            seq: lsn,
            prev: None,
            timestamp: Timestamp(lsn),
            ops,
        };
        SignedEntry {
            id: entry.id(),
            entry,
            signature: None,
        }
    }

    /// A resolver whose overlay holds 65 entries of 1024 ops the views have not applied: one
    /// entry over the bound.
    fn resolver_over_the_bound(dir: &std::path::Path) -> (KvResolver, Arc<IndexerShared>) {
        let (indexes, _) = Indexes::open(dir.join("indexes.redb"), default_views()).unwrap();
        let views = Arc::new(IndexerShared::new(0, 0));
        let mut resolver = KvResolver::new(Arc::new(indexes), views.clone());
        for lsn in 1..=65 {
            resolver.appended(lsn, &entry(lsn), false);
        }
        assert!(resolver.overlay.len() > OVERLAY_OPS_MAX);
        (resolver, views)
    }

    /// Runs [`KvResolver::hold`] on a thread of its own; the resolver comes back once it
    /// returns.
    fn hold_on_a_thread(mut resolver: KvResolver) -> std::sync::mpsc::Receiver<KvResolver> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            resolver.hold();
            let _ = tx.send(resolver);
        });
        rx
    }

    /// An entry at `seq` with one op on `key` superseding `supersedes`.
    fn op_entry(seq: u64, key: &[u8], supersedes: Vec<EntryId>, delete: bool) -> SignedEntry {
        let key = key.to_vec();
        let op = if delete {
            Op::Delete { key, supersedes }
        } else {
            Op::Put {
                key,
                value: b"v".to_vec(),
                supersedes,
            }
        };
        let entry = Entry {
            author: NodeId([2; 32]),
            seq,
            prev: None,
            timestamp: Timestamp(seq),
            ops: vec![op],
        };
        SignedEntry {
            id: entry.id(),
            entry,
            signature: None,
        }
    }

    proptest::proptest! {
        /// Whatever mix of local writes (with and without a context), received entries and
        /// discarded batches, the versions the resolver knows are those the view and the
        /// overlay give.
        #[test]
        fn known_versions_are_those_the_view_gives(
            steps in proptest::collection::vec((0u8..4, 0u8..4, proptest::bits::u8::ANY, proptest::bool::ANY), 1..60),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (indexes, _) = Indexes::open(dir.path().join("indexes.redb"), default_views()).unwrap();
            let mut resolver = KvResolver::new(Arc::new(indexes), Arc::new(IndexerShared::new(0, 0)));
            let mut made: Vec<EntryId> = Vec::new();
            let mut lsn = 0;
            for (key, kind, pick, delete) in steps {
                let key = [b'k', key];
                // Some ids made so far, current or not.
                let picked: Vec<EntryId> = made
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| pick & (1 << (i % 8)) != 0)
                    .map(|(_, id)| *id)
                    .collect();
                match kind {
                    // A plain local write: resolved by the resolver, as the writer does.
                    0 => {
                        let supersedes = resolver.current(&key).unwrap();
                        lsn += 1;
                        let e = op_entry(lsn, &key, supersedes, delete);
                        resolver.appended(lsn, &e, true);
                        made.push(e.id);
                    }
                    // A local write with a context the client gave, or a received entry.
                    1 | 2 => {
                        lsn += 1;
                        let e = op_entry(lsn, &key, picked, delete);
                        resolver.appended(lsn, &e, kind == 1);
                        made.push(e.id);
                    }
                    // Two received entries out of order: one that supersedes the other
                    // arrives first, so the other is never current.
                    3 => {
                        let late = op_entry(lsn + 2, &key, picked.clone(), delete);
                        let mut supersedes = picked;
                        supersedes.push(late.id);
                        let early = op_entry(lsn + 1, &key, supersedes, false);
                        resolver.appended(lsn + 1, &early, false);
                        resolver.appended(lsn + 2, &late, false);
                        lsn += 2;
                        made.push(early.id);
                        made.push(late.id);
                    }
                    _ => unreachable!(),
                }
                let batch = if kind == 3 { 2 } else { 1 };
                if pick == 0 && lsn > batch {
                    // The last batch did not reach the disk.
                    lsn -= batch;
                    resolver.discarded(lsn);
                    made.truncate(made.len() - batch as usize);
                }
                for k in 0..4u8 {
                    let key = [b'k', k];
                    let expected = resolver
                        .read_view("test", |overlay, snap| overlay.current(&key, snap))
                        .unwrap();
                    proptest::prop_assert_eq!(resolver.current(&key).unwrap(), expected);
                }
            }
        }
    }

    #[test]
    fn the_writer_is_held_until_the_views_apply_enough() {
        let dir = tempfile::tempdir().unwrap();
        let (resolver, views) = resolver_over_the_bound(dir.path());
        let held = hold_on_a_thread(resolver);
        assert!(
            held.recv_timeout(Duration::from_millis(300)).is_err(),
            "the writer went on with more than {OVERLAY_OPS_MAX} ops unapplied"
        );
        // The views apply the first entry: the overlay is back within the bound.
        views.set_applied(1);
        let resolver = held.recv().unwrap();
        assert_eq!(resolver.overlay.len(), 64 * 1024);
    }

    #[test]
    fn a_failed_indexer_does_not_hold_the_writer_forever() {
        let dir = tempfile::tempdir().unwrap();
        let (resolver, views) = resolver_over_the_bound(dir.path());
        let held = hold_on_a_thread(resolver);
        views.set_failed("the index database failed".into());
        let mut resolver = held.recv().unwrap();
        assert!(resolver.refusal().is_some(), "every write is refused then");
    }
}
