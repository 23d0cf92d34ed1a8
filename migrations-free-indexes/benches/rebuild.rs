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
//! cargo bench -p kappakv-indexes --bench rebuild [-- [SHAPE…] [--samples N] [--batch N] [--entries N] [--no-baseline]]
//! ```
//!
//! Set `KAPPAKV_BENCH_DIR` to put the files somewhere other than the system temp dir (it must
//! not be tmpfs to measure the disk). Peak memory (VmHWM) is printed as each input is generated
//! (the input held in memory is most of it) and at the end.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use kappakv_indexes::{DEFAULT_CACHE_BYTES, Indexes, default_views};
use kappakv_protocol::{Entry, EntryId, Keypair, Lsn, Op, SignedEntry, Timestamp};
use redb::TableDefinition;

/// Entries in the log, and keys the baseline inserts (`--entries` sets another number, e.g.
/// to run under a profiler).
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
    entries: usize,
    baseline: bool,
}

fn options() -> Options {
    let mut opts = Options {
        shapes: Vec::new(),
        samples: 3,
        batch: REBUILD_BATCH,
        entries: ENTRIES,
        baseline: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes `--bench`.
            "--bench" => {}
            "--samples" => opts.samples = number(args.next(), "--samples"),
            "--batch" => opts.batch = number(args.next(), "--batch"),
            "--entries" => opts.entries = number(args.next(), "--entries"),
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
        "{} entries, {} per transaction, {} sample(s), files in {}; rates are entries \
         per second of wall-clock time, and (in brackets) per second the thread spent on a CPU",
        opts.entries,
        opts.batch,
        opts.samples,
        base.display()
    );
    let keys = random_keys(opts.entries);
    for &shape in &opts.shapes {
        let log = generate(shape, opts.entries);
        println!("{}: input generated; VmHWM {}", shape.name(), peak_rss());
        let mut rebuilds = Rates::default();
        let mut raws = Rates::default();
        for sample in 1..=opts.samples {
            let raw = opts.baseline.then(|| raw_redb(&base, &keys));
            let rebuilt = rebuild(&base, &log, opts.batch);
            print!("{} sample {sample}: rebuild {}", shape.name(), rebuilt);
            rebuilds.push(rebuilt);
            if let Some(raw) = raw {
                print!(", raw redb {raw}, ratio {}", rebuilt.ratio(raw));
                raws.push(raw);
            }
            println!();
        }
        print!("{} median: rebuild {}", shape.name(), rebuilds.summary());
        if opts.baseline {
            print!(
                ", raw redb {}, ratio {}",
                raws.summary(),
                Rates::ratio_summary(&rebuilds, &raws)
            );
        }
        println!();
    }
    println!("peak memory: VmHWM {}", peak_rss());
}

/// One run's rate: entries (or inserts) per second of wall-clock time, and per second the
/// thread spent on a CPU (where `/proc/thread-self/schedstat` tells), which a busy machine
/// disturbs less.
#[derive(Debug, Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: Option<f64>,
}

impl Rate {
    fn measure(entries: usize, run: impl FnOnce()) -> Self {
        let (cpu_before, started) = (thread_cpu(), Instant::now());
        run();
        let wall = started.elapsed();
        let cpu = thread_cpu()
            .zip(cpu_before)
            .and_then(|(after, before)| after.checked_sub(before));
        let per_second = |time: Duration| entries as f64 / time.as_secs_f64();
        Self {
            wall: per_second(wall),
            cpu: cpu.map(per_second),
        }
    }

    fn ratio(self, base: Rate) -> Ratio {
        Ratio {
            wall: self.wall / base.wall,
            cpu: self.cpu.zip(base.cpu).map(|(a, b)| a / b),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", k(self.wall))?;
        match self.cpu {
            Some(cpu) => write!(f, " ({})", k(cpu)),
            None => Ok(()),
        }
    }
}

struct Ratio {
    wall: f64,
    cpu: Option<f64>,
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}", self.wall)?;
        match self.cpu {
            Some(cpu) => write!(f, " ({cpu:.2})"),
            None => Ok(()),
        }
    }
}

/// The samples of one measurement.
#[derive(Default)]
struct Rates(Vec<Rate>);

impl Rates {
    fn push(&mut self, rate: Rate) {
        self.0.push(rate);
    }

    fn walls(&self) -> Vec<f64> {
        self.0.iter().map(|r| r.wall).collect()
    }

    fn cpus(&self) -> Option<Vec<f64>> {
        self.0.iter().map(|r| r.cpu).collect()
    }

    /// Median (min–max), wall-clock and then CPU.
    fn summary(&self) -> String {
        let walls = self.walls();
        let mut out = format!(
            "{} ({}–{})",
            k(median(&walls)),
            k(min(&walls)),
            k(max(&walls))
        );
        if let Some(cpus) = self.cpus() {
            write!(out, " [CPU {}]", k(median(&cpus))).expect("a String takes any write");
        }
        out
    }

    /// The median (min–max) of the per-sample ratios, wall-clock and then CPU.
    fn ratio_summary(rebuilds: &Rates, raws: &Rates) -> String {
        let ratios: Vec<Ratio> = rebuilds
            .0
            .iter()
            .zip(&raws.0)
            .map(|(a, b)| a.ratio(*b))
            .collect();
        let walls: Vec<f64> = ratios.iter().map(|r| r.wall).collect();
        let mut out = format!(
            "{:.2} ({:.2}–{:.2})",
            median(&walls),
            min(&walls),
            max(&walls)
        );
        let cpus: Option<Vec<f64>> = ratios.iter().map(|r| r.cpu).collect();
        if let Some(cpus) = cpus {
            write!(out, " [CPU {:.2}]", median(&cpus)).expect("a String takes any write");
        }
        out
    }
}

/// Time the calling thread has spent on a CPU: the first field of
/// `/proc/thread-self/schedstat`, in nanoseconds.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
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
/// durable, then one durable commit, as a rebuild does. Measures from the first apply to the
/// last commit.
fn rebuild(base: &Path, log: &[SignedEntry], batch: usize) -> Rate {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let (indexes, _) =
        Indexes::open(dir.path().join("indexes.redb"), default_views()).expect("open");
    let log: Vec<(Lsn, &SignedEntry)> = log
        .iter()
        .enumerate()
        .map(|(i, e)| (i as Lsn + 1, e))
        .collect();
    Rate::measure(log.len(), || {
        for chunk in log.chunks(batch) {
            indexes.apply(chunk, true).expect("apply");
        }
        indexes.persist().expect("persist");
    })
}

const BASELINE: TableDefinition<&[u8; 16], u64> = TableDefinition::new("baseline");

/// redb inserting `keys`, random 16-byte keys, in one durable transaction into a fresh file
/// with the views' page cache.
fn raw_redb(base: &Path, keys: &[[u8; 16]]) -> Rate {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let db = redb::Database::builder()
        .set_cache_size(DEFAULT_CACHE_BYTES)
        .create(dir.path().join("baseline.redb"))
        .expect("create");
    Rate::measure(keys.len(), || {
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(BASELINE).expect("table");
            for (i, key) in keys.iter().enumerate() {
                table.insert(key, i as u64).expect("insert");
            }
        }
        txn.commit().expect("commit");
    })
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

fn random_keys(entries: usize) -> Vec<[u8; 16]> {
    let mut rng = SplitMix(1);
    (0..entries)
        .map(|_| {
            let mut key = [0; 16];
            key[..8].copy_from_slice(&rng.next().to_le_bytes());
            key[8..].copy_from_slice(&rng.next().to_le_bytes());
            key
        })
        .collect()
}

/// The log of `shape`: entries in LSN order, LSNs from 1.
fn generate(shape: Shape, entries: usize) -> Vec<SignedEntry> {
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
    (0..entries as u64)
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
