//! Replication across three real nodes on 127.0.0.1, in a line A–B–C (A and C not peered).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_protocol::KeyVersions;
use kappakv_tests::{TestNode, eventually, free_udp_port};

async fn values(c: &Client, key: &str) -> anyhow::Result<BTreeSet<Vec<u8>>> {
    Ok(c.get(key)
        .await?
        .values
        .into_iter()
        .filter_map(|v| v.value)
        .collect())
}

async fn scan_all(c: &Client) -> anyhow::Result<Vec<KeyVersions>> {
    let items: Vec<_> = c.scan(ScanOptions::all()).collect().await;
    Ok(items.into_iter().collect::<Result<_, _>>()?)
}

async fn peer(a: &TestNode, b: &TestNode) -> anyhow::Result<()> {
    a.client()
        .await?
        .peer_add(b.server.node_id(), b.server.addr().to_string())
        .await?;
    Ok(())
}

async fn start_at(dir: &std::path::Path, port: u16) -> anyhow::Result<kappakv_server::Server> {
    let mut config = kappakv_tests::test_config(dir);
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(kappakv_server::Server::start(config).await?)
}

/// A node on a port of its own and a data dir outside it, so that it can be restarted at the
/// same address with the same data.
async fn node_at_fixed_port() -> anyhow::Result<(tempfile::TempDir, u16, TestNode)> {
    let dir = tempfile::tempdir()?;
    let port = free_udp_port()?;
    let node = TestNode {
        server: start_at(dir.path(), port).await?,
        dir: tempfile::tempdir()?,
    };
    Ok((dir, port, node))
}

#[tokio::test]
async fn three_nodes_in_a_line_converge_with_siblings_and_merges() -> anyhow::Result<()> {
    let a = TestNode::start().await?;
    let c = TestNode::start().await?;
    let (b_dir, b_port, b) = node_at_fixed_port().await?;
    peer(&a, &b).await?;
    peer(&b, &a).await?;
    peer(&b, &c).await?;
    peer(&c, &b).await?;
    let (ca, cc) = (a.client().await?, c.client().await?);

    // A write on A is readable on C, relayed through B.
    ca.put("hello", "from a").await?;
    eventually("C sees A's write", || async {
        Ok(values(&cc, "hello").await? == BTreeSet::from([b"from a".to_vec()]))
    })
    .await?;

    // With B stopped, A and C write the same key concurrently.
    let b_ticket = b.ticket();
    b.server.shutdown().await;
    ca.put("k", "a-side").await?;
    cc.put("k", "c-side").await?;
    assert_eq!(
        values(&ca, "k").await?.len(),
        1,
        "A has not seen C's write yet"
    );

    // B returns on the same data dir and port; its peers were kept in the data dir.
    let b = start_at(b_dir.path(), b_port).await?;
    let cb = Client::connect(&b_ticket).await?;
    let both = BTreeSet::from([b"a-side".to_vec(), b"c-side".to_vec()]);
    for (name, client) in [("A", &ca), ("B", &cb), ("C", &cc)] {
        eventually(&format!("{name} has both siblings"), || async {
            Ok(values(client, "k").await? == both)
        })
        .await?;
    }

    // A put with that context on any node collapses them everywhere.
    let ctx = cb.get("k").await?.context;
    assert_eq!(ctx.0.len(), 2);
    cb.put_with("k", "merged", &ctx).await?;
    let merged = BTreeSet::from([b"merged".to_vec()]);
    for (name, client) in [("A", &ca), ("B", &cb), ("C", &cc)] {
        eventually(&format!("{name} has the merge"), || async {
            Ok(values(client, "k").await? == merged)
        })
        .await?;
    }

    // Identical kv views and version vectors.
    eventually("version vectors equal", || async {
        let (sa, sb, sc) = (ca.status().await?, cb.status().await?, cc.status().await?);
        Ok(sa.version_vector == sb.version_vector && sb.version_vector == sc.version_vector)
    })
    .await?;
    let view = scan_all(&ca).await?;
    assert_eq!(view, scan_all(&cb).await?);
    assert_eq!(view, scan_all(&cc).await?);
    let status = cb.status().await?;
    assert_eq!(status.peers.len(), 2);
    assert!(
        status.peers.iter().all(|p| p.connected),
        "{:?}",
        status.peers
    );

    // Every log verifies.
    let (a_dir, c_dir) = (a.dir, c.dir);
    a.server.shutdown().await;
    b.shutdown().await;
    c.server.shutdown().await;
    for dir in [a_dir.path(), b_dir.path(), c_dir.path()] {
        let summary = kappakv_server::commands::verify::run(dir)?;
        assert_eq!(
            summary.authors, 3,
            "A, B and C wrote, and every log has all of it: {summary}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_node_not_on_the_peer_list_is_refused() -> anyhow::Result<()> {
    let a = TestNode::start().await?;
    let stranger = TestNode::start().await?;
    // The stranger lists A, but A does not list the stranger.
    peer(&stranger, &a).await?;
    let cs = stranger.client().await?;
    cs.put("secret", "x").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = cs.status().await?;
    assert!(
        !status.peers[0].connected,
        "A must refuse: {:?}",
        status.peers
    );
    assert!(a.client().await?.get("secret").await?.values.is_empty());
    assert!(a.client().await?.status().await?.peers.is_empty());
    Ok(())
}

/// Writes `n` entries on `client`, from 8 concurrent writers, keys `{prefix}-{i}`.
async fn write_many(client: &Client, prefix: &str, n: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, prefix) = (client.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                client.put(format!("{prefix}-{i}"), "v").await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn same_version_vectors(a: &Client, b: &Client) -> anyhow::Result<bool> {
    Ok(a.status().await?.version_vector == b.status().await?.version_vector)
}

#[tokio::test]
async fn a_restarted_peer_resumes_without_its_peer_rereading_the_shared_history()
-> anyhow::Result<()> {
    const SHARED: usize = 2000;
    const WHILE_DOWN: usize = 20;
    const AFTER: usize = 10;
    let a = TestNode::start().await?;
    let (b_dir, b_port, b) = node_at_fixed_port().await?;
    peer(&a, &b).await?;
    peer(&b, &a).await?;
    let (ca, cb) = (a.client().await?, b.client().await?);
    let (a_id, b_id) = (a.server.node_id(), b.server.node_id());
    let a_replication = a.server.node().replication().expect("A replicates");

    // A shared history written on both sides.
    let (wa, wb) = tokio::join!(
        write_many(&ca, "a", SHARED * 3 / 4),
        write_many(&cb, "b", SHARED / 4)
    );
    wa?;
    wb?;
    eventually("A and B share the history", || {
        same_version_vectors(&ca, &cb)
    })
    .await?;
    let a_read_before = a_replication.entries_read(&b_id);
    assert!(
        a_read_before >= SHARED as u64,
        "A's first session with B read its log: {a_read_before}"
    );

    // B stops; A writes; B comes back on the same data dir and writes too.
    let b_ticket = b.ticket();
    b.server.shutdown().await;
    write_many(&ca, "down", WHILE_DOWN).await?;
    let b = start_at(b_dir.path(), b_port).await?;
    let cb = Client::connect(&b_ticket).await?;
    write_many(&cb, "after", AFTER).await?;
    eventually("A and B converge after the restart", || {
        same_version_vectors(&ca, &cb)
    })
    .await?;
    for (name, client, key) in [
        ("B", &cb, format!("down-{}", WHILE_DOWN - 1)),
        ("A", &ca, format!("after-{}", AFTER - 1)),
    ] {
        eventually(&format!("{name} has {key}"), || async {
            Ok(values(client, &key).await? == BTreeSet::from([b"v".to_vec()]))
        })
        .await?;
    }
    let status = ca.status().await?;
    assert_eq!(status.log_lsn, (SHARED + WHILE_DOWN + AFTER) as u64);

    // Neither side reread the history they share: A read what B lacked and what it received
    // from B since, the restarted B only what came after what A has.
    let a_read = a_replication.entries_read(&b_id) - a_read_before;
    let b_read = b
        .node()
        .replication()
        .expect("B replicates")
        .entries_read(&a_id);
    let bound = (WHILE_DOWN + AFTER) as u64 * 2;
    assert!(
        a_read <= bound,
        "A read {a_read} entries for B after its restart, at most {bound} expected"
    );
    assert!(
        b_read <= bound,
        "B read {b_read} entries for A after its restart, at most {bound} expected"
    );
    a.server.shutdown().await;
    b.shutdown().await;
    Ok(())
}
