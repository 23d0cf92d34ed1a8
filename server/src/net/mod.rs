//! The QUIC side: one endpoint per node, serving clients on `kappakv-client/1` and peers on
//! `kappakv-peer/1`.
//!
//! - [`tls`]: the self-signed certificate made from the node key.
//! - [`endpoint`]: the accept loop, with a connection limit.
//! - [`connection`]: one client connection: authentication, one request per stream, framing.
//! - [`pipeline`]: many requests at once on one long-lived stream.
//! - [`watch`]: streaming a watch from the log.

pub mod connection;
pub mod discovery;
pub mod endpoint;
pub mod pipeline;
pub mod tls;
pub mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use kappakv_protocol::{NodeAddr, NodeId};

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

/// The addresses this node's tickets and peer address give, for a node bound to `bound`:
/// `advertise` when given (names or IP addresses, as others should dial them); else, for a
/// wildcard address, the machine's interface addresses of that family with the bound port,
/// loopback last; else `bound` itself.
pub fn advertised(bound: SocketAddr, advertise: &[String]) -> Vec<NodeAddr> {
    let given: Vec<NodeAddr> = advertise.iter().filter_map(|a| a.parse().ok()).collect();
    if !given.is_empty() {
        return given;
    }
    if !bound.ip().is_unspecified() {
        return vec![bound.into()];
    }
    let v6 = bound.is_ipv6();
    let mut addrs: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the machine's addresses; tickets give loopback only: set --advertise");
            Vec::new()
        })
        .into_iter()
        .map(|i| i.ip())
        // A socket bound to [::] takes IPv4 too; one bound to 0.0.0.0 takes only IPv4.
        .filter(|ip| !ip.is_loopback() && (v6 || ip.is_ipv4()))
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(v4) => !v4.is_link_local(),
        })
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    addrs.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port()));
    addrs.into_iter().map(NodeAddr::from).collect()
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
