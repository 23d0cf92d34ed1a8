//! A node killed in the middle of catching up from a peer: after a restart on the same data dir
//! and port it resumes from its version vector, ends with exactly the peer's log (no entry
//! twice, every chain verifying), and the peer does not send again what it already had.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_protocol::{KeyVersions, NodeId, PeerStatus};
use kappakv_tests::{ProcessNode, TestNode, eventually, free_udp_port, run};

/// Entries on A before B starts catching up.
const ENTRIES: u64 = 20_000;
/// Concurrent writers filling A: enough for group commits of many entries.
const WRITERS: u64 = 64;
/// What A reads from its log per send (`SEND_CHUNK` in the replication driver).
const SEND_CHUNK: u64 = 2048;
/// Entries A can still push into the dead connection before it learns of the restart: at most
/// a stream's flow-control window on the node (256 KiB, `net/endpoint.rs`; 1 MiB here, as a
/// margin) over the smallest payload of this test's entries (about 150 bytes). They count as
/// sent, never as received.
const IN_FLIGHT_MAX: u64 = (1024 * 1024) / 150;

async fn scan_all(c: &Client) -> anyhow::Result<Vec<KeyVersions>> {
    let items: Vec<_> = c.scan(ScanOptions::all()).collect().await;
    Ok(items.into_iter().collect::<Result<_, _>>()?)
}

async fn peer_of(c: &Client, id: NodeId) -> anyhow::Result<PeerStatus> {
    c.status()
        .await?
        .peers
        .into_iter()
        .find(|p| p.node_id == id)
        .ok_or_else(|| anyhow::anyhow!("{id} is not a peer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_catch_up_resumes_without_duplicates() -> anyhow::Result<()> {
    // A holds ENTRIES entries, written concurrently so that group commits sign runs of many.
    let a = TestNode::start().await?;
    let ca = Arc::new(a.client().await?);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let ca = ca.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..ENTRIES).step_by(usize::try_from(WRITERS)?) {
                ca.put(
                    format!("key/{i:06}"),
                    format!("value {i} {}", "x".repeat(64)),
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let total = ca.status().await?.log_lsn;
    assert_eq!(total, ENTRIES);

    // B, a real `kappakv serve`, peered both ways with A.
    let b_dir = tempfile::tempdir()?;
    let b_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let mut b = ProcessNode::start(b_dir.path(), b_addr).await?;
    let b_id = b.ticket()?.node_id;
    ca.peer_add(b_id, b_addr.to_string()).await?;
    b.client()
        .await?
        .peer_add(a.server.node_id(), a.server.addr().to_string())
        .await?;

    // Killed once it holds between 10% and 90% of A's log.
    let cb = b.client().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let had = loop {
        let lsn = cb.status().await?.log_lsn;
        if lsn * 10 >= total {
            anyhow::ensure!(
                lsn * 10 <= total * 9,
                "B caught up too fast to be killed mid-way ({lsn} of {total})"
            );
            b.stop_with(libc::SIGKILL)?;
            break lsn;
        }
        anyhow::ensure!(Instant::now() < deadline, "B did not start catching up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    drop(cb);

    // Restarted on the same data dir and port; its peers were kept in the data dir.
    let sent_before = peer_of(&ca, b_id).await?.sent;
    let mut b = ProcessNode::start(b_dir.path(), b_addr).await?;
    let cb = b.client().await?;
    let restarted_with = cb.status().await?.log_lsn;
    assert!(
        restarted_with >= had,
        "B lost durable entries: {restarted_with} < {had}"
    );
    eventually("B catches up after the restart", || async {
        let (sa, sb) = (ca.status().await?, cb.status().await?);
        Ok(sa.version_vector == sb.version_vector)
    })
    .await?;

    // Exactly A's log: as many records, the same view.
    let (sa, sb) = (ca.status().await?, cb.status().await?);
    assert_eq!(
        sb.log_lsn, sa.log_lsn,
        "B holds an entry twice, or lacks one"
    );
    assert_eq!(scan_all(&cb).await?, scan_all(&ca).await?);

    // A did not send again what B had when it restarted: what it sent since is what B
    // appended from it (B's counter starts at 0 with the process), give or take what went into
    // the lost connection before A learnt of the restart: one read of A's log, bounded by flow
    // control. A full resend would be the whole log again.
    let sent_after = peer_of(&ca, b_id).await?.sent - sent_before;
    let appended = peer_of(&cb, a.server.node_id()).await?.received;
    assert!(
        appended <= total - had,
        "B appended {appended} entries from A after the restart, but had {had} of {total}"
    );
    assert!(
        sent_after <= appended + SEND_CHUNK + IN_FLIGHT_MAX,
        "A sent {sent_after} entries after the restart; B lacked only {appended}"
    );

    // B's log verifies offline: CRCs, links, signatures, chains ending signed.
    drop(cb);
    b.stop_with(libc::SIGTERM)?;
    let out = run(
        kappakv_tests::command("kappakv")?
            .args(["verify", "--data-dir"])
            .arg(b_dir.path()),
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "kappakv verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    a.server.shutdown().await;
    Ok(())
}
