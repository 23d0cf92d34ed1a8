//! `kappakv rebuild-indexes`: drops views and regenerates them from the log, offline.
//!
//! Safe to interrupt: each batch commits with its view checkpoints, so an interrupted rebuild
//! leaves views that are exact up to their checkpoint, and the next start (or run) resumes
//! from there.

use std::fmt;
use std::time::{Duration, Instant};

use kappakv_indexes::Indexes;

use super::progress::Progress;
use crate::config::Config;
use crate::node::DataDir;
use crate::node::indexer::{IndexError, all_views, catch_up};

/// Entries per rebuild transaction. Large transactions are much faster in redb, and each one
/// commits durably so that the pages the previous one freed can be reused.
const REBUILD_BATCH: usize = 100_000;

/// What a rebuild did.
#[derive(Debug)]
pub struct RebuildSummary {
    /// Views rebuilt.
    pub views: Vec<String>,
    /// Entries applied.
    pub entries: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl fmt::Display for RebuildSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "rebuilt {} from {} entries in {secs:.2}s ({:.0} entries/s)",
            self.views.join(", "),
            self.entries,
            self.entries as f64 / secs.max(1e-9)
        )
    }
}

/// The rebuild failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The log.
    #[error(transparent)]
    Log(#[from] crate::log::OpenLogError),
    /// Opening the indexes.
    #[error("indexes: {0}")]
    Open(#[from] kappakv_indexes::OpenViewError),
    /// A declared secondary index.
    #[error("index definition: {0}")]
    IndexDef(#[from] kappakv_indexes::IndexDefError),
    /// Applying.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// No view of that name.
    #[error("no index named `{name}`; known: {known}")]
    UnknownIndex {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
}

/// Rebuilds every view, or the one named, from the log in `config.data_dir`.
pub fn run(config: &Config, only: Option<&str>) -> Result<RebuildSummary, RebuildError> {
    let data_dir = DataDir(config.data_dir.clone());
    let reader = crate::log::LogReader::open(&data_dir.log()).map_err(IndexError::from)?;
    let upto = reader.last_lsn().map_err(IndexError::from)?;
    // The same views as the node: the declared secondary indexes of the same config, so
    // `--index` takes their names and a rebuild never drops them as undeclared.
    let (indexes, _) = Indexes::open_with_cache(
        data_dir.indexes(),
        kappakv_indexes::configured_views(&config.index)?,
        config.index_cache_bytes,
    )?;
    let names: Vec<String> = indexes
        .view_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    // A declared index is named as in the config (`posts_by_tag`) or as its view
    // (`idx.posts_by_tag`).
    let only = only.map(|name| {
        if config.index.iter().any(|d| d.name == name) {
            kappakv_indexes::tables::secondary_view_name(name)
        } else {
            name.to_string()
        }
    });
    let only = only.as_deref();
    if let Some(name) = only
        && !names.iter().any(|n| n == name)
    {
        return Err(RebuildError::UnknownIndex {
            name: name.to_string(),
            known: names.join(", "),
        });
    }
    indexes.rebuild(only).map_err(IndexError::from)?;
    let views: Vec<String> = only.map_or(names, |n| vec![n.to_string()]);
    let started = Instant::now();
    let progress = Progress::new("rebuild", "entries", upto);
    let applied = catch_up(
        &indexes,
        &reader,
        0,
        upto,
        REBUILD_BATCH,
        true,
        &all_views,
        |lsn| {
            progress.update(lsn);
        },
    )?;
    indexes.persist().map_err(IndexError::from)?;
    progress.finish();
    Ok(RebuildSummary {
        views,
        entries: applied,
        elapsed: started.elapsed(),
    })
}
