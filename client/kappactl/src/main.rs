//! `kappactl`: the command-line client of kappakv, and its load generator (`bench`).

mod bench;
mod histogram;
mod input;
mod output;
mod sync;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::TryStreamExt;
use kappakv_client::{
    Client, ClientBuilder, ConnectError, ErrorCode, QueryCursor, QueryOptions, RequestError,
    ScanOptions, Ticket,
};

const EXIT_CODES: &str = "\
Exit status:
  0  success (a missing key is a success: `get` prints nothing, `get --json` gives \"values\": [])
  1  any other failure (I/O, a protocol error, a bench where every request failed)
  2  usage: bad arguments, ticket, context or batch file
  3  cannot reach the node: no ticket, no answer, connection lost
  4  the node refused us: unknown token, a read-only token for a write, or a different node
  5  the node answered with an error (bad request, busy, unavailable, too large, ...)
  6  conflict: a write with --if-context found other current versions; nothing was written";

/// The command-line client of kappakv.
///
/// The node is found through --ticket, else KAPPAKV_TICKET, else DATA_DIR/client.ticket, else
/// ./kappakv.data/client.ticket: run `kappakv serve` in one terminal and `kappactl` in another,
/// in the same folder.
#[derive(Debug, Parser)]
#[command(name = "kappactl", version, after_help = EXIT_CODES)]
struct Cli {
    /// The node's ticket, as `kappakv id` prints it: kappakv://NODEID@HOST:PORT[,HOST:PORT…]/TOKEN.
    #[arg(long, global = true, env = "KAPPAKV_TICKET", hide_env_values = true)]
    ticket: Option<String>,
    /// Read the ticket from DIR/client.ticket.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds to wait for the node to answer a connection.
    #[arg(long, global = true, default_value_t = 5.0, value_name = "SECONDS")]
    connect_timeout: f64,
    /// Seconds to wait for the answer to one request.
    #[arg(long, global = true, default_value_t = 30.0, value_name = "SECONDS")]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a completion script for SHELL on standard output, such as
    /// `kappactl completions bash > /etc/bash_completion.d/kappactl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write VALUE under KEY; prints the new version's id.
    Put {
        key: String,
        /// The value; `-` reads it from standard input (for large or binary values).
        value: String,
        /// Supersede exactly these versions: the `context` that `get` printed. Without it, the
        /// put supersedes every version current on the node.
        #[arg(long, value_name = "CTX", conflicts_with = "if_context")]
        supersedes: Option<String>,
        /// Put only if the key's current versions on the node are exactly CTX (the `context`
        /// that `get` printed; "" for a key with no value); otherwise nothing is written and
        /// kappactl exits with status 6. Writes made on other nodes that have not arrived yet
        /// still become siblings.
        #[arg(long, value_name = "CTX")]
        if_context: Option<String>,
        /// Print {"id", "lsn"}.
        #[arg(long)]
        json: bool,
    },
    /// Print every current value of KEY and the context to pass to --supersedes.
    Get {
        key: String,
        /// Print {"key", "values": [{"id", "value", "author", "timestamp"}], "context"}.
        #[arg(long, conflicts_with = "raw")]
        json: bool,
        /// Write the value's bytes exactly as stored (fails if there are siblings).
        #[arg(long)]
        raw: bool,
    },
    /// Delete KEY; prints the tombstone's id.
    #[command(alias = "delete")]
    Del {
        key: String,
        /// Delete exactly these versions (a concurrent put survives).
        #[arg(long, value_name = "CTX", conflicts_with = "if_context")]
        supersedes: Option<String>,
        /// Delete only if the key's current versions on the node are exactly CTX; otherwise
        /// nothing is written and kappactl exits with status 6.
        #[arg(long, value_name = "CTX")]
        if_context: Option<String>,
        /// Print {"id", "lsn"}.
        #[arg(long)]
        json: bool,
    },
    /// List keys with their current values, in key order.
    Scan {
        /// Keys starting with P.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// Keys at or after K.
        #[arg(long, value_name = "K")]
        start: Option<String>,
        /// Keys before K.
        #[arg(long, value_name = "K")]
        end: Option<String>,
        /// At most N keys.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// JSON Lines, one `get --json` object per key.
        #[arg(long)]
        json: bool,
    },
    /// Every version KEY ever had, newest first, deletes included.
    History {
        key: String,
        /// At most N versions.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print changes as they happen, until interrupted.
    Watch {
        /// Only keys starting with P.
        #[arg(long, value_name = "P", default_value = "")]
        prefix: String,
        /// First replay the changes after LSN from the log (0 replays everything).
        #[arg(long = "from", value_name = "LSN")]
        from_lsn: Option<u64>,
        /// Stop after N changes.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// JSON Lines: {"lsn", "key", "id", "value", "author", "timestamp", "supersedes"}.
        #[arg(long)]
        json: bool,
    },
    /// Keys whose values a declared index finds, with their current values, in index order
    /// (nearest first for --near).
    ///
    /// VALUE is read as JSON when it parses (`3`, `true`, `"3"`), else as a string; a JSON array
    /// gives the values of a compound index's fields, in order (a prefix of them is enough).
    Query {
        /// The index's declared name.
        index: String,
        /// Keys whose indexed value equals VALUE.
        #[arg(
            allow_hyphen_values = true,
            required_unless_present_any = ["range", "bbox", "near"]
        )]
        value: Option<String>,
        /// Keys whose indexed value is in A..B (B excluded) or A..=B; either side may be left
        /// out (`10..`, `..=20`).
        #[arg(
            long,
            value_name = "A..B",
            allow_hyphen_values = true,
            conflicts_with = "value"
        )]
        range: Option<String>,
        /// Of a geo index: keys with a point in the box, edges included; a MIN_LON greater
        /// than MAX_LON crosses the antimeridian
        #[arg(
            long,
            value_name = "MIN_LAT,MAX_LAT,MIN_LON,MAX_LON",
            allow_hyphen_values = true,
            conflicts_with_all = ["value", "range", "near"]
        )]
        bbox: Option<String>,
        /// Of a geo index: the keys nearest to the point (--limit of them), nearest first, with
        /// their great-circle distance in metres
        #[arg(
            long,
            value_name = "LAT,LON",
            allow_hyphen_values = true,
            conflicts_with_all = ["value", "range"]
        )]
        near: Option<String>,
        /// At most N keys.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u64,
        /// Start after CURSOR, as a previous query printed it.
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// While the index is being built, wait up to SECONDS for it instead of failing.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
        /// JSON Lines, one `get --json` object per key.
        #[arg(long)]
        json: bool,
    },
    /// The node's state: LSNs, version vector, peers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Write several ops atomically from FILE (`-` for standard input): JSON Lines of
    /// {"key": K, "value": V} or {"key": K, "delete": true}, optionally with "supersedes": CTX;
    /// K and V are strings or {"base64": "..."}.
    Batch {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Manage the node's peers.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Sync the node with another through any byte stream: runs one peer session of the node
    /// on standard input and output. Two nodes sync when two of these are piped into each
    /// other (`dupsh 'kappactl sync --stdio' 'ssh host kappactl sync --stdio'`, socat, a pair
    /// of named pipes); what arrives is verified as from any peer. Exits 0 once each side
    /// holds everything the other had when they met, with a summary on standard error. With
    /// a read-only ticket the node only sends.
    Sync {
        /// Use standard input and output (the only transport so far).
        #[arg(long, required = true)]
        stdio: bool,
        /// Keep going with new entries instead of ending once synced.
        #[arg(long)]
        live: bool,
    },
    /// Hand export files (`kappakv export`) to the running node, which verifies and appends
    /// what it lacks as from a peer; `-` reads standard input. Exits 1 when any entry was
    /// refused (the node's log says why).
    Import {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Load the node and report throughput and latency percentiles.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Add a peer: NODEID@HOST:PORT.
    Add { peer: String },
    /// Remove a peer.
    Remove { node_id: String },
    /// List peers and their replication state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print an invite, alone on its line: given to `kappakv serve --join` (or `kappactl peer
    /// join`) on another node, it makes the two nodes peers of each other, once.
    Invite {
        /// How long the invite is valid: 90s, 30m, 1h, 7d
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expires: std::time::Duration,
    },
    /// Join the node that made INVITE: both nodes add each other to their peer lists.
    Join { invite: String },
}

/// `90s`, `30m`, `1h`, `7d`, or a number of seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 30m, 1h or 7d"))?;
    let unit_secs: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit is s, m, h or d")),
    };
    n.checked_mul(unit_secs)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long a duration"))
}

/// Exit statuses, listed in `--help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExitCode {
    Other = 1,
    Usage = 2,
    Connect = 3,
    Refused = 4,
    Server = 5,
    Conflict = 6,
}

/// A failure kappactl itself detects, with its exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    pub(crate) code: ExitCode,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: ExitCode::Usage,
            message: message.into(),
        }
    }
    pub(crate) fn connect(message: impl Into<String>) -> Self {
        Self {
            code: ExitCode::Connect,
            message: message.into(),
        }
    }
    pub(crate) fn other(message: impl Into<String>) -> Self {
        Self {
            code: ExitCode::Other,
            message: message.into(),
        }
    }
}

fn connect_exit(e: &ConnectError) -> ExitCode {
    match e {
        ConnectError::WrongNode { .. } | ConnectError::Unauthorized { .. } => ExitCode::Refused,
        ConnectError::Refused { .. } => ExitCode::Server,
        _ => ExitCode::Connect,
    }
}

/// The exit status and one-line message for an error.
fn classify(err: &anyhow::Error) -> (ExitCode, String) {
    let message = format!("{err:#}");
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return (f.code, message);
        }
        if let Some(e) = cause.downcast_ref::<ConnectError>() {
            return (connect_exit(e), message);
        }
        if let Some(e) = cause.downcast_ref::<RequestError>() {
            let code = match e {
                RequestError::Connect(c) => connect_exit(c),
                RequestError::Server {
                    code: ErrorCode::Unauthorized | ErrorCode::Forbidden,
                    ..
                } => ExitCode::Refused,
                RequestError::Server {
                    code: ErrorCode::Conflict,
                    ..
                } => ExitCode::Conflict,
                RequestError::Server { .. } => ExitCode::Server,
                RequestError::ConnectionLost { .. }
                | RequestError::Timeout { .. }
                | RequestError::OutcomeUnknown { .. } => ExitCode::Connect,
                RequestError::Invalid(_) => ExitCode::Usage,
                _ => ExitCode::Other,
            };
            let hint = match e {
                RequestError::Server {
                    code: ErrorCode::Forbidden,
                    ..
                } => "; this ticket's token is read-only: use the read-write ticket",
                RequestError::Server { code, .. } if code.retryable() => "; try again shortly",
                RequestError::ConnectionLost { .. } | RequestError::OutcomeUnknown { .. } => {
                    "; a write may or may not have happened: check with `get` before retrying"
                }
                _ => "",
            };
            return (code, format!("{message}{hint}"));
        }
    }
    (ExitCode::Other, message)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "kappactl", &mut std::io::stdout());
        return std::process::ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kappactl: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(ExitCode::Other as u8);
        }
    };
    let result = runtime.block_on(run(cli));
    // Without waiting for blocking reads: `sync --stdio` may still be reading standard input,
    // which the other side of the pipe closes only once this process has closed its output.
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (e.g. `| head`) is not an error worth a message.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return std::process::ExitCode::SUCCESS;
            }
            let (code, message) = classify(&err);
            eprintln!("kappactl: {message}");
            std::process::ExitCode::from(code as u8)
        }
    }
}

fn seconds(name: &str, s: f64) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Failure::usage(format!("{name} must be a positive number of seconds")))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect_timeout = seconds("--connect-timeout", cli.connect_timeout)?;
    let request_timeout = seconds("--timeout", cli.timeout)?;
    let ticket = input::resolve_ticket(cli.ticket.as_deref(), cli.data_dir.as_deref())?;
    let builder = move |t: Ticket| -> ClientBuilder {
        Client::builder(t)
            .connect_timeout(connect_timeout)
            .request_timeout(request_timeout)
    };
    if let Command::Bench(args) = cli.command {
        return bench::run(args, ticket, builder).await;
    }
    // Validate arguments before connecting, so usage errors do not wait on the network.
    let command = cli.command;
    let context = match &command {
        Command::Put {
            supersedes: Some(c),
            ..
        }
        | Command::Del {
            supersedes: Some(c),
            ..
        } => Some(input::parse_context("--supersedes", c)?),
        Command::Put {
            if_context: Some(c),
            ..
        }
        | Command::Del {
            if_context: Some(c),
            ..
        } => Some(input::parse_context("--if-context", c)?),
        _ => None,
    };
    let batch = match &command {
        Command::Batch { file, .. } => {
            let text = if file.as_os_str() == "-" {
                String::from_utf8(input::read_value("-")?)
                    .map_err(|_| Failure::usage("the batch is not UTF-8 text"))?
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            Some(input::parse_batch(&text)?)
        }
        _ => None,
    };
    let value = match &command {
        Command::Put { value, .. } => Some(input::read_value(value)?),
        _ => None,
    };
    let client = builder(ticket).connect().await?;
    let mut out = std::io::stdout();
    match command {
        Command::Put {
            key,
            json,
            if_context,
            ..
        } => {
            let value = value.expect("read above");
            let w = match &context {
                Some(ctx) if if_context.is_some() => client.put_if(key, value, ctx).await?,
                Some(ctx) => client.put_with(key, value, ctx).await?,
                None => client.put(key, value).await?,
            };
            print_written(&mut out, w, json)?;
        }
        Command::Del {
            key,
            json,
            if_context,
            ..
        } => {
            let w = match &context {
                Some(ctx) if if_context.is_some() => client.delete_if(key, ctx).await?,
                Some(ctx) => client.delete_with(key, ctx).await?,
                None => client.delete(key).await?,
            };
            print_written(&mut out, w, json)?;
        }
        Command::Batch { json, .. } => {
            let w = client.batch(batch.expect("parsed above")).await?;
            print_written(&mut out, w, json)?;
        }
        Command::Get { key, json, raw } => {
            let got = client.get(&key).await?;
            if json {
                writeln!(out, "{}", output::get_json(&got))?;
            } else if raw {
                match got.values.as_slice() {
                    [] => {}
                    [only] => out.write_all(only.value.as_deref().unwrap_or_default())?,
                    many => {
                        return Err(Failure::other(format!(
                            "`{key}` has {} concurrent values; run `kappactl get` without --raw to see them",
                            many.len()
                        ))
                        .into());
                    }
                }
            } else {
                out.write_all(output::get_human(&got).as_bytes())?;
                if got.values.is_empty() {
                    eprintln!("(no value)");
                }
            }
        }
        Command::Scan {
            prefix,
            start,
            end,
            limit,
            json,
        } => {
            let mut options = prefix.map_or_else(ScanOptions::all, ScanOptions::prefix);
            if let Some(s) = start {
                options = options.start(s);
            }
            if let Some(e) = end {
                options = options.end(e);
            }
            if let Some(n) = limit {
                options = options.limit(n);
            }
            let mut scan = client.scan(options);
            while let Some(kv) = scan.try_next().await? {
                if kv.values.is_empty() {
                    continue;
                }
                if json {
                    writeln!(out, "{}", output::scan_json(&kv))?;
                } else {
                    out.write_all(output::scan_human(&kv).as_bytes())?;
                }
            }
        }
        Command::History { key, limit, json } => {
            let versions = client.history(&key, limit).await?;
            if json {
                writeln!(out, "{}", output::history_json(key.as_bytes(), &versions))?;
            } else {
                out.write_all(output::history_human(&versions).as_bytes())?;
            }
        }
        Command::Watch {
            prefix,
            from_lsn,
            count,
            json,
        } => {
            watch(&client, prefix, from_lsn, count, json).await?;
        }
        Command::Query {
            index,
            value,
            range,
            bbox,
            near,
            limit,
            after,
            wait,
            json,
        } => {
            let query = match (value, range, bbox, near) {
                (_, _, Some(b), _) => {
                    let [a, b, c, d] = input::parse_coordinates::<4>("--bbox", &b)?;
                    kappakv_client::IndexQuery::bbox(a, b, c, d)
                }
                (_, _, _, Some(p)) => {
                    let [lat, lon] = input::parse_coordinates::<2>("--near", &p)?;
                    kappakv_client::IndexQuery::near(lat, lon)
                }
                (_, Some(range), _, _) => input::parse_range(&range)?,
                (Some(value), None, None, None) => {
                    kappakv_client::IndexQuery::Exact(input::parse_index_value(&value)?)
                }
                (None, None, None, None) => {
                    return Err(
                        Failure::usage("give a VALUE, --range A..B, --bbox or --near").into(),
                    );
                }
            };
            let mut options = QueryOptions::new(query);
            if let Some(w) = wait {
                options = options.wait(seconds("--wait", w)?);
            }
            let mut cursor = after
                .map(|c| c.parse::<QueryCursor>())
                .transpose()
                .map_err(|e| {
                    Failure::usage(format!("--after: not a cursor a query printed: {e}"))
                })?;
            let mut left = limit;
            while left > 0 {
                let mut page_options = options
                    .clone()
                    .limit(u32::try_from(left).unwrap_or(u32::MAX));
                if let Some(c) = cursor.take() {
                    page_options = page_options.start_after(c);
                }
                let page = client.query(&index, &page_options).await?;
                left -= (page.items.len() as u64).min(left);
                for (i, item) in page.items.iter().enumerate() {
                    let distance = page.distances_m.get(i).copied();
                    if json {
                        writeln!(out, "{}", output::query_json(item, distance))?;
                    } else {
                        out.write_all(output::query_human(item, distance).as_bytes())?;
                    }
                }
                cursor = page.next;
                if cursor.is_none() {
                    break;
                }
            }
            if let Some(c) = cursor {
                out.flush()?;
                eprintln!("more: --after {c}");
            }
        }
        Command::Status { json } => {
            let status = client.status().await?;
            if json {
                writeln!(out, "{}", output::status_json(&status))?;
            } else {
                out.write_all(output::status_human(&status).as_bytes())?;
            }
        }
        Command::Sync { stdio: _, live } => sync::stdio(&client, live).await?,
        Command::Import { files } => sync::import(&client, &files).await?,
        Command::Peer(PeerCommand::Add { peer }) => {
            let (id, addr) = input::parse_peer(&peer)?;
            client.peer_add(id, addr).await?;
        }
        Command::Peer(PeerCommand::Remove { node_id }) => {
            client.peer_remove(input::parse_node_id(&node_id)?).await?;
        }
        Command::Peer(PeerCommand::List { json }) => {
            let peers = client.peer_list().await?;
            if json {
                writeln!(out, "{}", output::peers_json(&peers))?;
            } else {
                out.write_all(output::peers_human(&peers).as_bytes())?;
            }
        }
        Command::Peer(PeerCommand::Invite { expires }) => {
            writeln!(out, "{}", client.peer_invite(expires).await?)?;
        }
        Command::Peer(PeerCommand::Join { invite }) => {
            client.peer_join(&invite).await?;
            eprintln!("joined: the two nodes are peers of each other");
        }
        Command::Bench(_) | Command::Completions { .. } => unreachable!("handled above"),
    }
    client.close().await;
    Ok(())
}

fn print_written(
    out: &mut impl std::io::Write,
    w: kappakv_client::Written,
    json: bool,
) -> std::io::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "id": w.id.to_hex(), "lsn": w.lsn })
        )
    } else {
        writeln!(out, "{}", w.id)
    }
}

async fn watch(
    client: &Client,
    prefix: String,
    from: Option<u64>,
    count: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let mut changes = client.watch(prefix, from);
    let mut seen = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while count.is_none_or(|n| seen < n) {
        let change = tokio::select! {
            change = changes.try_next() => change?,
            _ = &mut interrupted => break,
        };
        let Some(change) = change else { break };
        seen += 1;
        // Line by line, so that a pipe sees each change as it happens.
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", output::change_json(&change))?;
        } else {
            writeln!(out, "{}", output::change_human(&change))?;
        }
        out.flush()?;
    }
    Ok(())
}
