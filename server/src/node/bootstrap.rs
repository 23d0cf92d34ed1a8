//! Bootstrap from a trusted peer's snapshot: a new node answers reads within about a second,
//! and verifies what it answered by replaying the log behind it.
//!
//! The phases, kept in one place ([`Bootstrap`]):
//!
//! - **Wanted**: the node started with an empty log, peers, and `bootstrap = "snapshot"`. The
//!   first peer that connects (peers on the list only: their identities are pinned) is asked
//!   for a snapshot (`replication::driver::snapshot`). Entries received meanwhile wait
//!   (for [`SNAPSHOT_WAIT`], or as long as a snapshot keeps arriving), so that the log does
//!   not get ahead of the snapshot's point.
//! - **Loaded**: the snapshot is in `DATA_DIR/snapshot.redb` with the peer, its version
//!   vector V and its state root. Reads (`get`, `scan`) come from it. Replication takes only
//!   the runs V covers, so the log holds exactly the entries of V once it reaches V (at LSN
//!   N, the sum of V); runs past V are dropped and the peer sessions restart once the log
//!   reaches V, to fetch them again. Local writes are refused (`Unavailable`, retryable): a
//!   plain put must supersede what is current, which only the node's own views can say.
//! - **Done**: the indexer stops one batch exactly at N and compares its own state root at N
//!   with the snapshot's ([`Bootstrap::check`]). Equal: verified. Different: the peer's
//!   snapshot is refused (an error log naming the peer, a metric, and no more snapshots from
//!   it, `DATA_DIR/snapshot-refused`). Either way the snapshot file goes, reads come from the
//!   node's own views (what its log proves), and writes are taken. The outcome is kept in
//!   `DATA_DIR/bootstrap.json` for `status`.
//!
//! A crash in any phase is safe: a snapshot file whose load did not finish is deleted at the
//! next start; a loaded one is used again, and the replay goes on from the views' checkpoint.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kappakv_indexes::{Indexes, StateMeta, StateStore};
use kappakv_protocol::{BootstrapStatus, Lsn, NodeId, SignedEntry};
use serde::{Deserialize, Serialize};

use super::DataDir;
use crate::config::BootstrapMode;

/// The loaded snapshot, in the data dir.
pub const SNAPSHOT_FILE: &str = "snapshot.redb";
/// The outcome of a bootstrap, in the data dir.
pub const BOOTSTRAP_RECORD: &str = "bootstrap.json";
/// Peers whose snapshot was refused, one node id a line, in the data dir.
pub const REFUSED_PEERS: &str = "snapshot-refused";
/// How long a new node holds received entries back while no snapshot is arriving, before it
/// gives up on one and replays.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(10);
/// Fetches from one peer that may fail (its connection lost, a version that serves none)
/// before it is not asked again until a restart.
const FETCH_TRIES: u32 = 3;

/// What `bootstrap.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outcome {
    peer: NodeId,
    version_vector: Vec<(NodeId, u64)>,
    state_root: kappakv_protocol::StateRoot,
    verified: bool,
    refused: bool,
}

enum Phase {
    Off,
    Wanted {
        until: Instant,
        fetching: bool,
    },
    Loaded {
        store: Arc<StateStore>,
        meta: StateMeta,
        /// The log holds every entry V covers.
        log_complete: bool,
        /// Runs past V were dropped: peer sessions restart once the log is complete.
        dropped: bool,
    },
    Done(Outcome),
}

/// Where a node stands in its bootstrap; see the module doc.
pub struct Bootstrap {
    phase: Mutex<Phase>,
    changed: tokio::sync::Notify,
    dir: DataDir,
    refused: Mutex<HashSet<NodeId>>,
    /// Failed fetches by peer, since start.
    failures: Mutex<HashMap<NodeId, u32>>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap").finish_non_exhaustive()
    }
}

/// The bootstrap could not start.
#[derive(Debug, thiserror::Error)]
#[error("bootstrap state in {path}: {reason}")]
pub struct BootstrapError {
    path: PathBuf,
    reason: String,
}

impl Bootstrap {
    /// The bootstrap state of the data dir: a snapshot loaded before a restart, the outcome of
    /// an earlier one, or a new node that wants one (`mode` snapshot, an empty log, peers).
    pub fn open(
        dir: &DataDir,
        mode: BootstrapMode,
        log_lsn: Lsn,
        has_peers: bool,
    ) -> Result<Self, BootstrapError> {
        let refused = read_refused(&dir.path().join(REFUSED_PEERS));
        let snapshot = dir.path().join(SNAPSHOT_FILE);
        let fail = |path: &PathBuf, reason: String| BootstrapError {
            path: path.clone(),
            reason,
        };
        let loaded = StateStore::open(&snapshot).map_err(|e| fail(&snapshot, e.to_string()))?;
        let phase = if let Some((store, meta)) = loaded {
            tracing::info!(
                peer = %meta.peer,
                entries = meta.entries(),
                "answering reads from the snapshot loaded before the restart while the log behind it replays"
            );
            Phase::Loaded {
                store: Arc::new(store),
                meta,
                log_complete: false,
                dropped: false,
            }
        } else {
            if snapshot.exists() {
                tracing::info!("removing a snapshot whose load did not finish");
                std::fs::remove_file(&snapshot).map_err(|e| fail(&snapshot, e.to_string()))?;
            }
            let record = dir.path().join(BOOTSTRAP_RECORD);
            match std::fs::read(&record) {
                Ok(bytes) => Phase::Done(
                    serde_json::from_slice(&bytes).map_err(|e| fail(&record, e.to_string()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if mode == BootstrapMode::Snapshot && log_lsn == 0 && has_peers {
                        Phase::Wanted {
                            until: Instant::now() + SNAPSHOT_WAIT,
                            fetching: false,
                        }
                    } else {
                        Phase::Off
                    }
                }
                Err(e) => return Err(fail(&record, e.to_string())),
            }
        };
        Ok(Self {
            phase: Mutex::new(phase),
            changed: tokio::sync::Notify::new(),
            dir: dir.clone(),
            refused: Mutex::new(refused),
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// The phase, after giving up on a snapshot that is wanted but has not come in time.
    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        let mut phase = self.phase.lock().expect("bootstrap lock");
        if let Phase::Wanted {
            until,
            fetching: false,
        } = &*phase
            && Instant::now() >= *until
        {
            tracing::info!("no snapshot came from a peer in time: replaying the log instead");
            *phase = Phase::Off;
        }
        phase
    }

    /// The snapshot reads come from, while one is loaded and the views have not replayed the
    /// log up to it.
    pub fn reads(&self) -> Option<Arc<StateStore>> {
        match &*self.phase() {
            Phase::Loaded { store, .. } => Some(store.clone()),
            _ => None,
        }
    }

    /// Why local writes are refused now, if they are.
    pub fn writes_held(&self) -> Option<String> {
        match &*self.phase() {
            Phase::Wanted { .. } => Some(
                "this node is starting from a peer's snapshot and has none yet; retry in a few seconds"
                    .into(),
            ),
            Phase::Loaded { meta, .. } => Some(format!(
                "this node answers reads from peer {}'s snapshot while it replays the {} log entries behind it; writes are taken once it has, retry shortly",
                meta.peer.short(),
                meta.entries()
            )),
            _ => None,
        }
    }

    /// Where the indexer must end a batch: the LSN at which the log holds exactly the entries
    /// of the loaded snapshot's version vector.
    pub fn stop_at(&self) -> Option<Lsn> {
        match &*self.phase() {
            Phase::Loaded { meta, .. } => Some(meta.entries()),
            _ => None,
        }
    }

    /// What `status` shows.
    pub fn status(&self) -> Option<BootstrapStatus> {
        match &*self.phase() {
            Phase::Off | Phase::Wanted { .. } => None,
            Phase::Loaded { meta, .. } => Some(BootstrapStatus {
                peer: meta.peer,
                version_vector: meta.version_vector.clone(),
                state_root: meta.root,
                serving_snapshot: true,
                verified: false,
                refused: false,
            }),
            Phase::Done(o) => Some(BootstrapStatus {
                peer: o.peer,
                version_vector: o.version_vector.clone(),
                state_root: o.state_root,
                serving_snapshot: false,
                verified: o.verified,
                refused: o.refused,
            }),
        }
    }

    /// Whether to ask `peer` for a snapshot now; when `true` the caller must end with
    /// [`Bootstrap::loaded`] or [`Bootstrap::fetch_failed`].
    pub fn start_fetch(&self, peer: &NodeId) -> bool {
        if self.refused.lock().expect("refused lock").contains(peer)
            || self
                .failures
                .lock()
                .expect("failures lock")
                .get(peer)
                .is_some_and(|n| *n >= FETCH_TRIES)
        {
            return false;
        }
        match &mut *self.phase() {
            Phase::Wanted { fetching, .. } if !*fetching => {
                *fetching = true;
                true
            }
            _ => false,
        }
    }

    /// A fetch from `peer` failed. `lied` when what it sent was malformed or did not match
    /// its own root: it is not asked again.
    pub fn fetch_failed(&self, peer: &NodeId, lied: bool, reason: &str) {
        let _ = std::fs::remove_file(self.dir.path().join(SNAPSHOT_FILE));
        if lied {
            self.refuse(peer, reason);
        } else {
            tracing::warn!(peer = %peer, reason, "could not take a snapshot from the peer");
            *self
                .failures
                .lock()
                .expect("failures lock")
                .entry(*peer)
                .or_default() += 1;
        }
        // Another peer, or the same one again, may serve one while the wait lasts.
        let mut phase = self.phase();
        if let Phase::Wanted { fetching, .. } = &mut *phase {
            *fetching = false;
        }
        drop(phase);
        self.changed.notify_waiters();
    }

    /// A snapshot finished loading. It is used when the log holds nothing past its version
    /// vector (`log_vv`, this node's version vector now), since then the log reaches exactly V.
    pub fn loaded(&self, store: StateStore, meta: StateMeta, log_vv: &[(NodeId, u64)]) {
        let covered: HashMap<NodeId, u64> = meta.version_vector.iter().copied().collect();
        let within = log_vv
            .iter()
            .all(|(a, seq)| covered.get(a).is_some_and(|v| seq <= v));
        let mut phase = self.phase();
        if within {
            tracing::info!(
                peer = %meta.peer,
                keys = meta.keys,
                entries = meta.entries(),
                root = %meta.root,
                "snapshot loaded: answering reads from it while the log behind it replays"
            );
            *phase = Phase::Loaded {
                store: Arc::new(store),
                meta,
                log_complete: false,
                dropped: false,
            };
            drop(phase);
        } else {
            tracing::warn!(peer = %meta.peer, "the log got ahead of the snapshot while it loaded: replaying instead");
            *phase = Phase::Off;
            drop(phase);
            drop(store);
            let _ = std::fs::remove_file(self.dir.path().join(SNAPSHOT_FILE));
        }
        self.changed.notify_waiters();
    }

    /// The runs of received entries to append now: while a snapshot is wanted they wait; while
    /// one is loaded and the log has not reached it, runs it does not cover are dropped.
    pub async fn admit(&self, runs: Vec<Vec<SignedEntry>>) -> Vec<Vec<SignedEntry>> {
        loop {
            let notified = self.changed.notified();
            let wait = match &*self.phase() {
                // A fetch ends in a notification; the poll is a backstop.
                Phase::Wanted { fetching: true, .. } => Duration::from_millis(200),
                Phase::Wanted { until, .. } => until.saturating_duration_since(Instant::now()),
                _ => break,
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
        let mut phase = self.phase();
        match &mut *phase {
            Phase::Loaded {
                meta,
                log_complete: false,
                dropped,
                ..
            } => {
                let covered: HashMap<NodeId, u64> = meta.version_vector.iter().copied().collect();
                let mut kept = Vec::with_capacity(runs.len());
                for mut run in runs {
                    let Some(first) = run.first() else {
                        continue;
                    };
                    let limit = covered.get(&first.entry.author).copied().unwrap_or(0);
                    // Runs released one after the other are joined, so one may cross V: its
                    // part up to V goes in when it ends signed (V is a signed point).
                    let within = run.partition_point(|e| e.entry.seq <= limit);
                    if within < run.len() {
                        *dropped = true;
                        run.truncate(within);
                    }
                    if run.last().is_some_and(|e| e.signature.is_some()) {
                        kept.push(run);
                    } else if !run.is_empty() {
                        *dropped = true;
                    }
                }
                kept
            }
            _ => runs,
        }
    }

    /// The log now has `log_vv`. Returns `true` when the log has just reached the snapshot
    /// and runs were dropped on the way: the caller restarts its peer sessions to fetch them.
    pub fn appended(&self, log_vv: &[(NodeId, u64)]) -> bool {
        let mut phase = self.phase();
        let Phase::Loaded {
            meta,
            log_complete,
            dropped,
            ..
        } = &mut *phase
        else {
            return false;
        };
        if *log_complete {
            return false;
        }
        let have: HashMap<NodeId, u64> = log_vv.iter().copied().collect();
        if meta
            .version_vector
            .iter()
            .all(|(a, seq)| have.get(a).is_some_and(|h| h >= seq))
        {
            *log_complete = true;
            tracing::info!(
                entries = meta.entries(),
                "the log holds every entry behind the snapshot"
            );
            return *dropped;
        }
        false
    }

    /// Called by whoever writes the views (the indexer thread, or the start-up catch-up) once
    /// they have applied exactly [`Bootstrap::stop_at`]: compares the views' version vector
    /// and state root there with the snapshot's, records the outcome, and ends the bootstrap.
    pub fn check(&self, indexes: &Indexes) {
        let Some(meta) = (match &*self.phase() {
            Phase::Loaded { meta, .. } => Some(meta.clone()),
            _ => None,
        }) else {
            return;
        };
        let ours = indexes.snapshot().and_then(|s| {
            Ok((
                s.kv_applied_lsn()?,
                s.version_vector()?,
                s.state_digest()?.root(),
            ))
        });
        let mut wanted = meta.version_vector.clone();
        wanted.retain(|(_, seq)| *seq > 0);
        wanted.sort_unstable();
        let (verified, refused) = match ours {
            Ok((lsn, vv, root)) if lsn == meta.entries() && vv == wanted => {
                if root == meta.root {
                    tracing::info!(
                        peer = %meta.peer,
                        entries = lsn,
                        %root,
                        "snapshot verified: the log behind it gives the same state"
                    );
                    (true, false)
                } else {
                    tracing::error!(
                        peer = %meta.peer,
                        entries = lsn,
                        snapshot_root = %meta.root,
                        log_root = %root,
                        "the peer's snapshot differs from the state its log gives: dropped; serving what this node's log proves, and taking no more snapshots from that peer"
                    );
                    (false, true)
                }
            }
            Ok((lsn, _, _)) => {
                tracing::warn!(
                    peer = %meta.peer,
                    lsn,
                    "the log did not reach exactly the snapshot's version vector, so it cannot be compared; serving what the log proves"
                );
                (false, false)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not compare the snapshot with the views; serving what the log proves");
                (false, false)
            }
        };
        if refused {
            self.refuse(&meta.peer, "its snapshot differs from its log");
        }
        self.finish(Outcome {
            peer: meta.peer,
            version_vector: meta.version_vector,
            state_root: meta.root,
            verified,
            refused,
        });
    }

    fn finish(&self, outcome: Outcome) {
        let record = self.dir.path().join(BOOTSTRAP_RECORD);
        let bytes = serde_json::to_vec_pretty(&outcome).expect("the outcome encodes");
        if let Err(e) = crate::auth::write_private(&record, &bytes) {
            tracing::warn!(path = %record.display(), error = %e, "could not record the bootstrap's outcome");
        }
        // Readers holding the store keep reading the unlinked file until they drop it.
        let snapshot = self.dir.path().join(SNAPSHOT_FILE);
        if let Err(e) = std::fs::remove_file(&snapshot)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %snapshot.display(), error = %e, "could not remove the snapshot");
        }
        *self.phase() = Phase::Done(outcome);
        self.changed.notify_waiters();
    }

    fn refuse(&self, peer: &NodeId, reason: &str) {
        tracing::error!(peer = %peer, reason, "refusing snapshots from this peer from now on");
        crate::telemetry::snapshot_refused(peer);
        let mut refused = self.refused.lock().expect("refused lock");
        if refused.insert(*peer) {
            let path = self.dir.path().join(REFUSED_PEERS);
            let text: String = refused.iter().map(|p| p.to_hex() + "\n").collect();
            if let Err(e) = crate::auth::write_private(&path, text.as_bytes()) {
                tracing::warn!(path = %path.display(), error = %e, "could not record the refused peer");
            }
        }
    }
}

fn read_refused(path: &std::path::Path) -> HashSet<NodeId> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use kappakv_indexes::StateDigest;
    use kappakv_protocol::{Entry, Keypair, Op, Timestamp};

    use super::*;

    /// `n` entries of `kp`'s chain, those at `signed_at` signed.
    fn chain(kp: &Keypair, n: u64, signed_at: &[u64]) -> Vec<SignedEntry> {
        let mut prev = None;
        (1..=n)
            .map(|seq| {
                let entry = Entry {
                    author: kp.node_id(),
                    seq,
                    prev,
                    timestamp: Timestamp(seq),
                    ops: vec![Op::Put {
                        key: b"k".to_vec(),
                        value: vec![],
                        supersedes: vec![],
                    }],
                };
                let id = entry.id();
                prev = Some(id);
                let signature = signed_at.contains(&seq).then(|| kp.sign(&id));
                SignedEntry {
                    entry,
                    id,
                    signature,
                }
            })
            .collect()
    }

    /// A node that has loaded a snapshot of `vv` from peer 9.
    fn loaded(dir: &DataDir, vv: Vec<(NodeId, u64)>) -> Bootstrap {
        let bootstrap = Bootstrap::open(dir, BootstrapMode::Snapshot, 0, true).unwrap();
        assert!(
            bootstrap.writes_held().is_some(),
            "writes wait for a snapshot"
        );
        assert!(bootstrap.start_fetch(&NodeId([9; 32])));
        assert!(
            !bootstrap.start_fetch(&NodeId([8; 32])),
            "one fetch at a time"
        );
        let mut store = StateStore::create(&dir.path().join(SNAPSHOT_FILE)).unwrap();
        let meta = StateMeta {
            peer: NodeId([9; 32]),
            version_vector: vv,
            root: StateDigest::new().root(),
            keys: 0,
        };
        store.finish(&meta).unwrap();
        bootstrap.loaded(store, meta, &[]);
        bootstrap
    }

    #[tokio::test]
    async fn only_what_the_snapshot_covers_goes_in_until_the_log_reaches_it() {
        let dir = tempfile::tempdir().unwrap();
        let dir = DataDir(dir.path().to_path_buf());
        let (a, b) = (Keypair::from_secret([1; 32]), Keypair::from_secret([2; 32]));
        let bootstrap = loaded(&dir, vec![(a.node_id(), 3)]);
        assert_eq!(bootstrap.stop_at(), Some(3));
        assert!(bootstrap.reads().is_some());
        assert!(bootstrap.writes_held().is_some());

        // Two runs of A joined (signed at 3 and 5) go in up to 3; B's run, which the
        // snapshot does not cover, waits for a later session.
        let admitted = bootstrap
            .admit(vec![chain(&a, 5, &[3, 5]), chain(&b, 2, &[2])])
            .await;
        assert_eq!(admitted.len(), 1);
        assert_eq!(admitted[0].len(), 3);
        // A run crossing the point unsigned there is not cut.
        assert!(bootstrap.admit(vec![chain(&a, 5, &[5])]).await.is_empty());

        assert!(!bootstrap.appended(&[(a.node_id(), 2)]));
        assert!(
            bootstrap.appended(&[(a.node_id(), 3)]),
            "runs were dropped: sessions restart once the log reaches the snapshot"
        );
        // Past the point, everything goes in.
        assert_eq!(bootstrap.admit(vec![chain(&b, 2, &[2])]).await.len(), 1);
    }

    #[test]
    fn a_loaded_snapshot_outlives_a_restart_and_an_unfinished_one_does_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir(tmp.path().to_path_buf());
        let a = Keypair::from_secret([1; 32]);
        drop(loaded(&dir, vec![(a.node_id(), 3)]));
        let again = Bootstrap::open(&dir, BootstrapMode::Snapshot, 2, true).unwrap();
        assert_eq!(again.stop_at(), Some(3));
        let status = again.status().unwrap();
        assert!(status.serving_snapshot && !status.verified);
        drop(again);

        // A load that never finished is removed, and a node with entries replays.
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
        drop(StateStore::create(&dir.path().join(SNAPSHOT_FILE)).unwrap());
        let after = Bootstrap::open(&dir, BootstrapMode::Snapshot, 2, true).unwrap();
        assert!(!dir.path().join(SNAPSHOT_FILE).exists());
        assert!(after.stop_at().is_none() && after.writes_held().is_none());
        // Replay mode never wants one.
        let tmp2 = tempfile::tempdir().unwrap();
        let replay = Bootstrap::open(
            &DataDir(tmp2.path().to_path_buf()),
            BootstrapMode::Replay,
            0,
            true,
        )
        .unwrap();
        assert!(replay.writes_held().is_none());
    }
}
