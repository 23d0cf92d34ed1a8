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
const STREAM_WINDOW_BYTES: u32 = 256 * 1024;
/// Receive window of one connection, over all its streams: what one connection can make the
/// node hold in bytes it has not read yet. The node reads every stream as its bytes arrive,
/// but bytes after a gap (a lost or withheld packet) wait in QUIC's buffers for the gap.
const CONNECTION_WINDOW_BYTES: u32 = 2 * STREAM_WINDOW_BYTES;
/// Bytes written to one connection and not yet acknowledged by the other side: what a client
/// that stops acknowledging can make the node hold in QUIC's send buffers.
const SEND_WINDOW_BYTES: u32 = 256 * 1024;
/// QUIC and TLS state of one connection, measured at 54 KiB for an authenticated client.
const CONNECTION_STATE_BYTES: u64 = 64 * 1024;
/// One open client stream: its task and QUIC state, measured at 2.6 KiB for a stream waiting
/// for the rest of its request frame (any bytes it buffers are counted in the windows and in
/// [`BUFFER_BYTES`]).
const STREAM_STATE_BYTES: u64 = 3 * 1024;
/// The node's own memory besides its index cache: about 40 MiB measured while serving 64
/// clients of puts, and up to about 32 MiB of entries in an indexer transaction (keys, values
/// and per-op costs, `node::indexer::BATCH_BYTES_MAX`) while its views catch up a long log,
/// with room for the allocator's slack.
const NODE_BASE_BYTES: u64 = 112 * 1024 * 1024;

/// The most memory clients can make a node with `config` hold, with the node's own on top:
///
/// - per connection, at most `max_connections` of them: its QUIC and TLS state
///   ([`CONNECTION_STATE_BYTES`]), unread bytes up to its receive window
///   ([`CONNECTION_WINDOW_BYTES`]), unacknowledged bytes up to its send window
///   ([`SEND_WINDOW_BYTES`]), and `max_streams_per_connection` open streams of
///   [`STREAM_STATE_BYTES`] each;
/// - request and reply frames held at once, over all streams, and the state of every request
///   in flight on a pipeline: [`BUFFER_BYTES`];
/// - watches: changes read and not yet sent ([`super::watch::BUFFER_BYTES`]) and what the
///   log reads in progress hold ([`super::watch::READING_BYTES`]);
/// - the node itself: [`NODE_BASE_BYTES`] and `index_cache_bytes`.
///
/// At the defaults: 256 × (64 KiB + 512 KiB + 256 KiB + 64 × 3 KiB) = 256 MiB for
/// connections, 64 MiB of frames, 8 + 12 MiB for watches, 112 + 16 MiB for the node:
/// 468 MiB, under the 512 MiB a node must stay within whatever its clients do. Each
/// connection more adds 1 MiB, each stream more per connection 768 KiB.
pub fn memory_bound(config: &crate::config::Config) -> u64 {
    let per_connection = CONNECTION_STATE_BYTES
        + u64::from(CONNECTION_WINDOW_BYTES)
        + u64::from(SEND_WINDOW_BYTES)
        + u64::from(config.max_streams_per_connection) * STREAM_STATE_BYTES;
    config.max_connections as u64 * per_connection
        + BUFFER_BYTES as u64
        + (super::watch::BUFFER_BYTES + super::watch::READING_BYTES) as u64
        + NODE_BASE_BYTES
        + config.index_cache_bytes as u64
}

/// The UDP socket's receive buffer, asked of the kernel (Linux caps it at `net.core.rmem_max`;
/// its default is 208 KiB). Datagrams that arrive while the node is too busy to take them
/// wait there instead of being dropped: every drop costs the sender a retransmission, after a
/// delay that grows with the round-trip time an overloaded node makes long.
const SOCKET_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Connection attempts quinn queues for the accept loop; more are refused.
const INCOMING_MAX: usize = 1024;
/// Packets of one queued connection attempt after its first, in bytes.
const INCOMING_BUFFER_BYTES: u64 = 64 * 1024;
/// Packets of all queued connection attempts after their first, in bytes.
const INCOMING_BUFFER_BYTES_TOTAL: u64 = 4 * 1024 * 1024;

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
        .receive_window(CONNECTION_WINDOW_BYTES.into())
        .send_window(SEND_WINDOW_BYTES.into())
        // Nothing is sent as datagrams; accepting them would buffer up to a megabyte of
        // unread datagrams per connection.
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    // Connection attempts waiting for the accept loop, which takes them at once: a few
    // kilobytes each, instead of quinn's defaults of 65,536 attempts and 100 MiB of their
    // early packets.
    config
        .max_incoming(INCOMING_MAX)
        .incoming_buffer_size(INCOMING_BUFFER_BYTES)
        .incoming_buffer_size_total(INCOMING_BUFFER_BYTES_TOTAL);
    Ok(config)
}

/// Binds the endpoint.
pub fn bind(node: &Node) -> Result<quinn::Endpoint, EndpointError> {
    let identity = TlsIdentity::new(&node.keypair)?;
    let config = server_config(node, &identity)?;
    let addr = node.config.listen;
    let bind_error = |source| EndpointError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind_error)?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), SOCKET_RECEIVE_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_default_settings_keep_memory_under_512_mib() {
        let bound = memory_bound(&Config::default());
        assert_eq!(
            bound >> 20,
            468,
            "the figure in memory_bound's documentation, in MiB"
        );
        assert!(bound < 512 * 1024 * 1024);
    }
}
