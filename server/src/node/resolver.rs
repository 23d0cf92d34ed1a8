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
}

impl SupersedeResolver for KvResolver {
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String> {
        self.snapshot();
        let Some((_, snap)) = self.snapshot.as_ref() else {
            return Err("no snapshot of the view could be taken".to_string());
        };
        self.overlay.current(key, snap).map_err(|e| {
            tracing::error!(error = %e, "cannot read the kv view to resolve a write; it is refused");
            e.to_string()
        })
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

    /// Forgets what the kv view has applied and lets go of the snapshot, so that neither the
    /// overlay nor an open read transaction (which keeps redb from reusing freed pages) outlives
    /// the batch. Every op is recorded, remote ones and those with a context included, so this
    /// runs after every batch, not only when a plain write needs a snapshot.
    fn batch_done(&mut self) {
        self.snapshot = None;
        if self.overlay.is_empty() {
            return;
        }
        match self.indexes.snapshot().and_then(|s| s.kv_applied_lsn()) {
            Ok(applied) => self.overlay.prune(applied),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the kv view's checkpoint to prune the overlay");
            }
        }
    }
}
