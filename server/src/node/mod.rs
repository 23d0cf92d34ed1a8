//! The node: the threads that own the log and the views, and what requests need of them.
//!
//! - [`writer`]: the writer thread, the only one that appends to the log (group commit).
//! - [`indexer`]: the indexer thread, the only one that writes the views.
//! - [`resolver`]: how the writer resolves a plain put's `supersedes` while the indexer lags.

pub mod bootstrap;
pub mod chains;
pub mod indexer;
pub mod invites;
pub mod own_chain;
pub mod recent_writes;
pub mod replication;
pub mod resolver;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kappakv_indexes::Indexes;
use kappakv_protocol::{Keypair, Lsn, NodeId};
use tokio::sync::{Semaphore, watch};

use crate::auth::Tokens;
use crate::config::Config;
use crate::log::{LogConfig, LogDir, LogStore};
use indexer::IndexerHandle;
use writer::{WriterConfig, WriterHandle};

pub use own_chain::{OWN_CHAIN_UNCONFIRMED, OwnChainGuard};

/// The node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data dir cannot be created or read.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The dir.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The identity key.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The log.
    #[error(transparent)]
    Log(#[from] crate::log::OpenLogError),
    /// The indexes.
    #[error("indexes: {0}")]
    Indexes(#[from] kappakv_indexes::OpenViewError),
    /// A declared secondary index.
    #[error("index definition: {0}")]
    IndexDef(#[from] kappakv_indexes::IndexDefError),
    /// Catching the indexes up.
    #[error(transparent)]
    Index(#[from] indexer::IndexError),
    /// Tokens or ticket.
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokensError),
    /// Replication setup.
    #[error("replication: {0}")]
    Replication(String),
    /// The bootstrap's files.
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
}

/// Creates `dir` and any missing parents, and fsyncs the directory entries of what it created,
/// so that the first acknowledged writes of a new data dir do not depend on the file system's
/// journal order to be found after a crash.
fn create_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_path_buf());
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = d
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Paths inside a data dir.
#[derive(Clone, Debug)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// The log segments.
    pub fn log(&self) -> PathBuf {
        self.0.join("log")
    }
    /// The views.
    pub fn indexes(&self) -> PathBuf {
        self.0.join("indexes.redb")
    }
    /// The dir itself.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// A running node: its writer and indexer threads and the shared state requests read.
pub struct Node {
    /// This node's id.
    pub node_id: NodeId,
    /// The node key.
    pub keypair: Keypair,
    /// Effective configuration.
    pub config: Config,
    /// The data dir.
    pub data_dir: DataDir,
    /// Client tokens.
    pub tokens: Tokens,
    /// The writer thread. Every append goes through it.
    pub writer: Arc<WriterHandle>,
    /// The views. Reads take snapshots; only the indexer thread writes.
    pub indexes: Arc<Indexes>,
    /// LSN of the last durable log record.
    pub durable: watch::Receiver<Lsn>,
    /// LSN the views have applied.
    pub indexed: watch::Receiver<Lsn>,
    /// Bounds blocking index reads so they cannot take every blocking thread.
    pub reads: Semaphore,
    /// Bounds open watches: each holds a log file open and a stream.
    pub watches: Semaphore,
    /// Replication with peers, set once the endpoint is up. It holds only
    /// [`NodeHandles`], never the node, so the two do not keep each other alive.
    replication: Mutex<Option<Arc<replication::Replication>>>,
    indexer: Arc<IndexerHandle>,
    /// Whether this node may write under its own id, as peers report its chain.
    pub own_chain: Arc<OwnChainGuard>,
    /// Where a node that starts from a peer's snapshot stands.
    pub bootstrap: Arc<bootstrap::Bootstrap>,
    /// Request ids of recent writes, so that a repeated write is not written twice.
    pub recent_writes: Arc<recent_writes::RecentWrites>,
    /// Invites this node made and has not seen used.
    pub invites: invites::Invites,
}

/// What replication needs of a node: narrow handles, so that replication, which the node
/// holds, does not hold the node.
#[derive(Clone)]
pub struct NodeHandles {
    /// The node's id.
    pub node_id: NodeId,
    /// The writer: version vector, heads, remote appends.
    pub writer: Arc<WriterHandle>,
    /// The views, for lookups.
    pub indexes: Arc<Indexes>,
    /// LSN of the last durable log record.
    pub durable: watch::Receiver<Lsn>,
    /// The data dir: the log to read, equivocation proofs to store.
    pub data_dir: DataDir,
    /// Whether the node may write under its own id.
    pub own_chain: Arc<OwnChainGuard>,
    /// What replication admits while the node starts from a snapshot.
    pub bootstrap: Arc<bootstrap::Bootstrap>,
    indexer: Arc<IndexerHandle>,
}

impl NodeHandles {
    /// Waits until the views that serve reads have applied `lsn`; `false` if the indexer has
    /// stopped first.
    pub async fn wait_indexed(&self, lsn: Lsn) -> bool {
        self.indexer.wait_indexed(lsn).await
    }
}

impl Node {
    /// Opens the data dir (creating it on first start), recovers the log, opens the views,
    /// catches them up with the log, and starts the writer and indexer threads.
    pub async fn open(config: Config) -> Result<Arc<Self>, StartError> {
        Self::open_observed(config, &crate::health::Health::new()).await
    }

    /// [`open`](Self::open), reporting the start-up catch-up of the views into `health`.
    pub async fn open_observed(
        config: Config,
        health: &Arc<crate::health::Health>,
    ) -> Result<Arc<Self>, StartError> {
        Self::open_with_log_dir(config, health, None).await
    }

    /// [`open_observed`](Self::open_observed), with the writer appending through `log_dir` when
    /// it is given: a [`LogDir`] over the data dir's `log` directory, such as a fault-injecting
    /// one in tests. Reads and the indexer use the files directly.
    pub async fn open_with_log_dir(
        config: Config,
        health: &Arc<crate::health::Health>,
        log_dir: Option<Arc<dyn LogDir>>,
    ) -> Result<Arc<Self>, StartError> {
        let data_dir = DataDir(config.data_dir.clone());
        create_durably(&data_dir.log()).map_err(|source| StartError::DataDir {
            path: data_dir.0.clone(),
            source,
        })?;
        let keypair = crate::identity::load_or_create(data_dir.path())?;
        let node_id = keypair.node_id();
        let tokens = Tokens::load_or_create(data_dir.path())?;

        let log_config = LogConfig {
            segment_bytes_max: config.segment_bytes_max,
            ..LogConfig::default()
        };
        let (mut store, recovery) = match log_dir {
            Some(dir) => {
                assert_eq!(
                    dir.path(),
                    data_dir.log(),
                    "a log dir over another directory"
                );
                LogStore::open_locked(dir, &log_config)?
            }
            None => LogStore::open(&data_dir.log(), &log_config)?,
        };
        store.set_disk_reserve(config.disk_reserve_bytes);
        let heads = recovery.heads.clone();
        let log_lsn = store.last_lsn();
        tracing::info!(log_lsn, authors = heads.len(), "log opened");

        let (indexes, report) = Indexes::open_with_cache(
            data_dir.indexes(),
            kappakv_indexes::configured_views(&config.index)?,
            config.index_cache_bytes,
        )?;
        for view in &report.views {
            match view.reset {
                Some(kappakv_indexes::ResetReason::New) => {
                    tracing::info!(view = %view.name, "view is new or its data is missing: building it from the log");
                }
                Some(kappakv_indexes::ResetReason::VersionChanged { stored }) => tracing::info!(
                    view = %view.name,
                    stored,
                    version = view.version,
                    "view definition changed: dropped, rebuilding from the log"
                ),
                None => {}
            }
        }
        for name in &report.removed_views {
            tracing::info!(view = %name, "view no longer defined: its tables were removed");
        }
        let indexes = Arc::new(indexes);

        let has_peers = replication::peers::PeerList::load(data_dir.path(), &config.peers)
            .is_ok_and(|list| list.iter().next().is_some());
        let bootstrap = Arc::new(bootstrap::Bootstrap::open(
            &data_dir,
            config.bootstrap,
            log_lsn,
            has_peers,
        )?);

        // The kv view must be caught up before the writer resolves plain puts from it; the
        // resolver's overlay only covers entries appended from now on. A node answering reads
        // from a snapshot takes no plain puts until its views have reached the snapshot's
        // point, past this log's end, so it starts at once.
        let from = indexer::applied_lsn(&indexes, &indexer::is_serving_view)?;
        let snapshot_ahead = bootstrap.stop_at().is_some_and(|n| n >= log_lsn);
        if from < log_lsn && !snapshot_ahead {
            let indexes = indexes.clone();
            let log_dir = data_dir.log();
            let batch = config.index_batch_entries_max;
            let health = health.clone();
            health.catching_up(from, log_lsn);
            let bootstrap = bootstrap.clone();
            tokio::task::spawn_blocking(move || {
                // A loaded snapshot is compared with the views exactly at its point.
                let stop = bootstrap.stop_at().filter(|n| (from..log_lsn).contains(n));
                let mut at = from;
                for upto in stop.into_iter().chain([log_lsn]) {
                    at = catch_up_logged(&indexes, &log_dir, at, upto, batch, &mut |lsn| {
                        health.caught_up_to(lsn);
                    })?;
                    if bootstrap.stop_at().is_some_and(|n| at >= n) {
                        bootstrap.check(&indexes);
                    }
                }
                Ok::<_, indexer::IndexError>(at)
            })
            .await
            .expect("catch-up task")?;
        }

        // Views already past a loaded snapshot's point (a crash after they passed it): it can
        // no longer be compared, and the node serves what its log proves.
        if bootstrap.stop_at().is_some_and(|n| {
            indexer::applied_lsn(&indexes, &indexer::is_serving_view).is_ok_and(|a| a >= n)
        }) {
            bootstrap.check(&indexes);
        }

        let writer_config = WriterConfig {
            queue_capacity: config.writer_queue_capacity,
            batch_entries_max: config.batch_entries_max,
            batch_bytes_max: config.batch_bytes_max,
        };
        // How far the views have applied the log (the writer waits for them when it is too far
        // ahead), their durable checkpoint (the whole log, now: the catch-up ends with one;
        // the writer keeps room on the disk for what they will write after it), and the
        // indexer's error if it stops after one (the writer then refuses every write).
        let applied = indexer::applied_lsn(&indexes, &indexer::is_serving_view)?;
        let views = Arc::new(indexer::IndexerShared::new(applied, log_lsn));
        let resolver = resolver::KvResolver::new(indexes.clone(), views.clone());
        let writer = WriterHandle::spawn(
            store,
            heads,
            keypair.clone(),
            Box::new(resolver),
            writer_config,
        );
        let writer = Arc::new(writer);
        let own_chain = Arc::new(OwnChainGuard::open(
            node_id,
            writer.clone(),
            &data_dir,
            &config,
        ));
        let durable = writer.durable_lsn();
        let indexer = IndexerHandle::spawn(
            indexes.clone(),
            data_dir.log(),
            durable.clone(),
            indexer::IndexerConfig {
                batch: config.index_batch_entries_max,
                durable_interval: Duration::from_millis(config.index_durable_interval_ms),
                linger: Duration::from_millis(config.index_linger_ms),
                // Lingering never makes the node look unready (`/readyz` judges the lag).
                linger_entries: (config.ready_lag_entries_max / 2).max(1),
            },
            views,
            bootstrap.clone(),
        )?;
        let indexed = indexer.indexed();
        let invites = invites::Invites::load(data_dir.path());
        Ok(Arc::new(Self {
            node_id,
            keypair,
            reads: Semaphore::new(config.max_concurrent_reads),
            watches: Semaphore::new(config.max_watches),
            config,
            data_dir,
            tokens,
            writer,
            indexes,
            durable,
            indexed,
            replication: Mutex::new(None),
            indexer: Arc::new(indexer),
            own_chain,
            bootstrap,
            recent_writes: Arc::default(),
            invites,
        }))
    }

    /// What replication needs of this node.
    pub fn handles(&self) -> NodeHandles {
        NodeHandles {
            node_id: self.node_id,
            writer: self.writer.clone(),
            indexes: self.indexes.clone(),
            durable: self.durable.clone(),
            data_dir: self.data_dir.clone(),
            own_chain: self.own_chain.clone(),
            bootstrap: self.bootstrap.clone(),
            indexer: self.indexer.clone(),
        }
    }

    /// Waits until the views that serve reads have applied `lsn`; `false` if the indexer has
    /// stopped first.
    pub async fn wait_indexed(&self, lsn: Lsn) -> bool {
        self.indexer.wait_indexed(lsn).await
    }

    /// The error the indexer stopped with, if it stopped after one. The node then takes no
    /// writes, and reads of anything the views have not applied fail, until it is restarted.
    pub fn indexer_failure(&self) -> Option<&str> {
        self.indexer.failure()
    }

    /// Each view's applied LSN as the indexer last published it, views built in the background
    /// included.
    pub fn view_lsns(&self) -> Vec<(String, Lsn)> {
        self.indexer.views().borrow().clone()
    }

    /// Each view's applied LSN, updated by the indexer after every batch.
    pub fn view_lsns_watch(&self) -> watch::Receiver<Vec<(String, Lsn)>> {
        self.indexer.views()
    }

    /// The view of the declared secondary index named `name`.
    pub fn secondary_index(&self, name: &str) -> Option<kappakv_indexes::SecondaryIndexView> {
        let def = self.config.index.iter().find(|d| d.name == name)?;
        // The configuration was validated at start, so this cannot fail.
        kappakv_indexes::SecondaryIndexView::new(def.clone()).ok()
    }

    /// Replication, once started.
    pub fn replication(&self) -> Option<Arc<replication::Replication>> {
        self.replication.lock().expect("replication lock").clone()
    }

    /// Sets replication, once the endpoint is up.
    pub fn set_replication(&self, r: Arc<replication::Replication>) {
        *self.replication.lock().expect("replication lock") = Some(r);
    }

    /// Stops the writer (flushing the log) and then the indexer (making the views durable).
    /// Whoever still holds the node afterwards reads what the views hold; a write is refused
    /// as the writer shutting down.
    pub async fn shutdown(&self) {
        self.writer.shutdown().await;
        if let Err(e) = self.indexer.shutdown().await {
            tracing::error!(error = %e, "indexer stopped with an error; the views will be replayed on start");
        }
    }
}

/// Catches the serving views up from `from` to `upto`, logging progress every few seconds and
/// calling `progress` with the LSN applied after every batch.
pub fn catch_up_logged(
    indexes: &Indexes,
    log_dir: &Path,
    from: Lsn,
    upto: Lsn,
    batch: usize,
    progress: &mut dyn FnMut(Lsn),
) -> Result<Lsn, indexer::IndexError> {
    let reader = crate::log::LogReader::open(log_dir)?;
    let started = std::time::Instant::now();
    let mut last_report = started;
    tracing::info!(from, upto, "catching the indexes up with the log");
    // Durable commits: each lets redb reuse the pages the previous one freed, and a crash
    // during a long catch-up keeps what was done.
    let select = &indexer::is_serving_view;
    let applied = indexer::catch_up(indexes, &reader, from, upto, batch, true, select, |lsn| {
        progress(lsn);
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = std::time::Instant::now();
            let done = (lsn - from) as f64 / (upto - from).max(1) as f64;
            tracing::info!(
                lsn,
                upto,
                percent = format_args!("{:.1}", done * 100.0),
                "indexing"
            );
        }
    })?;
    indexes.persist()?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        applied,
        entries = applied - from,
        secs = format_args!("{secs:.2}"),
        "indexes caught up"
    );
    Ok(applied)
}
