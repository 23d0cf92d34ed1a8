//! Offline sync end to end: export from a running node, import into a data dir that never saw
//! the network, start a node there, and compare what the two nodes serve. Export and backup of
//! a running node take everything it acknowledged and nothing it has not: not a batch that is
//! written but whose `fdatasync` has not returned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use kappakv_client::{Batch, Client, ScanOptions};
use kappakv_protocol::record::{RecordDecode, decode_record};
use kappakv_protocol::{EntryId, KeyVersions, SignedEntry};
use kappakv_server::Server;
use kappakv_server::auth::Role;
use kappakv_server::commands::live::BoundError;
use kappakv_server::commands::{backup, export, import, verify};
use kappakv_server::health::Health;
use kappakv_server::log::fault::{FaultOp, Faults, FaultyLogDir};
use kappakv_server::log::{FsLogDir, LogDir, LogReader};
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
    // The export asks the node, which serves on this runtime: the worker it blocks hands its
    // tasks on.
    let summary = tokio::task::block_in_place(|| {
        export::run(node.dir.path(), since, &mut out, "memory").expect("export")
    });
    (out, summary.entries)
}

/// Exports the data dir `data` on the blocking pool; the entries, in order, and the summary.
async fn export_entries(data: &Path) -> anyhow::Result<(Vec<SignedEntry>, export::ExportSummary)> {
    let data = data.to_path_buf();
    let (bytes, summary) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        export::run(&data, None, &mut out, "memory").map(|s| (out, s))
    })
    .await??;
    let mut entries = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let RecordDecode::Record { payload, used } =
            decode_record(rest, kappakv_protocol::limits::MAX_RECORD_BYTES)?
        else {
            anyhow::bail!("the export ends inside a record");
        };
        entries.push(SignedEntry::decode_payload(payload)?);
        rest = &rest[used..];
    }
    Ok((entries, summary))
}

/// A server whose log goes through a fault-injecting directory.
async fn start_faulty(data: &Path) -> anyhow::Result<(Server, Arc<Faults>)> {
    let dir = FaultyLogDir::new(Arc::new(FsLogDir::new(data.join("log"))));
    let faults = dir.faults();
    let log_dir: Arc<dyn LogDir> = Arc::new(dir);
    let server =
        Server::start_with_log_dir(test_config(data), Health::new(), Some(log_dir)).await?;
    Ok((server, faults))
}

fn import_into(dir: &std::path::Path, bytes: Vec<u8>) -> import::ImportSummary {
    let source = import::ImportSource {
        name: "export".into(),
        bytes,
    };
    import::run_sources(dir, &[source], None).expect("import")
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
    let err = import::run_sources(b_dir.path(), &[], None).unwrap_err();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_backup_of_a_running_node_leave_out_a_batch_not_yet_synced() -> anyhow::Result<()>
{
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    let (server, faults) = start_faulty(&data).await?;
    let client = Client::connect(&server.ticket(Role::ReadWrite)).await?;
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(client.put(format!("k{i}"), format!("v{i}")).await?);
    }
    let durable = acked.last().expect("ten writes").lsn;

    // The next batch is written, and its fdatasync held before it starts.
    let hold = faults.hold_next(FaultOp::SyncData);
    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.put("unsynced", "not acknowledged yet").await }
    });
    let reached = {
        let hold = hold.clone();
        tokio::task::spawn_blocking(move || hold.wait_reached(Duration::from_secs(10))).await?
    };
    assert!(reached, "the write did not reach its fdatasync");
    let on_disk = LogReader::open(&data.join("log"))?.last_lsn()?;
    assert_eq!(on_disk, durable + 1, "the unsynced record is whole on disk");
    assert!(!pending.is_finished(), "acknowledged before its fdatasync");

    let (entries, summary) = export_entries(&data).await?;
    let ids: Vec<EntryId> = entries.iter().map(|e| e.id).collect();
    let want: Vec<EntryId> = acked.iter().map(|w| w.id).collect();
    assert_eq!(
        ids, want,
        "the export holds exactly the acknowledged writes"
    );
    assert_eq!((summary.through_lsn, summary.held_back), (durable, 0));

    let out = root.path().join("backup");
    let manifest = {
        let (data, out) = (data.clone(), out.clone());
        tokio::task::spawn_blocking(move || backup::run(&data, &out)).await??
    };
    assert_eq!(manifest.lsn, durable, "{manifest}");
    assert_eq!(
        manifest.version_vector.into_iter().collect::<Vec<_>>(),
        vec![(server.node_id(), durable)]
    );
    assert_eq!(verify::run(&out)?.entries, durable);

    // Released, the write is acknowledged, and the next export carries it.
    hold.release();
    let written = pending.await??;
    assert_eq!(written.lsn, durable + 1);
    let (entries, _) = export_entries(&data).await?;
    assert_eq!(entries.last().map(|e| e.id), Some(written.id));
    assert_eq!(entries.len() as u64, durable + 1);

    drop(client);
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_under_write_load_holds_every_acknowledged_write_and_only_the_log()
-> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let export_started = Arc::new(AtomicBool::new(false));
    let before: Arc<Mutex<BTreeSet<EntryId>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = node.client().await?;
        let (stop, export_started, before) = (stop.clone(), export_started.clone(), before.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                // Read before the put is sent: only a write acknowledged before the export
                // began must be in it.
                let early = !export_started.load(Ordering::Acquire);
                let written = client.put(format!("w{w}/{i:06}"), "x").await?;
                if early {
                    before.lock().expect("not poisoned").insert(written.id);
                }
                i += 1;
            }
            anyhow::Ok(i)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    export_started.store(true, Ordering::Release);
    let (entries, summary) = export_entries(node.dir.path()).await?;
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await??;
    }

    let exported: BTreeSet<EntryId> = entries.iter().map(|e| e.id).collect();
    let before = before.lock().expect("not poisoned").clone();
    assert!(!before.is_empty());
    let missing = before.difference(&exported).count();
    assert_eq!(missing, 0, "acknowledged writes missing from the export");
    // The export is the node's log, record for record, up to where it stopped.
    let reader = LogReader::open(&node.dir.path().join("log"))?;
    let log: Vec<EntryId> = reader
        .iter(0, summary.through_lsn)?
        .map(|r| r.map(|(_, e)| e.id))
        .collect::<Result<_, _>>()?;
    assert_eq!(entries.iter().map(|e| e.id).collect::<Vec<_>>(), log);
    assert_eq!(summary.held_back, 0);
    node.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_running_node_that_refuses_fails_instead_of_guessing() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    node.client().await?.put("k", "v").await?;
    // A ticket whose token the node does not know.
    let mut ticket = node.ticket();
    ticket.token = "rw_stale".into();
    std::fs::write(node.dir.path().join("client.ticket"), format!("{ticket}\n"))?;
    let data = node.dir.path().to_path_buf();
    let err = tokio::task::spawn_blocking(move || {
        export::run(&data, None, &mut Vec::new(), "memory").unwrap_err()
    })
    .await?;
    assert!(
        matches!(&err, export::ExportError::Bound(BoundError::Refused { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("refused the status request"),
        "{err}"
    );
    node.server.shutdown().await;
    Ok(())
}
