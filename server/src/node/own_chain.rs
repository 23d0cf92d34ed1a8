//! Whether this node may write under its own id. Its log must hold its own chain as far as any
//! peer does: a node whose log lost its tail (restored from an older backup) would otherwise
//! write seqs its peers already hold, and every later entry of it would be an equivocation.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kappakv_protocol::NodeId;

use super::DataDir;
use super::writer::WriterHandle;
use crate::config::Config;

/// Whether this node may write under its own id: its log must hold its own chain as far as any
/// peer does. Fed by peers' hellos and by entries of its own chain received back.
pub struct OwnChainGuard {
    node_id: NodeId,
    writer: Arc<WriterHandle>,
    accept_chain_loss: bool,
    /// [`OWN_CHAIN_UNCONFIRMED`] in the data dir.
    marker_path: PathBuf,
    /// Whether the marker is there; it goes once the node holds its own chain as far as its
    /// peers do.
    marker: AtomicBool,
}

impl OwnChainGuard {
    /// The guard of the node `node_id` writing through `writer` in `data_dir`: holds the
    /// writer's local writes when the data dir says its log may lack the end of the chain.
    pub(super) fn open(
        node_id: NodeId,
        writer: Arc<WriterHandle>,
        data_dir: &DataDir,
        config: &Config,
    ) -> Self {
        let marker = hold_writes_if_restored(data_dir, config, &writer);
        Self {
            node_id,
            writer,
            accept_chain_loss: config.accept_chain_loss,
            marker_path: data_dir.path().join(OWN_CHAIN_UNCONFIRMED),
            marker: AtomicBool::new(marker),
        }
    }

    /// A peer said, in its hello, that it holds this node's own chain up to `seq`. Local
    /// writes are held while the log has less of it (they would fork the chain); a node
    /// restored from a backup learns here how far its chain goes.
    pub fn peer_holds(&self, peer: &dyn std::fmt::Display, seq: u64) {
        let have = self.writer.head(&self.node_id).map_or(0, |h| h.seq);
        if self.accept_chain_loss {
            if seq > have {
                tracing::warn!(
                    %peer, have, peer_holds = seq,
                    "a peer holds more of this node's own chain than its log, and accept_chain_loss is set: new local entries fork the chain, and peers refuse them"
                );
            }
            return;
        }
        let was_unknown = self.writer.own_chain_unknown();
        if let Some(required) = self.writer.peer_holds_own(seq) {
            tracing::warn!(
                %peer, have, peer_holds = required,
                "a peer holds more of this node's own chain than its log: local writes are held until the node has received it"
            );
            return;
        }
        if was_unknown {
            tracing::info!(%peer, have, peer_holds = seq, "a peer confirmed how far this node's own chain goes: local writes resume");
        }
        self.received();
    }

    /// Called after entries from a peer were appended: once local writes are no longer held,
    /// the data dir's marker of an unconfirmed chain goes (a restart then holds nothing).
    pub fn received(&self) {
        if !self.marker.load(Ordering::Acquire) || self.writer.own_writes_held() {
            return;
        }
        self.marker.store(false, Ordering::Release);
        match std::fs::remove_file(&self.marker_path) {
            Ok(()) => tracing::info!(
                "this node holds its own chain as far as its peers do: local writes resume"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.marker_path.display(), error = %e, "could not remove the marker of an unconfirmed chain");
            }
        }
    }
}

/// A file in the data dir saying that its log may lack the end of the node's own chain, which
/// peers may hold: `kappakv restore` writes it. While it is there the node holds local writes
/// until a peer has said how far the chain goes and the log reaches that; the first peer that
/// confirms the chain removes it.
pub const OWN_CHAIN_UNCONFIRMED: &str = "own-chain-unconfirmed";

/// Holds the writer's local writes when the data dir says its log may lack the end of the
/// node's own chain, unless the operator accepted that loss.
/// Returns whether it did.
fn hold_writes_if_restored(data_dir: &DataDir, config: &Config, writer: &WriterHandle) -> bool {
    let marker = data_dir.path().join(OWN_CHAIN_UNCONFIRMED);
    if !marker.exists() {
        return false;
    }
    let have = writer.head(&writer.node_id()).map_or(0, |h| h.seq);
    if config.accept_chain_loss {
        tracing::warn!(
            have,
            "this data dir was restored and accept_chain_loss is set: the node writes under its id without knowing how far peers hold its chain; if they hold more, they refuse its new entries as equivocations"
        );
        if let Err(e) = std::fs::remove_file(&marker) {
            tracing::warn!(path = %marker.display(), error = %e, "could not remove the marker of an unconfirmed chain");
        }
        return false;
    }
    writer.hold_own_writes();
    tracing::warn!(
        have,
        peers = config.peers.len(),
        "this data dir was restored from a backup: local writes are held until a peer confirms or sends back this node's own chain (start with --accept-chain-loss to write anyway)"
    );
    true
}
