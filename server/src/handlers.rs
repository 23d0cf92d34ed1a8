//! What each request does. Handlers return a [`Reply`]; errors become `Response::Error` with a
//! wire [`ErrorCode`] and one line saying what to do.

use std::time::Duration;

use kappakv_protocol::limits::{
    MAX_HISTORY_LIMIT, MAX_KEY_BYTES, MAX_OPS_PER_ENTRY, MAX_SCAN_LIMIT, MAX_VALUE_BYTES,
};
use kappakv_protocol::{ErrorCode, KeyRange, Lsn, Request, Response, Status, WriteOp};
use serde_bytes::ByteBuf;

use crate::auth::Role;
use crate::node::Node;
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
}

fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::One(Response::Error {
        code,
        message: message.into(),
    })
}

/// Serves one authenticated request.
#[tracing::instrument(skip_all, fields(kind = request.kind()))]
pub async fn handle(node: &Node, request: Request, role: Role) -> Reply {
    if request.is_write() && role == Role::ReadOnly {
        return error(
            ErrorCode::Forbidden,
            "this token is read-only; use the read-write ticket to write",
        );
    }
    match request {
        Request::Write { ops } => write(node, ops).await,
        Request::Get { key, min_lsn } => {
            if key.len() > MAX_KEY_BYTES {
                return key_too_large(key.len());
            }
            read(node, min_lsn, move |snap| {
                snap.get(&key).map(|kv| vec![Response::Versions(kv)])
            })
            .await
        }
        Request::Scan {
            range,
            limit,
            min_lsn,
        } => {
            let limit = limit.clamp(1, MAX_SCAN_LIMIT);
            read(node, min_lsn, move |snap| {
                let (page, resume) = snap.scan(&range_checked(range), limit as usize)?;
                let mut out: Vec<Response> = page.into_iter().map(Response::Versions).collect();
                out.push(Response::ScanEnd {
                    resume_after: resume.map(ByteBuf::from),
                });
                Ok(out)
            })
            .await
        }
        Request::History {
            key,
            limit,
            min_lsn,
        } => {
            let limit = limit.clamp(1, MAX_HISTORY_LIMIT);
            read(node, min_lsn, move |snap| {
                snap.history(&key, limit as usize)
                    .map(|versions| vec![Response::History { versions }])
            })
            .await
        }
        Request::Watch { prefix, from_lsn } => Reply::Watch { prefix, from_lsn },
        Request::Status | Request::PeerList => Reply::One(Response::Status(Box::new(status(node)))),
        Request::PeerAdd { node_id, addr } => {
            if crate::net::peer_spec(&format!("{node_id}@{addr}")).is_none() {
                return error(
                    ErrorCode::BadRequest,
                    format!("peer address `{addr}` is not HOST:PORT"),
                );
            }
            match node.replication().map(|r| r.add_peer(node_id, addr)) {
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
        Request::Hello { .. } => error(
            ErrorCode::BadRequest,
            "hello is only valid as the first request",
        ),
        _ => error(
            ErrorCode::UnknownRequest,
            "this node does not know that request",
        ),
    }
}

fn range_checked(range: KeyRange) -> KeyRange {
    range
}

fn key_too_large(len: usize) -> Reply {
    error(
        ErrorCode::TooLarge,
        format!("key of {len} bytes is over the limit of {MAX_KEY_BYTES}"),
    )
}

async fn write(node: &Node, ops: Vec<WriteOp>) -> Reply {
    if ops.is_empty() {
        return error(ErrorCode::BadRequest, "a write needs at least one op");
    }
    if ops.len() > MAX_OPS_PER_ENTRY {
        return error(
            ErrorCode::TooLarge,
            format!(
                "{} ops in one write; the most is {MAX_OPS_PER_ENTRY}",
                ops.len()
            ),
        );
    }
    for op in &ops {
        if op.key.len() > MAX_KEY_BYTES {
            return key_too_large(op.key.len());
        }
        if let Some(v) = &op.value
            && v.len() > MAX_VALUE_BYTES
        {
            return error(
                ErrorCode::TooLarge,
                format!(
                    "value of {} bytes is over the limit of {MAX_VALUE_BYTES}",
                    v.len()
                ),
            );
        }
    }
    match node.writer.write(ops).await {
        Ok(w) => Reply::One(Response::Written {
            lsn: w.lsn,
            id: w.id,
        }),
        Err(e) => write_error(&e),
    }
}

fn write_error(e: &WriteError) -> Reply {
    let code = match e {
        WriteError::Invalid(_) => ErrorCode::BadRequest,
        WriteError::ShuttingDown => ErrorCode::ShuttingDown,
        _ => ErrorCode::Unavailable,
    };
    error(code, e.to_string())
}

/// Waits until the views have applied everything durable when the read arrived (and at least
/// `min_lsn`), then runs `f` on a snapshot in a blocking thread, bounded by the node's read
/// semaphore.
async fn read<F>(node: &Node, min_lsn: Lsn, f: F) -> Reply
where
    F: FnOnce(&kappakv_indexes::Snapshot) -> Result<Vec<Response>, kappakv_indexes::ReadError>
        + Send
        + 'static,
{
    let log_lsn = *node.durable.borrow();
    if min_lsn > log_lsn {
        return error(
            ErrorCode::BadRequest,
            format!(
                "min_lsn {min_lsn} is ahead of this node's log ({log_lsn}); was it written to another node?"
            ),
        );
    }
    // Every write acknowledged before this read arrived is visible to it, whichever client
    // made it: the read waits until the views cover the log as it stands now.
    let wait_for = min_lsn.max(log_lsn);
    let mut indexed = node.indexed.clone();
    if indexed.wait_for(|&lsn| lsn >= wait_for).await.is_err() {
        return error(
            ErrorCode::Unavailable,
            "the indexer has stopped; check the node's log",
        );
    }
    let Ok(_permit) = node.reads.acquire().await else {
        return error(ErrorCode::ShuttingDown, "node is shutting down");
    };
    let indexes = node.indexes.clone();
    let result =
        tokio::task::spawn_blocking(move || indexes.snapshot().and_then(|snap| f(&snap))).await;
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

/// The node's state.
pub fn status(node: &Node) -> Status {
    let replication = node.replication();
    Status {
        node_id: Some(node.node_id),
        version: env!("CARGO_PKG_VERSION").to_string(),
        log_lsn: *node.durable.borrow(),
        indexed_lsn: *node.indexed.borrow(),
        version_vector: node.writer.version_vector(),
        peers: replication.as_ref().map(|r| r.status()).unwrap_or_default(),
        writable: !node.writer.is_stopped(),
        equivocations: replication.map_or(0, |r| r.equivocations()),
    }
}

/// How long a watch waits for new entries before it sends a heartbeat.
pub fn heartbeat(node: &Node) -> Duration {
    Duration::from_millis(node.config.watch_heartbeat_ms)
}
