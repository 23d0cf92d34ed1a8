//! The peer list: peers given by flag or config (for this run) and peers added or joined at run
//! time (kept in `DATA_DIR/peers`, one `NODEID@HOST:PORT [ORIGIN]` per line, across restarts).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kappakv_protocol::{NodeId, PeerOrigin};

use crate::net::peer_spec;

/// Peer id → address to dial, and how it came to be a peer.
#[derive(Debug, Clone, Default)]
pub struct PeerList {
    peers: BTreeMap<NodeId, (String, PeerOrigin)>,
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
                peers.insert(id, (addr, PeerOrigin::Configured));
            }
        }
        // A saved address wins (`peer add` may have moved a configured peer); a peer in the
        // configuration stays configured.
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let (spec, origin) = line.split_once(' ').unwrap_or((line, "added"));
                    match (peer_spec(spec), origin.trim().parse()) {
                        (Some((id, addr)), Ok(saved)) => {
                            let origin = match (peers.get(&id), saved) {
                                (Some((_, PeerOrigin::Configured)), _) => PeerOrigin::Configured,
                                // Saved while configured, and no longer in the configuration:
                                // it stays, as a peer added at run time would.
                                (None, PeerOrigin::Configured) => PeerOrigin::Added,
                                (_, saved) => saved,
                            };
                            peers.insert(id, (addr, origin));
                        }
                        _ => {
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
        self.peers.get(id).map(|(addr, _)| addr)
    }

    /// The address of `id` and how it came to be a peer, if it is one.
    pub fn entry(&self, id: &NodeId) -> Option<(&String, PeerOrigin)> {
        self.peers.get(id).map(|(addr, origin)| (addr, *origin))
    }

    /// Every peer, its address and how it came to be a peer.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &String, PeerOrigin)> {
        self.peers
            .iter()
            .map(|(id, (addr, origin))| (id, addr, *origin))
    }

    /// Adds or updates a peer and saves the list.
    pub fn add(&mut self, id: NodeId, addr: String, origin: PeerOrigin) -> std::io::Result<()> {
        self.peers.insert(id, (addr, origin));
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
        for (id, (addr, origin)) in &self.peers {
            let _ = writeln!(text, "{id}@{addr} {}", origin.as_str());
        }
        crate::auth::write_private(&self.file, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_kept_and_a_configured_peer_stays_configured() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (NodeId([1; 32]), NodeId([2; 32]), NodeId([3; 32]));
        // A line from before origins were kept reads as added.
        std::fs::write(dir.path().join("peers"), format!("{c}@127.0.0.1:3\n")).unwrap();
        let configured = [format!("{a}@127.0.0.1:1")];
        let mut list = PeerList::load(dir.path(), &configured).unwrap();
        list.add(b, "127.0.0.1:2".into(), PeerOrigin::Joined)
            .unwrap();
        list.add(a, "127.0.0.1:9".into(), PeerOrigin::Added)
            .unwrap();
        let reloaded = PeerList::load(dir.path(), &configured).unwrap();
        assert_eq!(
            PeerList::load(dir.path(), &[])
                .unwrap()
                .entry(&a)
                .map(|(_, o)| o),
            Some(PeerOrigin::Added),
            "a peer no longer configured"
        );
        let seen: Vec<(NodeId, String, PeerOrigin)> = reloaded
            .iter()
            .map(|(id, addr, origin)| (*id, addr.clone(), origin))
            .collect();
        assert_eq!(
            seen,
            [
                (a, "127.0.0.1:9".to_string(), PeerOrigin::Configured),
                (b, "127.0.0.1:2".to_string(), PeerOrigin::Joined),
                (c, "127.0.0.1:3".to_string(), PeerOrigin::Added),
            ]
        );
    }
}
