//! Rebuild throughput: apply a log of 1,000,000 entries to the built-in views (log lookup, kv,
//! history) in a fresh on-disk index file, as `kappakv rebuild-indexes` does (transactions of
//! 100,000 entries, each committed durably, then one durable commit), next to a baseline
//! measured in the same run: redb itself inserting 1,000,000 random 16-byte keys (`u64` values)
//! in one transaction into a fresh file in the same directory, with the same page cache.
//! Each sample runs the baseline and then the rebuild, back to back, so that a noisy machine
//! slows both alike; the ratio of the two rates is printed per sample and as a median.
//!
//! Two input shapes, one author each, one put of a 100-byte value per entry, every put
//! superseding the current version of its key:
//!
//! - `clients`: what `kappactl bench --keys 10000` produces through a node: keys drawn at
//!   random from 10,000 (`bench/%010d`), every 30th entry signed (the group commits of
//!   concurrent clients);
//! - `scattered`: keys drawn from 100,000 (`key-%08d`) in a scattered order, unsigned.
//!
//! ```text
//! cargo bench -p kappakv-indexes --bench rebuild [-- [SHAPE…] [--samples N] [--batch N] [--no-baseline]]
//! ```
//!
//! Set `KAPPAKV_BENCH_DIR` to put the files somewhere other than the system temp dir (it must
//! not be tmpfs to measure the disk). Peak memory (VmHWM) is printed as each input is generated
//! (the input held in memory is most of it) and at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use kappakv_indexes::{DEFAULT_CACHE_BYTES, Indexes, default_views};
use kappakv_protocol::{Entry, EntryId, Keypair, Lsn, Op, SignedEntry, Timestamp};
use redb::TableDefinition;

const ENTRIES: usize = 1_000_000;
const VALUE_BYTES: usize = 100;
/// Entries per transaction of `kappakv rebuild-indexes` (`REBUILD_BATCH`).
const REBUILD_BATCH: usize = 100_000;
/// One signed entry in this many, in the `clients` shape.
const SIGNED_EVERY: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Clients,
    Scattered,
}

impl Shape {
    const ALL: [Shape; 2] = [Shape::Clients, Shape::Scattered];

    fn name(self) -> &'static str {
        match self {
            Shape::Clients => "clients",
            Shape::Scattered => "scattered",
        }
    }
}

struct Options {
    shapes: Vec<Shape>,
    samples: usize,
    batch: usize,
    baseline: bool,
}

fn options() -> Options {
    let mut opts = Options {
        shapes: Vec::new(),
        samples: 3,
        batch: REBUILD_BATCH,
        baseline: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes `--bench`.
            "--bench" => {}
            "--samples" => opts.samples = number(args.next(), "--samples"),
            "--batch" => opts.batch = number(args.next(), "--batch"),
            "--no-baseline" => opts.baseline = false,
            name => match Shape::ALL.iter().find(|s| s.name() == name) {
                Some(&shape) => opts.shapes.push(shape),
                None => panic!("unknown argument `{name}`: shapes are clients, scattered"),
            },
        }
    }
    if opts.shapes.is_empty() {
        opts.shapes = Shape::ALL.to_vec();
    }
    opts
}

fn number(arg: Option<String>, flag: &str) -> usize {
    arg.and_then(|a| a.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| panic!("{flag} takes a positive number"))
}

fn main() {
    let opts = options();
    let base = std::env::var_os("KAPPAKV_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    println!(
        "{ENTRIES} entries, {} per transaction, {} sample(s), files in {}",
        opts.batch,
        opts.samples,
        base.display()
    );
    let keys = random_keys();
    for &shape in &opts.shapes {
        let log = generate(shape);
        println!("{}: input generated; VmHWM {}", shape.name(), peak_rss());
        let (mut redb_rates, mut rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for sample in 1..=opts.samples {
            let redb_rate = opts.baseline.then(|| rate(raw_redb(&base, &keys)));
            let rebuild_rate = rate(rebuild(&base, &log, opts.batch));
            print!(
                "{} sample {sample}: rebuild {}",
                shape.name(),
                k(rebuild_rate)
            );
            rates.push(rebuild_rate);
            if let Some(redb_rate) = redb_rate {
                print!(
                    ", raw redb {}, ratio {:.2}",
                    k(redb_rate),
                    rebuild_rate / redb_rate
                );
                redb_rates.push(redb_rate);
                ratios.push(rebuild_rate / redb_rate);
            }
            println!();
        }
        print!(
            "{} median: rebuild {} ({}–{})",
            shape.name(),
            k(median(&rates)),
            k(min(&rates)),
            k(max(&rates))
        );
        if opts.baseline {
            print!(
                ", raw redb {} ({}–{}), ratio {:.2} ({:.2}–{:.2})",
                k(median(&redb_rates)),
                k(min(&redb_rates)),
                k(max(&redb_rates)),
                median(&ratios),
                min(&ratios),
                max(&ratios)
            );
        }
        println!();
    }
    println!("peak memory: VmHWM {}", peak_rss());
}

/// Entries (or inserts) per second.
fn rate(elapsed: Duration) -> f64 {
    ENTRIES as f64 / elapsed.as_secs_f64()
}

fn k(rate: f64) -> String {
    format!("{:.1} k/s", rate / 1000.0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Applies the whole log to a fresh index file in transactions of `batch` entries, each
/// durable, then one durable commit, as a rebuild does. Returns the time from the first apply
/// to the last commit.
fn rebuild(base: &Path, log: &[SignedEntry], batch: usize) -> Duration {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let (indexes, _) =
        Indexes::open(dir.path().join("indexes.redb"), default_views()).expect("open");
    let log: Vec<(Lsn, &SignedEntry)> = log
        .iter()
        .enumerate()
        .map(|(i, e)| (i as Lsn + 1, e))
        .collect();
    let started = Instant::now();
    for chunk in log.chunks(batch) {
        indexes.apply(chunk, true).expect("apply");
    }
    indexes.persist().expect("persist");
    started.elapsed()
}

const BASELINE: TableDefinition<&[u8; 16], u64> = TableDefinition::new("baseline");

/// redb inserting [`ENTRIES`] random 16-byte keys in one durable transaction into a fresh file
/// with the views' page cache.
fn raw_redb(base: &Path, keys: &[[u8; 16]]) -> Duration {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let db = redb::Database::builder()
        .set_cache_size(DEFAULT_CACHE_BYTES)
        .create(dir.path().join("baseline.redb"))
        .expect("create");
    let started = Instant::now();
    let txn = db.begin_write().expect("begin");
    {
        let mut table = txn.open_table(BASELINE).expect("table");
        for (i, key) in keys.iter().enumerate() {
            table.insert(key, i as u64).expect("insert");
        }
    }
    txn.commit().expect("commit");
    started.elapsed()
}

/// splitmix64: a fixed pseudo-random sequence, the same every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn random_keys() -> Vec<[u8; 16]> {
    let mut rng = SplitMix(1);
    (0..ENTRIES)
        .map(|_| {
            let mut key = [0; 16];
            key[..8].copy_from_slice(&rng.next().to_le_bytes());
            key[8..].copy_from_slice(&rng.next().to_le_bytes());
            key
        })
        .collect()
}

/// The log of `shape`: entries in LSN order, LSNs from 1.
fn generate(shape: Shape) -> Vec<SignedEntry> {
    let keypair = Keypair::from_secret([7; 32]);
    let author = keypair.node_id();
    let (keys, signed_every) = match shape {
        Shape::Clients => (10_000, SIGNED_EVERY),
        Shape::Scattered => (100_000, 0),
    };
    let mut last: Vec<Option<EntryId>> = vec![None; keys as usize];
    let mut prev = None;
    let mut rng = SplitMix(2);
    // xorshift64 for the scattered shape: the order the bench has always used.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..ENTRIES as u64)
        .map(|i| {
            let (k, key) = match shape {
                Shape::Clients => {
                    let k = rng.next() % keys;
                    (k, format!("bench/{k:010}"))
                }
                Shape::Scattered => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = x % keys;
                    (k, format!("key-{k:08}"))
                }
            };
            let mut value = vec![b'x'; VALUE_BYTES];
            value[..8].copy_from_slice(&i.to_le_bytes());
            let entry = Entry {
                author,
                seq: i + 1,
                prev,
                // An HLC reading: about 30 entries a millisecond.
                timestamp: Timestamp(((1_700_000_000_000 + i / 30) << 16) | (i % 30)),
                ops: vec![Op::Put {
                    key: key.into_bytes(),
                    value,
                    supersedes: last[k as usize].into_iter().collect(),
                }],
            };
            let id = entry.id();
            prev = Some(id);
            last[k as usize] = Some(id);
            let signed = signed_every != 0 && (i + 1) % signed_every == 0;
            SignedEntry {
                entry,
                id,
                signature: signed.then(|| keypair.sign(&id)),
            }
        })
        .collect()
}

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
