//! The client library's examples (`client/examples`) run against a real `kappakv serve`
//! process and print what they say they do.

use std::time::Duration;

use kappakv_tests::{ProcessNode, example, run};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the example `name` with `args` and the node's ticket last; returns its standard output.
async fn run_example(name: &str, args: &[&str], node: &ProcessNode) -> anyhow::Result<String> {
    let mut cmd = std::process::Command::new(example(name)?);
    cmd.args(args).arg(node.ticket()?.to_string());
    let out = run(&mut cmd, TIMEOUT).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{name} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_do_what_they_say() -> anyhow::Result<()> {
    let (dir, node, _) = ProcessNode::start_with_settings(&[]).await?;

    let out = run_example("put_get", &[], &node).await?;
    assert!(out.contains("greeting = hello"), "{out}");

    let out = run_example("siblings", &[], &node).await?;
    assert!(out.contains("siblings: blue, red"), "{out}");
    assert!(out.contains("merged: purple"), "{out}");

    // The view from the whole log, then resumed after what it applied.
    let client = node.client().await?;
    client.put("users/ada", "1").await?;
    client.put("users/bob", "1").await?;
    client.put("orders/1", "1").await?;
    let state = dir.path().join("view.json");
    let state = state.to_str().expect("a UTF-8 temp path");
    let out = run_example("materialized_view", &[state], &node).await?;
    let through = client.status().await?.log_lsn;
    assert!(
        out.contains(&format!("after LSN 0, through LSN {through}")),
        "{out}"
    );
    assert!(
        out.contains("users: 2") && out.contains("orders: 1"),
        "{out}"
    );

    client.delete("users/ada").await?;
    client.put("orders/2", "1").await?;
    let out = run_example("materialized_view", &[state], &node).await?;
    assert!(
        out.contains(&format!("applied 2 changes after LSN {through}")),
        "{out}"
    );
    assert!(
        out.contains("users: 1") && out.contains("orders: 2"),
        "{out}"
    );
    Ok(())
}
