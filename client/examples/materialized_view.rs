//! A view of your own, derived from the node's log: the hyperlog-index pattern.
//!
//! The log is the truth; this program tails it (`watch` from an LSN), keeps what it derives
//! (here: how many keys with a value each prefix before the first `/` has) in a file together
//! with the LSN it has applied, and on the next run resumes right after that LSN. Delete the
//! file and it rebuilds the view from the start of the log: no migrations.
//!
//! ```sh
//! cargo run -p kappakv-client --example materialized_view -- view.json [TICKET]
//! ```
//!
//! It stops once it has caught up with the node's log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use kappakv_client::Client;

/// What the view holds: the keys that have a value, and the last LSN applied.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct View {
    lsn: u64,
    keys: BTreeSet<String>,
}

impl View {
    fn counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for key in &self.keys {
            let prefix = key.split('/').next().unwrap_or_default();
            *counts.entry(prefix).or_default() += 1;
        }
        counts
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: materialized_view FILE [TICKET]")?;
    let client = Client::connect(&common::ticket(2)?).await?;
    let mut view: View = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => View::default(),
        Err(e) => return Err(e.into()),
    };
    let from = view.lsn;
    let until = client.status().await?.log_lsn;

    // Every change after `from`: replayed from the log, then live.
    let mut changes = client.watch("", Some(from));
    let mut applied = 0;
    loop {
        // Once caught up, stop when nothing more comes for a moment (the last entry's changes
        // arrive together).
        let next = if view.lsn >= until {
            match tokio::time::timeout(Duration::from_millis(500), changes.try_next()).await {
                Ok(next) => next?,
                Err(_) => break,
            }
        } else {
            changes.try_next().await?
        };
        let Some(change) = next else { break };
        let key = common::text(Some(&change.key));
        if change.version.value.is_some() {
            view.keys.insert(key);
        } else {
            view.keys.remove(&key);
        }
        view.lsn = change.lsn;
        applied += 1;
    }

    // The view and its LSN together, replacing the file whole.
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&view)?)?;
    std::fs::rename(&tmp, &path)?;

    println!(
        "applied {applied} changes after LSN {from}, through LSN {}",
        view.lsn
    );
    for (prefix, n) in view.counts() {
        println!("{prefix}: {n}");
    }
    Ok(())
}
