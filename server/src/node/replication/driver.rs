//! The tokio half of replication: connections, the send and receive loops, and counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kappakv_protocol::limits::MAX_UNSIGNED_RUN_BYTES;
use kappakv_protocol::record::encode_record;
use kappakv_protocol::verify::ChainHead;
use kappakv_protocol::{Lsn, NodeId, PeerOrigin, PeerStatus, SignedEntry};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

mod snapshot;
mod stream;

pub use stream::{STREAM_SESSIONS_MAX, StreamMode, StreamSummary};

use super::peers::PeerList;
use super::session::{self, Classified, Plan, SyncSession, resume_after};
use crate::log::LogReader;
use crate::net::close;
use crate::net::tls::TlsIdentity;
use crate::node::writer::WriteError;
use crate::node::{Node, NodeHandles, StartError};

/// Entries read from the log per blocking read on the send side.
const SEND_CHUNK: u64 = 2048;
/// Bytes of entries read from the log per send step, besides the entry that crosses the line.
const SEND_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of unsigned entries a session buffers over all authors: one run of the most the
/// protocol allows, twice, since logs written before that limit could leave a local run open
/// while a remote one was appended.
const PENDING_BYTES_MAX: usize = 2 * MAX_UNSIGNED_RUN_BYTES;
/// Folder of the data dir where equivocation proofs are stored.
pub const EQUIVOCATIONS_DIR: &str = "equivocations";
/// Most equivocation proofs written since start: a hostile author could otherwise fill the disk.
const PROOFS_MAX: u64 = 1024;
/// Two connections with one peer, dialled by different sides within this long of each other,
/// are a simultaneous dial (see [`Replication::register`]). Well above a handshake on the
/// networks peers use, well below the idle timeout of [`peer_transport`].
const SIMULTANEOUS_DIAL: Duration = Duration::from_secs(2);
/// Reconnect backoff bounds. The cap is short so that replication resumes within seconds of a
/// network heal, however long the fault lasted; a peer that refused this node (not on its
/// list) is tried again only every [`REFUSED_BACKOFF`], since only its operator can change that.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const REFUSED_BACKOFF: Duration = Duration::from_secs(10);
/// A peer connection sends a keep-alive this often, and one that has received nothing for
/// [`PEER_IDLE_TIMEOUT`] is closed and dialled again. While a path is down QUIC backs its
/// retransmissions off exponentially, so a connection that lived through a long fault would
/// notice the heal only about as long after it as the fault lasted; a new one starts afresh.
const PEER_KEEP_ALIVE: Duration = Duration::from_secs(1);
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const _: () = assert!(PEER_KEEP_ALIVE.as_millis() * 4 <= PEER_IDLE_TIMEOUT.as_millis());
const _: () = assert!(SIMULTANEOUS_DIAL.as_millis() < PEER_IDLE_TIMEOUT.as_millis());

/// What this node knows of one peer.
#[derive(Default)]
struct PeerState {
    connected: bool,
    since_ms: u64,
    sent: u64,
    received: u64,
    /// Entries read from the log by send loops to the peer, sent or not.
    read: u64,
    /// The peer's version vector as the live session knows it.
    theirs: HashMap<NodeId, u64>,
    /// The live connection, which node dialled it, and when it was registered.
    conn: Option<(quinn::Connection, NodeId, Instant)>,
    /// Wakes the dial loop when the connection ends.
    ended: Arc<Notify>,
    /// Ends the dial loop when the peer is removed.
    cancel: CancellationToken,
}

/// What became of the entries of received runs.
#[derive(Debug, Clone, Copy, Default)]
struct Ingested {
    appended: u64,
    present: u64,
    refused: u64,
}

/// Replication with every peer of this node.
pub struct Replication {
    /// What replication needs of the node, and no more: the node holds replication.
    node: NodeHandles,
    /// Where peers are dialled; `None` for a node that only syncs over streams
    /// ([`Replication::detached`]).
    endpoint: Option<quinn::Endpoint>,
    /// Places for sessions through client streams ([`STREAM_SESSIONS_MAX`]).
    streams: Arc<tokio::sync::Semaphore>,
    identity: TlsIdentity,
    list: Mutex<PeerList>,
    /// Never held across an await.
    state: Mutex<BTreeMap<NodeId, PeerState>>,
    equivocations: AtomicU64,
    /// Equivocation proofs written since start (bounded by [`PROOFS_MAX`]).
    proofs: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// When set, only entries of these authors are accepted.
    writers: Option<HashSet<NodeId>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A peer could not be added or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// Saving the peer list failed.
    #[error("saving the peer list: {0}")]
    Save(#[from] std::io::Error),
    /// The node itself.
    #[error("a node cannot be its own peer")]
    Itself,
}

impl Replication {
    /// Loads the peer list and starts dialling every peer.
    pub fn start(
        node: &Node,
        endpoint: quinn::Endpoint,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, StartError> {
        let list = PeerList::load(node.data_dir.path(), &node.config.peers)
            .map_err(|e| StartError::Replication(format!("reading the peer list: {e}")))?;
        let peers: Vec<NodeId> = list.iter().map(|(id, _, _)| *id).collect();
        let this = Self::new(node, Some(endpoint), list, cancel, tracker)?;
        for peer in peers {
            this.spawn_dialer(peer);
        }
        Ok(this)
    }

    /// Replication with no endpoint and no peer dialled: for sessions over streams only, on a
    /// node that does not serve ([`Replication::serve_stream`]).
    pub fn detached(node: &Node) -> Result<Arc<Self>, StartError> {
        Self::new(
            node,
            None,
            PeerList::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        )
    }

    fn new(
        node: &Node,
        endpoint: Option<quinn::Endpoint>,
        list: PeerList,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, StartError> {
        let identity =
            TlsIdentity::new(&node.keypair).map_err(|e| StartError::Replication(e.to_string()))?;
        let writers = node.config.writer_ids();
        Ok(Arc::new(Self {
            node: node.handles(),
            endpoint,
            streams: Arc::new(tokio::sync::Semaphore::new(STREAM_SESSIONS_MAX)),
            identity,
            list: Mutex::new(list),
            state: Mutex::new(BTreeMap::new()),
            equivocations: AtomicU64::new(0),
            proofs: AtomicU64::new(0),
            rejected: Mutex::new(BTreeMap::new()),
            writers,
            cancel,
            tracker,
        }))
    }

    fn spawn_dialer(self: &Arc<Self>, peer: NodeId) {
        if peer == self.node.node_id {
            return;
        }
        let (cancel, ended) = {
            let mut state = self.state.lock().expect("peer state lock");
            let s = state.entry(peer).or_default();
            s.cancel = self.cancel.child_token();
            (s.cancel.clone(), s.ended.clone())
        };
        let this = self.clone();
        self.tracker.spawn(
            async move { this.dial_loop(peer, cancel, ended).await }
                .instrument(tracing::info_span!("peer", peer = %peer.short())),
        );
    }

    async fn dial_loop(
        self: Arc<Self>,
        peer: NodeId,
        cancel: CancellationToken,
        ended: Arc<Notify>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let connected = self
                .state
                .lock()
                .expect("peer state lock")
                .get(&peer)
                .is_some_and(|s| s.connected);
            if connected {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = ended.notified() => {}
                    () = tokio::time::sleep(BACKOFF_MAX) => {}
                }
                continue;
            }
            let started = Instant::now();
            // A dial into a dead path lasts until the handshake times out: shutdown must not
            // wait for it.
            let dialled = tokio::select! {
                () = cancel.cancelled() => return,
                r = self.dial(peer) => r,
            };
            let mut refused = false;
            match dialled {
                Ok(conn) => {
                    self.clone()
                        .run_session(conn.clone(), peer, self.node.node_id)
                        .await;
                    refused = matches!(
                        conn.close_reason(),
                        Some(quinn::ConnectionError::ApplicationClosed(c))
                            if c.error_code == close::NOT_A_PEER.into()
                    );
                    if started.elapsed() > BACKOFF_MAX {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "dial failed"),
            }
            if refused {
                backoff = REFUSED_BACKOFF;
            }
            // Exponential backoff with jitter, so that many nodes do not redial in step.
            let jitter = u64::from(rand_u16()) % (backoff.as_millis() as u64 / 2 + 1);
            let wait = backoff + Duration::from_millis(jitter);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn dial(&self, peer: NodeId) -> anyhow::Result<quinn::Connection> {
        let addr = self
            .list
            .lock()
            .expect("peer list lock")
            .get(&peer)
            .cloned();
        let Some(addr) = addr else {
            anyhow::bail!("no address for peer")
        };
        let target = tokio::net::lookup_host(&addr)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{addr} resolves to no address"))?;
        let tls = self.identity.peer_client_config(peer)?;
        let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        config.transport_config(Arc::new(peer_transport()));
        let Some(endpoint) = &self.endpoint else {
            anyhow::bail!("this node does not dial peers")
        };
        let conn = endpoint
            .connect_with(config, target, kappakv_protocol::tls::SERVER_NAME)?
            .await?;
        Ok(conn)
    }

    /// Takes an accepted `kappakv-peer/1` connection: serves it if the peer is on the list.
    pub async fn accept(self: Arc<Self>, conn: quinn::Connection) {
        let peer = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|c| kappakv_protocol::tls::node_id_of_cert(c).ok())
            });
        let Some(peer) = peer else {
            tracing::warn!(remote = %conn.remote_address(), "refusing peer connection without a node certificate");
            conn.close(
                close::NOT_A_PEER.into(),
                b"a peer must present its node certificate",
            );
            return;
        };
        let known = self
            .list
            .lock()
            .expect("peer list lock")
            .get(&peer)
            .is_some();
        if !known {
            tracing::warn!(
                peer = %peer,
                remote = %conn.remote_address(),
                "refusing peer connection: node id is not on the peer list (add it with `kappactl peer add` or --peer)"
            );
            conn.close(close::NOT_A_PEER.into(), b"not on the peer list");
            return;
        }
        let this = self.clone();
        this.run_session(conn, peer, peer)
            .instrument(tracing::info_span!("peer", peer = %peer.short()))
            .await;
    }

    /// Registers the connection, or closes it when one with the same peer is already up.
    ///
    /// A node dials a peer only while it has no connection with it. So two connections that
    /// come up within [`SIMULTANEOUS_DIAL`] of each other, dialled by different sides, are the
    /// two sides dialling at once: both sides keep the one dialled by the lower node id.
    /// Otherwise the new connection replaces the old one, which its dialler has lost (a peer
    /// killed and restarted leaves this side with a connection that looks alive until the
    /// idle timeout; refusing the new one would keep the pair apart until then).
    fn register(&self, peer: NodeId, conn: &quinn::Connection, dialer: NodeId) -> bool {
        let mut state = self.state.lock().expect("peer state lock");
        let s = state.entry(peer).or_default();
        if let Some((old, old_dialer, since)) = &s.conn
            && old.close_reason().is_none()
        {
            let simultaneous = *old_dialer != dialer && since.elapsed() < SIMULTANEOUS_DIAL;
            if simultaneous && *old_dialer < dialer {
                return false;
            }
            old.close(close::DUPLICATE.into(), b"duplicate connection");
        }
        s.conn = Some((conn.clone(), dialer, Instant::now()));
        s.connected = true;
        s.since_ms = crate::unix_now_ms();
        crate::telemetry::peer_connected(&peer);
        true
    }

    /// Closes every peer connection; each is dialled again and its session resumes from the
    /// version vectors. For sessions whose entries this node dropped while it started from a
    /// snapshot: the peer's send side believes they arrived.
    fn restart_sessions(&self) {
        let state = self.state.lock().expect("peer state lock");
        for s in state.values() {
            if let Some((conn, _, _)) = &s.conn {
                conn.close(close::RESYNC.into(), b"resuming after a snapshot");
            }
        }
        tracing::info!("restarting peer sessions to fetch the entries past the snapshot");
    }

    fn unregister(&self, peer: NodeId, conn: &quinn::Connection) {
        let mut state = self.state.lock().expect("peer state lock");
        if let Some(s) = state.get_mut(&peer)
            && s.conn
                .as_ref()
                .is_some_and(|(c, _, _)| c.stable_id() == conn.stable_id())
        {
            s.conn = None;
            s.connected = false;
            s.since_ms = crate::unix_now_ms();
            s.ended.notify_waiters();
        }
    }

    async fn run_session(self: Arc<Self>, conn: quinn::Connection, peer: NodeId, dialer: NodeId) {
        if !self.register(peer, &conn, dialer) {
            conn.close(close::DUPLICATE.into(), b"duplicate connection");
            return;
        }
        tracing::info!(remote = %conn.remote_address(), "peer connected");
        self.tracker
            .spawn(self.clone().serve_snapshots(conn.clone()).in_current_span());
        if self.node.bootstrap.start_fetch(&peer) {
            let (this, conn) = (self.clone(), conn.clone());
            self.tracker
                .spawn(async move { this.fetch_snapshot(conn, peer).await }.in_current_span());
        }
        // One unidirectional stream each way carries the session.
        let streams = async {
            let tx = conn.open_uni().await?;
            let rx = async { Ok(conn.accept_uni().await?) };
            let live = StreamMode {
                send: true,
                receive: true,
                live: true,
                report: false,
            };
            self.run_stream(rx, tx, live, Some(peer), &self.cancel)
                .await
        };
        let reason = tokio::select! {
            () = self.cancel.cancelled() => {
                conn.close(close::SHUTDOWN.into(), b"node shutting down");
                "shutdown".to_string()
            }
            r = streams => r.err().map_or_else(|| "done".into(), |e| format!("{e:#}")),
            e = conn.closed() => format!("closed: {e}"),
        };
        conn.close(close::SHUTDOWN.into(), b"session ended");
        tracing::info!(%reason, "peer disconnected");
        self.unregister(peer, &conn);
    }

    /// The LSN after which the send loop reads: just before the first entry the peer lacks
    /// by what the session knows it has ([`resume_after`]), asked of the log lookup view once
    /// it has caught up with the durable log.
    async fn resume_after(&self, session: &Mutex<SyncSession>) -> anyhow::Result<Lsn> {
        let durable = *self.node.durable.borrow();
        anyhow::ensure!(
            self.node.wait_indexed(durable).await,
            "the indexer has stopped"
        );
        let theirs = session
            .lock()
            .expect("session lock")
            .their_version_vector()
            .clone();
        let indexes = self.node.indexes.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let snapshot = indexes.snapshot()?;
            let end = snapshot.log_lookup_applied_lsn()?;
            let ours = snapshot.version_vector()?;
            resume_after(end, &ours, &theirs, |author, seq| {
                snapshot.author_seq_lsn(author, seq)
            })
        })
        .await??)
    }

    fn reject(&self, reason: &'static str, detail: &str) {
        tracing::warn!(reason, detail, "refused an entry from a peer");
        *self
            .rejected
            .lock()
            .expect("rejected lock")
            .entry(reason)
            .or_default() += 1;
    }

    /// Appends verified runs through the writer, in the order given (the peer's log order, so
    /// the log stays causal), after classifying each against the log: all that extend it go in
    /// one append.
    /// `peer` is the peer connection's, whose counters grow; `None` for a stream session.
    async fn ingest(
        &self,
        peer: Option<NodeId>,
        runs: Vec<Vec<SignedEntry>>,
    ) -> anyhow::Result<Ingested> {
        // While this node starts from a snapshot, only what the snapshot covers.
        let runs = self.node.bootstrap.admit(runs).await;
        if runs.is_empty() {
            return Ok(Ingested::default());
        }
        // Each `Link` refusal means another session moved a head forward, so classifying again
        // ends: at the latest when every run is a duplicate.
        let plan = loop {
            let plan = self.plan(&runs).await?;
            if plan.append.is_empty() {
                break plan;
            }
            let n = plan.append.len() as u64;
            match self.node.writer.append_remote(plan.append.clone()).await {
                Ok(_) => {
                    if let Some(peer) = peer {
                        self.state
                            .lock()
                            .expect("peer state lock")
                            .entry(peer)
                            .or_default()
                            .received += n;
                    }
                    self.node.own_chain.received();
                    if self
                        .node
                        .bootstrap
                        .appended(&self.node.writer.version_vector())
                    {
                        self.restart_sessions();
                    }
                    break plan;
                }
                // Another session appended some of these first: classify again.
                Err(WriteError::Link { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        };
        let ingested = Ingested {
            appended: plan.append.len() as u64,
            present: plan.present,
            refused: plan.refused.iter().map(|(run, _)| run.len() as u64).sum(),
        };
        for (run, refused) in plan.refused {
            match refused {
                Classified::Equivocation {
                    author,
                    seq,
                    existing,
                    other,
                } => {
                    self.equivocations.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        %author, seq, existing = ?existing, %other,
                        "equivocation: a peer sent a different entry for an (author, seq) this node has; refused"
                    );
                    match self.store_equivocation(author, seq, &run).await {
                        Ok(Some(path)) => tracing::error!(
                            %author, seq, path = %path.display(),
                            "equivocation proof stored"
                        ),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(
                            %author, seq, error = %e,
                            "could not store the equivocation proof"
                        ),
                    }
                }
                Classified::Gap {
                    author,
                    expected,
                    got,
                } => self.reject(
                    "seq_gap",
                    &format!("author {author}: expected seq {expected}, got {got}"),
                ),
                Classified::Append(_) | Classified::Duplicate => {}
            }
        }
        Ok(ingested)
    }

    /// [`session::plan`] against the log's durable heads, looking entries up in the views only
    /// when a run ends below its author's head (a repeat, or an equivocation).
    async fn plan(&self, runs: &[Vec<SignedEntry>]) -> anyhow::Result<Plan> {
        struct NotLookedUp;
        let writer = &self.node.writer;
        if let Ok(plan) = session::plan(runs, |a| writer.head(a), |_, _, _| Err(NotLookedUp)) {
            return Ok(plan);
        }
        // The heads first: every head the writer shows is durable, so the views hold it once
        // they reach the durable LSN read after it.
        let heads: HashMap<NodeId, Option<ChainHead>> = runs
            .iter()
            .filter_map(|run| run.last())
            .map(|e| (e.entry.author, writer.head(&e.entry.author)))
            .collect();
        let durable = *self.node.durable.borrow();
        anyhow::ensure!(
            self.node.wait_indexed(durable).await,
            "the indexer has stopped"
        );
        let indexes = self.node.indexes.clone();
        let runs = runs.to_vec();
        tokio::task::spawn_blocking(move || {
            let snapshot = indexes.snapshot()?;
            session::plan(
                &runs,
                |a| heads.get(a).copied().flatten(),
                |author, seq, id| {
                    Ok(snapshot
                        .entry_at(author, seq)?
                        .is_some_and(|(_, held)| held == *id))
                },
            )
        })
        .await?
    }

    /// Stores the proof of an equivocation in `DATA_DIR/equivocations/AUTHOR-SEQ.records`, in
    /// the log record format: first the entry this node's log has at (`author`, `seq`), then
    /// the entries of the received `run` from `seq` on. The run ends at a signed entry whose
    /// signature covers, through the `prev` links, the conflicting entry, so the file can be
    /// checked by anyone holding the author's id. Returns `None` when no file was written: one
    /// already exists for that (author, seq), or [`PROOFS_MAX`] were written since start.
    async fn store_equivocation(
        &self,
        author: NodeId,
        seq: u64,
        run: &[SignedEntry],
    ) -> anyhow::Result<Option<PathBuf>> {
        let dir = self.node.data_dir.path().join(EQUIVOCATIONS_DIR);
        let path = dir.join(format!("{author}-{seq}.records"));
        if path.exists() || self.proofs.load(Ordering::Relaxed) >= PROOFS_MAX {
            return Ok(None);
        }
        // Ours is found by (author, seq) in the log lookup view: wait until it has caught up
        // with the log. The run was classified against heads the writer showed, which are
        // durable, so the views hold our entry at `seq` once they reach the durable LSN read
        // now.
        let durable = *self.node.durable.borrow();
        anyhow::ensure!(
            self.node.wait_indexed(durable).await,
            "the indexer has stopped"
        );
        let mut bytes = Vec::new();
        let received: Vec<Vec<u8>> = run
            .iter()
            .filter(|e| e.entry.seq >= seq)
            .map(SignedEntry::encode_payload)
            .collect();
        let indexes = self.node.indexes.clone();
        let log = self.node.data_dir.log();
        let ours = tokio::task::spawn_blocking(move || -> anyhow::Result<SignedEntry> {
            let snapshot = indexes.snapshot()?;
            let Some((lsn, id)) = snapshot.entry_at(&author, seq)? else {
                anyhow::bail!("the log has no entry {seq} of {author}");
            };
            let reader = LogReader::open(&log)?;
            let Some((_, e)) = reader.iter(lsn - 1, lsn)?.next().transpose()? else {
                anyhow::bail!("the log has no record {lsn}");
            };
            anyhow::ensure!(
                e.id == id,
                "record {lsn} holds {}, not entry {seq} of {author}",
                e.id
            );
            Ok(e)
        })
        .await??;
        encode_record(&ours.encode_payload(), &mut bytes);
        for payload in &received {
            encode_record(payload, &mut bytes);
        }
        // Counted before writing, so that failing writes cannot go on without bound either.
        if self.proofs.fetch_add(1, Ordering::Relaxed) >= PROOFS_MAX {
            return Ok(None);
        }
        let file = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            crate::auth::write_private(&file, &bytes)
        })
        .await??;
        Ok(Some(path))
    }

    /// Adds a peer at run time and starts dialling it.
    pub fn add_peer(
        self: &Arc<Self>,
        id: NodeId,
        addr: String,
        origin: PeerOrigin,
    ) -> Result<(), PeerError> {
        if id == self.node.node_id {
            return Err(PeerError::Itself);
        }
        let known = self.list.lock().expect("peer list lock").get(&id).is_some();
        self.list
            .lock()
            .expect("peer list lock")
            .add(id, addr, origin)?;
        if !known {
            self.spawn_dialer(id);
        }
        Ok(())
    }

    /// The address of peer `id` and how it came to be a peer, if it is one.
    pub fn peer(&self, id: &NodeId) -> Option<(String, PeerOrigin)> {
        self.list
            .lock()
            .expect("peer list lock")
            .entry(id)
            .map(|(addr, origin)| (addr.clone(), origin))
    }

    /// The address peers are served on, unless replication is detached.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// Removes a peer and closes its connection.
    pub fn remove_peer(&self, id: &NodeId) -> Result<bool, PeerError> {
        let was = self.list.lock().expect("peer list lock").remove(id)?;
        if let Some(s) = self.state.lock().expect("peer state lock").remove(id) {
            s.cancel.cancel();
            if let Some((conn, _, _)) = s.conn {
                conn.close(close::NOT_A_PEER.into(), b"removed from the peer list");
            }
        }
        Ok(was)
    }

    /// Each peer's status.
    pub fn status(&self) -> Vec<PeerStatus> {
        let ours: HashMap<NodeId, u64> = self.node.writer.version_vector().into_iter().collect();
        let list = self.list.lock().expect("peer list lock").clone();
        let state = self.state.lock().expect("peer state lock");
        list.iter()
            .map(|(id, addr, origin)| {
                let s = state.get(id);
                let theirs = s.map(|s| &s.theirs);
                let lack = |a: &HashMap<NodeId, u64>, b: &HashMap<NodeId, u64>| -> u64 {
                    a.iter()
                        .map(|(k, &v)| v.saturating_sub(b.get(k).copied().unwrap_or(0)))
                        .sum()
                };
                let empty = HashMap::new();
                let theirs = theirs.unwrap_or(&empty);
                PeerStatus {
                    node_id: *id,
                    addr: Some(addr.clone()),
                    connected: s.is_some_and(|s| s.connected),
                    since_ms: s.map_or(0, |s| s.since_ms),
                    sent: s.map_or(0, |s| s.sent),
                    received: s.map_or(0, |s| s.received),
                    they_lack: lack(&ours, theirs),
                    we_lack: lack(theirs, &ours),
                    origin,
                }
            })
            .collect()
    }

    /// Entries the send loops to `peer` have read from the log since start, sent or not.
    pub fn entries_read(&self, peer: &NodeId) -> u64 {
        self.state
            .lock()
            .expect("peer state lock")
            .get(peer)
            .map_or(0, |s| s.read)
    }

    /// Equivocations detected since start.
    pub fn equivocations(&self) -> u64 {
        self.equivocations.load(Ordering::Relaxed)
    }

    /// Entries refused, by reason.
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().expect("rejected lock").clone()
    }
}

/// Transport settings for peer connections: one unidirectional stream each way, keep-alives so
/// an idle sync stays up, and an idle timeout that ends a connection whose path has failed. Both
/// sides use the shorter of their two idle timeouts (this one, unless the acceptor's
/// `idle_timeout_ms` is set lower); it also bounds a handshake.
pub fn peer_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Two unidirectional streams carry the session; a bidirectional one a snapshot, which a
    // peer may ask of either side of the connection, whoever dialled it.
    t.max_concurrent_uni_streams(2u32.into())
        .max_concurrent_bidi_streams(1u32.into())
        .keep_alive_interval(Some(PEER_KEEP_ALIVE))
        .max_idle_timeout(Some(
            PEER_IDLE_TIMEOUT
                .try_into()
                .expect("the idle timeout fits QUIC's range"),
        ));
    t
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u16::from_le_bytes(b)
}
