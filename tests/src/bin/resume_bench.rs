//! Resume benchmark: what it costs a node to take back a peer that restarts next to it holding
//! the same history.
//!
//! Node P's log is written offline: `--entries` entries by `--authors` authors (P and others),
//! interleaved in runs of `--run` entries of one author, the last entry of each run signed, as a
//! live server writes under load; one put each of a `--value-bytes` value to one of `--keys`
//! keys, superseding the key's previous version. P starts once as a `kappakv serve` child to
//! index its log and stops; node N (its own identity) gets a copy of P's log and views. Then P
//! serves, peered with N, and for each of `--runs` runs N starts as a child process, peered with
//! P, and is stopped again. P's CPU time (user + system of the whole process) is read from
//! `/proc/PID/stat` (10 ms ticks) and, finer, summed over its threads from `/proc/PID/task/*/
//! schedstat` (nanoseconds), from N's spawn until both version vectors are equal, both sides
//! show the session up, and P has been quiet for a second since; P's idle rate, measured before
//! N starts, is taken off.
//!
//! ```text
//! cargo run --release --locked -p kappakv-tests --bin resume-bench -- --entries 1000000 --runs 5
//! ```
//!
//! The `kappakv` binary is built next to this one (same profile) by `cargo build` first, unless
//! `--kappakv PATH` names one. `--dir DIR` puts the data dirs under `DIR` (default: the system
//! temp dir).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kappakv_client::Client;
use kappakv_protocol::{EntryId, HlcClock, Keypair, Op, SignedEntry, Status, Ticket};
use kappakv_server::identity;
use kappakv_server::log::{LogConfig, LogStore, log_dir};
use kappakv_tests::bench::{median, vv, wall_millis};
use kappakv_tests::crash::Rng;
use kappakv_tests::free_udp_port;

/// Entries per append when filling P's log.
const FILL_BATCH: usize = 4096;
/// How often N's status and P's CPU are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// P counts as quiet once it used less than [`QUIET_CPU`] over this long.
const QUIET_FOR: Duration = Duration::from_secs(1);
const QUIET_CPU: Duration = Duration::from_millis(5);
/// A start or a run that has not finished by then fails.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Args {
    entries: u64,
    authors: u64,
    run: u64,
    keys: u64,
    value_bytes: usize,
    runs: usize,
    dir: Option<PathBuf>,
    kappakv: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        entries: 1_000_000,
        authors: 4,
        run: 30,
        keys: 100_000,
        value_bytes: 100,
        runs: 5,
        dir: None,
        kappakv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--entries" => args.entries = value()?.parse()?,
            "--authors" => args.authors = value()?.parse()?,
            "--run" => args.run = value()?.parse()?,
            "--keys" => args.keys = value()?.parse()?,
            "--value-bytes" => args.value_bytes = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            "--kappakv" => args.kappakv = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "resume-bench [--entries N] [--authors N] [--run N] [--keys N] [--value-bytes N] [--runs N] [--dir DIR] [--kappakv PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.entries == 0 || args.authors == 0 || args.run == 0 || args.keys == 0 || args.runs == 0 {
        bail!("--entries, --authors, --run, --keys and --runs must be positive");
    }
    Ok(args)
}

/// Writes the shared history into the log of `data_dir`: runs of one author's entries, each
/// run ending signed, authors taking turns at random.
fn fill(data_dir: &Path, authors: &[Keypair], args: &Args) -> Result<()> {
    let (mut store, recovery) = LogStore::open(&log_dir(data_dir), &LogConfig::default())?;
    if store.last_lsn() != 0 || !recovery.heads.is_empty() {
        bail!("{} already holds a log", data_dir.display());
    }
    let mut rng = Rng::new(0x00c0_ffee);
    let mut clock = HlcClock::default();
    let mut latest: Vec<Option<EntryId>> = vec![None; args.keys as usize];
    let mut heads: Vec<(u64, Option<EntryId>)> = vec![(0, None); authors.len()];
    let mut payloads = Vec::with_capacity(FILL_BATCH);
    let mut value = vec![0u8; args.value_bytes];
    let mut written = 0;
    while written < args.entries {
        let a = (rng.next_u64() % authors.len() as u64) as usize;
        let kp = &authors[a];
        let len = args.run.min(args.entries - written);
        for i in 0..len {
            let (seq, prev) = heads[a];
            let seq = seq + 1;
            let k = rng.next_u64() % args.keys;
            for (j, b) in value.iter_mut().enumerate() {
                *b = (written as usize + j) as u8;
            }
            let entry = kappakv_protocol::Entry {
                author: kp.node_id(),
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
            heads[a] = (seq, Some(id));
            let signed = SignedEntry {
                entry,
                id,
                signature: (i + 1 == len).then(|| kp.sign(&id)),
            };
            payloads.push(signed.encode_payload());
            written += 1;
        }
        if payloads.len() >= FILL_BATCH || written == args.entries {
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
    fn spawn(exe: &Path, data_dir: &Path, listen: SocketAddr, peers: &[String]) -> Result<Self> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("stderr"))?;
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

    async fn wait_client(&mut self) -> Result<Client> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(c) = self.client().await? {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!("{} never answered", self.data_dir.display());
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// CPU time used so far: `(utime + stime of the process, in 10 ms ticks; on-CPU time of
    /// its live threads, from schedstat)`.
    fn cpu(&self) -> (Duration, Duration) {
        let pid = self.child.id();
        let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| ticks_of_stat(&s))
            .unwrap_or(0);
        let mut ns = 0u64;
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in dir.flatten() {
                ns += std::fs::read_to_string(task.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        (Duration::from_millis(ticks * 10), Duration::from_nanos(ns))
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

/// utime + stime of a `/proc/…/stat` line, in ticks (Linux's `USER_HZ`, 100 a second).
fn ticks_of_stat(stat: &str) -> Option<u64> {
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// P's CPU over one resume of N, idle rate taken off: (ticks-based, schedstat-based), and how
/// long the run took.
struct RunResult {
    ticks: Duration,
    precise: Duration,
    idle_rate: f64,
    secs: f64,
}

async fn run_once(
    p: &Node,
    p_client: &Client,
    exe: &Path,
    n_dir: &Path,
    n_addr: SocketAddr,
    p_peer: &str,
    target: &Status,
) -> Result<RunResult> {
    let want = vv(target);
    // P's idle rate: keep-alives, redials of N while it is down.
    let idle_from = (Instant::now(), p.cpu().1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rate =
        p.cpu().1.saturating_sub(idle_from.1).as_secs_f64() / idle_from.0.elapsed().as_secs_f64();

    let (ticks_before, precise_before) = p.cpu();
    let started = Instant::now();
    let mut n = Node::spawn(exe, n_dir, n_addr, &[p_peer.to_string()])?;
    let mut client = None;
    let mut converged = false;
    let mut window: Vec<(Instant, Duration)> = Vec::new();
    loop {
        if started.elapsed() > TIMEOUT {
            bail!("N did not resume within {TIMEOUT:?}");
        }
        if client.is_none() {
            client = n.client().await?;
        }
        if !converged && let Some(c) = &client {
            let s = c.status().await?;
            let connected = s.peers.iter().any(|p| p.connected);
            // P's side of the session is up too (a simultaneous dial closes one connection).
            converged = connected
                && vv(&s) == want
                && p_client.status().await?.peers.iter().any(|p| p.connected);
            if converged {
                window.clear();
            }
        }
        let now = Instant::now();
        window.push((now, p.cpu().1));
        window.retain(|(t, _)| now.duration_since(*t) <= QUIET_FOR + SAMPLE_EVERY);
        let quiet = window.first().is_some_and(|(t, cpu)| {
            now.duration_since(*t) >= QUIET_FOR
                && window.last().expect("sampled").1.saturating_sub(*cpu) < QUIET_CPU
        });
        if converged && quiet {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let (ticks_after, precise_after) = p.cpu();
    let secs = started.elapsed().as_secs_f64();
    n.stop()?;
    let idle = Duration::from_secs_f64(idle_rate * secs);
    Ok(RunResult {
        ticks: ticks_after
            .saturating_sub(ticks_before)
            .saturating_sub(idle),
        precise: precise_after
            .saturating_sub(precise_before)
            .saturating_sub(idle),
        idle_rate,
        secs,
    })
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
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
    let p_dir = tmp.path().join("p");
    let n_dir = tmp.path().join("n");
    let p_key = identity::load_or_create(&p_dir)?;
    let n_key = identity::load_or_create(&n_dir)?;
    let p_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let n_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let mut authors = vec![Keypair::from_secret(p_key.secret())];
    for i in 1..args.authors {
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&i.to_le_bytes());
        secret[8] = 0x5a;
        authors.push(Keypair::from_secret(secret));
    }

    let t = Instant::now();
    fill(&p_dir, &authors, &args)?;
    println!(
        "P: {} entries of {} authors, signed every {} entries, written offline in {:.1} s",
        args.entries,
        args.authors,
        args.run,
        t.elapsed().as_secs_f64()
    );

    // P indexes its log once, and N starts from a copy of P's log and views.
    let t = Instant::now();
    let mut p = Node::spawn(&exe, &p_dir, p_addr, &[])?;
    let status = p.wait_client().await?.status().await?;
    if status.log_lsn != args.entries || status.indexed_lsn != args.entries {
        bail!(
            "P serves with log {} and indexed {}, expected {}",
            status.log_lsn,
            status.indexed_lsn,
            args.entries
        );
    }
    p.stop()?;
    println!(
        "P: indexed in {:.1} s; indexes.redb {:.0} MiB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(p_dir.join("indexes.redb"))?.len() as f64 / (1024.0 * 1024.0)
    );
    copy_dir(&log_dir(&p_dir), &log_dir(&n_dir))?;
    std::fs::remove_file(log_dir(&n_dir).join("LOCK")).ok();
    std::fs::copy(p_dir.join("indexes.redb"), n_dir.join("indexes.redb"))?;

    let n_peer = format!("{}@{n_addr}", n_key.node_id());
    let p_peer = format!("{}@{p_addr}", p_key.node_id());
    let mut p = Node::spawn(&exe, &p_dir, p_addr, &[n_peer])?;
    let p_client = p.wait_client().await?;
    let target = p_client.status().await?;

    let mut results = Vec::new();
    for i in 0..args.runs {
        let r = run_once(&p, &p_client, &exe, &n_dir, n_addr, &p_peer, &target).await?;
        println!(
            "run {}: P used {:.1} ms CPU ({:.0} ms in ticks) over {:.2} s, idle rate {:.2} ms/s taken off",
            i + 1,
            r.precise.as_secs_f64() * 1e3,
            r.ticks.as_secs_f64() * 1e3,
            r.secs,
            r.idle_rate * 1e3
        );
        results.push(r);
    }
    let status = p_client.status().await?;
    if vv(&status) != vv(&target) {
        bail!("P's version vector changed during the runs");
    }
    drop(p_client);
    p.stop()?;

    let mut precise: Vec<f64> = results
        .iter()
        .map(|r| r.precise.as_secs_f64() * 1e3)
        .collect();
    let mut ticks: Vec<f64> = results
        .iter()
        .map(|r| r.ticks.as_secs_f64() * 1e3)
        .collect();
    println!(
        "median of {} runs: P used {:.1} ms CPU to resume N ({:.0} ms in 10 ms ticks)",
        results.len(),
        median(&mut precise),
        median(&mut ticks)
    );
    Ok(())
}
