//! One client connection. The first stream must carry `Hello { token }`; every later stream
//! carries one request, answered by one frame or a sequence of frames.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kappakv_protocol::frame::{Decoded, FRAME_HEADER_LEN, decode_message, encode_frame, frame_len};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{ErrorCode, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use super::close;
use super::endpoint::Pending;
use crate::auth::Role;
use crate::handlers::Reply;
use crate::node::Node;
use crate::service::{Call, RequestService, stack_error};
use crate::telemetry;

/// Serves a client connection until it closes or `cancel` fires.
pub async fn serve_client(
    conn: quinn::Connection,
    node: Arc<Node>,
    service: RequestService,
    buffers: Buffers,
    pending: Pending,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let role: Arc<OnceLock<Role>> = Arc::new(OnceLock::new());
    let pending = Arc::new(pending);
    tracing::debug!("client connected");
    // A connection that has not authenticated in time gives its slot back: keep-alives alone
    // would otherwise hold it forever.
    let auth_deadline = tokio::time::Instant::now() + node.config.request_timeout();
    loop {
        let (send, recv) = tokio::select! {
            () = cancel.cancelled() => {
                conn.close(close::SHUTDOWN.into(), b"node shutting down");
                break;
            }
            () = tokio::time::sleep_until(auth_deadline), if role.get().is_none() => {
                tracing::info!("closing a client connection that did not authenticate in time");
                conn.close(close::AUTH_TIMEOUT.into(), b"authenticate with hello first");
                break;
            }
            () = pending.evicted(), if role.get().is_none() => {
                tracing::info!(
                    "closing a client connection that had not authenticated: a newer one needed its slot"
                );
                conn.close(close::AUTH_TIMEOUT.into(), b"authenticate with hello first");
                break;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(reason = %e, "client connection closed");
                    break;
                }
            },
        };
        let node = node.clone();
        let service = service.clone();
        let role = role.clone();
        let cancel = cancel.clone();
        let buffers = buffers.clone();
        let pending = pending.clone();
        let remote = conn.remote_address();
        tracker.spawn(
            async move {
                let auth = Auth {
                    role: &role,
                    pending: &pending,
                    remote,
                };
                serve_stream(send, recv, &node, service, &buffers, auth, &cancel).await;
            }
            .instrument(tracing::debug_span!("stream")),
        );
    }
}

/// Bytes of request and reply frames that client streams may make the node hold at once, over
/// all connections, with the state of each request in flight on a pipeline. A request whose
/// body would go over it (the rest of the body is then read and dropped), or a read whose reply
/// would, is answered `Busy` instead: how much a client can make the node buffer does not grow
/// with the number of streams or pipelined requests it opens or with how slowly it sends or
/// reads.
pub const BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Replies up to this size are not counted against [`BUFFER_BYTES`], so that an acknowledgement
/// is never held back: every write's reply is this small.
const UNCOUNTED_REPLY_BYTES: usize = 4 * 1024;

/// The budget of [`BUFFER_BYTES`], shared by every client stream (one permit per byte), and
/// the watches' own ([`super::watch::Budget`]). One per endpoint; cloning shares it.
#[derive(Clone, Debug)]
pub struct Buffers {
    streams: Arc<Semaphore>,
    watches: super::watch::Budget,
}

impl Buffers {
    /// A budget of `bytes` for requests and replies, and the watches' budget.
    pub fn new(bytes: usize) -> Self {
        Self {
            streams: Arc::new(Semaphore::new(bytes)),
            watches: super::watch::Budget::default(),
        }
    }

    /// Adds `bytes` to what `held` counts, if the budget has them.
    pub(super) fn grow(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> bool {
        let Ok(n) = u32::try_from(bytes) else {
            return false;
        };
        match self.streams.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

pub(super) fn busy_buffers() -> Refused {
    Refused(
        ErrorCode::Busy,
        "the node holds its limit of request and reply bytes; retry shortly".into(),
    )
}

/// What a stream knows of its connection's authentication.
#[derive(Clone, Copy)]
struct Auth<'a> {
    role: &'a OnceLock<Role>,
    pending: &'a Pending,
    /// Where the connection comes from: a joining node is dialled back there.
    remote: std::net::SocketAddr,
}

/// Why a request could not be read.
pub(super) enum ReadRequest {
    Frame(Response),
    /// Over the buffer budget, with this many bytes of the body still to come.
    Busy {
        unread: usize,
    },
    Gone,
}

/// Largest request frame before the connection has authenticated: a hello is tiny, and nothing
/// larger is read from a stranger.
const PRE_AUTH_FRAME_BYTES: usize = 4 * 1024;

/// Reads one request frame of at most `max_len` bytes. The body buffer grows as bytes arrive,
/// so a length prefix alone never makes the node allocate, and every byte of it is counted in
/// `held` against `buffers` first.
async fn read_request(
    recv: &mut RecvStream,
    first: &[u8],
    max_len: usize,
    buffers: &Buffers,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<Request, ReadRequest> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..first.len()].copy_from_slice(first);
    recv.read_exact(&mut header[first.len()..])
        .await
        .map_err(|_| ReadRequest::Gone)?;
    let len = frame_len(header, max_len).map_err(|e| {
        ReadRequest::Frame(Response::Error {
            code: ErrorCode::TooLarge,
            message: format!("request frame: {e}"),
        })
    })?;
    let mut body = Vec::new();
    read_body(recv, &mut body, len, buffers, held).await?;
    decode_request(&body).map_err(|refused| ReadRequest::Frame(refused.into()))
}

/// Reads the rest of a frame body of `len` bytes into `body`, which may hold its first bytes
/// already. The buffer grows as bytes arrive, geometrically but never past `len`, and each
/// growth is counted in `held` against `buffers` first.
pub(super) async fn read_body(
    recv: &mut RecvStream,
    body: &mut Vec<u8>,
    len: usize,
    buffers: &Buffers,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), ReadRequest> {
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => {
                let needed = body.len() + chunk.bytes.len();
                if needed > body.capacity() {
                    let capacity = needed.max((2 * body.capacity()).min(len));
                    if !buffers.grow(held, capacity - body.capacity()) {
                        return Err(ReadRequest::Busy {
                            unread: len - body.len(),
                        });
                    }
                    body.reserve_exact(capacity - body.len());
                }
                body.extend_from_slice(&chunk.bytes);
            }
            _ => return Err(ReadRequest::Gone),
        }
    }
    Ok(())
}

/// A request answered with an error without running: its code and what to say.
#[derive(Debug)]
pub(super) struct Refused(pub(super) ErrorCode, pub(super) String);

impl From<Refused> for Response {
    fn from(Refused(code, message): Refused) -> Self {
        Response::Error { code, message }
    }
}

/// Decodes a request, or says why not.
pub(super) fn decode_request(body: &[u8]) -> Result<Request, Refused> {
    match decode_message::<Request>(body) {
        Ok(Decoded::Message(request)) => Ok(request),
        Ok(Decoded::UnknownKind(kind)) => Err(Refused(
            ErrorCode::UnknownRequest,
            format!("this node does not know request {kind:?} (a client newer than the node?)"),
        )),
        Err(e) => Err(Refused(
            ErrorCode::Malformed,
            format!("cannot decode request: {e}"),
        )),
    }
}

/// Runs an authenticated request through the service stack and counts it in the metrics.
pub(super) async fn call(service: RequestService, request: Request, role: Role) -> Reply {
    let kind = request.kind();
    let started = std::time::Instant::now();
    let reply = match service.oneshot(Call { request, role }).await {
        Ok(reply) => reply,
        Err(e) => Reply::One(stack_error(&e)),
    };
    let outcome = match &reply {
        Reply::One(Response::Error { code, .. }) => telemetry::outcome(*code),
        _ => "ok",
    };
    telemetry::request(kind, outcome, started.elapsed());
    reply
}

/// Whether a reply of `len` bytes may be sent: small ones always, larger ones if `held`
/// (what the request counted) covers them or the budget has the rest.
pub(super) fn reply_fits(
    buffers: &Buffers,
    held: &mut Option<OwnedSemaphorePermit>,
    len: usize,
) -> bool {
    let counted = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
    len <= UNCOUNTED_REPLY_BYTES || len <= counted || buffers.grow(held, len - counted)
}

/// Reads and drops up to `n` bytes.
pub(super) async fn discard(rx: &mut RecvStream, mut n: usize) {
    while n > 0 {
        match rx.read_chunk(n, true).await {
            Ok(Some(chunk)) => n = n.saturating_sub(chunk.bytes.len()),
            _ => return,
        }
    }
}

/// Writes `bytes`, giving up after `timeout`: a client that stops reading must not hold what
/// the node buffered for it. A write that timed out resets the stream.
pub(super) async fn send(tx: &mut SendStream, bytes: &[u8], timeout: Duration) -> bool {
    if let Ok(written) = tokio::time::timeout(timeout, tx.write_all(bytes)).await {
        written.is_ok()
    } else {
        tracing::debug!("client stopped reading its reply; resetting the stream");
        let _ = tx.reset(0u32.into());
        false
    }
}

async fn serve_stream(
    mut tx: SendStream,
    mut rx: RecvStream,
    node: &Node,
    service: RequestService,
    buffers: &Buffers,
    auth: Auth<'_>,
    cancel: &CancellationToken,
) {
    let role = auth.role;
    let open = telemetry::OpenGuard::stream();
    let timeout = node.config.request_timeout();
    // What this stream's request and reply count against `buffers`, released when it ends.
    let mut held = None;
    // The request timeout runs from the stream's first byte. Until then the stream holds its
    // slot of the connection's stream credit and nothing else, and it may be open well before
    // its bytes come: the first bytes of any later stream open it too, and a packet that an
    // overloaded node had no room for is sent again only after a delay.
    let first = match rx.read_chunk(FRAME_HEADER_LEN, true).await {
        Ok(Some(chunk)) => chunk.bytes,
        _ => return,
    };
    let request = tokio::time::timeout(
        timeout,
        read_request(
            &mut rx,
            &first,
            if role.get().is_some() {
                MAX_FRAME_BYTES
            } else {
                PRE_AUTH_FRAME_BYTES
            },
            buffers,
            &mut held,
        ),
    )
    .await;
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(ReadRequest::Frame(response))) => {
            tracing::debug!(?response, "bad request frame");
            drop(held);
            send(&mut tx, &encode_frame(&response), timeout).await;
            let _ = tx.finish();
            let _ = rx.stop(0u32.into());
            return;
        }
        Ok(Err(ReadRequest::Busy { unread })) => {
            tracing::debug!("request refused: client stream buffers are full");
            drop(held);
            send(
                &mut tx,
                &encode_frame(&Response::from(busy_buffers())),
                timeout,
            )
            .await;
            let _ = tx.finish();
            // The rest of the body is read and dropped as it comes, never held, so that the
            // client's write completes and it reads the answer.
            let _ = tokio::time::timeout(timeout, discard(&mut rx, unread)).await;
            return;
        }
        Ok(Err(ReadRequest::Gone)) => return,
        Err(_) => {
            drop(held);
            let response = Response::Error {
                code: ErrorCode::Timeout,
                message: "request not received in time".into(),
            };
            send(&mut tx, &encode_frame(&response), timeout).await;
            let _ = tx.finish();
            return;
        }
    };
    if matches!(request, Request::Pipeline)
        && let Some(&role) = role.get()
    {
        drop(held);
        drop(open);
        let _pipeline = telemetry::OpenGuard::pipeline();
        if send(&mut tx, &encode_frame(&Response::Ok), timeout).await {
            // Boxed, as the watch below: a pipeline's state is no part of every stream's task.
            Box::pin(super::pipeline::serve(
                tx, rx, node, service, buffers, role, cancel,
            ))
            .await;
        }
        return;
    }
    if !matches!(request, Request::Watch { .. } | Request::Sync { .. }) {
        // Nothing more is read from the stream: the client's bytes past its frame, if any,
        // are dropped instead of held until the stream ends.
        let _ = rx.stop(0u32.into());
    }
    let reply = match request {
        Request::Hello { token } => {
            if let Some(r) = node.tokens.role_of(&token) {
                let granted = *role.get_or_init(|| r);
                auth.pending.authenticated();
                Reply::One(Response::Hello {
                    node_id: node.node_id,
                    read_only: granted == Role::ReadOnly,
                })
            } else {
                tracing::info!("client presented an unknown token");
                Reply::One(Response::Error {
                    code: ErrorCode::Unauthorized,
                    message: "unknown token; use a ticket printed by `kappakv id`".into(),
                })
            }
        }
        // The invite's secret is the credential: no token before it.
        request @ Request::Join { .. } => crate::handlers::join(node, request, auth.remote),
        request => match role.get() {
            None => Reply::One(Response::Error {
                code: ErrorCode::Unauthorized,
                message: "authenticate first: send hello with a token from the ticket".into(),
            }),
            Some(&role) => call(service, request, role).await,
        },
    };
    let bytes = match reply {
        Reply::One(r) => encode_frame(&r),
        Reply::Many(rs) => {
            let mut bytes = Vec::new();
            for r in &rs {
                bytes.extend_from_slice(&encode_frame(r));
            }
            bytes
        }
        Reply::Watch { prefix, from_lsn } => {
            drop(held);
            // Boxed, as the sync session below: a stream's task would otherwise be as large
            // as these rare, large futures, and every request's task is moved a few times
            // as it is spawned.
            Box::pin(super::watch::stream(
                node,
                &buffers.watches,
                &mut tx,
                &mut rx,
                prefix,
                from_lsn,
                cancel,
            ))
            .await;
            let _ = tx.finish();
            return;
        }
        Reply::Sync(mode) => {
            drop(held);
            let Some(replication) = node.replication() else {
                return;
            };
            let Some(permit) = replication.stream_permit() else {
                let busy = Response::Error {
                    code: ErrorCode::Busy,
                    message: "too many sync sessions through clients at once; retry later".into(),
                };
                send(&mut tx, &encode_frame(&busy), timeout).await;
                let _ = tx.finish();
                return;
            };
            if send(&mut tx, &encode_frame(&Response::SyncStarted), timeout).await
                && let Err(e) =
                    Box::pin(replication.serve_stream(&mut rx, &mut tx, mode, cancel)).await
            {
                tracing::info!(error = %e, "sync stream failed");
                // Not a clean end: the other side must not take it for one.
                let _ = tx.reset(1u32.into());
            }
            drop(permit);
            return;
        }
    };
    // The request's bytes are gone; what is held now is the reply. Only reads have replies
    // over the uncounted size, and a read can always be refused.
    let bytes = if reply_fits(buffers, &mut held, bytes.len()) {
        bytes
    } else {
        drop(bytes);
        encode_frame(&Response::from(busy_buffers()))
    };
    if send(&mut tx, &bytes, timeout).await {
        let _ = tx.finish();
    }
}
