//! Durable appends per second through the writer thread (group commit), with 1 and with 64
//! concurrent appenders, 100-byte values, on a real disk: the log lives under Cargo's target
//! dir (`CARGO_TARGET_TMPDIR`), not `/tmp`, which may be a tmpfs where `fdatasync` is free.
//!
//! Run: `cargo bench -p kappakv-server --bench log_append`. Each sample is a fixed number of
//! writes, every one awaited until durable; the throughput column is appends per second.

use std::sync::Arc;

use divan::Bencher;
use divan::counter::ItemsCount;
use kappakv_protocol::{Keypair, WriteOp};
use kappakv_server::log::{LogConfig, LogStore};
use kappakv_server::node::writer::{NoResolver, WriterConfig, WriterHandle};

fn main() {
    divan::main();
}

const VALUE_BYTES: usize = 100;

/// Writes per sample, over all appenders: enough fsyncs that one slow one does not dominate.
const WRITES_PER_SAMPLE: usize = 2048;

#[divan::bench(args = [1, 64], sample_count = 10, sample_size = 1)]
fn durable_appends(bencher: Bencher, appenders: usize) {
    let dir =
        tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under the target dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (store, recovery) =
        LogStore::open(&dir.path().join("log"), &LogConfig::default()).expect("open log");
    let writer = Arc::new(WriterHandle::spawn(
        store,
        recovery.heads,
        Keypair::from_secret([1; 32]),
        Box::new(NoResolver),
        WriterConfig::default(),
    ));
    // With one appender every write waits for its own fsync: fewer writes keep the run short.
    let total = if appenders == 1 {
        WRITES_PER_SAMPLE / 4
    } else {
        WRITES_PER_SAMPLE
    };
    let per_appender = total / appenders;
    bencher
        .counter(ItemsCount::new(per_appender * appenders))
        .bench_local(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..appenders)
                    .map(|a| {
                        let writer = writer.clone();
                        tokio::spawn(async move {
                            for i in 0..per_appender {
                                let op = WriteOp {
                                    key: format!("bench-{a}-{i}").into_bytes(),
                                    value: Some(vec![0xab; VALUE_BYTES]),
                                    supersedes: None,
                                };
                                writer.write(vec![op]).await.expect("durable write");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("appender task");
                }
            });
        });
    rt.block_on(async move {
        if let Ok(w) = Arc::try_unwrap(writer) {
            w.shutdown().await;
        }
    });
}
