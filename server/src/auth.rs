//! Client tokens and the ticket file. The data dir holds `tokens` (one read-write and one
//! read-only token, created on first start, mode 0600) and `client.ticket` (the read-write
//! ticket for a local `kappactl`, mode 0600).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kappakv_protocol::{NodeId, Ticket};

/// What a connection may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads and writes.
    ReadWrite,
    /// Reads only.
    ReadOnly,
}

/// The node's client tokens.
#[derive(Clone)]
pub struct Tokens {
    read_write: String,
    read_only: String,
}

/// Tokens or the ticket could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokensError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tokens file is not two lines `rw TOKEN` and `ro TOKEN`.
    #[error(
        "{path}: expected the lines `rw TOKEN` and `ro TOKEN`; delete the file to make new tokens"
    )]
    Malformed {
        /// The file.
        path: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokensError + '_ {
    move |source| TokensError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` with mode 0600, replacing it atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn new_token(prefix: &str) -> String {
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).expect("the OS random source is available");
    format!("{prefix}_{}", data_encoding::HEXLOWER.encode(&raw))
}

impl Tokens {
    /// Reads `DATA_DIR/tokens`, creating it with fresh tokens on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, TokensError> {
        let path = data_dir.join("tokens");
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mut rw = None;
                let mut ro = None;
                for line in text.lines() {
                    match line.split_once(' ') {
                        Some(("rw", t)) => rw = Some(t.trim().to_string()),
                        Some(("ro", t)) => ro = Some(t.trim().to_string()),
                        _ => {}
                    }
                }
                match (rw, ro) {
                    (Some(read_write), Some(read_only))
                        if !read_write.is_empty() && !read_only.is_empty() =>
                    {
                        Ok(Self {
                            read_write,
                            read_only,
                        })
                    }
                    _ => Err(TokensError::Malformed {
                        path: path.display().to_string(),
                    }),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tokens = Self {
                    read_write: new_token("rw"),
                    read_only: new_token("ro"),
                };
                let text = format!("rw {}\nro {}\n", tokens.read_write, tokens.read_only);
                write_private(&path, text.as_bytes()).map_err(io_err(&path))?;
                Ok(tokens)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The role a presented token grants, if any. Compares in constant time.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        if constant_time_eq(token.as_bytes(), self.read_write.as_bytes()) {
            Some(Role::ReadWrite)
        } else if constant_time_eq(token.as_bytes(), self.read_only.as_bytes()) {
            Some(Role::ReadOnly)
        } else {
            None
        }
    }

    /// The ticket for `role`.
    pub fn ticket(
        &self,
        node_id: NodeId,
        addrs: Vec<kappakv_protocol::NodeAddr>,
        role: Role,
    ) -> Ticket {
        let token = match role {
            Role::ReadWrite => &self.read_write,
            Role::ReadOnly => &self.read_only,
        };
        Ticket {
            node_id,
            addrs,
            token: token.clone(),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Name of the read-write ticket file in the data dir, written by a serving node.
pub const TICKET_FILE: &str = "client.ticket";

/// Writes `DATA_DIR/client.ticket`.
pub fn write_ticket(data_dir: &Path, ticket: &Ticket) -> Result<(), TokensError> {
    let path = data_dir.join(TICKET_FILE);
    write_private(&path, format!("{ticket}\n").as_bytes()).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_persist_and_grant_roles() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::load_or_create(dir.path()).unwrap();
        let again = Tokens::load_or_create(dir.path()).unwrap();
        assert_eq!(again.role_of(&t.read_write), Some(Role::ReadWrite));
        assert_eq!(again.role_of(&t.read_only), Some(Role::ReadOnly));
        assert_eq!(again.role_of("rw_nope"), None);
        let mode = fs::metadata(dir.path().join("tokens"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
