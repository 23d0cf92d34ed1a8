//! Durability of acknowledged writes across a real `kappakv serve` process stopped with SIGTERM
//! or killed with SIGKILL: after a restart on the same data dir every acknowledged write is
//! there with its value and id, and `kappakv verify` accepts the log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_protocol::{EntryId, KeyVersions};
use kappakv_tests::{ProcessNode, command, free_udp_port, run};

const WRITERS: usize = 16;
const WRITES_PER_WRITER: usize = 125;

/// An acknowledged write: key → (value, id).
type Acked = BTreeMap<Vec<u8>, (Vec<u8>, EntryId)>;

/// Writers sharing one record of what the node acknowledged.
struct Load {
    acked: Arc<Mutex<Acked>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    /// Starts [`WRITERS`] tasks, each on its own connection, each writing up to `per_writer`
    /// unique keys one at a time. A task ends at its first error (the node is gone).
    async fn start(node: &ProcessNode, per_writer: usize) -> anyhow::Result<Self> {
        let acked = Arc::new(Mutex::new(Acked::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            // Short timeouts: after a SIGKILL nothing answers, and QUIC over UDP only notices
            // by silence.
            let client = Client::builder(node.ticket()?)
                .request_timeout(Duration::from_secs(2))
                .idle_timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await?;
            let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..per_writer {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{w:02}/{i:06}").into_bytes();
                    let value = format!("value of writer {w} write {i}").into_bytes();
                    let Ok(written) = client.put(&key, &value).await else {
                        break;
                    };
                    acked
                        .lock()
                        .expect("not poisoned")
                        .insert(key, (value, written.id));
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        Ok(Self {
            acked,
            count,
            stop,
            tasks,
        })
    }

    /// Waits until at least `n` writes were acknowledged.
    async fn wait_for(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count.load(Ordering::Relaxed) < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} writes acknowledged",
                self.count.load(Ordering::Relaxed)
            );
            if self.tasks.iter().all(tokio::task::JoinHandle::is_finished) {
                anyhow::bail!(
                    "writers ended after {} writes",
                    self.count.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the writers and returns every acknowledged write.
    async fn finish(self) -> anyhow::Result<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        let acked = self.acked.lock().expect("not poisoned").clone();
        Ok(acked)
    }
}

/// Every key the node has, with its current versions.
async fn scan_all(client: &Client) -> anyhow::Result<BTreeMap<Vec<u8>, KeyVersions>> {
    let mut all = BTreeMap::new();
    let mut scan = client.scan(ScanOptions::all());
    while let Some(kv) = scan.next().await {
        let kv = kv?;
        all.insert(kv.key.clone(), kv);
    }
    Ok(all)
}

/// Restarts the node on `data_dir`, checks that every acknowledged write is there with its value
/// and id and that at most `unacked_max` other keys were written, stops the node, and runs
/// `kappakv verify`.
async fn check_after_restart(
    data_dir: &Path,
    addr: SocketAddr,
    acked: &Acked,
    unacked_max: usize,
) -> anyhow::Result<()> {
    let mut node = ProcessNode::start(data_dir, addr).await?;
    let client = node.client().await?;
    let found = scan_all(&client).await?;
    for (key, (value, id)) in acked {
        let kv = found.get(key).unwrap_or_else(|| {
            panic!(
                "acknowledged write of {} is missing",
                String::from_utf8_lossy(key)
            )
        });
        assert_eq!(kv.values.len(), 1, "{kv:?}");
        assert_eq!(kv.values[0].id, *id, "{kv:?}");
        assert_eq!(kv.values[0].value.as_deref(), Some(&value[..]), "{kv:?}");
        assert_eq!(kv.context, vec![*id]);
    }
    let extra = found.len() - acked.len();
    assert!(
        extra <= unacked_max,
        "{extra} keys present that were never acknowledged (at most {unacked_max} were in flight)"
    );
    // Also through `get`, which reads a different path than `scan`.
    for (key, (value, id)) in acked.iter().step_by(97) {
        let got = client.get(key).await?;
        assert_eq!(got.values.len(), 1);
        assert_eq!((got.values[0].id, got.value()), (*id, Some(&value[..])));
    }
    client.close().await;
    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));

    let out = run(
        command("kappakv")?
            .arg("verify")
            .arg("--data-dir")
            .arg(data_dir),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "kappakv verify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("log ok"), "{stdout}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_writes_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let mut node = ProcessNode::start(dir.path(), addr).await?;
    let load = Load::start(&node, WRITES_PER_WRITER).await?;
    load.wait_for(WRITERS * WRITES_PER_WRITER).await?;
    let acked = load.finish().await?;
    assert_eq!(acked.len(), WRITERS * WRITES_PER_WRITER);

    assert_eq!(
        node.stop_with(libc::SIGTERM)?,
        Some(0),
        "SIGTERM is a clean stop"
    );
    check_after_restart(dir.path(), addr, &acked, 0).await
}

/// Starts a node, writes until [`WRITERS`] × [`WRITES_PER_WRITER`] writes were acknowledged,
/// sends `signal` while the writers are still going, and returns the acknowledged writes and
/// the node's exit code.
async fn stop_while_writing(
    data_dir: &Path,
    addr: SocketAddr,
    signal: i32,
) -> anyhow::Result<(Acked, Option<i32>)> {
    let mut node = ProcessNode::start(data_dir, addr).await?;
    // Writers have far more to write than they get to: the signal lands mid-stream.
    let load = Load::start(&node, 100 * WRITES_PER_WRITER).await?;
    load.wait_for(WRITERS * WRITES_PER_WRITER).await?;
    let code = node.stop_with(signal)?;
    let acked = load.finish().await?;
    assert!(acked.len() >= WRITERS * WRITES_PER_WRITER);
    Ok((acked, code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_writing_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let (acked, code) = stop_while_writing(dir.path(), addr, libc::SIGTERM).await?;
    assert_eq!(code, Some(0), "SIGTERM under load is a clean stop");
    // Each writer had at most one write in flight when the node stopped; those may or may not
    // have been made durable, nothing else may appear.
    check_after_restart(dir.path(), addr, &acked, WRITERS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_writing_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let (acked, code) = stop_while_writing(dir.path(), addr, libc::SIGKILL).await?;
    assert_eq!(code, None, "killed by a signal");
    check_after_restart(dir.path(), addr, &acked, WRITERS).await
}
