//! `kappactl bench`: a load generator. Closed loop by default (each client sends its next
//! request when the last one is answered); with `--rate` open loop, where request `i` is due at
//! `start + i / rate` and its latency counts from when it was due, so a stalled node shows up
//! as latency instead of hiding behind fewer requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kappakv_client::{Batch, Client, ClientBuilder, Ticket};
use kappakv_protocol::limits::{MAX_OPS_PER_ENTRY, MAX_VALUE_BYTES};
use serde_json::json;
use tokio::time::Instant;

use crate::Failure;
use crate::histogram::Histogram;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Op {
    /// Single-key puts.
    Put,
    /// Single-key gets.
    Get,
    /// Half gets, half puts.
    Mixed,
    /// Atomic batches of `--batch-size` puts.
    Batch,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Mixed => "mixed",
            Op::Batch => "batch",
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Concurrent clients (requests in flight).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// QUIC connections the clients share [default: one per core of this machine, at most
    /// clients]. Each connection's packets are handled by one task on each side, and the
    /// clients of one connection share its pipeline.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: Option<u32>,
    /// Requests to measure in all [default: 10000, unless --duration is given].
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// Measure for this many seconds instead of a number of requests.
    #[arg(long)]
    duration: Option<f64>,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys, chosen uniformly at random.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Op::Put)]
    op: Op,
    /// Puts per batch, for `--op batch`.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Seconds of unmeasured load before measuring.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Requests per second in all, open loop (latency counts from when a request was due).
    #[arg(long)]
    rate: Option<f64>,
    /// Do not write the key space before a get or mixed bench.
    #[arg(long)]
    no_prefill: bool,
    /// Seed of the key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send each request on a QUIC stream of its own instead of on its connection's pipeline.
    #[arg(long)]
    no_pipeline: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// What one bench client saw.
#[derive(Default)]
struct Tally {
    latency: Histogram,
    errors: u64,
    first_error: Option<String>,
}

/// Shared by the bench clients: who sends what, and when to stop.
struct Plan {
    args: BenchArgs,
    value: Vec<u8>,
    /// Start of measuring (after warm-up).
    measure_from: Instant,
    /// End of measuring, for `--duration`.
    until: Option<Instant>,
    /// Next request number, for open-loop due times.
    next_seq: AtomicU64,
    /// Measured requests claimed so far, for `--requests`.
    claimed: AtomicU64,
    requests: Option<u64>,
    start: Instant,
    stop: AtomicBool,
}

/// splitmix64: a small, seedable key chooser; benches need spread, not cryptography.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key_name(i: u64) -> String {
    format!("bench/{i:010}")
}

fn validate(args: &BenchArgs) -> Result<(), Failure> {
    if args.value_size > MAX_VALUE_BYTES {
        return Err(Failure::usage(format!(
            "--value-size is over the limit of {MAX_VALUE_BYTES} bytes"
        )));
    }
    if args.batch_size == 0 || args.batch_size > MAX_OPS_PER_ENTRY {
        return Err(Failure::usage(format!(
            "--batch-size must be 1..={MAX_OPS_PER_ENTRY}"
        )));
    }
    if args.op == Op::Batch && (args.batch_size as u64) > args.keys {
        return Err(Failure::usage(
            "--batch-size must not exceed --keys (one op per key per batch)",
        ));
    }
    for (name, v) in [
        ("--duration", args.duration),
        ("--rate", args.rate),
        ("--warmup", Some(args.warmup)),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            return Err(Failure::usage(format!(
                "{name} must be a non-negative number"
            )));
        }
    }
    if args.rate == Some(0.0) || args.duration == Some(0.0) {
        return Err(Failure::usage("--rate and --duration must be above zero"));
    }
    Ok(())
}

pub(crate) async fn run(
    args: BenchArgs,
    ticket: Ticket,
    builder: impl Fn(Ticket) -> ClientBuilder,
) -> anyhow::Result<()> {
    validate(&args)?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let connections = args
        .connections
        .unwrap_or(u32::try_from(cores).unwrap_or(u32::MAX))
        .min(args.clients);
    let mut clients = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        let builder = builder(ticket.clone()).pipeline(!args.no_pipeline);
        clients.push(builder.connect().await?);
    }
    if matches!(args.op, Op::Get | Op::Mixed) && !args.no_prefill {
        prefill(&clients[0], args.keys, args.value_size).await?;
    }

    let requests = match (args.requests, args.duration) {
        (Some(n), _) => Some(n),
        (None, None) => Some(10_000),
        (None, Some(_)) => None,
    };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let plan = Arc::new(Plan {
        value: vec![b'x'; args.value_size],
        measure_from,
        until: args
            .duration
            .map(|d| measure_from + Duration::from_secs_f64(d)),
        next_seq: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        requests,
        start,
        stop: AtomicBool::new(false),
        args,
    });

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..plan.args.clients {
        let client = clients[i as usize % clients.len()].clone();
        let plan = plan.clone();
        tasks.spawn(async move { worker(i, client, plan).await });
    }
    let mut total = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let tally = done.context("a bench client panicked")?;
        total.latency.merge(&tally.latency);
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let seconds = measure_from.elapsed().as_secs_f64();
    for c in &clients {
        c.close().await;
    }
    report(&plan.args, connections, &total, seconds);
    if total.latency.count() == 0 && total.errors > 0 {
        return Err(Failure::other(format!(
            "every request failed: {}",
            total.first_error.as_deref().unwrap_or("unknown error")
        ))
        .into());
    }
    Ok(())
}

/// Writes every key of the key space once, in large batches, so gets find values.
async fn prefill(client: &Client, keys: u64, value_size: usize) -> anyhow::Result<()> {
    let value = vec![b'x'; value_size];
    // Keep a batch well under the entry size limit.
    let per_batch =
        (MAX_OPS_PER_ENTRY as u64).min((2 * 1024 * 1024 / (value_size as u64 + 32)).max(1));
    let mut i = 0;
    while i < keys {
        let end = (i + per_batch).min(keys);
        let batch = (i..end).fold(Batch::new(), |b, k| b.put(key_name(k), &value));
        client
            .batch(batch)
            .await
            .context("prefilling the key space (skip it with --no-prefill)")?;
        i = end;
    }
    Ok(())
}

async fn worker(index: u32, client: Client, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let mut rng = plan.args.seed ^ (u64::from(index) << 32 | 0x5eed);
    let interval = plan.args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    loop {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        // When this request is due: now (closed loop) or on the open-loop schedule.
        let due = match interval {
            Some(every) => {
                let seq = plan.next_seq.fetch_add(1, Ordering::Relaxed);
                let due = plan.start + every.mul_f64(seq as f64);
                tokio::time::sleep_until(due).await;
                due
            }
            None => Instant::now(),
        };
        if plan.until.is_some_and(|end| due >= end) {
            plan.stop.store(true, Ordering::Relaxed);
            break;
        }
        let measured = due >= plan.measure_from;
        let over_budget = |n: u64| plan.claimed.fetch_add(1, Ordering::Relaxed) >= n;
        if measured && plan.requests.is_some_and(over_budget) {
            plan.stop.store(true, Ordering::Relaxed);
            break;
        }
        let result = one_request(&client, &plan, &mut rng).await;
        if !measured {
            continue;
        }
        match result {
            Ok(()) => tally.latency.record(due.elapsed().as_micros() as u64),
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e.to_string());
                }
            }
        }
    }
    tally
}

async fn one_request(client: &Client, plan: &Plan, rng: &mut u64) -> kappakv_client::Result<()> {
    let keys = plan.args.keys;
    let key = key_name(splitmix(rng) % keys);
    match plan.args.op {
        Op::Get => client.get(key).await.map(drop),
        Op::Mixed if splitmix(rng) & 1 == 0 => client.get(key).await.map(drop),
        Op::Put | Op::Mixed => client.put(key, &plan.value).await.map(drop),
        Op::Batch => {
            // Distinct keys: consecutive from a random start, wrapping around the key space.
            let first = splitmix(rng) % keys;
            let batch = (0..plan.args.batch_size as u64).fold(Batch::new(), |b, j| {
                b.put(key_name((first + j) % keys), &plan.value)
            });
            client.batch(batch).await.map(drop)
        }
    }
}

fn report(args: &BenchArgs, connections: u32, total: &Tally, seconds: f64) {
    let h = &total.latency;
    let ops = h.count();
    let ops_per_sec = if seconds > 0.0 {
        ops as f64 / seconds
    } else {
        0.0
    };
    let (p50, p90, p99, max) = (
        h.percentile(50.0),
        h.percentile(90.0),
        h.percentile(99.0),
        h.max(),
    );
    if args.json {
        let v = json!({
            "op": args.op.name(),
            "clients": args.clients,
            "connections": connections,
            "pipeline": !args.no_pipeline,
            "ops": ops,
            "errors": total.errors,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "ops_per_sec": ops_per_sec.round(),
            "latency_us": { "p50": p50, "p90": p90, "p99": p99, "max": max, "mean": h.mean() },
            "value_size": args.value_size,
            "keys": args.keys,
            "batch_size": (args.op == Op::Batch).then_some(args.batch_size),
            "rate": args.rate,
            "first_error": total.first_error,
        });
        println!("{v}");
    } else {
        let mode = args.rate.map_or_else(
            || "closed loop".to_string(),
            |r| format!("open loop at {r} req/s"),
        );
        println!(
            "{} bench: {} clients on {connections} connections, {mode}, {}-byte values, {} keys",
            args.op.name(),
            args.clients,
            args.value_size,
            args.keys
        );
        println!(
            "{ops} ops in {seconds:.2} s: {ops_per_sec:.0} ops/s, {} errors",
            total.errors
        );
        println!("latency µs: p50 {p50}  p90 {p90}  p99 {p99}  max {max}");
        if let Some(e) = &total.first_error {
            eprintln!("first error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_choice_is_spread_and_seeded() {
        let mut a = 7;
        let mut b = 7;
        let xs: Vec<u64> = (0..1000).map(|_| splitmix(&mut a) % 10).collect();
        let ys: Vec<u64> = (0..1000).map(|_| splitmix(&mut b) % 10).collect();
        assert_eq!(xs, ys);
        for k in 0..10 {
            let n = xs.iter().filter(|&&x| x == k).count();
            assert!((50..150).contains(&n), "key {k} chosen {n} times");
        }
    }
}
