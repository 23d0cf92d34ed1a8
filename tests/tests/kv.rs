//! Key/value round trips, siblings, watches and bad input against a real node over QUIC on
//! 127.0.0.1.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use kappakv_client::{Batch, ScanOptions};
use kappakv_protocol::{Context, ErrorCode};
use kappakv_tests::TestNode;

#[tokio::test]
async fn put_get_delete_batch_scan_history_round_trip() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let c = node.client().await?;

    // Binary keys and values, and an empty value.
    let bin_key = vec![0u8, 255, 10, 13];
    let bin_val = vec![0xff, 0x00, 0xfe];
    c.put(&bin_key, &bin_val).await?;
    c.put("empty", b"").await?;
    let got = c.get(&bin_key).await?;
    assert_eq!(got.values.len(), 1);
    assert_eq!(got.values[0].value.as_deref(), Some(&bin_val[..]));
    let empty = c.get("empty").await?;
    assert_eq!(empty.values[0].value.as_deref(), Some(&b""[..]));

    // Overwrite, then delete: history keeps all three, newest first.
    c.put("k", "v1").await?;
    c.put("k", "v2").await?;
    assert_eq!(
        c.get("k").await?.values[0].value.as_deref(),
        Some(&b"v2"[..])
    );
    c.delete("k").await?;
    let deleted = c.get("k").await?;
    assert!(deleted.values.is_empty());
    assert_eq!(
        deleted.context.0.len(),
        1,
        "the tombstone is in the context"
    );
    let history = c.history("k", 10).await?;
    let values: Vec<Option<&[u8]>> = history.iter().map(|v| v.value.as_deref()).collect();
    assert_eq!(values, vec![None, Some(&b"v2"[..]), Some(&b"v1"[..])]);

    // A batch is one entry: every op gets the same version id.
    let w = c
        .batch(
            Batch::new()
                .put("user/1", "ann")
                .put("user/2", "bob")
                .put("user/3", "cy"),
        )
        .await?;
    for k in ["user/1", "user/2", "user/3"] {
        assert_eq!(c.get(k).await?.values[0].id, w.id);
    }
    c.batch(Batch::new().delete("user/2")).await?;

    // Scan by prefix skips deleted keys and pages transparently.
    let keys: Vec<Vec<u8>> = c
        .scan(ScanOptions::prefix("user/").page_size(1))
        .map(|r| r.map(|kv| kv.key))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert_eq!(keys, vec![b"user/1".to_vec(), b"user/3".to_vec()]);
    let all: Vec<_> = c.scan(ScanOptions::all()).collect().await;
    assert_eq!(all.len(), 4, "bin key, empty, user/1, user/3");
    Ok(())
}

#[tokio::test]
async fn siblings_from_a_shared_context_and_their_merge() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let a = node.client().await?;
    let b = node.client().await?;
    a.put("doc", "base").await?;
    let ctx_a = a.get("doc").await?.context;
    let ctx_b = b.get("doc").await?.context;
    assert_eq!(ctx_a, ctx_b);
    a.put_with("doc", "from a", &ctx_a).await?;
    b.put_with("doc", "from b", &ctx_b).await?;
    let got = a.get("doc").await?;
    let values: BTreeSet<Vec<u8>> = got.values.iter().filter_map(|v| v.value.clone()).collect();
    assert_eq!(
        values,
        BTreeSet::from([b"from a".to_vec(), b"from b".to_vec()])
    );
    assert_eq!(got.context.0.len(), 2);

    // Writing with the context of both merges them into one value.
    a.put_with("doc", "merged", &got.context).await?;
    let merged = b.get("doc").await?;
    assert_eq!(merged.values.len(), 1);
    assert_eq!(merged.values[0].value.as_deref(), Some(&b"merged"[..]));
    Ok(())
}

#[tokio::test]
async fn concurrent_plain_puts_never_make_siblings() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = node.client().await?;
        tasks.push(tokio::spawn(async move {
            for j in 0..25 {
                c.put("hot", format!("{i}-{j}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let c = node.client().await?;
    let got = c.get("hot").await?;
    assert_eq!(
        got.values.len(),
        1,
        "plain puts supersede everything current: {got:?}"
    );
    assert_eq!(c.history("hot", 1000).await?.len(), 400);
    Ok(())
}

#[tokio::test]
async fn watch_from_zero_replays_every_change_in_order_then_live() -> anyhow::Result<()> {
    let node = TestNode::start_with(|c| c.watch_heartbeat_ms = 50).await?;
    let c = node.client().await?;
    for i in 0..20 {
        c.put(format!("w/{i:02}"), "x").await?;
    }
    c.put("other", "ignored").await?;
    let mut watch = c.watch("w/", Some(0));
    for i in 0..20 {
        let change = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await?
            .expect("open")?;
        assert_eq!(change.key, format!("w/{i:02}").into_bytes());
        assert_eq!(change.lsn, i + 1);
    }
    c.put("w/live", "y").await?;
    let live = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await?
        .expect("open")?;
    assert_eq!(live.key, b"w/live");
    assert_eq!(live.version.value.as_deref(), Some(&b"y"[..]));
    Ok(())
}

#[tokio::test]
async fn typed_errors_for_bad_requests_while_others_are_served() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let good = node.client().await?;
    let c = node.client().await?;

    // The client refuses an oversized value before sending it; the server's own check is
    // exercised over a raw connection in `hostile.rs`.
    let big = vec![0u8; kappakv_protocol::limits::MAX_VALUE_BYTES + 1];
    let err = c.put("big", &big).await.unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");

    let ro = node.read_only_client().await?;
    let err = ro.put("k", "v").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    assert!(
        ro.get("k").await?.values.is_empty(),
        "read-only clients can read"
    );

    let mut bad_ticket = node.ticket();
    bad_ticket.token = "rw_wrong".into();
    let Err(err) = kappakv_client::Client::connect(&bad_ticket).await else {
        panic!("refused")
    };
    assert!(err.to_string().to_lowercase().contains("token"), "{err}");

    let stale = Context(vec![kappakv_protocol::EntryId([9; 32])]);
    good.put_with("stale", "ok", &stale).await?;
    assert_eq!(good.get("stale").await?.values.len(), 1);
    Ok(())
}

#[tokio::test]
async fn large_values_come_back_in_bounded_replies() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let c = node.client().await?;
    let mib = vec![7u8; kappakv_protocol::limits::MAX_VALUE_BYTES];

    // Eight 1 MiB versions of one key: history returns the newest that fit in one reply.
    for _ in 0..8 {
        c.put("big", &mib).await?;
    }
    let history = c.history("big", 100).await?;
    assert!(
        (1..8).contains(&history.len()),
        "{} versions",
        history.len()
    );

    // A scan over many large keys pages by size and still returns every key.
    for i in 0..6 {
        c.put(format!("many/{i}"), &mib).await?;
    }
    let keys: Vec<_> = c.scan(ScanOptions::prefix("many/")).collect().await;
    assert_eq!(keys.len(), 6);

    // Siblings that together exceed a reply are a typed error, and merging them fixes it.
    c.put("wide", "base").await?;
    let ctx = c.get("wide").await?.context;
    let mut siblings = Vec::new();
    for _ in 0..5 {
        siblings.push(c.put_with("wide", &mib, &ctx).await?.id);
    }
    let err = c.get("wide").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
    let context = Context(siblings).normalized();
    assert!(
        err.to_string().contains(&context.to_string()),
        "the error names the context to merge: {err}"
    );
    c.put_with("wide", "merged", &context).await?;
    assert_eq!(c.get("wide").await?.values.len(), 1);
    Ok(())
}
