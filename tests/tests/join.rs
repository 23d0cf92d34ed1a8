//! Joining with one command, through real processes: `kappactl peer invite` on one node,
//! `kappakv serve --join INVITE` on a new one; both end with each other on their peer lists,
//! kept across restarts, and replicate. A used, an expired and a tampered invite are refused
//! and write nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use kappakv_client::{Client, NodeId, PeerOrigin};
use kappakv_tests::{ProcessNode, command, eventually, free_udp_port, run, serve_command};

const TIMEOUT: Duration = Duration::from_secs(60);

fn loopback() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)))
}

/// `kappactl peer invite` on `node`, with `args`.
async fn invite(node: &ProcessNode, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = command("kappactl")?;
    cmd.args(["--ticket", &node.ticket()?.to_string(), "peer", "invite"])
        .args(args);
    let out = run(&mut cmd, TIMEOUT).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    anyhow::ensure!(lines.len() == 1, "the invite alone on its line: {text:?}");
    Ok(lines[0].to_string())
}

/// `kappakv serve --join INVITE` on a new data dir that is refused: it exits non-zero, says
/// why, and adds no peer.
async fn join_refused(dir: &Path, invite: &str, why: &str) -> anyhow::Result<()> {
    let data = dir.join(format!("refused-{}", free_udp_port()?));
    let mut cmd = serve_command(&data, loopback()?)?;
    cmd.args(["--join", invite]);
    let out = run(&mut cmd, TIMEOUT).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{why}: {stderr}");
    assert!(stderr.contains("refused"), "{why}: {stderr}");
    assert!(!data.exists(), "{why}: the refused node wrote its data dir");
    Ok(())
}

/// The ids of `client`'s node's peers; each says it joined.
async fn peer_ids(client: &Client) -> anyhow::Result<Vec<NodeId>> {
    let peers = client.peer_list().await?;
    for p in &peers {
        assert_eq!(p.origin, PeerOrigin::Joined, "{p:?}");
    }
    Ok(peers.into_iter().map(|p| p.node_id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_joins_two_nodes_once_and_only_while_valid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a_data, b_data) = (dir.path().join("a"), dir.path().join("b"));
    let (a_addr, b_addr) = (loopback()?, loopback()?);
    let mut a = ProcessNode::start_in(&a_data, a_addr, &[]).await?;
    let a_client = a.client().await?;
    a_client.put("from-a", "1").await?;

    let text = invite(&a, &[]).await?;
    let mut cmd = serve_command(&b_data, b_addr)?;
    cmd.args(["--join", &text]);
    let mut b = ProcessNode::spawn(cmd, &b_data, b_addr).await?;
    let b_client = b.client().await?;
    let (a_id, b_id) = (
        a_client.status().await?.node_id,
        b_client.status().await?.node_id,
    );
    let (a_id, b_id) = (a_id.context("a's id")?, b_id.context("b's id")?);
    assert_eq!(peer_ids(&a_client).await?, [b_id]);
    assert_eq!(peer_ids(&b_client).await?, [a_id]);
    // B started from A's snapshot; it takes writes once its replay has verified it.
    eventually("b's bootstrap verified", || async {
        let status = b_client.status().await?;
        Ok(status.bootstrap.is_none_or(|b| !b.serving_snapshot))
    })
    .await?;
    b_client.put("from-b", "1").await?;
    eventually("both nodes hold both writes", || async {
        Ok(a_client.get("from-b").await?.value().is_some()
            && b_client.get("from-a").await?.value().is_some())
    })
    .await?;

    // The invite is used up; an expired one and a tampered one are refused too.
    join_refused(dir.path(), &text, "a used invite").await?;
    let short = invite(&a, &["--expires", "1s"]).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    join_refused(dir.path(), &short, "an expired invite").await?;
    let fresh = invite(&a, &[]).await?;
    let last = fresh.chars().last().context("an invite")?;
    let tampered = format!(
        "{}{}",
        &fresh[..fresh.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    join_refused(dir.path(), &tampered, "a tampered invite").await?;
    assert_eq!(
        peer_ids(&a_client).await?,
        [b_id],
        "no other peer was added"
    );

    // A running node joins with `kappactl peer join`.
    let c_data = dir.path().join("c");
    let c = ProcessNode::start_in(&c_data, loopback()?, &[]).await?;
    let c_client = c.client().await?;
    let c_id = c_client.status().await?.node_id.context("c's id")?;
    let mut cmd = command("kappactl")?;
    cmd.args(["--ticket", &c.ticket()?.to_string(), "peer", "join"])
        .arg(invite(&a, &[]).await?);
    let out = run(&mut cmd, TIMEOUT).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut both = [b_id, c_id];
    both.sort();
    assert_eq!(peer_ids(&a_client).await?, both);
    assert_eq!(peer_ids(&c_client).await?, [a_id]);
    eventually("c holds both writes", || async {
        Ok(c_client.get("from-b").await?.value().is_some())
    })
    .await?;
    drop((c_client, c));

    // Both peer lists are kept across restarts, and the nodes go on replicating.
    drop((a_client, b_client));
    a.stop_with(libc::SIGTERM)?;
    b.stop_with(libc::SIGTERM)?;
    let a = ProcessNode::start_in(&a_data, a_addr, &[]).await?;
    // B keeps its command line: the invite it used starts it as it is.
    let mut cmd = serve_command(&b_data, b_addr)?;
    cmd.args(["--join", &text]);
    let b = ProcessNode::spawn(cmd, &b_data, b_addr).await?;
    let (a_client, b_client) = (a.client().await?, b.client().await?);
    assert_eq!(peer_ids(&a_client).await?, both);
    assert_eq!(peer_ids(&b_client).await?, [a_id]);
    a_client.put("after-restart", "1").await?;
    eventually("equal version vectors after the restart", || async {
        let (sa, sb) = (a_client.status().await?, b_client.status().await?);
        Ok(sa.version_vector == sb.version_vector && sb.log_lsn == sa.log_lsn)
    })
    .await?;
    Ok(())
}
