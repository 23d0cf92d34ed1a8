//! Catch-up benchmark: a fresh node replicating a large log from one peer over loopback QUIC,
//! measured until it answers reads with the peer's current values and until it has indexed
//! everything.
//!
//! Node A's log is written in one of two ways (`--fill`):
//!
//! - `offline` (the default): `--entries` entries of A's own chain written straight into the log,
//!   one put each of a `--value-bytes` value to one of `--keys` keys (default 100,000,
//!   `key-%08d`, drawn at random), each put superseding the previous version of its key,
//!   appended in group commits of 1024 entries with the last one signed, as the writer does
//!   under load. A then runs as a `kappakv serve` child process and indexes its log at start.
//! - `bench`: what users produce. A runs as a `kappakv serve` child and `kappactl bench --op
//!   put` writes `--entries` puts through it from `--clients` concurrent clients (default 64),
//!   `--value-bytes` values over `--keys` keys (default 10,000, `bench/%010d`): the log holds the
//!   writer's own group commits, plain writes resolved by the node.
//!
//! Before the runs a few keys' current values are read from A (`--probes`, spread over the key
//! space). For each of `--runs` runs a fresh node B starts as a child process, peered with A,
//! and the clock runs from B's spawn until each [`Mark`]: the first get on B answering A's
//! current value of a probed key (every probed key is asked every ~20 ms, one get at a time),
//! every probed key answering it, B's log holding A's whole log, B's `indexed_lsn` equal to A's
//! log LSN with B's version vector equal to A's, and, when B started from A's snapshot (the
//! default, `bootstrap = snapshot`), B's replay verifying the snapshot's state root. B's status
//! is sampled every 100 ms.
//!
//! ```text
//! cargo run --release -p kappakv-tests --bin catchup-bench -- --entries 1000000 --runs 3
//! cargo run --release -p kappakv-tests --bin catchup-bench -- --fill bench --entries 1000000 --runs 3 --dir DIR
//! ```
//!
//! The `kappakv` and `kappactl` binaries are built next to this one (same profile) by `cargo
//! build` first, unless `--kappakv PATH` or `--kappactl PATH` names one. `--dir DIR` puts the
//! data dirs under `DIR` (default: the system temp dir) and keeps A's there, named after how it
//! was filled, for the next invocation: one that finds A's log already holding `--entries`
//! entries skips the fill (one holding fewer, after an interrupted `bench` fill, gets the rest).
//! `--b-env KAPPAKV_SETTING=VALUE` (repeatable) gives B a setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kappakv_client::Client;
use kappakv_protocol::{
    Entry, EntryId, HlcClock, Keypair, Op, SignedEntry, Status, Ticket, Version,
};
use kappakv_server::identity;
use kappakv_server::log::{LogConfig, LogStore, log_dir};
use kappakv_tests::bench::{median, vv, wall_millis};
use kappakv_tests::crash::Rng;
use kappakv_tests::free_udp_port;

/// Entries per group commit when filling A's log offline; the last of each is signed.
const FILL_BATCH: usize = 1024;
/// How often B's status is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long a probe waits between two gets of its key, and B's start between two tries to
/// connect.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// A get on B that has not answered by then is given up and asked again.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// A run that has not caught up by then fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// `kappactl bench` rounds a bench fill may take (a round that errs writes fewer entries).
const FILL_ROUNDS_MAX: usize = 3;

/// How A's log is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// Straight into the log, before A starts.
    Offline,
    /// Through A, by `kappactl bench --op put`.
    Bench,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Fill::Offline => "offline",
            Fill::Bench => "bench",
        }
    }

    /// The name of key number `k`.
    fn key(self, k: u64) -> String {
        match self {
            Fill::Offline => format!("key-{k:08}"),
            Fill::Bench => format!("bench/{k:010}"),
        }
    }
}

struct Args {
    fill: Fill,
    entries: u64,
    keys: u64,
    value_bytes: usize,
    clients: u32,
    probes: u64,
    runs: usize,
    dir: Option<PathBuf>,
    kappakv: Option<PathBuf>,
    kappactl: Option<PathBuf>,
    /// `KAPPAKV_*` settings for B, such as `KAPPAKV_INDEX_BATCH_ENTRIES_MAX=100000`.
    b_env: Vec<(String, String)>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        fill: Fill::Offline,
        entries: 1_000_000,
        keys: 0,
        value_bytes: 100,
        clients: 64,
        probes: 8,
        runs: 3,
        dir: None,
        kappakv: None,
        kappactl: None,
        b_env: Vec::new(),
    };
    let mut keys = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--fill" => {
                args.fill = match value()?.as_str() {
                    "offline" => Fill::Offline,
                    "bench" => Fill::Bench,
                    other => bail!("--fill is offline or bench, not {other}"),
                }
            }
            "--entries" => args.entries = value()?.parse()?,
            "--keys" => keys = Some(value()?.parse()?),
            "--value-bytes" => args.value_bytes = value()?.parse()?,
            "--clients" => args.clients = value()?.parse()?,
            "--probes" => args.probes = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            "--kappakv" => args.kappakv = Some(value()?.into()),
            "--kappactl" => args.kappactl = Some(value()?.into()),
            "--b-env" => {
                let v = value()?;
                let (k, v) = v.split_once('=').context("--b-env takes KEY=VALUE")?;
                args.b_env.push((k.to_string(), v.to_string()));
            }
            "-h" | "--help" => {
                println!(
                    "catchup-bench [--fill offline|bench] [--entries N] [--keys N] [--value-bytes N] [--clients N] [--probes N] [--runs N] [--dir DIR] [--kappakv PATH] [--kappactl PATH] [--b-env KAPPAKV_SETTING=VALUE]..."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    args.keys = keys.unwrap_or(match args.fill {
        Fill::Offline => 100_000,
        Fill::Bench => 10_000,
    });
    if args.entries == 0 || args.keys == 0 || args.runs == 0 || args.clients == 0 {
        bail!("--entries, --keys, --clients and --runs must be positive");
    }
    Ok(args)
}

/// Where A's data dir lives under `--dir`, named after what fills it, so that the next
/// invocation with the same arguments finds it filled.
fn kept_a_dir(dir: &Path, args: &Args) -> PathBuf {
    let clients = match args.fill {
        Fill::Offline => String::new(),
        Fill::Bench => format!("-{}c", args.clients),
    };
    dir.join(format!(
        "catchup-a-{}-{}e-{}k-{}b{clients}",
        args.fill.name(),
        args.entries,
        args.keys,
        args.value_bytes
    ))
}

/// Writes A's chain into the log of `data_dir`, unless it already holds it; returns whether it
/// wrote it.
fn fill_offline(data_dir: &Path, keypair: &Keypair, args: &Args) -> Result<bool> {
    let (mut store, recovery) = LogStore::open(&log_dir(data_dir), &LogConfig::default())?;
    if store.last_lsn() == args.entries {
        return Ok(false);
    }
    if store.last_lsn() != 0 || !recovery.heads.is_empty() {
        bail!(
            "{} already holds a log of {} entries, not {}: remove it",
            data_dir.display(),
            store.last_lsn(),
            args.entries
        );
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
                key: Fill::Offline.key(k).into_bytes(),
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
    Ok(true)
}

/// Writes puts through the running node A with `kappactl bench` until its log holds
/// `args.entries` entries; returns how many it wrote.
async fn fill_bench(kappactl: &Path, a: &Node, client: &Client, args: &Args) -> Result<u64> {
    let mut written = 0;
    for _ in 0..FILL_ROUNDS_MAX {
        let have = client.status().await?.log_lsn;
        if have >= args.entries {
            return Ok(written);
        }
        let requests = args.entries - have;
        let t = Instant::now();
        let mut cmd = Command::new(kappactl);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KAPPAKV_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--data-dir")
            .arg(&a.data_dir)
            .args(["bench", "--op", "put", "--json"])
            .args(["--clients", &args.clients.to_string()])
            .args(["--requests", &requests.to_string()])
            .args(["--value-size", &args.value_bytes.to_string()])
            .args(["--keys", &args.keys.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .with_context(|| format!("running {}", kappactl.display()))?;
        let report = String::from_utf8_lossy(&out.stdout);
        println!(
            "A: kappactl bench, {requests} puts in {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            report.trim()
        );
        if !out.status.success() {
            bail!("kappactl bench exited with {}", out.status);
        }
        written += client.status().await?.log_lsn - have;
    }
    let have = client.status().await?.log_lsn;
    if have < args.entries {
        bail!(
            "A's log holds {have} entries after {FILL_ROUNDS_MAX} rounds of kappactl bench, not {}",
            args.entries
        );
    }
    Ok(written)
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
        let Ok(ticket) = text.trim().parse::<Ticket>() else {
            return Ok(None);
        };
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

impl Drop for Node {
    /// A node still running when the bench ends early (an error) is killed, not left behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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

/// Waits until `node` answers, checking every `every`.
async fn wait_client(node: &mut Node, every: Duration) -> Result<Client> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(c) = node.client().await? {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("{} never answered", node.data_dir.display());
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until the node's views have applied its whole log; returns its status then.
async fn wait_indexed(client: &Client) -> Result<Status> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let s = client.status().await?;
        if s.indexed_lsn >= s.log_lsn {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "indexed {} of {} within {RUN_TIMEOUT:?}",
                s.indexed_lsn,
                s.log_lsn
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// What a run times, each from B's spawn to the first moment it held.
///
/// A moment read from B's status is one more variant, a label and a line in
/// [`Mark::of_status`]. A run ends once B has indexed A's log, its bootstrap (if it started from
/// a snapshot) is done, and every probed key answered A's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    /// A get on B answered A's current value of one of the probed keys.
    FirstGet,
    /// Every probed key answered A's current value.
    AllGets,
    /// B's log held as many records as A's.
    LogComplete,
    /// B's views had applied A's whole log and B's version vector equalled A's.
    Indexed,
    /// B, started from A's snapshot, replayed its log up to the snapshot and found the
    /// snapshot's state root (`status.bootstrap.verified`).
    Verified,
}

impl Mark {
    /// Every mark, in the order printed.
    const ALL: [Mark; 5] = [
        Mark::FirstGet,
        Mark::AllGets,
        Mark::LogComplete,
        Mark::Indexed,
        Mark::Verified,
    ];

    fn label(self) -> &'static str {
        match self {
            Mark::FirstGet => "first current get",
            Mark::AllGets => "all probed keys current",
            Mark::LogComplete => "log complete",
            Mark::Indexed => "indexed",
            Mark::Verified => "verified",
        }
    }

    /// The marks a sample of B's status shows, given A's status and version vector.
    fn of_status(
        b: &Status,
        a: &Status,
        a_vv: &BTreeMap<kappakv_protocol::NodeId, u64>,
    ) -> Vec<Mark> {
        let mut marks = Vec::new();
        if b.log_lsn >= a.log_lsn {
            marks.push(Mark::LogComplete);
        }
        if b.indexed_lsn >= a.log_lsn && vv(b) == *a_vv {
            marks.push(Mark::Indexed);
        }
        if b.bootstrap.as_ref().is_some_and(|s| s.verified) {
            marks.push(Mark::Verified);
        }
        marks
    }
}

/// A probed key and A's current versions of it.
type Probe = (String, Vec<Version>);

/// One sample of B: seconds since its spawn, its log LSN and indexed LSN.
type Sample = (f64, u64, u64);

struct RunResult {
    /// Seconds from B's spawn to each mark that held.
    marks: BTreeMap<Mark, f64>,
    /// B's CPU at the end, and A's CPU during the run.
    b_cpu: String,
    a_cpu: f64,
    peak_rss: Option<u64>,
    samples: Vec<Sample>,
}

/// Asks B for `key` every [`PROBE_EVERY`], one get at a time, until it answers `want`; returns
/// the seconds from `started` to that answer.
async fn probe(client: &Client, key: &str, want: &[Version], started: Instant) -> Result<f64> {
    loop {
        if let Ok(Ok(got)) = tokio::time::timeout(PROBE_TIMEOUT, client.get(key)).await
            && got.values == want
        {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > RUN_TIMEOUT {
            bail!("B never answered A's value of {key} within {RUN_TIMEOUT:?}");
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    a: &Node,
    exe: &Path,
    b_dir: &Path,
    b_addr: SocketAddr,
    a_peer: &str,
    target: &Status,
    probes: &[Probe],
    b_env: &[(String, String)],
) -> Result<RunResult> {
    let want = vv(target);
    let a_cpu_before = a.cpu().0;
    let started = Instant::now();
    let mut b = Node::spawn(exe, b_dir, b_addr, &[a_peer.to_string()], b_env)?;
    let client = wait_client(&mut b, PROBE_EVERY).await?;
    let mut marks = BTreeMap::new();
    let gets = futures_util::future::try_join_all(
        probes
            .iter()
            .map(|(key, values)| probe(&client, key, values, started)),
    );
    let status = async {
        let mut samples = Vec::new();
        let mut marks = BTreeMap::new();
        let mut refused = false;
        loop {
            if started.elapsed() > RUN_TIMEOUT {
                bail!("B did not catch up within {RUN_TIMEOUT:?}");
            }
            let s = client.status().await?;
            let t = started.elapsed().as_secs_f64();
            samples.push((t, s.log_lsn, s.indexed_lsn));
            for mark in Mark::of_status(&s, target, &want) {
                marks.entry(mark).or_insert(t);
            }
            if s.bootstrap.as_ref().is_some_and(|s| s.refused) && !refused {
                refused = true;
                println!("  B refused A's snapshot: its replay ended with another state root");
            }
            let bootstrap_done = s.bootstrap.as_ref().is_none_or(|s| !s.serving_snapshot);
            if marks.contains_key(&Mark::Indexed) && bootstrap_done {
                return Ok((marks, samples));
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    };
    let (gets, (status_marks, samples)) = tokio::try_join!(gets, status)?;
    marks.extend(status_marks);
    if let Some(first) = gets.iter().copied().reduce(f64::min) {
        marks.insert(Mark::FirstGet, first);
    }
    if let Some(last) = gets.iter().copied().reduce(f64::max) {
        marks.insert(Mark::AllGets, last);
    }
    let peak_rss = b.peak_rss();
    let (b_total, b_threads) = b.cpu();
    let a_cpu = a.cpu().0 - a_cpu_before;
    drop(client);
    b.stop()?;
    Ok(RunResult {
        marks,
        b_cpu: cpu_summary(b_total, &b_threads),
        a_cpu,
        peak_rss,
        samples,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Seconds, or a dash for a mark that never held.
fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.2} s"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let exe = match &args.kappakv {
        Some(path) => path.clone(),
        None => kappakv_tests::binary("kappakv")?,
    };
    let kappactl = match (&args.kappactl, args.fill) {
        (Some(path), _) => Some(path.clone()),
        (None, Fill::Bench) => Some(kappakv_tests::binary("kappactl")?),
        (None, Fill::Offline) => None,
    };
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let a_dir = match &args.dir {
        Some(d) => kept_a_dir(d, &args),
        None => tmp.path().join("a"),
    };
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
    let peers: Vec<String> = bs
        .iter()
        .map(|(_, id, addr)| format!("{id}@{addr}"))
        .collect();

    if args.fill == Fill::Offline {
        let t = Instant::now();
        if fill_offline(&a_dir, &a_key, &args)? {
            println!(
                "A: {} entries written offline in {:.1} s",
                args.entries,
                t.elapsed().as_secs_f64()
            );
        } else {
            println!("A: {} already holds its log", a_dir.display());
        }
    }
    // A kept data dir holds the ticket of A's last start, for an address it no longer listens on.
    match std::fs::remove_file(a_dir.join("client.ticket")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let t = Instant::now();
    // A is where the data starts: a node with peers and an empty log would otherwise wait for a
    // snapshot from them (the Bs, not started yet) and hold the bench fill's writes.
    let a_env = [("KAPPAKV_BOOTSTRAP".to_string(), "replay".to_string())];
    let mut a = Node::spawn(&exe, &a_dir, a_addr, &peers, &a_env)?;
    let a_client = wait_client(&mut a, SAMPLE_EVERY).await?;
    if let Some(kappactl) = &kappactl
        && args.fill == Fill::Bench
    {
        let written = fill_bench(kappactl, &a, &a_client, &args).await?;
        if written == 0 {
            println!("A: {} already holds its log", a_dir.display());
        }
    }
    let target = wait_indexed(&a_client).await?;
    if target.log_lsn < args.entries {
        bail!(
            "A serves with {} entries, expected {}",
            target.log_lsn,
            args.entries
        );
    }
    let log_bytes: u64 = std::fs::read_dir(log_dir(&a_dir))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "A: {} entries ({:.0} MiB of log) served and indexed {:.1} s after its start",
        target.log_lsn,
        mib(log_bytes),
        t.elapsed().as_secs_f64()
    );
    let mut probes: Vec<Probe> = Vec::new();
    for i in 0..args.probes.min(args.keys) {
        let key = args.fill.key(i * args.keys / args.probes.min(args.keys));
        let got = a_client.get(&key).await?;
        if !got.values.is_empty() {
            probes.push((key, got.values));
        }
    }
    println!("A: probing {} keys", probes.len());
    let a_peer = format!("{}@{a_addr}", a_key.node_id());

    let mut results = Vec::new();
    for (i, (dir, _, addr)) in bs.iter().enumerate() {
        let r = run_once(&a, &exe, dir, *addr, &a_peer, &target, &probes, &args.b_env).await?;
        let marks: Vec<String> = Mark::ALL
            .iter()
            .map(|m| format!("{} {}", m.label(), secs(r.marks.get(m).copied())))
            .collect();
        println!(
            "run {}: {}; {:.0} entries/s to indexed; B peak RSS {}",
            i + 1,
            marks.join(", "),
            r.marks
                .get(&Mark::Indexed)
                .map_or(0.0, |s| target.log_lsn as f64 / s),
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

    let mut medians = Vec::new();
    for mark in Mark::ALL {
        let mut v: Vec<f64> = results
            .iter()
            .filter_map(|r| r.marks.get(&mark).copied())
            .collect();
        if v.is_empty() {
            continue;
        }
        let (lo, hi) = (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        medians.push(format!(
            "{} {} ({lo:.2}–{hi:.2})",
            mark.label(),
            secs(Some(median(&mut v)))
        ));
    }
    let mut rates: Vec<f64> = results
        .iter()
        .filter_map(|r| r.marks.get(&Mark::Indexed))
        .map(|s| target.log_lsn as f64 / s)
        .collect();
    let mut rss: Vec<f64> = results.iter().filter_map(|r| r.peak_rss).map(mib).collect();
    println!(
        "median of {} runs ({} fill, {} entries): {}; {:.0} entries/s to indexed; B peak RSS {}",
        results.len(),
        args.fill.name(),
        target.log_lsn,
        medians.join(", "),
        if rates.is_empty() {
            0.0
        } else {
            median(&mut rates)
        },
        if rss.is_empty() {
            "?".into()
        } else {
            format!("{:.0} MiB", median(&mut rss))
        }
    );
    Ok(())
}
