//! A watch: changes replayed from the log after a given LSN, then followed live. Changes are
//! read from the log at the watcher's pace, a bounded chunk at a time, so a slow watcher costs
//! no memory; one that falls more than `watch_lag_entries_max` entries behind the log, or stops
//! reading for longer than the request timeout, is ended. Watches are counted against
//! `max_watches`: each holds a log file open.

use std::sync::Arc;
use std::time::Duration;

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::{Change, ErrorCode, Lsn, Response, Version};
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;

use crate::handlers::heartbeat;
use crate::log::{LogReader, ReadLogError};
use crate::node::Node;

/// Most entries read from the log per blocking read.
const READ_CHUNK: u64 = 512;
/// A blocking read stops once its changes hold this many bytes of keys and values.
const READ_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Writes one frame, giving up after `timeout`: a client that stops reading must not hold the
/// stream forever.
async fn send(tx: &mut SendStream, response: &Response, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tx.write_all(&encode_frame(response))).await,
        Ok(Ok(()))
    )
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

/// Streams changes to `tx` until the client stops reading, the node shuts down, or the watcher
/// falls too far behind.
pub async fn stream(
    node: &Node,
    tx: &mut SendStream,
    rx: &mut RecvStream,
    prefix: Vec<u8>,
    from_lsn: Option<Lsn>,
    cancel: &CancellationToken,
) {
    let timeout = node.config.request_timeout();
    let Ok(_permit) = node.watches.try_acquire() else {
        let message = format!(
            "the node serves {} watches already; retry later",
            node.config.max_watches
        );
        send(tx, &error(ErrorCode::Busy, message), timeout).await;
        return;
    };
    let mut durable = node.durable.clone();
    let head = *durable.borrow();
    let mut at = from_lsn.unwrap_or(head);
    if at > head {
        let message = format!("--from {at} is ahead of this node's log ({head})");
        send(tx, &error(ErrorCode::BadRequest, message), timeout).await;
        return;
    }
    // One reader for the whole watch: it remembers where it last read, so following the log
    // does not rescan a segment from its start for every chunk.
    let reader = match LogReader::open(&node.data_dir.log()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            send(
                tx,
                &error(ErrorCode::Internal, format!("opening the log: {e}")),
                timeout,
            )
            .await;
            return;
        }
    };
    let lag_max = node.config.watch_lag_entries_max;
    let mut client_gone = Box::pin(async move {
        let mut buf = [0u8; 64];
        while let Ok(Some(_)) = rx.read(&mut buf).await {}
    });
    loop {
        let head = *durable.borrow_and_update();
        if head.saturating_sub(at) > lag_max {
            let message = format!(
                "watcher is {} entries behind the log; resume with --from {at}",
                head - at
            );
            send(tx, &error(ErrorCode::SlowConsumer, message), timeout).await;
            return;
        }
        if at < head {
            let upto = head.min(at + READ_CHUNK);
            let reader = reader.clone();
            let prefix2 = prefix.clone();
            let read =
                tokio::task::spawn_blocking(move || read_changes(&reader, at, upto, &prefix2))
                    .await;
            let (changes, read_to) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    send(
                        tx,
                        &error(ErrorCode::Internal, format!("reading the log: {e}")),
                        timeout,
                    )
                    .await;
                    return;
                }
                Err(_) => return,
            };
            for c in changes {
                if !send(tx, &Response::Change(c), timeout).await {
                    return;
                }
            }
            at = read_to;
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => {
                let message = format!("node shutting down; resume with --from {at}");
                send(tx, &error(ErrorCode::ShuttingDown, message), timeout).await;
                return;
            }
            () = &mut client_gone => return,
            r = durable.changed() => if r.is_err() { return },
            () = tokio::time::sleep(heartbeat(node)) => {
                if !send(tx, &Response::Heartbeat { log_lsn: head }, timeout).await {
                    return;
                }
            }
        }
    }
}

/// The changes under `prefix` in `(after, upto]`, stopping early once they hold
/// [`READ_CHUNK_BYTES`]; returns them with the LSN read up to.
fn read_changes(
    reader: &LogReader,
    after: Lsn,
    upto: Lsn,
    prefix: &[u8],
) -> Result<(Vec<Change>, Lsn), ReadLogError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut read_to = after;
    for item in reader.iter(after, upto)? {
        let (lsn, se) = item?;
        read_to = lsn;
        for op in &se.entry.ops {
            if !op.key().starts_with(prefix) {
                continue;
            }
            bytes += op.key().len() + op.value().map_or(0, <[u8]>::len);
            out.push(Change {
                lsn,
                key: op.key().to_vec(),
                version: Version {
                    id: se.id,
                    author: se.entry.author,
                    timestamp: se.entry.timestamp,
                    value: op.value().map(<[u8]>::to_vec),
                },
                supersedes: op.supersedes().to_vec(),
            });
        }
        if bytes >= READ_CHUNK_BYTES {
            break;
        }
    }
    Ok((out, read_to))
}
