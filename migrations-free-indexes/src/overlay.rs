//! [`KvOverlay`]: what the server's writer knows that the indexer has not applied yet.
//!
//! A plain put (`supersedes: None`) replaces "every version current when the write is ordered
//! into the log". The writer orders writes faster than the indexer applies them, so a snapshot
//! of the kv view alone is stale. The overlay holds, per key, the ops of every entry appended
//! with an LSN past what the indexer has applied; [`KvOverlay::current`] lays them over a
//! snapshot (at its own applied LSN) with the MVR rule ([`crate::mvr::resolve_current`]).
//!
//! It is plain data: no threads, no locks. The server owns one on its writer thread, records
//! every entry it appends, and prunes with the indexer's published applied LSN. Memory grows
//! with the indexer's lag (a few hundred bytes an op); bounding it (by back-pressure on the
//! writer) is the server's job, with [`KvOverlay::len`] as the measure. Pruning gives the room
//! of a burst back.

use std::collections::{HashMap, VecDeque};

use kappakv_protocol::{EntryId, Lsn, SignedEntry};

use crate::error::ReadError;
use crate::mvr::resolve_current;
use crate::snapshot::Snapshot;

#[derive(Debug, Clone)]
struct OverlayOp {
    lsn: Lsn,
    id: EntryId,
    supersedes: Vec<EntryId>,
    /// A put (not a delete).
    put: bool,
}

/// Recent kv ops, by key, that the kv view may not have applied yet.
#[derive(Debug, Default)]
pub struct KvOverlay {
    /// Per key, ops in ascending LSN order.
    by_key: HashMap<Vec<u8>, Vec<OverlayOp>>,
    /// `(lsn, key)` of every op held, ascending: what [`KvOverlay::prune`] walks.
    order: VecDeque<(Lsn, Vec<u8>)>,
    /// The highest LSN recorded.
    last_recorded: Lsn,
    /// Ops at or below this LSN were dropped; a snapshot older than it cannot be overlaid.
    pruned_through: Lsn,
}

impl KvOverlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the ops of the entry appended at `lsn`.
    ///
    /// # Panics
    ///
    /// If `lsn` is not above every LSN recorded or pruned before: the overlay follows the log.
    pub fn record(&mut self, lsn: Lsn, entry: &SignedEntry) {
        assert!(
            lsn > self.last_recorded && lsn > self.pruned_through,
            "overlay records must follow the log: LSN {lsn} after {}",
            self.last_recorded.max(self.pruned_through)
        );
        self.last_recorded = lsn;
        for op in &entry.entry.ops {
            let key = op.key();
            let op = OverlayOp {
                lsn,
                id: entry.id,
                supersedes: op.supersedes().to_vec(),
                put: op.value().is_some(),
            };
            match self.by_key.get_mut(key) {
                Some(ops) => ops.push(op),
                None => {
                    self.by_key.insert(key.to_vec(), vec![op]);
                }
            }
            self.order.push_back((lsn, key.to_vec()));
        }
    }

    /// Drops the ops of entries at or below `applied_lsn`: the kv view holds them now.
    pub fn prune(&mut self, applied_lsn: Lsn) {
        self.pruned_through = self.pruned_through.max(applied_lsn);
        while let Some((lsn, _)) = self.order.front()
            && *lsn <= applied_lsn
        {
            let Some((_, key)) = self.order.pop_front() else {
                break;
            };
            if let Some(ops) = self.by_key.get_mut(&key) {
                let keep = ops.partition_point(|op| op.lsn <= applied_lsn);
                ops.drain(..keep);
                if ops.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        self.release_spare();
    }

    /// Gives back the room a burst left behind: neither a map nor a deque shrinks by itself, so
    /// a moment of lag would otherwise keep its memory for the process's life. Shrinks only
    /// when most of the room is unused, so the cost of moving what is left is amortized over
    /// the ops that were pruned.
    fn release_spare(&mut self) {
        const KEEP: usize = 4096;
        if self.by_key.capacity() > KEEP && self.by_key.capacity() / 4 > self.by_key.len() {
            self.by_key.shrink_to((self.by_key.len() * 2).max(KEEP));
        }
        if self.order.capacity() > KEEP && self.order.capacity() / 4 > self.order.len() {
            self.order.shrink_to((self.order.len() * 2).max(KEEP));
        }
    }

    /// Forgets the ops of entries above `lsn`, e.g. after a failed append whose LSNs will be
    /// reused.
    pub fn discard_after(&mut self, lsn: Lsn) {
        while let Some((last, _)) = self.order.back()
            && *last > lsn
        {
            let Some((_, key)) = self.order.pop_back() else {
                break;
            };
            if let Some(ops) = self.by_key.get_mut(&key) {
                ops.truncate(ops.partition_point(|op| op.lsn <= lsn));
                if ops.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        self.last_recorded = self.last_recorded.min(lsn);
    }

    /// Ops held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no ops are held.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The ids a plain write to `key` supersedes: the current versions as of the last recorded
    /// entry, ascending, computed from `snapshot` (at its kv applied LSN `L`) and the ops held
    /// with LSN above `L`.
    pub fn current(&self, key: &[u8], snapshot: &Snapshot) -> Result<Vec<EntryId>, ReadError> {
        let applied = snapshot.kv_applied_lsn()?;
        if applied < self.pruned_through {
            return Err(ReadError::StaleSnapshot {
                snapshot_lsn: applied,
                pruned_lsn: self.pruned_through,
            });
        }
        let base = snapshot.current_ids(key)?;
        let Some(ops) = self.by_key.get(key) else {
            return Ok(base);
        };
        let pending = &ops[ops.partition_point(|op| op.lsn <= applied)..];
        resolve_current(
            base,
            |id| snapshot.is_superseded(key, id),
            pending.iter().map(|op| (&op.id, op.supersedes.as_slice())),
        )
    }

    /// Like [`KvOverlay::current`], each id with whether its version holds a value (`false`:
    /// a tombstone).
    pub fn current_versions(
        &self,
        key: &[u8],
        snapshot: &Snapshot,
    ) -> Result<Vec<(EntryId, bool)>, ReadError> {
        let ids = self.current(key, snapshot)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let applied = snapshot.get(key)?;
        let puts: std::collections::HashSet<EntryId> = applied
            .values
            .iter()
            .map(|v| v.id)
            .chain(
                self.by_key
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter(|op| op.put)
                    .map(|op| op.id),
            )
            .collect();
        Ok(ids.into_iter().map(|id| (id, puts.contains(&id))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvr::tests::put;

    #[test]
    fn pruning_a_burst_gives_its_room_back() {
        let mut overlay = KvOverlay::new();
        for lsn in 1..=100_000 {
            overlay.record(lsn, &put(lsn, &lsn.to_be_bytes(), vec![]));
        }
        assert_eq!(overlay.len(), 100_000);
        let burst = overlay.by_key.capacity();
        assert!(burst >= 100_000 && overlay.order.capacity() >= 100_000);

        overlay.prune(99_000);
        assert_eq!(overlay.len(), 1_000);
        assert!(
            overlay.by_key.capacity() <= 8192 && overlay.order.capacity() <= 8192,
            "map room {} (was {burst}), deque room {}",
            overlay.by_key.capacity(),
            overlay.order.capacity()
        );
        // What is left is still there.
        assert_eq!(overlay.by_key.len(), 1_000);
        assert!(overlay.by_key.contains_key(&100_000u64.to_be_bytes()[..]));
    }
}
