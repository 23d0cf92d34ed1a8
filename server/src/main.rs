//! `kappakv`: the server binary and its offline commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kappakv_server::commands::{backup, progress, restore};
use kappakv_server::config::{Layered, LogFormat};
use kappakv_server::{Config, Server};

/// kappakv: a peer-to-peer key/value database whose source of truth is a signed, append-only log.
///
/// `kappakv serve` in a folder creates `kappakv.data/` there and listens on 127.0.0.1:7700;
/// `kappactl put k v` in the same folder then just works.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct DataDirArg {
    /// The data directory [default: ./kappakv.data; env KAPPAKV_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// QUIC address to listen on [default: 127.0.0.1:7700; env KAPPAKV_LISTEN]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// An address others should dial, HOST:PORT: a DNS name or an IP address (repeatable),
    /// written into tickets and the peer address. Without it: the listen address, or for
    /// 0.0.0.0 or [::] the machine's interface addresses, loopback last
    /// [env KAPPAKV_ADVERTISE, comma-separated]
    #[arg(long = "advertise", value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// A peer to replicate with, NODEID@HOST:PORT (repeatable) [env KAPPAKV_PEERS, comma-separated]
    #[arg(long = "peer", value_name = "NODEID@ADDR")]
    peers: Vec<String>,
    /// Before serving, join the node that made INVITE (`kappactl peer invite` prints one): both
    /// nodes add each other to their peer lists, kept across restarts. A used, expired or
    /// forged invite is refused: kappakv exits with status 2 and adds no peer
    #[arg(long, value_name = "INVITE")]
    join: Option<String>,
    /// A TOML file of settings; see `kappakv config show` for every setting
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format [default: text; env KAPPAKV_LOG_FORMAT]
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// Admin HTTP address for /metrics, /healthz and /readyz, or `off`
    /// [default: 127.0.0.1:7701; env KAPPAKV_ADMIN_LISTEN]
    #[arg(long, value_name = "ADDR|off")]
    admin_listen: Option<String>,
    /// No admin HTTP listener (same as `--admin-listen off`)
    #[arg(long, conflicts_with = "admin_listen")]
    no_admin: bool,
    /// Write under this node's id even though peers may hold later entries of its own chain
    /// than its log (after restoring an older backup): every peer will refuse the node's new
    /// entries as equivocations. Without it, local writes are held (answered Unavailable)
    /// until a peer has confirmed or sent back the node's chain [env KAPPAKV_ACCEPT_CHAIN_LOSS]
    #[arg(long)]
    accept_chain_loss: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the node: opens or creates the data dir and serves QUIC. Stop with Ctrl-C or SIGTERM.
    ///
    /// Under systemd (`Type=notify`), it sends READY=1 once it serves and STOPPING=1 when it
    /// begins to shut down.
    ///
    /// Exit status: 0 stopped cleanly (SIGTERM or Ctrl-C); 1 failed while running (such as a
    /// failed log write); 2 usage or configuration error; 3 the data dir is in use by another
    /// process, or its log or node key is damaged; 4 cannot listen on the QUIC or admin address.
    Serve(ServeArgs),
    /// Checks the log offline: every CRC, signature and per-author chain. Exits 1 at the first
    /// problem, naming the segment and offset.
    Verify(DataDirArg),
    /// Regenerates the indexes from the log, offline. Safe to interrupt: a later start resumes.
    RebuildIndexes {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Rebuild only this view (default: all): a built-in view or a declared index
        #[arg(long, value_name = "NAME")]
        index: Option<String>,
        /// The node's config file, for its declared indexes ([[index]] tables)
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Writes log entries, in the log's record format, for `kappakv import` on another node.
    ///
    /// Works while the node is running: it then asks the node (through `client.ticket` in the
    /// data dir) how far its log is durable and takes nothing after that, and fails if the node
    /// does not answer. Each author's chain ends at a signed entry. Prints a summary on
    /// standard error.
    Export {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Where to write; `-` is standard output [default: -]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Only entries missing from this version vector: a JSON file `{"NODEID": seq, ...}`,
        /// or the output of `kappactl status --json` on the receiving node
        #[arg(long, value_name = "VERSION_VECTOR_FILE")]
        since: Option<PathBuf>,
    },
    /// Appends every verifiable entry of export files that the log lacks, in any order.
    ///
    /// The node must not be running. Entries already present are skipped; forged, conflicting
    /// (equivocating) or unsigned entries are rejected, one line each with the reason. The
    /// node's indexes catch up when it next starts.
    ///
    /// Exit status: 0 when nothing was rejected, 1 when something was (the rest was imported),
    /// 2 when the import could not run (for example, the node is running).
    Import {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// The node's config file, for its `writers` allow-list (also KAPPAKV_WRITERS): entries
        /// of other authors are rejected, as from peers
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Export files; `-` reads standard input
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Syncs this stopped node with another through any byte stream: runs one peer session on
    /// standard input and output (the data dir's lock is held meanwhile). Two nodes sync when
    /// two sessions are piped into each other: `dupsh 'kappakv sync --stdio' 'ssh host kappactl
    /// sync --stdio'`, socat, a pair of named pipes. What arrives is verified as from any peer
    /// (signatures, chains, equivocations, the `writers` list). Exits 0 once each side holds
    /// everything the other had when they met, with a summary on standard error; 1 if the
    /// session failed (nothing unverified is appended), 3 if the data dir is in use.
    Sync {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// The node's config file, for its `writers` list and settings
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Use standard input and output (the only transport so far)
        #[arg(long, required = true)]
        stdio: bool,
        /// Keep going with new entries instead of ending once synced
        #[arg(long)]
        live: bool,
    },
    /// Copies a consistent log, the node key, tokens and peers into a new directory, while the
    /// node serves or not. Never the indexes: a restored node rebuilds them.
    ///
    /// The backup ends where every author's chain ends at a signed entry, and next to a running
    /// node at or before what the node reports durable (asked through `client.ticket`; the
    /// backup fails if it does not answer); `backup.json` in it gives its LSN, version vector
    /// and time. Exit status: 0 done; 1 failed.
    Backup {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// The backup directory to create (new or empty)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Makes a new data dir from a backup, then verifies its log. Start the node on it
    /// afterwards: it rebuilds its indexes and serves the backed-up data.
    ///
    /// Exit status: 0 done; 1 failed (the data dir is not empty, the backup is incomplete or
    /// damaged).
    Restore {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// The directory `kappakv backup --out` wrote
        #[arg(value_name = "BACKUP_DIR")]
        backup: PathBuf,
    },
    /// Prints the node id, the address, and the client tickets.
    Id {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// The address peers and clients should use [default: the listen setting]
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Prints a completion script for SHELL on standard output, such as
    /// `kappakv completions bash > /etc/bash_completion.d/kappakv`.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Prints every effective setting and where it came from (default, file, env, flag).
    Show(ServeArgs),
}

fn layered(args: &ServeArgs) -> Result<Layered> {
    let mut flags: Vec<(&'static str, toml::Value)> = Vec::new();
    if let Some(d) = &args.data_dir.data_dir {
        flags.push(("data_dir", toml::Value::String(d.display().to_string())));
    }
    if let Some(l) = args.listen {
        flags.push(("listen", toml::Value::String(l.to_string())));
    }
    if !args.advertise.is_empty() {
        flags.push((
            "advertise",
            toml::Value::Array(
                args.advertise
                    .iter()
                    .cloned()
                    .map(toml::Value::String)
                    .collect(),
            ),
        ));
    }
    if !args.peers.is_empty() {
        flags.push((
            "peers",
            toml::Value::Array(
                args.peers
                    .iter()
                    .cloned()
                    .map(toml::Value::String)
                    .collect(),
            ),
        ));
    }
    if let Some(f) = &args.log_format {
        flags.push(("log_format", toml::Value::String(f.clone())));
    }
    if args.accept_chain_loss {
        flags.push(("accept_chain_loss", toml::Value::Boolean(true)));
    }
    if args.no_admin {
        flags.push((
            "admin_listen",
            toml::Value::String(kappakv_server::config::ADMIN_OFF.into()),
        ));
    } else if let Some(a) = &args.admin_listen {
        flags.push(("admin_listen", toml::Value::String(a.clone())));
    }
    Ok(Layered::load(
        args.config.as_deref(),
        std::env::vars(),
        flags,
    )?)
}

fn data_dir_config(arg: &DataDirArg) -> Result<Config> {
    Ok(layered(&serve_args(arg))?.config)
}

/// The settings of an offline command that takes the node's config file.
fn data_dir_config_with(arg: &DataDirArg, config: Option<PathBuf>) -> Result<Config> {
    Ok(layered(&ServeArgs {
        config,
        ..serve_args(arg)
    })?
    .config)
}

/// The settings of `serve` with only a data dir given.
fn serve_args(arg: &DataDirArg) -> ServeArgs {
    ServeArgs {
        data_dir: arg.clone(),
        listen: None,
        advertise: vec![],
        peers: vec![],
        join: None,
        config: None,
        log_format: None,
        admin_listen: None,
        no_admin: false,
        accept_chain_loss: false,
    }
}

/// `kappakv sync --stdio`: the node opened offline, one session on standard input and output.
async fn sync_stdio(config: Config, live: bool) -> Result<ExitCode> {
    use kappakv_server::node::Node;
    use kappakv_server::node::replication::Replication;
    use kappakv_server::node::replication::driver::StreamMode;
    let node = match Node::open(config).await {
        Ok(node) => node,
        Err(e) => {
            let e = anyhow::Error::new(kappakv_server::server::ServeError::Start(e));
            eprintln!("kappakv: {}", one_line(&e));
            return Ok(ExitCode::from(exit::of_serve_error(&e)));
        }
    };
    let replication = Replication::detached(&node)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let mode = StreamMode {
        send: true,
        receive: true,
        live,
        report: false,
    };
    let result = tokio::select! {
        r = replication.serve_stream(tokio::io::stdin(), tokio::io::stdout(), mode, &cancel) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(replication);
    node.shutdown().await;
    match result {
        Ok(summary) => {
            eprintln!("sync: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("kappakv: sync failed: {}", one_line(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Whether log lines on standard error may carry colour codes: only on a terminal, and not when
/// `NO_COLOR` is set (a file or journald would keep the codes as text).
fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none()
}

/// The error and its causes on one line, each cause once: error types that name their cause in
/// their own message would otherwise print it again as the next link of the chain.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappakv: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let layered = match layered(&args) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("kappakv: {}", one_line(&e));
                    return Ok(ExitCode::from(exit::USAGE));
                }
            };
            init_tracing(layered.config.log_format);
            for name in &layered.unknown_env {
                tracing::warn!(
                    variable = %name,
                    "{name} names no setting and is ignored; `kappakv config show` lists them"
                );
            }
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if layered.config.runtime_threads > 0 {
                runtime.worker_threads(layered.config.runtime_threads);
            }
            let runtime = runtime.enable_all().build()?;
            if let Some(invite) = &args.join
                && let Err(e) = runtime.block_on(join_before_serving(&layered.config, invite))
            {
                eprintln!("kappakv: {}", one_line(&e));
                return Ok(ExitCode::from(exit::USAGE));
            }
            match runtime.block_on(serve(layered)) {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("kappakv: {}", one_line(&e));
                    Ok(ExitCode::from(exit::of_serve_error(&e)))
                }
            }
        }
        Command::Sync {
            data_dir,
            config,
            stdio: _,
            live,
        } => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config_with(&data_dir, config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let code = runtime.block_on(sync_stdio(config, live));
            // Without waiting for the read of standard input, which the other side of the pipe
            // closes only once this process has closed its output.
            runtime.shutdown_background();
            code
        }
        Command::Verify(arg) => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config(&arg)?;
            use kappakv_server::commands::verify;
            let result = progress::observed("verify", "bytes", |p| {
                verify::run_observed(&config.data_dir, p)
            });
            let summary = match result {
                Ok(summary) => summary,
                Err(e) => {
                    eprintln!("kappakv verify: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            println!("{summary}");
            let state = progress::observed("state", "entries", |p| {
                verify::check_state(&config.data_dir, p)
            });
            match state {
                Ok(state) => {
                    println!("{state}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("kappakv verify: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::RebuildIndexes {
            data_dir,
            index,
            config,
        } => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config_with(&data_dir, config)?;
            let summary =
                kappakv_server::commands::rebuild_indexes::run(&config, index.as_deref())?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            data_dir,
            out,
            since,
        } => {
            let config = data_dir_config(&data_dir)?;
            export(&config.data_dir, out.as_deref(), since.as_deref())
        }
        Command::Import {
            data_dir,
            config,
            files,
        } => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config_with(&data_dir, config)?;
            Ok(import(&config, &files))
        }
        Command::Backup { data_dir, out } => {
            let config = data_dir_config(&data_dir)?;
            let manifest = progress::observed("backup", "bytes", |p| {
                backup::run_observed(&config.data_dir, &out, p)
            })
            .with_context(|| format!("backing up {}", config.data_dir.display()))?;
            println!("{manifest}; written to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { data_dir, backup } => {
            let config = data_dir_config(&data_dir)?;
            let manifest = progress::observed("restore", "bytes", |p| {
                restore::run_observed(&backup, &config.data_dir, p)
            })
            .with_context(|| format!("restoring {}", backup.display()))?;
            println!(
                "restored {manifest} into {}; start the node on it to rebuild its indexes",
                config.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Id { data_dir, listen } => {
            let mut config = data_dir_config(&data_dir)?;
            if let Some(l) = listen {
                config.listen = l;
            }
            print_id(&config, listen.is_some())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "kappakv", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Show(args)) => {
            print!("{}", layered(&args)?.show());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn export(data_dir: &Path, out: Option<&Path>, since: Option<&Path>) -> Result<ExitCode> {
    use kappakv_server::commands::export;
    let since = since.map(export::read_version_vector).transpose()?;
    let summary = match out.filter(|p| p.as_os_str() != "-") {
        None => {
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            progress::observed("export", "entries", |p| {
                export::run_observed(data_dir, since.as_ref(), &mut stdout, "standard output", p)
            })?
        }
        Some(path) => {
            let to = path.display().to_string();
            let file = std::fs::File::create(path).with_context(|| format!("creating {to}"))?;
            let mut writer = std::io::BufWriter::new(file);
            let summary = progress::observed("export", "entries", |p| {
                export::run_observed(data_dir, since.as_ref(), &mut writer, &to, p)
            })?;
            writer
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("writing {to}"))?;
            summary
        }
    };
    eprintln!("kappakv export: {summary}");
    Ok(ExitCode::SUCCESS)
}

fn import(config: &Config, files: &[PathBuf]) -> ExitCode {
    let result = progress::observed("import", "bytes", |p| {
        kappakv_server::commands::import::run_observed(
            &config.data_dir,
            files,
            config.writer_ids(),
            p,
        )
    });
    match result {
        Ok(summary) => {
            println!("{summary}");
            for rejection in &summary.rejected {
                println!("rejected: {rejection}");
            }
            if summary.rejected.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("kappakv import: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_id(config: &Config, listen_given: bool) -> Result<()> {
    use kappakv_server::auth::Role;
    let dir: &Path = &config.data_dir;
    let keypair = kappakv_server::identity::load_or_create(dir)
        .with_context(|| format!("reading the identity in {}", dir.display()))?;
    let tokens = kappakv_server::auth::Tokens::load_or_create(dir)?;
    // What the node serves: the addresses of the ticket it wrote when it last started, whether
    // or not it runs now; `--listen`, or a node never started, gives the settings' addresses.
    let served = std::fs::read_to_string(dir.join(kappakv_server::auth::TICKET_FILE))
        .ok()
        .and_then(|t| t.parse::<kappakv_protocol::Ticket>().ok())
        .map(|t| t.addrs)
        .filter(|a| !listen_given && !a.is_empty());
    let addrs =
        served.unwrap_or_else(|| kappakv_server::net::advertised(config.listen, &config.advertise));
    let id = keypair.node_id();
    let list = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    println!("node id:           {id}");
    println!("addresses:         {list}");
    if let Some(first) = addrs.first() {
        println!("peer address:      {id}@{first}");
    }
    println!(
        "read-write ticket: {}",
        tokens.ticket(id, addrs.clone(), Role::ReadWrite)
    );
    println!(
        "read-only ticket:  {}",
        tokens.ticket(id, addrs, Role::ReadOnly)
    );
    Ok(())
}

/// Exit statuses of `kappakv serve` (see its `--help`).
mod exit {
    use kappakv_server::log::OpenLogError;
    use kappakv_server::node::StartError;
    use kappakv_server::server::ServeError;

    /// Failed while running.
    pub const RUNTIME: u8 = 1;
    /// Usage or configuration error (clap uses 2 for usage errors too).
    pub const USAGE: u8 = 2;
    /// The data dir is in use by another process, or its log or node key is damaged.
    pub const DATA_DIR: u8 = 3;
    /// Cannot listen on the QUIC or admin address.
    pub const LISTEN: u8 = 4;

    /// The exit status for an error that ended `serve`.
    pub fn of_serve_error(e: &anyhow::Error) -> u8 {
        for cause in e.chain() {
            if cause.is::<kappakv_server::admin::AdminError>() {
                return LISTEN;
            }
            if cause.is::<kappakv_server::config::ConfigError>() {
                return USAGE;
            }
            if let Some(e) = cause.downcast_ref::<ServeError>() {
                return match e {
                    ServeError::Endpoint(_) => LISTEN,
                    ServeError::Start(
                        StartError::Identity(_)
                        | StartError::Log(
                            OpenLogError::Locked { .. }
                            | OpenLogError::Corrupt { .. }
                            | OpenLogError::SegmentBase { .. },
                        ),
                    ) => DATA_DIR,
                    _ => RUNTIME,
                };
            }
        }
        RUNTIME
    }
}

/// `serve --join`: asks the node that made `invite` to take this one as a peer, then adds it
/// to this node's peers (`DATA_DIR/peers`). A node that has it as a peer already (a restart
/// with the same command line) starts as it is.
async fn join_before_serving(config: &Config, invite: &str) -> Result<()> {
    use kappakv_server::node::replication::peers::PeerList;
    let invite: kappakv_protocol::Invite = invite.parse().context("bad invite")?;
    let mut peers = PeerList::load(&config.data_dir, &[])?;
    if peers.get(&invite.node_id).is_some() {
        tracing::info!(peer = %invite.node_id, "--join: the inviting node is a peer already");
        return Ok(());
    }
    anyhow::ensure!(
        config.listen.port() != 0 || !config.advertise.is_empty(),
        "--join needs a fixed --listen port (or --advertise HOST:PORT): the inviting node dials \
         this one back there"
    );
    // A new node's key is written only once the join was taken: a refused join writes nothing.
    let identity = kappakv_server::identity::load_or_generate(&config.data_dir)
        .with_context(|| format!("reading the identity in {}", config.data_dir.display()))?;
    let keypair = match &identity {
        Ok(keypair) => keypair.clone(),
        Err(new) => new.keypair(),
    };
    let own = kappakv_server::net::advertised(config.listen, &config.advertise)
        .iter()
        .map(ToString::to_string)
        .collect();
    let (peer, addr) = kappakv_server::commands::join::join(&keypair, own, &invite).await?;
    if let Err(new) = identity {
        new.save(&config.data_dir)?;
    }
    peers.add(peer, addr.clone(), kappakv_protocol::PeerOrigin::Joined)?;
    tracing::info!(%peer, %addr, "joined: the inviting node is a peer now");
    Ok(())
}

async fn serve(layered: Layered) -> Result<ExitCode> {
    use kappakv_server::admin::AdminListener;
    use kappakv_server::systemd::notify_logged;
    let config = layered.config;
    let health = kappakv_server::health::Health::new();
    let admin_cancel = tokio_util::sync::CancellationToken::new();
    let mut admin_task = None;
    if let Some(addr) = config.admin_addr() {
        match AdminListener::bind(addr).await {
            Ok(listener) => {
                let metrics = install_metrics()?;
                tracing::info!(addr = %listener.local_addr()?, "admin HTTP: /metrics /healthz /readyz");
                admin_task = Some(tokio::spawn(listener.serve(
                    health.clone(),
                    Some(metrics),
                    config.ready_lag_entries_max,
                    admin_cancel.clone(),
                )));
            }
            // The built-in address may be taken by another node on this machine; an address
            // the operator chose must work.
            Err(e)
                if layered.sources.get("admin_listen")
                    == Some(&kappakv_server::config::Source::Default) =>
            {
                tracing::warn!(error = %e, "serving without the admin listener; set --admin-listen to choose another address, or `off`");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let data_dir = config.data_dir.clone();
    let server = Server::start_observed(config, health)
        .await
        .context("starting the node")?;
    tracing::info!(
        node_id = %server.node_id(),
        addr = %server.addr(),
        data_dir = %data_dir.display(),
        "kappakv is serving"
    );
    eprintln!(
        "kappakv {} serving on {}\n  node id: {}\n  data:    {}\n  connect: run `kappactl put k v` in this folder, or pass --ticket \"$(cat {})\"",
        env!("CARGO_PKG_VERSION"),
        server.addr(),
        server.node_id(),
        data_dir.display(),
        data_dir.join("client.ticket").display(),
    );
    notify_logged(&format!(
        "READY=1\nSTATUS=serving on {}\nMAINPID={}",
        server.addr(),
        std::process::id()
    ));
    shutdown_signal().await;
    notify_logged("STOPPING=1\nSTATUS=shutting down");
    let failed = server.node().writer.is_stopped();
    server.shutdown().await;
    admin_cancel.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    if failed {
        eprintln!(
            "kappakv: the log writer had stopped after a failed write; check the disk, then restart"
        );
        return Ok(ExitCode::from(exit::RUNTIME));
    }
    Ok(ExitCode::SUCCESS)
}

/// Installs the Prometheus recorder that `/metrics` renders: histograms with real buckets.
fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    use kappakv_server::telemetry;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            telemetry::SECONDS_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::GROUP_COMMIT_ENTRIES.into()),
            telemetry::ENTRIES_BUCKETS,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    telemetry::describe();
    Ok(handle)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
