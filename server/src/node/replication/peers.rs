//! The peer list: peers given by flag or config (for this run) and peers added at run time
//! (kept in `DATA_DIR/peers`, one `NODEID@HOST:PORT` per line, across restarts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kappakv_protocol::NodeId;

use crate::net::peer_spec;

/// Peer id → address to dial.
#[derive(Debug, Clone, Default)]
pub struct PeerList {
    peers: BTreeMap<NodeId, String>,
    file: PathBuf,
}

impl PeerList {
    /// The configured peers plus those saved in `data_dir/peers`. Malformed saved lines are
    /// skipped with a warning.
    pub fn load(data_dir: &Path, configured: &[String]) -> std::io::Result<Self> {
        let file = data_dir.join("peers");
        let mut peers = BTreeMap::new();
        for spec in configured {
            if let Some((id, addr)) = peer_spec(spec) {
                peers.insert(id, addr);
            }
        }
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    match peer_spec(line) {
                        Some((id, addr)) => {
                            peers.insert(id, addr);
                        }
                        None => {
                            tracing::warn!(file = %file.display(), line, "skipping a malformed peer line");
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Self { peers, file })
    }

    /// The address of `id`, if it is a peer.
    pub fn get(&self, id: &NodeId) -> Option<&String> {
        self.peers.get(id)
    }

    /// Every peer.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &String)> {
        self.peers.iter()
    }

    /// Adds or updates a peer and saves the list.
    pub fn add(&mut self, id: NodeId, addr: String) -> std::io::Result<()> {
        self.peers.insert(id, addr);
        self.save()
    }

    /// Removes a peer and saves the list. Returns whether it was there.
    pub fn remove(&mut self, id: &NodeId) -> std::io::Result<bool> {
        let was = self.peers.remove(id).is_some();
        self.save()?;
        Ok(was)
    }

    fn save(&self) -> std::io::Result<()> {
        let mut text = String::new();
        for (id, addr) in &self.peers {
            text.push_str(&id.to_string());
            text.push('@');
            text.push_str(addr);
            text.push('\n');
        }
        crate::auth::write_private(&self.file, text.as_bytes())
    }
}
