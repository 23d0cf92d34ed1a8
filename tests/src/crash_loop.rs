//! The crash loop: a real `kappakv serve` child process, killed with SIGKILL at random moments
//! while 16 to 64 writers put keys, restarted on the same data dir, and checked.
//!
//! Each cycle starts the node (with one declared secondary index, small log segments so that
//! rollover happens all the time, and a durable-commit interval for the views drawn at random),
//! then either kills it while it starts, or lets it serve, checks the writes of the cycles not
//! yet checked, runs the writers for a random few milliseconds and kills it (now and then
//! during a graceful stop, SIGKILL a moment after SIGTERM). Each writer writes keys of its own,
//! one put at a time; every fourth put overwrites its previous key, so the views also replay
//! supersedes after each crash. A cycle's check scans its keys: each holds its last
//! acknowledged write, value and entry id, as its only version, or the writer's later put that
//! was in flight when the node died; no other key is there.
//!
//! Every `check_every` cycles and at the end, a full check: every write ever acknowledged,
//! and every unacknowledged one found since, is there and nothing else; the node stops
//! cleanly; `kappakv verify` passes; and the node's `indexes.redb`, kept up to date across
//! every crash, equals row for row a full `kappakv rebuild-indexes` of a copy of its data dir.
//!
//! The choices (writers, delays, kill points, settings) come from one seeded generator; the
//! seed is printed so that a run can be repeated with the same choices (the timing, and so the
//! exact kill points, still varies).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use kappakv_client::Client;
use kappakv_protocol::{EntryId, KeyVersions};

use crate::crash::{
    Rng, Spawned, client_of, compare_with_rebuild, is_serving_line, scan_prefix, segment_count,
    serve_command, verify,
};
use crate::free_udp_port;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cycles: each starts the node and kills it.
    pub cycles: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Fewest concurrent writers in a cycle.
    pub writers_min: u64,
    /// Most concurrent writers in a cycle.
    pub writers_max: u64,
    /// The node is killed within this many milliseconds of the writers starting.
    pub load_ms_max: u64,
    /// A full check every this many cycles (0: only at the end).
    pub check_every: u64,
    /// `segment_bytes_max` of the node: small, so that the log rolls over to a new segment
    /// every few dozen entries.
    pub segment_bytes_max: u64,
    /// Where to put the data dir (default: the system's temporary dir). It is removed after a
    /// successful run and kept after a failure.
    pub dir: Option<PathBuf>,
    /// Print a progress line every this many cycles (0: never).
    pub progress_every: u64,
}

impl Options {
    /// The per-commit run: `cycles` short cycles with the given seed.
    pub fn quick(cycles: u64, seed: u64) -> Self {
        Self {
            cycles,
            seed,
            writers_min: 16,
            writers_max: 64,
            load_ms_max: 40,
            check_every: 25,
            segment_bytes_max: 4096,
            dir: None,
            progress_every: 0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Seed of the run.
    pub seed: u64,
    /// Cycles run.
    pub cycles: u64,
    /// SIGKILLs of a running node: one per cycle, less the graceful stops over before it.
    pub kills: u64,
    /// Of those, while the node was starting (before it said it serves: opening and recovering
    /// the log, catching its views up).
    pub kills_starting: u64,
    /// Of those, a moment after SIGTERM, during the graceful stop.
    pub kills_stopping: u64,
    /// Cycles where the graceful stop was over before the SIGKILL came.
    pub stopped_before_kill: u64,
    /// Writes acknowledged to the writers.
    pub acked: u64,
    /// Keys checked after a restart to hold their last acknowledged write, value and entry id
    /// (each once after the cycle that wrote it, and again at every full check).
    pub checked: u64,
    /// Writes in flight at a kill, not acknowledged, found durable after the restart.
    pub unacked_kept: u64,
    /// Writes in flight at a kill, not acknowledged, not in the log after the restart.
    pub unacked_lost: u64,
    /// Full checks (clean stop, verify, rebuild comparison).
    pub full_checks: u64,
    /// Rows compared between the incremental and rebuilt indexes at the last full check.
    pub index_rows: usize,
    /// Log entries at the end.
    pub log_entries: u64,
    /// Log segments at the end.
    pub segments: usize,
    /// The last `kappakv verify` summary.
    pub verify: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {:#x}: {} cycles in {:.1} s; {} kills ({} while starting, {} while stopping), \
             {} graceful stops over before the kill; \
             {} writes acknowledged, {} checks of acknowledged writes, all present; \
             {} unacknowledged writes kept, {} lost; {} full checks; {} log entries in {} segments; \
             last rebuild comparison: {} index rows equal",
            self.seed,
            self.cycles,
            self.elapsed.as_secs_f64(),
            self.kills,
            self.kills_starting,
            self.kills_stopping,
            self.stopped_before_kill,
            self.acked,
            self.checked,
            self.unacked_kept,
            self.unacked_lost,
            self.full_checks,
            self.log_entries,
            self.segments,
            self.index_rows,
        )
    }
}

/// The declared index of the node: every writer's documents by writer number.
const CONFIG: &str = r#"
[[index]]
name = "by_writer"
prefix = "c"
field = "w"
kind = "exact"
"#;

/// Intervals (ms) between durable commits of the views, one drawn per start: from every few
/// milliseconds (the views are durable at almost every kill) to the default (they are replayed
/// from the log after almost every kill).
const DURABLE_INTERVALS_MS: [u64; 4] = [10, 100, 500, 2_000];

/// How long a start, a check or a stop may take before the run fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(120);

fn cycle_prefix(cycle: u64) -> String {
    format!("c{cycle:06}/")
}

fn key_of(cycle: u64, writer: u64, i: u64) -> Vec<u8> {
    format!("{}w{writer:02}/{i:06}", cycle_prefix(cycle)).into_bytes()
}

fn value_of(cycle: u64, writer: u64, i: u64) -> Vec<u8> {
    format!(r#"{{"w":{writer},"c":{cycle},"i":{i}}}"#).into_bytes()
}

/// The writes of one cycle.
#[derive(Debug, Default)]
struct CycleWrites {
    cycle: u64,
    /// Acknowledged, in order: key, value, entry id. A key written again appears again.
    acked: Vec<(Vec<u8>, Vec<u8>, EntryId)>,
    /// Sent and not acknowledged when the node died: key → value.
    in_flight: BTreeMap<Vec<u8>, Vec<u8>>,
}

struct Run {
    opts: Options,
    rng: Rng,
    data_dir: PathBuf,
    work: PathBuf,
    config: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    /// Cycles whose writes have not been checked after a restart yet.
    pending: Vec<CycleWrites>,
    /// Every key that must be in the log: acknowledged, or found after a restart. Key →
    /// (value, id).
    known: BTreeMap<Vec<u8>, (Vec<u8>, EntryId)>,
    report: Report,
}

/// Runs the crash loop; fails at the first lost acknowledged write, wrong value, stray key,
/// failed verify or index difference, with the seed and cycle in the message. Prints the seed
/// first, and progress lines if asked.
pub async fn run(opts: Options) -> Result<Report> {
    println!("crash loop: seed {:#x}", opts.seed);
    let work = crate::crash::work_dir(opts.dir.as_deref())?;
    let seed = opts.seed;
    let mut run = Run::new(opts, work.path())?;
    match run.all().await {
        Ok(()) => Ok(run.report),
        Err(e) => {
            let kept = work.keep();
            Err(e.context(format!(
                "crash loop failed (seed {seed:#x}; replay with that seed); data dir and node log kept in {}",
                kept.display()
            )))
        }
    }
}

impl Run {
    fn new(opts: Options, work: &Path) -> Result<Self> {
        let config = work.join("kappakv.toml");
        std::fs::write(&config, CONFIG)?;
        Ok(Self {
            rng: Rng::new(opts.seed),
            report: Report {
                seed: opts.seed,
                ..Report::default()
            },
            opts,
            data_dir: work.join("data"),
            work: work.to_path_buf(),
            config,
            log: work.join("node.log"),
            listen: SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            pending: Vec::new(),
            known: BTreeMap::new(),
        })
    }

    async fn all(&mut self) -> Result<()> {
        let started = Instant::now();
        for cycle in 0..self.opts.cycles {
            self.cycle(cycle)
                .await
                .with_context(|| format!("cycle {cycle}"))?;
            self.report.cycles = cycle + 1;
            self.report.elapsed = started.elapsed();
            let last = cycle + 1 == self.opts.cycles;
            if !last && self.opts.check_every > 0 && (cycle + 1) % self.opts.check_every == 0 {
                self.full_check()
                    .await
                    .with_context(|| format!("full check after cycle {cycle}"))?;
            }
            if self.opts.progress_every > 0 && (cycle + 1) % self.opts.progress_every == 0 {
                println!(
                    "cycle {}/{}: {} writes acknowledged, {} kills, {:.1} s",
                    cycle + 1,
                    self.opts.cycles,
                    self.report.acked,
                    self.report.kills,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        self.full_check().await.context("final full check")?;
        self.report.elapsed = started.elapsed();
        Ok(())
    }

    /// Starts the node with a durable interval drawn at random.
    fn spawn(&mut self) -> Result<Spawned> {
        let interval = DURABLE_INTERVALS_MS[self.rng.between(0, 3) as usize];
        let env = [
            (
                "KAPPAKV_SEGMENT_BYTES_MAX",
                self.opts.segment_bytes_max.to_string(),
            ),
            ("KAPPAKV_INDEX_DURABLE_INTERVAL_MS", interval.to_string()),
            ("RUST_LOG", "warn".to_string()),
        ];
        let mut cmd = serve_command(&self.data_dir, self.listen, Some(&self.config), &env)?;
        Spawned::spawn(&mut cmd, &self.log)
    }

    async fn wait_serving(node: &mut Spawned) -> Result<()> {
        node.wait_line(is_serving_line, DEADLINE)
            .await
            .context("kappakv serve did not start")?;
        Ok(())
    }

    async fn cycle(&mut self, cycle: u64) -> Result<()> {
        let mut node = self.spawn()?;
        // Now and then the kill lands while the node starts: recovering the log, catching its
        // views up, or about to serve.
        if cycle > 0 && self.rng.chance(10) {
            let delay = self.rng.between(0, 150);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let serving = node.lines().iter().any(|l| is_serving_line(l));
            node.kill()?;
            self.report.kills += 1;
            if !serving {
                self.report.kills_starting += 1;
            }
            return Ok(());
        }
        Self::wait_serving(&mut node).await?;
        let checker = client_of(&self.data_dir).await?;
        self.check_pending(&checker).await?;

        let writers = self
            .rng
            .between(self.opts.writers_min, self.opts.writers_max);
        let state = Arc::new(Mutex::new(CycleWrites {
            cycle,
            ..CycleWrites::default()
        }));
        // Several writers share a connection, as tasks of one application would.
        let connections = writers.div_ceil(8);
        let mut clients = vec![checker];
        for _ in 1..connections {
            clients.push(client_of(&self.data_dir).await?);
        }
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = clients[(w % connections) as usize].clone();
            tasks.push(tokio::spawn(write_until_error(
                client,
                cycle,
                w,
                state.clone(),
            )));
        }
        let delay = self.rng.between(0, self.opts.load_ms_max);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let stopping = self.rng.chance(10);
        if stopping {
            // SIGKILL during the graceful stop: draining, flushing the writer, persisting the
            // views.
            node.signal(libc::SIGTERM)?;
            let delay = self.rng.between(0, 30);
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let running = node.try_wait()?.is_none();
        let status = node.kill()?;
        if running {
            self.report.kills += 1;
            self.report.kills_stopping += u64::from(stopping);
        } else {
            ensure!(
                stopping && status.code() == Some(0),
                "the node exited by itself ({status}): {}",
                node.tail(20)
            );
            self.report.stopped_before_kill += 1;
        }
        // Nothing more can be acknowledged. A task stopped here is awaiting its put; a write
        // it saw acknowledged is already recorded.
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            match task.await {
                Ok(()) => {}
                Err(e) if e.is_cancelled() => {}
                Err(e) => bail!("writer panicked: {e}"),
            }
        }
        drop(clients);
        let writes = std::mem::take(&mut *state.lock().expect("not poisoned"));
        self.report.acked += writes.acked.len() as u64;
        self.pending.push(writes);
        Ok(())
    }

    /// Checks the writes of every cycle not checked yet against the restarted node.
    async fn check_pending(&mut self, client: &Client) -> Result<()> {
        for writes in std::mem::take(&mut self.pending) {
            let found = scan_prefix(client, cycle_prefix(writes.cycle).as_bytes()).await?;
            let mut kept_in_flight = 0;
            // The last acknowledged write of each key: overwrites come after what they replace.
            let mut last: BTreeMap<&[u8], (&[u8], EntryId)> = BTreeMap::new();
            for (key, value, id) in &writes.acked {
                last.insert(key, (value, *id));
            }
            for (key, kv) in &found {
                let name = String::from_utf8_lossy(key);
                let in_flight = writes.in_flight.get(key);
                let kept = match (last.get(&key[..]), in_flight) {
                    // The acknowledged value, or a later overwrite that was in flight.
                    (Some(&(value, id)), _) if check_one(kv, value, id).is_ok() => None,
                    (_, Some(value)) => Some(value),
                    (Some(&(value, id)), None) => {
                        check_one(kv, value, id)?;
                        None
                    }
                    (None, None) => bail!(
                        "{name} (cycle {}) is in the log but was never written: {kv:?}",
                        writes.cycle
                    ),
                };
                let (value, id) = match kept {
                    None => last[&key[..]],
                    Some(value) => {
                        let id = kv
                            .values
                            .first()
                            .map(|v| v.id)
                            .with_context(|| format!("{name} has no value: {kv:?}"))?;
                        check_one(kv, value, id).with_context(|| {
                            format!("{name}: neither the acknowledged write nor the one in flight")
                        })?;
                        kept_in_flight += 1;
                        (&value[..], id)
                    }
                };
                self.known.insert(key.clone(), (value.to_vec(), id));
            }
            if let Some(key) = last.keys().find(|k| !found.contains_key(**k)) {
                bail!(
                    "the acknowledged write of {} (cycle {}) is missing after a restart",
                    String::from_utf8_lossy(key),
                    writes.cycle
                );
            }
            self.report.checked += last.len() as u64;
            self.report.unacked_kept += kept_in_flight;
            self.report.unacked_lost += writes.in_flight.len() as u64 - kept_in_flight;
        }
        Ok(())
    }

    /// Restarts the node, checks every write so far, stops it cleanly, verifies the log and
    /// compares its indexes with a full rebuild.
    async fn full_check(&mut self) -> Result<()> {
        let mut node = self.spawn()?;
        Self::wait_serving(&mut node).await?;
        let client = client_of(&self.data_dir).await?;
        self.check_pending(&client).await?;
        let found = scan_prefix(&client, b"c").await?;
        for (key, (value, id)) in &self.known {
            let kv = found.get(key).with_context(|| {
                format!(
                    "{} was found after an earlier restart and is missing now",
                    String::from_utf8_lossy(key)
                )
            })?;
            check_one(kv, value, *id)?;
        }
        if let Some(stray) = found.keys().find(|k| !self.known.contains_key(*k)) {
            bail!(
                "{} appeared after it was checked absent",
                String::from_utf8_lossy(stray)
            );
        }
        self.report.checked += self.known.len() as u64;

        // The declared index may still be catching up after the restart; the comparison needs
        // it complete.
        let deadline = Instant::now() + DEADLINE;
        let log_lsn = loop {
            let status = client.status().await?;
            ensure!(status.writable, "the node does not take writes: {status:?}");
            if status.indexed_lsn == status.log_lsn
                && status
                    .indexes
                    .iter()
                    .all(|i| !i.building && i.applied_lsn == status.log_lsn)
            {
                break status.log_lsn;
            }
            ensure!(
                Instant::now() < deadline,
                "the views did not catch up: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        client.close().await;
        node.signal(libc::SIGTERM)?;
        let status = node.wait(DEADLINE).await?;
        ensure!(
            status.code() == Some(0),
            "SIGTERM did not stop the node cleanly ({status}): {}",
            node.tail(20)
        );

        self.report.verify = verify(&self.data_dir).await?;
        let comparison = compare_with_rebuild(
            &self.data_dir,
            Some(&self.config),
            &self.work.join("rebuilt"),
        )
        .await?;
        self.report.index_rows = comparison.rows;
        self.report.log_entries = log_lsn;
        self.report.segments = segment_count(&self.data_dir)?;
        self.report.full_checks += 1;
        Ok(())
    }
}

/// One key as a writer left it: `value` under `id`, its only version.
fn check_one(kv: &KeyVersions, value: &[u8], id: EntryId) -> Result<()> {
    let key = String::from_utf8_lossy(&kv.key);
    ensure!(
        kv.values.len() == 1 && kv.context == [id],
        "{key} should hold exactly version {id}: {kv:?}"
    );
    let version = &kv.values[0];
    ensure!(
        version.id == id && version.value.as_deref() == Some(value),
        "{key} should read {} (version {id}): {kv:?}",
        String::from_utf8_lossy(value)
    );
    Ok(())
}

/// Puts keys one after the other until a put fails (the node is gone), recording each one in
/// flight and each one acknowledged. Every fourth put overwrites the key of the writer's last
/// acknowledged put (a plain put, superseding the version it replaces); the others write new
/// keys of their own.
async fn write_until_error(
    client: Client,
    cycle: u64,
    writer: u64,
    state: Arc<Mutex<CycleWrites>>,
) {
    let mut last_key = None;
    for i in 0.. {
        let key = match &last_key {
            Some(key) if i % 4 == 3 => Vec::clone(key),
            _ => key_of(cycle, writer, i),
        };
        let value = value_of(cycle, writer, i);
        state
            .lock()
            .expect("not poisoned")
            .in_flight
            .insert(key.clone(), value.clone());
        let Ok(written) = client.put(&key, &value).await else {
            return;
        };
        let mut state = state.lock().expect("not poisoned");
        state.in_flight.remove(&key);
        state.acked.push((key.clone(), value, written.id));
        last_key = Some(key);
    }
}
