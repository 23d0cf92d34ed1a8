//! Offline sync end to end: export from a running node, import into a data dir that never saw
//! the network, start a node there, and compare what the two nodes serve.

use std::collections::BTreeMap;

use futures_util::StreamExt as _;
use kappakv_client::{Batch, Client, ScanOptions};
use kappakv_protocol::KeyVersions;
use kappakv_server::Server;
use kappakv_server::commands::{export, import};
use kappakv_tests::{TestNode, test_config};

async fn scan_all(client: &Client) -> anyhow::Result<BTreeMap<Vec<u8>, KeyVersions>> {
    let mut all = BTreeMap::new();
    let mut scan = client.scan(ScanOptions::all());
    while let Some(kv) = scan.next().await {
        let kv = kv?;
        all.insert(kv.key.clone(), kv);
    }
    Ok(all)
}

fn export_from(node: &TestNode, since: Option<&export::VersionVector>) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let summary = export::run(node.dir.path(), since, &mut out, "memory").expect("export");
    (out, summary.entries)
}

fn import_into(dir: &std::path::Path, bytes: Vec<u8>) -> import::ImportSummary {
    let source = import::ImportSource {
        name: "export".into(),
        bytes,
    };
    import::run_sources(dir, &[source]).expect("import")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_node_serves_what_the_exporting_node_serves() -> anyhow::Result<()> {
    let a = TestNode::start().await?;
    let ca = a.client().await?;
    for i in 0..40 {
        ca.put(format!("k{:02}", i % 25), format!("v{i}")).await?;
    }
    ca.delete("k03").await?;
    ca.batch(
        Batch::new()
            .put("b/1", "one")
            .put("b/2", "two")
            .delete("k04"),
    )
    .await?;

    // Exported while A serves: export only reads.
    let (bytes, entries) = export_from(&a, None);
    assert_eq!(entries, 42);
    let b_dir = tempfile::tempdir()?;
    let summary = import_into(b_dir.path(), bytes);
    assert_eq!(summary.to_string(), "42 new, 0 already present, 0 rejected");

    let b = Server::start(test_config(b_dir.path())).await?;
    let cb = Client::connect(&b.ticket(kappakv_server::auth::Role::ReadWrite)).await?;
    // The indexes catch up from the imported log on start.
    ca.get("k00").await?;
    let want = scan_all(&ca).await?;
    assert_eq!(scan_all(&cb).await?, want);
    assert!(!want.contains_key(&b"k03"[..]));
    let have: export::VersionVector = cb.status().await?.version_vector.into_iter().collect();

    // While B serves, its log is locked.
    let err = import::run_sources(b_dir.path(), &[]).unwrap_err();
    assert!(
        err.to_string().contains("is kappakv serve running?"),
        "{err}"
    );
    drop(cb);
    b.shutdown().await;

    // More writes on A; only what B lacks travels.
    for i in 0..5 {
        ca.put(format!("late{i}"), "x").await?;
    }
    let (bytes, entries) = export_from(&a, Some(&have));
    assert_eq!(entries, 5);
    let summary = import_into(b_dir.path(), bytes);
    assert_eq!((summary.new, summary.present), (5, 0));
    let (everything, _) = export_from(&a, None);
    let summary = import_into(b_dir.path(), everything);
    assert_eq!((summary.new, summary.present), (0, 47));

    let b = Server::start(test_config(b_dir.path())).await?;
    let cb = Client::connect(&b.ticket(kappakv_server::auth::Role::ReadWrite)).await?;
    assert_eq!(scan_all(&cb).await?, scan_all(&ca).await?);
    drop(cb);
    b.shutdown().await;
    drop(ca);
    a.server.shutdown().await;
    Ok(())
}
