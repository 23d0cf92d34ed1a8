//! Replication faults a user meets: nodes with different batch limits, and the causal order of
//! what a node relays.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kappakv_client::Client;
use kappakv_server::log::LogReader;
use kappakv_tests::{ProcessNode, TestNode, command, eventually, run};

/// Waits until `a` and `b` report equal version vectors, for up to `within`.
async fn converge(a: &Client, b: &Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let (sa, sb) = (a.status().await?, b.status().await?);
        if sa.version_vector == sb.version_vector {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no convergence within {within:?}: {:?} vs {:?} (refused entries are in the receiver's log)",
                sa.version_vector,
                sb.version_vector
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_smaller_batch_limit_takes_everything_a_busy_peer_writes()
-> anyhow::Result<()> {
    // B takes batches of half the default size; A, on defaults, writes large values under many
    // concurrent clients, so its batches hold several MiB behind one signature.
    let (_a_dir, a, _) = ProcessNode::start_with_settings(&[]).await?;
    let (_b_dir, b, _) =
        ProcessNode::start_with_settings(&[("batch_bytes_max", "4194432")]).await?;
    let (ca, cb) = (a.client().await?, b.client().await?);
    let (a_id, b_id) = (
        ca.status().await?.node_id.context("a node id")?,
        cb.status().await?.node_id.context("a node id")?,
    );
    ca.peer_add(b_id, b.addr.to_string()).await?;
    cb.peer_add(a_id, a.addr.to_string()).await?;

    let out = run(
        command("kappactl")?.args([
            "--ticket",
            &a.ticket()?.to_string(),
            "bench",
            "--op",
            "put",
            "--clients",
            "256",
            "--requests",
            "2048",
            "--value-size",
            "65536",
        ]),
        Duration::from_secs(300),
    )
    .await?;
    assert!(
        out.status.success(),
        "kappactl bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    converge(&ca, &cb, Duration::from_secs(60)).await?;
    let status = cb.status().await?;
    assert_eq!(status.equivocations, 0);
    assert!(status.log_lsn >= 2048, "B holds {} entries", status.log_lsn);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_supersede_never_lands_before_the_write_it_supersedes() -> anyhow::Result<()> {
    let (a, b, c) = (
        TestNode::start().await?,
        TestNode::start().await?,
        TestNode::start().await?,
    );
    let (ca, cb, cc) = (a.client().await?, b.client().await?, c.client().await?);
    // A's log: its own x, then B's k, then its own k superseding B's.
    ca.put("x", "a1").await?;
    let from_b = cb.put("k", "from b").await?;
    ca.peer_add(b.server.node_id(), b.server.addr().to_string())
        .await?;
    cb.peer_add(a.server.node_id(), a.server.addr().to_string())
        .await?;
    eventually("A has B's write", || async {
        Ok(ca.get("k").await?.values.len() == 1)
    })
    .await?;
    let from_a = ca.put("k", "from a").await?;

    // C meets A only now and receives A's whole log in one frame.
    ca.peer_add(c.server.node_id(), c.server.addr().to_string())
        .await?;
    cc.peer_add(a.server.node_id(), a.server.addr().to_string())
        .await?;
    converge(&ca, &cc, Duration::from_secs(20)).await?;

    let got = cc.get("k").await?;
    assert_eq!(got.values.len(), 1);
    assert_eq!(got.values[0].value.as_deref(), Some(&b"from a"[..]));
    let reader = LogReader::open(&c.dir.path().join("log"))?;
    let lsn_of = |id| -> anyhow::Result<u64> {
        for item in reader.iter(0, u64::MAX)? {
            let (lsn, e) = item?;
            if e.id == id {
                return Ok(lsn);
            }
        }
        bail!("{id} is not in C's log")
    };
    let (b_lsn, a_lsn) = (lsn_of(from_b.id)?, lsn_of(from_a.id)?);
    assert!(
        b_lsn < a_lsn,
        "C's log holds A's supersede at LSN {a_lsn}, before B's write at LSN {b_lsn}"
    );
    // History shows the newest version first.
    let history = cc.history("k", 10).await?;
    assert_eq!(history.first().map(|v| v.id), Some(from_a.id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_from_an_older_backup_gets_its_chain_back_before_it_writes()
-> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (a_dir, b_dir) = (root.path().join("a"), root.path().join("b"));
    let (a_addr, b_addr) = (
        std::net::SocketAddr::from(([127, 0, 0, 1], kappakv_tests::free_udp_port()?)),
        std::net::SocketAddr::from(([127, 0, 0, 1], kappakv_tests::free_udp_port()?)),
    );
    let mut a = ProcessNode::start(&a_dir, a_addr).await?;
    let mut b = ProcessNode::start(&b_dir, b_addr).await?;
    let (ca, cb) = (a.client().await?, b.client().await?);
    let (a_id, b_id) = (ca.node_id(), cb.node_id());
    ca.peer_add(b_id, b_addr.to_string()).await?;
    cb.peer_add(a_id, a_addr.to_string()).await?;
    for i in 0..5 {
        ca.put(format!("k{i}"), "before the backup").await?;
    }
    converge(&ca, &cb, Duration::from_secs(20)).await?;

    let backup = root.path().join("backup");
    let out = run(
        command("kappakv")?
            .args(["backup", "--data-dir"])
            .arg(&a_dir)
            .arg("--out")
            .arg(&backup),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 5..10 {
        ca.put(format!("k{i}"), "after the backup").await?;
    }
    converge(&ca, &cb, Duration::from_secs(20)).await?;
    drop((ca, cb));
    a.stop_with(libc::SIGTERM)?;
    b.stop_with(libc::SIGTERM)?;

    // A comes back from the backup, which lacks seqs 6 to 10 of its chain, while B is down.
    std::fs::remove_dir_all(&a_dir)?;
    let out = run(
        command("kappakv")?
            .args(["restore", "--data-dir"])
            .arg(&a_dir)
            .arg(&backup),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = ProcessNode::start(&a_dir, a_addr).await?;
    let ca = restored.client().await?;
    let err = ca
        .put("k10", "too early")
        .await
        .expect_err("a restored node holds writes until a peer confirms its chain");
    assert!(err.to_string().contains("fork its chain"), "{err}");
    assert_eq!(ca.status().await?.version_vector, vec![(a_id, 5)]);
    // Whoever holds a ticket cannot say how far the node's chain goes: a session through a
    // client stream whose hello lacks the node's chain confirms nothing.
    let empty = root.path().join("empty.export");
    std::fs::write(&empty, b"")?;
    let out = run(
        command("kappactl")?
            .args(["--ticket", &restored.ticket()?.to_string(), "import"])
            .arg(&empty),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = ca
        .put("k10", "still too early")
        .await
        .expect_err("a sync stream does not confirm the node's chain");
    assert!(err.to_string().contains("fork its chain"), "{err}");

    // B returns with seqs 6 to 10: A takes them back, then writes seq 11.
    let b = ProcessNode::start(&b_dir, b_addr).await?;
    let cb = b.client().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = loop {
        match ca.put("k10", "after the restore").await {
            Ok(w) => break w,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("fork its chain"), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    converge(&ca, &cb, Duration::from_secs(20)).await?;
    let status = cb.status().await?;
    assert_eq!(status.version_vector, vec![(a_id, 11)]);
    assert_eq!(status.equivocations, 0);
    let got = cb.get("k10").await?;
    assert_eq!(got.values.len(), 1);
    assert_eq!(got.values[0].id, written.id);
    assert!(!a_dir.join("own-chain-unconfirmed").exists());
    Ok(())
}
