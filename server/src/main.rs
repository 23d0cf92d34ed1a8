//! `kappakv`: the server binary and its offline commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
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
    /// A peer to replicate with, NODEID@HOST:PORT (repeatable) [env KAPPAKV_PEERS, comma-separated]
    #[arg(long = "peer", value_name = "NODEID@ADDR")]
    peers: Vec<String>,
    /// A TOML file of settings; see `kappakv config show` for every setting
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format [default: text; env KAPPAKV_LOG_FORMAT]
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the node: opens or creates the data dir and serves QUIC. Stop with Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// Checks the log offline: every CRC, signature and per-author chain. Exits 1 at the first
    /// problem, naming the segment and offset.
    Verify(DataDirArg),
    /// Regenerates the indexes from the log, offline. Safe to interrupt: a later start resumes.
    RebuildIndexes {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Rebuild only this view (default: all)
        #[arg(long, value_name = "NAME")]
        index: Option<String>,
    },
    /// Writes log entries, in the log's record format, for `kappakv import` on another node.
    ///
    /// Works while the node is running (it only reads). Each author's chain ends at a signed
    /// entry: a batch being written at that moment is left out. Prints a summary on standard
    /// error.
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
        /// Export files; `-` reads standard input
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
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
    Ok(Layered::load(
        args.config.as_deref(),
        std::env::vars(),
        flags,
    )?)
}

fn data_dir_config(arg: &DataDirArg) -> Result<Config> {
    let args = ServeArgs {
        data_dir: arg.clone(),
        listen: None,
        peers: vec![],
        config: None,
        log_format: None,
    };
    Ok(layered(&args)?.config)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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
            let layered = layered(&args)?;
            init_tracing(layered.config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(layered.config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(arg) => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config(&arg)?;
            match kappakv_server::commands::verify::run(&config.data_dir) {
                Ok(summary) => {
                    println!("{summary}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("kappakv verify: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::RebuildIndexes { data_dir, index } => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config(&data_dir)?;
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
        Command::Import { data_dir, files } => {
            init_tracing(LogFormat::Text);
            let config = data_dir_config(&data_dir)?;
            Ok(import(&config.data_dir, &files))
        }
        Command::Id { data_dir, listen } => {
            let mut config = data_dir_config(&data_dir)?;
            if let Some(l) = listen {
                config.listen = l;
            }
            print_id(&config)?;
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
            export::run(data_dir, since.as_ref(), &mut stdout, "standard output")?
        }
        Some(path) => {
            let to = path.display().to_string();
            let file = std::fs::File::create(path).with_context(|| format!("creating {to}"))?;
            let mut writer = std::io::BufWriter::new(file);
            let summary = export::run(data_dir, since.as_ref(), &mut writer, &to)?;
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

fn import(data_dir: &Path, files: &[PathBuf]) -> ExitCode {
    match kappakv_server::commands::import::run(data_dir, files) {
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

fn print_id(config: &Config) -> Result<()> {
    let dir: &Path = &config.data_dir;
    let keypair = kappakv_server::identity::load_or_create(dir)
        .with_context(|| format!("reading the identity in {}", dir.display()))?;
    let tokens = kappakv_server::auth::Tokens::load_or_create(dir)?;
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let id = keypair.node_id();
    println!("node id:          {id}");
    println!("peer address:     {id}@{addr}");
    println!(
        "read-write ticket: {}",
        tokens.ticket(id, vec![addr], kappakv_server::auth::Role::ReadWrite)
    );
    println!(
        "read-only ticket:  {}",
        tokens.ticket(id, vec![addr], kappakv_server::auth::Role::ReadOnly)
    );
    Ok(())
}

async fn serve(config: Config) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let server = Server::start(config).await.context("starting the node")?;
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
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
