//! Pieces shared by the crash tests and the `crash-loop` binary: a seeded random source, a
//! `kappakv` child process whose standard error is kept and watched, a log written offline, and
//! the comparison of a node's incrementally maintained indexes with a full rebuild of the same
//! log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_indexes::tables;
use kappakv_protocol::{Entry, EntryId, HlcClock, KeyVersions, Op, SignedEntry};
use kappakv_server::identity;
use kappakv_server::log::{LogConfig, LogStore, log_dir};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition, TableHandle as _};

use crate::{command, run};

/// splitmix64: small, seedable, and the same sequence on every platform, so a printed seed
/// replays the same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The seed in the environment variable `var` (decimal or `0x` hex), or one from the clock.
pub fn seed_from_env(var: &str) -> Result<u64> {
    match std::env::var(var) {
        Ok(text) => parse_seed(&text).with_context(|| format!("{var}={text}")),
        Err(_) => Ok(clock_seed()),
    }
}

/// A seed written in decimal or as `0x` hex.
pub fn parse_seed(text: &str) -> Result<u64> {
    let text = text.trim();
    Ok(match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16)?,
        None => text.parse()?,
    })
}

/// A seed from the clock and the process id.
pub fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Rng::new((nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
}

/// A `kappakv` child process. Its standard error is appended to a file and kept in memory, line
/// by line, so a test can wait for a line (`serving on`, a progress line) and show the log when
/// something fails.
pub struct Spawned {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Spawns `cmd` with its standard error appended to `log`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                kept.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        });
        Ok(Self {
            child: Some(child),
            lines,
            reader: Some(reader),
        })
    }

    /// Every line written to standard error so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The last `n` lines written to standard error, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("already reaped"),
        }
    }

    /// Waits until a line satisfying `matches` has been written and returns it. Fails when the
    /// process ends first or after `timeout`.
    pub async fn wait_line(
        &mut self,
        mut matches: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let lines = self
                    .lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(line) = lines[seen..].iter().find(|l| matches(l)) {
                    return Ok(line.clone());
                }
                seen = lines.len();
            }
            if let Some(status) = self.try_wait()? {
                // Lines written just before the end may still be in the pipe.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                let lines = self.lines();
                if let Some(line) = lines[seen..].iter().find(|l| matches(l)) {
                    return Ok(line.clone());
                }
                bail!("exited with {status} first; last lines:\n{}", self.tail(20));
            }
            ensure!(
                Instant::now() < deadline,
                "not seen within {timeout:?}; last lines:\n{}",
                self.tail(20)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already reaped")?;
        // Fails only when the process has already exited; `wait` reaps it either way.
        let _ = child.kill();
        let status = child.wait()?;
        self.join_reader();
        Ok(status)
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.pid().context("already reaped")?;
        ensure!(
            crate::send_signal(libc::pid_t::try_from(pid)?, signal) == 0,
            "kill -{signal} {pid} failed"
        );
        Ok(())
    }

    /// Waits for the process to end, killing it after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                self.join_reader();
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill()?;
                bail!(
                    "still running after {timeout:?}; last lines:\n{}",
                    self.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kappakv serve` on `data_dir` at `listen`, with `config` as its config file if given, no admin
/// listener, and the extra `KAPPAKV_*` settings in `env`.
pub fn serve_command(
    data_dir: &Path,
    listen: SocketAddr,
    config: Option<&Path>,
    env: &[(&str, String)],
) -> Result<Command> {
    let mut cmd = command("kappakv")?;
    cmd.args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", &listen.to_string()])
        .env("KAPPAKV_ADMIN_LISTEN", "off")
        .env("NO_COLOR", "1");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    Ok(cmd)
}

/// The line `kappakv serve` writes once it serves.
pub fn is_serving_line(line: &str) -> bool {
    line.contains(" serving on ")
}

/// A client of the node serving `data_dir`, with short timeouts: after a SIGKILL nothing
/// answers, and QUIC only notices by silence.
pub async fn client_of(data_dir: &Path) -> Result<Client> {
    let text = std::fs::read_to_string(data_dir.join("client.ticket"))?;
    Ok(Client::builder(text.trim().parse()?)
        .request_timeout(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Every key the node holds under `prefix`, with its current versions.
pub async fn scan_prefix(client: &Client, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, KeyVersions>> {
    let mut all = BTreeMap::new();
    let mut scan = client.scan(ScanOptions::prefix(prefix).page_size(1000));
    while let Some(kv) = scan.next().await {
        let kv = kv?;
        all.insert(kv.key.clone(), kv);
    }
    Ok(all)
}

/// `kappakv verify` on `data_dir`; returns its summary line.
pub async fn verify(data_dir: &Path) -> Result<String> {
    let out = run(
        command("kappakv")?
            .arg("verify")
            .arg("--data-dir")
            .arg(data_dir),
        Duration::from_secs(300),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && stdout.starts_with("log ok"),
        "kappakv verify failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The command `kappakv rebuild-indexes --data-dir DATA_DIR [--config CONFIG]`.
pub fn rebuild_command(data_dir: &Path, config: Option<&Path>) -> Result<Command> {
    let mut cmd = command("kappakv")?;
    cmd.arg("rebuild-indexes").arg("--data-dir").arg(data_dir);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    Ok(cmd)
}

/// Every row of every table of an index database, as the raw bytes redb stores: table name →
/// rows in key order.
pub type IndexDump = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Reads every table of the index database at `path` (no process may have it open).
pub fn dump_indexes(path: &Path) -> Result<IndexDump> {
    let db = redb::Database::open(path).with_context(|| format!("opening {}", path.display()))?;
    let txn = db.begin_read()?;
    let mut dump = IndexDump::new();
    for handle in txn.list_tables()? {
        let name = handle.name().to_string();
        let rows = dump_table(&txn, &name)?;
        dump.insert(name, rows);
    }
    Ok(dump)
}

/// The rows of the table `name`, opened with the types the indexes crate gives it.
fn dump_table(txn: &redb::ReadTransaction, name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(match name {
        tables::VIEW_CHECKPOINTS_NAME => rows(txn, tables::VIEW_CHECKPOINTS)?,
        tables::VIEW_TABLES_NAME => rows(txn, tables::VIEW_TABLES)?,
        tables::LOG_AUTHOR_HEAD_NAME => rows(txn, tables::LOG_AUTHOR_HEAD)?,
        tables::LOG_AUTHOR_SEQ_LSN_NAME => rows(txn, tables::LOG_AUTHOR_SEQ_LSN)?,
        tables::KV_CURRENT_NAME => rows(txn, tables::KV_CURRENT)?,
        tables::KV_SUPERSEDED_NAME => rows(txn, tables::KV_SUPERSEDED)?,
        tables::KV_DIGEST_NAME => rows(txn, tables::KV_DIGEST)?,
        tables::HISTORY_LATEST_NAME => rows(txn, tables::HISTORY_LATEST)?,
        tables::HISTORY_RECORDS_NAME => rows(txn, tables::HISTORY_RECORDS)?,
        n if n.starts_with(tables::SECONDARY_VIEW_PREFIX) => {
            match n.rsplit_once('.').map(|(_, table)| table) {
                Some("postings") => rows(txn, tables::secondary_postings(n))?,
                Some("by_key") => rows(txn, tables::secondary_by_key(n))?,
                Some("stats") => rows(txn, tables::secondary_stats(n))?,
                _ => bail!("table {n} is not one the indexes crate defines"),
            }
        }
        other => bail!("table {other} is not one the indexes crate defines"),
    })
}

fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<'_, K, V>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let table = txn.open_table(def)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push((
            K::as_bytes(&k.value()).as_ref().to_vec(),
            V::as_bytes(&v.value()).as_ref().to_vec(),
        ));
    }
    Ok(out)
}

/// Fails, naming the first difference, unless the two dumps are equal.
pub fn compare_dumps(incremental: &IndexDump, rebuilt: &IndexDump) -> Result<()> {
    let names = |d: &IndexDump| d.keys().cloned().collect::<Vec<_>>();
    ensure!(
        names(incremental) == names(rebuilt),
        "different tables: incremental {:?}, rebuilt {:?}",
        names(incremental),
        names(rebuilt)
    );
    for (table, a) in incremental {
        let b = &rebuilt[table];
        if a == b {
            continue;
        }
        let hex = |bytes: &[u8]| {
            bytes.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        };
        let first = a.iter().zip(b).position(|(x, y)| x != y);
        let show = |rows: &[(Vec<u8>, Vec<u8>)], i: usize| {
            rows.get(i).map_or("(none)".to_string(), |(k, v)| {
                format!("{} = {}", hex(k), hex(v))
            })
        };
        let i = first.unwrap_or(a.len().min(b.len()));
        bail!(
            "table {table} differs: incremental has {} rows, rebuilt {}; first difference at row {i}:\n  incremental {}\n  rebuilt     {}",
            a.len(),
            b.len(),
            show(a, i),
            show(b, i)
        );
    }
    Ok(())
}

/// What [`compare_with_rebuild`] compared.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebuildComparison {
    /// Tables compared.
    pub tables: usize,
    /// Rows compared (over all tables).
    pub rows: usize,
}

/// Copies the data dir of a stopped node into `scratch` (emptied first), runs `kappakv
/// rebuild-indexes` on the copy (with `config`, for declared indexes), and checks that the
/// node's own `indexes.redb`, maintained incrementally, holds exactly what the full rebuild
/// wrote, row for row, checkpoints included.
pub async fn compare_with_rebuild(
    data_dir: &Path,
    config: Option<&Path>,
    scratch: &Path,
) -> Result<RebuildComparison> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch)?;
    }
    copy_dir(data_dir, scratch)?;
    let out = run(
        &mut rebuild_command(scratch, config)?,
        Duration::from_secs(600),
    )
    .await?;
    ensure!(
        out.status.success(),
        "rebuild-indexes failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let incremental = dump_indexes(&data_dir.join("indexes.redb"))?;
    let rebuilt = dump_indexes(&scratch.join("indexes.redb"))?;
    compare_dumps(&incremental, &rebuilt)
        .context("the incremental indexes differ from a full rebuild of the same log")?;
    Ok(RebuildComparison {
        tables: incremental.len(),
        rows: incremental.values().map(Vec::len).sum(),
    })
}

/// Copies the directory tree `from` into `to`.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for item in std::fs::read_dir(from)? {
        let item = item?;
        let target = to.join(item.file_name());
        if item.file_type()?.is_dir() {
            copy_dir(&item.path(), &target)?;
        } else {
            std::fs::copy(item.path(), &target)
                .with_context(|| format!("copying {}", item.path().display()))?;
        }
    }
    Ok(())
}

/// Segment files in the log of `data_dir`.
pub fn segment_count(data_dir: &Path) -> Result<usize> {
    Ok(std::fs::read_dir(log_dir(data_dir))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .count())
}

/// A log written offline by [`fill_log`]: what each key should read.
#[derive(Debug, Default)]
pub struct Filled {
    /// Entries written.
    pub entries: u64,
    /// Key → its value, `None` when its last write was a delete.
    pub expected: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Keys [`fill_log`] writes start with this.
pub const FILL_PREFIX: &str = "doc/";

/// Writes `entries` entries into the empty log of `data_dir`, signed with the node's own key (as
/// its writer would): over `keys` keys drawn at random (`doc/%06d`), a put of a small JSON
/// document (`{"n": N, "seq": SEQ}`, `N` below 100) superseding the key's previous version, and
/// every tenth op a delete. Group commits of 1024 entries, the last of each signed.
pub fn fill_log(data_dir: &Path, entries: u64, keys: u64, seed: u64) -> Result<Filled> {
    const BATCH: usize = 1024;
    let keypair = identity::load_or_create(data_dir)?;
    let cfg = LogConfig {
        segment_bytes_max: 4 * 1024 * 1024,
        ..LogConfig::default()
    };
    let (mut store, _) = LogStore::open(&log_dir(data_dir), &cfg)?;
    ensure!(
        store.last_lsn() == 0,
        "{} already holds a log",
        data_dir.display()
    );
    let author = keypair.node_id();
    let mut rng = Rng::new(seed);
    let mut clock = HlcClock::default();
    let mut latest: BTreeMap<Vec<u8>, EntryId> = BTreeMap::new();
    let mut filled = Filled::default();
    let mut prev = None;
    let mut payloads = Vec::with_capacity(BATCH);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for seq in 1..=entries {
        let key = format!("{FILL_PREFIX}{:06}", rng.next_u64() % keys).into_bytes();
        let supersedes: Vec<EntryId> = latest.get(&key).copied().into_iter().collect();
        let (op, value) = if rng.chance(10) {
            (
                Op::Delete {
                    key: key.clone(),
                    supersedes,
                },
                None,
            )
        } else {
            let value = format!(r#"{{"n":{},"seq":{seq}}}"#, rng.next_u64() % 100).into_bytes();
            (
                Op::Put {
                    key: key.clone(),
                    value: value.clone(),
                    supersedes,
                },
                Some(value),
            )
        };
        let entry = Entry {
            author,
            seq,
            prev,
            timestamp: clock.now(millis),
            ops: vec![op],
        };
        let id = entry.id();
        prev = Some(id);
        latest.insert(key.clone(), id);
        filled.expected.insert(key, value);
        let last_of_batch = payloads.len() + 1 == BATCH || seq == entries;
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
    filled.entries = entries;
    Ok(filled)
}

/// Checks that the node holds exactly what [`fill_log`] wrote: every live key with its value,
/// every deleted key without one, and no other key under [`FILL_PREFIX`].
pub async fn check_filled(client: &Client, filled: &Filled) -> Result<()> {
    let found = scan_prefix(client, FILL_PREFIX.as_bytes()).await?;
    for (key, value) in &filled.expected {
        let got = found.get(key);
        let values: Vec<Option<&[u8]>> = got
            .map(|kv| kv.values.iter().map(|v| v.value.as_deref()).collect())
            .unwrap_or_default();
        match value {
            Some(v) => ensure!(
                values == [Some(&v[..])],
                "{} should read {}, reads {values:?}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(v)
            ),
            None => ensure!(
                values.is_empty(),
                "{} was deleted, reads {values:?}",
                String::from_utf8_lossy(key)
            ),
        }
    }
    if let Some(stray) = found.keys().find(|k| !filled.expected.contains_key(*k)) {
        bail!("{} was never written", String::from_utf8_lossy(stray));
    }
    Ok(())
}

/// A directory for a crash run's data: under `dir` if given, else the system's temporary dir.
pub fn work_dir(dir: Option<&Path>) -> Result<tempfile::TempDir> {
    Ok(match dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    })
}
