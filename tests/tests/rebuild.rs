//! The indexes are derived: after `rm indexes.redb` and `kappakv rebuild-indexes`, and after a
//! view's definition version changes (which makes the node rebuild it on start), a real
//! `kappakv serve` process gives exactly the answers it gave before: every get (values and
//! context), a full scan, and history.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use kappakv_client::{Batch, Client, GetResult, ScanOptions};
use kappakv_indexes::{ApplyError, View};
use kappakv_protocol::{KeyVersions, Version};
use kappakv_tests::{ProcessNode, command, free_udp_port, run};

const KEYS: usize = 300;
const WRITERS: usize = 8;
const PUTS_PER_WRITER: usize = 300;

fn key(i: usize) -> String {
    format!("key/{i:03}")
}

/// Everything the node answers about the data.
#[derive(Debug, PartialEq, Eq)]
struct Answers {
    /// `get` of every key written, deleted or not.
    gets: Vec<GetResult>,
    /// A full scan.
    scan: Vec<KeyVersions>,
    /// `history` of every seventh key.
    histories: Vec<Vec<Version>>,
}

async fn answers(client: &Client) -> anyhow::Result<Answers> {
    let mut gets = Vec::new();
    for i in 0..KEYS {
        gets.push(client.get(key(i)).await?);
    }
    let mut scan = Vec::new();
    let mut stream = client.scan(ScanOptions::all().page_size(37));
    while let Some(kv) = stream.next().await {
        scan.push(kv?);
    }
    let mut histories = Vec::new();
    for i in (0..KEYS).step_by(7) {
        histories.push(client.history(key(i), 1000).await?);
    }
    Ok(Answers {
        gets,
        scan,
        histories,
    })
}

/// A few thousand entries: overwrites from concurrent writers, deletes, batches, siblings made
/// with a shared stale context (puts and a delete), and one merge.
async fn write_workload(node: &ProcessNode) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = node.client().await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..PUTS_PER_WRITER {
                let k = (w * 37 + i * 11) % KEYS;
                client.put(key(k), format!("{w}/{i}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let client = node.client().await?;
    for i in (0..KEYS).step_by(9) {
        client.delete(key(i)).await?;
    }
    for b in 0..100 {
        let mut batch = Batch::new();
        for j in 0..5 {
            let k = (b * 13 + j * 59) % KEYS;
            batch = if (b + j) % 4 == 0 {
                batch.delete(key(k))
            } else {
                batch.put(key(k), format!("batch {b} op {j}"))
            };
        }
        client.batch(batch).await?;
    }
    // Siblings: writers that read the same context and each wrote over it.
    for i in (5..KEYS).step_by(23) {
        let stale = client.get(key(i)).await?.context;
        client.put_with(key(i), "sibling a", &stale).await?;
        client.put_with(key(i), "sibling b", &stale).await?;
        if i % 2 == 0 {
            // A delete concurrent with the puts: they survive it.
            client.delete_with(key(i), &stale).await?;
        }
    }
    // One merge of siblings back into a single value.
    let merged = client.get(key(5)).await?;
    client.put_with(key(5), "merged", &merged.context).await?;
    Ok(())
}

/// `kappakv rebuild-indexes --data-dir D`, checked to succeed with a one-line summary.
async fn rebuild_offline(data_dir: &Path, entries: u64) -> anyhow::Result<()> {
    let out = run(
        command("kappakv")?
            .arg("rebuild-indexes")
            .arg("--data-dir")
            .arg(data_dir),
        Duration::from_secs(120),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rebuild-indexes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = stdout.lines().collect();
    assert_eq!(summary.len(), 1, "one summary line: {stdout}");
    assert!(summary[0].starts_with("rebuilt "), "{stdout}");
    assert!(
        summary[0].contains(&format!(" {entries} entries")),
        "the summary counts the {entries} entries of the log: {stdout}"
    );
    Ok(())
}

/// A built-in view under a definition version one past the code's.
struct NextVersion(Box<dyn View>);

impl View for NextVersion {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn version(&self) -> u64 {
        self.0.version() + 1
    }

    fn tables(&self) -> Vec<&str> {
        self.0.tables()
    }

    fn apply(
        &self,
        txn: &redb::WriteTransaction,
        batch: &kappakv_indexes::Batch<'_>,
    ) -> Result<(), ApplyError> {
        self.0.apply(txn, batch)
    }
}

/// The names of the built-in views.
fn view_names() -> Vec<String> {
    kappakv_indexes::default_views()
        .iter()
        .map(|v| v.name().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_identical_after_rebuilding_the_indexes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let logs = tempfile::tempdir()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let indexes = data_dir.join("indexes.redb");

    let mut node = ProcessNode::start(&data_dir, addr).await?;
    write_workload(&node).await?;
    let client = node.client().await?;
    let before = answers(&client).await?;
    let entries = client.status().await?.log_lsn;
    client.close().await;
    assert!(entries > 2_500, "a few thousand entries, got {entries}");
    // The workload left every kind of state behind, or the comparison proves little.
    assert!(before.gets.iter().any(GetResult::has_siblings));
    assert!(before.gets.iter().any(|g| g.values.len() == 1));
    assert!(
        before
            .gets
            .iter()
            .any(|g| g.values.is_empty() && !g.context.0.is_empty()),
        "deleted keys"
    );
    assert!(
        before
            .gets
            .iter()
            .any(|g| g.values.len() > 1 && g.context.0.len() > g.values.len()),
        "siblings next to a concurrent tombstone"
    );
    assert!(before.histories.iter().all(|h| h.len() > 1));
    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));

    // 1. rm indexes.redb; kappakv rebuild-indexes.
    std::fs::remove_file(&indexes)?;
    rebuild_offline(&data_dir, entries).await?;
    assert!(indexes.is_file());
    let log = logs.path().join("after-rebuild.log");
    let mut node = ProcessNode::start_logged(&data_dir, addr, &log).await?;
    let client = node.client().await?;
    assert_eq!(answers(&client).await?, before, "after rebuild-indexes");
    client.close().await;
    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));
    let text = std::fs::read_to_string(&log)?;
    assert!(
        !text.contains("from the log"),
        "the offline rebuild left nothing for the node to rebuild:\n{text}"
    );

    // 2. Every view's stored definition version differs from the code's.
    {
        let bumped: Vec<Box<dyn View>> = kappakv_indexes::default_views()
            .into_iter()
            .map(|v| Box::new(NextVersion(v)) as Box<dyn View>)
            .collect();
        let (opened, report) = kappakv_indexes::Indexes::open(&indexes, bumped)?;
        assert_eq!(report.needs_rebuild().count(), view_names().len());
        drop(opened);
    }
    let log = logs.path().join("after-version-change.log");
    let mut node = ProcessNode::start_logged(&data_dir, addr, &log).await?;
    let client = node.client().await?;
    assert_eq!(answers(&client).await?, before, "after a version change");
    client.close().await;
    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));
    let text = std::fs::read_to_string(&log)?;
    for name in view_names() {
        assert!(
            text.lines()
                .any(|l| l.contains("definition changed") && l.contains(&format!("view={name}"))),
            "the node logs that it rebuilds view {name}:\n{text}"
        );
    }
    Ok(())
}
