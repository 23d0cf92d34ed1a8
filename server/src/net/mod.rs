//! The QUIC side: one endpoint per node, serving clients on `kappakv-client/1` and peers on
//! `kappakv-peer/1`.
//!
//! - [`tls`]: the self-signed certificate made from the node key.
//! - [`endpoint`]: the accept loop, with a connection limit.
//! - [`connection`]: one client connection: authentication, one request per stream, framing.
//! - [`watch`]: streaming a watch from the log.

pub mod connection;
pub mod endpoint;
pub mod tls;
pub mod watch;

use kappakv_protocol::NodeId;

/// Parses `NODEID@HOST:PORT`.
pub fn peer_spec(s: &str) -> Option<(NodeId, String)> {
    let (id, addr) = s.trim().split_once('@')?;
    let id = id.parse().ok()?;
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some((id, addr.to_string()))
}

/// Application close codes.
pub mod close {
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The peer is not on this node's peer list.
    pub const NOT_A_PEER: u32 = 1;
    /// Unknown ALPN.
    pub const BAD_PROTOCOL: u32 = 2;
    /// A second connection between the same pair of nodes.
    pub const DUPLICATE: u32 = 3;
    /// A client that did not authenticate within the request timeout.
    pub const AUTH_TIMEOUT: u32 = 4;
    /// A peer session is restarted, to resume from both sides' version vectors.
    pub const RESYNC: u32 = 5;
}
