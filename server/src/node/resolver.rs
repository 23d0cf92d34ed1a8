//! The writer's supersede resolution. A plain put or delete supersedes every version current on
//! this node when the write is ordered into the log. The kv view may lag the log, so the
//! resolver reads a view snapshot and lays over it the ops of every entry appended after the
//! snapshot's applied LSN ([`KvOverlay`]); the result is exact whatever the lag.
//!
//! When the view cannot be read, the write is refused rather than resolved to nothing; once
//! the indexer has stopped after an error, every write is ([`SupersedeResolver::refusal`]): the
//! overlay would grow without end, and nothing written could be read back.

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

/// Resolves plain writes from the kv view plus an overlay of entries it has not applied yet.
pub struct KvResolver {
    indexes: Arc<Indexes>,
    overlay: KvOverlay,
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
        self.read_view("resolve a write", |overlay, snap| {
            overlay.current(key, snap)
        })
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

    fn appended(&mut self, lsn: Lsn, entry: &SignedEntry) {
        self.overlay.record(lsn, entry);
    }

    fn discarded(&mut self, after: Lsn) {
        self.overlay.discard_after(after);
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
            resolver.appended(lsn, &entry(lsn));
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
