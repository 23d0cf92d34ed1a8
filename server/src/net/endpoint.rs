//! The accept loop.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::close;
use super::connection::{BUFFER_BYTES, Buffers, serve_client};
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

/// Connections that have not authenticated yet (handshaking, or waiting for a client's hello),
/// oldest first. When every connection slot is taken, a new connection evicts the oldest of
/// them: a flood of connections that never authenticate cannot lock out a client that does,
/// since an honest client authenticates within a round trip of its handshake.
#[derive(Clone, Debug, Default)]
pub struct Unauthenticated {
    queue: Arc<Mutex<VecDeque<(u64, CancellationToken)>>>,
    next: Arc<AtomicU64>,
}

impl Unauthenticated {
    /// Registers a new connection; it stays registered until it authenticates or ends.
    fn enter(&self) -> Pending {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.lock().push_back((id, evicted.clone()));
        Pending {
            id,
            evicted,
            registry: self.clone(),
        }
    }

    /// Evicts the oldest unauthenticated connection; false if there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_front();
        oldest.is_some_and(|(_, evicted)| {
            evicted.cancel();
            true
        })
    }

    fn leave(&self, id: u64) {
        self.lock().retain(|(i, _)| *i != id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, CancellationToken)>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection that has not authenticated yet; dropping it or [`Pending::authenticated`]
/// takes it off the list.
#[derive(Debug)]
pub struct Pending {
    id: u64,
    evicted: CancellationToken,
    registry: Unauthenticated,
}

impl Pending {
    /// The connection has authenticated: it can no longer be evicted.
    pub fn authenticated(&self) {
        self.registry.leave(self.id);
    }

    /// Fires when a newer connection needed this one's slot.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.registry.leave(self.id);
    }
}

/// How long an evicting connection waits for the evicted one to give its slot back.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Accepts connections until `cancel` fires. When `max_connections` are open, a new connection
/// evicts the oldest that has not authenticated, and is refused if every one has.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(node.config.max_connections));
    let service = stack(node.clone());
    let buffers = Buffers::new(BUFFER_BYTES);
    let unauthenticated = Unauthenticated::default();
    loop {
        let incoming = tokio::select! {
            () = cancel.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if unauthenticated.evict_oldest() => {
                tracing::debug!("connection limit reached; evicting the oldest unauthenticated");
                tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            crate::telemetry::connection_refused();
            continue;
        };
        let pending = unauthenticated.enter();
        let handshake_timeout = node.config.request_timeout();
        let node = node.clone();
        let service = service.clone();
        let buffers = buffers.clone();
        let cancel = cancel.clone();
        let tracker2 = tracker.clone();
        let remote = incoming.remote_address();
        tracker.spawn(
            async move {
                let _permit = permit;
                let _open = crate::telemetry::OpenGuard::connection();
                // A handshake that is never completed gives its slot back in time, or to a
                // newer connection.
                let conn = tokio::select! {
                    c = tokio::time::timeout(handshake_timeout, incoming) => match c {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("handshake not completed in time");
                            return;
                        }
                    },
                    () = pending.evicted() => {
                        tracing::debug!("handshake evicted by a newer connection");
                        return;
                    }
                };
                let alpn = conn
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol);
                match alpn.as_deref() {
                    Some(p) if p == kappakv_protocol::ALPN_CLIENT => {
                        serve_client(conn, node, service, buffers, pending, cancel, tracker2).await;
                    }
                    Some(p) if p == kappakv_protocol::ALPN_PEER => match node.replication() {
                        Some(r) => {
                            // The handshake checked the peer's certificate.
                            pending.authenticated();
                            r.accept(conn).await;
                        }
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
