//! Safe retries through a real `kappakv serve` process: a write whose answer is lost is sent
//! again with the same request id on a new connection, and the node answers with the first
//! write instead of making a second entry; when no answer comes at all, the client reports that
//! the write may or may not have been made, not that it can simply be retried.
//!
//! A small UDP relay stands between the client and the node: everything the client sends goes
//! through, and the node's packets are dropped while the relay is told to, so the request
//! reaches the node and its answer does not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use kappakv_client::{Client, Ticket};
use kappakv_tests::{ProcessNode, http_get, metric};
use tokio::net::UdpSocket;

/// Whether the relay passes the node's packets on.
const PASS: u8 = 0;
/// Drops the node's packets until the client opens a new connection, then passes them.
const DROP_UNTIL_NEW_CONNECTION: u8 = 1;
/// Drops the node's packets.
const DROP: u8 = 2;

/// A relay on 127.0.0.1 for one client in front of the node at `node`.
struct Relay {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    tasks: tokio::task::JoinSet<()>,
}

impl Relay {
    async fn start(node: SocketAddr) -> anyhow::Result<Self> {
        let outer = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let inner = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = outer.local_addr()?;
        let mode = Arc::new(AtomicU8::new(PASS));
        let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let mut tasks = tokio::task::JoinSet::new();
        {
            let (outer, inner, mode, client) =
                (outer.clone(), inner.clone(), mode.clone(), client.clone());
            tasks.spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = outer.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    // A QUIC long-header Initial packet (RFC 9000 17.2.2): a new connection.
                    let initial = buf[0] & 0xf0 == 0xc0;
                    if initial && mode.load(Ordering::SeqCst) == DROP_UNTIL_NEW_CONNECTION {
                        mode.store(PASS, Ordering::SeqCst);
                    }
                    let _ = inner.send_to(&buf[..n], node).await;
                }
            });
        }
        {
            let mode = mode.clone();
            tasks.spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok(n) = inner.recv(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to
                        && mode.load(Ordering::SeqCst) == PASS
                    {
                        let _ = outer.send_to(&buf[..n], to).await;
                    }
                }
            });
        }
        Ok(Self { addr, mode, tasks })
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// A client of `node` through `relay` that notices a dead connection within a second.
async fn client_through(node: &ProcessNode, relay: &Relay) -> anyhow::Result<Client> {
    let mut ticket: Ticket = node.ticket()?;
    ticket.addrs = vec![relay.addr.into()];
    Ok(Client::builder(ticket)
        .idle_timeout(Duration::from_secs(1))
        .keep_alive(Some(Duration::from_millis(200)))
        .connect_timeout(Duration::from_secs(10))
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_sent_again_and_written_once() -> anyhow::Result<()> {
    let (_dir, node, admin) = ProcessNode::start_with_settings(&[]).await?;
    let direct = node.client().await?;
    let relay = Relay::start(node.addr).await?;
    let client = client_through(&node, &relay).await?;
    client.put("warm", "up").await?;
    let before = direct.status().await?.log_lsn;

    // The request reaches the node, which writes it; its answer is dropped until the client,
    // having found its connection dead, dials again and sends the write once more.
    relay.set(DROP_UNTIL_NEW_CONNECTION);
    let written = client.put("k", "once").await?;

    let after = direct.status().await?.log_lsn;
    assert_eq!(after, before + 1, "one entry for the write, not two");
    assert_eq!(written.lsn, after);
    let got = direct.get("k").await?;
    assert_eq!(got.values.len(), 1, "no sibling: {:?}", got.values);
    assert_eq!(got.values[0].id, written.id);
    let (_, page) = http_get(admin, "/metrics").await?;
    assert_eq!(
        metric(&page, "kappakv_writes_repeated_total") as u64,
        1,
        "the second send was answered with the first write"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_gets_no_answer_at_all_may_have_been_made() -> anyhow::Result<()> {
    let (_dir, node, _admin) = ProcessNode::start_with_settings(&[]).await?;
    let direct = node.client().await?;
    let relay = Relay::start(node.addr).await?;
    let client = client_through(&node, &relay).await?;
    client.put("warm", "up").await?;
    let before = direct.status().await?.log_lsn;

    relay.set(DROP);
    let e = client
        .put("k", "maybe")
        .await
        .expect_err("no answer can arrive");
    assert!(e.is_maybe_committed(), "{e}");
    assert!(!e.is_retryable(), "not a plain retry: {e}");
    assert!(e.to_string().contains("may or may not"), "{e}");
    // Here it was made: the node got the request.
    assert_eq!(direct.status().await?.log_lsn, before + 1);
    Ok(())
}
