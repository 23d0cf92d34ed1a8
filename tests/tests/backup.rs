//! `kappakv backup` under write load and `kappakv restore`: the restored node serves every
//! write acknowledged before the backup began, nothing its source does not have, and its log
//! verifies.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, ensure};
use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_tests::{ProcessNode, command, free_tcp_port, free_udp_port, run};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Every key with its current values, in key order.
async fn scan_all(client: &Client) -> Result<BTreeMap<Vec<u8>, Vec<Option<Vec<u8>>>>> {
    let mut all = BTreeMap::new();
    let mut scan = client.scan(ScanOptions::all());
    while let Some(kv) = scan.next().await {
        let kv = kv?;
        all.insert(kv.key, kv.values.into_iter().map(|v| v.value).collect());
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_what_was_acknowledged() -> Result<()> {
    let root = tempfile::tempdir()?;
    let source_dir = root.path().join("source");
    let backup_dir = root.path().join("backup");
    let restored_dir = root.path().join("restored");
    let source = ProcessNode::start_with_admin(
        &source_dir,
        loopback(free_udp_port()?),
        loopback(free_tcp_port()?),
    )
    .await?;

    // Writers put unique keys until told to stop; a key acknowledged before the backup began
    // is remembered as such.
    let backup_started = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let before: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = source.client().await?;
        let (backup_started, stop, before) = (backup_started.clone(), stop.clone(), before.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let key = format!("w{w}/{i:08}");
                client.put(&key, format!("value of {key}")).await?;
                // Read once the put is acknowledged: a key is counted as acknowledged before
                // the backup began only if the backup had not begun by then. (Read before the
                // put was sent, a put still in flight when the backup began and answered only
                // after it read the node's durable LSN would be counted too.)
                if !backup_started.load(Ordering::Acquire) {
                    before.lock().expect("not poisoned").insert(key);
                }
                i += 1;
            }
            anyhow::Ok(i)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    backup_started.store(true, Ordering::Release);
    let out = run(
        command("kappakv")?
            .args(["backup", "--data-dir"])
            .arg(&source_dir)
            .arg("--out")
            .arg(&backup_dir),
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    let mut written = 0;
    for w in writers {
        written += w.await??;
    }
    let before = before.lock().expect("not poisoned").clone();
    ensure!(!before.is_empty() && written > before.len() as u64);

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("backup.json"))?)?;
    ensure!(
        manifest["lsn"].as_u64().unwrap_or(0) >= before.len() as u64,
        "{} keys acknowledged before the backup began: {manifest}",
        before.len()
    );
    ensure!(!backup_dir.join("indexes.redb").exists());

    // Restore refuses a data dir that is not empty.
    let out = run(
        command("kappakv")?
            .args(["restore", "--data-dir"])
            .arg(&source_dir)
            .arg(&backup_dir),
        Duration::from_secs(60),
    )
    .await?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    let out = run(
        command("kappakv")?
            .args(["restore", "--data-dir"])
            .arg(&restored_dir)
            .arg(&backup_dir),
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        command("kappakv")?
            .args(["verify", "--data-dir"])
            .arg(&restored_dir),
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        out.status.success(),
        "verify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let source_all = scan_all(&source.client().await?).await?;
    let restored = ProcessNode::start_with_admin(
        &restored_dir,
        loopback(free_udp_port()?),
        loopback(free_tcp_port()?),
    )
    .await?;
    let restored_client = restored.client().await?;
    ensure!(restored_client.node_id() == source.client().await?.node_id());
    let restored_all = scan_all(&restored_client).await?;
    for key in &before {
        ensure!(
            restored_all.contains_key(key.as_bytes()),
            "{key} was acknowledged before the backup began but is not in the restore"
        );
    }
    for (key, values) in &restored_all {
        ensure!(
            source_all.get(key) == Some(values),
            "{} is in the restore but not in the source with the same values",
            String::from_utf8_lossy(key)
        );
    }
    ensure!(restored_all.len() as u64 == manifest["lsn"].as_u64().unwrap_or(0));
    Ok(())
}
