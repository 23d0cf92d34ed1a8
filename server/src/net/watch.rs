//! A watch: changes replayed from the log after a given LSN, then followed live. Changes are
//! read from the log at the watcher's pace, so a slow watcher costs no memory; one that falls
//! more than `watch_lag_entries_max` entries behind the log is ended with `SlowConsumer`.

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::{Change, ErrorCode, Lsn, Response, Version};
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;

use crate::handlers::heartbeat;
use crate::node::Node;

/// Entries read from the log per blocking read.
const READ_CHUNK: u64 = 512;

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
    let mut durable = node.durable.clone();
    let mut at = from_lsn.unwrap_or_else(|| *durable.borrow());
    // One reader for the whole watch: it remembers where it last read, so following the log
    // does not rescan a segment from its start for every chunk.
    let reader = match crate::log::LogReader::open(&node.data_dir.log()) {
        Ok(r) => std::sync::Arc::new(r),
        Err(e) => {
            let message = format!("opening the log: {e}");
            let _ = tx
                .write_all(&encode_frame(&Response::Error {
                    code: ErrorCode::Internal,
                    message,
                }))
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
            let _ = tx
                .write_all(&encode_frame(&Response::Error {
                    code: ErrorCode::SlowConsumer,
                    message,
                }))
                .await;
            return;
        }
        if at < head {
            let upto = head.min(at + READ_CHUNK);
            let reader = reader.clone();
            let prefix2 = prefix.clone();
            let changes =
                tokio::task::spawn_blocking(move || read_changes(&reader, at, upto, &prefix2))
                    .await;
            let changes = match changes {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let message = format!("reading the log: {e}");
                    let _ = tx
                        .write_all(&encode_frame(&Response::Error {
                            code: ErrorCode::Internal,
                            message,
                        }))
                        .await;
                    return;
                }
                Err(_) => return,
            };
            for c in changes {
                if tx
                    .write_all(&encode_frame(&Response::Change(c)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            at = upto;
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => {
                let message = format!("node shutting down; resume with --from {at}");
                let _ = tx.write_all(&encode_frame(&Response::Error { code: ErrorCode::ShuttingDown, message })).await;
                return;
            }
            () = &mut client_gone => return,
            r = durable.changed() => if r.is_err() { return },
            () = tokio::time::sleep(heartbeat(node)) => {
                if tx.write_all(&encode_frame(&Response::Heartbeat { log_lsn: head })).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn read_changes(
    reader: &crate::log::LogReader,
    after: Lsn,
    upto: Lsn,
    prefix: &[u8],
) -> Result<Vec<Change>, crate::log::ReadLogError> {
    let mut out = Vec::new();
    for item in reader.iter(after, upto)? {
        let (lsn, se) = item?;
        for op in &se.entry.ops {
            if !op.key().starts_with(prefix) {
                continue;
            }
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
    }
    Ok(out)
}
