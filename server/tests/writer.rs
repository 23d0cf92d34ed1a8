//! The writer thread over a real log: group commit under concurrency, supersede resolution,
//! remote appends, fail-stop, a full disk and the free-space reserve, and writes the views
//! cannot resolve.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{ChainBuilder, read_all_checked};
use kappakv_protocol::limits::{MAX_UNSIGNED_RUN_BYTES, MAX_VALUE_BYTES};
use kappakv_protocol::{EntryId, InvalidEntry, Keypair, Lsn, SignedEntry, VerifyError, WriteOp};
use kappakv_server::commands::verify;
use kappakv_server::log::fault::{FaultEffect, FaultError, FaultOp, Faults, FaultyLogDir};
use kappakv_server::log::{FsLogDir, LogConfig, LogReader, LogStore};
use kappakv_server::node::writer::{
    NoResolver, SupersedeResolver, WriteError, WriterConfig, WriterHandle,
};

fn log_dir(data: &Path) -> PathBuf {
    data.join("log")
}

fn put(key: &str, value: &[u8]) -> WriteOp {
    WriteOp {
        key: key.as_bytes().to_vec(),
        value: Some(value.to_vec()),
        supersedes: None,
    }
}

fn spawn(data: &Path, resolver: Box<dyn SupersedeResolver>) -> WriterHandle {
    let (store, recovery) = LogStore::open(&log_dir(data), &LogConfig::default()).unwrap();
    WriterHandle::spawn(
        store,
        recovery.heads,
        Keypair::from_secret([7; 32]),
        resolver,
        WriterConfig::default(),
    )
}

/// The multi-value register, minimally: current ids per key, and what each appended op
/// replaced, to forget discarded entries.
#[derive(Default)]
struct MapResolver {
    current: HashMap<Vec<u8>, Vec<EntryId>>,
    undo: Vec<(Lsn, Vec<u8>, Vec<EntryId>)>,
}

impl SupersedeResolver for MapResolver {
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String> {
        Ok(self.current.get(key).cloned().unwrap_or_default())
    }

    fn appended(&mut self, lsn: Lsn, e: &SignedEntry, _local: bool) {
        for op in &e.entry.ops {
            let cur = self.current.entry(op.key().to_vec()).or_default();
            self.undo.push((lsn, op.key().to_vec(), cur.clone()));
            cur.retain(|id| !op.supersedes().contains(id));
            cur.push(e.id);
        }
    }

    fn discarded(&mut self, after: Lsn) {
        while self.undo.last().is_some_and(|(lsn, _, _)| *lsn > after) {
            let (_, key, before) = self.undo.pop().unwrap();
            self.current.insert(key, before);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_durable_chained_and_signed() {
    const TASKS: u64 = 64;
    const TOTAL: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let writer = Arc::new(spawn(dir.path(), Box::new(NoResolver)));
    let me = writer.node_id();

    // A reader tails the durable LSN while the writes go on.
    let mut durable = writer.durable_lsn();
    let tail_dir = log_dir(dir.path());
    let tailer = tokio::spawn(async move {
        let reader = Arc::new(LogReader::open(&tail_dir).unwrap());
        let mut read = 0;
        while read < TOTAL {
            durable.changed().await.unwrap();
            let upto = *durable.borrow_and_update();
            let r = reader.clone();
            let got = tokio::task::spawn_blocking(move || {
                r.iter(read, upto)
                    .unwrap()
                    .map(|item| item.unwrap().0)
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap();
            assert_eq!(got, (read + 1..=upto).collect::<Vec<_>>());
            read = upto;
        }
    });

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let n = TOTAL / TASKS + u64::from(t < TOTAL % TASKS);
            let mut out = Vec::new();
            for i in 0..n {
                let w = writer
                    .write(vec![put(&format!("t{t}-{i}"), &[t as u8; 100])])
                    .await
                    .unwrap();
                out.push((w, t, i));
            }
            out
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.unwrap());
    }
    tailer.await.unwrap();
    assert_eq!(*writer.durable_lsn().borrow(), TOTAL);
    Arc::try_unwrap(writer).unwrap().shutdown().await;

    let (_, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, TOTAL);
    assert!(recovery.truncated.is_none());
    assert_eq!(recovery.heads[&me].seq, TOTAL);

    let all = read_all_checked(&log_dir(dir.path()), TOTAL);
    written.sort_by_key(|(w, _, _)| w.lsn);
    assert_eq!(written.len() as u64, TOTAL);
    let mut signed = 0;
    for ((w, t, i), (lsn, e)) in written.iter().zip(&all) {
        assert_eq!(w.lsn, *lsn);
        assert_eq!(w.id, e.id);
        assert_eq!(e.entry.author, me);
        assert_eq!(e.entry.seq, *lsn);
        assert_eq!(e.entry.ops[0].key(), format!("t{t}-{i}").as_bytes());
        signed += u64::from(e.signature.is_some());
    }
    // Group commit: one signature per batch, so fewer signatures than entries.
    assert!(
        signed < TOTAL / 2,
        "{signed} signatures (batches) for {TOTAL} entries"
    );
    let summary = verify::run(dir.path()).unwrap();
    assert_eq!((summary.entries, summary.authors), (TOTAL, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_writes_supersede_what_came_before_even_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Arc::new(spawn(dir.path(), Box::new(MapResolver::default())));
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            writer.write(vec![put("k", &[i])]).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A context is sorted and deduplicated.
    let ctx = vec![EntryId([9; 32]), EntryId([1; 32]), EntryId([9; 32])];
    let w = writer
        .write(vec![WriteOp {
            key: b"other".to_vec(),
            value: None,
            supersedes: Some(ctx),
        }])
        .await
        .unwrap();
    Arc::try_unwrap(writer).unwrap().shutdown().await;

    let all = read_all_checked(&log_dir(dir.path()), w.lsn);
    let mut prev: Option<EntryId> = None;
    for (_, e) in &all[..40] {
        assert_eq!(e.entry.ops[0].supersedes(), prev.as_slice());
        prev = Some(e.id);
    }
    assert_eq!(
        all[40].1.entry.ops[0].supersedes(),
        &[EntryId([1; 32]), EntryId([9; 32])]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_write_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Arc::new(spawn(dir.path(), Box::new(NoResolver)));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let ops = match i {
                5 => vec![put("big", &vec![0; MAX_VALUE_BYTES + 1])],
                6 => vec![],
                7 => vec![put("dup", b"a"), put("dup", b"b")],
                _ => vec![put("k", b"v")],
            };
            (i, writer.write(ops).await)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            (5, r) => assert!(
                matches!(
                    r,
                    Err(WriteError::Invalid(InvalidEntry::ValueTooLarge { .. }))
                ),
                "{r:?}"
            ),
            (6, r) => assert!(
                matches!(r, Err(WriteError::Invalid(InvalidEntry::NoOps))),
                "{r:?}"
            ),
            (7, r) => assert!(
                matches!(
                    r,
                    Err(WriteError::Invalid(InvalidEntry::DuplicateKey { .. }))
                ),
                "{r:?}"
            ),
            (_, r) => {
                r.unwrap();
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 17);
    assert_eq!(*writer.durable_lsn().borrow(), 17);
    Arc::try_unwrap(writer).unwrap().shutdown().await;
    read_all_checked(&log_dir(dir.path()), 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_entries_must_extend_chains_and_end_signed() {
    let dir = tempfile::tempdir().unwrap();
    let writer = spawn(dir.path(), Box::new(NoResolver));
    let mut peer = ChainBuilder::new(3);

    assert_eq!(writer.append_remote(peer.batch(3, 10)).await.unwrap(), 3);
    let local = writer.write(vec![put("mine", b"1")]).await.unwrap();
    assert_eq!(local.lsn, 4);

    let unsigned = vec![peer.next(10, false)];
    let err = writer.append_remote(unsigned.clone()).await.unwrap_err();
    assert!(matches!(err, WriteError::Unsigned { seq: 4, .. }), "{err}");

    // The refused entry was not appended, so its successor has a gap.
    let mut gap = peer.batch(1, 10);
    let err = writer.append_remote(gap.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::Link {
                index: 0,
                source: VerifyError::SeqGap {
                    expected: 4,
                    got: 5,
                    ..
                }
            }
        ),
        "{err}"
    );
    // Sent again together with the entry before it, the run is whole and ends signed.
    let mut run = unsigned;
    run.append(&mut gap);
    assert_eq!(writer.append_remote(run).await.unwrap(), 6);

    // A second, different entry for a seq already in the log does not link.
    let mut fork = ChainBuilder::new(3);
    let err = writer.append_remote(fork.batch(1, 11)).await.unwrap_err();
    assert!(
        matches!(
            err,
            WriteError::Link {
                source: VerifyError::SeqGap {
                    expected: 6,
                    got: 1,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(writer.append_remote(Vec::new()).await.unwrap(), 6);

    writer.shutdown().await;
    let (_, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 6);
    assert_eq!(recovery.heads[&peer.keypair.node_id()], peer.head.unwrap());
    read_all_checked(&log_dir(dir.path()), 6);

    // The local chain continues after a restart.
    let writer = spawn(dir.path(), Box::new(NoResolver));
    let again = writer.write(vec![put("mine", b"2")]).await.unwrap();
    assert_eq!(again.lsn, 7);
    writer.shutdown().await;
    let all = read_all_checked(&log_dir(dir.path()), 7);
    assert_eq!(all[6].1.entry.prev, Some(local.id));
}

/// A writer on a fault-injecting log directory in `data`.
fn spawn_faulty(data: &Path, resolver: Box<dyn SupersedeResolver>) -> (WriterHandle, Arc<Faults>) {
    spawn_faulty_with_reserve(data, resolver, 0)
}

/// [`spawn_faulty`], with the store keeping `reserve` bytes free.
fn spawn_faulty_with_reserve(
    data: &Path,
    resolver: Box<dyn SupersedeResolver>,
    reserve: u64,
) -> (WriterHandle, Arc<Faults>) {
    std::fs::create_dir_all(log_dir(data)).unwrap();
    let dir = FaultyLogDir::new(Arc::new(FsLogDir::new(log_dir(data))));
    let faults = dir.faults();
    let (mut store, recovery) = LogStore::open_in(Arc::new(dir), &LogConfig::default()).unwrap();
    store.set_disk_reserve(reserve);
    let writer = WriterHandle::spawn(
        store,
        recovery.heads,
        Keypair::from_secret([7; 32]),
        resolver,
        WriterConfig::default(),
    );
    (writer, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, faults) = spawn_faulty(dir.path(), Box::new(NoResolver));
    let first = writer.write(vec![put("a", b"1")]).await.unwrap();
    assert_eq!(first.lsn, 1);
    faults.fail_next(FaultOp::SyncData, FaultError::Eio, FaultEffect::Nothing);
    let err = writer.write(vec![put("b", b"2")]).await.unwrap_err();
    assert!(
        matches!(&err, WriteError::Failed(e) if e.to_string().contains("syncing segment")),
        "{err}"
    );
    assert!(err.to_string().contains("restarted"), "{err}");
    // Nothing fails any more, but a sync is never retried: the writer has stopped.
    let err = writer.write(vec![put("c", b"3")]).await.unwrap_err();
    assert!(matches!(err, WriteError::Stopped), "{err}");
    assert!(err.to_string().contains("restart the node"), "{err}");
    assert_eq!(faults.count(FaultOp::SyncData), 2);
    assert!(writer.is_stopped());
    assert_eq!(*writer.durable_lsn().borrow(), 1);
    writer.shutdown().await;

    // Reopening recovers; the unacknowledged entry may or may not be there, whole and signed.
    let (_, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert!((1..=2).contains(&recovery.last_lsn));
    read_all_checked(&log_dir(dir.path()), recovery.last_lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_until_there_is_space_and_the_chain_resumes_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, faults) = spawn_faulty(dir.path(), Box::new(MapResolver::default()));
    let writer = Arc::new(writer);
    let me = writer.node_id();
    let mut peer = ChainBuilder::new(3);
    let first = writer.write(vec![put("k", b"1")]).await.unwrap();
    assert_eq!(writer.append_remote(peer.batch(2, 10)).await.unwrap(), 3);
    let peer_head = peer.head;

    faults.set_disk_full(true);
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            writer.write(vec![put("k", &[i])]).await.map(drop)
        }));
    }
    let remote = peer.batch(3, 10);
    tasks.push(tokio::spawn({
        let writer = writer.clone();
        async move { writer.append_remote(remote).await.map(drop) }
    }));
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, WriteError::DiskFull(_)), "{err}");
        assert!(err.to_string().contains("disk is full"), "{err}");
    }
    assert!(!writer.is_stopped());
    assert_eq!(*writer.durable_lsn().borrow(), 3);
    assert_eq!(writer.head(&me).unwrap().id, first.id);
    assert_eq!(writer.head(&peer.keypair.node_id()), peer_head);
    assert!(faults.fired().iter().all(|f| f.op == FaultOp::Write));

    // Space again: the next local entry links to the last durable one and supersedes only
    // what the log holds; the peer's run is taken again from its durable head.
    faults.set_disk_full(false);
    let next = writer.write(vec![put("k", b"2")]).await.unwrap();
    assert_eq!(next.lsn, 4);
    peer.head = peer_head;
    assert_eq!(writer.append_remote(peer.batch(3, 10)).await.unwrap(), 7);
    Arc::try_unwrap(writer).unwrap().shutdown().await;

    let (_, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 7);
    assert!(recovery.truncated.is_none(), "{:?}", recovery.truncated);
    let all = read_all_checked(&log_dir(dir.path()), 7);
    let e = &all[3].1;
    assert_eq!(e.id, next.id);
    assert_eq!((e.entry.seq, e.entry.prev), (2, Some(first.id)));
    assert_eq!(e.entry.ops[0].supersedes(), &[first.id]);
    verify::run(dir.path()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_would_eat_into_the_reserve_is_refused_until_there_is_room() {
    const RESERVE: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (writer, faults) =
        spawn_faulty_with_reserve(dir.path(), Box::new(MapResolver::default()), RESERVE);
    faults.set_available_space(Some(RESERVE + 64 * 1024));
    let first = writer.write(vec![put("k", b"1")]).await.unwrap();
    let writes = faults.count(FaultOp::Write);

    // A record of a few hundred bytes does not fit above the reserve with 100 bytes to spare.
    faults.set_available_space(Some(RESERVE + 100));
    for attempt in 0..3u8 {
        let err = writer.write(vec![put("k", &[attempt])]).await.unwrap_err();
        assert!(matches!(err, WriteError::DiskFull(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("disk is full") && text.contains("kept free for the indexes"),
            "{text}"
        );
    }
    assert_eq!(faults.count(FaultOp::Write), writes, "nothing was written");
    assert!(faults.fired().is_empty());
    assert!(!writer.is_stopped());
    assert_eq!(*writer.durable_lsn().borrow(), 1);

    // Room again: the next write takes the next LSN and replaces only what the log holds.
    faults.set_available_space(Some(RESERVE + 64 * 1024));
    let next = writer.write(vec![put("k", b"2")]).await.unwrap();
    assert_eq!(next.lsn, 2);
    writer.shutdown().await;
    let all = read_all_checked(&log_dir(dir.path()), 2);
    assert_eq!(all[1].1.entry.ops[0].supersedes(), &[first.id]);
    assert_eq!(all[1].1.entry.prev, Some(first.id));
}

/// A resolver that cannot read the keys in `unreadable`, refuses every write once `refusal`
/// is set, as the node's resolver does when its views fail, and reports the views' checkpoint
/// as `checkpoint` says.
#[derive(Default)]
struct FailingResolver {
    inner: MapResolver,
    unreadable: Vec<Vec<u8>>,
    refusal: Arc<Mutex<Option<String>>>,
    checkpoint: Arc<Mutex<Option<Lsn>>>,
}

impl SupersedeResolver for FailingResolver {
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String> {
        if self.unreadable.iter().any(|k| k == key) {
            return Err("a page could not be read".into());
        }
        self.inner.current(key)
    }

    fn refusal(&mut self) -> Option<Arc<str>> {
        self.refusal.lock().unwrap().as_deref().map(Arc::from)
    }

    fn views_checkpoint(&mut self) -> Option<Lsn> {
        *self.checkpoint.lock().unwrap()
    }

    fn appended(&mut self, lsn: Lsn, entry: &SignedEntry, local: bool) {
        self.inner.appended(lsn, entry, local);
    }

    fn discarded(&mut self, after: Lsn) {
        self.inner.discarded(after);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_views_cannot_resolve_is_refused_and_failed_views_refuse_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let refusal = Arc::new(Mutex::new(None));
    let resolver = FailingResolver {
        unreadable: vec![b"bad".to_vec()],
        refusal: refusal.clone(),
        ..FailingResolver::default()
    };
    let writer = spawn(dir.path(), Box::new(resolver));
    let mut peer = ChainBuilder::new(3);

    // Resolving "bad" fails: that write is refused rather than taken as replacing nothing,
    // which would keep the value it overwrites as a sibling. A write naming what it replaces
    // needs no resolution, and other writes go on.
    let err = writer.write(vec![put("bad", b"1")]).await.unwrap_err();
    assert!(matches!(err, WriteError::Unresolved(_)), "{err}");
    assert!(err.to_string().contains("could not be read"), "{err}");
    let explicit = WriteOp {
        supersedes: Some(Vec::new()),
        ..put("bad", b"1")
    };
    assert_eq!(writer.write(vec![explicit]).await.unwrap().lsn, 1);
    assert_eq!(writer.write(vec![put("good", b"1")]).await.unwrap().lsn, 2);

    // Once the views have failed, nothing is written, local or remote.
    *refusal.lock().unwrap() = Some("the index database failed".into());
    let err = writer.write(vec![put("good", b"2")]).await.unwrap_err();
    assert!(matches!(err, WriteError::ViewsFailed(_)), "{err}");
    assert!(
        err.to_string().contains("restart") && err.to_string().contains("free space"),
        "{err}"
    );
    let err = writer.append_remote(peer.batch(1, 3)).await.unwrap_err();
    assert!(matches!(err, WriteError::ViewsFailed(_)), "{err}");
    assert_eq!(*writer.durable_lsn().borrow(), 2);
    writer.shutdown().await;
    read_all_checked(&log_dir(dir.path()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_is_kept_for_what_the_views_write_before_their_next_checkpoint() {
    const RESERVE: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Arc::new(Mutex::new(Some(0)));
    let resolver = FailingResolver {
        checkpoint: checkpoint.clone(),
        ..FailingResolver::default()
    };
    let (writer, faults) = spawn_faulty_with_reserve(dir.path(), Box::new(resolver), RESERVE);
    // 100 KiB above the reserve. Each record of a 10 KiB value needs its own bytes and four
    // times the bytes of log since the views' checkpoint, itself included: 51 KiB for the
    // first, 92 KiB for the second, 133 KiB for the third.
    faults.set_available_space(Some(RESERVE + 100 * 1024));
    let value = vec![7u8; 10 * 1024];
    assert_eq!(writer.write(vec![put("a", &value)]).await.unwrap().lsn, 1);
    assert_eq!(writer.write(vec![put("b", &value)]).await.unwrap().lsn, 2);
    let err = writer.write(vec![put("c", &value)]).await.unwrap_err();
    assert!(matches!(err, WriteError::DiskFull(_)), "{err}");
    assert!(
        err.to_string()
            .contains("for the indexes to catch up with the log"),
        "{err}"
    );

    // A checkpoint of the views at LSN 2 frees the room kept for the first two records.
    *checkpoint.lock().unwrap() = Some(2);
    assert_eq!(writer.write(vec![put("c", &value)]).await.unwrap().lsn, 3);
    // Without a checkpoint to go by, only the reserve and the batch count.
    *checkpoint.lock().unwrap() = None;
    faults.set_available_space(Some(RESERVE + 11 * 1024));
    assert_eq!(writer.write(vec![put("d", &value)]).await.unwrap().lsn, 4);
    writer.shutdown().await;
    read_all_checked(&log_dir(dir.path()), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_does_not_block_and_the_thread_still_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let writer = spawn(dir.path(), Box::new(NoResolver));
    let mut durable = writer.durable_lsn();
    writer.write(vec![put("a", b"1")]).await.unwrap();
    drop(writer);
    // The thread exits once the queue closes; the watch sender goes with it.
    while durable.changed().await.is_ok() {}
    let (_, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 1);
}

/// Lengths of the runs of unsigned entries in `entries`, per author, in record payload bytes.
fn longest_unsigned_run(entries: &[(Lsn, SignedEntry)]) -> usize {
    let mut open: HashMap<kappakv_protocol::NodeId, usize> = HashMap::new();
    let mut longest = 0;
    for (_, e) in entries {
        let run = open.entry(e.entry.author).or_default();
        if e.signature.is_some() {
            *run = 0;
        } else {
            *run += e.encode_payload().len();
            longest = longest.max(*run);
        }
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_signed_before_its_unsigned_run_passes_the_protocol_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    // A batch limit far above the protocol's run limit: what a node configured for large
    // batches does.
    let writer = Arc::new(WriterHandle::spawn(
        store,
        recovery.heads,
        Keypair::from_secret([7; 32]),
        Box::new(NoResolver),
        WriterConfig {
            batch_bytes_max: 4 * MAX_UNSIGNED_RUN_BYTES,
            ..WriterConfig::default()
        },
    ));
    let mut peer = ChainBuilder::new(3);
    let value = vec![9u8; MAX_VALUE_BYTES];
    // While the first write's fsync runs, the rest queue up and form one batch, with a remote
    // run in the middle.
    let mut tasks = Vec::new();
    for i in 0..48 {
        let w = writer.clone();
        let v = value.clone();
        tasks.push(tokio::spawn(async move {
            w.write(vec![put(&format!("k{i}"), &v)]).await.map(|_| ())
        }));
        if i == 24 {
            let w = writer.clone();
            let run = peer.batch(3, 10);
            tasks.push(tokio::spawn(async move {
                w.append_remote(run).await.map(|_| ())
            }));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let writer = Arc::into_inner(writer).expect("every task is done");
    writer.shutdown().await;
    let all = read_all_checked(&log_dir(dir.path()), 51);
    let longest = longest_unsigned_run(&all);
    assert!(
        longest <= MAX_UNSIGNED_RUN_BYTES,
        "an unsigned run of {longest} bytes, over the protocol's {MAX_UNSIGNED_RUN_BYTES}"
    );
    // Only one author's run is open at any point of the log.
    common::assert_one_open_run(&all);
}

#[test]
fn every_chain_head_the_writer_shows_is_durable() {
    // On tmpfs, fdatasync is free and batches follow each other fast: the reader below samples
    // the handle many times in every batch.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let writer = Arc::new(spawn(dir.path(), Box::new(NoResolver)));
    let me = writer.node_id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (writer, done) = (writer.clone(), done.clone());
        let durable = writer.durable_lsn();
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                // One local entry per batch: a head's seq is its LSN.
                let head = writer.head(&me).map_or(0, |h| h.seq);
                let durable = *durable.borrow();
                assert!(
                    durable >= head,
                    "head at seq {head} shown while the durable LSN is {durable}"
                );
                samples += 1;
            }
            samples
        })
    };
    rt.block_on(async {
        for i in 0..3_000 {
            writer.write(vec![put("k", &[i as u8])]).await.unwrap();
        }
    });
    done.store(true, std::sync::atomic::Ordering::Release);
    let samples = reader.join().expect("no head ran ahead of the durable LSN");
    assert!(samples > 0);
}
