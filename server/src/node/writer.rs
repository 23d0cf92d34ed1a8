//! The writer thread: the only code that appends to the log.
//!
//! It blocks on its bounded queue for the first command, drains every command already waiting
//! (up to the batch limits), turns them into entries and signs them ([`Chains`], which does no
//! I/O), and appends the whole batch with one write and one `fdatasync` (group commit). Only then does it
//! publish the durable LSN and answer each caller on its oneshot channel: a caller learns its
//! LSN only once its record is durable.
//!
//! **Invariant:** after every batch, every author's chain in the log ends at a signed entry: the
//! last local entry of a batch is signed, and a remote run is accepted only if each of its
//! authors' entries end at a signed one. Recovery relies on this (see
//! [`log::recovery`](crate::log::recovery)).
//!
//! **Invariant:** fail-stop. If a write, sync or segment rollover fails, no command of that
//! batch is acknowledged, and the writer refuses everything after it: once `fsync` has failed,
//! what is on disk is unknown until the log is reopened and recovered (PostgreSQL's
//! "fsyncgate").
//!
//! **Invariant:** a full disk is not fatal. When the store reports
//! [`AppendError::DiskFull`], it has cut the batch out of the log; the writer refuses every
//! command of the batch and forgets the batch as if it had never been built: each author's chain
//! head goes back to its last durable entry and the resolver drops what it was told of the batch
//! ([`SupersedeResolver::discarded`]). The next batch reuses those seqs and LSNs, linked to the
//! last durable entry. Nothing of a failed batch was ever visible: heads, the durable LSN and
//! replies are published only after a batch's `fdatasync`. The store refuses a batch the same
//! way before writing it when it would eat into the free space kept for the views
//! ([`AppendError::BelowReserve`]): the reserve, plus what the views will write before their
//! next checkpoint, which the writer works out before every batch ([`VIEWS_BYTES_PER_LOG_BYTE`]
//! for each byte of log between their last checkpoint and the batch's end).
//!
//! **Invariant:** a plain write is resolved or refused, never guessed. When the resolver cannot
//! read the versions a write replaces, that write is refused ([`WriteError::Unresolved`]): taking
//! it as replacing nothing would make a sibling of the value it was meant to overwrite. When the
//! views have failed for good ([`SupersedeResolver::refusal`]), every write is refused until the
//! node is restarted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kappakv_protocol::limits::MAX_ENTRY_BYTES;
use kappakv_protocol::record::RECORD_HEADER_LEN;
use kappakv_protocol::verify::ChainHead;
use kappakv_protocol::{
    EntryId, InvalidEntry, Keypair, Lsn, NodeId, SignedEntry, VerifyError, WriteOp,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::log::{AppendError, LogStore};
use crate::node::chains::{BatchCommand, Built, Chains, OwnChain};

/// Default for [`WriterConfig::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default for [`WriterConfig::batch_entries_max`].
pub const DEFAULT_BATCH_ENTRIES_MAX: usize = 1024;
/// Default for [`WriterConfig::batch_bytes_max`]: 8 MiB.
pub const DEFAULT_BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

/// What the serving views write, at most, for each byte of log they apply: the key/value and
/// history views each keep the value, the log lookup its place, and the index database's pages
/// add the rest (3.3 measured for 1 KiB values over a million keys, 4 for 4 KiB values). The
/// writer keeps this much room, on top of the reserve, for every byte of log the views have
/// applied since their last checkpoint (whose pages are copies until the next one) or not yet.
pub const VIEWS_BYTES_PER_LOG_BYTE: u64 = 4;

/// A batch can always hold at least one entry of the largest size.
const _: () = assert!(DEFAULT_BATCH_BYTES_MAX >= MAX_ENTRY_BYTES);
/// Draining a full queue fits in one batch.
const _: () = assert!(DEFAULT_QUEUE_CAPACITY <= DEFAULT_BATCH_ENTRIES_MAX);

/// Settings of the writer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConfig {
    /// Commands that may wait in the queue; callers past this wait for room (backpressure).
    pub queue_capacity: usize,
    /// A batch stops taking commands once it holds this many entries. One command is never
    /// split, so a batch can exceed this by one command's entries.
    pub batch_entries_max: usize,
    /// A batch stops taking commands once their keys and values add up to this many bytes; as
    /// above, it can be exceeded by one command.
    pub batch_bytes_max: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            batch_entries_max: DEFAULT_BATCH_ENTRIES_MAX,
            batch_bytes_max: DEFAULT_BATCH_BYTES_MAX,
        }
    }
}

/// What a local write became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The LSN of its record, durable.
    pub lsn: Lsn,
    /// The id of the new entry.
    pub id: EntryId,
}

/// A write or remote append was not done.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The local write breaks a rule of the entry format; the rest of its batch is unaffected.
    #[error("invalid write: {0}")]
    Invalid(#[from] InvalidEntry),
    /// A remote entry does not extend its author's chain as this node's log has it; nothing of
    /// that append was written.
    #[error("remote entry {index} does not extend its author's chain: {source}")]
    Link {
        /// Index of the entry in the append.
        index: usize,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// A remote run whose last entry by `author` carries no signature; nothing of that append
    /// was written.
    #[error("remote entries of author {author} end at seq {seq}, which is not signed")]
    Unsigned {
        /// The author.
        author: NodeId,
        /// The last seq of the author in the append.
        seq: u64,
    },
    /// The disk is full, or the batch would have eaten into the space kept free for the views:
    /// nothing of this batch was written, and the writer goes on. Retry once there is space.
    #[error(
        "the write was not made because the node's disk is full; retry once space is freed: {0}"
    )]
    DiskFull(Arc<AppendError>),
    /// Writing or syncing this batch failed. Nothing of it is acknowledged, and the writer has
    /// stopped.
    #[error(
        "the node's log failed ({0}): this write is not acknowledged (it may or may not be found after a restart), and the node takes no more writes until it is restarted, which recovers the log"
    )]
    Failed(Arc<AppendError>),
    /// The versions a plain write replaces could not be read from the views; nothing of it was
    /// written, and the writer goes on.
    #[error(
        "the write was not made: the versions it replaces could not be read from the key/value view ({0})"
    )]
    Unresolved(String),
    /// The node's views failed and it takes no writes until it is restarted: nothing written
    /// now could be read back, and plain writes could not be resolved.
    #[error(
        "the node's indexes failed and it takes no writes until it is restarted ({0}); if its disk is full, free space in the data dir's file system, then restart kappakv"
    )]
    ViewsFailed(Arc<str>),
    /// The writer stopped after an earlier failure; restart the node to recover the log.
    #[error(
        "the node's log failed earlier and it takes no more writes; restart the node to recover the log"
    )]
    Stopped,
    /// This node may lack the end of its own chain, which peers hold: a local entry now would
    /// take a seq a peer already has and fork the chain. Nothing was written; writes resume
    /// once the node has received its chain back.
    #[error(
        "this node's log ends its own chain at seq {have}, {}: it was restored from a backup or lost its log, and writing now would fork its chain; writes resume once a peer has sent the chain back (retry later), or restart the node with --accept-chain-loss to write anyway",
        match peer_holds {
            Some(seq) => format!("but a peer holds it up to seq {seq}"),
            None => "and no peer has yet said how far it goes".to_string(),
        }
    )]
    OwnChainBehind {
        /// The last seq of this node's chain in its log.
        have: u64,
        /// The highest seq of it a peer holds, once one has said.
        peer_holds: Option<u64>,
    },
    /// The writer is shutting down or has shut down.
    #[error("the writer is shutting down")]
    ShuttingDown,
    /// An op of a conditional write names no context.
    #[error(
        "the conditional write's op on key {} names no context: every op of a conditional write says which versions it expects",
        String::from_utf8_lossy(key)
    )]
    NoContext {
        /// The key.
        key: Vec<u8>,
    },
    /// A conditional write named other versions than its key's current ones: nothing of it
    /// was written.
    #[error(
        "conflict: the current versions of key {} are {}, not the context given; nothing was written (read the key again)",
        String::from_utf8_lossy(key),
        if current.is_empty() { "none".to_string() } else { kappakv_protocol::Context(current.clone()).to_string() }
    )]
    Conflict {
        /// The key.
        key: Vec<u8>,
        /// Its current versions, tombstones included: the context to retry with.
        current: Vec<EntryId>,
    },
}

/// How the writer fills in `supersedes` for a write that does not give it.
pub trait SupersedeResolver: Send + 'static {
    /// Ids of every version of `key` current after all entries appended so far (tombstones
    /// included), or why they cannot be read; the write is then refused, never taken as
    /// replacing nothing.
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String>;

    /// Like [`current`](Self::current), each id with whether its version holds a value
    /// (`false`: a tombstone), for conditional writes. Without a way to tell, every version
    /// counts as a value.
    fn current_versions(&mut self, key: &[u8]) -> Result<Vec<(EntryId, bool)>, String> {
        Ok(self
            .current(key)?
            .into_iter()
            .map(|id| (id, true))
            .collect())
    }

    /// Called before every batch is built: may block until the views have caught up enough
    /// that what the resolver keeps of entries they have not applied stays bounded. The
    /// writer's queue then fills, and callers wait in it (back-pressure).
    fn hold(&mut self) {}

    /// Why no write may be ordered now, if none may: the views it reads have failed for good.
    /// Asked before every batch; every command of the batch is then refused with
    /// [`WriteError::ViewsFailed`].
    fn refusal(&mut self) -> Option<Arc<str>> {
        None
    }

    /// The LSN of the views' last durable checkpoint, if the resolver knows: the writer then
    /// keeps room on the disk for what they will write after it ([`LogStore::set_views_room`]).
    /// Asked before every batch.
    fn views_checkpoint(&mut self) -> Option<Lsn> {
        None
    }

    /// Called for every entry once it has an LSN (local or remote), before the next entry is
    /// built: the writer calls it as each entry is placed in its batch, so a later write in the
    /// same batch sees an earlier one. Local entries are passed before the batch is signed, with
    /// `signature: None`; supersession never depends on signatures. If the batch then fails
    /// to reach the disk, the writer stops, so no later write is resolved against it.
    /// `local` tells an entry this writer built (whose id nothing can have superseded yet)
    /// from one received.
    fn appended(&mut self, lsn: Lsn, entry: &SignedEntry, local: bool);

    /// Called when a batch did not reach the log (the disk was full) and the writer goes on:
    /// forget every entry passed to [`appended`](Self::appended) with an LSN above `after`, the
    /// last durable LSN. Those LSNs will be given to other entries.
    fn discarded(&mut self, after: Lsn);

    /// Called after every batch is durable and answered, or discarded: a place to drop what
    /// only the batch needed (such as an open read snapshot) and to forget what the views have
    /// caught up with.
    fn batch_done(&mut self) {}
}

/// A resolver that knows no versions: a write without a context supersedes nothing. For tests
/// and benchmarks of the write path.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoResolver;

impl SupersedeResolver for NoResolver {
    fn current(&mut self, _key: &[u8]) -> Result<Vec<EntryId>, String> {
        Ok(Vec::new())
    }

    fn appended(&mut self, _lsn: Lsn, _entry: &SignedEntry, _local: bool) {}

    fn discarded(&mut self, _after: Lsn) {}
}

enum Command {
    Local {
        ops: Vec<WriteOp>,
        /// Only if each op's `supersedes` is its key's current versions (`Request::WriteIf`).
        conditional: bool,
        reply: oneshot::Sender<Result<Written, WriteError>>,
    },
    Remote {
        entries: Vec<SignedEntry>,
        reply: oneshot::Sender<Result<Lsn, WriteError>>,
    },
    Shutdown,
}

impl Command {
    /// Entries and bytes (keys and values) the command adds to a batch.
    fn cost(&self) -> (usize, usize) {
        let op_bytes = |key: &[u8], value: Option<&[u8]>| key.len() + value.map_or(0, <[u8]>::len);
        match self {
            Command::Local { ops, .. } => (
                1,
                ops.iter()
                    .map(|w| op_bytes(&w.key, w.value.as_deref()))
                    .sum(),
            ),
            Command::Remote { entries, .. } => (
                entries.len(),
                entries
                    .iter()
                    .flat_map(|e| &e.entry.ops)
                    .map(|op| op_bytes(op.key(), op.value()))
                    .sum(),
            ),
            Command::Shutdown => (0, 0),
        }
    }
}

/// Chain heads shared by the writer thread with the readers of its handle.
type SharedHeads = Arc<RwLock<HashMap<NodeId, ChainHead>>>;

/// The handle to the writer thread. Share it behind an `Arc`; [`shutdown`](Self::shutdown)
/// takes it back.
pub struct WriterHandle {
    node_id: NodeId,
    /// Bounded queue to the thread. Dropping the last sender lets the thread finish what is
    /// queued and exit.
    tx: mpsc::Sender<Command>,
    durable: watch::Receiver<Lsn>,
    /// Each author's chain head as of the last durable batch; updated after `durable` is, so
    /// every head here is durable.
    heads: SharedHeads,
    /// Set by the thread when it stops after a failure (or a panic).
    failed: Arc<AtomicBool>,
    /// Read by the thread before every local entry.
    own_chain: Arc<OwnChain>,
    /// Fires when the thread is about to return, so `shutdown` can join without blocking long.
    exited: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// Taken by the first [`shutdown`](Self::shutdown), which joins it.
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle")
            .field("node_id", &self.node_id)
            .field("durable", &*self.durable.borrow())
            .finish_non_exhaustive()
    }
}

impl WriterHandle {
    /// Starts the writer thread, which owns `store`. `heads` is the version vector found when the
    /// store was opened ([`Recovery::heads`](crate::log::Recovery::heads)).
    pub fn spawn(
        store: LogStore,
        heads: HashMap<NodeId, ChainHead>,
        keypair: Keypair,
        resolver: Box<dyn SupersedeResolver>,
        cfg: WriterConfig,
    ) -> Self {
        assert!(cfg.queue_capacity > 0 && cfg.batch_entries_max > 0 && cfg.batch_bytes_max > 0);
        let node_id = keypair.node_id();
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let (durable_tx, durable) = watch::channel(store.last_lsn());
        let shared_heads: SharedHeads = Arc::new(RwLock::new(heads.clone()));
        let failed = Arc::new(AtomicBool::new(false));
        let chains = Chains::new(
            heads,
            keypair,
            store.max_timestamp_at_open(),
            crate::unix_now_ms(),
        );
        let own_chain = chains.own_chain();
        let (exit_tx, exited) = oneshot::channel();
        let writer = Writer {
            store,
            chains,
            resolver,
            durable: durable_tx,
            shared_heads: shared_heads.clone(),
            cfg,
            payloads: Vec::new(),
            disk_full: None,
            disk_full_logged: None,
            appended_bytes: 0,
            backlog: VecDeque::new(),
            applied_bytes: 0,
        };
        let guard = ExitGuard {
            failed: failed.clone(),
            exit: Some(exit_tx),
        };
        let thread = std::thread::Builder::new()
            .name("kappakv-writer".into())
            .spawn(move || {
                let guard = guard;
                let _span = tracing::error_span!("writer", node = %node_id.short()).entered();
                writer.run(rx, &guard.failed);
            })
            .expect("spawning the writer thread");
        Self {
            node_id,
            tx,
            durable,
            heads: shared_heads,
            failed,
            own_chain,
            exited: std::sync::Mutex::new(Some(exited)),
            thread: std::sync::Mutex::new(Some(thread)),
        }
    }

    /// The head of `author`'s chain in the durable log.
    pub fn head(&self, author: &NodeId) -> Option<ChainHead> {
        self.heads.read().expect("heads lock").get(author).copied()
    }

    /// The durable log's version vector: author → highest seq.
    pub fn version_vector(&self) -> Vec<(NodeId, u64)> {
        let heads = self.heads.read().expect("heads lock");
        let mut vv: Vec<(NodeId, u64)> = heads.iter().map(|(a, h)| (*a, h.seq)).collect();
        vv.sort_unstable();
        vv
    }

    /// This node's id, the author of local entries.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Holds local writes ([`WriteError::OwnChainBehind`]) until a peer reports how far this
    /// node's own chain goes ([`peer_holds_own`](Self::peer_holds_own)) and the log reaches
    /// that: for a node whose log may lack the end of its own chain.
    pub fn hold_own_writes(&self) {
        self.own_chain
            .required
            .store(OwnChain::UNKNOWN, Ordering::Release);
    }

    /// A peer holds this node's own chain up to `seq`: local writes wait until the log holds it
    /// too. Returns the seq local writes now wait for, if they wait.
    pub fn peer_holds_own(&self, seq: u64) -> Option<u64> {
        let required = &self.own_chain.required;
        if required
            .compare_exchange(OwnChain::UNKNOWN, seq, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            required.fetch_max(seq, Ordering::AcqRel);
        }
        let required = self.own_chain.required()?;
        let have = self.head(&self.node_id).map_or(0, |h| h.seq);
        (have < required).then_some(required)
    }

    /// Whether local writes are held until a peer reports how far this node's chain goes.
    pub fn own_chain_unknown(&self) -> bool {
        self.own_chain.required().is_none()
    }

    /// Whether local writes are held: the log's own chain is shorter than a peer's, or no peer
    /// has said how far it goes after [`hold_own_writes`](Self::hold_own_writes).
    pub fn own_writes_held(&self) -> bool {
        let have = self.head(&self.node_id).map_or(0, |h| h.seq);
        self.own_chain.required().is_none_or(|seq| have < seq)
    }

    /// Writes one local entry holding `ops`, and returns its LSN and id once it is durable.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Written, WriteError> {
        self.write_local(ops, false).await
    }

    /// Writes `ops` like [`write`](Self::write), only if each op's `supersedes` names exactly
    /// its key's current versions as of the write's place in the log (an empty one: only if
    /// the key has no value); otherwise nothing is written and the error is
    /// [`WriteError::Conflict`].
    pub async fn write_if(&self, ops: Vec<WriteOp>) -> Result<Written, WriteError> {
        self.write_local(ops, true).await
    }

    async fn write_local(
        &self,
        ops: Vec<WriteOp>,
        conditional: bool,
    ) -> Result<Written, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Local {
                ops,
                conditional,
                reply,
            })
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Appends entries of other authors, which the caller has checked signatures of, in order.
    /// Each must extend its author's chain as this node's log has it, and each author's last
    /// entry here must carry a signature; otherwise nothing of them is written. Returns the LSN
    /// of the last one once durable (for an empty list, the LSN of the batch it joined).
    pub async fn append_remote(&self, entries: Vec<SignedEntry>) -> Result<Lsn, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Remote { entries, reply })
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// The LSN of the last durable record, updated after every batch.
    pub fn durable_lsn(&self) -> watch::Receiver<Lsn> {
        self.durable.clone()
    }

    /// Lets the thread finish every command queued before this call (appending and syncing
    /// them), then waits for it to exit. Commands sent after it are refused with
    /// [`WriteError::ShuttingDown`]; a second call returns at once.
    pub async fn shutdown(&self) {
        // A failed send means the thread is already gone.
        let _ = self.tx.send(Command::Shutdown).await;
        let exited = self.exited.lock().expect("exit lock").take();
        if let Some(exited) = exited {
            let _ = exited.await;
        }
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(thread) = thread {
            // The thread has signalled its exit: this join waits only for it to return.
            if thread.join().is_err() {
                tracing::error!("the writer thread panicked");
            }
        }
    }

    /// Whether the writer stopped after a failed write (it refuses every write from then on).
    pub fn is_stopped(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn gone(&self) -> WriteError {
        if self.failed.load(Ordering::Acquire) {
            WriteError::Stopped
        } else {
            WriteError::ShuttingDown
        }
    }
}

/// Marks the writer as failed if its thread unwinds, and signals its exit either way.
struct ExitGuard {
    failed: Arc<AtomicBool>,
    exit: Option<oneshot::Sender<()>>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.failed.store(true, Ordering::Release);
        }
        if let Some(exit) = self.exit.take() {
            let _ = exit.send(());
        }
    }
}

/// A reply owed once the batch is durable.
enum Pending {
    Local {
        reply: oneshot::Sender<Result<Written, WriteError>>,
        lsn: Lsn,
        id: EntryId,
    },
    Remote {
        reply: oneshot::Sender<Result<Lsn, WriteError>>,
        lsn: Lsn,
    },
}

/// The thread's state.
struct Writer {
    store: LogStore,
    /// Every author's chain, and the batch being built.
    chains: Chains,
    resolver: Box<dyn SupersedeResolver>,
    durable: watch::Sender<Lsn>,
    shared_heads: SharedHeads,
    cfg: WriterConfig,
    /// The batch's record payloads, reused.
    payloads: Vec<Vec<u8>>,
    /// Set while the disk is full: from the first refused batch to the next durable one.
    disk_full: Option<DiskFull>,
    /// When a full disk was last logged as an error.
    disk_full_logged: Option<Instant>,
    /// Bytes of records this writer appended.
    appended_bytes: u64,
    /// For each batch after the views' last checkpoint: its last LSN and `appended_bytes` after
    /// it.
    backlog: VecDeque<(Lsn, u64)>,
    /// `appended_bytes` as of the last batch the views' checkpoint covers.
    applied_bytes: u64,
}

/// A time the disk was full, as the writer saw it.
struct DiskFull {
    /// Batches refused.
    refused: u64,
    /// Whether it was logged as an error (so its end is logged too).
    logged: bool,
}

/// Least time between two errors logged for a full disk.
const DISK_FULL_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>, failed: &AtomicBool) {
        let mut commands = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut shutdown = matches!(first, Command::Shutdown);
            let (mut entries, mut bytes) = first.cost();
            commands.push(first);
            while !shutdown
                && entries < self.cfg.batch_entries_max
                && bytes < self.cfg.batch_bytes_max
            {
                match rx.try_recv() {
                    Ok(Command::Shutdown) => shutdown = true,
                    Ok(cmd) => {
                        let (e, b) = cmd.cost();
                        entries += e;
                        bytes += b;
                        commands.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.batch(&mut commands) {
                tracing::error!(
                    error = %e,
                    durable_lsn = self.store.last_lsn(),
                    "the log could not be written or synced: this node takes no more writes \
                     (reads go on) until it is restarted; check the disk (dmesg, SMART), then \
                     restart kappakv, which recovers the log to its last durable record"
                );
                crate::telemetry::log_write_failed("fatal");
                failed.store(true, Ordering::Release);
                return;
            }
            if shutdown {
                tracing::debug!(lsn = self.store.last_lsn(), "writer shut down");
                return;
            }
        }
        tracing::debug!(lsn = self.store.last_lsn(), "writer queue closed");
    }

    /// Builds, appends and acknowledges one batch. On error every caller of the batch has been
    /// told, and the writer must stop.
    fn batch(&mut self, commands: &mut Vec<Command>) -> Result<(), Arc<AppendError>> {
        self.resolver.hold();
        if let Some(reason) = self.resolver.refusal() {
            for cmd in commands.drain(..) {
                let _ = match cmd {
                    Command::Local { reply, .. } => reply
                        .send(Err(WriteError::ViewsFailed(reason.clone())))
                        .map_err(drop),
                    Command::Remote { reply, .. } => reply
                        .send(Err(WriteError::ViewsFailed(reason.clone())))
                        .map_err(drop),
                    Command::Shutdown => Ok(()),
                };
            }
            return Ok(());
        }
        let base = self.store.last_lsn();
        let commands = commands.drain(..).filter_map(|cmd| match cmd {
            Command::Local {
                ops,
                conditional,
                reply,
            } => Some(BatchCommand::Local {
                ops,
                conditional,
                reply,
            }),
            Command::Remote { entries, reply } => Some(BatchCommand::Remote { entries, reply }),
            Command::Shutdown => None,
        });
        let built = self
            .chains
            .build(base, commands, self.resolver.as_mut(), crate::unix_now_ms());
        let mut pending = Vec::with_capacity(built.len());
        for b in built {
            match b {
                Built::Local { reply, lsn, id } => pending.push(Pending::Local { reply, lsn, id }),
                Built::Remote { reply, lsn } => pending.push(Pending::Remote { reply, lsn }),
                Built::LocalRefused { reply, error } => {
                    let _ = reply.send(Err(error));
                }
                Built::RemoteRefused { reply, error } => {
                    let _ = reply.send(Err(error));
                }
            }
        }
        let batch_len = self.chains.entries().len() as u64;
        self.payloads.clear();
        self.payloads.extend(
            self.chains
                .entries()
                .iter()
                .map(SignedEntry::encode_payload),
        );
        let batch_bytes: u64 = self
            .payloads
            .iter()
            .map(|p| (RECORD_HEADER_LEN + p.len()) as u64)
            .sum();
        let track = self.keep_room_for_views(batch_bytes);
        match self.store.append(&self.payloads) {
            Ok(last) => {
                assert_eq!(
                    last,
                    base + batch_len,
                    "the store assigned the LSNs the writer did"
                );
                if track && batch_len > 0 {
                    self.appended_bytes += batch_bytes;
                    self.backlog.push_back((last, self.appended_bytes));
                }
                // The durable LSN first, then the heads: a head read from the handle is always
                // durable, so whoever reads a head and then waits for the views to reach the
                // durable LSN finds the head's entry there.
                self.durable.send_replace(last);
                {
                    let mut shared = self.shared_heads.write().expect("heads lock");
                    for e in self.chains.entries() {
                        shared.insert(
                            e.entry.author,
                            ChainHead {
                                seq: e.entry.seq,
                                id: e.id,
                            },
                        );
                    }
                }
                let local = pending
                    .iter()
                    .filter(|p| matches!(p, Pending::Local { .. }))
                    .count() as u64;
                crate::telemetry::group_commit(local, batch_len - local);
                for p in pending {
                    // A caller that went away still has its entry written.
                    let _ = match p {
                        Pending::Local { reply, lsn, id } => {
                            reply.send(Ok(Written { lsn, id })).map_err(drop)
                        }
                        Pending::Remote { reply, lsn } => reply.send(Ok(lsn)).map_err(drop),
                    };
                }
                self.resolver.batch_done();
                if let Some(full) = self.disk_full.take()
                    && full.logged
                {
                    tracing::warn!(
                        refused_batches = full.refused,
                        lsn = last,
                        "there is space on the disk again: writes resumed"
                    );
                }
                Ok(())
            }
            Err(e) if e.is_disk_full() => {
                let e = Arc::new(e);
                self.discard(base);
                let full = self.disk_full.get_or_insert(DiskFull {
                    refused: 0,
                    logged: false,
                });
                full.refused += 1;
                // A nearly full disk can refuse one batch and take the next, smaller one: at
                // most one error (and one line when it is over) per interval.
                let log_now = self
                    .disk_full_logged
                    .is_none_or(|at| at.elapsed() >= DISK_FULL_LOG_INTERVAL);
                if log_now {
                    full.logged = true;
                    self.disk_full_logged = Some(Instant::now());
                    tracing::error!(
                        error = %e,
                        durable_lsn = base,
                        "the disk is full: writes are refused until there is space, then resume \
                         by themselves; nothing acknowledged is lost. Free space in the data dir's \
                         file system"
                    );
                } else {
                    tracing::debug!(error = %e, refused = full.refused, "the disk is still full");
                }
                crate::telemetry::log_write_failed("disk_full");
                for p in pending {
                    let _ = match p {
                        Pending::Local { reply, .. } => reply
                            .send(Err(WriteError::DiskFull(e.clone())))
                            .map_err(drop),
                        Pending::Remote { reply, .. } => reply
                            .send(Err(WriteError::DiskFull(e.clone())))
                            .map_err(drop),
                    };
                }
                Ok(())
            }
            Err(e) => {
                let e = Arc::new(e);
                for p in pending {
                    let _ = match p {
                        Pending::Local { reply, .. } => {
                            reply.send(Err(WriteError::Failed(e.clone()))).map_err(drop)
                        }
                        Pending::Remote { reply, .. } => {
                            reply.send(Err(WriteError::Failed(e.clone()))).map_err(drop)
                        }
                    };
                }
                Err(e)
            }
        }
    }

    /// Tells the store how much room the views need on top of its reserve to write what they
    /// will before their next checkpoint, once this batch of `batch_bytes` is appended:
    /// [`VIEWS_BYTES_PER_LOG_BYTE`] for each byte of it and of the log after their last
    /// checkpoint. Returns whether that checkpoint is known (and so the batch must be counted
    /// once appended).
    fn keep_room_for_views(&mut self, batch_bytes: u64) -> bool {
        let Some(checkpoint) = self.resolver.views_checkpoint() else {
            self.store.set_views_room(0);
            return false;
        };
        while let Some(&(lsn, bytes)) = self.backlog.front()
            && lsn <= checkpoint
        {
            self.applied_bytes = bytes;
            self.backlog.pop_front();
        }
        let behind = self.appended_bytes - self.applied_bytes + batch_bytes;
        self.store
            .set_views_room(behind.saturating_mul(VIEWS_BYTES_PER_LOG_BYTE));
        true
    }

    /// Forgets the batch built on `base`, which did not reach the log: each author's head goes
    /// back to where the log has it, and the resolver drops the batch's entries.
    fn discard(&mut self, base: Lsn) {
        self.chains.discard();
        debug_assert_eq!(
            *self.chains.heads(),
            *self.shared_heads.read().expect("heads lock"),
            "after a discarded batch the heads are the durable ones"
        );
        self.resolver.discarded(base);
        self.resolver.batch_done();
    }
}
