//! Disk faults under a serving node. In process, the node's log goes through a fault-injecting
//! directory: a failed `fdatasync` stops writes for good (clients get `Unavailable` saying the
//! node must be restarted) while reads go on; a full disk refuses writes with `Unavailable`
//! until there is space, then writes resume as if the refused ones had never been tried. As a
//! real process, `kappakv serve` runs on a 16 MiB tmpfs filled up by another file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use kappakv_client::{Client, RequestError};
use kappakv_protocol::ErrorCode;
use kappakv_server::Server;
use kappakv_server::auth::Role;
use kappakv_server::commands::verify;
use kappakv_server::health::Health;
use kappakv_server::log::fault::{FaultEffect, FaultError, FaultOp, Faults, FaultyLogDir};
use kappakv_server::log::{FsLogDir, LogDir};
use kappakv_tests::{ProcessNode, command, free_udp_port, run, test_config};

/// A server whose log goes through a fault-injecting directory.
async fn start_faulty(data: &Path) -> Result<(Server, Arc<Faults>, Arc<Health>)> {
    let dir = FaultyLogDir::new(Arc::new(FsLogDir::new(data.join("log"))));
    let faults = dir.faults();
    let health = Health::new();
    let log_dir: Arc<dyn LogDir> = Arc::new(dir);
    let server =
        Server::start_with_log_dir(test_config(data), health.clone(), Some(log_dir)).await?;
    Ok((server, faults, health))
}

async fn client(server: &Server) -> Result<Client> {
    Ok(Client::connect(&server.ticket(Role::ReadWrite)).await?)
}

/// The single current value of `key`.
async fn value(client: &Client, key: &str) -> Result<Vec<u8>> {
    let got = client.get(key).await?;
    ensure!(got.values.len() == 1, "{key}: {:?}", got.values);
    got.values[0].value.clone().context("a tombstone")
}

/// The error code and message of a refused write.
fn refusal(result: kappakv_client::Result<kappakv_client::Written>) -> Result<(ErrorCode, String)> {
    match result {
        Err(RequestError::Server { code, message }) => Ok((code, message)),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_fsync_writes_stop_and_reads_go_on_until_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, faults, health) = start_faulty(dir.path()).await?;
    let c = client(&server).await?;
    for i in 0..20 {
        c.put(format!("k{i}"), format!("v{i}")).await?;
    }

    faults.fail_next(FaultOp::SyncData, FaultError::Eio, FaultEffect::Nothing);
    let (code, message) = refusal(c.put("lost", "x").await)?;
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(
        message.contains("log failed") && message.contains("restarted"),
        "{message}"
    );
    // Nothing fails on the disk any more, yet the node takes no write until it is restarted.
    let (code, message) = refusal(c.put("later", "y").await)?;
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(message.contains("restart the node"), "{message}");
    assert_eq!(
        faults.count(FaultOp::SyncData),
        21,
        "no sync was tried again"
    );

    for i in 0..20 {
        assert_eq!(
            value(&c, &format!("k{i}")).await?,
            format!("v{i}").into_bytes()
        );
    }
    let status = c.status().await?;
    assert!(!status.writable);
    assert_eq!(status.log_lsn, 20);
    let ready = health.readiness(u64::MAX);
    assert!(!ready.ok && ready.reason.contains("failed"), "{ready:?}");
    assert!(!health.liveness().ok);
    c.close().await;
    server.shutdown().await;

    // A restart recovers the log: every acknowledged write is there, and writes go on.
    let server = Server::start(test_config(dir.path())).await?;
    let c = client(&server).await?;
    for i in 0..20 {
        assert_eq!(
            value(&c, &format!("k{i}")).await?,
            format!("v{i}").into_bytes()
        );
    }
    c.put("after", "restart").await?;
    assert!(c.status().await?.writable);
    c.close().await;
    server.shutdown().await;
    verify::run(dir.path())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_they_resume_once_there_is_space() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, faults, health) = start_faulty(dir.path()).await?;
    let c = client(&server).await?;
    let first = c.put("k", "1").await?;

    faults.set_disk_full(true);
    for attempt in 0..3 {
        let (code, message) = refusal(c.put("k", format!("refused {attempt}")).await)?;
        assert_eq!(code, ErrorCode::Unavailable, "{message}");
        assert!(code.retryable());
        assert!(message.contains("disk is full"), "{message}");
        let (code, _) = refusal(c.put(format!("new{attempt}"), "x").await)?;
        assert_eq!(code, ErrorCode::Unavailable);
    }
    assert_eq!(value(&c, "k").await?, b"1");
    let status = c.status().await?;
    assert!(status.writable, "a full disk does not stop the node");
    assert_eq!(status.log_lsn, first.lsn);
    assert!(health.liveness().ok);

    // Space again: the next write takes the next LSN and supersedes only what the log holds,
    // so the refused writes leave no sibling behind.
    faults.set_disk_full(false);
    let next = c.put("k", "2").await?;
    assert_eq!(next.lsn, first.lsn + 1);
    let got = c.get("k").await?;
    assert_eq!(got.values.len(), 1, "{:?}", got.values);
    assert_eq!(got.values[0].value.as_deref(), Some(&b"2"[..]));
    assert!(c.get("new0").await?.values.is_empty());
    c.close().await;
    server.shutdown().await;

    verify::run(dir.path())?;
    let server = Server::start(test_config(dir.path())).await?;
    let c = client(&server).await?;
    assert_eq!(value(&c, "k").await?, b"2");
    assert_eq!(c.status().await?.log_lsn, next.lsn);
    c.close().await;
    server.shutdown().await;
    Ok(())
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `path`; `None` where mounting is not allowed.
    fn mount(path: &Path, size: &str) -> Option<Self> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self(path.to_path_buf())),
            Ok(out) => {
                eprintln!(
                    "skipping the full tmpfs test: mounting a tmpfs is not permitted here ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping the full tmpfs test: cannot run mount ({e})");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Lazily, should something still hold a file open there.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> Result<u64> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Page-sized tails too, so that as little room as possible is left.
    for _ in 0..64 {
        if file.write(&chunk[..512]).is_err() {
            break;
        }
        written += 512;
    }
    Ok(written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_tmpfs_refuses_writes_and_they_resume_once_a_file_is_removed() -> Result<()> {
    let outside = tempfile::tempdir()?;
    let mount_point = outside.path().join("tmpfs");
    std::fs::create_dir(&mount_point)?;
    let Some(_tmpfs) = Tmpfs::mount(&mount_point, "16m") else {
        return Ok(());
    };
    let data = mount_point.join("data");
    let filler = mount_point.join("filler");
    let node_log = outside.path().join("node.log");
    let addr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let mut node = ProcessNode::start_logged(&data, addr, &node_log).await?;
    let c = node.client().await?;
    let value = vec![b'v'; 1024];
    let mut acked = Vec::new();
    for i in 0..200 {
        let key = format!("before/{i:04}");
        c.put(&key, &value).await?;
        acked.push(key);
    }

    let filled = fill(&filler)?;
    // The segment's last page may still hold a write or two; the first write that needs a
    // new page is refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, message) = loop {
        ensure!(
            Instant::now() < deadline,
            "no write was refused on a full disk"
        );
        let key = format!("full/{:04}", acked.len());
        match c.put(&key, &value).await {
            Ok(_) => acked.push(key),
            Err(RequestError::Server { code, message }) => break (code, message),
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(message.contains("disk is full"), "{message}");
    let written_while_full = acked.len() - 200;
    // Reads go on while the disk is full.
    for key in acked.iter().step_by(17) {
        assert_eq!(
            c.get(key).await?.values[0].value.as_deref(),
            Some(&value[..])
        );
    }
    let status = c.status().await?;
    assert!(status.writable);

    std::fs::remove_file(&filler)?;
    for i in 0..50 {
        let key = format!("after/{i:04}");
        c.put(&key, &value).await?;
        acked.push(key);
    }
    for key in &acked {
        let got = c.get(key).await?;
        assert_eq!(got.values.len(), 1, "{key}");
        assert_eq!(got.values[0].value.as_deref(), Some(&value[..]), "{key}");
    }
    c.close().await;
    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0), "a clean stop");

    let log = std::fs::read_to_string(&node_log)?;
    assert!(log.contains("the disk is full"), "the node says why: {log}");
    assert!(log.contains("writes resumed"), "and when it is over: {log}");
    let out = run(
        command("kappakv")?
            .args(["verify", "--data-dir"])
            .arg(&data),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything acknowledged is there after a restart too.
    let node = ProcessNode::start(&data, addr).await?;
    let c = node.client().await?;
    for key in &acked {
        assert_eq!(c.get(key).await?.values.len(), 1, "{key}");
    }
    c.close().await;
    drop(node);
    eprintln!(
        "full tmpfs: 16 MiB, filler {} KiB, {} writes acknowledged ({written_while_full} while filling the last page), refused with {code:?}: {message}",
        filled / 1024,
        acked.len()
    );
    Ok(())
}
