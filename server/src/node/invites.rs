//! Invites this node made: each secret makes its holder a peer once, before it expires. Kept in
//! `DATA_DIR/invites` (mode 0600) as the BLAKE3 hash of each secret and its expiry, so a
//! restart keeps them and the file alone does not let anyone join.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kappakv_protocol::InviteSecret;

/// The invites file in the data dir.
pub const INVITES_FILE: &str = "invites";

/// Longest an invite may live.
pub const EXPIRES_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why an invite was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// Not one of this node's, or already used.
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

/// The invites a node has made and not yet seen used.
#[derive(Debug)]
pub struct Invites {
    file: PathBuf,
    /// (hash of the secret, expiry in Unix milliseconds).
    open: Mutex<Vec<([u8; 32], u64)>>,
}

impl Invites {
    /// The invites kept in `data_dir`; malformed lines are skipped.
    pub fn load(data_dir: &Path) -> Self {
        let file = data_dir.join(INVITES_FILE);
        let open = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (hash, expires) = line.split_once(' ')?;
                let hash: InviteSecret = hash.parse().ok()?;
                Some((hash.0, expires.trim().parse().ok()?))
            })
            .collect();
        Self {
            file,
            open: Mutex::new(open),
        }
    }

    /// A new invite's secret, valid for `lifetime` (at most [`EXPIRES_MAX`]).
    pub fn create(&self, lifetime: Duration) -> Result<InviteSecret, InviteError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random numbers");
        let expires = crate::unix_now_ms() + lifetime.min(EXPIRES_MAX).as_millis() as u64;
        let mut open = self.open.lock().expect("invites lock");
        open.push((*blake3::hash(&secret).as_bytes(), expires));
        self.save(&mut open)?;
        Ok(InviteSecret(secret))
    }

    /// Takes the invite of `secret`: it is used up whether or not it was still valid.
    pub fn take(&self, secret: &InviteSecret) -> Result<(), InviteError> {
        let hash = *blake3::hash(secret.as_bytes()).as_bytes();
        let mut open = self.open.lock().expect("invites lock");
        let Some(i) = open.iter().position(|(h, _)| *h == hash) else {
            return Err(InviteError::Unknown);
        };
        let (_, expires) = open.remove(i);
        self.save(&mut open)?;
        if expires < crate::unix_now_ms() {
            return Err(InviteError::Expired);
        }
        Ok(())
    }

    /// Writes the open invites, forgetting expired ones.
    fn save(&self, open: &mut Vec<([u8; 32], u64)>) -> Result<(), InviteError> {
        let now = crate::unix_now_ms();
        open.retain(|(_, expires)| *expires >= now);
        let mut text = String::new();
        for (hash, expires) in open.iter() {
            text.push_str(&InviteSecret(*hash).to_string());
            text.push(' ');
            text.push_str(&expires.to_string());
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
    fn an_invite_is_taken_once_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let invites = Invites::load(dir.path());
        let secret = invites.create(Duration::from_secs(60)).unwrap();
        let reloaded = Invites::load(dir.path());
        reloaded.take(&secret).unwrap();
        assert!(matches!(reloaded.take(&secret), Err(InviteError::Unknown)));
        assert!(matches!(
            Invites::load(dir.path()).take(&secret),
            Err(InviteError::Unknown)
        ));
        let file = std::fs::read_to_string(dir.path().join(INVITES_FILE)).unwrap();
        assert!(!file.contains(&secret.to_string()), "only hashes are kept");
    }

    #[test]
    fn an_expired_invite_is_refused_and_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let secret = InviteSecret([5; 32]);
        let hash = InviteSecret(*blake3::hash(secret.as_bytes()).as_bytes());
        std::fs::write(dir.path().join(INVITES_FILE), format!("{hash} 1\n")).unwrap();
        let invites = Invites::load(dir.path());
        assert!(matches!(invites.take(&secret), Err(InviteError::Expired)));
        assert!(matches!(invites.take(&secret), Err(InviteError::Unknown)));
    }
}
