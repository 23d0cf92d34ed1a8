//! A new node starting from a trusted peer's snapshot: reads answered before its own replay
//! ends, verified once it has, and what happens when the peer lies, when the new node is
//! killed during its bootstrap, and when the peer goes away half-way. Real `kappakv serve`
//! processes over loopback QUIC.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kappakv_client::{Client, NodeId, Status};
use kappakv_tests::{ProcessNode, command, free_udp_port, run};

/// A peer `a` holding `requests` puts over `keys` keys of `value_size` bytes, written through
/// the server by 64 clients.
async fn filled_peer(
    requests: u64,
    keys: u64,
    value_size: usize,
) -> anyhow::Result<(tempfile::TempDir, ProcessNode, Client, NodeId)> {
    let (dir, a, _) = ProcessNode::start_with_settings(&[]).await?;
    let out = run(
        command("kappactl")?.args([
            "--ticket",
            &a.ticket()?.to_string(),
            "bench",
            "--op",
            "put",
            "--clients",
            "64",
            "--requests",
            &requests.to_string(),
            "--keys",
            &keys.to_string(),
            "--value-size",
            &value_size.to_string(),
        ]),
        Duration::from_secs(600),
    )
    .await?;
    anyhow::ensure!(
        out.status.success(),
        "kappactl bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = a.client().await?;
    let id = client.status().await?.node_id.context("a node id")?;
    Ok((dir, a, client, id))
}

/// A new node's data dir and address, with its identity made and `a` told about it.
async fn new_node(
    dir: &Path,
    a: &Client,
) -> anyhow::Result<(std::path::PathBuf, SocketAddr, NodeId)> {
    let data_dir = dir.join("b");
    std::fs::create_dir_all(&data_dir)?;
    let id = kappakv_server::identity::load_or_create(&data_dir)?.node_id();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    a.peer_add(id, addr.to_string()).await?;
    Ok((data_dir, addr, id))
}

fn peer_setting(id: NodeId, addr: SocketAddr) -> (&'static str, String) {
    ("peers", format!("{id}@{addr}"))
}

/// Polls `b` until `done` holds of its status, for up to `within`.
async fn wait_status(
    b: &Client,
    within: Duration,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(status) = b.status().await
            && done(&status)
        {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {:?}", b.status().await.ok());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `b` ends with `a`'s log and state, verified.
async fn ends_verified(a: &Client, b: &Client) -> anyhow::Result<Status> {
    let want = a.status().await?;
    let status = wait_status(b, Duration::from_secs(120), "verified and caught up", |s| {
        s.bootstrap.as_ref().is_some_and(|b| b.verified)
            && s.version_vector == want.version_vector
            && s.indexed_lsn == s.log_lsn
    })
    .await?;
    assert_eq!(status.state_root, want.state_root, "the replayed state");
    Ok(status)
}

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:010}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_answers_from_a_snapshot_before_its_replay_ends_and_verifies_it()
-> anyhow::Result<()> {
    let (dir, a_node, a, a_id) = filled_peer(30_000, 500, 100).await?;
    let (b_dir, b_addr, _) = new_node(dir.path(), &a).await?;
    let probe = key(7);
    let want = a.get(&probe).await?;
    assert!(!want.values.is_empty(), "the bench wrote key 7");

    let b_node = ProcessNode::start_in(&b_dir, b_addr, &[peer_setting(a_id, a_node.addr)]).await?;
    let b = b_node.client().await?;
    // A read answered by the snapshot: the status read after it still says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = b.get(&probe).await;
        let status = b.status().await?;
        let from_snapshot = status
            .bootstrap
            .as_ref()
            .is_some_and(|s| s.serving_snapshot);
        if let Ok(got) = got
            && got.values == want.values
            && from_snapshot
        {
            assert!(
                status.indexed_lsn < a.status().await?.log_lsn,
                "the replay had not ended"
            );
            // Writes wait, retryably, until the node's own views can resolve them.
            let refused = b.put(b"during", b"bootstrap").await;
            assert!(refused.is_err(), "a write during the bootstrap was taken");
            break;
        }
        if Instant::now() > deadline || status.bootstrap.is_some_and(|s| !s.serving_snapshot) {
            bail!("no read was answered from the snapshot");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ends_verified(&a, &b).await?;
    assert!(
        !b_dir.join("snapshot.redb").exists(),
        "the snapshot file is removed"
    );
    // Writes are taken now, and reach the peer.
    b.put(b"after", b"bootstrap").await?;
    let got = a.get(b"after").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = got?;
    while got.values.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = a.get(b"after").await?;
    }
    assert_eq!(got.values.len(), 1, "B's write replicated to A");
    Ok(())
}

/// Makes `a`'s key/value view lie: the value of `key` changes in its view (and the view's
/// digest with it, so the snapshot is consistent with itself), while its log stays as it was.
fn forge_view(data_dir: &Path, key: &[u8]) -> anyhow::Result<()> {
    use kappakv_indexes::tables::{KV_CURRENT, KV_DIGEST, KV_DIGEST_ROW};
    use kappakv_indexes::{Indexes, default_views};
    use redb::{ReadableDatabase as _, ReadableTable as _};

    let path = data_dir.join("indexes.redb");
    {
        let db = redb::Database::open(&path)?;
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(KV_CURRENT)?;
            let mut row = table
                .get(key)?
                .context("the key has a row")?
                .value()
                .to_vec();
            // The last byte of the row is the last byte of its last version's value.
            let last = row.len() - 1;
            row[last] ^= 0xff;
            table.insert(key, row.as_slice())?;
        }
        txn.commit()?;
    }
    // The digest of the forged rows, so that the view is consistent with itself.
    let digest = {
        let (indexes, _) = Indexes::open(&path, default_views())?;
        indexes.snapshot()?.state_digest_of_rows()?
    };
    let db = redb::Database::open(&path)?;
    let txn = db.begin_write()?;
    txn.open_table(KV_DIGEST)?
        .insert(KV_DIGEST_ROW, digest.to_bytes().as_slice())?;
    txn.commit()?;
    let read = db.begin_read()?;
    let stored = read.open_table(KV_DIGEST)?;
    anyhow::ensure!(stored.get(KV_DIGEST_ROW)?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_differs_from_the_log_behind_it_is_refused() -> anyhow::Result<()> {
    let (dir, mut a_node, a, a_id) = filled_peer(3_000, 200, 100).await?;
    let probe = key(3);
    let truth = a.get(&probe).await?;
    assert!(!truth.values.is_empty());
    let (b_dir, b_addr, _) = new_node(dir.path(), &a).await?;
    drop(a);
    a_node.stop_with(libc::SIGTERM)?;
    forge_view(&a_node.data_dir, &probe)?;
    let a_node = ProcessNode::start_in(&a_node.data_dir, a_node.addr, &[]).await?;
    let a = a_node.client().await?;
    assert_ne!(a.get(&probe).await?.values, truth.values, "A's view lies");

    let b_node = ProcessNode::start_in(&b_dir, b_addr, &[peer_setting(a_id, a_node.addr)]).await?;
    let b = b_node.client().await?;
    let status = wait_status(&b, Duration::from_secs(120), "the snapshot refused", |s| {
        s.bootstrap.as_ref().is_some_and(|b| b.refused)
    })
    .await?;
    let bootstrap = status.bootstrap.context("a bootstrap")?;
    assert_eq!(bootstrap.peer, a_id);
    assert!(!bootstrap.verified);
    // B serves what its log proves, not what A's view says.
    assert_eq!(b.get(&probe).await?.values, truth.values);
    let refused = std::fs::read_to_string(b_dir.join("snapshot-refused"))?;
    assert!(refused.contains(&a_id.to_string()), "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_killed_during_its_bootstrap_ends_verified() -> anyhow::Result<()> {
    let (dir, a_node, a, a_id) = filled_peer(30_000, 500, 100).await?;
    let (b_dir, b_addr, _) = new_node(dir.path(), &a).await?;
    let peers = [peer_setting(a_id, a_node.addr)];
    let mut b_node = ProcessNode::start_in(&b_dir, b_addr, &peers).await?;
    let b = b_node.client().await?;
    wait_status(&b, Duration::from_secs(60), "a snapshot loaded", |s| {
        s.bootstrap.as_ref().is_some_and(|b| b.serving_snapshot)
    })
    .await?;
    b_node.stop_with(libc::SIGKILL)?;
    drop(b);

    let b_node = ProcessNode::start_in(&b_dir, b_addr, &peers).await?;
    let b = b_node.client().await?;
    ends_verified(&a, &b).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_peer_that_goes_away_half_way_leaves_a_correct_node() -> anyhow::Result<()> {
    // A large snapshot (about 20,000 keys of 2 KiB), so that there is a half-way.
    let (dir, mut a_node, a, a_id) = filled_peer(30_000, 20_000, 2048).await?;
    let want = a.status().await?;
    let (b_dir, b_addr, _) = new_node(dir.path(), &a).await?;
    drop(a);
    let b_node = ProcessNode::start_in(&b_dir, b_addr, &[peer_setting(a_id, a_node.addr)]).await?;
    // A goes away as soon as B has started loading its snapshot.
    let file = b_dir.join("snapshot.redb");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a_node.stop_with(libc::SIGKILL)?;
    let b = b_node.client().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Back again: B ends with A's log and state, from a snapshot taken again or a replay.
    let a_node = ProcessNode::start_in(&a_node.data_dir, a_node.addr, &[]).await?;
    let a = a_node.client().await?;
    // The views commit a batch before the bootstrap compares them, so a status can show them
    // caught up an instant before the comparison ends: wait for that too.
    let status = wait_status(&b, Duration::from_secs(180), "caught up", |s| {
        s.version_vector == want.version_vector
            && s.indexed_lsn == s.log_lsn
            && s.bootstrap.as_ref().is_none_or(|b| !b.serving_snapshot)
    })
    .await?;
    assert_eq!(status.state_root, a.status().await?.state_root);
    assert!(
        status.bootstrap.as_ref().is_none_or(|b| b.verified),
        "{:?}",
        status.bootstrap
    );
    assert!(!file.exists(), "no partial snapshot is left");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_recomputes_the_state_root_from_the_log() -> anyhow::Result<()> {
    let (_dir, mut a_node, a, _) = filled_peer(2_000, 100, 50).await?;
    let root = a.status().await?.state_root.context("a state root")?;
    drop(a);
    a_node.stop_with(libc::SIGTERM)?;
    let verify = |data_dir: &Path| {
        let mut cmd = command("kappakv")?;
        cmd.arg("verify").arg("--data-dir").arg(data_dir);
        Ok::<_, anyhow::Error>(cmd)
    };
    let out = run(&mut verify(&a_node.data_dir)?, Duration::from_secs(120)).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("state root {root} at lsn 2000")),
        "{stdout}"
    );
    assert!(
        stdout.contains("the key/value view agrees at lsn 2000"),
        "{stdout}"
    );

    // A view that no longer holds what the log gives, with a digest to match its rows.
    forge_view(&a_node.data_dir, &key(3))?;
    let out = run(&mut verify(&a_node.data_dir)?, Duration::from_secs(120)).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("but the log gives"), "{stderr}");
    assert!(stderr.contains("rebuild-indexes"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_bootstraps_while_its_peer_takes_writes() -> anyhow::Result<()> {
    let (dir, a_node, a, a_id) = filled_peer(20_000, 500, 100).await?;
    let (b_dir, b_addr, _) = new_node(dir.path(), &a).await?;
    // A takes writes all through B's bootstrap, so A's log runs past every snapshot's point.
    let mut load = command("kappactl")?;
    load.args([
        "--ticket",
        &a_node.ticket()?.to_string(),
        "bench",
        "--op",
        "put",
        "--clients",
        "16",
        "--duration",
        "6",
        "--keys",
        "500",
    ]);
    let load = tokio::spawn(async move { run(&mut load, Duration::from_secs(120)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_node = ProcessNode::start_in(&b_dir, b_addr, &[peer_setting(a_id, a_node.addr)]).await?;
    let b = b_node.client().await?;
    wait_status(&b, Duration::from_secs(60), "a snapshot loaded", |s| {
        s.bootstrap.is_some()
    })
    .await?;
    let out = load.await??;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = ends_verified(&a, &b).await?;
    assert_eq!(status.equivocations, 0);
    Ok(())
}
