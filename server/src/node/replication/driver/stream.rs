//! The session loop every transport runs: a peer connection's two QUIC streams, a client
//! stream (`Request::Sync`: `kappactl sync --stdio` relaying another node, `kappactl import`
//! handing in export files) and standard input and output (`kappakv sync --stdio` on a stopped
//! node). The transport only moves bytes; what to send, what to take in and how to classify it
//! is the sans-IO [`SyncSession`] and [`session::plan`](crate::node::replication::session::plan),
//! and appends go through [`Replication::ingest`] to the writer.
//!
//! Each side says `Hello` with its version vector, then sends, from the first entry the other
//! lacks and in log order, what the other lacks, and verifies what it receives. A live session
//! (peer connections) goes on with new entries until the stream ends. A session that is not
//! live ends once each side has sent what it held when they met: each says `Synced` after its
//! last entry, and the node, once it has taken in everything before the other side's `Synced`,
//! reports what it took in (`Taken`) and closes its side. A stream cut anywhere leaves nothing
//! unverified appended: only runs a verified signature covers are.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kappakv_protocol::frame::{Decoded, FRAME_HEADER_LEN, decode_message, encode_frame, frame_len};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::{Lsn, NodeId, SignedEntry};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{Ingested, PENDING_BYTES_MAX, Replication, SEND_CHUNK, SEND_CHUNK_BYTES};
use crate::log::LogReader;
use crate::node::replication::session::SyncSession;

/// Most sessions through client streams at once; more are answered `Busy`. Each buffers up to
/// [`PENDING_BYTES_MAX`] of unsigned entries and a frame.
pub const STREAM_SESSIONS_MAX: usize = 8;

/// How long a session waits for the other side's hello: a stream that says nothing holds one of
/// the few places for sessions through clients. Long enough for a relay that first has to set
/// up its own connection (ssh).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session over a stream that is not live waits for the other side to send a frame
/// or to take one: such a session holds a place until it is synced, so one the other side lets
/// stall is ended.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames whose released runs wait to be appended while the next one is read, decoded and
/// verified, besides the runs being appended. Each holds at most a frame's entries, so a
/// session holds at most this many frames more than when it waited for each append.
const INGEST_QUEUE: usize = 2;

/// What a session over a stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMode {
    /// Send the entries the other side lacks.
    pub send: bool,
    /// Take in the entries the other side sends; otherwise they are counted as refused.
    pub receive: bool,
    /// Go on with new entries instead of ending once each side has sent what it had.
    pub live: bool,
    /// At the end of a session that is not live, send `Taken`: for the client that relays
    /// the session (`kappactl`), which reads it and passes nothing of it on.
    pub report: bool,
}

/// What a session over a stream did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Entries sent.
    pub sent: u64,
    /// Authors of the entries sent.
    pub sent_authors: usize,
    /// Entries received.
    pub received: u64,
    /// Authors of the entries received.
    pub received_authors: usize,
    /// Received entries appended to the log.
    pub appended: u64,
    /// Received entries the log already had.
    pub present: u64,
    /// Received entries refused.
    pub refused: u64,
}

impl std::fmt::Display for StreamSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} entries ({} authors), received {} entries ({} authors): {} new, {} already present, {} refused",
            self.sent,
            self.sent_authors,
            self.received,
            self.received_authors,
            self.appended,
            self.present,
            self.refused
        )
    }
}

/// `op`, failing after `idle` when set.
async fn bounded<O>(
    idle: Option<Duration>,
    op: impl Future<Output = anyhow::Result<O>>,
) -> anyhow::Result<O> {
    match idle {
        None => op.await,
        Some(after) => tokio::time::timeout(after, op)
            .await
            .map_err(|_| anyhow::anyhow!("the other side did nothing for {after:?}"))?,
    }
}

/// Reads one peer message; `None` when the stream ends between frames.
pub(super) async fn read_message(
    rx: &mut (impl AsyncRead + Unpin),
) -> anyhow::Result<Option<Decoded<PeerMessage>>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = rx.read(&mut header[got..]).await?;
        if n == 0 {
            anyhow::ensure!(got == 0, "the stream ended inside a frame header");
            return Ok(None);
        }
        got += n;
    }
    let len = frame_len(header, MAX_FRAME_BYTES)?;
    let mut body = vec![0u8; len];
    rx.read_exact(&mut body).await?;
    Ok(Some(decode_message::<PeerMessage>(&body)?))
}

pub(super) async fn write_message(
    tx: &mut (impl AsyncWrite + Unpin),
    m: &PeerMessage,
) -> anyhow::Result<()> {
    tx.write_all(&encode_frame(m)).await?;
    tx.flush().await?;
    Ok(())
}

impl Replication {
    /// A place for one more session through a client stream, if there is room.
    pub fn stream_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// Runs one session for a client stream or standard input and output (see the module
    /// doc), ending when it is synced (not live), when the other side goes away or breaks the
    /// protocol, or at `cancel`.
    pub async fn serve_stream(
        self: &Arc<Self>,
        rx: impl AsyncRead + Unpin + Send,
        tx: impl AsyncWrite + Unpin + Send,
        mode: StreamMode,
        cancel: &CancellationToken,
    ) -> anyhow::Result<StreamSummary> {
        let summary = self
            .run_stream(async { Ok(rx) }, tx, mode, None, cancel)
            .await?;
        tracing::info!(%summary, "sync stream ended");
        Ok(summary)
    }

    /// Runs one session over `tx` and the reader `rx` yields once the other side's stream is
    /// there (a QUIC peer's stream arrives with its first bytes, which may wait for this side's
    /// hello). `peer` is the peer connection's node id, whose status this session keeps; `None`
    /// for a stream whose other side is not identified.
    pub(super) async fn run_stream<R: AsyncRead + Unpin + Send>(
        &self,
        rx: impl Future<Output = anyhow::Result<R>> + Send,
        tx: impl AsyncWrite + Unpin + Send,
        mode: StreamMode,
        peer: Option<NodeId>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<StreamSummary> {
        let mut tx = tx;
        let session = Mutex::new(SyncSession::new(
            peer.unwrap_or(self.node.node_id),
            PENDING_BYTES_MAX,
            self.writers.clone(),
        ));
        // The two hellos cross: over a pair of pipes, writing ours before reading theirs could
        // block both sides on full pipes.
        let ours = PeerMessage::Hello {
            version_vector: self.node.writer.version_vector(),
        };
        let hellos = async {
            let theirs = async {
                let mut rx = rx.await?;
                let first = read_message(&mut rx).await?;
                anyhow::Ok((rx, first))
            };
            tokio::try_join!(write_message(&mut tx, &ours), theirs)
        };
        let ((), (mut rx, first)) =
            tokio::time::timeout(HELLO_TIMEOUT, hellos)
                .await
                .map_err(|_| {
                    anyhow::anyhow!("no hello from the other side within {HELLO_TIMEOUT:?}")
                })??;
        let their_vv = match first {
            Some(Decoded::Message(PeerMessage::Hello { version_vector })) => version_vector,
            Some(_) => anyhow::bail!("the other side did not start with hello"),
            None => anyhow::bail!("the other side closed the stream before its hello"),
        };
        // Only an authenticated peer says how far this node's own chain goes: the other side
        // of a stream could be anyone with a ticket, read-only ones included.
        if let Some(peer) = &peer {
            let own = their_vv
                .iter()
                .find(|(author, _)| *author == self.node.node_id)
                .map_or(0, |(_, seq)| *seq);
            self.node.own_chain.peer_holds(peer, own);
        }
        session.lock().expect("session lock").on_hello(&their_vv);
        self.note_theirs(peer, &session);
        // What this node held when the two sides met: a session that is not live sends that.
        let until = (!mode.live).then(|| *self.node.durable.borrow());

        let mut summary = StreamSummary::default();
        let idle = (peer.is_none() && !mode.live).then_some(STREAM_IDLE_TIMEOUT);
        let send = self.send_stream(
            &mut tx,
            &session,
            mode,
            until,
            (peer, idle),
            &mut summary,
            cancel,
        );
        let recv = self.receive_stream(&mut rx, &session, mode, (peer, idle), cancel);
        let taken = if mode.live {
            // A live send ends only at `cancel`; the session ends with the stream.
            tokio::select! {
                r = send => { r?; Taken::default() }
                r = recv => r?,
            }
        } else {
            // Both sides must finish, and either failing ends the session.
            tokio::try_join!(send, recv)?.1
        };
        summary.received = taken.entries;
        summary.received_authors = taken.authors;
        summary.appended = taken.appended;
        summary.present = taken.present;
        summary.refused = taken.refused;
        if mode.report && !mode.live {
            write_message(
                &mut tx,
                &PeerMessage::Taken {
                    appended: summary.appended,
                    present: summary.present,
                    refused: summary.refused,
                },
            )
            .await?;
        }
        if !mode.live {
            tx.shutdown().await?;
        }
        Ok(summary)
    }

    /// Keeps a peer's status up to date with what the session knows it has.
    fn note_theirs(&self, peer: Option<NodeId>, session: &Mutex<SyncSession>) {
        let Some(peer) = peer else {
            return;
        };
        let theirs = session
            .lock()
            .expect("session lock")
            .their_version_vector()
            .clone();
        self.state
            .lock()
            .expect("peer state lock")
            .entry(peer)
            .or_default()
            .theirs = theirs;
    }

    /// Sends the entries the other side lacks, from the first one it lacks, then `Synced` once
    /// past `until` (not live).
    #[allow(clippy::too_many_arguments)]
    async fn send_stream(
        &self,
        tx: &mut (impl AsyncWrite + Unpin),
        session: &Mutex<SyncSession>,
        mode: StreamMode,
        until: Option<Lsn>,
        (peer, idle): (Option<NodeId>, Option<Duration>),
        summary: &mut StreamSummary,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut authors: HashSet<NodeId> = HashSet::new();
        if mode.send {
            let reader = Arc::new(LogReader::open(&self.node.data_dir.log())?);
            let mut durable = self.node.durable.clone();
            let mut at: Lsn = self.resume_after(session).await?;
            tracing::debug!(
                lsn = at,
                "sending from the first entry the other side lacks"
            );
            loop {
                let head = (*durable.borrow_and_update()).min(until.unwrap_or(Lsn::MAX));
                if at >= head {
                    if until.is_some() {
                        break;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        r = durable.changed() => r?,
                    }
                    continue;
                }
                let upto = head.min(at + SEND_CHUNK);
                let r = reader.clone();
                let (entries, read_to) =
                    tokio::task::spawn_blocking(move || read_chunk(&r, at, upto)).await??;
                at = read_to;
                if let Some(peer) = peer {
                    let read = entries.len() as u64;
                    self.state
                        .lock()
                        .expect("peer state lock")
                        .entry(peer)
                        .or_default()
                        .read += read;
                    crate::telemetry::peer_entries_read(&peer, read);
                }
                let out = session.lock().expect("session lock").outgoing(&entries);
                for frame in &out.frames {
                    bounded(idle, write_message(tx, frame)).await?;
                }
                summary.sent += out.entries;
                authors.extend(out.authors);
                if out.entries > 0
                    && let Some(peer) = peer
                {
                    self.state
                        .lock()
                        .expect("peer state lock")
                        .entry(peer)
                        .or_default()
                        .sent += out.entries;
                    self.note_theirs(Some(peer), session);
                }
            }
        }
        summary.sent_authors = authors.len();
        if mode.live {
            // A live session that sends nothing ends with the stream, not here.
            cancel.cancelled().await;
        } else {
            bounded(idle, write_message(tx, &PeerMessage::Synced)).await?;
        }
        Ok(())
    }

    /// Takes in what the other side sends until its `Synced` (not live) or the end of the
    /// stream.
    ///
    /// Reading, decoding and verifying frames ([`read_frames`](Self::read_frames)) runs ahead of
    /// appending what they release ([`ingest_queued`](Self::ingest_queued)), by at most
    /// [`INGEST_QUEUE`] frames: the next frame is checked while the writer appends and syncs
    /// the runs before it. Runs are appended in the order released, so the log stays causal.
    /// An error appending ends the session at once; one reading ends it once the runs released
    /// before it are appended, as they were when each frame's runs were appended before the
    /// next frame was read.
    async fn receive_stream(
        &self,
        rx: &mut (impl AsyncRead + Unpin),
        session: &Mutex<SyncSession>,
        mode: StreamMode,
        (peer, idle): (Option<NodeId>, Option<Duration>),
        cancel: &CancellationToken,
    ) -> anyhow::Result<Taken> {
        let (released, queue) = tokio::sync::mpsc::channel(INGEST_QUEUE);
        let read = self.read_frames(rx, session, mode, (peer, idle), cancel, released);
        let ingest = self.ingest_queued(peer, queue);
        tokio::pin!(read, ingest);
        // Until the read side ends it holds the queue's sender, so the ingest side ends first
        // only on an error.
        let mut ingested = None;
        let read = loop {
            tokio::select! {
                r = &mut read => break r,
                r = &mut ingest, if ingested.is_none() => ingested = Some(r?),
            }
        };
        let ingested = match ingested {
            Some(i) => i,
            None => ingest.await?,
        };
        let mut out = read?;
        out.appended += ingested.appended;
        out.present += ingested.present;
        out.refused += ingested.refused;
        Ok(out)
    }

    /// Reads, decodes and verifies frames until the other side's `Synced` (not live) or the end
    /// of the stream, handing the runs each frame releases to `released`. Returns what it took
    /// in, less what appending them made of them.
    async fn read_frames(
        &self,
        rx: &mut (impl AsyncRead + Unpin),
        session: &Mutex<SyncSession>,
        mode: StreamMode,
        (peer, idle): (Option<NodeId>, Option<Duration>),
        cancel: &CancellationToken,
        released: tokio::sync::mpsc::Sender<Vec<Vec<SignedEntry>>>,
    ) -> anyhow::Result<Taken> {
        let mut out = Taken::default();
        let mut authors: HashSet<NodeId> = HashSet::new();
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => anyhow::bail!("the node is shutting down"),
                m = bounded(idle, read_message(rx)) => m?,
            };
            let message = match message {
                Some(Decoded::Message(m)) => m,
                // A newer peer's message: the session goes on without it.
                Some(Decoded::UnknownKind(kind)) => {
                    tracing::debug!(%kind, "ignoring a peer message of a kind this version does not know");
                    continue;
                }
                None if mode.live => break,
                None => anyhow::bail!("the stream ended before the other side was synced"),
            };
            match message {
                PeerMessage::Entries { payloads } => {
                    out.entries += payloads.len() as u64;
                    if !mode.receive {
                        out.refused += payloads.len() as u64;
                        continue;
                    }
                    let incoming = session.lock().expect("session lock").on_entries(&payloads);
                    drop(payloads);
                    authors.extend(incoming.authors);
                    for refusal in &incoming.refused {
                        self.reject(refusal.reason(), &refusal.to_string());
                    }
                    out.refused += incoming.refused.len() as u64;
                    self.note_theirs(peer, session);
                    if !incoming.runs.is_empty() {
                        released
                            .send(incoming.runs)
                            .await
                            .map_err(|_| anyhow::anyhow!("appending received entries stopped"))?;
                        // Lets the ingest side hand these runs to the writer now, if it is
                        // idle, rather than once this side next waits.
                        tokio::task::yield_now().await;
                    }
                }
                PeerMessage::Synced if !mode.live => {
                    // What waits unsigned now never will be covered: refused.
                    out.refused += session.lock().expect("session lock").pending_len() as u64;
                    break;
                }
                PeerMessage::Hello { .. } => anyhow::bail!("the other side sent a second hello"),
                _ => tracing::debug!("ignoring a peer message this session does not use"),
            }
        }
        out.authors = authors.len();
        Ok(out)
    }

    /// Appends the runs `queue` hands over, in the order released, until it closes. Runs that
    /// queued up while the writer was busy with the ones before go in one append, so a fast
    /// sender costs fewer syncs.
    async fn ingest_queued(
        &self,
        peer: Option<NodeId>,
        mut queue: tokio::sync::mpsc::Receiver<Vec<Vec<SignedEntry>>>,
    ) -> anyhow::Result<Ingested> {
        let mut total = Ingested::default();
        while let Some(mut runs) = queue.recv().await {
            while let Ok(more) = queue.try_recv() {
                runs.extend(more);
            }
            let ingested = self.ingest(peer, runs).await?;
            total.appended += ingested.appended;
            total.present += ingested.present;
            total.refused += ingested.refused;
        }
        Ok(total)
    }
}

/// What a stream session took in.
#[derive(Debug, Default)]
struct Taken {
    entries: u64,
    authors: usize,
    appended: u64,
    present: u64,
    refused: u64,
}

/// Reads the entries after `at` up to `upto`, stopping early past [`SEND_CHUNK_BYTES`] of keys
/// and values; returns them and the LSN read to.
pub(super) fn read_chunk(
    reader: &LogReader,
    at: Lsn,
    upto: Lsn,
) -> Result<(Vec<SignedEntry>, Lsn), crate::log::ReadLogError> {
    let mut entries: Vec<SignedEntry> = Vec::new();
    let mut bytes = 0;
    let mut read_to = at;
    for item in reader.iter(at, upto)? {
        let (lsn, e) = item?;
        bytes += e
            .entry
            .ops
            .iter()
            .map(|op| op.key().len() + op.value().map_or(0, <[u8]>::len))
            .sum::<usize>();
        read_to = lsn;
        entries.push(e);
        if bytes >= SEND_CHUNK_BYTES {
            break;
        }
    }
    Ok((entries, read_to))
}
