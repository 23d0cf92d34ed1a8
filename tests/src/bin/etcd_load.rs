//! etcd load generator for side-by-side comparisons with `kappactl bench`: the same closed
//! loop, key names, key choice and report, against etcd's own protocol (gRPC over HTTP/2,
//! spoken by hand: two request messages need no generated code).
//!
//! `--clients` tasks share `--connections` HTTP/2 connections; each sends its next request
//! when the last one is answered, to a key drawn uniformly from `--keys` (`bench/%010d`,
//! the same splitmix64 choice as `kappactl bench`). A put is `KV/Put` with a `--value-size`
//! byte value, acknowledged by etcd once its raft log entry is fsynced and applied; a get is
//! `KV/Range` of one key, linearizable unless `--serializable` (a local read, like a
//! kappakv get). Before a get bench every key is put once, unless `--no-prefill`.
//!
//! ```text
//! cargo run --release -p kappakv-tests --bin etcd-load -- --endpoint 127.0.0.1:2379 --op put --json
//! ```
//!
//! `--json` prints one object shaped like `kappactl bench --json`: `{"op", "clients",
//! "connections", "ops", "errors", "seconds", "ops_per_sec", "latency_us": {"p50", "p90",
//! "p99", "max", "mean"}, ...}`; a get that finds no value counts in `"misses"`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use bytes::{BufMut as _, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{Request, Uri};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

struct Args {
    endpoint: SocketAddr,
    op: Op,
    clients: u32,
    connections: Option<u32>,
    requests: u64,
    value_size: usize,
    keys: u64,
    seed: u64,
    serializable: bool,
    no_prefill: bool,
    json: bool,
}

const USAGE: &str = "etcd-load [--endpoint HOST:PORT] [--op put|get] [--clients N] [--connections N] \
[--requests N] [--value-size B] [--keys N] [--seed N] [--serializable] [--no-prefill] [--json]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        endpoint: "127.0.0.1:2379".parse()?,
        op: Op::Put,
        clients: 64,
        connections: None,
        requests: 10_000,
        value_size: 100,
        keys: 10_000,
        seed: 1,
        serializable: false,
        no_prefill: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => args.endpoint = value()?.parse().context("--endpoint IP:PORT")?,
            "--op" => {
                args.op = match value()?.as_str() {
                    "put" => Op::Put,
                    "get" => Op::Get,
                    other => bail!("--op is put or get, not {other}"),
                }
            }
            "--clients" => args.clients = value()?.parse()?,
            "--connections" => args.connections = Some(value()?.parse()?),
            "--requests" => args.requests = value()?.parse()?,
            "--value-size" => args.value_size = value()?.parse()?,
            "--keys" => args.keys = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--serializable" => args.serializable = true,
            "--no-prefill" => args.no_prefill = true,
            "--json" => args.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\nusage: {USAGE}"),
        }
    }
    if args.clients == 0 || args.keys == 0 || args.connections == Some(0) {
        bail!("--clients, --connections and --keys must be positive");
    }
    Ok(args)
}

/// splitmix64, as `kappactl bench` chooses keys.
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

// --- protobuf, just what two requests and one reply need ---

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_bytes_field(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(buf, field << 3 | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// `etcdserverpb.PutRequest { key = 1, value = 2 }`.
fn put_request(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + value.len() + 8);
    put_bytes_field(&mut buf, 1, key);
    put_bytes_field(&mut buf, 2, value);
    buf
}

/// `etcdserverpb.RangeRequest { key = 1, serializable = 7 }`.
fn range_request(key: &[u8], serializable: bool) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + 4);
    put_bytes_field(&mut buf, 1, key);
    if serializable {
        put_varint(&mut buf, 7 << 3);
        put_varint(&mut buf, 1);
    }
    buf
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).context("truncated protobuf varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    bail!("protobuf varint too long")
}

/// How many `kvs` (field 2) a `RangeResponse` holds.
fn range_kvs(msg: &[u8]) -> Result<u64> {
    let (mut pos, mut kvs) = (0, 0);
    while pos < msg.len() {
        let tag = read_varint(msg, &mut pos)?;
        match tag & 7 {
            0 => {
                read_varint(msg, &mut pos)?;
            }
            2 => {
                let len = read_varint(msg, &mut pos)? as usize;
                pos = pos
                    .checked_add(len)
                    .filter(|&end| end <= msg.len())
                    .context("truncated protobuf field")?;
                if tag >> 3 == 2 {
                    kvs += 1;
                }
            }
            1 => pos += 8,
            5 => pos += 4,
            w => bail!("unexpected protobuf wire type {w}"),
        }
    }
    Ok(kvs)
}

// --- gRPC over HTTP/2 ---

fn grpc_status(headers: &http::HeaderMap) -> Option<(String, String)> {
    let status = headers
        .get("grpc-status")?
        .to_str()
        .unwrap_or("?")
        .to_string();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((status, message))
}

/// One unary call: the reply message, or why there is none.
async fn call(conn: &SendRequest<Bytes>, uri: &Uri, msg: &[u8]) -> Result<Bytes> {
    let mut body = BytesMut::with_capacity(5 + msg.len());
    body.put_u8(0);
    body.put_u32(u32::try_from(msg.len())?);
    body.extend_from_slice(msg);
    let request = Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut conn = conn.clone().ready().await?;
    let (reply, mut send) = conn.send_request(request, false)?;
    send.send_data(body.freeze(), true)?;
    let (parts, mut recv) = reply.await?.into_parts();
    if parts.status != http::StatusCode::OK {
        bail!("HTTP status {}", parts.status);
    }
    // A trailers-only reply carries the gRPC status in its headers.
    if let Some((status, message)) = grpc_status(&parts.headers)
        && status != "0"
    {
        bail!("gRPC status {status}: {message}");
    }
    let mut data = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = recv.trailers().await?
        && let Some((status, message)) = grpc_status(&trailers)
        && status != "0"
    {
        bail!("gRPC status {status}: {message}");
    }
    if data.len() < 5 || data[0] != 0 {
        bail!("malformed gRPC reply ({} bytes)", data.len());
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    if data.len() != 5 + len {
        bail!("gRPC reply of {} bytes announces {len}", data.len() - 5);
    }
    Ok(data.freeze().slice(5..))
}

async fn connect(endpoint: SocketAddr) -> Result<SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(endpoint)
        .await
        .with_context(|| format!("connecting to etcd at {endpoint}"))?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("etcd-load: connection ended: {e}");
        }
    });
    Ok(send)
}

// --- the load ---

struct Plan {
    op: Op,
    keys: u64,
    seed: u64,
    serializable: bool,
    value: Vec<u8>,
    requests: u64,
    claimed: AtomicU64,
    put_uri: Uri,
    range_uri: Uri,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    misses: u64,
    first_error: Option<String>,
}

async fn one_request(conn: &SendRequest<Bytes>, plan: &Plan, key: &[u8]) -> Result<bool> {
    match plan.op {
        Op::Put => {
            call(conn, &plan.put_uri, &put_request(key, &plan.value)).await?;
            Ok(true)
        }
        Op::Get => {
            let reply = call(
                conn,
                &plan.range_uri,
                &range_request(key, plan.serializable),
            )
            .await?;
            Ok(range_kvs(&reply)? > 0)
        }
    }
}

async fn worker(index: u32, conn: SendRequest<Bytes>, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    let mut rng = plan.seed ^ (u64::from(index) << 32 | 0x5eed);
    while plan.claimed.fetch_add(1, Ordering::Relaxed) < plan.requests {
        let key = key_name(splitmix(&mut rng) % plan.keys);
        let start = Instant::now();
        match one_request(&conn, &plan, key.as_bytes()).await {
            Ok(found) => {
                tally.latencies_us.push(start.elapsed().as_micros() as u64);
                tally.misses += u64::from(!found);
            }
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    tally
}

/// Puts every key of the key space once, so gets find values.
async fn prefill(conns: &[SendRequest<Bytes>], plan: &Arc<Plan>, clients: u32) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let conn = conns[i as usize % conns.len()].clone();
        let (plan, next) = (plan.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= plan.keys {
                    return Ok::<_, anyhow::Error>(());
                }
                let msg = put_request(key_name(k).as_bytes(), &plan.value);
                call(&conn, &plan.put_uri, &msg)
                    .await
                    .context("prefilling the key space (skip it with --no-prefill)")?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The nearest-rank percentile of sorted samples, as `kappactl bench` reports it.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

async fn run(args: Args) -> Result<()> {
    let connections = args
        .connections
        .unwrap_or(args.clients.min(8))
        .min(args.clients);
    let mut conns = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        conns.push(connect(args.endpoint).await?);
    }
    let base = format!("http://{}", args.endpoint);
    let plan = Arc::new(Plan {
        op: args.op,
        keys: args.keys,
        seed: args.seed,
        serializable: args.serializable,
        value: vec![b'x'; args.value_size],
        requests: args.requests,
        claimed: AtomicU64::new(0),
        put_uri: format!("{base}/etcdserverpb.KV/Put").parse()?,
        range_uri: format!("{base}/etcdserverpb.KV/Range").parse()?,
    });
    if args.op == Op::Get && !args.no_prefill {
        prefill(&conns, &plan, args.clients).await?;
    }

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let conn = conns[i as usize % conns.len()].clone();
        tasks.spawn(worker(i, conn, plan.clone()));
    }
    let mut total = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let tally = done.context("a load task panicked")?;
        total.latencies_us.extend(tally.latencies_us);
        total.errors += tally.errors;
        total.misses += tally.misses;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    let lat = &mut total.latencies_us;
    lat.sort_unstable();
    let ops = lat.len() as u64;
    let ops_per_sec = if seconds > 0.0 {
        ops as f64 / seconds
    } else {
        0.0
    };
    let (p50, p90, p99) = (
        percentile(lat, 50.0),
        percentile(lat, 90.0),
        percentile(lat, 99.0),
    );
    let max = lat.last().copied().unwrap_or(0);
    let mean = lat.iter().sum::<u64>().checked_div(ops).unwrap_or(0);
    let op = match args.op {
        Op::Put => "put",
        Op::Get => "get",
    };
    if args.json {
        let v = json!({
            "op": op,
            "target": "etcd",
            "clients": args.clients,
            "connections": connections,
            "ops": ops,
            "errors": total.errors,
            "misses": total.misses,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "ops_per_sec": ops_per_sec.round(),
            "latency_us": { "p50": p50, "p90": p90, "p99": p99, "max": max, "mean": mean },
            "value_size": args.value_size,
            "keys": args.keys,
            "serializable": (args.op == Op::Get).then_some(args.serializable),
            "first_error": total.first_error,
        });
        println!("{v}");
    } else {
        println!(
            "etcd {op} bench: {} clients on {connections} connections, closed loop, {}-byte values, {} keys",
            args.clients, args.value_size, args.keys
        );
        println!(
            "{ops} ops in {seconds:.2} s: {ops_per_sec:.0} ops/s, {} errors, {} misses",
            total.errors, total.misses
        );
        println!("latency µs: p50 {p50}  p90 {p90}  p99 {p99}  max {max}");
        if let Some(e) = &total.first_error {
            eprintln!("first error: {e}");
        }
    }
    if ops == 0 && total.errors > 0 {
        bail!(
            "every request failed: {}",
            total.first_error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(run(args))
    });
    if let Err(e) = result {
        eprintln!("etcd-load: {e:#}");
        std::process::exit(1);
    }
}
