//! The handshake matrix over real QUIC on 127.0.0.1: who gets in, on which protocol, with which
//! key. Each row dials one node with raw quinn, choosing the ALPN, the node id it pins and the
//! certificate it presents, and checks what the node lets it do:
//!
//! | ALPN   | pins       | certificate    | outcome                                              |
//! |--------|------------|----------------|------------------------------------------------------|
//! | client | the node   | none           | nothing served before a valid hello; then served     |
//! | client | the node   | a listed peer's| the same: a certificate never stands in for a token  |
//! | client | another id | none           | refused by the dialler's pin, no connection          |
//! | peer   | the node   | a listed peer's| a peer session: the node says its peer hello         |
//! | peer   | the node   | a stranger's   | closed as not a peer, nothing sent                   |
//! | peer   | the node   | none           | closed as not a peer, nothing sent                   |
//! | peer   | another id | a listed peer's| refused by the dialler's pin, no connection          |
//! | h3     | the node   | none           | refused in the TLS handshake (no common ALPN)        |
//! | none   | the node   | none           | refused in the TLS handshake (QUIC requires an ALPN) |

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use kappakv_protocol::frame::{FrameDecode, decode_body, decode_frame, encode_frame};
use kappakv_protocol::index::IndexQuery;
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::{
    ALPN_CLIENT, ALPN_PEER, ErrorCode, KeyRange, Keypair, NodeId, Request, Response, WriteOp,
};
use kappakv_server::net::close::NOT_A_PEER;
use kappakv_server::net::tls::TlsIdentity;
use kappakv_server::node::replication::driver::peer_transport;
use kappakv_tests::{TestNode, free_udp_port};

const WAIT: Duration = Duration::from_secs(10);
/// TLS alert `no_application_protocol` (120) as a QUIC CRYPTO_ERROR (0x100 + alert).
const NO_APPLICATION_PROTOCOL: u64 = 0x100 + 120;

#[derive(Clone, Copy, Debug)]
enum Alpn {
    Client,
    Peer,
    Other,
    Missing,
}

#[derive(Clone, Copy, Debug)]
enum Pin {
    TheNode,
    AnotherId,
}

#[derive(Clone, Copy, Debug)]
enum Cert {
    Missing,
    ListedPeer,
    Stranger,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Every request before hello is `Unauthorized`, a wrong token too; the right token is
    /// accepted and requests are then served.
    ClientAfterHello,
    /// The node opens its half of a sync and says hello.
    PeerSession,
    /// The node closes the connection with this application code, having sent nothing.
    Closed(u32),
    /// The dialler's own pin refuses the node's certificate.
    RefusedByPin,
    /// The node refuses the TLS handshake: no ALPN in common.
    RefusedAlpn,
}

struct Row {
    alpn: Alpn,
    pin: Pin,
    cert: Cert,
    outcome: Outcome,
}

const MATRIX: [Row; 9] = [
    Row {
        alpn: Alpn::Client,
        pin: Pin::TheNode,
        cert: Cert::Missing,
        outcome: Outcome::ClientAfterHello,
    },
    Row {
        alpn: Alpn::Client,
        pin: Pin::TheNode,
        cert: Cert::ListedPeer,
        outcome: Outcome::ClientAfterHello,
    },
    Row {
        alpn: Alpn::Client,
        pin: Pin::AnotherId,
        cert: Cert::Missing,
        outcome: Outcome::RefusedByPin,
    },
    Row {
        alpn: Alpn::Peer,
        pin: Pin::TheNode,
        cert: Cert::ListedPeer,
        outcome: Outcome::PeerSession,
    },
    Row {
        alpn: Alpn::Peer,
        pin: Pin::TheNode,
        cert: Cert::Stranger,
        outcome: Outcome::Closed(NOT_A_PEER),
    },
    Row {
        alpn: Alpn::Peer,
        pin: Pin::TheNode,
        cert: Cert::Missing,
        outcome: Outcome::Closed(NOT_A_PEER),
    },
    Row {
        alpn: Alpn::Peer,
        pin: Pin::AnotherId,
        cert: Cert::ListedPeer,
        outcome: Outcome::RefusedByPin,
    },
    Row {
        alpn: Alpn::Other,
        pin: Pin::TheNode,
        cert: Cert::Missing,
        outcome: Outcome::RefusedAlpn,
    },
    Row {
        alpn: Alpn::Missing,
        pin: Pin::TheNode,
        cert: Cert::Missing,
        outcome: Outcome::RefusedAlpn,
    },
];

/// Every kind of request a client can send, none of which may be served before hello.
fn every_request() -> Vec<Request> {
    vec![
        Request::Get {
            key: b"k".to_vec(),
            min_lsn: 0,
        },
        Request::Write {
            ops: vec![WriteOp {
                key: b"k".to_vec(),
                value: Some(b"stolen".to_vec()),
                supersedes: None,
            }],
            request_id: None,
        },
        Request::Scan {
            range: KeyRange::default(),
            limit: 10,
            min_lsn: 0,
        },
        Request::History {
            key: b"k".to_vec(),
            limit: 10,
            min_lsn: 0,
        },
        Request::Watch {
            prefix: vec![],
            from_lsn: Some(0),
        },
        Request::Status,
        Request::PeerAdd {
            node_id: NodeId([9; 32]),
            addr: "127.0.0.1:9".into(),
        },
        Request::PeerRemove {
            node_id: NodeId([9; 32]),
        },
        Request::PeerList,
        Request::Query {
            index: "any".into(),
            query: IndexQuery::exact("x"),
            limit: 10,
            start_after: None,
            min_lsn: 0,
            wait_ms: 0,
        },
    ]
}

/// Dials `node` as the row says; the endpoint must outlive the connection.
async fn dial(
    node: &TestNode,
    row: &Row,
    peer: &Keypair,
    stranger: &Keypair,
) -> anyhow::Result<(
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
)> {
    let cert = match row.cert {
        Cert::Missing => None,
        Cert::ListedPeer => Some(TlsIdentity::new(peer)?),
        Cert::Stranger => Some(TlsIdentity::new(stranger)?),
    }
    .map(|id| (id.chain.clone(), id.key.clone_key().into()));
    let pinned = match row.pin {
        Pin::TheNode => node.server.node_id(),
        Pin::AnotherId => stranger.node_id(),
    };
    let alpn: &[u8] = match row.alpn {
        Alpn::Client => ALPN_CLIENT,
        Alpn::Peer => ALPN_PEER,
        Alpn::Other | Alpn::Missing => b"h3",
    };
    let mut tls = kappakv_protocol::tls::client_config(pinned, alpn, cert)?;
    if matches!(row.alpn, Alpn::Missing) {
        tls.alpn_protocols.clear();
    }
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    config.transport_config(Arc::new(peer_transport()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let connecting = endpoint.connect_with(
        config,
        node.server.addr(),
        kappakv_protocol::tls::SERVER_NAME,
    )?;
    let conn = tokio::time::timeout(WAIT, connecting).await?;
    Ok((endpoint, conn))
}

/// Sends `msg` as one frame on a new bidirectional stream and reads the one response.
async fn request(conn: &quinn::Connection, msg: &Request) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(msg)).await?;
    let _ = send.finish();
    let buf = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20)).await??;
    match decode_frame(&buf, 1 << 20)? {
        FrameDecode::Frame { body, .. } => Ok(decode_body(body)?),
        FrameDecode::NeedMore { .. } => anyhow::bail!("incomplete response ({} bytes)", buf.len()),
    }
}

fn unauthorized(r: &Response) -> bool {
    matches!(
        r,
        Response::Error {
            code: ErrorCode::Unauthorized,
            ..
        }
    )
}

async fn check_client_after_hello(
    conn: &quinn::Connection,
    token: &str,
    row: usize,
) -> anyhow::Result<()> {
    for req in every_request() {
        let r = request(conn, &req).await?;
        assert!(
            unauthorized(&r),
            "row {row}: {} before hello: {r:?}",
            req.kind()
        );
    }
    let wrong = Request::Hello {
        token: format!("{token}x"),
    };
    let r = request(conn, &wrong).await?;
    assert!(unauthorized(&r), "row {row}: a wrong token: {r:?}");
    let r = request(conn, &every_request()[0]).await?;
    assert!(
        unauthorized(&r),
        "row {row}: a get after a wrong token: {r:?}"
    );

    let hello = Request::Hello {
        token: token.to_string(),
    };
    let r = request(conn, &hello).await?;
    assert!(
        matches!(
            r,
            Response::Hello {
                read_only: false,
                ..
            }
        ),
        "row {row}: the right token: {r:?}"
    );
    let r = request(conn, &every_request()[0]).await?;
    assert!(
        matches!(r, Response::Versions(_)),
        "row {row}: a get after hello: {r:?}"
    );
    Ok(())
}

async fn check_peer_session(conn: &quinn::Connection, row: usize) -> anyhow::Result<()> {
    let mut rx = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .with_context(|| format!("row {row}: no peer stream from the node"))??;
    let mut header = [0u8; 4];
    tokio::time::timeout(WAIT, rx.read_exact(&mut header)).await??;
    let len = u32::from_le_bytes(header) as usize;
    let mut body = vec![0u8; len.min(1 << 20)];
    tokio::time::timeout(WAIT, rx.read_exact(&mut body)).await??;
    let msg: PeerMessage = decode_body(&body)?;
    assert!(
        matches!(msg, PeerMessage::Hello { .. }),
        "row {row}: the node's first peer message: {msg:?}"
    );
    Ok(())
}

/// The node closes the connection with `code`, and no stream ever carries a byte to us.
async fn check_closed(conn: &quinn::Connection, code: u32, row: usize) -> anyhow::Result<()> {
    // Try to talk anyway: a client hello with a real token and a peer hello.
    if let Ok((mut send, _)) = conn.open_bi().await {
        let _ = send
            .write_all(&encode_frame(&Request::Hello {
                token: "rw_guess".into(),
            }))
            .await;
    }
    if let Ok(mut send) = conn.open_uni().await {
        let _ = send
            .write_all(&encode_frame(&PeerMessage::Hello {
                version_vector: vec![],
            }))
            .await;
    }
    let reason = tokio::time::timeout(WAIT, conn.closed()).await?;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code.into()),
        "row {row}: {reason:?}"
    );
    assert!(
        conn.accept_uni().await.is_err() && conn.accept_bi().await.is_err(),
        "row {row}: the node opened a stream to a refused connection"
    );
    Ok(())
}

#[tokio::test]
async fn handshake_matrix() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let peer = Keypair::from_secret([0x31; 32]);
    let stranger = Keypair::from_secret([0x32; 32]);
    // The peer is listed at an address where nothing listens, so only its own dial connects.
    let nowhere = format!("127.0.0.1:{}", free_udp_port()?);
    node.client()
        .await?
        .peer_add(peer.node_id(), nowhere)
        .await?;
    let token = node.ticket().token;

    for (i, row) in MATRIX.iter().enumerate() {
        let (endpoint, conn) = dial(&node, row, &peer, &stranger).await?;
        match (row.outcome, conn) {
            (Outcome::ClientAfterHello, Ok(conn)) => {
                check_client_after_hello(&conn, &token, i).await?;
            }
            (Outcome::PeerSession, Ok(conn)) => check_peer_session(&conn, i).await?,
            (Outcome::Closed(code), Ok(conn)) => check_closed(&conn, code, i).await?,
            (Outcome::RefusedByPin, Err(quinn::ConnectionError::TransportError(e))) => {
                assert!(
                    e.reason.contains("ApplicationVerificationFailure"),
                    "row {i}: {e:?}"
                );
            }
            (Outcome::RefusedAlpn, Err(quinn::ConnectionError::ConnectionClosed(c))) => {
                assert_eq!(
                    u64::from(c.error_code),
                    NO_APPLICATION_PROTOCOL,
                    "row {i}: {c:?}"
                );
            }
            (expected, got) => panic!(
                "row {i} ({:?} ALPN, pins {:?}, certificate {:?}): expected {expected:?}, got {got:?}",
                row.alpn, row.pin, row.cert
            ),
        }
        endpoint.close(0u32.into(), b"done");
    }

    // Nothing a refused row sent reached the log or the peer list.
    let status = node.client().await?.status().await?;
    assert_eq!(status.log_lsn, 0, "a refused connection wrote");
    assert_eq!(status.peers.len(), 1, "only the listed peer");
    Ok(())
}
