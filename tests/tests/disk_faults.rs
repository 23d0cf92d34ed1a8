//! Disk faults under a serving node. In process, the node's log goes through a fault-injecting
//! directory: a failed `fdatasync` stops writes for good (clients get `Unavailable` saying the
//! node must be restarted) while reads go on; a full disk refuses writes with `Unavailable`
//! until there is space, then writes resume as if the refused ones had never been tried; so does
//! a write that would eat into the free space kept for the views. When the indexer stops after
//! an error, the node says so everywhere and takes no writes until it is restarted.
//!
//! As a real process, `kappakv serve` runs on a 16 MiB tmpfs: filled up by another file with no
//! reserve; filled by its own writes down to its reserve, where the views keep being written and
//! reads answered; and with only its views on the full tmpfs (the log elsewhere), so that the
//! index database itself fails.

use std::net::SocketAddr;
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
use kappakv_server::log::file::available_space;
use kappakv_server::log::{FsLogDir, LogDir};
use kappakv_tests::{
    ProcessNode, command, eventually, free_tcp_port, free_udp_port, http_get, metric, test_config,
};

const MIB: u64 = 1024 * 1024;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_would_eat_into_the_reserve_is_refused_while_reads_go_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir_path = dir.path().to_path_buf();
    let log_dir = FaultyLogDir::new(Arc::new(FsLogDir::new(dir_path.join("log"))));
    let faults = log_dir.faults();
    let log_dir: Arc<dyn LogDir> = Arc::new(log_dir);
    let config = kappakv_server::Config {
        disk_reserve_bytes: 8 * MIB,
        ..test_config(&dir_path)
    };
    faults.set_available_space(Some(100 * MIB));
    let health = Health::new();
    let server = Server::start_with_log_dir(config, health.clone(), Some(log_dir)).await?;
    let c = client(&server).await?;
    let mut last = None;
    for i in 0..20 {
        last = Some(c.put(format!("k{i}"), format!("v{i}")).await?);
    }
    let last = last.context("written")?;

    // 8 MiB and 100 bytes free: no record fits above the reserve.
    faults.set_available_space(Some(8 * MIB + 100));
    for i in 0..3 {
        let (code, message) = refusal(c.put("k0", format!("refused {i}")).await)?;
        assert_eq!(code, ErrorCode::Unavailable, "{message}");
        assert!(code.retryable());
        assert!(
            message.contains("disk is full") && message.contains("kept free for the indexes"),
            "{message}"
        );
    }
    // Reads, the views and health go on.
    assert_eq!(value(&c, "k19").await?, b"v19");
    let status = c.status().await?;
    assert!(status.writable);
    assert_eq!((status.log_lsn, status.indexed_lsn), (last.lsn, last.lsn));
    assert!(health.liveness().ok);
    eventually("ready, with every view caught up", || async {
        Ok(health.readiness(0).ok)
    })
    .await?;
    assert!(faults.fired().is_empty(), "nothing reached the disk");

    faults.set_available_space(Some(9 * MIB));
    let next = c.put("k0", "after").await?;
    assert_eq!(next.lsn, last.lsn + 1);
    let got = c.get("k0").await?;
    assert_eq!(got.values.len(), 1, "{:?}", got.values);
    assert_eq!(got.values[0].value.as_deref(), Some(&b"after"[..]));
    c.close().await;
    server.shutdown().await;
    verify::run(&dir_path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_indexer_stops_the_node_says_so_and_takes_no_writes_until_a_restart() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    // The indexer lingers (no read waits) long enough for the record to be damaged under it.
    let config = kappakv_server::Config {
        index_linger_ms: 600_000,
        ready_lag_entries_max: 1_000_000,
        ..test_config(dir.path())
    };
    let health = Health::new();
    let server = Server::start_observed(config, health.clone()).await?;
    let c = client(&server).await?;
    let w = c.put("k", "v").await?;
    assert_eq!(w.lsn, 1);
    let segment = dir.path().join("log").join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&segment)?;
    // The record's last byte that is not zero: zeros written ahead of it may follow.
    let last = bytes
        .iter()
        .rposition(|&b| b != 0)
        .context("a record in the segment")?;
    bytes[last] ^= 0x55;
    std::fs::write(&segment, &bytes)?;

    // The read wakes the indexer, which finds the record damaged and stops.
    let err = c
        .get("k")
        .await
        .expect_err("the indexer cannot apply the record");
    let RequestError::Server { code, message } = err else {
        bail!("{err}");
    };
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(
        message.contains("the indexer has stopped") && message.contains("reading the log"),
        "{message}"
    );
    let live = health.liveness();
    assert!(
        !live.ok && live.reason.contains("indexer stopped") && live.reason.contains("restart"),
        "{live:?}"
    );
    assert!(!health.readiness(u64::MAX).ok);
    assert!(!c.status().await?.writable);
    let (code, message) = refusal(c.put("other", "x").await)?;
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(
        message.contains("indexes failed") && message.contains("restart"),
        "{message}"
    );
    assert_eq!(c.status().await?.log_lsn, 1, "nothing more was written");
    c.close().await;
    server.shutdown().await;
    Ok(())
}

/// `kappakv serve` on `data` at `addr`, logging at `info` into the file `log`, with `env` set.
async fn serve(
    data: &Path,
    addr: SocketAddr,
    log: &Path,
    env: &[(&str, String)],
) -> Result<ProcessNode> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = command("kappakv")?;
    cmd.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", &addr.to_string()])
        .env("KAPPAKV_ADMIN_LISTEN", "off")
        .env("RUST_LOG", "info,quinn=warn")
        .env("NO_COLOR", "1")
        .stderr(file);
    for (key, value) in env {
        cmd.env(key, value);
    }
    ProcessNode::spawn(cmd, data, addr).await
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

/// Writes zeros into `path` until `leave` bytes are free on its file system (never filling it
/// on the way, so the node's own writes meanwhile find room); returns the bytes written.
fn fill_leaving(path: &Path, leave: u64) -> Result<u64> {
    use std::io::Write as _;
    let dir = path.parent().context("a file in a directory")?;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let over = available_space(dir)?.saturating_sub(leave);
        if over < 4096 {
            return Ok(written);
        }
        let n = usize::try_from(over.min(chunk.len() as u64))?;
        file.write_all(&chunk[..n])?;
        written += n as u64;
    }
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
    // No reserve: the log itself meets the full disk.
    let no_reserve = [("KAPPAKV_DISK_RESERVE_BYTES", "0".to_string())];
    let mut node = serve(&data, addr, &node_log, &no_reserve).await?;
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
    kappakv_tests::crash::verify(&data).await?;

    // Everything acknowledged is there after a restart too.
    let node = serve(&data, addr, &node_log, &no_reserve).await?;
    let c = node.client().await?;
    for key in &acked {
        assert_eq!(c.get(key).await?.values.len(), 1, "{key}");
    }
    c.close().await;
    drop(node);
    eprintln!(
        "full tmpfs, no reserve: 16 MiB, filler {} KiB, {} writes acknowledged ({written_while_full} while filling the last page), refused with {code:?}: {message}",
        filled / 1024,
        acked.len()
    );
    Ok(())
}

/// The node's metrics page.
async fn metrics(admin: SocketAddr) -> Result<String> {
    let (status, page) = http_get(admin, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(page)
}

/// Whether the metrics page says the indexer runs (`kappakv_indexer_running` 1, not 0).
fn indexer_running(page: &str) -> bool {
    metric(page, "kappakv_indexer_running") > 0.5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tmpfs_filled_by_the_node_keeps_its_reserve_and_the_views_go_on() -> Result<()> {
    const RESERVE: u64 = 4 * MIB;
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
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let env = [
        ("KAPPAKV_DISK_RESERVE_BYTES", RESERVE.to_string()),
        ("KAPPAKV_ADMIN_LISTEN", admin.to_string()),
        // The views' checkpoint is written every 100 ms, on the nearly full disk too.
        ("KAPPAKV_INDEX_DURABLE_INTERVAL_MS", "100".to_string()),
    ];
    let mut node = serve(&data, addr, &node_log, &env).await?;
    let c = node.client().await?;
    let value = vec![b'v'; 4096];
    let mut acked = Vec::new();
    for i in 0..100 {
        let key = format!("before/{i:04}");
        c.put(&key, &value).await?;
        acked.push(key);
    }

    // Another file takes all but 6 MiB; the node's own writes take the rest down to its
    // reserve.
    fill_leaving(&filler, 6 * MIB)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, message) = loop {
        ensure!(
            Instant::now() < deadline,
            "no write was refused at the reserve"
        );
        let key = format!("full/{:04}", acked.len());
        match c.put(&key, &value).await {
            Ok(_) => acked.push(key),
            Err(RequestError::Server { code, message }) => break (code, message),
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(code.retryable());
    assert!(
        message.contains("disk is full") && message.contains("kept free for the indexes"),
        "{message}"
    );
    let written_to_reserve = acked.len() - 100;
    let available_at_refusal = metric(&metrics(admin).await?, "kappakv_disk_available_bytes");

    // Reads are answered, the last acknowledged write included, and the views catch up with
    // the log and keep being written: the indexer runs, the node is healthy and ready.
    let last = acked.last().context("acknowledged writes")?;
    assert_eq!(
        c.get(last).await?.values[0].value.as_deref(),
        Some(&value[..])
    );
    for key in acked.iter().step_by(23) {
        assert_eq!(c.get(key).await?.values.len(), 1, "{key}");
    }
    let status = c.status().await?;
    assert!(status.writable);
    assert_eq!(status.indexed_lsn, status.log_lsn);
    eventually(
        "the views' checkpoint written after the refusal",
        || async {
            let page = metrics(admin).await?;
            Ok(
                metric(&page, "kappakv_view_lag_entries{view=\"kv\"}") == 0.0
                    && indexer_running(&page),
            )
        },
    )
    .await?;
    // Two more checkpoint intervals, for the views to write all they had.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = metrics(admin).await?;
    assert!(indexer_running(&page));
    let available_after = metric(&page, "kappakv_disk_available_bytes");
    // They found room in what was kept for them, and left most of the reserve untouched.
    assert!(
        available_after >= (RESERVE / 2) as f64,
        "free after the views wrote: {available_after}"
    );
    assert_eq!(http_get(admin, "/healthz").await?.0, 200);
    let (ready, body) = http_get(admin, "/readyz").await?;
    assert_eq!(ready, 200, "{body}");

    // Space again: writes resume.
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
    assert!(
        log.contains("the disk is full") && log.contains("kept free"),
        "the node says why: {log}"
    );
    assert!(log.contains("writes resumed"), "and when it is over: {log}");
    assert!(!log.contains("indexer stopped"), "{log}");
    kappakv_tests::crash::verify(&data).await?;
    eprintln!(
        "tmpfs reserve: 16 MiB, reserve {} MiB, 6 MiB left by the filler; {written_to_reserve} writes of 4 KiB acknowledged, then refused: {message}; free at the refusal {:.0} KiB, after the views caught up and wrote their checkpoint {:.0} KiB (the views wrote {:.0} KiB after the refusal); {} writes acknowledged in all, every one read back",
        RESERVE / MIB,
        available_at_refusal / 1024.0,
        available_after / 1024.0,
        (available_at_refusal - available_after) / 1024.0,
        acked.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_tmpfs_under_the_views_stops_the_indexer_and_the_node_says_so() -> Result<()> {
    let outside = tempfile::tempdir()?;
    let mount_point = outside.path().join("tmpfs");
    std::fs::create_dir(&mount_point)?;
    let Some(_tmpfs) = Tmpfs::mount(&mount_point, "16m") else {
        return Ok(());
    };
    // The data dir, and so the views, on the tmpfs; the log on the disk outside, through a
    // link, so that only the index database meets the full disk.
    let data = mount_point.join("data");
    std::fs::create_dir(&data)?;
    let log_elsewhere = outside.path().join("log");
    std::fs::create_dir(&log_elsewhere)?;
    std::os::unix::fs::symlink(&log_elsewhere, data.join("log"))?;
    let filler = mount_point.join("filler");
    let node_log = outside.path().join("node.log");
    let addr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let env = [
        // No reserve: nothing keeps the views' room.
        ("KAPPAKV_DISK_RESERVE_BYTES", "0".to_string()),
        ("KAPPAKV_ADMIN_LISTEN", admin.to_string()),
        ("KAPPAKV_INDEX_DURABLE_INTERVAL_MS", "100".to_string()),
    ];
    let mut node = serve(&data, addr, &node_log, &env).await?;
    let c = node.client().await?;
    let value = vec![b'v'; 16 * 1024];
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("before/{i:04}");
        c.put(&key, &value).await?;
        acked.push(key);
    }
    fill(&filler)?;

    // The log takes writes until the views' next checkpoint finds no room; the first write
    // refused after that may be one the views could not resolve.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first_refusal = loop {
        ensure!(
            Instant::now() < deadline,
            "the views never met the full disk"
        );
        let key = format!("full/{:04}", acked.len());
        match c.put(&key, &value).await {
            Ok(_) => acked.push(key),
            Err(RequestError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::Unavailable, "{message}");
                break message;
            }
            Err(e) => return Err(e.into()),
        }
    };
    eventually("/healthz failing", || async {
        Ok(http_get(admin, "/healthz").await?.0 == 503)
    })
    .await?;
    let (_, live) = http_get(admin, "/healthz").await?;
    assert!(
        live.contains("indexer stopped") && live.contains("free space") && live.contains("restart"),
        "{live}"
    );
    let (ready, body) = http_get(admin, "/readyz").await?;
    assert_eq!(ready, 503, "{body}");
    let page = metrics(admin).await?;
    assert!(
        page.lines().any(|l| l == "kappakv_indexer_running 0"),
        "{page}"
    );
    assert!(!c.status().await?.writable);
    let (code, message) = refusal(c.put("refused", &value).await)?;
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(
        message.contains("indexes failed") && message.contains("free space"),
        "{message}"
    );
    let log_lsn = c.status().await?.log_lsn;
    c.close().await;
    let stopped = node.stop_with(libc::SIGTERM)?;
    let log = std::fs::read_to_string(&node_log)?;
    assert!(
        log.contains("the indexes could not be updated") && log.contains("restart kappakv"),
        "the node says what happened and what to do: {log}"
    );

    // Space again, and a restart: every acknowledged write is there, the node takes writes.
    std::fs::remove_file(&filler)?;
    kappakv_tests::crash::verify(&data).await?;
    let node = serve(&data, addr, &node_log, &env).await?;
    let c = node.client().await?;
    for key in &acked {
        let got = c.get(key).await?;
        assert_eq!(got.values.len(), 1, "{key}");
    }
    let status = c.status().await?;
    assert!(status.writable);
    assert_eq!(status.log_lsn, log_lsn);
    c.put("after", "restart").await?;
    c.close().await;
    drop(node);
    eprintln!(
        "full tmpfs under the views: {} writes of 16 KiB acknowledged, log at {log_lsn} when the indexer stopped; first refusal: {first_refusal}; stop exit code {stopped:?}; all read back after a restart",
        acked.len()
    );
    Ok(())
}
