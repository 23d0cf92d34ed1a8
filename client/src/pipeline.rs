//! The pipeline of a connection: one long-lived stream that carries the single-answer requests
//! of every task using the client (`Request::Pipeline`).
//!
//! Calls made at the same time share frames and packets: a call appends its `[id, request]`
//! frame to a buffer and wakes the writer task, which sends everything gathered in one write;
//! the reader task hands each `[id, response]` answer to the call waiting for that id. Each
//! call is still answered on its own, as soon as the node has done it (a write, once its group
//! commit is durable). At most [`MAX_PIPELINED_REQUESTS`] calls are in flight; later ones wait
//! for a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kappakv_protocol::error::DecodeError;
use kappakv_protocol::frame::{
    FrameDecode, decode_body, decode_frame, encode_frame, encode_tagged_frame, split_tagged,
};
use kappakv_protocol::limits::{MAX_FRAME_BYTES, MAX_PIPELINED_REQUESTS};
use kappakv_protocol::{ErrorCode, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::connection::read_frame;
use crate::error::{ProtocolError, RequestError, TransportError};

/// A connection's pipeline. Dropping it finishes the stream once the calls in flight are sent.
#[derive(Debug)]
pub(crate) struct Pipeline {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: frames are waiting, or the pipeline is closing.
    wake: Notify,
    /// One permit per call in flight.
    slots: Semaphore,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Frames not yet handed to the stream.
    out: Vec<u8>,
    /// The calls waiting for their answer, by id.
    waiting: HashMap<u64, oneshot::Sender<Result<Response, Broken>>>,
    /// Why the pipeline can carry no more calls.
    broken: Option<Broken>,
    /// The client let go of the pipeline: the writer finishes the stream.
    closing: bool,
}

/// Why a pipeline ended.
#[derive(Clone, Debug)]
enum Broken {
    Lost(quinn::ConnectionError),
    Reset(u64),
    /// The node finished its side with calls unanswered.
    Ended,
    Protocol(String),
}

impl Broken {
    fn error(&self, request: &'static str) -> RequestError {
        match self {
            Broken::Lost(e) => RequestError::ConnectionLost {
                source: TransportError::connection(e.clone()),
            },
            Broken::Reset(code) => RequestError::StreamReset {
                request,
                code: *code,
            },
            Broken::Ended => ProtocolError::Truncated { request }.into(),
            Broken::Protocol(why) => {
                ProtocolError::Decode(DecodeError::Malformed(why.clone())).into()
            }
        }
    }

    fn write(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => Broken::Lost(e),
            quinn::WriteError::Stopped(code) => Broken::Reset(code.into_inner()),
            _ => Broken::Reset(0),
        }
    }

    fn read(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(e) => Broken::Lost(e),
            quinn::ReadError::Reset(code) => Broken::Reset(code.into_inner()),
            _ => Broken::Reset(0),
        }
    }
}

/// A call that did not get its answer.
pub(crate) struct Failed {
    /// False only when the request certainly never left this process.
    pub(crate) maybe_sent: bool,
    pub(crate) error: RequestError,
}

impl Pipeline {
    /// Opens a pipeline on `conn`; `None` when the node does not know pipelines (an older
    /// node), so that requests go on streams of their own.
    pub(crate) async fn open(conn: &quinn::Connection) -> Result<Option<Self>, RequestError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Broken::Lost(e).error("pipeline"))?;
        if let Err(e) = send.write_all(&encode_frame(&Request::Pipeline)).await {
            return Err(Broken::write(e).error("pipeline"));
        }
        match read_frame(&mut recv, "pipeline").await? {
            Some(Response::Ok) => {}
            Some(Response::Error {
                code: ErrorCode::UnknownRequest,
                ..
            }) => return Ok(None),
            Some(Response::Error { code, message }) => {
                return Err(RequestError::Server { code, message });
            }
            Some(other) => {
                return Err(ProtocolError::Unexpected {
                    request: "pipeline",
                    got: crate::connection::response_kind(&other),
                }
                .into());
            }
            None => {
                return Err(ProtocolError::Truncated {
                    request: "pipeline",
                }
                .into());
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            slots: Semaphore::new(MAX_PIPELINED_REQUESTS),
        });
        tokio::spawn(write(shared.clone(), send));
        tokio::spawn(read(shared.clone(), recv));
        Ok(Some(Self { shared }))
    }

    /// Sends `request` and waits for its answer. A `Response::Error` is returned as is.
    pub(crate) async fn call(&self, request: &Request) -> Result<Response, Failed> {
        let kind = request.kind();
        let _slot = self
            .shared
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if let Some(broken) = &state.broken {
                return Err(Failed {
                    maybe_sent: false,
                    error: broken.error(kind),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            encode_tagged_frame(id, request, &mut state.out);
            state.waiting.insert(id, tx);
            id
        };
        self.shared.wake.notify_one();
        // A call given up (its timeout) forgets its id, so that a lost answer holds nothing.
        let forget = Forget {
            shared: &self.shared,
            id,
        };
        let answer = rx.await;
        // Answered or failed: the id has left `waiting` either way.
        std::mem::forget(forget);
        match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(broken)) => Err(Failed {
                maybe_sent: true,
                error: broken.error(kind),
            }),
            Err(_) => Err(Failed {
                maybe_sent: true,
                error: Broken::Ended.error(kind),
            }),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

struct Forget<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.id);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no panics while the pipeline's state is held")
    }

    /// Ends the pipeline: every waiting call gets `why`, later calls are refused.
    fn fail(&self, why: Broken) {
        let mut state = self.lock();
        for (_, waiter) in state.waiting.drain() {
            let _ = waiter.send(Err(why.clone()));
        }
        state.broken.get_or_insert(why);
        state.out = Vec::new();
        drop(state);
        // The writer lets go of the stream.
        self.wake.notify_one();
    }
}

/// Sends what the calls gathered, one write for all the frames waiting at once.
async fn write(shared: Arc<Shared>, mut send: SendStream) {
    let mut buf = Vec::new();
    loop {
        shared.wake.notified().await;
        let closing = {
            let mut state = shared.lock();
            if state.broken.is_some() {
                drop(state);
                let _ = send.reset(0u32.into());
                return;
            }
            std::mem::swap(&mut buf, &mut state.out);
            state.closing
        };
        if !buf.is_empty() {
            if let Err(e) = send.write_all(&buf).await {
                shared.fail(Broken::write(e));
                return;
            }
            buf.clear();
        }
        if closing {
            let _ = send.finish();
            return;
        }
    }
}

/// Hands each answer to the call waiting for its id.
async fn read(shared: Arc<Shared>, mut recv: RecvStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                // The node finishes only after the client did, so nothing is left waiting
                // unless the node broke off.
                shared.fail(Broken::Ended);
                return;
            }
            Err(e) => {
                shared.fail(Broken::read(e));
                return;
            }
        }
        let mut used = 0;
        loop {
            match decode_frame(&buf[used..], MAX_FRAME_BYTES) {
                Ok(FrameDecode::NeedMore { .. }) => break,
                Ok(FrameDecode::Frame { body, used: n }) => {
                    used += n;
                    match split_tagged(body) {
                        Ok((id, message)) => {
                            // An answer this version cannot read fails its call only.
                            let answer = decode_body::<Response>(message)
                                .map_err(|e| Broken::Protocol(e.to_string()));
                            if let Some(waiter) = shared.lock().waiting.remove(&id) {
                                let _ = waiter.send(answer);
                            }
                        }
                        Err(e) => {
                            shared.fail(Broken::Protocol(e.to_string()));
                            let _ = recv.stop(0u32.into());
                            return;
                        }
                    }
                }
                Err(e) => {
                    shared.fail(Broken::Protocol(e.to_string()));
                    let _ = recv.stop(0u32.into());
                    return;
                }
            }
        }
        buf.drain(..used);
    }
}
