//! The client against the in-process stand-in node: pinning, hello, writes, reads with
//! `min_lsn`, scan paging, watch, and reconnects.

mod common;

use std::time::Duration;

use common::MockNode;
use futures_util::TryStreamExt;
use kappakv_client::{Batch, Client, ConnectError, RequestError, ScanOptions};
use kappakv_protocol::{ErrorCode, NodeId, Request, Ticket};

fn quick(ticket: Ticket) -> kappakv_client::ClientBuilder {
    Client::builder(ticket)
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn writes_reads_and_read_your_writes() {
    let node = MockNode::start();
    let client = quick(node.ticket()).connect().await.unwrap();
    assert_eq!(client.node_id(), node.node_id);
    assert!(client.get("missing").await.unwrap().is_empty());

    let w = client.put("k", "v1").await.unwrap();
    assert_eq!(w.lsn, 1);
    let got = client.get("k").await.unwrap();
    assert_eq!(got.value(), Some(&b"v1"[..]));
    assert_eq!(got.context, w.context());
    let Some(Request::Get { min_lsn, .. }) = node.state().requests.last().cloned() else {
        panic!()
    };
    assert_eq!(min_lsn, 1, "reads carry the LSN this client wrote");

    client
        .batch(Batch::new().put("a", "1").put("b", "2").delete("k"))
        .await
        .unwrap();
    assert!(client.get("k").await.unwrap().is_empty());
    let err = client
        .batch(Batch::new().put("a", "1").put("a", "2"))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Invalid(_)), "{err}");

    client
        .put_json("j", &serde_json::json!({"n": 1}))
        .await
        .unwrap();
    let j = client.get_json::<serde_json::Value>("j").await.unwrap();
    assert_eq!(j.value(), Some(&serde_json::json!({"n": 1})));

    let status = client.status().await.unwrap();
    assert_eq!(status.node_id, Some(node.node_id));
    let err = client.peer_list().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownRequest));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn scan_follows_pages_up_to_the_limit() {
    let node = MockNode::start();
    let client = quick(node.ticket())
        .scan_page_size(10)
        .connect()
        .await
        .unwrap();
    for i in 0..25 {
        client.put(format!("key/{i:02}"), "x").await.unwrap();
    }
    client.put("other", "x").await.unwrap();
    let all: Vec<_> = client
        .scan(ScanOptions::prefix("key/"))
        .try_collect()
        .await
        .unwrap();
    let keys: Vec<String> = all
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(
        keys,
        (0..25).map(|i| format!("key/{i:02}")).collect::<Vec<_>>()
    );
    let scans = node
        .state()
        .requests
        .iter()
        .filter(|r| matches!(r, Request::Scan { .. }))
        .count();
    assert_eq!(scans, 3);

    let some: Vec<_> = client
        .scan(ScanOptions::prefix("key/").limit(15))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(some.len(), 15);
    let window: Vec<_> = client
        .scan(ScanOptions::all().start("key/20").end("other"))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(window.len(), 5);
}

#[tokio::test]
async fn watch_replays_from_an_lsn() {
    let node = MockNode::start();
    let client = quick(node.ticket()).connect().await.unwrap();
    client.put("w/a", "1").await.unwrap();
    client.put("x/b", "2").await.unwrap();
    client.put("w/c", "3").await.unwrap();
    let mut watch = client.watch("w/", Some(0));
    assert_eq!(watch.try_next().await.unwrap().unwrap().lsn, 1);
    assert_eq!(watch.try_next().await.unwrap().unwrap().lsn, 3);

    // A cut connection: the watch dials again and resubscribes from lsn 3, skipping what it
    // already delivered.
    node.drop_connections();
    let other = quick(node.ticket()).connect().await.unwrap();
    other.put("w/d", "4").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.try_next())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().lsn, 4);
    let Some(Request::Watch { from_lsn, .. }) = node
        .state()
        .requests
        .iter()
        .rev()
        .find(|r| matches!(r, Request::Watch { .. }))
        .cloned()
    else {
        panic!("no watch request")
    };
    assert_eq!(
        from_lsn,
        Some(2),
        "resubscribes just before the last change delivered"
    );
}

#[tokio::test]
async fn reads_survive_a_lost_connection_and_writes_say_so() {
    let node = MockNode::start();
    let client = quick(node.ticket()).connect().await.unwrap();
    client.put("k", "v").await.unwrap();

    node.state().kill_next = Some("get");
    let got = client.get("k").await.unwrap();
    assert_eq!(got.value(), Some(&b"v"[..]));
    assert_eq!(
        node.state().hellos,
        2,
        "a get on a lost connection dials again and retries once"
    );

    // A write whose connection broke after it was sent goes again on a new connection, with
    // the same request id, so that a node that made it answers instead of writing again.
    node.state().kill_next = Some("write");
    client.put("k", "w").await.unwrap();
    assert_eq!(node.state().hellos, 3);
    let ids: Vec<_> = node
        .state()
        .requests
        .iter()
        .filter_map(|r| match r {
            Request::Write { request_id, .. } => Some(*request_id),
            _ => None,
        })
        .collect();
    let [.., first, again] = ids.as_slice() else {
        panic!("two sends of the write: {ids:?}")
    };
    assert!(first.is_some() && first == again, "{ids:?}");

    // Broken again: the outcome is unknown, and not a plain retry.
    node.state().kill_next = Some("write");
    node.state().kill_after = Some("write");
    let err = client.put("k", "x").await.unwrap_err();
    assert!(err.is_maybe_committed(), "{err}");
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn connect_errors_are_precise() {
    let node = MockNode::start();
    let mut wrong = node.ticket();
    wrong.node_id = NodeId([7; 32]);
    let err = quick(wrong).connect().await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ConnectError::WrongNode { found: Some(f), .. } if f == node.node_id),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "the node at {} is not {}",
            node.addr,
            NodeId([7; 32])
        )),
        "{text}"
    );

    let mut bad_token = node.ticket();
    bad_token.token = "nope".into();
    let err = quick(bad_token).connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::Unauthorized { .. }), "{err}");
    assert!(!err.is_retryable());

    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut nobody = node.ticket();
    nobody.addrs = vec![silent.local_addr().unwrap().into()];
    let err = Client::builder(nobody)
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
}
