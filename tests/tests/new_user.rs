//! What a new user does first: `kappakv serve` with no flags in an empty folder, then
//! `kappactl put` and `kappactl get` from the same folder with no setup at all.
//!
//! This is the only test that uses the default port, 7700: keep it that way, and keep it the
//! only test in this file, so no two tests ever race for the port.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use kappakv_tests::{ProcessNode, command, run};

const DEFAULT_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], kappakv_protocol::DEFAULT_PORT);

/// Runs `kappactl ARGS` in `dir`, with nothing but the folder to find the node by.
async fn kappactl(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    run(
        command("kappactl")?.args(args).current_dir(dir),
        Duration::from_secs(30),
    )
    .await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_then_put_and_get_in_the_same_folder_just_works() -> anyhow::Result<()> {
    let addr = SocketAddr::from(DEFAULT_ADDR);
    if let Err(e) = UdpSocket::bind(addr) {
        eprintln!(
            "skipping new_user: the default address {addr} is taken on this machine ({e}); \
             stop whatever listens there to run this test"
        );
        return Ok(());
    }
    let folder = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("serve.log");

    let mut serve = command("kappakv")?;
    serve
        .arg("serve")
        .current_dir(folder.path())
        .stderr(std::fs::File::create(&log)?);
    let started = ProcessNode::spawn(serve, &folder.path().join("kappakv.data"), addr).await;
    let mut node = match started {
        Ok(node) => node,
        Err(e) => {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            if output.contains("cannot listen on") {
                // Something took the port between the check above and the node's bind.
                eprintln!("skipping new_user: the default address {addr} was taken: {output}");
                return Ok(());
            }
            return Err(e.context(output));
        }
    };
    assert!(
        folder.path().join("kappakv.data/client.ticket").is_file(),
        "the ticket is where kappactl looks for it"
    );

    let put = kappactl(folder.path(), &["put", "k", "v"]).await?;
    assert!(put.status.success(), "put: {}", text(&put.stderr));
    let id = text(&put.stdout);
    let id = id.trim();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "put prints the new version's id, got {id:?}"
    );

    let get = kappactl(folder.path(), &["get", "k"]).await?;
    assert!(get.status.success(), "get: {}", text(&get.stderr));
    let stdout = text(&get.stdout);
    assert_eq!(stdout.lines().next(), Some("v"), "{stdout}");

    let get = kappactl(folder.path(), &["get", "k", "--json"]).await?;
    assert!(get.status.success(), "get --json: {}", text(&get.stderr));
    let json: serde_json::Value = serde_json::from_slice(&get.stdout)?;
    assert_eq!(json["key"], "k", "{json}");
    assert_eq!(json["values"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json["values"][0]["value"], "v", "{json}");
    assert_eq!(json["values"][0]["id"], id, "{json}");
    assert_eq!(json["context"], id, "{json}");

    let missing = kappactl(folder.path(), &["get", "nosuchkey", "--json"]).await?;
    assert_eq!(missing.status.code(), Some(0), "{}", text(&missing.stderr));
    let json: serde_json::Value = serde_json::from_slice(&missing.stdout)?;
    assert_eq!(json["values"], serde_json::json!([]), "{json}");

    assert_eq!(node.stop_with(libc::SIGTERM)?, Some(0));
    Ok(())
}
