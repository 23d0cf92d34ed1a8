//! Speaking the client protocol by hand over raw QUIC, for tests that send what the client
//! library never would: garbage frames, huge length prefixes, half-sent requests, floods of
//! streams and connections.

use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use kappakv_protocol::frame::{FrameDecode, decode_body, decode_frame, encode_frame};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{ALPN_CLIENT, ErrorCode, Request, Response, Ticket};

/// A client endpoint on an ephemeral loopback port that dials `ticket`'s node, pinning its
/// node id. One endpoint (one UDP socket) can carry many connections.
pub fn endpoint(ticket: &Ticket) -> Result<quinn::Endpoint> {
    endpoint_with(ticket, Arc::new(quinn::TransportConfig::default()))
}

/// Like [`endpoint`], with the given QUIC transport settings (a small receive window makes a
/// reader that stops reading cheap for the test process itself).
pub fn endpoint_with(
    ticket: &Ticket,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::Endpoint> {
    let tls = kappakv_protocol::tls::client_config(ticket.node_id, ALPN_CLIENT, None)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A new connection from `endpoint` to `ticket`'s node, not yet authenticated.
pub async fn dial(endpoint: &quinn::Endpoint, ticket: &Ticket) -> Result<quinn::Connection> {
    Ok(endpoint
        .connect(
            ticket.addrs[0]
                .ip()
                .context("an IP address in the ticket")?,
            kappakv_protocol::tls::SERVER_NAME,
        )?
        .await?)
}

/// A connection to `ticket`'s node on an endpoint of its own, not yet authenticated.
pub async fn connect(ticket: &Ticket) -> Result<quinn::Connection> {
    dial(&endpoint(ticket)?, ticket).await
}

/// A connection to `ticket`'s node that has said hello with the ticket's token.
pub async fn authenticated(ticket: &Ticket) -> Result<quinn::Connection> {
    let conn = connect(ticket).await?;
    hello(&conn, ticket).await?;
    Ok(conn)
}

/// The first datagram a client sends to open a connection to `ticket`'s node: an Initial
/// packet with a TLS ClientHello and a connection id of its own. Sent from a fresh UDP socket,
/// it makes the node start a handshake that the socket never completes.
pub async fn initial_packet(ticket: &Ticket) -> Result<Vec<u8>> {
    let catcher = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let endpoint = endpoint(ticket)?;
    let connecting = endpoint.connect(catcher.local_addr()?, kappakv_protocol::tls::SERVER_NAME)?;
    let mut buf = vec![0u8; 65_536];
    let (n, _) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        catcher.recv_from(&mut buf),
    )
    .await??;
    drop(connecting);
    endpoint.close(0u32.into(), b"");
    buf.truncate(n);
    Ok(buf)
}

/// Says hello on `conn` with `ticket`'s token.
pub async fn hello(conn: &quinn::Connection, ticket: &Ticket) -> Result<()> {
    let hello = encode_frame(&Request::Hello {
        token: ticket.token.clone(),
    });
    match exchange(conn, &hello).await? {
        Response::Hello { .. } => Ok(()),
        other => bail!("hello refused: {other:?}"),
    }
}

/// Sends raw bytes on a new stream, finishes it, and returns the one response frame.
pub async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    read_response(&mut recv).await
}

/// Reads a stream to its end and decodes the one response frame on it.
pub async fn read_response(recv: &mut quinn::RecvStream) -> Result<Response> {
    let buf = recv.read_to_end(MAX_FRAME_BYTES + 4).await?;
    match decode_frame(&buf, MAX_FRAME_BYTES)? {
        FrameDecode::Frame { body, .. } => Ok(decode_body(body)?),
        FrameDecode::NeedMore { .. } => bail!("incomplete response ({} bytes)", buf.len()),
    }
}

/// The error code of a response, if it is an error.
pub fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}
