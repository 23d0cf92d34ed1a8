//! One QUIC connection to a node: dialling with the node id pinned, the hello, and the
//! request/response exchange on a bidirectional stream (`u32 LE length | MessagePack` frames).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kappakv_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::tls::{self, PinnedServerVerifier, node_id_of_cert};
use kappakv_protocol::{ALPN_CLIENT, NodeAddr, NodeId, Request, Response, Ticket};
use quinn::{RecvStream, SendStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::ClientOptions;
use crate::error::{ConnectError, ProtocolError, RequestError, TransportError};

/// What the node said in answer to the hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) node_id: NodeId,
    pub(crate) read_only: bool,
}

/// Opens a local UDP endpoint able to reach every address of the ticket: IPv4 when they are
/// all IPv4 addresses, else dual-stack IPv6 (IPv4 where the machine has no IPv6).
pub(crate) fn open_endpoint(ticket: &Ticket) -> Result<quinn::Endpoint, ConnectError> {
    let v4_only = ticket
        .addrs
        .iter()
        .all(|a| a.ip().is_some_and(|ip| ip.is_ipv4()));
    if !v4_only && let Ok(endpoint) = quinn::Endpoint::client((Ipv6Addr::UNSPECIFIED, 0).into()) {
        return Ok(endpoint);
    }
    quinn::Endpoint::client((Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(|source| ConnectError::Bind { source })
}

/// The socket addresses of the ticket, names resolved now, that `endpoint` can reach.
async fn resolve(
    endpoint: &quinn::Endpoint,
    ticket: &Ticket,
) -> (Vec<SocketAddr>, Option<ConnectError>) {
    let v6 = endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut addrs = Vec::new();
    let mut failed = None;
    for addr in &ticket.addrs {
        match addr {
            NodeAddr::Ip(a) => addrs.push(*a),
            NodeAddr::Name { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(found) => addrs.extend(found),
                    Err(source) => {
                        tracing::debug!(%host, error = %source, "cannot resolve");
                        failed = Some(ConnectError::Resolve {
                            host: host.clone(),
                            source,
                        });
                    }
                }
            }
        }
    }
    addrs.retain(|a| v6 || a.is_ipv4());
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    (addrs, failed)
}

/// Dials every address of the ticket at once (names resolved at each dial) and returns the
/// first connection authenticated with the ticket's node key and token; the other attempts
/// are dropped.
///
/// A refused token ends the search at once: every address is the same node.
pub(crate) async fn dial(
    endpoint: &quinn::Endpoint,
    ticket: &Ticket,
    options: &ClientOptions,
) -> Result<(quinn::Connection, Hello), ConnectError> {
    let (addrs, failed) = resolve(endpoint, ticket).await;
    let mut last = failed.unwrap_or(ConnectError::NoAddress);
    let mut attempts: FuturesUnordered<_> = addrs
        .into_iter()
        .map(|addr| async move { (addr, dial_one(endpoint, ticket, options, addr).await) })
        .collect();
    while let Some((addr, result)) = attempts.next().await {
        match result {
            Ok(ok) => return Ok(ok),
            Err(e @ (ConnectError::Unauthorized { .. } | ConnectError::Refused { .. })) => {
                return Err(e);
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "cannot connect");
                // The most telling failure wins: a wrong node says more than a silent address.
                if !matches!(last, ConnectError::WrongNode { .. }) {
                    last = e;
                }
            }
        }
    }
    Err(last)
}

async fn dial_one(
    endpoint: &quinn::Endpoint,
    ticket: &Ticket,
    options: &ClientOptions,
    addr: SocketAddr,
) -> Result<(quinn::Connection, Hello), ConnectError> {
    let seen = Arc::new(Mutex::new(None));
    let config = quic_config(ticket.node_id, options, seen.clone())?;
    let expected = ticket.node_id;
    let wrong_node = |seen: &Mutex<Option<NodeId>>| {
        let found = *seen.lock().expect("no panics while the slot is held");
        found
            .filter(|f| *f != expected)
            .map(|f| ConnectError::WrongNode {
                addr,
                expected,
                found: Some(f),
            })
    };
    let attempt = async {
        let connecting = endpoint
            .connect_with(config, addr, tls::SERVER_NAME)
            .map_err(|e| ConnectError::Dial {
                addr,
                source: TransportError::dial(e),
            })?;
        let conn = connecting.await.map_err(|source| {
            wrong_node(&seen).unwrap_or(ConnectError::Handshake {
                addr,
                source: TransportError::connection(source),
            })
        })?;
        let hello = hello(&conn, &ticket.token, addr).await?;
        if hello.node_id != expected {
            conn.close(0u32.into(), b"wrong node");
            return Err(ConnectError::WrongNode {
                addr,
                expected,
                found: Some(hello.node_id),
            });
        }
        Ok((conn, hello))
    };
    match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            addr,
            after: options.connect_timeout,
        }),
    }
}

async fn hello(
    conn: &quinn::Connection,
    token: &str,
    addr: SocketAddr,
) -> Result<Hello, ConnectError> {
    let request = Request::Hello {
        token: token.to_string(),
    };
    let wrap = |e: RequestError| match e {
        RequestError::ConnectionLost { source } => ConnectError::Handshake { addr, source },
        other => ConnectError::Hello {
            addr,
            source: Box::new(other),
        },
    };
    let (_send, mut recv) = open(conn, &request, true)
        .await
        .map_err(|f| wrap(f.error))?;
    match read_frame(&mut recv, "hello").await.map_err(wrap)? {
        Some(Response::Hello { node_id, read_only }) => Ok(Hello { node_id, read_only }),
        Some(Response::Error {
            code: kappakv_protocol::ErrorCode::Unauthorized,
            message,
        }) => Err(ConnectError::Unauthorized { message }),
        Some(Response::Error { code, message }) => Err(ConnectError::Refused { code, message }),
        Some(other) => Err(wrap(
            ProtocolError::Unexpected {
                request: "hello",
                got: response_kind(&other),
            }
            .into(),
        )),
        None => Err(wrap(ProtocolError::Truncated { request: "hello" }.into())),
    }
}

fn quic_config(
    expected: NodeId,
    options: &ClientOptions,
    seen: Arc<Mutex<Option<NodeId>>>,
) -> Result<quinn::ClientConfig, ConnectError> {
    let mut tls = tls::client_config(expected, ALPN_CLIENT, None)
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    tls.dangerous()
        .set_certificate_verifier(Arc::new(RecordingVerifier {
            inner: PinnedServerVerifier::new(expected),
            seen,
        }));
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(options.keep_alive);
    transport.max_idle_timeout(Some(idle_timeout(options.idle_timeout)));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn idle_timeout(d: Duration) -> quinn::IdleTimeout {
    quinn::IdleTimeout::try_from(d).unwrap_or_else(|_| quinn::VarInt::MAX.into())
}

/// The pinned verifier, which also remembers which node id the certificate carried so that a
/// mismatch can be reported as "the node at ADDR is not NODEID".
#[derive(Debug)]
struct RecordingVerifier {
    inner: PinnedServerVerifier,
    seen: Arc<Mutex<Option<NodeId>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(id) = node_id_of_cert(end_entity) {
            *self.seen.lock().expect("no panics while the slot is held") = Some(id);
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A request that could not be sent, and whether the node may have received all of it.
#[derive(Debug)]
pub(crate) struct SendFailure {
    /// False only when the node certainly never saw the whole request frame.
    pub(crate) maybe_sent: bool,
    pub(crate) error: RequestError,
}

/// Opens a stream and writes `request` as one frame; `finish` closes the send side after it.
pub(crate) async fn open(
    conn: &quinn::Connection,
    request: &Request,
    finish: bool,
) -> Result<(SendStream, RecvStream), SendFailure> {
    let kind = request.kind();
    let frame = encode_frame(request);
    let (mut send, recv) = conn.open_bi().await.map_err(|source| SendFailure {
        maybe_sent: false,
        error: RequestError::ConnectionLost {
            source: TransportError::connection(source),
        },
    })?;
    // Until `write_all` returns, the node cannot hold the whole frame, so it cannot act on it.
    match send.write_all(&frame).await {
        Ok(()) => {}
        // The node refused the rest of the frame without acting on it (it is too large, or
        // the node is busy); the answer on the stream says which.
        Err(quinn::WriteError::Stopped(_)) => return Ok((send, recv)),
        Err(e) => {
            return Err(SendFailure {
                maybe_sent: false,
                error: write_error(e, kind),
            });
        }
    }
    tracing::trace!(kind, bytes = frame.len(), "request sent");
    if finish {
        // Only fails if the stream is already closed, which a read will then report.
        let _ = send.finish();
    }
    Ok((send, recv))
}

fn write_error(e: quinn::WriteError, request: &'static str) -> RequestError {
    match e {
        quinn::WriteError::ConnectionLost(source) => RequestError::ConnectionLost {
            source: TransportError::connection(source),
        },
        quinn::WriteError::Stopped(code) => RequestError::StreamReset {
            request,
            code: code.into_inner(),
        },
        quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
            RequestError::StreamReset { request, code: 0 }
        }
    }
}

fn read_error(e: quinn::ReadError, request: &'static str) -> RequestError {
    match e {
        quinn::ReadError::ConnectionLost(source) => RequestError::ConnectionLost {
            source: TransportError::connection(source),
        },
        quinn::ReadError::Reset(code) => RequestError::StreamReset {
            request,
            code: code.into_inner(),
        },
        quinn::ReadError::ClosedStream
        | quinn::ReadError::IllegalOrderedRead
        | quinn::ReadError::ZeroRttRejected => RequestError::StreamReset { request, code: 0 },
    }
}

/// Reads the next response frame, `None` when the node finished the stream between frames.
///
/// A `Response::Error` frame is returned as is; callers turn it into [`RequestError::Server`].
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    request: &'static str,
) -> Result<Option<Response>, RequestError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(ProtocolError::Truncated { request }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e, request)),
    }
    let len = frame_len(header, MAX_FRAME_BYTES).map_err(ProtocolError::from)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(ProtocolError::Truncated { request }.into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e, request)),
    }
    let response = decode_body::<Response>(&body).map_err(ProtocolError::from)?;
    tracing::trace!(request, bytes = len, "response frame");
    Ok(Some(response))
}

/// A short name of a response, for errors.
pub(crate) fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::Hello { .. } => "hello",
        Response::Written { .. } => "written",
        Response::Versions(_) => "versions",
        Response::ScanEnd { .. } => "scan_end",
        Response::QueryEnd { .. } => "query_end",
        Response::History { .. } => "history",
        Response::Change(_) => "change",
        Response::Heartbeat { .. } => "heartbeat",
        Response::Status(_) => "status",
        Response::Ok => "ok",
        Response::SyncStarted => "sync_started",
        Response::Nearby { .. } => "nearby",
        Response::Invite { .. } => "invite",
        Response::Joined { .. } => "joined",
        Response::Error { .. } => "error",
        _ => "unknown",
    }
}
