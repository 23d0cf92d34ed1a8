//! Operating a node: the admin listener's `/metrics`, `/healthz` and `/readyz` on a real
//! `kappakv serve` process (the library installs no metrics recorder; the binary does).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::StreamExt as _;
use kappakv_protocol::WriteOp;
use kappakv_tests::{ProcessNode, TestNode, free_tcp_port, free_udp_port, http_get, metric};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_workload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let admin = loopback(free_tcp_port()?);
    let node = ProcessNode::start_with_admin(dir.path(), loopback(free_udp_port()?), admin).await?;
    let client = node.client().await?;

    let (status, before) = http_get(admin, "/metrics").await?;
    assert_eq!(status, 200, "{before}");
    let acked = "kappakv_writes_acknowledged_total";
    let puts = r#"kappakv_requests_total{type="write",outcome="ok"}"#;
    let gets = r#"kappakv_requests_total{type="get",outcome="ok"}"#;

    const PUTS: usize = 300;
    futures_util::stream::iter(0..PUTS)
        .map(|i| {
            let client = &client;
            async move { client.put(format!("k{i}"), "v").await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    for i in 0..10 {
        client.get(format!("k{i}")).await?;
    }

    let (_, during) = http_get(admin, "/metrics").await?;
    assert!(
        metric(&during, "kappakv_connections_open") >= 1.0,
        "{during}"
    );
    drop(client);

    let (_, after) = http_get(admin, "/metrics").await?;
    assert!(
        metric(&after, acked) - metric(&before, acked) >= PUTS as f64,
        "writes acknowledged: {} → {}",
        metric(&before, acked),
        metric(&after, acked)
    );
    assert!(metric(&after, puts) - metric(&before, puts) >= PUTS as f64);
    assert!(metric(&after, gets) - metric(&before, gets) >= 10.0);
    assert!(
        metric(
            &after,
            r#"kappakv_request_duration_seconds_count{type="write"}"#
        ) >= PUTS as f64,
        "{after}"
    );
    assert!(metric(&after, "kappakv_group_commit_entries_count") >= 1.0);
    assert!(metric(&after, "kappakv_group_commit_entries_sum") >= PUTS as f64);
    assert!(metric(&after, "kappakv_log_fsync_duration_seconds_count") >= 1.0);
    assert!(metric(&after, "kappakv_log_durable_lsn") >= PUTS as f64);
    assert!(metric(&after, "kappakv_log_segments") >= 1.0);
    assert!(metric(&after, "kappakv_log_bytes") > 0.0);
    assert!(metric(&after, r#"kappakv_view_applied_lsn{view="kv"}"#) >= PUTS as f64);
    assert!(after.contains(r#"kappakv_view_lag_entries{view="kv"}"#));
    assert!(metric(&after, "kappakv_index_rebuilding") < 0.5);

    assert_eq!(http_get(admin, "/healthz").await?.0, 200);
    let (status, body) = http_get(admin, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(admin, "/nope").await?.0, 404);
    Ok(())
}

/// A node rebuilding its indexes at start is alive but not ready: the admin listener answers
/// before the node opens its log, so `/readyz` is seen at 503 while the views are rebuilt from
/// 50k entries, then at 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_rebuilding_then_ready() -> Result<()> {
    const ENTRIES: usize = 50_000;
    let TestNode { server, dir } = TestNode::start().await?;
    {
        let node = server.node();
        futures_util::stream::iter(0..ENTRIES)
            .map(|i| async move {
                node.writer
                    .write(vec![WriteOp {
                        key: format!("key/{i:06}").into_bytes(),
                        value: Some(b"value".to_vec()),
                        supersedes: Some(vec![]),
                    }])
                    .await
            })
            .buffer_unordered(512)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
    }
    server.shutdown().await;
    std::fs::remove_file(dir.path().join("indexes.redb"))?;

    let admin = loopback(free_tcp_port()?);
    let mut node = ProcessNode::spawn_unready(dir.path(), loopback(free_udp_port()?), admin)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut saw_not_ready = None;
    let mut saw_alive_while_not_ready = false;
    loop {
        if Instant::now() > deadline {
            bail!("no 200 from /readyz within 60 s (saw 503: {saw_not_ready:?})");
        }
        let Ok((status, body)) = http_get(admin, "/readyz").await else {
            // Not listening yet.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        match status {
            503 => {
                if saw_not_ready.is_none() {
                    saw_alive_while_not_ready = http_get(admin, "/healthz").await?.0 == 200;
                }
                saw_not_ready = Some(body);
            }
            200 => break,
            other => bail!("/readyz answered {other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = saw_not_ready.expect("/readyz answered 503 while the views were rebuilt");
    assert!(
        body.contains("indexing") || body.contains("starting"),
        "{body}"
    );
    assert!(
        saw_alive_while_not_ready,
        "/healthz is 200 while rebuilding"
    );

    node.wait_ready().await?;
    let client = node.client().await?;
    let got = client.get("key/049999").await?;
    assert_eq!(got.values.len(), 1);
    Ok(())
}

/// Under systemd: READY=1 once serving, STOPPING=1 at SIGTERM, exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_and_exits_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path)?;
    socket.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data_dir = dir.path().join("data");
    let addr = loopback(free_udp_port()?);
    let mut cmd = kappakv_tests::command("kappakv")?;
    cmd.args(["serve", "--no-admin", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", &addr.to_string()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::inherit());
    let mut node = ProcessNode::spawn(cmd, &data_dir, addr).await?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    // A second node on the same data dir is refused: exit status 3.
    let out = kappakv_tests::run(
        kappakv_tests::command("kappakv")?
            .args(["serve", "--no-admin", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &loopback(free_udp_port()?).to_string()]),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));
    let n = socket.recv(&mut buf)?;
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    Ok(())
}

/// An invalid setting stops `serve` with one line naming it, and exit status 2.
#[tokio::test]
async fn invalid_settings_exit_with_status_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = kappakv_tests::run(
        kappakv_tests::command("kappakv")?
            .args(["serve", "--admin-listen", "localhost", "--data-dir"])
            .arg(dir.path()),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin_listen = localhost") && stderr.lines().count() == 1,
        "{stderr}"
    );
    Ok(())
}
