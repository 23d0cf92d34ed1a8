//! `commands::backup` and `commands::restore` on logs built record by record: the backup ends
//! where every chain ends signed, even when the log's tail is a batch caught half-written.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;

use common::{ChainBuilder, payloads};
use kappakv_server::commands::backup::{self, BackupError};
use kappakv_server::commands::live::BoundError;
use kappakv_server::commands::restore::{self, RestoreError};
use kappakv_server::log::{LogConfig, LogStore};

#[test]
fn backup_cuts_at_the_last_signed_point_and_restores_a_log_that_verifies() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let node = kappakv_server::identity::load_or_create(&data).unwrap();
    std::fs::write(data.join("peers"), "").unwrap();
    let log_dir = kappakv_server::log::log_dir(&data);
    // Small segments, so the backup spans several.
    let cfg = LogConfig {
        segment_bytes_max: 4096,
        ..LogConfig::default()
    };
    let (mut store, _) = LogStore::open(&log_dir, &cfg).unwrap();
    let mut a = ChainBuilder::new(1);
    let mut b = ChainBuilder::new(2);
    for _ in 0..20 {
        store.append(&payloads(&a.batch(3, 100))).unwrap();
        store.append(&payloads(&b.batch(2, 100))).unwrap();
    }
    let consistent = store.last_lsn();
    assert_eq!(consistent, 100);
    // The tail: a batch of which only the unsigned first entries made it, then a torn record.
    let tail = vec![a.next(100, false), b.next(100, false), a.next(100, false)];
    store.append(&payloads(&tail)).unwrap();
    let last_segment = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last_segment)
        .unwrap()
        .write_all(&[0x40, 0, 0, 0, 1, 2])
        .unwrap();

    // While the store is open (and holds the log's lock), as next to a running node, the
    // backup takes only what that node reports durable; with no node to ask, it refuses.
    let out = root.path().join("backup");
    let err = backup::run(&data, &out).unwrap_err();
    assert!(
        matches!(err, BackupError::Bound(BoundError::NoTicket { .. })),
        "{err}"
    );
    assert!(!out.exists(), "a refused backup writes nothing");
    // As a writer that stopped mid-batch leaves it.
    drop(store);
    let manifest = backup::run(&data, &out).unwrap();
    assert_eq!(manifest.lsn, consistent);
    assert_eq!(manifest.node_id, node.node_id());
    let expected: BTreeMap<_, _> = [(a.keypair.node_id(), 60), (b.keypair.node_id(), 40)].into();
    assert_eq!(manifest.version_vector, expected);
    assert!(manifest.segments.len() > 1, "{manifest:?}");
    assert!(out.join("identity.key").is_file() && out.join("peers").is_file());
    assert!(!out.join("tokens").exists() && !out.join("indexes.redb").exists());
    // A backup is laid out like a data dir: verify reads it as one.
    let summary = kappakv_server::commands::verify::run(&out).unwrap();
    assert_eq!(summary.entries, consistent);

    assert!(matches!(
        backup::run(&data, &out),
        Err(BackupError::OutNotEmpty { .. })
    ));

    let restored = root.path().join("restored");
    let manifest2 = restore::run(&out, &restored).unwrap();
    assert_eq!(manifest2, manifest);
    let (store, _) = LogStore::open(&kappakv_server::log::log_dir(&restored), &cfg).unwrap();
    assert_eq!(store.last_lsn(), consistent);
    drop(store);
    assert_eq!(
        kappakv_server::identity::load_or_create(&restored)
            .unwrap()
            .node_id(),
        node.node_id()
    );
    assert!(matches!(
        restore::run(&out, &restored),
        Err(RestoreError::DataDirNotEmpty { .. })
    ));
    std::fs::remove_file(out.join(backup::MANIFEST_FILE)).unwrap();
    assert!(matches!(
        restore::run(&out, &root.path().join("other")),
        Err(RestoreError::NoManifest { .. })
    ));
}

#[test]
fn an_empty_log_backs_up_and_restores() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    kappakv_server::identity::load_or_create(&data).unwrap();
    let (store, _) =
        LogStore::open(&kappakv_server::log::log_dir(&data), &LogConfig::default()).unwrap();
    drop(store);
    let out = root.path().join("backup");
    let manifest = backup::run(&data, &out).unwrap();
    assert_eq!(manifest.lsn, 0);
    let restored = root.path().join("restored");
    restore::run(&out, &restored).unwrap();
    let (store, _) = LogStore::open(
        &kappakv_server::log::log_dir(&restored),
        &LogConfig::default(),
    )
    .unwrap();
    assert_eq!(store.last_lsn(), 0);
}

#[test]
fn not_a_data_dir_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let err = backup::run(root.path(), &root.path().join("out")).unwrap_err();
    assert!(err.to_string().contains("not a kappakv data dir"), "{err}");
}
