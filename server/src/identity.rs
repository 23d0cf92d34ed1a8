//! The node identity: the ed25519 key in `DATA_DIR/identity.key`.
//!
//! The file holds exactly the 32 raw bytes of the secret key, nothing else, and must be readable
//! by its owner only (mode 0600). It is created on first start and reused after; it is never
//! rewritten. Creation writes a temporary file with mode 0600 set when it is opened, syncs it,
//! renames it into place and syncs the directory, so a crash leaves either no key or a whole one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kappakv_protocol::Keypair;

/// File name of the key in the data dir.
pub const IDENTITY_FILE: &str = "identity.key";
/// Bytes in the key file.
pub const IDENTITY_FILE_LEN: u64 = 32;
/// Mode of a new key file.
const IDENTITY_MODE: u32 = 0o600;
/// Permission bits that must be clear: any access by group or others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// The key file cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading the key file failed.
    #[error("reading the node key {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the key file (or the data dir) failed.
    #[error("creating the node key {path}: {source}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The key file is not 32 bytes long.
    #[error(
        "node key {path} is {len} bytes long, expected {IDENTITY_FILE_LEN}; restore it from a backup, or remove it to make this a new node"
    )]
    WrongSize {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// Group or others may access the key file.
    #[error("node key {path} has mode {mode:o}, readable beyond its owner; run `chmod 600 {path}`")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key path is not a regular file.
    #[error("node key {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
}

/// Loads the node key from `data_dir`, creating the dir and a new random key if there is none.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    match load_or_generate(data_dir)? {
        Ok(keypair) => Ok(keypair),
        Err(new) => new.save(data_dir),
    }
}

/// Loads the key at `path`, refusing a file of the wrong size or with loose permissions.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let read_err = |source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(IdentityError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() != IDENTITY_FILE_LEN {
        return Err(IdentityError::WrongSize {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut secret = [0u8; IDENTITY_FILE_LEN as usize];
    file.read_exact(&mut secret).map_err(read_err)?;
    Ok(Keypair::from_secret(secret))
}

/// A node key not yet written anywhere: `serve --join` proves it to the inviting node first,
/// and [`NewIdentity::save`] keeps it only once the join was taken.
pub struct NewIdentity {
    secret: [u8; IDENTITY_FILE_LEN as usize],
}

impl NewIdentity {
    /// A new random key.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut secret = [0u8; IDENTITY_FILE_LEN as usize];
        getrandom::fill(&mut secret).map_err(|e| IdentityError::Create {
            path: PathBuf::from(IDENTITY_FILE),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Self { secret })
    }

    /// Its key pair.
    pub fn keypair(&self) -> Keypair {
        Keypair::from_secret(self.secret)
    }

    /// Writes it into `data_dir`, creating the dir.
    pub fn save(self, data_dir: &Path) -> Result<Keypair, IdentityError> {
        store(data_dir, &data_dir.join(IDENTITY_FILE), self.secret)
    }
}

/// The node key of `data_dir` if it has one, else a new one not yet written.
pub fn load_or_generate(data_dir: &Path) -> Result<Result<Keypair, NewIdentity>, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load(&path).map(Ok),
        Err(e) if e.kind() == io::ErrorKind::NotFound => NewIdentity::generate().map(Err),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn store(
    data_dir: &Path,
    path: &Path,
    secret: [u8; IDENTITY_FILE_LEN as usize],
) -> Result<Keypair, IdentityError> {
    let create_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| IdentityError::Create { path: p, source }
    };
    fs::create_dir_all(data_dir).map_err(create_err(data_dir))?;
    let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
    // A leftover from a crashed creation may have any mode; start afresh.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(create_err(&tmp)(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(IDENTITY_MODE)
        .open(&tmp)
        .map_err(create_err(&tmp))?;
    file.write_all(&secret).map_err(create_err(&tmp))?;
    file.sync_all().map_err(create_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(create_err(path))?;
    File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(create_err(data_dir))?;
    let keypair = Keypair::from_secret(secret);
    tracing::info!(node = %keypair.node_id(), path = %path.display(), "created a new node key");
    Ok(keypair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let a = load_or_create(&data).unwrap();
        let path = data.join(IDENTITY_FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), IDENTITY_FILE_LEN);
        let b = load_or_create(&data).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert!(!data.join(format!("{IDENTITY_FILE}.tmp")).exists());
    }

    #[test]
    fn loose_permissions_and_wrong_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [1u8; 31]).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::WrongSize { len: 31, .. }),
            "{err}"
        );
    }
}
