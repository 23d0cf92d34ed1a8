//! The indexer thread: tails the log into the views and publishes the LSN they have applied,
//! so that reads can wait for `min_lsn` (read-your-writes).
//!
//! Index commits are not durable one by one: every `index_durable_interval_ms`, and at
//! shutdown, a durable commit persists everything before it. After a crash the views resume
//! from their last durable checkpoint and replay the log from there.
//!
//! Each redb commit copies every page it touches, so a transaction per group commit costs
//! several times what one per thousand entries does. While no read waits for the views, the
//! indexer lets new entries gather for up to `index_linger_ms` before it applies them; a read
//! that must wait wakes it at once (see [`IndexerHandle::wait_indexed`]).
//!
//! An error stops the thread for good: the index database refuses every write after a failed
//! one (a full disk included) until it is reopened. The error is kept ([`IndexerShared`]) for
//! health, status and metrics to report, and the writer refuses every write from then on; a
//! restart reopens the views from their last durable checkpoint and replays the log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kappakv_indexes::Indexes;
use kappakv_protocol::{Lsn, SignedEntry};
use tokio::sync::watch;

use crate::log::LogReader;

/// The indexer could not apply the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Reading the log failed.
    #[error("reading the log: {0}")]
    Log(#[from] crate::log::ReadLogError),
    /// Applying to the views failed.
    #[error("applying to the indexes: {0}")]
    Apply(#[from] kappakv_indexes::ApplyError),
    /// Reading a checkpoint failed.
    #[error("reading the indexes: {0}")]
    Read(#[from] kappakv_indexes::ReadError),
    /// Resetting views for a rebuild failed.
    #[error("resetting the indexes: {0}")]
    Rebuild(#[from] kappakv_indexes::RebuildError),
}

/// Which views a catch-up applies to.
pub type Select<'a> = &'a dyn Fn(&str) -> bool;

/// Every view.
pub fn all_views(_: &str) -> bool {
    true
}

/// Most bytes one indexer transaction holds in memory, as [`entry_bytes`] counts them,
/// whatever `index_batch_entries_max` says: a log of large values or of many-op entries is
/// applied in smaller batches. With the process's other memory and the index cache it keeps a
/// node with 1,000,000 keys within about 150 MB.
pub const BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;

/// What one op costs a batch besides its key and value: the decoded op's two vectors and their
/// allocations, and the views' per-op rows of the batch plan (the kv view's plan alone is
/// about 112 bytes an op).
const OP_OVERHEAD_BYTES: usize = 192;

/// What an entry holds in memory while its batch is applied, roughly: its keys and values, a
/// part per op and a fixed part for the rest.
fn entry_bytes(entry: &SignedEntry) -> usize {
    256 + entry
        .entry
        .ops
        .iter()
        .map(|op| OP_OVERHEAD_BYTES + op.key().len() + op.value().map_or(0, <[u8]>::len))
        .sum::<usize>()
}

/// Applies log entries in `(from, upto]` to the views `select` names (each skips what it
/// already has), in batches of at most `batch` entries and about [`BATCH_BYTES_MAX`] bytes,
/// one redb transaction each. `progress`
/// is called after each batch with the LSN applied. Shared by the indexer thread, start-up and
/// the offline `rebuild-indexes`.
#[allow(clippy::too_many_arguments)]
pub fn catch_up(
    indexes: &Indexes,
    reader: &LogReader,
    from: Lsn,
    upto: Lsn,
    batch: usize,
    durable: bool,
    select: Select<'_>,
    mut progress: impl FnMut(Lsn),
) -> Result<Lsn, IndexError> {
    let mut applied = from;
    let mut buf: Vec<(Lsn, SignedEntry)> = Vec::with_capacity(batch.min(65_536));
    let mut bytes = 0;
    for item in reader.iter(from, upto)? {
        let (lsn, entry) = item?;
        bytes += entry_bytes(&entry);
        buf.push((lsn, entry));
        if buf.len() >= batch || bytes >= BATCH_BYTES_MAX {
            applied = apply(indexes, &mut buf, durable, select)?;
            bytes = 0;
            progress(applied);
        }
    }
    if !buf.is_empty() {
        applied = apply(indexes, &mut buf, durable, select)?;
        progress(applied);
    }
    Ok(applied)
}

fn apply(
    indexes: &Indexes,
    buf: &mut Vec<(Lsn, SignedEntry)>,
    durable: bool,
    select: Select<'_>,
) -> Result<Lsn, IndexError> {
    let last = buf.last().map_or(0, |(lsn, _)| *lsn);
    let batch: Vec<(Lsn, &SignedEntry)> = buf.iter().map(|(l, e)| (*l, e)).collect();
    indexes.apply_to(&batch, durable, select)?;
    buf.clear();
    Ok(last)
}

/// The views that serve reads: reads wait until these have applied the log. Any other view (a
/// declared secondary index) is built in the background, a batch at a time between the serving
/// views' batches, so a rebuild never holds reads back; once it has caught up it follows the
/// log together with them.
pub fn is_serving_view(name: &str) -> bool {
    kappakv_indexes::SERVING_VIEWS.contains(&name)
}

/// The lowest LSN the views `select` names have applied.
pub fn applied_lsn(indexes: &Indexes, select: Select<'_>) -> Result<Lsn, IndexError> {
    Ok(indexes
        .applied_lsns()?
        .into_iter()
        .filter(|(name, _)| select(name))
        .map(|(_, lsn)| lsn)
        .min()
        .unwrap_or(Lsn::MAX))
}

/// How often a lingering indexer counts the entries that gathered (it stops lingering at
/// `linger_entries`).
const LINGER_LOOK_EVERY: Duration = Duration::from_millis(5);

/// Below this `linger_entries` (half of `ready_lag_entries_max`), a lingering indexer counts
/// at each group commit instead: [`LINGER_LOOK_EVERY`] of writes at 100k/s could pass it, and
/// the views lag past what readiness allows.
const LINGER_LOOK_ENTRIES_MIN: u64 = 1024;

/// Wakes a parked thread.
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Blocks this (non-runtime) thread until either watch channel changes (`a` only if given)
/// or `timeout` passes. Watch channels need no runtime to be polled, so this keeps working
/// while the runtime shuts down.
fn wait_either<A, B>(
    a: Option<&mut watch::Receiver<A>>,
    b: &mut watch::Receiver<B>,
    timeout: Duration,
) {
    use std::future::Future as _;
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let deadline = Instant::now() + timeout;
    let mut fa = std::pin::pin!(async {
        match a {
            Some(a) => drop(a.changed().await),
            None => std::future::pending().await,
        }
    });
    let mut fb = std::pin::pin!(b.changed());
    loop {
        if fa.as_mut().poll(&mut cx).is_ready() || fb.as_mut().poll(&mut cx).is_ready() {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::park_timeout(deadline - now);
    }
}

/// The background view furthest behind `target`, with its applied LSN, if any is behind.
fn lagging_background_view(
    indexes: &Indexes,
    target: Lsn,
) -> Result<Option<(String, Lsn)>, IndexError> {
    Ok(indexes
        .applied_lsns()?
        .into_iter()
        .filter(|(name, lsn)| !is_serving_view(name) && *lsn < target)
        .min_by_key(|(_, lsn)| *lsn))
}

/// Views built in the background that have caught up with the serving views (applied `at`
/// or beyond). From then on they follow the log in the serving views' transactions, so a
/// declared index is as fresh as the key/value view it reads, and one write transaction per
/// batch serves them all.
fn caught_up_background_views(indexes: &Indexes, at: Lsn) -> Result<Vec<String>, IndexError> {
    Ok(indexes
        .applied_lsns()?
        .into_iter()
        .filter(|(name, lsn)| !is_serving_view(name) && *lsn >= at)
        .map(|(name, _)| name)
        .collect())
}

/// What the indexer thread tells the writer's side of the node without a channel: how far the
/// serving views have applied the log (the writer waits on it when it is too far ahead), the
/// LSN of their last durable checkpoint (the writer keeps room on the disk for what they will
/// write after it), and the error the thread stopped with, once it has.
#[derive(Debug, Default)]
pub struct IndexerShared {
    applied: Mutex<Lsn>,
    advanced: Condvar,
    checkpoint: AtomicU64,
    failed: OnceLock<String>,
}

impl IndexerShared {
    /// The state of views that have applied the log through `applied` and whose durable
    /// checkpoint is at `checkpoint`.
    pub fn new(applied: Lsn, checkpoint: Lsn) -> Self {
        Self {
            applied: Mutex::new(applied),
            advanced: Condvar::new(),
            checkpoint: AtomicU64::new(checkpoint),
            failed: OnceLock::new(),
        }
    }

    /// The LSN the serving views have applied (committed, not necessarily durable).
    pub fn applied(&self) -> Lsn {
        *self.applied.lock().expect("applied lock")
    }

    /// Waits until the serving views have applied past `lsn`, the indexer has stopped after an
    /// error, or `timeout` has passed; returns the applied LSN.
    pub fn wait_applied_past(&self, lsn: Lsn, timeout: Duration) -> Lsn {
        let guard = self.applied.lock().expect("applied lock");
        let (guard, _) = self
            .advanced
            .wait_timeout_while(guard, timeout, |applied| {
                *applied <= lsn && self.failed.get().is_none()
            })
            .expect("applied lock");
        *guard
    }

    pub(super) fn set_applied(&self, lsn: Lsn) {
        *self.applied.lock().expect("applied lock") = lsn;
        self.advanced.notify_all();
    }

    pub(super) fn set_failed(&self, error: String) {
        let _ = self.failed.set(error);
        // Taken and released, so a waiter is either before its check or already waiting.
        drop(self.applied.lock());
        self.advanced.notify_all();
    }

    /// The LSN the serving views had applied at their last durable checkpoint. Until the next
    /// one, every page they change after it is written as a copy, and the pages it replaces
    /// are freed only by that checkpoint: the index database grows with everything applied
    /// since, as well as with what is still to apply.
    pub fn checkpoint(&self) -> Lsn {
        self.checkpoint.load(Ordering::Acquire)
    }

    /// The error the indexer stopped with, if it stopped after one.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }
}

/// Records a panic of the indexer thread as its failure, so that the writer refuses writes
/// (and stops waiting for views that will not move) as after an error.
struct FailOnPanic(Arc<IndexerShared>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set_failed("the indexer thread panicked".to_string());
        }
    }
}

/// How the indexer thread batches its work.
#[derive(Debug, Clone, Copy)]
pub struct IndexerConfig {
    /// Most entries in one transaction.
    pub batch: usize,
    /// How often the views' checkpoint is made durable.
    pub durable_interval: Duration,
    /// How long new entries may gather before they are applied, while no read waits.
    pub linger: Duration,
    /// How many may gather: the indexer stops lingering once this many wait.
    pub linger_entries: u64,
}

/// The running indexer thread.
pub struct IndexerHandle {
    indexed: watch::Receiver<Lsn>,
    views: watch::Receiver<Vec<(String, Lsn)>>,
    stop: Arc<AtomicBool>,
    /// Reads waiting for the serving views; the indexer never lingers while there are any.
    waiting: Arc<AtomicUsize>,
    durable_tx_wake: watch::Sender<()>,
    /// Its applied LSN and the error it stopped with, once it has.
    shared: Arc<IndexerShared>,
    /// Taken by the first [`shutdown`](Self::shutdown), which joins it.
    thread: std::sync::Mutex<Option<JoinHandle<Result<(), IndexError>>>>,
}

impl IndexerHandle {
    /// Starts the thread. It applies everything up to `durable`'s value and then follows it.
    /// It keeps `shared` up to date, and if it stops after an error, records the error there
    /// first.
    pub fn spawn(
        indexes: Arc<Indexes>,
        log_dir: PathBuf,
        mut durable: watch::Receiver<Lsn>,
        config: IndexerConfig,
        shared: Arc<IndexerShared>,
        bootstrap: Arc<super::bootstrap::Bootstrap>,
    ) -> Result<Self, IndexError> {
        let IndexerConfig {
            batch,
            durable_interval,
            linger,
            linger_entries,
        } = config;
        let start = applied_lsn(&indexes, &is_serving_view)?;
        let (indexed_tx, indexed) = watch::channel(start);
        let (views_tx, views) = watch::channel(indexes.applied_lsns()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_tx, mut wake_rx) = watch::channel(());
        let stop2 = stop.clone();
        let waiting = Arc::new(AtomicUsize::new(0));
        let waiting2 = waiting.clone();
        let reader = LogReader::open(&log_dir)?;
        let shared2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kappakv-indexer".into())
            .spawn(move || {
                let _span = tracing::error_span!("indexer").entered();
                let _panic = FailOnPanic(shared2.clone());
                // The views are fixed for the node's life; without background views, the
                // checkpoint reads that schedule them are skipped on every batch.
                let has_background = indexes.view_names().iter().any(|n| !is_serving_view(n));
                let result: Result<(), IndexError> = (|| {
                    let mut applied = start;
                    let mut dirty = false;
                    let mut last_durable = Instant::now();
                    let mut last_background = Instant::now();
                    // When the oldest entry not yet applied became durable (as first seen).
                    let mut pending_since: Option<Instant> = None;
                    loop {
                        let target = *durable.borrow_and_update();
                        let mut worked = false;
                        if applied < target {
                            let since = *pending_since.get_or_insert_with(Instant::now);
                            let lingered = since.elapsed();
                            if lingered < linger
                                && target - applied < linger_entries
                                && waiting2.load(Ordering::Acquire) == 0
                                && !stop2.load(Ordering::Acquire)
                            {
                                // Not woken by each group commit: that woke the indexer
                                // once per batch, to preempt the writer that woke it and
                                // find it should linger on. A waiting read or a stop ends
                                // the wait; the entries that gathered are counted every
                                // LINGER_LOOK_EVERY, or at each commit when so few may
                                // gather that those milliseconds of writes could pass it.
                                let each_commit = linger_entries < LINGER_LOOK_ENTRIES_MIN;
                                wait_either(
                                    each_commit.then_some(&mut durable),
                                    &mut wake_rx,
                                    linger.saturating_sub(lingered).min(LINGER_LOOK_EVERY),
                                );
                                continue;
                            }
                            pending_since = None;
                            // The serving views first: reads wait for them.
                            let mut upto = target.min(applied + batch as u64);
                            // A loaded snapshot is compared with the views exactly at its
                            // point: a batch ends there.
                            if let Some(n) = bootstrap.stop_at()
                                && applied < n
                            {
                                upto = upto.min(n);
                            }
                            let follow = if has_background {
                                caught_up_background_views(&indexes, applied)?
                            } else {
                                Vec::new()
                            };
                            let select =
                                |n: &str| is_serving_view(n) || follow.iter().any(|f| f == n);
                            applied = catch_up(
                                &indexes,
                                &reader,
                                applied,
                                upto,
                                batch,
                                false,
                                &select,
                                |_| {},
                            )?;
                            // The views' LSNs first: whoever sees `indexed` reach an LSN then
                            // reads views (such as `/metrics`) at least that far.
                            if bootstrap.stop_at().is_some_and(|n| applied >= n) {
                                bootstrap.check(&indexes);
                            }
                            views_tx.send_replace(indexes.applied_lsns()?);
                            indexed_tx.send_replace(applied);
                            shared2.set_applied(applied);
                            worked = true;
                        }
                        // Then one step of a view being built in the background: whenever the
                        // serving views are idle, and at least every `durable_interval` under a
                        // steady stream of writes, so a rebuild cannot starve. It never passes
                        // what the serving views (the key/value view it reads) have applied.
                        let background_due = has_background
                            && (!worked || last_background.elapsed() >= durable_interval);
                        if background_due
                            && let Some((name, from)) = lagging_background_view(&indexes, applied)?
                        {
                            let upto = applied.min(from + batch as u64);
                            let only = |n: &str| n == name;
                            catch_up(&indexes, &reader, from, upto, batch, false, &only, |_| {})?;
                            last_background = Instant::now();
                            worked = true;
                            views_tx.send_replace(indexes.applied_lsns()?);
                        }
                        if worked {
                            dirty = true;
                        }
                        if dirty && last_durable.elapsed() >= durable_interval {
                            indexes.persist()?;
                            shared2.checkpoint.store(applied, Ordering::Release);
                            dirty = false;
                            last_durable = Instant::now();
                        }
                        if stop2.load(Ordering::Acquire) && applied >= *durable.borrow() {
                            break;
                        }
                        if !worked {
                            wait_either(Some(&mut durable), &mut wake_rx, durable_interval);
                        }
                    }
                    indexes.persist()?;
                    tracing::debug!(applied, "indexer stopped");
                    Ok(())
                })();
                if let Err(e) = &result {
                    shared2.set_failed(e.to_string());
                    tracing::error!(
                        error = %e,
                        "the indexes could not be updated and the indexer stopped: this node takes \
                         no more writes, and refuses reads of anything the views have not applied, \
                         until it is restarted (the index database refuses every write after a failed one \
                         until it is reopened). If the disk is full, free space in the data dir's \
                         file system (and raise disk_reserve_bytes); then restart kappakv, which \
                         replays the log into the views from their last durable checkpoint"
                    );
                }
                result
            })
            .expect("spawning the indexer thread");
        Ok(Self {
            indexed,
            views,
            stop,
            waiting,
            durable_tx_wake: wake_tx,
            shared,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The error the thread stopped with, if it stopped after one.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failure()
    }

    /// Each view's applied LSN, updated after every batch: how far a view being built in the
    /// background has come.
    pub fn views(&self) -> watch::Receiver<Vec<(String, Lsn)>> {
        self.views.clone()
    }

    /// The LSN the views have applied, updated after every batch.
    pub fn indexed(&self) -> watch::Receiver<Lsn> {
        self.indexed.clone()
    }

    /// Waits until the serving views have applied `lsn`; `false` if the indexer has stopped
    /// first. The indexer stops lingering while any caller waits here.
    pub async fn wait_indexed(&self, lsn: Lsn) -> bool {
        let mut indexed = self.indexed.clone();
        if *indexed.borrow_and_update() >= lsn {
            return true;
        }
        /// Counts one waiting read for as long as it lives.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        self.durable_tx_wake.send_replace(());
        indexed.wait_for(|&l| l >= lsn).await.is_ok()
    }

    /// Applies what is left of the durable log, makes the views durable, and joins the thread.
    pub async fn shutdown(&self) -> Result<(), IndexError> {
        self.stop.store(true, Ordering::Release);
        self.durable_tx_wake.send_replace(());
        let Some(thread) = self.thread.lock().expect("thread lock").take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joining the indexer")
            .unwrap_or_else(|_| {
                tracing::error!("indexer thread panicked");
                Ok(())
            })
    }
}

impl Drop for IndexerHandle {
    fn drop(&mut self) {
        // Never blocks: the thread sees the flag and ends on its own.
        self.stop.store(true, Ordering::Release);
        self.durable_tx_wake.send_replace(());
    }
}
