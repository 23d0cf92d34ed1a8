//! Conditional writes through a real `kappakv serve` process: a stale context is refused with
//! `Conflict` and writes nothing, the current one is applied, a batch is all or nothing, two
//! writers on one context cannot both win, and `kappactl --if-context` exits with its status.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use kappakv_client::{Batch, Client, Context, ErrorCode, RequestError, Written};
use kappakv_tests::{ProcessNode, command, run};

/// The values of `key`, as text, and its context.
async fn read(client: &Client, key: &str) -> anyhow::Result<(Vec<String>, Context)> {
    let got = client.get(key).await?;
    let values = got
        .values
        .iter()
        .map(|v| String::from_utf8_lossy(v.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    Ok((values, got.context))
}

fn conflict(result: Result<Written, RequestError>) -> anyhow::Result<RequestError> {
    match result {
        Err(e) if e.is_conflict() => Ok(e),
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_context_is_refused_and_the_current_one_applied() -> anyhow::Result<()> {
    let (_dir, node, _) = ProcessNode::start_with_settings(&[]).await?;
    let client = node.client().await?;

    // A key nobody wrote: the empty context holds, once.
    client.put_if("lock", "a", &Context::default()).await?;
    let e = conflict(client.put_if("lock", "b", &Context::default()).await)?;
    assert_eq!(e.code(), Some(ErrorCode::Conflict));
    assert!(e.to_string().contains("lock"), "{e}");
    assert_eq!(read(&client, "lock").await?.0, ["a"]);

    // Compare and set.
    client.put("k", "v1").await?;
    let (_, v1) = read(&client, "k").await?;
    let before = client.status().await?.log_lsn;
    conflict(client.put_if("k", "stale", &Context::default()).await)?;
    assert_eq!(
        client.status().await?.log_lsn,
        before,
        "a refused write adds nothing to the log"
    );
    client.put_if("k", "v2", &v1).await?;
    let (values, v2) = read(&client, "k").await?;
    assert_eq!(values, ["v2"]);
    conflict(client.put_if("k", "v3", &v1).await)?;
    assert_eq!(read(&client, "k").await?.0, ["v2"]);

    // A deleted key has no value: the empty context holds, and the put supersedes the
    // tombstone, so one version is left.
    client.delete_if("k", &v2).await?;
    let (values, tombstone) = read(&client, "k").await?;
    assert!(values.is_empty() && tombstone.0.len() == 1);
    let w = client.put_if("k", "again", &Context::default()).await?;
    let (values, context) = read(&client, "k").await?;
    assert_eq!(values, ["again"]);
    assert_eq!(context.0, [w.id]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_batch_is_all_or_nothing() -> anyhow::Result<()> {
    let (_dir, node, _) = ProcessNode::start_with_settings(&[]).await?;
    let client = node.client().await?;
    client.put("a", "1").await?;
    client.put("b", "1").await?;
    let (_, a) = read(&client, "a").await?;
    let (_, b) = read(&client, "b").await?;
    client.put("b", "2").await?; // b's context is stale now

    let stale = Batch::new().put_with("a", "x", &a).put_with("b", "x", &b);
    conflict(client.batch_if(stale).await)?;
    assert_eq!(read(&client, "a").await?.0, ["1"], "nothing of the batch");
    assert_eq!(read(&client, "b").await?.0, ["2"]);

    let (_, b) = read(&client, "b").await?;
    client
        .batch_if(Batch::new().put_with("a", "x", &a).delete_with("b", &b))
        .await?;
    assert_eq!(read(&client, "a").await?.0, ["x"]);
    assert!(read(&client, "b").await?.0.is_empty());

    // Every op names its context.
    let e = client
        .batch_if(Batch::new().put("c", "1"))
        .await
        .expect_err("an op without a context");
    assert!(matches!(e, RequestError::Invalid(_)), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_writers_on_one_context_exactly_one_wins() -> anyhow::Result<()> {
    let (_dir, node, _) = ProcessNode::start_with_settings(&[]).await?;
    let client = node.client().await?;
    for round in 0..5 {
        let key = format!("race/{round}");
        client.put(&key, "start").await?;
        let (_, context) = read(&client, &key).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for writer in 0..16 {
            let client = node.client().await?;
            let (key, context) = (key.clone(), context.clone());
            tasks.spawn(async move { client.put_if(&key, format!("w{writer}"), &context).await });
        }
        let (mut won, mut lost) = (0, 0);
        while let Some(result) = tasks.join_next().await {
            match result? {
                Ok(_) => won += 1,
                Err(e) if e.is_conflict() => lost += 1,
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!((won, lost), (1, 15), "round {round}");
        let (values, _) = read(&client, &key).await?;
        assert_eq!(values.len(), 1, "no siblings: {values:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kappactl_if_context_exits_with_the_conflict_status() -> anyhow::Result<()> {
    let (_dir, node, _) = ProcessNode::start_with_settings(&[]).await?;
    let ticket = node.ticket()?.to_string();
    let kappactl = |args: &[&str]| {
        let mut cmd = command("kappactl")?;
        cmd.args(["--ticket", &ticket]).args(args);
        anyhow::Ok(cmd)
    };
    let timeout = Duration::from_secs(60);
    let succeeded = |out: &std::process::Output| {
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::Ok(())
    };

    let out = run(
        &mut kappactl(&["put", "k", "v1", "--if-context", ""])?,
        timeout,
    )
    .await?;
    succeeded(&out)?;
    let out = run(
        &mut kappactl(&["put", "k", "v2", "--if-context", ""])?,
        timeout,
    )
    .await?;
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("conflict"), "{stderr}");

    let out = run(&mut kappactl(&["get", "k", "--json"])?, timeout).await?;
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let context = got["context"].as_str().context("a context")?.to_string();
    let out = run(
        &mut kappactl(&["put", "k", "v2", "--if-context", &context])?,
        timeout,
    )
    .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &mut kappactl(&["del", "k", "--if-context", &context])?,
        timeout,
    )
    .await?;
    assert_eq!(out.status.code(), Some(6), "a stale delete: {out:?}");
    Ok(())
}
