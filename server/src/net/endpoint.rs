//! The accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::close;
use super::connection::serve_client;
use super::tls::{TlsIdentity, TlsSetupError};
use crate::node::Node;
use crate::service::stack;

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// Binding the UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Receive window of one stream. Frames are read as they arrive, so a frame larger than the
/// window still flows; the window only bounds what a sender may have in flight, which is also
/// what it may still push into a connection whose reader has gone.
const STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
/// Receive window of one connection, over all its streams: what one connection can make the
/// node buffer.
const CONNECTION_WINDOW_BYTES: u32 = 4 * STREAM_WINDOW_BYTES;

/// Builds the quinn server configuration: TLS from the node key, stream and idle limits.
pub fn server_config(
    node: &Node,
    identity: &TlsIdentity,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto = QuicServerConfig::try_from(identity.server_config()?)
        .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(node.config.max_streams_per_connection.into())
        // Peers open one unidirectional stream each way; clients open none.
        .max_concurrent_uni_streams(2u32.into())
        .max_idle_timeout(Some(
            Duration::from_millis(node.config.idle_timeout_ms)
                .try_into()
                .expect("idle timeout fits QUIC's range"),
        ))
        .keep_alive_interval(None)
        // Flow control bounds what a connection can make the node buffer.
        .stream_receive_window(STREAM_WINDOW_BYTES.into())
        .receive_window(CONNECTION_WINDOW_BYTES.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds the endpoint.
pub fn bind(node: &Node) -> Result<quinn::Endpoint, EndpointError> {
    let identity = TlsIdentity::new(&node.keypair)?;
    let config = server_config(node, &identity)?;
    let addr = node.config.listen;
    quinn::Endpoint::server(config, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// Accepts connections until `cancel` fires. Connections beyond `max_connections` are refused.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(node.config.max_connections));
    let service = stack(node.clone());
    loop {
        let incoming = tokio::select! {
            () = cancel.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            crate::telemetry::connection_refused();
            continue;
        };
        let node = node.clone();
        let service = service.clone();
        let cancel = cancel.clone();
        let tracker2 = tracker.clone();
        let remote = incoming.remote_address();
        tracker.spawn(
            async move {
                let _permit = permit;
                let _open = crate::telemetry::OpenGuard::connection();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "handshake failed");
                        return;
                    }
                };
                let alpn = conn
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol);
                match alpn.as_deref() {
                    Some(p) if p == kappakv_protocol::ALPN_CLIENT => {
                        serve_client(conn, node, service, cancel, tracker2).await;
                    }
                    Some(p) if p == kappakv_protocol::ALPN_PEER => match node.replication() {
                        Some(r) => r.accept(conn).await,
                        None => conn.close(close::NOT_A_PEER.into(), b"replication is not running"),
                    },
                    _ => {
                        tracing::info!("refusing connection: unsupported protocol");
                        conn.close(close::BAD_PROTOCOL.into(), b"unsupported protocol");
                    }
                }
            }
            .instrument(tracing::debug_span!("conn", %remote)),
        );
    }
    endpoint.set_server_config(None);
}
