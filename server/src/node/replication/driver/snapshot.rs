//! Snapshots over peer connections: a new node asks a peer for its key/value state
//! ([`Replication::fetch_snapshot`]), and every node answers such asks
//! ([`Replication::serve_snapshots`]). Each snapshot takes a bidirectional stream of the peer
//! connection of its own, beside the session's two unidirectional ones; a peer of an older
//! version never accepts it, and the asking node replays instead after its wait.
//!
//! The state sent is the kv view at a point of the sender's log where every author's chain
//! ends at a signed entry, so the receiver's sessions can bring its log to exactly that
//! version vector. The receiver recomputes the digest of the rows and refuses a snapshot whose
//! rows are malformed or out of order, or whose root is not the one announced; what the rows
//! are worth is decided later, by its own replay (`node::bootstrap`).

use std::time::Duration;

use kappakv_indexes::{Snapshot, StateLoadError, StateMeta, StateStore};
use kappakv_protocol::NodeId;
use kappakv_protocol::frame::Decoded;
use kappakv_protocol::peer::PeerMessage;

use super::stream::{read_message, write_message};
use crate::log::LogReader;
use crate::node::bootstrap::SNAPSHOT_FILE;
use crate::node::replication::Replication;

/// How long a failed fetch waits before it asks again on a live connection.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// How long either side waits for the other's next message.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of keys and values one `SnapshotRows` message carries, besides the key that crosses
/// the line: well inside a frame.
const PAGE_BYTES: usize = 1024 * 1024;
/// How many times the sender looks for a point of its log where every chain ends signed
/// before it gives up, and how long it waits between looks.
const SIGNED_POINT_TRIES: u32 = 100;
const SIGNED_POINT_WAIT: Duration = Duration::from_millis(20);

/// Why a fetch failed.
enum FetchError {
    /// The peer sent something no honest peer sends.
    Lied(String),
    /// The connection, the stream, or this node failed.
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for FetchError {
    fn from(e: E) -> Self {
        Self::Failed(e.into())
    }
}

/// The next message of a snapshot.
async fn next(recv: &mut quinn::RecvStream) -> Result<PeerMessage, FetchError> {
    match tokio::time::timeout(MESSAGE_TIMEOUT, read_message(recv)).await {
        Err(_) => Err(FetchError::Failed(anyhow::anyhow!(
            "the peer sent nothing for {MESSAGE_TIMEOUT:?}"
        ))),
        Ok(Err(e)) => Err(FetchError::Failed(e)),
        Ok(Ok(None)) => Err(FetchError::Failed(anyhow::anyhow!(
            "the peer ended the snapshot before its end"
        ))),
        Ok(Ok(Some(Decoded::UnknownKind(kind)))) => Err(FetchError::Lied(format!(
            "a {kind} message inside a snapshot"
        ))),
        Ok(Ok(Some(Decoded::Message(m)))) => Ok(m),
    }
}

impl Replication {
    /// Answers snapshot requests on the bidirectional streams `conn`'s peer opens, one at a
    /// time, until the connection ends.
    pub(super) async fn serve_snapshots(self: std::sync::Arc<Self>, conn: quinn::Connection) {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            match self.serve_snapshot(&mut send, &mut recv).await {
                Ok(keys) => tracing::info!(keys, "sent a snapshot of the key/value state"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not send a snapshot");
                    let _ = send.reset(0u32.into());
                }
            }
        }
    }

    async fn serve_snapshot(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> anyhow::Result<u64> {
        match tokio::time::timeout(MESSAGE_TIMEOUT, read_message(recv)).await?? {
            Some(Decoded::Message(PeerMessage::SnapshotRequest)) => {}
            _ => anyhow::bail!("a stream that does not ask for a snapshot"),
        }
        let snapshot = self.signed_point().await?;
        let (snapshot, start) = tokio::task::spawn_blocking(move || {
            let start = (|| -> anyhow::Result<PeerMessage> {
                Ok(PeerMessage::SnapshotStart {
                    version_vector: snapshot.version_vector()?,
                    state_root: snapshot.state_digest()?.root(),
                    digest_version: kappakv_indexes::digest::DIGEST_VERSION,
                    keys: snapshot.kv_keys()?,
                })
            })();
            (snapshot, start)
        })
        .await?;
        write_message(send, &start?).await?;
        let mut snapshot = snapshot;
        let mut after: Option<Vec<u8>> = None;
        let mut keys = 0u64;
        loop {
            let (back, page) = tokio::task::spawn_blocking(move || {
                let page = snapshot.state_rows(after.as_deref(), PAGE_BYTES);
                (snapshot, page)
            })
            .await?;
            snapshot = back;
            let (rows, more) = page?;
            after = rows.last().map(|(k, _)| k.clone());
            keys += rows.len() as u64;
            let rows = rows
                .into_iter()
                .map(|(k, v)| (serde_bytes::ByteBuf::from(k), v))
                .collect();
            write_message(send, &PeerMessage::SnapshotRows { rows }).await?;
            if !more {
                break;
            }
        }
        write_message(send, &PeerMessage::SnapshotEnd).await?;
        send.finish()?;
        Ok(keys)
    }

    /// A snapshot of the views at a point of the log where every author's chain ends at a
    /// signed entry (the end of a group commit is one), with the kv and log lookup views at
    /// the same LSN.
    async fn signed_point(&self) -> anyhow::Result<Snapshot> {
        for _ in 0..SIGNED_POINT_TRIES {
            let durable = *self.node.durable.borrow();
            anyhow::ensure!(
                self.node.wait_indexed(durable).await,
                "the indexer has stopped"
            );
            let indexes = self.node.indexes.clone();
            let log = self.node.data_dir.log();
            let found = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Snapshot>> {
                let snapshot = indexes.snapshot()?;
                if snapshot.kv_applied_lsn()? != snapshot.log_lookup_applied_lsn()? {
                    return Ok(None);
                }
                let reader = LogReader::open(&log)?;
                for (author, seq) in snapshot.version_vector()? {
                    let Some(lsn) = snapshot.author_seq_lsn(&author, seq)? else {
                        return Ok(None);
                    };
                    let Some((_, head)) = reader.iter(lsn - 1, lsn)?.next().transpose()? else {
                        return Ok(None);
                    };
                    if head.signature.is_none() {
                        return Ok(None);
                    }
                }
                Ok(Some(snapshot))
            })
            .await??;
            if let Some(snapshot) = found {
                return Ok(snapshot);
            }
            tokio::time::sleep(SIGNED_POINT_WAIT).await;
        }
        anyhow::bail!("found no point of the log where every chain ends signed")
    }

    /// Asks `peer` for a snapshot over `conn` and loads it; the bootstrap then answers reads
    /// from it. Called once [`crate::node::bootstrap::Bootstrap::start_fetch`] said so.
    pub(super) async fn fetch_snapshot(&self, mut conn: quinn::Connection, mut peer: NodeId) {
        let bootstrap = &self.node.bootstrap;
        loop {
            tracing::info!(peer = %peer.short(), "asking the peer for a snapshot of its key/value state");
            match self.fetch(&conn, peer).await {
                Ok((store, meta)) => {
                    bootstrap.loaded(store, meta, &self.node.writer.version_vector());
                    return;
                }
                Err(FetchError::Lied(why)) => bootstrap.fetch_failed(&peer, true, &why),
                Err(FetchError::Failed(e)) => {
                    bootstrap.fetch_failed(&peer, false, &format!("{e:#}"));
                }
            }
            // The connection may have given way to another one with the same peer (both
            // sides dialled), or another peer may be up: ask on a live connection while the
            // wait lasts.
            tokio::time::sleep(RETRY_AFTER).await;
            let live: Vec<(NodeId, quinn::Connection)> = self
                .state
                .lock()
                .expect("peer state lock")
                .iter()
                .filter_map(|(id, s)| {
                    let (conn, _, _) = s.conn.as_ref()?;
                    conn.close_reason().is_none().then(|| (*id, conn.clone()))
                })
                .collect();
            let Some(next) = live.into_iter().find(|(p, _)| bootstrap.start_fetch(p)) else {
                return;
            };
            (peer, conn) = next;
        }
    }

    async fn fetch(
        &self,
        conn: &quinn::Connection,
        peer: NodeId,
    ) -> Result<(StateStore, StateMeta), FetchError> {
        // A peer that allows no stream for it (an older version) never lets it open.
        let (mut send, mut recv) = tokio::time::timeout(MESSAGE_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| anyhow::anyhow!("the peer opened no stream for a snapshot"))??;
        write_message(&mut send, &PeerMessage::SnapshotRequest).await?;
        let PeerMessage::SnapshotStart {
            version_vector,
            state_root,
            keys,
            digest_version,
        } = next(&mut recv).await?
        else {
            return Err(FetchError::Lied("a snapshot that does not start".into()));
        };
        if digest_version != kappakv_indexes::digest::DIGEST_VERSION {
            return Err(FetchError::Failed(anyhow::anyhow!(
                "the peer's state digest is version {digest_version}, this node's {}",
                kappakv_indexes::digest::DIGEST_VERSION
            )));
        }
        let meta = StateMeta {
            peer,
            version_vector,
            root: state_root,
            keys,
        };
        tracing::info!(keys, entries = meta.entries(), "receiving a snapshot");
        let path = self.node.data_dir.path().join(SNAPSHOT_FILE);
        let mut store = tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
            StateStore::create(&path).map_err(anyhow::Error::from)
        })
        .await??;
        let loaded = |r: Result<(), StateLoadError>| match r {
            Ok(()) => Ok(()),
            Err(
                e @ (StateLoadError::Order
                | StateLoadError::Malformed(_)
                | StateLoadError::Root { .. }),
            ) => Err(FetchError::Lied(e.to_string())),
            Err(e) => Err(FetchError::Failed(e.into())),
        };
        loop {
            match next(&mut recv).await? {
                PeerMessage::SnapshotRows { rows } => {
                    let rows: Vec<_> = rows.into_iter().map(|(k, v)| (k.into_vec(), v)).collect();
                    let (back, result) = tokio::task::spawn_blocking(move || {
                        let result = store.load(&rows);
                        (store, result)
                    })
                    .await?;
                    store = back;
                    loaded(result)?;
                }
                PeerMessage::SnapshotEnd => break,
                _ => {
                    return Err(FetchError::Lied(
                        "a message that is not part of a snapshot".into(),
                    ));
                }
            }
        }
        let meta_done = meta.clone();
        let (store, result) = tokio::task::spawn_blocking(move || {
            let result = store.finish(&meta_done);
            (store, result)
        })
        .await?;
        loaded(result)?;
        Ok((store, meta))
    }
}
