//! Overload of a real `kappakv serve` process: at about twice the load that saturates it, the
//! node sheds with `Busy` (a typed answer, not timeouts or lost connections), its memory stays
//! bounded, and once the load drops honest requests are answered again and none is shed.
//!
//! The per-commit test lowers `max_concurrent_requests` to 32 and runs for a few seconds;
//! `cargo test -p kappakv-tests --test overload -- --ignored` runs the same against the
//! default settings, with 32 connections for 10 s per phase. Figures are printed on lines
//! starting with `figure:` (`-- --nocapture`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use kappakv_client::{Client, ErrorCode};
use kappakv_server::config::Config;
use kappakv_tests::{ProcessNode, http_get, metric, mib};
use tokio::sync::Semaphore;

const MEMORY_BOUND: u64 = 512 * 1024 * 1024;

fn value() -> Vec<u8> {
    vec![b'v'; 100]
}

/// Requests per second of `workers` clients each sending its next put when the last is
/// answered, for `seconds`.
async fn closed_loop(clients: &[Client], workers: usize, seconds: f64) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = clients[w % clients.len()].clone();
        let done = done.clone();
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                client.put(format!("sat/{w}/{}", i % 100), value()).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / seconds)
}

/// What an open-loop run saw.
#[derive(Debug, Default)]
struct Outcomes {
    sent: u64,
    ok: u64,
    busy: u64,
    other: u64,
    first_other: Option<String>,
    /// Requests not sent because the generator already had its cap in flight.
    skipped: u64,
}

/// Sends puts at `rate` per second for `seconds` regardless of answers (at most `in_flight` at
/// once in the generator), and counts what came back.
async fn open_loop(clients: &[Client], rate: f64, seconds: f64, in_flight: usize) -> Outcomes {
    let ok = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let first_other = Arc::new(std::sync::Mutex::new(None::<String>));
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = Outcomes::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            out.skipped += 1;
            continue;
        };
        let client = clients[i as usize % clients.len()].clone();
        let (ok, busy, other, first_other) =
            (ok.clone(), busy.clone(), other.clone(), first_other.clone());
        tasks.spawn(async move {
            let _permit = permit;
            match client.put(format!("load/{}", i % 1000), value()).await {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(e) if e.code() == Some(ErrorCode::Busy) => busy.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    first_other
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert_with(|| e.to_string());
                    other.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
        out.sent += 1;
        i += 1;
        // Reap finished tasks as we go, so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    out.ok = ok.load(Ordering::Relaxed);
    out.busy = busy.load(Ordering::Relaxed);
    out.other = other.load(Ordering::Relaxed);
    out.first_other = first_other
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    out
}

/// The median latency of `n` sequential puts; fails if one is not answered within 30 s.
async fn median_put(client: &Client, n: usize) -> Result<Duration> {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(30),
            client.put(format!("probe/{i}"), value()),
        )
        .await
        .context("an honest put was not answered")??;
        took.push(started.elapsed());
    }
    took.sort();
    Ok(took[n / 2])
}

async fn overload(settings: &[(&str, &str)], connections: usize, seconds: f64) -> Result<()> {
    let (_dir, node, admin) = ProcessNode::start_with_settings(settings).await?;
    let ticket = node.ticket()?;
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(Client::connect(&ticket).await?);
    }
    let probe = Client::connect(&ticket).await?;
    let baseline = median_put(&probe, 21).await?;

    // Saturation: a closed loop of many clients, well past the concurrency where throughput
    // stops growing on this machine.
    let limit: usize = settings
        .iter()
        .find(|(k, _)| *k == "max_concurrent_requests")
        .map_or(Ok(Config::default().max_concurrent_requests), |(_, v)| {
            v.parse()
        })?;
    let saturating = closed_loop(&clients, limit.min(256), seconds).await?;
    println!("figure: overload: saturating load {saturating:.0} puts/s (closed loop)");

    // Twice that, open loop: requests keep coming whatever the node answers.
    node.reset_peak_memory();
    let shed_before = shed(admin).await?;
    let rate = 2.0 * saturating;
    let started = Instant::now();
    let out = open_loop(&clients, rate, seconds, 4 * limit + 1024).await;
    let elapsed = started.elapsed().as_secs_f64();
    let shed_after = shed(admin).await?;
    let peak = node.memory()?.peak;
    println!(
        "figure: overload: offered {:.0}/s for {elapsed:.1} s: {} sent, {} ok ({:.0}/s), {} Busy, {} other errors, {} not sent (generator cap); node counted {} shed; peak RSS {:.1} MiB",
        out.sent as f64 / elapsed,
        out.sent,
        out.ok,
        out.ok as f64 / elapsed,
        out.busy,
        out.other,
        out.skipped,
        shed_after - shed_before,
        mib(peak)
    );
    ensure!(
        out.busy > 0,
        "no request was shed at twice the saturating load: {out:?}"
    );
    ensure!(
        out.other == 0,
        "requests failed otherwise than Busy: {out:?}"
    );
    ensure!(
        shed_after > shed_before,
        "the client saw Busy but the node counted nothing shed: {out:?}"
    );
    ensure!(out.ok > 0, "nothing was served under load: {out:?}");
    ensure!(peak < MEMORY_BOUND, "peak RSS {:.1} MiB", mib(peak));

    // The load has dropped: honest requests are answered again, and none is shed (their
    // latency is printed as a figure, not asserted).
    let recovered = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), probe.put("recovered", value()))
        .await
        .context("no answer after the load dropped")??;
    let first = recovered.elapsed();
    let after = median_put(&probe, 21).await?;
    let shed_end = shed(admin).await?;
    ensure!(
        shed_end <= shed_after,
        "{} requests were shed after the load dropped",
        shed_end - shed_after
    );
    println!(
        "figure: overload: after the load: first put {first:?}, median put {after:?} (before the load {baseline:?})"
    );
    Ok(())
}

async fn shed(admin: SocketAddr) -> Result<f64> {
    let (_, page) = http_get(admin, "/metrics").await?;
    Ok(metric(&page, "kappakv_requests_shed_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_saturating_load_is_shed_with_busy() -> Result<()> {
    overload(&[("max_concurrent_requests", "32")], 4, 2.0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with -- --ignored"]
async fn twice_the_saturating_load_is_shed_with_default_settings() -> Result<()> {
    overload(&[], 32, 10.0).await
}
