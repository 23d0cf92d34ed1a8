//! Invites this node made: each secret makes one node a peer, before it expires (that node may
//! show it again, should its first answer be lost). Kept in `DATA_DIR/invites` (mode 0600) as
//! the BLAKE3 hash of each secret, its expiry and the node that used it, so a restart keeps
//! them and the file alone does not let anyone join.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kappakv_protocol::{InviteSecret, NodeId};

/// The invites file in the data dir.
pub const INVITES_FILE: &str = "invites";

/// Longest an invite may live.
pub const EXPIRES_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why an invite was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// Not one of this node's, or used by another node.
    #[error("the invite was used already, or this node never made it")]
    Unknown,
    /// Made here, and expired.
    #[error("the invite expired; ask for a new one (`kappactl peer invite`)")]
    Expired,
    /// The invites file could not be written.
    #[error("saving the invites ({path}): {source}")]
    Save {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An invite this node made.
#[derive(Debug, Clone, Copy)]
struct Made {
    /// BLAKE3 hash of the secret.
    hash: [u8; 32],
    /// Expiry, Unix milliseconds.
    expires: u64,
    /// The node that joined with it, once one has: the same node may show it again (its
    /// first answer lost) until it expires; any other is refused.
    used_by: Option<NodeId>,
}

/// The invites a node has made, until they expire.
#[derive(Debug)]
pub struct Invites {
    file: PathBuf,
    made: Mutex<Vec<Made>>,
}

impl Invites {
    /// The invites kept in `data_dir`; malformed lines are skipped.
    pub fn load(data_dir: &Path) -> Self {
        let file = data_dir.join(INVITES_FILE);
        let made = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let hash: InviteSecret = parts.next()?.parse().ok()?;
                let expires = parts.next()?.parse().ok()?;
                let used_by = match parts.next() {
                    Some(id) => Some(id.parse().ok()?),
                    None => None,
                };
                Some(Made {
                    hash: hash.0,
                    expires,
                    used_by,
                })
            })
            .collect();
        Self {
            file,
            made: Mutex::new(made),
        }
    }

    /// A new invite's secret, valid for `lifetime` (at most [`EXPIRES_MAX`]).
    pub fn create(&self, lifetime: Duration) -> Result<InviteSecret, InviteError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random numbers");
        let expires = crate::unix_now_ms() + lifetime.min(EXPIRES_MAX).as_millis() as u64;
        let mut made = self.made.lock().expect("invites lock");
        made.push(Made {
            hash: *blake3::hash(&secret).as_bytes(),
            expires,
            used_by: None,
        });
        self.save(&mut made)?;
        Ok(InviteSecret(secret))
    }

    /// Takes the invite of `secret` for `joiner`: the first node to show it joins, and may
    /// show it again until it expires; any other node is refused.
    pub fn take(&self, secret: &InviteSecret, joiner: NodeId) -> Result<(), InviteError> {
        let hash = *blake3::hash(secret.as_bytes()).as_bytes();
        let mut made = self.made.lock().expect("invites lock");
        let Some(invite) = made.iter_mut().find(|m| m.hash == hash) else {
            return Err(InviteError::Unknown);
        };
        if invite.expires < crate::unix_now_ms() {
            return Err(InviteError::Expired);
        }
        match invite.used_by {
            Some(by) if by == joiner => Ok(()),
            Some(_) => Err(InviteError::Unknown),
            None => {
                invite.used_by = Some(joiner);
                self.save(&mut made)
            }
        }
    }

    /// Writes the invites, forgetting expired ones.
    fn save(&self, made: &mut Vec<Made>) -> Result<(), InviteError> {
        let now = crate::unix_now_ms();
        made.retain(|m| m.expires >= now);
        let mut text = String::new();
        for m in made.iter() {
            let _ = write!(text, "{} {}", InviteSecret(m.hash), m.expires);
            if let Some(by) = m.used_by {
                let _ = write!(text, " {by}");
            }
            text.push('\n');
        }
        crate::auth::write_private(&self.file, text.as_bytes()).map_err(|source| {
            InviteError::Save {
                path: self.file.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invite_admits_one_node_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (joiner, other) = (NodeId([1; 32]), NodeId([2; 32]));
        let invites = Invites::load(dir.path());
        let secret = invites.create(Duration::from_secs(60)).unwrap();
        let reloaded = Invites::load(dir.path());
        reloaded.take(&secret, joiner).unwrap();
        // The same node again (its answer lost), also after a restart; no other node.
        reloaded.take(&secret, joiner).unwrap();
        assert!(matches!(
            reloaded.take(&secret, other),
            Err(InviteError::Unknown)
        ));
        let again = Invites::load(dir.path());
        again.take(&secret, joiner).unwrap();
        assert!(matches!(
            again.take(&secret, other),
            Err(InviteError::Unknown)
        ));
        assert!(matches!(
            again.take(&InviteSecret([9; 32]), joiner),
            Err(InviteError::Unknown)
        ));
        let file = std::fs::read_to_string(dir.path().join(INVITES_FILE)).unwrap();
        assert!(!file.contains(&secret.to_string()), "only hashes are kept");
    }

    #[test]
    fn an_expired_invite_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = InviteSecret([5; 32]);
        let hash = InviteSecret(*blake3::hash(secret.as_bytes()).as_bytes());
        std::fs::write(dir.path().join(INVITES_FILE), format!("{hash} 1\n")).unwrap();
        let invites = Invites::load(dir.path());
        assert!(matches!(
            invites.take(&secret, NodeId([1; 32])),
            Err(InviteError::Expired)
        ));
    }
}
