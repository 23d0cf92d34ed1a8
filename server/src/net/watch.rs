//! A watch: changes replayed from the log after a given LSN, then followed live. Changes are
//! read from the log at the watcher's pace, a bounded chunk at a time, so a slow watcher costs
//! no memory; one that falls more than `watch_lag_entries_max` entries behind the log, or stops
//! reading for longer than the request timeout, is ended. Watches are counted against
//! `max_watches`: each holds a log file open. The changes read and not yet sent are counted
//! against [`BUFFER_BYTES`] over all watches.

use std::sync::Arc;
use std::time::Duration;

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::limits::MAX_RECORD_BYTES;
use kappakv_protocol::{Change, ErrorCode, Lsn, Response, Version};
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::handlers::heartbeat;
use crate::log::{LogReader, ReadLogError};
use crate::node::Node;

/// Most entries read from the log per blocking read.
const READ_CHUNK: u64 = 512;
/// A blocking read stops before the change that would take its changes over this many bytes;
/// an entry whose changes alone are larger is read on its own.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Bytes of changes read from the log and not yet sent, over all watches. A watch waits for
/// room for a chunk before reading it, and gives the room back change by change as it sends
/// them, so watchers that read slowly hold at most this much between them.
pub const BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Watches reading the log at once. Besides the chunk it makes, a read holds the record it
/// is at and that record's decoded entry.
const READS_AT_ONCE: usize = 1;
/// What the reads in progress hold besides their chunks: for each, a record (in a buffer that
/// may be twice its size) and its decoded entry.
pub const READING_BYTES: usize = READS_AT_ONCE * 3 * MAX_RECORD_BYTES;

/// What the watches of one endpoint share: the budget of [`BUFFER_BYTES`] (one permit per
/// byte) and the slots of [`READS_AT_ONCE`] log reads. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Budget {
    buffers: Arc<Semaphore>,
    reads: Arc<Semaphore>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            buffers: Arc::new(Semaphore::new(BUFFER_BYTES)),
            reads: Arc::new(Semaphore::new(READS_AT_ONCE)),
        }
    }
}

/// Writes one frame, giving up after `timeout`: a client that stops reading must not hold the
/// stream forever.
async fn send(tx: &mut SendStream, response: &Response, timeout: Duration) -> bool {
    send_frame(tx, &encode_frame(response), timeout).await
}

/// Writes an encoded frame; after `timeout` the stream is reset, so that what QUIC still holds
/// of it is dropped.
async fn send_frame(tx: &mut SendStream, frame: &[u8], timeout: Duration) -> bool {
    if let Ok(written) = tokio::time::timeout(timeout, tx.write_all(frame)).await {
        written.is_ok()
    } else {
        let _ = tx.reset(0u32.into());
        false
    }
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

/// Streams changes to `tx` until the client stops reading, the node shuts down, or the watcher
/// falls too far behind.
pub async fn stream(
    node: &Node,
    budget: &Budget,
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
            // Room for the chunk first, waited for with nothing held; then the read.
            let mut room = READ_CHUNK_BYTES;
            let (changes, read_to, mut permit) = loop {
                let permit = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = &mut client_gone => return,
                    p = budget.buffers.acquire_many(u32::try_from(room).expect("under the budget")) => {
                        p.expect("the budget is never closed")
                    }
                };
                let slot = budget
                    .reads
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed");
                let reader = reader.clone();
                let prefix2 = prefix.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    read_changes(&reader, at, upto, &prefix2, room)
                })
                .await;
                match read {
                    Ok(Ok(Read::Changes(changes, read_to))) => break (changes, read_to, permit),
                    Ok(Ok(Read::Larger(bytes))) => {
                        drop(permit);
                        room = bytes.min(BUFFER_BYTES);
                    }
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
                }
            };
            for c in changes {
                let bytes = change_bytes(&c);
                let frame = encode_frame(&Response::Change(c));
                let sent = send_frame(tx, &frame, timeout).await;
                drop(frame);
                // The change is sent (or dropped): its room goes back to the other watches.
                drop(permit.split(bytes));
                if !sent {
                    return;
                }
            }
            drop(permit);
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

/// Memory a change holds, counted against [`BUFFER_BYTES`].
fn change_bytes(c: &Change) -> usize {
    std::mem::size_of::<Change>()
        + c.key.len()
        + c.version.value.as_ref().map_or(0, Vec::len)
        + std::mem::size_of_val(c.supersedes.as_slice())
}

/// What a read of the log found.
enum Read {
    /// The changes, and the LSN read up to.
    Changes(Vec<Change>, Lsn),
    /// The next entry's changes alone hold more than the room the read had: this many bytes.
    Larger(usize),
}

/// The changes under `prefix` in `(after, upto]`, stopping before an entry whose changes would
/// take them over `room` bytes.
fn read_changes(
    reader: &LogReader,
    after: Lsn,
    upto: Lsn,
    prefix: &[u8],
    room: usize,
) -> Result<Read, ReadLogError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut read_to = after;
    for item in reader.iter(after, upto)? {
        let (lsn, se) = item?;
        let changes: Vec<Change> = se
            .entry
            .ops
            .iter()
            .filter(|op| op.key().starts_with(prefix))
            .map(|op| Change {
                lsn,
                key: op.key().to_vec(),
                version: Version {
                    id: se.id,
                    author: se.entry.author,
                    timestamp: se.entry.timestamp,
                    value: op.value().map(<[u8]>::to_vec),
                },
                supersedes: op.supersedes().to_vec(),
            })
            .collect();
        let size: usize = changes.iter().map(change_bytes).sum();
        if bytes + size > room {
            if !out.is_empty() {
                break;
            }
            // Alone and larger than the room: read it again with room for it, unless the
            // room is already the whole budget (no entry's changes come near it).
            if room < BUFFER_BYTES {
                return Ok(Read::Larger(size));
            }
        }
        bytes += size;
        out.extend(changes);
        read_to = lsn;
    }
    Ok(Read::Changes(out, read_to))
}
