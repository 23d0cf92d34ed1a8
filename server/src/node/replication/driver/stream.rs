//! Peer sessions over a byte stream instead of a peer connection: a client stream
//! (`Request::Sync`: `kappactl sync --stdio` relaying another node, `kappactl import` handing in
//! export files) or standard input and output (`kappakv sync --stdio` on a stopped node).
//!
//! The session is the one peer connections run ([`SyncSession`], [`Replication::ingest`]):
//! each side says `Hello` with its version vector, sends the entries of its log the other
//! lacks in log order, and verifies what it receives exactly as from a peer. A session that is
//! not live ends once each side has sent what it held when they met: each says `Synced`
//! after its last entry, and the node, once it has taken in everything before the other
//! side's `Synced`, reports what it took in (`Taken`) and closes its side. A stream cut
//! anywhere leaves nothing unverified appended: only runs a verified signature covers are.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use kappakv_protocol::frame::{Decoded, FRAME_HEADER_LEN, decode_message, encode_frame, frame_len};
use kappakv_protocol::limits::{MAX_ENTRY_BYTES, MAX_FRAME_BYTES};
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::{Lsn, NodeId, SignedEntry};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{PENDING_BYTES_MAX, Replication, SEND_CHUNK, SEND_CHUNK_BYTES};
use crate::log::LogReader;
use crate::node::replication::session::{Runs, SyncSession};

/// Most sessions through client streams at once; more are answered `Busy`. Each buffers up to
/// [`PENDING_BYTES_MAX`] of unsigned entries and a frame.
pub const STREAM_SESSIONS_MAX: usize = 8;

/// What a session over a stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMode {
    /// Send the entries the other side lacks.
    pub send: bool,
    /// Take in the entries the other side sends; otherwise they are counted as refused.
    pub receive: bool,
    /// Go on with new entries instead of ending once each side has sent what it had.
    pub live: bool,
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

/// Reads one peer message; `None` when the stream ends between frames.
async fn read_message(
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

async fn write_message(tx: &mut (impl AsyncWrite + Unpin), m: &PeerMessage) -> anyhow::Result<()> {
    tx.write_all(&encode_frame(m)).await?;
    tx.flush().await?;
    Ok(())
}

impl Replication {
    /// A place for one more session through a client stream, if there is room.
    pub fn stream_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    /// Runs one session over `rx` and `tx` (see the module doc), ending when it is synced (not
    /// live), when the other side goes away or breaks the protocol, or at `cancel`.
    pub async fn serve_stream(
        self: &Arc<Self>,
        rx: impl AsyncRead + Unpin + Send,
        tx: impl AsyncWrite + Unpin + Send,
        mode: StreamMode,
        cancel: &CancellationToken,
    ) -> anyhow::Result<StreamSummary> {
        let (mut rx, mut tx) = (rx, tx);
        // The other side of a stream is not identified: the session's peer is this node.
        let session = Mutex::new(SyncSession::new(
            self.node.node_id,
            PENDING_BYTES_MAX,
            self.writers.clone(),
        ));
        write_message(
            &mut tx,
            &PeerMessage::Hello {
                version_vector: self.node.writer.version_vector(),
            },
        )
        .await?;
        let their_vv = match read_message(&mut rx).await? {
            Some(Decoded::Message(PeerMessage::Hello { version_vector })) => version_vector,
            Some(_) => anyhow::bail!("the other side did not start with hello"),
            None => anyhow::bail!("the other side closed the stream before its hello"),
        };
        let own = their_vv
            .iter()
            .find(|(author, _)| *author == self.node.node_id)
            .map_or(0, |(_, seq)| *seq);
        self.node.peer_holds_own_chain(&"a sync stream", own);
        session.lock().expect("session lock").on_hello(&their_vv);
        // What this node held when the two sides met: a session that is not live sends that.
        let until = (!mode.live).then(|| *self.node.durable.borrow());

        let mut summary = StreamSummary::default();
        // Either side failing ends the session: a live send never ends by itself, and a send
        // held up by a reader that went away must not outlive the stream.
        let (sent_authors, received) = {
            let send = self.send_stream(&mut tx, &session, mode, until, &mut summary.sent, cancel);
            let recv = self.receive_stream(&mut rx, &session, mode, cancel);
            tokio::try_join!(send, recv)?
        };
        summary.sent_authors = sent_authors;
        summary.received = received.entries;
        summary.received_authors = received.authors;
        summary.appended = received.appended;
        summary.present = received.present;
        summary.refused = received.refused;
        if !mode.live {
            write_message(
                &mut tx,
                &PeerMessage::Taken {
                    appended: summary.appended,
                    present: summary.present,
                    refused: summary.refused,
                },
            )
            .await?;
            tx.shutdown().await?;
        }
        tracing::info!(%summary, "sync stream ended");
        Ok(summary)
    }

    /// Sends the entries the other side lacks, then `Synced` once past `until`; returns how
    /// many authors the entries sent had.
    async fn send_stream(
        &self,
        tx: &mut (impl AsyncWrite + Unpin),
        session: &Mutex<SyncSession>,
        mode: StreamMode,
        until: Option<Lsn>,
        sent: &mut u64,
        cancel: &CancellationToken,
    ) -> anyhow::Result<usize> {
        let mut authors: HashSet<NodeId> = HashSet::new();
        if mode.send {
            let reader = Arc::new(LogReader::open(&self.node.data_dir.log())?);
            let mut durable = self.node.durable.clone();
            let mut at: Lsn = self.resume_after(session).await?;
            loop {
                let head = (*durable.borrow_and_update()).min(until.unwrap_or(Lsn::MAX));
                if at >= head {
                    if until.is_some() {
                        break;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(authors.len()),
                        r = durable.changed() => r?,
                    }
                    continue;
                }
                let upto = head.min(at + SEND_CHUNK);
                let r = reader.clone();
                let (entries, read_to) =
                    tokio::task::spawn_blocking(move || read_chunk(&r, at, upto)).await??;
                at = read_to;
                let mut frame: Vec<ByteBuf> = Vec::new();
                let mut bytes = 0usize;
                for e in &entries {
                    if !session.lock().expect("session lock").should_send(e) {
                        continue;
                    }
                    let payload = e.encode_payload();
                    if !frame.is_empty() && bytes + payload.len() > MAX_ENTRY_BYTES {
                        write_message(
                            tx,
                            &PeerMessage::Entries {
                                payloads: std::mem::take(&mut frame),
                            },
                        )
                        .await?;
                        bytes = 0;
                    }
                    bytes += payload.len();
                    *sent += 1;
                    authors.insert(e.entry.author);
                    frame.push(ByteBuf::from(payload));
                }
                if !frame.is_empty() {
                    write_message(tx, &PeerMessage::Entries { payloads: frame }).await?;
                }
            }
        }
        if !mode.live {
            write_message(tx, &PeerMessage::Synced).await?;
        }
        Ok(authors.len())
    }

    /// Takes in what the other side sends until its `Synced` (not live) or the end of the
    /// stream.
    async fn receive_stream(
        &self,
        rx: &mut (impl AsyncRead + Unpin),
        session: &Mutex<SyncSession>,
        mode: StreamMode,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Taken> {
        let mut out = Taken::default();
        let mut authors: HashSet<NodeId> = HashSet::new();
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => anyhow::bail!("the node is shutting down"),
                m = read_message(rx) => m?,
            };
            let message = match message {
                Some(Decoded::Message(m)) => m,
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
                    let mut runs = Runs::default();
                    for payload in payloads {
                        let entry = match SignedEntry::decode_payload(&payload) {
                            Ok(e) => e,
                            Err(e) => {
                                self.reject("malformed", &e.to_string());
                                out.refused += 1;
                                continue;
                            }
                        };
                        authors.insert(entry.entry.author);
                        let run = session
                            .lock()
                            .expect("session lock")
                            .receive(entry, payload.len());
                        match run {
                            Ok(None) => {}
                            Ok(Some(run)) => runs.push(run),
                            Err(refusal) => {
                                self.reject(refusal.reason(), &refusal.to_string());
                                out.refused += 1;
                            }
                        }
                    }
                    let ingested = self.ingest(None, runs.take()).await?;
                    out.appended += ingested.appended;
                    out.present += ingested.present;
                    out.refused += ingested.refused;
                }
                PeerMessage::Synced if !mode.live => {
                    // What waits unsigned now never will be covered: refused.
                    out.refused += session.lock().expect("session lock").pending_len() as u64;
                    break;
                }
                PeerMessage::Hello { .. } => anyhow::bail!("the other side sent a second hello"),
                _ => {}
            }
        }
        out.authors = authors.len();
        Ok(out)
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
