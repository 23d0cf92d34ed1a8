//! A pipeline: one client stream carrying many requests at once (`Request::Pipeline`).
//!
//! Each frame is `[id, request]`; each request runs as soon as it is read, and its answer goes
//! back as `[id, response]` when it is done, in any order. Answers done while a write is in
//! progress leave together in the next one. Up to [`MAX_PIPELINED_REQUESTS`] run at once; beyond that the node
//! reads no further, and QUIC's flow control holds the client back. All of a pipeline runs on
//! its stream's task: no task, stream or wake-up of its own per request.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kappakv_protocol::frame::{FRAME_HEADER_LEN, encode_tagged_frame, frame_len, split_tagged};
use kappakv_protocol::limits::{MAX_FRAME_BYTES, MAX_PIPELINED_REQUESTS};
use kappakv_protocol::{ErrorCode, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::connection::{
    Buffers, ReadRequest, Refused, busy_buffers, call, decode_request, discard, read_body,
    reply_fits, send,
};
use crate::auth::Role;
use crate::handlers::Reply;
use crate::node::Node;
use crate::service::RequestService;

/// Stream reset code for a pipeline the client broke: a frame that is not `[id, request]`, or
/// one not sent in time. Its requests in flight are not answered.
pub const RESET_BROKEN: u32 = 2;
/// Stream reset code for a pipeline ended by the node shutting down.
pub const RESET_SHUTDOWN: u32 = 3;

/// Bytes of a body enough to hold the array header and any id.
const TAG_BYTES: usize = 10;

/// What one request in flight on a pipeline holds besides its frame: its future (the handler's
/// is about 2.4 KiB) and its answer until sent, if small. Counted against the node's buffer
/// budget with the frame, so that pipelines, whatever their number, hold no more than it.
const REQUEST_STATE_BYTES: usize = 4 * 1024;

/// What reading the next frame of a pipeline gave.
enum Next {
    /// A request to run, or the answer it gets without running.
    Request {
        id: u64,
        request: Result<Request, Refused>,
        held: Option<OwnedSemaphorePermit>,
    },
    /// The client finished its side: answer what is in flight, then finish.
    End,
    /// The client broke the framing: reset the stream.
    Broken(String),
}

/// Serves a pipeline until the client finishes its side and every answer is sent, the
/// stream breaks, or `cancel` fires.
///
/// Reading requests, running them and writing answers all go on at once: a client slow to
/// read its answers holds only its answers (counted against `buffers`), never the permits of
/// requests already done, and a write in progress holds up neither the next frame nor the
/// requests in flight.
pub async fn serve(
    tx: SendStream,
    rx: RecvStream,
    node: &Node,
    service: RequestService,
    buffers: &Buffers,
    role: Role,
    cancel: &CancellationToken,
) {
    let timeout = node.config.request_timeout();
    // The read in progress owns the receive side and hands it back with what it read, so
    // that answering in between never drops a half-read frame.
    let mut reading = Box::pin(next(rx, buffers, timeout));
    let mut open = true;
    let mut in_flight = FuturesUnordered::new();
    // Answers waiting for the write in progress, and what they counted against `buffers`.
    let mut out = Vec::new();
    let mut out_held = Vec::new();
    // The send side when no write holds it, and the write that does.
    let mut idle = Some(tx);
    let mut writing: Option<Pin<Box<Write<'_>>>> = None;
    // The client broke the framing while a write was in progress.
    let mut broken = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                if let Some(tx) = idle.as_mut() {
                    let _ = tx.reset(RESET_SHUTDOWN.into());
                }
                return;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let mut done = Some(done);
                // Every answer ready now goes into the next write.
                while let Some((id, reply, mut held)) = done {
                    let at = out.len();
                    encode_tagged_frame(id, &single(reply), &mut out);
                    if !reply_fits(buffers, &mut held, out.len() - at) {
                        out.truncate(at);
                        encode_tagged_frame(id, &Response::from(busy_buffers()), &mut out);
                    }
                    out_held.push(held);
                    done = in_flight.next().now_or_never().flatten();
                }
            }
            (tx, spare, sent) = async { writing.as_mut().expect("a write in progress").await },
                if writing.is_some() =>
            {
                writing = None;
                if !sent {
                    return;
                }
                if broken {
                    let mut tx = tx;
                    let _ = tx.reset(RESET_BROKEN.into());
                    return;
                }
                idle = Some(tx);
                // The buffer is reused, unless a burst of large answers grew it.
                if spare.capacity() <= KEEP_BUFFER_BYTES && out.is_empty() {
                    out = spare;
                }
            }
            (rx, read) = &mut reading, if open && in_flight.len() < MAX_PIPELINED_REQUESTS => {
                match read {
                    Next::Request { id, request, held } => {
                        let request = request.and_then(pipelinable);
                        let service = service.clone();
                        in_flight.push(async move {
                            let reply = match request {
                                Ok(request) => call(service, request, role).await,
                                Err(refused) => Reply::One(refused.into()),
                            };
                            (id, reply, held)
                        });
                    }
                    Next::End => open = false,
                    Next::Broken(why) => {
                        tracing::debug!(%why, "client broke its pipeline; resetting it");
                        if let Some(mut tx) = idle.take() {
                            let _ = tx.reset(RESET_BROKEN.into());
                            return;
                        }
                        // Reset once the write in progress gives the stream back; nothing
                        // more is answered.
                        broken = true;
                        open = false;
                        in_flight.clear();
                        out.clear();
                        out_held.clear();
                    }
                }
                reading.set(next(rx, buffers, timeout));
            }
        }
        if !out.is_empty()
            && let Some(tx) = idle.take()
        {
            let answers = std::mem::take(&mut out);
            let held = std::mem::take(&mut out_held);
            writing = Some(Box::pin(write(tx, answers, held, timeout)));
        }
        if !open && in_flight.is_empty() && writing.is_none() && out.is_empty() {
            break;
        }
    }
    if let Some(mut tx) = idle {
        let _ = tx.finish();
    }
}

/// A write of answers in progress.
type Write<'a> = dyn Future<Output = (SendStream, Vec<u8>, bool)> + Send + 'a;

/// A reply buffer larger than this is let go once written, not kept for the next answers.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;

/// Writes `answers`, then gives back what they counted against the buffer budget (`held`),
/// the send side, the emptied buffer, and whether the write went through.
async fn write(
    mut tx: SendStream,
    mut answers: Vec<u8>,
    held: Vec<Option<OwnedSemaphorePermit>>,
    timeout: Duration,
) -> (SendStream, Vec<u8>, bool) {
    let sent = send(&mut tx, &answers, timeout).await;
    drop(held);
    answers.clear();
    (tx, answers, sent)
}

/// Reads the next frame: a request tagged with its id.
///
/// Waiting for a frame's first byte takes as long as the client likes (an idle pipeline);
/// the rest of the frame must come within `timeout`.
async fn next(mut rx: RecvStream, buffers: &Buffers, timeout: Duration) -> (RecvStream, Next) {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let first = match rx.read(&mut header).await {
        Ok(Some(n)) if n > 0 => n,
        Ok(_) => return (rx, Next::End),
        Err(e) => return (rx, Next::Broken(e.to_string())),
    };
    let read = tokio::time::timeout(timeout, rest(&mut rx, header, first, buffers)).await;
    let next = read.unwrap_or_else(|_| Next::Broken("a request frame not received in time".into()));
    (rx, next)
}

async fn rest(
    rx: &mut RecvStream,
    mut header: [u8; FRAME_HEADER_LEN],
    first: usize,
    buffers: &Buffers,
) -> Next {
    if rx.read_exact(&mut header[first..]).await.is_err() {
        return Next::Broken("the stream ended inside a frame header".into());
    }
    let len = u32::from_le_bytes(header) as usize;
    // The id comes first, uncounted: a few bytes, so that even a refused request is answered.
    let mut tag = [0u8; TAG_BYTES];
    let tag = &mut tag[..len.min(TAG_BYTES)];
    if rx.read_exact(tag).await.is_err() {
        return Next::Broken("the stream ended inside a frame".into());
    }
    let id = match split_tagged(tag) {
        Ok((id, _)) => id,
        Err(e) => return Next::Broken(e.to_string()),
    };
    if let Err(e) = frame_len(header, MAX_FRAME_BYTES) {
        // Read past, never held: the pipeline goes on after it.
        discard(rx, len - tag.len()).await;
        return Next::Request {
            id,
            request: Err(Refused(ErrorCode::TooLarge, format!("request frame: {e}"))),
            held: None,
        };
    }
    let mut body = tag.to_vec();
    let mut held = None;
    let read = if buffers.grow(&mut held, REQUEST_STATE_BYTES) {
        read_body(rx, &mut body, len, buffers, &mut held).await
    } else {
        Err(ReadRequest::Busy {
            unread: len - body.len(),
        })
    };
    match read {
        Ok(()) => {}
        Err(ReadRequest::Busy { unread }) => {
            discard(rx, unread).await;
            return Next::Request {
                id,
                request: Err(busy_buffers()),
                held: None,
            };
        }
        Err(ReadRequest::Gone | ReadRequest::Frame(_)) => {
            return Next::Broken("the stream ended inside a frame".into());
        }
    }
    let request = split_tagged(&body)
        .map_err(|e| Refused(ErrorCode::Malformed, format!("cannot decode request: {e}")))
        .and_then(|(_, message)| decode_request(message));
    Next::Request { id, request, held }
}

/// Refuses what a pipeline cannot carry.
fn pipelinable(request: Request) -> Result<Request, Refused> {
    if request.is_pipelinable() {
        Ok(request)
    } else {
        Err(Refused(
            ErrorCode::BadRequest,
            format!(
                "{} cannot be pipelined: send it on a stream of its own",
                request.kind()
            ),
        ))
    }
}

/// The one frame a pipelined request's reply is.
fn single(reply: Reply) -> Response {
    match reply {
        Reply::One(response) => response,
        Reply::Many(mut responses) if responses.len() == 1 => {
            responses.pop().expect("one response")
        }
        _ => Response::Error {
            code: ErrorCode::Internal,
            message: "a pipelined request had more than one answer".into(),
        },
    }
}
