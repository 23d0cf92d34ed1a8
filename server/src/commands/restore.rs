//! `kappakv restore`: makes a new data dir from a backup taken by `kappakv backup`.
//!
//! The data dir must be missing or empty: a restore never mixes a backup with other data.
//! Every file is copied and synced, the directories too, and the restored log is then checked
//! with `kappakv verify`'s checks. No index is restored: the node rebuilds its views from the
//! log when it starts.

use std::path::{Path, PathBuf};

use super::backup::{
    BackupError, FORMAT, IDENTITY_FILES, MANIFEST_FILE, Manifest, is_missing_or_empty, sync_dir,
    write_file,
};

/// The restore could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The data dir exists and is not empty.
    #[error("data dir {path} exists and is not empty; restore only into a new or empty directory")]
    DataDirNotEmpty {
        /// The data dir.
        path: PathBuf,
    },
    /// The backup has no manifest: it is not a backup, or it was not finished.
    #[error(
        "{path} is not a complete backup: {MANIFEST_FILE} is missing (it is written last, so the backup did not finish)"
    )]
    NoManifest {
        /// The backup directory.
        path: PathBuf,
    },
    /// The manifest cannot be read.
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A file of the backup does not match its manifest.
    #[error("{path} is {actual} bytes; the manifest says {expected}: the backup is damaged")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its length in the manifest.
        expected: u64,
        /// Its length on disk.
        actual: u64,
    },
    /// Copying.
    #[error(transparent)]
    Copy(#[from] BackupError),
    /// The restored log does not verify.
    #[error("the restored log does not verify: {0}")]
    Verify(#[from] super::verify::VerifyLogError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| {
        RestoreError::Copy(BackupError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Reads the manifest of the backup in `backup`.
pub fn read_manifest(backup: &Path) -> Result<Manifest, RestoreError> {
    let path = backup.join(MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RestoreError::NoManifest {
                path: backup.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| RestoreError::Manifest {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if manifest.format != FORMAT {
        return Err(RestoreError::Manifest {
            path,
            message: format!(
                "backup format {} is not {FORMAT}, the one this kappakv reads",
                manifest.format
            ),
        });
    }
    Ok(manifest)
}

/// Restores the backup in `backup` into the new or empty data dir `data_dir`.
pub fn run(backup: &Path, data_dir: &Path) -> Result<Manifest, RestoreError> {
    run_observed(backup, data_dir, &mut |_, _| {})
}

/// A reader that tells `progress` the bytes read through it so far.
struct Counted<'a, R> {
    inner: R,
    read: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.progress)(self.read);
        Ok(n)
    }
}

/// Restores like [`run`], telling `progress` the bytes of the log handled so far (copied,
/// then verified) out of those to handle.
pub fn run_observed(
    backup: &Path,
    data_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, RestoreError> {
    let manifest = read_manifest(backup)?;
    let log_bytes: u64 = manifest.segments.iter().map(|(_, len)| len).sum();
    let total = 2 * log_bytes;
    let mut copied = 0;
    if !is_missing_or_empty(data_dir).map_err(io_err(data_dir))? {
        return Err(RestoreError::DataDirNotEmpty {
            path: data_dir.to_path_buf(),
        });
    }
    let from_log = crate::log::log_dir(backup);
    let to_log = crate::log::log_dir(data_dir);
    std::fs::create_dir_all(&to_log).map_err(io_err(&to_log))?;
    for (name, len) in &manifest.segments {
        // Segment names come from a file: only plain segment names are used as paths.
        if crate::log::segment::parse_segment_name(name).is_none() {
            return Err(RestoreError::Manifest {
                path: backup.join(MANIFEST_FILE),
                message: format!("`{name}` is not a segment name"),
            });
        }
        let from = from_log.join(name);
        let actual = std::fs::metadata(&from).map_err(io_err(&from))?.len();
        if actual != *len {
            return Err(RestoreError::Size {
                path: from,
                expected: *len,
                actual,
            });
        }
        let to = to_log.join(name);
        let mut input = Counted {
            inner: std::fs::File::open(&from).map_err(io_err(&from))?,
            read: 0,
            progress: &mut |n| progress(copied + n, total),
        };
        let mut output = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
            .map_err(io_err(&to))?;
        std::io::copy(&mut input, &mut output).map_err(io_err(&to))?;
        output.sync_all().map_err(io_err(&to))?;
        copied += len;
    }
    sync_dir(&to_log)?;
    for (name, _, secret) in IDENTITY_FILES {
        if !manifest.files.iter().any(|f| f == name) {
            continue;
        }
        let from = backup.join(name);
        let bytes = std::fs::read(&from).map_err(io_err(&from))?;
        write_file(&data_dir.join(name), &bytes, secret)?;
    }
    // The node's peers may hold later entries of its chain than the backup: it must not write
    // under its id until one has said how far the chain goes.
    write_file(
        &data_dir.join(crate::node::OWN_CHAIN_UNCONFIRMED),
        b"restored from a backup: local writes wait until a peer confirms how far this node's chain goes\n",
        false,
    )?;
    sync_dir(data_dir)?;
    if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    if !manifest.segments.is_empty() {
        super::verify::run_observed(data_dir, &mut |done, _| progress(copied + done, total))?;
    }
    progress(total, total);
    Ok(manifest)
}
