//! Rebuild throughput: apply 1,000,000 entries (one author, 100-byte values over 100,000 keys,
//! each put superseding the previous version of its key) into a fresh on-disk index file in
//! large transactions, as `kappakv rebuild-indexes` does.
//!
//! `cargo bench -p kappakv-indexes --bench rebuild`. Set `KAPPAKV_BENCH_DIR` to put the index
//! file somewhere other than the system temp dir (it must not be tmpfs to measure the disk).
//! Peak memory (VmHWM) is printed at the end; the 1M input entries held in memory account for
//! most of it, so it is printed before the first run too.

use std::sync::LazyLock;

use divan::Bencher;
use divan::counter::ItemsCount;
use kappakv_indexes::{Indexes, default_views};
use kappakv_protocol::{Entry, EntryId, Lsn, NodeId, Op, SignedEntry, Timestamp};

const ENTRIES: usize = 1_000_000;
const KEYS: u64 = 100_000;
const VALUE_BYTES: usize = 100;

fn main() {
    LazyLock::force(&LOG);
    eprintln!("input generated; VmHWM {}", peak_rss());
    divan::main();
    eprintln!("peak memory: VmHWM {}", peak_rss());
}

/// The log: entries in LSN order, LSNs from 1.
static LOG: LazyLock<Vec<SignedEntry>> = LazyLock::new(|| {
    let author = NodeId([7; 32]);
    let mut last: Vec<Option<EntryId>> = vec![None; KEYS as usize];
    let mut prev = None;
    // xorshift64: keys in a scattered order, the same every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..ENTRIES as u64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % KEYS;
            let mut value = vec![0u8; VALUE_BYTES];
            value[..8].copy_from_slice(&i.to_le_bytes());
            let entry = Entry {
                author,
                seq: i + 1,
                prev,
                timestamp: Timestamp(i << 16),
                ops: vec![Op::Put {
                    key: format!("key-{k:08}").into_bytes(),
                    value,
                    supersedes: last[k as usize].into_iter().collect(),
                }],
            };
            let id = entry.id();
            prev = Some(id);
            last[k as usize] = Some(id);
            SignedEntry {
                entry,
                id,
                signature: None,
            }
        })
        .collect()
});

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(|l| l.trim().to_owned())
        })
        .map_or_else(
            || "unknown".into(),
            |l| l.trim_start_matches("VmHWM:").trim().to_owned(),
        )
}

/// Applies the whole log in transactions of `batch` entries (non-durable), then one durable
/// commit, as a rebuild does.
#[divan::bench(args = [10_000, 100_000], sample_count = 3, sample_size = 1)]
fn rebuild(bencher: Bencher, batch: usize) {
    let base = std::env::var_os("KAPPAKV_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    bencher
        .counter(ItemsCount::new(ENTRIES))
        .with_inputs(|| {
            let dir = tempfile::tempdir_in(&base).expect("temp dir");
            let (indexes, _) =
                Indexes::open(dir.path().join("indexes.redb"), default_views()).expect("open");
            (dir, indexes)
        })
        .bench_values(|(dir, indexes)| {
            let log: Vec<(Lsn, &SignedEntry)> = LOG
                .iter()
                .enumerate()
                .map(|(i, e)| (i as Lsn + 1, e))
                .collect();
            for chunk in log.chunks(batch) {
                indexes.apply(chunk, false).expect("apply");
            }
            indexes.persist().expect("persist");
            (dir, indexes)
        });
}
