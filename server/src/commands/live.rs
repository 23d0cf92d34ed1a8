//! Where `kappakv export` and `kappakv backup` may cut the log of a data dir that a node may be
//! serving: only at or before what that node has acknowledged as durable.
//!
//! The bytes at the end of a served log are not all durable. The writer appends a batch with
//! one write, then one `fdatasync`, and acknowledges it only after the sync; on a full disk it
//! cuts a written batch back out of the segment and later gives its LSNs and seqs to other
//! entries. A command that took every whole record it finds could carry entries the node never
//! acknowledged, or that the node replaces with different entries under the same (author, seq):
//! a copy that equivocates with the node itself.
//!
//! [`bound`] decides, by the log's lock (`log/LOCK`, see [`LogLock`]):
//! - **Free**: no process appends. The command holds the lock (a node started meanwhile reports
//!   its data dir in use), and the last segment is synced first: a process that died may have
//!   left written but unsynced records, which the next start keeps and a crash of the machine
//!   could still lose. Everything whole is then as durable as it will ever be.
//! - **Held**: a node serves it (or `kappakv import` runs). The command asks the node, over its
//!   client protocol, with the ticket it wrote to `DATA_DIR/client.ticket` at start, for its
//!   status: `log_lsn` there is the writer's durable LSN, published after each batch's
//!   `fdatasync` and never moved back. Every record up to it is durable and is never rewritten.
//!   A node that cannot be reached is an error: the command never falls back to cutting at the
//!   last record on disk.
//!
//! The query runs on a thread of its own with a current-thread runtime, so the commands stay
//! plain synchronous code that can be called from anywhere, async tests included.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kappakv_protocol::frame::{
    FRAME_HEADER_LEN, FrameDecode, decode_body, decode_frame, encode_frame,
};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{
    ALPN_CLIENT, ErrorCode, Lsn, NodeAddr, NodeId, Request, Response, Status, Ticket,
};

use crate::log::OpenLogError;
use crate::log::file::{FsLogDir, LogDir, OpenMode};
use crate::log::segment::{segment_bases, segment_name};
use crate::log::store::LogLock;

/// How long asking the node may take in all: dialling, the handshake, hello and status.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Status requests sent on one connection while the node answers with a retryable error
/// (`Busy` under load).
const STATUS_ATTEMPTS_MAX: u32 = 4;
/// Wait before a retried status request, doubled after each.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

const _: () = assert!(
    RETRY_BACKOFF.as_millis() * ((1 << STATUS_ATTEMPTS_MAX) - 1) < ASK_TIMEOUT.as_millis(),
    "the retries fit in the time allowed for asking"
);

/// How far a command may read the log of a data dir.
#[derive(Debug)]
pub enum Bound {
    /// No process appends to the log: every whole record may be read. The command holds the
    /// log's lock for as long as it keeps this.
    Stopped {
        /// The lock; dropping the bound releases it.
        lock: LogLock,
    },
    /// A node serves the data dir: only records up to `durable_lsn` may be read.
    Serving {
        /// The node, the data dir's own.
        node_id: NodeId,
        /// The LSN of the last record the node has made durable.
        durable_lsn: Lsn,
    },
}

impl Bound {
    /// The highest LSN that may be read, when a node serves the log; `None` means any whole
    /// record.
    pub fn durable_lsn(&self) -> Option<Lsn> {
        match self {
            Bound::Stopped { .. } => None,
            Bound::Serving { durable_lsn, .. } => Some(*durable_lsn),
        }
    }

    /// Checks that the log holds the node's durable LSN: `on_disk` is how far it reaches.
    pub fn check_on_disk(&self, log_dir: &Path, on_disk: Lsn) -> Result<(), BoundError> {
        match self {
            Bound::Serving {
                node_id,
                durable_lsn,
            } if *durable_lsn > on_disk => Err(BoundError::Ahead {
                node_id: *node_id,
                durable_lsn: *durable_lsn,
                log_dir: log_dir.to_path_buf(),
                on_disk,
            }),
            _ => Ok(()),
        }
    }
}

/// Where the log may be cut could not be found out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoundError {
    /// The log's lock file cannot be opened or locked.
    #[error(transparent)]
    Lock(OpenLogError),
    /// Syncing the last segment of a log nobody appends to.
    #[error("syncing {path}: {source}")]
    Sync {
        /// The segment.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log is locked and there is no ticket to reach the node with.
    #[error(
        "the log in {data_dir} is in use by another process, and {path} cannot be read ({source}): \
         next to a running node, only what it has made durable is taken, and it is asked through \
         the ticket `kappakv serve` writes there (is it serving, or is `kappakv import` running?)"
    )]
    NoTicket {
        /// The data dir.
        data_dir: PathBuf,
        /// The ticket file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The ticket file does not hold a ticket.
    #[error("{path}: {source}")]
    BadTicket {
        /// The ticket file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: kappakv_protocol::TicketError,
    },
    /// The data dir's node key cannot be read.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The ticket names another node than the data dir's.
    #[error(
        "{path} is a ticket for node {ticket}, but the data dir belongs to node {own}; start the node on it to rewrite it"
    )]
    OtherNode {
        /// The ticket file.
        path: PathBuf,
        /// The node it names.
        ticket: NodeId,
        /// The data dir's node.
        own: NodeId,
    },
    /// No address of the ticket answered.
    #[error(
        "the log in {data_dir} is in use by another process, but its node did not answer at {addrs}: {reason}; \
         next to a running node, only what it has made durable is taken, so it must answer \
         (is `kappakv serve` up and serving, or is `kappakv import` running?)"
    )]
    Unreachable {
        /// The data dir.
        data_dir: PathBuf,
        /// The addresses tried, comma-separated.
        addrs: String,
        /// The last failure.
        reason: String,
    },
    /// The node answered the hello or the status request with an error.
    #[error("node {node_id} at {addr} refused the status request ({code:?}): {message}")]
    Refused {
        /// The node.
        node_id: NodeId,
        /// Where.
        addr: SocketAddr,
        /// The wire error.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The node reports more durable records than the log holds: the ticket's node serves
    /// another copy of this data dir.
    #[error(
        "node {node_id} reports its log durable through LSN {durable_lsn}, but {log_dir} holds {on_disk} records: \
         is the node serving another copy of this data dir?"
    )]
    Ahead {
        /// The node.
        node_id: NodeId,
        /// What it reported.
        durable_lsn: Lsn,
        /// The log directory read.
        log_dir: PathBuf,
        /// The records found there.
        on_disk: Lsn,
    },
}

/// How far the log of `data_dir` may be read: by its lock, then by asking its node (see the
/// module docs). The log directory must exist.
pub fn bound(data_dir: &Path) -> Result<Bound, BoundError> {
    let log_dir = crate::log::log_dir(data_dir);
    match LogLock::try_take(&log_dir).map_err(BoundError::Lock)? {
        Some(lock) => {
            sync_last_segment(&log_dir)?;
            Ok(Bound::Stopped { lock })
        }
        None => ask_node(data_dir),
    }
}

/// Syncs the last segment of a log nobody appends to. Only the last one can hold unsynced
/// bytes: a segment is started only after every batch before it is synced.
fn sync_last_segment(log_dir: &Path) -> Result<(), BoundError> {
    let dir = FsLogDir::new(log_dir);
    let sync_err = |path: PathBuf| move |source| BoundError::Sync { path, source };
    let names = dir.list().map_err(sync_err(log_dir.to_path_buf()))?;
    let Some(&base) = segment_bases(&names).last() else {
        return Ok(());
    };
    let name = segment_name(base);
    let path = log_dir.join(&name);
    dir.open(&name, OpenMode::Read)
        .and_then(|mut file| file.sync_data())
        .map_err(sync_err(path))
}

/// Asks the node serving `data_dir` for its durable LSN, through `DATA_DIR/client.ticket`.
fn ask_node(data_dir: &Path) -> Result<Bound, BoundError> {
    let path = data_dir.join(crate::auth::TICKET_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| BoundError::NoTicket {
        data_dir: data_dir.to_path_buf(),
        path: path.clone(),
        source,
    })?;
    let ticket: Ticket = text.parse().map_err(|source| BoundError::BadTicket {
        path: path.clone(),
        source,
    })?;
    let own = crate::identity::load(&data_dir.join(crate::identity::IDENTITY_FILE))?.node_id();
    if ticket.node_id != own {
        return Err(BoundError::OtherNode {
            path,
            ticket: ticket.node_id,
            own,
        });
    }
    let status = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("kappakv-status".into())
            .spawn_scoped(s, || ask_on_own_runtime(&ticket))
            .map_err(|e| e.to_string())?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let unreachable = |reason: String| BoundError::Unreachable {
        data_dir: data_dir.to_path_buf(),
        addrs: addrs_text(&ticket.addrs),
        reason,
    };
    match status {
        Ok(status) => Ok(Bound::Serving {
            node_id: ticket.node_id,
            // The status handler answers with the writer's durable LSN (`Node::durable`).
            durable_lsn: status.log_lsn,
        }),
        Err(Failure::Unreachable(reason)) => Err(unreachable(reason)),
        Err(Failure::Refused {
            addr,
            code,
            message,
        }) => Err(BoundError::Refused {
            node_id: ticket.node_id,
            addr,
            code,
            message,
        }),
    }
}

/// Why asking failed, before it is put in terms of the data dir.
#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Refused {
        addr: SocketAddr,
        code: ErrorCode,
        message: String,
    },
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure::Unreachable(reason)
    }
}

fn ask_on_own_runtime(ticket: &Ticket) -> Result<Status, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(async {
        match tokio::time::timeout(ASK_TIMEOUT, ask(ticket)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Unreachable(format!(
                "no answer within {} s",
                ASK_TIMEOUT.as_secs()
            ))),
        }
    })
}

/// Tries the ticket's addresses, loopback first (the node runs on this machine), then its other
/// IP addresses, then its names resolved; a refusal ends the search (every address is the same
/// node).
async fn ask(ticket: &Ticket) -> Result<Status, Failure> {
    let mut last = Failure::Unreachable("the ticket has no address".into());
    let mut addrs: Vec<SocketAddr> = ticket.addrs.iter().filter_map(NodeAddr::ip).collect();
    addrs.sort_by_key(|a| !a.ip().is_loopback());
    for addr in ticket.addrs.iter().filter(|a| a.ip().is_none()) {
        if let Ok(found) = resolve(addr).await {
            addrs.extend(found);
        }
    }
    for addr in addrs {
        match ask_at(ticket, addr).await {
            Ok(status) => return Ok(status),
            Err(e @ Failure::Refused { .. }) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A client connection to the node `node_id` at `addr`, its key pinned, on an endpoint of its
/// own (close the connection and wait for the endpoint when done).
pub(crate) async fn connect(
    node_id: NodeId,
    addr: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("opening a socket: {e}"))?;
    let tls = kappakv_protocol::tls::client_config(node_id, ALPN_CLIENT, None)
        .map_err(|e| format!("TLS: {e}"))?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| format!("TLS: {e}"))?;
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let conn = endpoint
        .connect_with(config, addr, kappakv_protocol::tls::SERVER_NAME)
        .map_err(|e| format!("{addr}: {e}"))?
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok((endpoint, conn))
}

async fn ask_at(ticket: &Ticket, addr: SocketAddr) -> Result<Status, Failure> {
    let (endpoint, conn) = connect(ticket.node_id, addr).await?;
    let result = status_on(&conn, ticket, addr).await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    result
}

/// Hello, then status, on `conn`.
async fn status_on(
    conn: &quinn::Connection,
    ticket: &Ticket,
    addr: SocketAddr,
) -> Result<Status, Failure> {
    let refused = |code, message| Failure::Refused {
        addr,
        code,
        message,
    };
    let hello = Request::Hello {
        token: ticket.token.clone(),
    };
    match exchange(conn, &hello)
        .await
        .map_err(|e| format!("{addr}: hello: {e}"))?
    {
        Response::Hello { node_id, .. } if node_id == ticket.node_id => {}
        Response::Error { code, message } => return Err(refused(code, message)),
        other => return Err(format!("{addr}: unexpected answer to hello: {other:?}").into()),
    }
    let mut backoff = RETRY_BACKOFF;
    for attempt in 1..=STATUS_ATTEMPTS_MAX {
        match exchange(conn, &Request::Status)
            .await
            .map_err(|e| format!("{addr}: status: {e}"))?
        {
            Response::Status(status) if status.node_id == Some(ticket.node_id) => {
                return Ok(*status);
            }
            Response::Error { code, .. } if code.retryable() && attempt < STATUS_ATTEMPTS_MAX => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Response::Error { code, message } => return Err(refused(code, message)),
            other => {
                return Err(format!("{addr}: unexpected answer to status: {other:?}").into());
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Sends `request` on a new stream and reads its one-frame answer.
pub(crate) async fn exchange(
    conn: &quinn::Connection,
    request: &Request,
) -> Result<Response, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&encode_frame(request))
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let bytes = recv
        .read_to_end(FRAME_HEADER_LEN + MAX_FRAME_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    match decode_frame(&bytes, MAX_FRAME_BYTES).map_err(|e| e.to_string())? {
        FrameDecode::Frame { body, used } if used == bytes.len() => {
            decode_body(body).map_err(|e| e.to_string())
        }
        FrameDecode::Frame { .. } => Err("more than one frame in the answer".into()),
        FrameDecode::NeedMore { .. } => Err("the answer ends inside its frame".into()),
    }
}

/// `addrs` as a ticket writes them: comma-separated.
pub(crate) fn addrs_text(addrs: &[kappakv_protocol::NodeAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The socket addresses of `addr`, a name resolved now.
pub(crate) async fn resolve(addr: &NodeAddr) -> Result<Vec<SocketAddr>, String> {
    match addr {
        NodeAddr::Ip(a) => Ok(vec![*a]),
        NodeAddr::Name { host, port } => Ok(tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .collect()),
    }
}
