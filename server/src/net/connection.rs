//! One client connection. The first stream must carry `Hello { token }`; every later stream
//! carries one request, answered by one frame or a sequence of frames.

use std::sync::{Arc, OnceLock};

use kappakv_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{DecodeError, ErrorCode, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::Instrument as _;

use super::close;
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
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let role: Arc<OnceLock<Role>> = Arc::new(OnceLock::new());
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
        tracker.spawn(
            async move { serve_stream(send, recv, &node, service, &role, &cancel).await }
                .instrument(tracing::debug_span!("stream")),
        );
    }
}

/// Why a request could not be read.
enum ReadRequest {
    Frame(Response),
    Gone,
}

/// Largest request frame before the connection has authenticated: a hello is tiny, and nothing
/// larger is read from a stranger.
const PRE_AUTH_FRAME_BYTES: usize = 4 * 1024;

/// Reads one request frame of at most `max_len` bytes. The body buffer grows as bytes arrive,
/// so a length prefix alone never makes the node allocate.
async fn read_request(recv: &mut RecvStream, max_len: usize) -> Result<Request, ReadRequest> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|_| ReadRequest::Gone)?;
    let len = frame_len(header, max_len).map_err(|e| {
        ReadRequest::Frame(Response::Error {
            code: ErrorCode::TooLarge,
            message: format!("request frame: {e}"),
        })
    })?;
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            _ => return Err(ReadRequest::Gone),
        }
    }
    decode_body::<Request>(&body).map_err(|e| {
        let DecodeError::Malformed(msg) = &e else {
            unreachable!("decode_body only reports malformed input")
        };
        let code = if msg.contains("unknown variant") {
            ErrorCode::UnknownRequest
        } else {
            ErrorCode::Malformed
        };
        ReadRequest::Frame(Response::Error {
            code,
            message: format!("cannot decode request: {msg}"),
        })
    })
}

async fn send(send: &mut SendStream, response: &Response) -> bool {
    send.write_all(&encode_frame(response)).await.is_ok()
}

async fn serve_stream(
    mut tx: SendStream,
    mut rx: RecvStream,
    node: &Node,
    service: RequestService,
    role: &OnceLock<Role>,
    cancel: &CancellationToken,
) {
    let _open = telemetry::OpenGuard::stream();
    let request = tokio::time::timeout(
        node.config.request_timeout(),
        read_request(
            &mut rx,
            if role.get().is_some() {
                MAX_FRAME_BYTES
            } else {
                PRE_AUTH_FRAME_BYTES
            },
        ),
    )
    .await;
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(ReadRequest::Frame(response))) => {
            tracing::debug!(?response, "bad request frame");
            send(&mut tx, &response).await;
            let _ = tx.finish();
            let _ = rx.stop(0u32.into());
            return;
        }
        Ok(Err(ReadRequest::Gone)) => return,
        Err(_) => {
            send(
                &mut tx,
                &Response::Error {
                    code: ErrorCode::Timeout,
                    message: "request not received in time".into(),
                },
            )
            .await;
            let _ = tx.finish();
            return;
        }
    };
    let reply = match request {
        Request::Hello { token } => {
            if let Some(r) = node.tokens.role_of(&token) {
                let granted = *role.get_or_init(|| r);
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
        request => match role.get() {
            None => Reply::One(Response::Error {
                code: ErrorCode::Unauthorized,
                message: "authenticate first: send hello with a token from the ticket".into(),
            }),
            Some(&role) => {
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
        },
    };
    match reply {
        Reply::One(r) => {
            send(&mut tx, &r).await;
        }
        Reply::Many(rs) => {
            for r in &rs {
                if !send(&mut tx, r).await {
                    return;
                }
            }
        }
        Reply::Watch { prefix, from_lsn } => {
            super::watch::stream(node, &mut tx, &mut rx, prefix, from_lsn, cancel).await;
        }
    }
    let _ = tx.finish();
}
