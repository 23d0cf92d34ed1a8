//! What each request does. Handlers return a [`Reply`]; errors become `Response::Error` with a
//! wire [`ErrorCode`] and one line saying what to do.

use std::time::Duration;

use kappakv_indexes::{QueryError, SecondaryIndexView, View as _};
use kappakv_protocol::limits::{MAX_HISTORY_LIMIT, MAX_KEY_BYTES, MAX_QUERY_LIMIT, MAX_SCAN_LIMIT};
use kappakv_protocol::{
    ErrorCode, IndexQuery, IndexStatus, KeyVersions, Lsn, PeerOrigin, Request, RequestId, Response,
    Status, WriteOp,
};
use serde_bytes::ByteBuf;

use crate::auth::Role;
use crate::node::Node;
use crate::node::recent_writes::Outcome;
use crate::node::writer::WriteError;

/// What a request produced.
#[derive(Debug)]
pub enum Reply {
    /// One response frame.
    One(Response),
    /// Several frames (a scan page and its end).
    Many(Vec<Response>),
    /// A watch: the connection streams changes from the log.
    Watch {
        /// Only keys with this prefix.
        prefix: Vec<u8>,
        /// Replay changes after this LSN; `None` starts live.
        from_lsn: Option<Lsn>,
    },
    /// A peer session on the stream (`Request::Sync`).
    Sync(crate::node::replication::driver::StreamMode),
}

fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::One(Response::Error {
        code,
        message: message.into(),
    })
}

/// Serves one authenticated request. Its span is a debug one: at the default level a span per
/// request cost gets 16% of their rate (BENCHMARKS.md).
#[tracing::instrument(level = "debug", skip_all, fields(kind = request.kind()))]
pub async fn handle(node: &Node, request: Request, role: Role) -> Reply {
    if request.is_write() && role == Role::ReadOnly {
        return error(
            ErrorCode::Forbidden,
            "this token is read-only; use the read-write ticket to write",
        );
    }
    match request {
        Request::Write { ops, request_id } => write(node, ops, false, request_id).await,
        Request::WriteIf { ops, request_id } => write(node, ops, true, request_id).await,
        Request::Get { key, min_lsn } => {
            if key.len() > MAX_KEY_BYTES {
                return key_too_large(key.len());
            }
            read(
                node,
                min_lsn,
                ReadSize::Point,
                Bootstrapping::FromSnapshot,
                move |snap| snap.get(&key).map(|kv| vec![versions_frame(kv)]),
            )
            .await
        }
        Request::Scan {
            range,
            limit,
            min_lsn,
        } => {
            let limit = limit.clamp(1, MAX_SCAN_LIMIT);
            read(
                node,
                min_lsn,
                ReadSize::Range,
                Bootstrapping::FromSnapshot,
                move |snap| {
                    let (page, resume) =
                        snap.scan_within(&range, limit as usize, REPLY_BYTES_MAX)?;
                    let mut out: Vec<Response> = page.into_iter().map(versions_frame).collect();
                    out.push(Response::ScanEnd {
                        resume_after: resume.map(ByteBuf::from),
                    });
                    Ok(out)
                },
            )
            .await
        }
        Request::History {
            key,
            limit,
            min_lsn,
        } => {
            let limit = limit.clamp(1, MAX_HISTORY_LIMIT);
            read(
                node,
                min_lsn,
                ReadSize::Range,
                Bootstrapping::Refuse,
                move |snap| {
                    snap.history_within(&key, limit as usize, REPLY_BYTES_MAX)
                        .map(|versions| vec![Response::History { versions }])
                },
            )
            .await
        }
        Request::Query {
            index,
            query: q,
            limit,
            start_after,
            min_lsn,
            wait_ms,
        } => {
            let wait = Duration::from_millis(wait_ms);
            query(node, &index, q, limit, start_after, min_lsn, wait).await
        }
        Request::Watch { prefix, from_lsn } => Reply::Watch { prefix, from_lsn },
        Request::Sync {
            send,
            receive,
            live,
        } => {
            if node.replication().is_none() {
                return error(ErrorCode::Unavailable, "replication is not running");
            }
            Reply::Sync(crate::node::replication::driver::StreamMode {
                send,
                receive,
                live,
                report: true,
            })
        }
        Request::Status | Request::PeerList => Reply::One(Response::Status(Box::new(status(node)))),
        Request::PeerAdd { node_id, addr } => {
            if crate::net::peer_spec(&format!("{node_id}@{addr}")).is_none() {
                return error(
                    ErrorCode::BadRequest,
                    format!("peer address `{addr}` is not HOST:PORT"),
                );
            }
            match node
                .replication()
                .map(|r| r.add_peer(node_id, addr, PeerOrigin::Added))
            {
                Some(Ok(())) => Reply::One(Response::Ok),
                Some(Err(e)) => error(ErrorCode::BadRequest, e.to_string()),
                None => error(ErrorCode::Unavailable, "replication is not running"),
            }
        }
        Request::PeerRemove { node_id } => {
            match node.replication().map(|r| r.remove_peer(&node_id)) {
                Some(Ok(true)) => Reply::One(Response::Ok),
                Some(Ok(false)) => error(
                    ErrorCode::BadRequest,
                    format!("{node_id} is not a peer of this node"),
                ),
                Some(Err(e)) => error(ErrorCode::Internal, e.to_string()),
                None => error(ErrorCode::Unavailable, "replication is not running"),
            }
        }
        Request::PeerInvite { expires_secs } => invite(node, expires_secs),
        Request::PeerJoin { invite } => peer_join(node, &invite).await,
        // Answered by the connection, before the token check (`handlers::join`): never here.
        Request::Join { .. } => error(
            ErrorCode::BadRequest,
            "a join is answered before authentication only",
        ),
        Request::Hello { .. } => error(
            ErrorCode::BadRequest,
            "hello is only valid as the first request",
        ),
        // Opened by the connection (`net::pipeline`), and not pipelinable within one.
        Request::Pipeline => error(
            ErrorCode::BadRequest,
            "a pipeline is opened as a stream's request, not sent within one",
        ),
        _ => error(
            ErrorCode::UnknownRequest,
            "this node does not know that request",
        ),
    }
}

/// Keys and values one history response or one scan page holds at most, besides the one
/// item that crosses the line; with values of at most 1 MiB, a history frame stays well under
/// the frame limit and a scan page's memory stays bounded.
const REPLY_BYTES_MAX: usize = 2 * 1024 * 1024;

/// A key's versions as one frame, or a typed error when its siblings together are too large for
/// one frame.
fn versions_frame(kv: KeyVersions) -> Response {
    let bytes: usize = kv.key.len()
        + kv.values
            .iter()
            .map(|v| v.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
    if bytes + 64 * 1024 > kappakv_protocol::limits::MAX_FRAME_BYTES {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        return Response::Error {
            code: ErrorCode::TooLarge,
            message: format!(
                "key `{key}` has {} siblings holding {bytes} bytes, more than one response can carry; merge them with a put that supersedes the context {}",
                kv.values.len(),
                kappakv_protocol::Context(kv.context.clone()),
            ),
        };
    }
    Response::Versions(kv)
}

fn key_too_large(len: usize) -> Reply {
    error(
        ErrorCode::TooLarge,
        format!("key of {len} bytes is over the limit of {MAX_KEY_BYTES}"),
    )
}

/// Where peers and clients should dial this node, as its tickets give it.
fn own_addrs(node: &Node) -> Vec<kappakv_protocol::NodeAddr> {
    let bound = node
        .replication()
        .and_then(|r| r.local_addr())
        .unwrap_or(node.config.listen);
    crate::net::advertised(bound, &node.config.advertise)
}

/// `PeerInvite`: an invite with this node's addresses and a new secret.
fn invite(node: &Node, expires_secs: u64) -> Reply {
    let lifetime = std::time::Duration::from_secs(expires_secs);
    match node.invites.create(lifetime) {
        Ok(secret) => {
            let invite = kappakv_protocol::Invite {
                node_id: node.node_id,
                addrs: own_addrs(node),
                secret,
            };
            tracing::info!(expires_secs, "invite made");
            Reply::One(Response::Invite {
                invite: invite.to_string(),
            })
        }
        Err(e) => error(ErrorCode::Internal, e.to_string()),
    }
}

/// `Join`, allowed before `Hello`: a node shows an invite's secret and proves it holds its key;
/// it becomes a peer, dialled at the address it gives on the network it came from (`remote`),
/// else at the first it gives.
pub fn join(node: &Node, request: Request, remote: std::net::SocketAddr) -> Reply {
    let Request::Join {
        node_id,
        addrs,
        secret,
        proof,
    } = request
    else {
        return error(ErrorCode::BadRequest, "not a join");
    };
    let digest = kappakv_protocol::Invite::proof(&node.node_id, &node_id, &secret);
    if let Err(e) = kappakv_protocol::sign::verify_signature(&node_id, 0, &digest, &proof) {
        tracing::warn!(peer = %node_id, error = %e, "refused a join: its proof does not verify");
        return error(
            ErrorCode::Unauthorized,
            "the join's proof does not verify against its node id",
        );
    }
    let addrs: Vec<kappakv_protocol::NodeAddr> =
        addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let same_network = addrs
        .iter()
        .find(|a| matches!(a, kappakv_protocol::NodeAddr::Ip(ip) if ip.ip() == remote.ip()));
    let Some(addr) = same_network.or(addrs.first()).map(ToString::to_string) else {
        return error(
            ErrorCode::BadRequest,
            "a join names at least one HOST:PORT to dial the joining node at",
        );
    };
    let Some(replication) = node.replication() else {
        return error(ErrorCode::Unavailable, "replication is not running");
    };
    if let Err(e) = node.invites.take(&secret, node_id) {
        tracing::warn!(peer = %node_id, error = %e, "refused a join");
        return error(ErrorCode::Unauthorized, e.to_string());
    }
    match replication.add_peer(node_id, addr.clone(), PeerOrigin::Joined) {
        Ok(()) => {
            tracing::info!(peer = %node_id, %addr, "a node joined with an invite: added to the peers");
            Reply::One(Response::Joined {
                node_id: node.node_id,
            })
        }
        Err(e) => error(ErrorCode::Internal, e.to_string()),
    }
}

/// `PeerJoin`: joins this node to the node that made `invite`, and adds that node.
async fn peer_join(node: &Node, invite: &str) -> Reply {
    let invite: kappakv_protocol::Invite = match invite.parse() {
        Ok(i) => i,
        Err(e) => return error(ErrorCode::BadRequest, format!("bad invite: {e}")),
    };
    let Some(replication) = node.replication() else {
        return error(ErrorCode::Unavailable, "replication is not running");
    };
    match crate::commands::join::join(
        &node.keypair,
        own_addrs(node).iter().map(ToString::to_string).collect(),
        &invite,
    )
    .await
    {
        Ok((peer, addr)) => match replication.add_peer(peer, addr, PeerOrigin::Joined) {
            Ok(()) => Reply::One(Response::Ok),
            Err(e) => error(ErrorCode::Internal, e.to_string()),
        },
        Err(e @ crate::commands::join::JoinError::Unreachable { .. }) => {
            error(ErrorCode::Unavailable, e.to_string())
        }
        Err(e) => error(ErrorCode::BadRequest, e.to_string()),
    }
}

/// A local write. The writer checks the ops against the entry format (`Entry::validate`), so
/// the limits live in one place; its typed error picks the wire code.
async fn write(
    node: &Node,
    ops: Vec<WriteOp>,
    conditional: bool,
    request_id: Option<RequestId>,
) -> Reply {
    if let Some(why) = node.bootstrap.writes_held() {
        return error(ErrorCode::Unavailable, why);
    }
    let writer = node.writer.clone();
    let write = async move {
        if conditional {
            writer.write_if(ops).await
        } else {
            writer.write(ops).await
        }
    };
    let written = match request_id {
        None => write.await,
        Some(id) => match node.recent_writes.once(id, write).await {
            Ok(Outcome::Made(w)) => Ok(w),
            Ok(Outcome::Repeated(w)) => {
                crate::telemetry::write_repeated();
                Ok(w)
            }
            Err(e) => Err(e),
        },
    };
    match written {
        Ok(w) => Reply::One(Response::Written {
            lsn: w.lsn,
            id: w.id,
        }),
        Err(e) => write_error(&e),
    }
}

fn write_error(e: &WriteError) -> Reply {
    use kappakv_protocol::InvalidEntry;
    let code = match e {
        WriteError::Invalid(
            InvalidEntry::KeyTooLarge { .. }
            | InvalidEntry::ValueTooLarge { .. }
            | InvalidEntry::TooManyOps { .. }
            | InvalidEntry::TooLarge { .. },
        ) => ErrorCode::TooLarge,
        WriteError::Invalid(_) | WriteError::NoContext { .. } => ErrorCode::BadRequest,
        WriteError::Conflict { .. } => ErrorCode::Conflict,
        WriteError::ShuttingDown => ErrorCode::ShuttingDown,
        _ => ErrorCode::Unavailable,
    };
    error(code, e.to_string())
}

/// How much a read may touch, which decides where it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadSize {
    /// One key's current versions: a few page reads from the cache, cheaper than a hop to a
    /// blocking thread and back, so it runs on the request's own task.
    Point,
    /// A page of a scan, history or query, up to `REPLY_BYTES_MAX`: in a blocking thread,
    /// bounded by the node's read semaphore.
    Range,
}

/// What a read does while the node answers from a peer's snapshot (`node::bootstrap`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bootstrapping {
    /// Answers from the snapshot: it holds every key's current versions.
    FromSnapshot,
    /// Refuses, retryably: the snapshot holds no history and no secondary index.
    Refuse,
}

/// Where a read's snapshot comes from.
enum Source {
    Views(std::sync::Arc<kappakv_indexes::Indexes>),
    Loaded(std::sync::Arc<kappakv_indexes::StateStore>),
}

impl Source {
    fn snapshot(&self) -> Result<kappakv_indexes::Snapshot, kappakv_indexes::ReadError> {
        match self {
            Source::Views(indexes) => indexes.snapshot(),
            Source::Loaded(store) => store.snapshot(),
        }
    }
}

/// Waits until the views have applied everything durable when the read arrived (and at least
/// `min_lsn`), then runs `f` on a snapshot, where `size` says. While the node answers from a
/// peer's snapshot, `bootstrapping` says whether `f` runs on it instead, at once.
async fn read<F>(
    node: &Node,
    min_lsn: Lsn,
    size: ReadSize,
    bootstrapping: Bootstrapping,
    f: F,
) -> Reply
where
    F: FnOnce(&kappakv_indexes::Snapshot) -> Result<Vec<Response>, kappakv_indexes::ReadError>
        + Send
        + 'static,
{
    let source = match node.bootstrap.reads() {
        Some(store) if bootstrapping == Bootstrapping::FromSnapshot => Source::Loaded(store),
        Some(_) => {
            return error(
                ErrorCode::Unavailable,
                "this node answers from a peer's snapshot while it replays the log behind it; history and index queries are answered once it has, retry shortly",
            );
        }
        None => match wait_for_views(node, min_lsn).await {
            Ok(()) => Source::Views(node.indexes.clone()),
            Err(reply) => return reply,
        },
    };
    let result = if size == ReadSize::Point {
        Ok(source.snapshot().and_then(|snap| f(&snap)))
    } else {
        let Ok(_permit) = node.reads.acquire().await else {
            return error(ErrorCode::ShuttingDown, "node is shutting down");
        };
        tokio::task::spawn_blocking(move || source.snapshot().and_then(|snap| f(&snap))).await
    };
    match result {
        Ok(Ok(mut frames)) if frames.len() == 1 => Reply::One(frames.pop().expect("one frame")),
        Ok(Ok(frames)) => Reply::Many(frames),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "index read failed");
            error(
                ErrorCode::Internal,
                format!("index read failed: {e}; `kappakv rebuild-indexes` regenerates the views"),
            )
        }
        Err(e) => error(ErrorCode::Internal, format!("read task failed: {e}")),
    }
}

/// Waits until the views have applied everything durable now, and at least `min_lsn`.
async fn wait_for_views(node: &Node, min_lsn: Lsn) -> Result<(), Reply> {
    let log_lsn = *node.durable.borrow();
    if min_lsn > log_lsn {
        return Err(error(
            ErrorCode::BadRequest,
            format!(
                "min_lsn {min_lsn} is ahead of this node's log ({log_lsn}); was it written to another node?"
            ),
        ));
    }
    // Every write acknowledged before this read arrived is visible to it, whichever client
    // made it: the read waits until the views cover the log as it stands now.
    let wait_for = min_lsn.max(log_lsn);
    if !node.wait_indexed(wait_for).await {
        let why = node.indexer_failure().unwrap_or("it is shutting down");
        return Err(error(
            ErrorCode::Unavailable,
            format!(
                "the indexer has stopped ({why}): the views cannot answer reads past lsn {} until the node is restarted",
                *node.indexed.borrow()
            ),
        ));
    }
    Ok(())
}

/// Reads a declared secondary index. Waits for the serving views like any read, then answers
/// from one snapshot in which the index has applied at least as much; while the index is being
/// built, answers `IndexBuilding` with how far it has come, or waits up to `wait` for it
/// (bounded by the request timeout).
async fn query(
    node: &Node,
    name: &str,
    q: IndexQuery,
    limit: u32,
    start_after: Option<Vec<u8>>,
    min_lsn: Lsn,
    wait: Duration,
) -> Reply {
    let Some(view) = node.secondary_index(name) else {
        let declared: Vec<&str> = node.config.index.iter().map(|d| d.name.as_str()).collect();
        let declared = if declared.is_empty() {
            "none; declare one with an [[index]] table in the node's config".to_string()
        } else {
            declared.join(", ")
        };
        return error(
            ErrorCode::BadRequest,
            format!("no index named {name:?}; declared: {declared}"),
        );
    };
    let limit = limit.clamp(1, MAX_QUERY_LIMIT) as usize;
    // What the read must see: every write acknowledged before it arrived, and the client's own.
    let target = min_lsn.max(*node.durable.borrow());
    let wait = wait.min(
        node.config
            .request_timeout()
            .saturating_sub(Duration::from_millis(250)),
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (v, q, after) = (view.clone(), q.clone(), start_after.clone());
        let reply = read(
            node,
            min_lsn,
            ReadSize::Range,
            Bootstrapping::Refuse,
            move |snap| {
                let applied = snap.applied_lsn(v.name())?;
                if applied < target {
                    return Ok(vec![index_building(&v, applied, target)]);
                }
                match snap.query(&v, &q, limit, after.as_deref()) {
                    Ok(page) => {
                        let mut out: Vec<Response> = if page.distances_mm.is_empty() {
                            page.items.into_iter().map(Response::Versions).collect()
                        } else {
                            page.items
                                .into_iter()
                                .zip(page.distances_mm)
                                .map(|(versions, distance_mm)| Response::Nearby {
                                    versions,
                                    distance_mm,
                                })
                                .collect()
                        };
                        out.push(Response::QueryEnd {
                            resume_after: page.resume_after.map(ByteBuf::from),
                        });
                        Ok(out)
                    }
                    Err(QueryError::Invalid { reason }) => Ok(vec![Response::Error {
                        code: ErrorCode::BadRequest,
                        message: reason,
                    }]),
                    Err(QueryError::Read(e)) => Err(e),
                    Err(e) => Ok(vec![Response::Error {
                        code: ErrorCode::Internal,
                        message: e.to_string(),
                    }]),
                }
            },
        )
        .await;
        let building = matches!(
            &reply,
            Reply::One(Response::Error {
                code: ErrorCode::IndexBuilding,
                ..
            })
        );
        if !building || tokio::time::Instant::now() >= deadline {
            return reply;
        }
        let mut views = node.view_lsns_watch();
        let view_name = view.name().to_string();
        let caught_up = views.wait_for(|lsns| {
            lsns.iter()
                .any(|(n, lsn)| *n == view_name && *lsn >= target)
        });
        // On a timeout, one more read answers with the progress at the deadline.
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, caught_up).await {
            return error(
                ErrorCode::Unavailable,
                "the indexer has stopped; check the node's log",
            );
        }
    }
}

fn index_building(view: &SecondaryIndexView, applied: Lsn, target: Lsn) -> Response {
    let percent = (u128::from(applied) * 100 / u128::from(target.max(1))).min(99);
    Response::Error {
        code: ErrorCode::IndexBuilding,
        message: format!(
            "index {:?} is building: {percent}% done (LSN {applied} of {target}); retry later, or let the query wait for it (kappactl query --wait SECONDS)",
            view.def().name
        ),
    }
}

/// The state of every declared secondary index.
fn index_statuses(node: &Node) -> Vec<IndexStatus> {
    // One snapshot: an index that follows the log commits with the key/value view, so it is
    // building exactly when it has applied less than the key/value view in the same snapshot.
    let snapshot = node.indexes.snapshot().ok();
    let kv_lsn = snapshot
        .as_ref()
        .and_then(|s| s.kv_applied_lsn().ok())
        .unwrap_or(0);
    node.config
        .index
        .iter()
        .filter_map(|def| SecondaryIndexView::new(def.clone()).ok())
        .map(|view| {
            let applied_lsn = snapshot
                .as_ref()
                .and_then(|s| s.applied_lsn(view.name()).ok())
                .unwrap_or(0);
            let stats = snapshot
                .as_ref()
                .and_then(|s| s.index_stats(&view).ok())
                .unwrap_or_default();
            IndexStatus {
                name: view.def().name.clone(),
                kind: view.def().kind.label().to_string(),
                applied_lsn,
                building: applied_lsn < kv_lsn,
                documents: stats.documents,
                postings: stats.postings,
                skipped: stats.skipped,
            }
        })
        .collect()
}

/// The node's state.
pub fn status(node: &Node) -> Status {
    let replication = node.replication();
    // The digest and the LSN it is at, from one snapshot.
    let digest = node.indexes.snapshot().ok().and_then(|snapshot| {
        Some((
            snapshot.kv_applied_lsn().ok()?,
            snapshot.state_digest().ok()?,
        ))
    });
    Status {
        node_id: Some(node.node_id),
        version: env!("CARGO_PKG_VERSION").to_string(),
        log_lsn: *node.durable.borrow(),
        indexed_lsn: digest
            .as_ref()
            .map_or_else(|| *node.indexed.borrow(), |(lsn, _)| *lsn),
        state_root: digest.map(|(_, digest)| digest.root()),
        version_vector: node.writer.version_vector(),
        peers: replication.as_ref().map(|r| r.status()).unwrap_or_default(),
        writable: !node.writer.is_stopped() && node.indexer_failure().is_none(),
        equivocations: replication.map_or(0, |r| r.equivocations()),
        indexes: index_statuses(node),
        bootstrap: node.bootstrap.status(),
    }
}

/// How long a watch waits for new entries before it sends a heartbeat.
pub fn heartbeat(node: &Node) -> Duration {
    Duration::from_millis(node.config.watch_heartbeat_ms)
}
