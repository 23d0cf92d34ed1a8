//! Index rebuilds are safe to kill: SIGKILL during `kappakv rebuild-indexes`, during the
//! rebuild `kappakv serve` runs at start when `indexes.redb` is missing, and during the
//! background build of a secondary index whose definition changed; each time the next start
//! resumes from the last committed batch (it does not start over) and finishes, every value
//! reads as written, and the indexes equal row for row a full rebuild of a copy of the log.
//!
//! The log, 120,000 entries of one chain over 12,000 keys (overwrites and deletes), is written
//! offline (`kappakv_tests::crash::fill_log`), so the rebuilds have enough to do to be killed
//! half-way. Where each kill lands is drawn from a seed each test prints;
//! `REBUILD_CRASH_SEED` replays one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use kappakv_tests::crash::{
    Filled, Rng, Spawned, check_filled, client_of, compare_with_rebuild, fill_log, is_serving_line,
    rebuild_command, seed_from_env, serve_command,
};
use kappakv_tests::{free_tcp_port, free_udp_port, http_get};

/// Entries of the log: more than one batch of `rebuild-indexes`, which commits every 100,000.
const ENTRIES: u64 = 120_000;
const KEYS: u64 = 12_000;
/// Entries per index batch of the node, so that its rebuilds commit many times.
const NODE_BATCH: &str = "5000";
const DEADLINE: Duration = Duration::from_secs(300);

const CONFIG: &str = r#"
[[index]]
name = "by_n"
prefix = "doc/"
field = "n"
kind = "exact"
"#;

/// The same index with another definition: the node drops it and builds it again.
const CONFIG_CHANGED: &str = r#"
[[index]]
name = "by_n"
prefix = "doc/"
field = "n"
kind = "range"
descending = true
"#;

/// The random source of a test: the log's keys and values, and where the kills land. Set
/// `REBUILD_CRASH_SEED` to replay a seed a failure printed.
fn seeded(test: &str) -> Result<Rng> {
    let seed = seed_from_env("REBUILD_CRASH_SEED")?;
    println!("{test}: seed {seed:#x}");
    Ok(Rng::new(seed))
}

struct Setup {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: PathBuf,
    config_changed: PathBuf,
    log: PathBuf,
    scratch: PathBuf,
    listen: SocketAddr,
    filled: Filled,
}

fn setup(seed: u64) -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let filled = fill_log(&data_dir, ENTRIES, KEYS, seed)?;
    let config = dir.path().join("kappakv.toml");
    std::fs::write(&config, CONFIG)?;
    let config_changed = dir.path().join("changed.toml");
    std::fs::write(&config_changed, CONFIG_CHANGED)?;
    Ok(Setup {
        data_dir,
        config,
        config_changed,
        log: dir.path().join("node.log"),
        scratch: dir.path().join("rebuilt"),
        listen: SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
        filled,
        _dir: dir,
    })
}

impl Setup {
    /// `kappakv serve` with `config`, logging at info level, its admin listener on `admin`.
    fn serve(&self, config: &Path, admin: SocketAddr) -> Result<Spawned> {
        let env = [
            ("KAPPAKV_INDEX_BATCH_ENTRIES_MAX", NODE_BATCH.to_string()),
            ("KAPPAKV_ADMIN_LISTEN", admin.to_string()),
            ("RUST_LOG", "info,quinn=warn".to_string()),
        ];
        let mut cmd = serve_command(&self.data_dir, self.listen, Some(config), &env)?;
        Spawned::spawn(&mut cmd, &self.log)
    }

    /// Stops the node cleanly, then checks its indexes against a full rebuild with `config`.
    async fn stop_and_compare(&self, mut node: Spawned, config: &Path) -> Result<()> {
        node.signal(libc::SIGTERM)?;
        let status = node.wait(DEADLINE).await?;
        ensure!(status.code() == Some(0), "unclean stop: {status}");
        let compared = compare_with_rebuild(&self.data_dir, Some(config), &self.scratch).await?;
        ensure!(compared.rows as u64 > ENTRIES, "{compared:?}");
        Ok(())
    }
}

/// The `from` of the node's "catching the indexes up with the log from=N" line: where its
/// start-up catch-up of the serving views begins.
async fn catch_up_from(node: &mut Spawned) -> Result<u64> {
    let line = node
        .wait_line(
            |l| l.contains("catching the indexes up with the log"),
            DEADLINE,
        )
        .await?;
    field(&line, "from").with_context(|| format!("no from= in {line:?}"))
}

fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Polls `/readyz` until the start-up catch-up has applied at least `at_least` entries (and at
/// least one batch) and is not done, then kills the node; returns how many entries the catch-up
/// had applied (durably: it commits each batch before reporting it).
async fn kill_mid_catch_up(node: &mut Spawned, admin: SocketAddr, at_least: u64) -> Result<u64> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok((_, body)) = http_get(admin, "/readyz").await
            && let Some(progress) = body.split("indexing the log, ").nth(1)
        {
            let mut numbers = progress
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty());
            let done: u64 = numbers.next().context("progress")?.parse()?;
            let total: u64 = numbers.next().context("total")?.parse()?;
            if done > 0 && done >= at_least.min(total / 2) && done < total {
                node.kill()?;
                return Ok(done);
            }
            ensure!(done < total, "the catch-up ended before it could be killed");
        }
        ensure!(
            node.try_wait()?.is_none(),
            "the node exited: {}",
            node.tail(20)
        );
        ensure!(
            Instant::now() < deadline,
            "no catch-up progress seen: {}",
            node.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rebuild_indexes_then_the_next_start_and_the_next_rebuild_finish()
-> Result<()> {
    let mut rng = seeded("rebuild-indexes")?;
    let s = setup(rng.next_u64())?;
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));

    // 1. Killed half-way through `rebuild-indexes`, after its first batch committed.
    let mut rebuild = Spawned::spawn(&mut rebuild_command(&s.data_dir, Some(&s.config))?, &s.log)?;
    let line = rebuild
        .wait_line(|l| l.starts_with("rebuild: "), DEADLINE)
        .await?;
    rebuild.kill()?;
    let committed: u64 = line
        .trim_start_matches("rebuild: ")
        .split('/')
        .next()
        .context("progress line")?
        .parse()?;
    ensure!(
        committed > 0 && committed < ENTRIES,
        "killed half-way: {line}"
    );

    // 2. The node resumes from there rather than from the start, and is killed again half-way
    //    through its own catch-up.
    let mut node = s.serve(&s.config, admin)?;
    let from = catch_up_from(&mut node).await?;
    ensure!(
        from >= committed,
        "the node resumed from {from}, before the {committed} entries rebuild-indexes committed"
    );
    let applied = kill_mid_catch_up(&mut node, admin, rng.between(1, ENTRIES / 2)).await?;

    // 3. The next start finishes: every value, and indexes equal to a full rebuild.
    let mut node = s.serve(&s.config, admin)?;
    let resumed = catch_up_from(&mut node).await?;
    ensure!(
        resumed >= from + applied,
        "resumed from {resumed}, the killed catch-up had committed up to {}",
        from + applied
    );
    node.wait_line(is_serving_line, DEADLINE).await?;
    let client = client_of(&s.data_dir).await?;
    check_filled(&client, &s.filled).await?;
    wait_indexes_complete(&client).await?;
    client.close().await;
    s.stop_and_compare(node, &s.config).await?;

    // 4. Killed again early, then run to its end: `rebuild-indexes` starts over and ends equal
    //    to a clean rebuild.
    let mut rebuild = Spawned::spawn(&mut rebuild_command(&s.data_dir, Some(&s.config))?, &s.log)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rebuild.kill()?;
    let mut rebuild = Spawned::spawn(&mut rebuild_command(&s.data_dir, Some(&s.config))?, &s.log)?;
    let status = rebuild.wait(DEADLINE).await?;
    ensure!(status.success(), "rebuild-indexes: {}", rebuild.tail(10));
    let compared = compare_with_rebuild(&s.data_dir, Some(&s.config), &s.scratch).await?;
    ensure!(compared.rows as u64 > ENTRIES, "{compared:?}");
    println!(
        "rebuild-indexes: {ENTRIES} entries: rebuild-indexes killed after committing {committed}, serve resumed from {from}, \
         killed {applied} entries later, resumed from {resumed}; every value read back, indexes equal to a full rebuild"
    );
    Ok(())
}

/// Waits until the serving views and every declared index have applied the whole log.
async fn wait_indexes_complete(client: &kappakv_client::Client) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = client.status().await?;
        if status.indexed_lsn == status.log_lsn
            && status
                .indexes
                .iter()
                .all(|i| !i.building && i.applied_lsn == status.log_lsn)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "indexes not complete: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_rebuilds_a_node_runs_itself_then_the_next_start_finishes() -> Result<()>
{
    let mut rng = seeded("serve")?;
    let s = setup(rng.next_u64())?;
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));

    // 1. No indexes.redb: the node builds every view from the log at start. Killed half-way.
    let mut node = s.serve(&s.config, admin)?;
    ensure!(catch_up_from(&mut node).await? == 0);
    let applied = kill_mid_catch_up(&mut node, admin, rng.between(1, ENTRIES / 2)).await?;

    // 2. The next start resumes where the killed one left off, and finishes.
    let mut node = s.serve(&s.config, admin)?;
    let resumed = catch_up_from(&mut node).await?;
    ensure!(
        resumed >= applied,
        "resumed from {resumed}, the killed start had committed {applied}"
    );
    node.wait_line(is_serving_line, DEADLINE).await?;
    let client = client_of(&s.data_dir).await?;
    check_filled(&client, &s.filled).await?;
    wait_indexes_complete(&client).await?;
    client.close().await;
    s.stop_and_compare(node, &s.config).await?;

    // 3. A changed index definition: the node serves at once and rebuilds the index in the
    //    background. Killed half-way through that build.
    let mut node = s.serve(&s.config_changed, admin)?;
    node.wait_line(is_serving_line, DEADLINE).await?;
    let client = client_of(&s.data_dir).await?;
    let target = rng.between(1, ENTRIES / 2);
    let deadline = Instant::now() + DEADLINE;
    let built = loop {
        let status = client.status().await?;
        let index = status.indexes.first().context("the declared index")?;
        ensure!(
            index.building,
            "the changed index was built before it could be killed: {status:?}"
        );
        if index.applied_lsn >= target {
            node.kill()?;
            break index.applied_lsn;
        }
        ensure!(Instant::now() < deadline, "no build progress: {status:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    ensure!(built < ENTRIES);
    drop(client);

    // 4. The next start finishes the build; the index equals a full rebuild with the new
    //    definition, and every value is still there.
    let mut node = s.serve(&s.config_changed, admin)?;
    node.wait_line(is_serving_line, DEADLINE).await?;
    let client = client_of(&s.data_dir).await?;
    wait_indexes_complete(&client).await?;
    check_filled(&client, &s.filled).await?;
    client.close().await;
    s.stop_and_compare(node, &s.config_changed).await?;
    println!(
        "serve: {ENTRIES} entries: serve killed {applied} entries into its own rebuild, resumed from {resumed}; \
         the changed index killed at {built}; every value read back, indexes equal to a full rebuild"
    );
    Ok(())
}
