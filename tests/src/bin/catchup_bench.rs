//! Catch-up benchmark: a fresh node replicating a large log from one peer over loopback QUIC,
//! measured until it has indexed everything.
//!
//! Node A's log is written offline: `--entries` entries of A's own chain, one put each of a
//! `--value-bytes` value to one of `--keys` keys (`key-%08d`, drawn at random), each put
//! superseding the previous version of its key, appended in group commits of 1024 entries with
//! the last one signed, as the writer does under load. A then runs as a `kappakv serve` child
//! process and indexes its log at start. For each of `--runs` runs a fresh node B starts as a
//! child process, peered with A; the clock runs from B's spawn until B's `indexed_lsn` equals
//! A's log LSN and B's version vector equals A's. B's status is sampled every 100 ms, which
//! also shows when B's log was complete (shipping) against when its views were (indexing).
//!
//! ```text
//! cargo run --release -p kappakv-tests --bin catchup-bench -- --entries 1000000 --runs 3
//! ```
//!
//! The `kappakv` binary is built next to this one (same profile) by `cargo build` first, unless
//! `--kappakv PATH` names one. `--dir DIR` puts the data dirs under `DIR` (default: the system
//! temp dir). `--b-env KAPPAKV_SETTING=VALUE` (repeatable) gives B a setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kappakv_client::Client;
use kappakv_protocol::{Entry, EntryId, HlcClock, Keypair, Op, SignedEntry, Status, Ticket};
use kappakv_server::identity;
use kappakv_server::log::{LogConfig, LogStore, log_dir};
use kappakv_tests::bench::{median, vv, wall_millis};
use kappakv_tests::crash::Rng;
use kappakv_tests::free_udp_port;

/// Entries per group commit when filling A's log; the last of each is signed.
const FILL_BATCH: usize = 1024;
/// How often B's status is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A run that has not caught up by then fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Args {
    entries: u64,
    keys: u64,
    value_bytes: usize,
    runs: usize,
    dir: Option<PathBuf>,
    kappakv: Option<PathBuf>,
    /// `KAPPAKV_*` settings for B, such as `KAPPAKV_INDEX_BATCH_ENTRIES_MAX=100000`.
    b_env: Vec<(String, String)>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        entries: 1_000_000,
        keys: 100_000,
        value_bytes: 100,
        runs: 3,
        dir: None,
        kappakv: None,
        b_env: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--entries" => args.entries = value()?.parse()?,
            "--keys" => args.keys = value()?.parse()?,
            "--value-bytes" => args.value_bytes = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            "--kappakv" => args.kappakv = Some(value()?.into()),
            "--b-env" => {
                let v = value()?;
                let (k, v) = v.split_once('=').context("--b-env takes KEY=VALUE")?;
                args.b_env.push((k.to_string(), v.to_string()));
            }
            "-h" | "--help" => {
                println!(
                    "catchup-bench [--entries N] [--keys N] [--value-bytes N] [--runs N] [--dir DIR] [--kappakv PATH] [--b-env KAPPAKV_SETTING=VALUE]..."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.entries == 0 || args.keys == 0 || args.runs == 0 {
        bail!("--entries, --keys and --runs must be positive");
    }
    Ok(args)
}

/// Writes A's chain into the log of `data_dir`.
fn fill(data_dir: &Path, keypair: &Keypair, args: &Args) -> Result<()> {
    let (mut store, recovery) = LogStore::open(&log_dir(data_dir), &LogConfig::default())?;
    if store.last_lsn() != 0 || !recovery.heads.is_empty() {
        bail!("{} already holds a log", data_dir.display());
    }
    let author = keypair.node_id();
    let mut rng = Rng::new(0x00c0_ffee);
    let mut clock = HlcClock::default();
    let mut latest: Vec<Option<EntryId>> = vec![None; args.keys as usize];
    let mut prev = None;
    let mut payloads = Vec::with_capacity(FILL_BATCH);
    let mut value = vec![0u8; args.value_bytes];
    for seq in 1..=args.entries {
        let k = rng.next_u64() % args.keys;
        for (i, b) in value.iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        let entry = Entry {
            author,
            seq,
            prev,
            timestamp: clock.now(wall_millis()),
            ops: vec![Op::Put {
                key: format!("key-{k:08}").into_bytes(),
                value: value.clone(),
                supersedes: latest[k as usize].into_iter().collect(),
            }],
        };
        let id = entry.id();
        latest[k as usize] = Some(id);
        prev = Some(id);
        let last_of_batch = payloads.len() + 1 == FILL_BATCH || seq == args.entries;
        let signed = SignedEntry {
            entry,
            id,
            signature: last_of_batch.then(|| keypair.sign(&id)),
        };
        payloads.push(signed.encode_payload());
        if last_of_batch {
            store.append(&payloads)?;
            payloads.clear();
        }
    }
    Ok(())
}

/// A `kappakv serve` child process.
struct Node {
    child: Child,
    data_dir: PathBuf,
}

impl Node {
    fn spawn(
        exe: &Path,
        data_dir: &Path,
        listen: SocketAddr,
        peers: &[String],
        env: &[(String, String)],
    ) -> Result<Self> {
        let log = std::fs::File::create(data_dir.with_extension("stderr"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &listen.to_string()]);
        for p in peers {
            cmd.args(["--peer", p]);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KAPPAKV_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .env("KAPPAKV_ADMIN_LISTEN", "off")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        Ok(Self {
            child,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// A client, once the node has written its ticket and answers.
    async fn client(&mut self) -> Result<Option<Client>> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}", self.data_dir.display());
        }
        let Ok(text) = std::fs::read_to_string(self.data_dir.join("client.ticket")) else {
            return Ok(None);
        };
        let ticket: Ticket = text.trim().parse()?;
        Ok(Client::connect(&ticket).await.ok())
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// CPU seconds (user + system) used so far: the whole process, and its live threads summed
    /// by name (tokio workers, the writer, the indexer…).
    fn cpu(&self) -> (f64, BTreeMap<String, f64>) {
        let pid = self.child.id();
        let total = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| cpu_of_stat(&s))
            .map_or(0.0, |(_, secs)| secs);
        let mut threads = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in dir.flatten() {
                if let Some((name, secs)) = std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(|s| cpu_of_stat(&s))
                {
                    *threads.entry(name).or_insert(0.0) += secs;
                }
            }
        }
        (total, threads)
    }

    /// SIGTERM, then wait for the exit.
    fn stop(mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            self.child.kill()?;
        }
        self.child.wait()?;
        Ok(())
    }
}

/// The name and CPU seconds of a `/proc/…/stat` line (utime and stime, at 100 ticks a second,
/// Linux's `USER_HZ` on every common architecture).
fn cpu_of_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) as f64 / 100.0))
}

fn cpu_summary(total: f64, threads: &BTreeMap<String, f64>) -> String {
    let mut parts: Vec<(f64, &String)> = threads.iter().map(|(n, s)| (*s, n)).collect();
    parts.sort_by(|a, b| b.0.total_cmp(&a.0));
    let parts: Vec<String> = parts
        .iter()
        .filter(|(s, _)| *s >= 0.05)
        .map(|(s, n)| format!("{n} {s:.1}"))
        .collect();
    format!("{total:.1} s CPU ({})", parts.join(", "))
}

async fn wait_client(node: &mut Node) -> Result<Client> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(c) = node.client().await? {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("{} never answered", node.data_dir.display());
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// One sample of B: seconds since its spawn, its log LSN and indexed LSN.
type Sample = (f64, u64, u64);

struct RunResult {
    secs: f64,
    /// B's CPU at the end, and A's CPU during the run.
    b_cpu: String,
    a_cpu: f64,
    log_complete_secs: f64,
    peak_rss: Option<u64>,
    samples: Vec<Sample>,
}

async fn run_once(
    a: &Node,
    exe: &Path,
    b_dir: &Path,
    b_addr: SocketAddr,
    a_peer: &str,
    target: &Status,
    b_env: &[(String, String)],
) -> Result<RunResult> {
    let total = target.log_lsn;
    let want = vv(target);
    let a_cpu_before = a.cpu().0;
    let started = Instant::now();
    let mut b = Node::spawn(exe, b_dir, b_addr, &[a_peer.to_string()], b_env)?;
    let mut client = None;
    let mut samples = Vec::new();
    let mut log_complete_secs = None;
    let secs = loop {
        if started.elapsed() > RUN_TIMEOUT {
            bail!("B did not catch up within {RUN_TIMEOUT:?}");
        }
        if client.is_none() {
            client = b.client().await?;
        }
        if let Some(c) = &client {
            let s = c.status().await?;
            let t = started.elapsed().as_secs_f64();
            samples.push((t, s.log_lsn, s.indexed_lsn));
            if s.log_lsn >= total && log_complete_secs.is_none() {
                log_complete_secs = Some(t);
            }
            if s.indexed_lsn >= total && vv(&s) == want {
                break t;
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    let peak_rss = b.peak_rss();
    let (b_total, b_threads) = b.cpu();
    let a_cpu = a.cpu().0 - a_cpu_before;
    b.stop()?;
    Ok(RunResult {
        secs,
        b_cpu: cpu_summary(b_total, &b_threads),
        a_cpu,
        log_complete_secs: log_complete_secs.unwrap_or(secs),
        peak_rss,
        samples,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let exe = match &args.kappakv {
        Some(path) => path.clone(),
        None => kappakv_tests::binary("kappakv")?,
    };
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let a_dir = tmp.path().join("a");
    let a_key = identity::load_or_create(&a_dir)?;
    let a_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    // Every B is known up front, so that A, which accepts only peers on its list, is started once.
    let mut bs = Vec::new();
    for i in 0..args.runs {
        let dir = tmp.path().join(format!("b{i}"));
        let id = identity::load_or_create(&dir)?.node_id();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        bs.push((dir, id, addr));
    }

    let t = Instant::now();
    fill(&a_dir, &a_key, &args)?;
    let fill_secs = t.elapsed().as_secs_f64();
    let log_bytes: u64 = std::fs::read_dir(log_dir(&a_dir))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "A: {} entries ({:.0} MiB of log) written offline in {fill_secs:.1} s",
        args.entries,
        mib(log_bytes)
    );

    let peers: Vec<String> = bs
        .iter()
        .map(|(_, id, addr)| format!("{id}@{addr}"))
        .collect();
    let t = Instant::now();
    let mut a = Node::spawn(&exe, &a_dir, a_addr, &peers, &[])?;
    let a_client = wait_client(&mut a).await?;
    let target = a_client.status().await?;
    if target.log_lsn != args.entries || target.indexed_lsn != args.entries {
        bail!(
            "A serves with log {} and indexed {}, expected {}",
            target.log_lsn,
            target.indexed_lsn,
            args.entries
        );
    }
    println!(
        "A: started and indexed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let a_peer = format!("{}@{a_addr}", a_key.node_id());

    let mut results = Vec::new();
    for (i, (dir, _, addr)) in bs.iter().enumerate() {
        let r = run_once(&a, &exe, dir, *addr, &a_peer, &target, &args.b_env).await?;
        println!(
            "run {}: {:.2} s, {:.0} entries/s; log complete at {:.2} s; B peak RSS {}",
            i + 1,
            r.secs,
            args.entries as f64 / r.secs,
            r.log_complete_secs,
            r.peak_rss
                .map_or("?".into(), |b| format!("{:.0} MiB", mib(b)))
        );
        println!("  B: {}; A: {:.1} s CPU", r.b_cpu, r.a_cpu);
        // Progress about once a second: seconds, B's log LSN, B's indexed LSN.
        let mut next = 0.0;
        for &(t, log, indexed) in &r.samples {
            if t >= next {
                println!("  {t:6.1} s  log {log:>9}  indexed {indexed:>9}");
                next = t.floor() + 1.0;
            }
        }
        results.push(r);
        std::fs::remove_dir_all(dir)?;
    }
    drop(a_client);
    a.stop()?;

    let rate = |r: &RunResult| args.entries as f64 / r.secs;
    let mut rates: Vec<f64> = results.iter().map(rate).collect();
    let (lo, hi) = (
        rates.iter().copied().fold(f64::INFINITY, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
    );
    let mut ship: Vec<f64> = results.iter().map(|r| r.log_complete_secs).collect();
    let mut secs: Vec<f64> = results.iter().map(|r| r.secs).collect();
    let mut rss: Vec<f64> = results.iter().filter_map(|r| r.peak_rss).map(mib).collect();
    println!(
        "median of {} runs: {:.0} entries/s (min {lo:.0}, max {hi:.0}); {:.2} s to indexed, log complete at {:.2} s; B peak RSS {}",
        results.len(),
        median(&mut rates),
        median(&mut secs),
        median(&mut ship),
        if rss.is_empty() {
            "?".into()
        } else {
            format!("{:.0} MiB", median(&mut rss))
        }
    );
    Ok(())
}
