//! Server configuration: one struct, layered as defaults < TOML file < `KAPPAKV_*` environment <
//! command-line flags, checked by [`Config::validate`] before anything starts. Every setting
//! remembers where its value came from, for `kappakv config show`.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Built in.
    Default,
    /// The TOML file given with `--config`.
    File,
    /// A `KAPPAKV_*` environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Flag => "flag",
        })
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Whether a node looks for peers by itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// Only the peers it is given or that join it.
    #[default]
    Off,
    /// Also the nodes on the local network that share its `swarm` secret (`net::discovery`).
    Local,
}

/// How a node with an empty log and peers gets its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMode {
    /// From the first peer on its list that answers, a snapshot of its key/value state:
    /// reads are answered from it at once, and it is verified when the node's own replay of
    /// the log reaches the snapshot's point.
    Snapshot,
    /// Replay the log from the start before answering reads.
    Replay,
}

/// Every setting of a node. Field names are the TOML keys; the environment variable of `foo_bar`
/// is `KAPPAKV_FOO_BAR`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The data directory: log, identity, indexes, tokens, ticket.
    pub data_dir: PathBuf,
    /// The QUIC address to listen on. Loopback by default: exposing a node is a deliberate choice.
    pub listen: SocketAddr,
    /// The addresses others should dial, `HOST:PORT` (DNS names or IP addresses), written into
    /// tickets and the peer address. Empty: the listen address, or for a wildcard one the
    /// machine's interface addresses, loopback last.
    pub advertise: Vec<String>,
    /// Peers to replicate with, `NODEID@HOST:PORT`.
    pub peers: Vec<String>,
    /// When not empty, only entries written by these node ids are accepted from peers.
    pub writers: Vec<String>,
    /// Write under this node's id even while its log may lack entries of its own chain that
    /// peers hold (after `kappakv restore` of an older backup, or a lost log): new local
    /// entries then take seqs peers already hold, and every peer refuses them, and every later
    /// one, as equivocations. Without it the node holds local writes until a peer has
    /// confirmed, or sent back, its own chain.
    pub accept_chain_loss: bool,
    /// How a new node with peers gets its state: `snapshot` answers reads within about a
    /// second from a peer's snapshot of its key/value state and verifies it by replaying the
    /// log behind it (writes wait until then); `replay` answers nothing before its own replay.
    pub bootstrap: BootstrapMode,
    /// `local`: announce this node on the local network (UDP multicast, IPv4) to the nodes that
    /// share `swarm`, and replicate with those it hears; they are listed as `discovered` and
    /// dropped when they stay gone. `off` by default.
    pub discovery: DiscoveryMode,
    /// The secret shared by the nodes that should find each other with `discovery = "local"`:
    /// at least 32 random hex digits (`openssl rand -hex 16`). Announcements are encrypted and
    /// authenticated with it: a node without it learns nothing from them. Never shown by
    /// `config show`.
    pub swarm: String,
    /// How often a node with `discovery = "local"` announces itself; a discovered peer not
    /// heard for 15 times this long, and not connected, is dropped.
    pub discovery_interval_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// Most simultaneous QUIC connections; more are refused, once none is left that has not
    /// authenticated to make room. A node serves a few peers and its applications, each of
    /// which needs one connection for all its requests. One connection can make the node hold
    /// about 1 MiB at the defaults (its QUIC state, receive and send windows and a full set of
    /// streams), so 256 of them keep what clients can make a node hold, with its own memory,
    /// under 512 MiB: `net::endpoint::memory_bound` has the arithmetic.
    pub max_connections: usize,
    /// Threads of the async runtime that serves QUIC and the requests; 0, the default, runs one
    /// per core. The writer and the indexer have a thread each besides. On a machine whose
    /// cores other busy processes share (a load generator, the application itself), fewer
    /// threads than cores keep the tail latency down: every runnable thread beyond the cores
    /// waits for a time slice of a few milliseconds.
    pub runtime_threads: usize,
    /// Most concurrent streams (requests) per connection, fed to QUIC flow control: a client
    /// with more requests in flight waits for one to be answered before it sends the next. 64
    /// requests in flight on one connection are served as fast as on eight; a client that needs
    /// many more at once opens more connections.
    pub max_streams_per_connection: u32,
    /// Most requests being served at once across all connections; beyond it the node answers
    /// `Busy` at once instead of queueing. A node's put throughput grows with the requests in
    /// flight (its group commits grow) until about 512 of them; past that a request only waits
    /// longer (a median of 16-25 ms at 512 on two cores, 34-47 ms at 1,024, 76 ms at 2,048,
    /// for no more puts per second), so it is answered `Busy` instead.
    pub max_concurrent_requests: usize,
    /// Most blocking index reads at once.
    pub max_concurrent_reads: usize,
    /// A request that has not been answered in this time gets `Timeout`.
    pub request_timeout_ms: u64,
    /// A connection idle for this long is closed.
    pub idle_timeout_ms: u64,
    /// Capacity of the writer's queue, in write requests.
    pub writer_queue_capacity: usize,
    /// Most entries in one group commit.
    pub batch_entries_max: usize,
    /// Most bytes in one group commit.
    pub batch_bytes_max: usize,
    /// A new segment is started once the current one is over this size.
    pub segment_bytes_max: u64,
    /// Most entries the indexer applies in one redb transaction (and at most about 32 MiB of
    /// entries in memory). Larger transactions catch up faster: each commit copies every page it
    /// touches.
    pub index_batch_entries_max: usize,
    /// Memory for the index database's page cache.
    pub index_cache_bytes: usize,
    /// How often the indexer makes its checkpoint durable.
    pub index_durable_interval_ms: u64,
    /// While no read waits for the views, how long new entries may gather before the indexer
    /// applies them in one transaction; 0 applies every group commit at once.
    pub index_linger_ms: u64,
    /// Most watches open at once; each holds a log file open, so this must stay well below the
    /// process's file descriptor limit.
    pub max_watches: usize,
    /// A watcher further behind the log than this many entries is ended with `SlowConsumer`.
    pub watch_lag_entries_max: u64,
    /// How often an idle watch gets a heartbeat.
    pub watch_heartbeat_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// The admin HTTP address (`/metrics`, `/healthz`, `/readyz`), or `off`. Loopback by
    /// default: it has no authentication.
    pub admin_listen: String,
    /// `/readyz` answers 200 while the views are at most this many entries behind the log.
    pub ready_lag_entries_max: u64,
    /// Bytes kept free on the data dir's file system: a group commit that would leave less is
    /// refused like one on a full disk (`Unavailable`, "the disk is full"), and writes resume
    /// once there is room again. The room is for what the node writes besides the log (the
    /// views' checkpoints, a clean shutdown), since the index database stops for good (until
    /// a restart) on a failed write. On top of it the node keeps room for what the views will
    /// write before their next checkpoint: four bytes for each byte of log they applied since
    /// their last one or have yet to apply, so near a full disk writes go no faster than the
    /// views. Raise it for declared indexes over large values; 0 turns the check off.
    pub disk_reserve_bytes: u64,
    /// Declared secondary indexes, one `[[index]]` table each. Changing, adding or removing one
    /// rebuilds or drops that index at the next start, in the background.
    pub index: Vec<kappakv_indexes::IndexDef>,
}

impl Config {
    /// The `writers` allow-list as node ids, `None` when it is empty (every author is taken).
    /// [`validate`](Self::validate) checks every entry parses.
    pub fn writer_ids(&self) -> Option<std::collections::HashSet<kappakv_protocol::NodeId>> {
        (!self.writers.is_empty())
            .then(|| self.writers.iter().filter_map(|w| w.parse().ok()).collect())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kappakv.data"),
            listen: SocketAddr::from(([127, 0, 0, 1], kappakv_protocol::DEFAULT_PORT)),
            advertise: Vec::new(),
            peers: Vec::new(),
            writers: Vec::new(),
            accept_chain_loss: false,
            bootstrap: BootstrapMode::Snapshot,
            discovery: DiscoveryMode::Off,
            swarm: String::new(),
            discovery_interval_ms: 2_000,
            log_format: LogFormat::Text,
            max_connections: 256,
            runtime_threads: 0,
            max_streams_per_connection: 64,
            max_concurrent_requests: 512,
            max_concurrent_reads: 64,
            request_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            writer_queue_capacity: 8192,
            batch_entries_max: 4096,
            batch_bytes_max: 16 * 1024 * 1024,
            segment_bytes_max: 128 * 1024 * 1024,
            index_batch_entries_max: 100_000,
            index_cache_bytes: kappakv_indexes::DEFAULT_CACHE_BYTES,
            index_durable_interval_ms: 2_000,
            index_linger_ms: 50,
            max_watches: 512,
            watch_lag_entries_max: 1_000_000,
            watch_heartbeat_ms: 5_000,
            shutdown_grace_ms: 5_000,
            admin_listen: DEFAULT_ADMIN_LISTEN.to_string(),
            ready_lag_entries_max: 10_000,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE_BYTES,
            index: Vec::new(),
        }
    }
}

/// Default of [`Config::disk_reserve_bytes`]: 64 MiB, under 1% of the 8 GB cards small edge
/// boxes run from, and room for several checkpoints of the views beyond the room kept for
/// their lag.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// Default of [`Config::admin_listen`].
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7701";

/// The value of [`Config::admin_listen`] that turns the admin listener off.
pub const ADMIN_OFF: &str = "off";

/// A configuration that cannot be used; names the setting, the value and what is allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a setting has the wrong type or an unknown name.
    #[error("config: {0}")]
    Parse(String),
    /// A secondary index definition that cannot be used.
    #[error("config: [[index]]: {0}")]
    Index(String),
    /// A value outside what is allowed.
    #[error("config: {setting} = {value} is invalid: {allowed}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
}

/// A configuration together with where each setting came from.
#[derive(Clone, Debug)]
pub struct Layered {
    /// The effective configuration.
    pub config: Config,
    /// Setting name → source of its value.
    pub sources: BTreeMap<String, Source>,
    /// `KAPPAKV_*` variables of the environment that name no setting (a misspelt one, say):
    /// ignored, and worth a warning.
    pub unknown_env: Vec<String>,
}

/// `KAPPAKV_*` variables that are not node settings: `kappactl`'s, read by it alone.
const NOT_SETTINGS: &[&str] = &["KAPPAKV_TICKET"];

impl Layered {
    /// Builds the effective configuration: defaults, then `file` if given, then every
    /// `KAPPAKV_<SETTING>` in `env`, then `flags` (setting → TOML value).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: Vec<(&'static str, toml::Value)>,
    ) -> Result<Self, ConfigError> {
        let toml::Value::Table(mut table) = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?
        else {
            unreachable!("a struct serializes to a table")
        };
        let mut sources: BTreeMap<String, Source> =
            table.keys().map(|k| (k.clone(), Source::Default)).collect();
        let mut unknown_env = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let file_table: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
            for (k, v) in file_table {
                sources.insert(k.clone(), Source::File);
                table.insert(k, v);
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("KAPPAKV_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some(default) = table.get(&key) else {
                if !NOT_SETTINGS.contains(&name.as_str()) {
                    unknown_env.push(name);
                }
                continue;
            };
            let value = env_value(default, &raw);
            sources.insert(key.clone(), Source::Env);
            table.insert(key, value);
        }
        for (k, v) in flags {
            sources.insert(k.to_string(), Source::Flag);
            table.insert(k.to_string(), v);
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_string()))?;
        config.validate()?;
        unknown_env.sort();
        Ok(Self {
            config,
            sources,
            unknown_env,
        })
    }

    /// Every setting as `name = value  # source`, in TOML syntax.
    pub fn show(&self) -> String {
        let toml::Value::Table(table) = toml::Value::try_from(&self.config)
            .unwrap_or_else(|_| toml::Value::Table(toml::Table::new()))
        else {
            return String::new();
        };
        let mut out = String::new();
        for (k, v) in table {
            let source = self.sources.get(&k).copied().unwrap_or(Source::Default);
            let v = match v {
                toml::Value::String(secret) if k == "swarm" && !secret.is_empty() => {
                    toml::Value::String("(hidden)".into())
                }
                v => v,
            };
            let _ = writeln!(out, "{k} = {v}  # {source}");
        }
        out
    }
}

/// Reads an environment value as the type of the setting's default: lists are comma-separated.
fn env_value(default: &toml::Value, raw: &str) -> toml::Value {
    match default {
        toml::Value::Integer(_) => raw
            .trim()
            .parse()
            .map_or_else(|_| toml::Value::String(raw.into()), toml::Value::Integer),
        toml::Value::Boolean(_) => raw
            .trim()
            .parse()
            .map_or_else(|_| toml::Value::String(raw.into()), toml::Value::Boolean),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    }
}

impl Config {
    /// Refuses settings outside what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn at_least(
            setting: &'static str,
            value: u64,
            min: u64,
            allowed: &'static str,
        ) -> Result<(), ConfigError> {
            if value < min {
                return Err(ConfigError::Invalid {
                    setting,
                    value: value.to_string(),
                    allowed,
                });
            }
            Ok(())
        }
        at_least(
            "max_connections",
            self.max_connections as u64,
            1,
            "at least 1",
        )?;
        at_least(
            "max_streams_per_connection",
            self.max_streams_per_connection.into(),
            1,
            "at least 1",
        )?;
        at_least(
            "max_concurrent_requests",
            self.max_concurrent_requests as u64,
            1,
            "at least 1",
        )?;
        at_least(
            "max_concurrent_reads",
            self.max_concurrent_reads as u64,
            1,
            "at least 1",
        )?;
        at_least("max_watches", self.max_watches as u64, 1, "at least 1")?;
        at_least(
            "request_timeout_ms",
            self.request_timeout_ms,
            1,
            "at least 1 ms",
        )?;
        at_least(
            "idle_timeout_ms",
            self.idle_timeout_ms,
            100,
            "at least 100 ms",
        )?;
        at_least(
            "writer_queue_capacity",
            self.writer_queue_capacity as u64,
            1,
            "at least 1",
        )?;
        at_least(
            "batch_entries_max",
            self.batch_entries_max as u64,
            1,
            "at least 1",
        )?;
        at_least(
            "batch_bytes_max",
            self.batch_bytes_max as u64,
            kappakv_protocol::limits::MAX_RECORD_BYTES as u64,
            "at least the largest record (4 MiB + 128)",
        )?;
        at_least(
            "segment_bytes_max",
            self.segment_bytes_max,
            4096,
            "at least 4096",
        )?;
        at_least(
            "index_cache_bytes",
            self.index_cache_bytes as u64,
            1024 * 1024,
            "at least 1 MiB",
        )?;
        at_least(
            "index_batch_entries_max",
            self.index_batch_entries_max as u64,
            1,
            "at least 1",
        )?;
        at_least(
            "index_durable_interval_ms",
            self.index_durable_interval_ms,
            10,
            "at least 10 ms",
        )?;
        at_least(
            "watch_heartbeat_ms",
            self.watch_heartbeat_ms,
            10,
            "at least 10 ms",
        )?;
        at_least(
            "discovery_interval_ms",
            self.discovery_interval_ms,
            10,
            "at least 10 ms",
        )?;
        let random_enough =
            self.swarm.len() >= 32 && self.swarm.bytes().all(|b| b.is_ascii_hexdigit());
        if self.discovery == DiscoveryMode::Local && !random_enough {
            return Err(ConfigError::Invalid {
                setting: "swarm",
                value: "(hidden)".into(),
                allowed: "with discovery = \"local\", at least 32 random hex digits shared by the \
                          nodes that should find each other (`openssl rand -hex 16` makes them): \
                          one recorded announcement lets anyone test guesses of it",
            });
        }
        if self.admin_listen != ADMIN_OFF && self.admin_listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                setting: "admin_listen",
                value: self.admin_listen.clone(),
                allowed: "IP:PORT (such as 127.0.0.1:7701) or `off`",
            });
        }
        for a in &self.advertise {
            if a.parse::<kappakv_protocol::NodeAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    setting: "advertise",
                    value: a.clone(),
                    allowed: "HOST:PORT, a DNS name or an IP address (IPv6 in brackets)",
                });
            }
        }
        for p in &self.peers {
            if crate::net::peer_spec(p).is_none() {
                return Err(ConfigError::Invalid {
                    setting: "peers",
                    value: p.clone(),
                    allowed: "NODEID@HOST:PORT with a 64-hex-digit node id",
                });
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for def in &self.index {
            if let Err(e) = def.validate() {
                return Err(ConfigError::Index(e.to_string()));
            }
            if !names.insert(def.name.as_str()) {
                return Err(ConfigError::Index(format!(
                    "two indexes are named {:?}; index names must be unique",
                    def.name
                )));
            }
        }
        for w in &self.writers {
            if w.parse::<kappakv_protocol::NodeId>().is_err() {
                return Err(ConfigError::Invalid {
                    setting: "writers",
                    value: w.clone(),
                    allowed: "64-hex-digit node ids",
                });
            }
        }
        Ok(())
    }

    /// The admin HTTP address, unless the admin listener is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listen.parse().ok()
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_record_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nmax_connections = 10\n").unwrap();
        let env = vec![
            ("KAPPAKV_MAX_CONNECTIONS".to_string(), "20".to_string()),
            ("KAPPAKV_PEERS".to_string(), String::new()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let flags = vec![("data_dir", toml::Value::String("/tmp/x".into()))];
        let l = Layered::load(Some(&file), env, flags).unwrap();
        assert_eq!(l.config.listen.port(), 9000);
        assert_eq!(l.config.max_connections, 20);
        assert_eq!(l.config.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(l.sources["listen"], Source::File);
        assert_eq!(l.sources["max_connections"], Source::Env);
        assert_eq!(l.sources["data_dir"], Source::Flag);
        assert_eq!(l.sources["idle_timeout_ms"], Source::Default);
        assert!(l.show().contains("max_connections = 20  # env"));
    }

    #[test]
    fn invalid_settings_name_setting_value_and_rule() {
        let env = vec![("KAPPAKV_MAX_CONNECTIONS".to_string(), "0".to_string())];
        let err = Layered::load(None, env, vec![]).unwrap_err().to_string();
        assert!(
            err.contains("max_connections = 0") && err.contains("at least 1"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "no_such_setting = 1\n").unwrap();
        let err = Layered::load(Some(&file), vec![], vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such_setting"), "{err}");
        let env = vec![("KAPPAKV_ADMIN_LISTEN".to_string(), "localhost".to_string())];
        let err = Layered::load(None, env, vec![]).unwrap_err().to_string();
        assert!(
            err.contains("admin_listen = localhost") && err.contains("`off`"),
            "{err}"
        );
    }

    #[test]
    fn indexes_are_declared_as_index_tables() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "[[index]]\nname = \"posts_by_tag\"\nprefix = \"posts/\"\nfield = \"tags\"\nkind = \"multi\"\n\n\
             [[index]]\nname = \"by_date\"\nprefix = \"posts/\"\nfields = [\"meta.date\"]\nkind = \"range\"\ndescending = true\n",
        )
        .unwrap();
        let l = Layered::load(Some(&file), vec![], vec![]).unwrap();
        assert_eq!(l.config.index.len(), 2);
        assert_eq!(l.config.index[0].fields, ["tags"]);
        assert_eq!(
            l.config.index[1].kind,
            kappakv_indexes::IndexKind::Range { descending: true }
        );
        assert!(l.show().contains("posts_by_tag"), "{}", l.show());

        for (text, needle) in [
            (
                "[[index]]\nname = \"a\"\nprefix = \"\"\nfield = \"x\"\nkind = \"fuzzy\"\n",
                "fuzzy",
            ),
            (
                "[[index]]\nname = \"a\"\nprefix = \"\"\nkind = \"exact\"\n",
                "fields",
            ),
            (
                "[[index]]\nname = \"a\"\nprefix = \"\"\nfield = \"x\"\nkind = \"exact\"\n\
                 [[index]]\nname = \"a\"\nprefix = \"\"\nfield = \"y\"\nkind = \"exact\"\n",
                "unique",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = Layered::load(Some(&file), vec![], vec![])
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn admin_listener_defaults_to_loopback_and_turns_off() {
        let l = Layered::load(None, vec![], vec![]).unwrap();
        assert_eq!(
            l.config.admin_addr(),
            Some("127.0.0.1:7701".parse().unwrap())
        );
        let env = vec![("KAPPAKV_ADMIN_LISTEN".to_string(), "off".to_string())];
        let l = Layered::load(None, env, vec![]).unwrap();
        assert_eq!(l.config.admin_addr(), None);
        assert!(
            l.show().contains("admin_listen = \"off\"  # env"),
            "{}",
            l.show()
        );
    }

    #[test]
    fn a_kappakv_variable_that_names_no_setting_is_reported() {
        let env = vec![
            ("KAPPAKV_MAX_CONECTIONS".to_string(), "20".to_string()),
            ("KAPPAKV_TICKET".to_string(), "kappactl's".to_string()),
            ("KAPPAKV_MAX_CONNECTIONS".to_string(), "20".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let layered = Layered::load(None, env, vec![]).unwrap();
        assert_eq!(
            layered.unknown_env,
            vec!["KAPPAKV_MAX_CONECTIONS".to_string()]
        );
        assert_eq!(layered.config.max_connections, 20);
    }

    #[test]
    fn local_discovery_needs_a_swarm_secret_that_config_show_hides() {
        let env = |secret: &str| {
            vec![
                ("KAPPAKV_DISCOVERY".to_string(), "local".to_string()),
                ("KAPPAKV_SWARM".to_string(), secret.to_string()),
            ]
        };
        let err = Layered::load(None, env("short"), vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("swarm") && !err.contains("short"), "{err}");
        let passphrase = Layered::load(None, env("a passphrase of the swarm, long enough"), vec![]);
        assert!(passphrase.is_err(), "a passphrase is not random hex");
        let l = Layered::load(None, env("00112233445566778899aabbccddeeff"), vec![]).unwrap();
        assert_eq!(l.config.discovery, DiscoveryMode::Local);
        let shown = l.show();
        assert!(shown.contains("swarm = \"(hidden)\"  # env"), "{shown}");
        assert!(!shown.contains("8899aabb"), "{shown}");
    }
}
