//! Peers on the local network (`discovery = "local"`). Every `discovery_interval_ms` a node
//! multicasts an announcement on each of its IPv4 interfaces (group [`GROUP`], UDP port
//! [`PORT`], one hop): its node id, the time and its QUIC port, encrypted and authenticated with
//! keys derived from the `swarm` secret. A node that opens an announcement of another node
//! adds it as a `discovered` peer at the packet's source address and the announced port, and
//! replication dials it as it dials every peer, pinning its key. Without the secret an
//! announcement is random bytes: it names no node and no port. A replayed announcement is
//! refused (its time is not newer than the last one heard from that node, or too far from this
//! node's clock), and a forged address would fail the key pinning anyway. A discovered peer
//! not heard for [`GONE_AFTER_INTERVALS`] intervals and not connected is dropped.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappakv_protocol::{NodeId, PeerOrigin};
use tokio_util::sync::CancellationToken;

use crate::node::replication::Replication;

/// The multicast group of announcements (administratively scoped, RFC 2365).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 77);
/// Their UDP port.
pub const PORT: u16 = 7790;
/// A discovered peer not heard for this many intervals, and not connected, is dropped.
pub const GONE_AFTER_INTERVALS: u32 = 15;
/// Announcements further than this from this node's clock are refused.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

const MAGIC: &[u8; 4] = b"kkvd";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 16;
/// Node id, time in Unix milliseconds, QUIC port.
const PLAIN_LEN: usize = 32 + 8 + 2;
const TAG_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 1 + NONCE_LEN;
/// The length of every announcement.
pub const PACKET_LEN: usize = HEADER_LEN + PLAIN_LEN + TAG_LEN;

/// What a node announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The announcing node.
    pub node_id: NodeId,
    /// When it announced, Unix milliseconds.
    pub time_ms: u64,
    /// The UDP port it serves QUIC on.
    pub port: u16,
}

/// The keys derived from a swarm secret.
pub struct SwarmKey {
    cipher: [u8; 32],
    mac: [u8; 32],
}

impl SwarmKey {
    /// The keys of `secret`.
    pub fn new(secret: &str) -> Self {
        let root = blake3::derive_key("kappakv 2026 swarm secret v1", secret.as_bytes());
        Self {
            cipher: blake3::derive_key("kappakv 2026 swarm announcement cipher v1", &root),
            mac: blake3::derive_key("kappakv 2026 swarm announcement mac v1", &root),
        }
    }

    /// `buf` XORed with the key stream of `nonce` (BLAKE3 keyed, extended output).
    fn apply_stream(&self, nonce: &[u8], buf: &mut [u8]) {
        let mut stream = [0u8; PLAIN_LEN];
        blake3::Hasher::new_keyed(&self.cipher)
            .update(nonce)
            .finalize_xof()
            .fill(&mut stream);
        for (b, k) in buf.iter_mut().zip(stream) {
            *b ^= k;
        }
    }

    fn tag(&self, sealed: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.mac, sealed)
    }

    /// `announcement`, encrypted under `nonce` and authenticated.
    pub fn seal(&self, announcement: &Announcement, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut packet = Vec::with_capacity(PACKET_LEN);
        packet.extend_from_slice(MAGIC);
        packet.push(VERSION);
        packet.extend_from_slice(&nonce);
        let mut plain = [0u8; PLAIN_LEN];
        plain[..32].copy_from_slice(announcement.node_id.as_bytes());
        plain[32..40].copy_from_slice(&announcement.time_ms.to_le_bytes());
        plain[40..].copy_from_slice(&announcement.port.to_le_bytes());
        self.apply_stream(&nonce, &mut plain);
        packet.extend_from_slice(&plain);
        let tag = self.tag(&packet);
        packet.extend_from_slice(tag.as_bytes());
        packet
    }

    /// The announcement in `packet`, if it is one sealed with this swarm's keys.
    pub fn open(&self, packet: &[u8]) -> Option<Announcement> {
        if packet.len() != PACKET_LEN || &packet[..4] != MAGIC || packet[4] != VERSION {
            return None;
        }
        let (sealed, tag) = packet.split_at(HEADER_LEN + PLAIN_LEN);
        // `blake3::Hash` compares in constant time.
        if self.tag(sealed) != blake3::Hash::from_bytes(tag.try_into().ok()?) {
            return None;
        }
        let nonce = &packet[MAGIC.len() + 1..HEADER_LEN];
        let mut plain = [0u8; PLAIN_LEN];
        plain.copy_from_slice(&sealed[HEADER_LEN..]);
        self.apply_stream(nonce, &mut plain);
        Some(Announcement {
            node_id: NodeId(plain[..32].try_into().ok()?),
            time_ms: u64::from_le_bytes(plain[32..40].try_into().ok()?),
            port: u16::from_le_bytes(plain[40..].try_into().ok()?),
        })
    }
}

/// The announcements heard, and what to do about each.
#[derive(Default)]
struct Heard {
    /// Node → (when last heard here, the newest announcement time it sent).
    last: HashMap<NodeId, (Instant, u64)>,
}

impl Heard {
    /// Whether `a` is fresh: near this node's clock and newer than the last one of its node.
    fn take(&mut self, a: &Announcement, now: Instant, now_ms: u64) -> bool {
        if a.time_ms.abs_diff(now_ms) > CLOCK_SKEW.as_millis() as u64 {
            return false;
        }
        if let Some((_, time)) = self.last.get(&a.node_id)
            && a.time_ms <= *time
        {
            return false;
        }
        self.last.insert(a.node_id, (now, a.time_ms));
        true
    }
}

/// Starts announcing this node and listening for others, until `cancel`.
pub fn spawn(
    secret: &str,
    node_id: NodeId,
    listen: SocketAddr,
    interval: Duration,
    replication: Arc<Replication>,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) {
    let key = SwarmKey::new(secret);
    let quic_port = listen.port();
    if listen.ip().is_loopback() {
        tracing::warn!(%listen, "local discovery: this node listens on loopback only, so the nodes that hear it cannot dial it; listen on 0.0.0.0 (or an interface's address)");
    }
    tracker.spawn(async move {
        let socket = match bind() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, port = PORT, "local discovery is off: cannot bind its UDP port");
                return;
            }
        };
        tracing::info!(group = %GROUP, port = PORT, "local discovery: announcing this node to its swarm");
        let mut run = Discovery {
            key,
            node_id,
            quic_port,
            interval,
            replication,
            socket,
            joined: HashSet::new(),
            heard: Heard::default(),
        };
        run.run(cancel).await;
    });
}

fn bind() -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Every node on the machine listens on the same port.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).into())?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(1)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// The machine's IPv4 interface addresses, loopback left out.
fn interfaces() -> std::io::Result<Vec<Ipv4Addr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter_map(|i| match i.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .collect())
}

struct Discovery {
    key: SwarmKey,
    node_id: NodeId,
    quic_port: u16,
    interval: Duration,
    replication: Arc<Replication>,
    socket: tokio::net::UdpSocket,
    /// Interfaces whose membership of the group is taken.
    joined: HashSet<Ipv4Addr>,
    heard: Heard,
}

impl Discovery {
    async fn run(&mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 2 * PACKET_LEN];
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {
                    self.announce().await;
                    self.drop_gone();
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, SocketAddr::V4(from))) => self.heard(&buf[..len], from),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "local discovery: receive failed"),
                },
            }
        }
    }

    /// Joins the group on interfaces that are new, and announces on every interface.
    async fn announce(&mut self) {
        let interfaces = match interfaces() {
            Ok(found) => found,
            Err(e) => {
                // Keep what was joined: the list may come back at the next tick.
                tracing::debug!(error = %e, "local discovery: cannot list the interfaces");
                return;
            }
        };
        if interfaces.is_empty() {
            tracing::debug!("local discovery: no IPv4 interface besides loopback to announce on");
        }
        // An interface that went away leaves the group; one that comes back joins again.
        for gone in self.joined.iter().filter(|i| !interfaces.contains(i)) {
            let _ = self.socket.leave_multicast_v4(GROUP, *gone);
        }
        self.joined.retain(|i| interfaces.contains(i));
        let sock = socket2::SockRef::from(&self.socket);
        // One time for every interface's announcement: a receiver that hears this node on
        // several interfaces takes the first and refuses the others as replays.
        let time_ms = crate::unix_now_ms();
        for iface in &interfaces {
            if !self.joined.contains(iface) {
                match self.socket.join_multicast_v4(GROUP, *iface) {
                    Ok(()) => {
                        self.joined.insert(*iface);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        self.joined.insert(*iface);
                    }
                    // Announcing needs no membership: send all the same.
                    Err(e) => {
                        tracing::debug!(%iface, error = %e, "local discovery: cannot join the group");
                    }
                }
            }
            let mut nonce = [0u8; NONCE_LEN];
            getrandom::fill(&mut nonce).expect("the operating system's random numbers");
            let packet = self.key.seal(
                &Announcement {
                    node_id: self.node_id,
                    time_ms,
                    port: self.quic_port,
                },
                nonce,
            );
            let sent = match sock.set_multicast_if_v4(iface) {
                Ok(()) => self
                    .socket
                    .send_to(&packet, SocketAddrV4::new(GROUP, PORT))
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::debug!(%iface, error = %e, "local discovery: cannot announce");
            }
        }
    }

    /// Takes a packet: another node of this swarm becomes a peer, or moves.
    fn heard(&mut self, packet: &[u8], from: SocketAddrV4) {
        let Some(a) = self.key.open(packet) else {
            tracing::trace!(%from, "local discovery: a packet not of this swarm");
            return;
        };
        if a.node_id == self.node_id || !self.heard.take(&a, Instant::now(), crate::unix_now_ms()) {
            return;
        }
        let addr = SocketAddr::from((*from.ip(), a.port)).to_string();
        let known = self.replication.peer(&a.node_id);
        match known {
            Some((_, origin)) if origin != PeerOrigin::Discovered => return,
            Some((old, _)) if old == addr => return,
            _ => {}
        }
        match self
            .replication
            .add_peer(a.node_id, addr.clone(), PeerOrigin::Discovered)
        {
            Ok(()) if known.is_some() => {
                tracing::info!(peer = %a.node_id, %addr, "local discovery: a peer moved");
            }
            Ok(()) => {
                tracing::info!(peer = %a.node_id, %addr, "local discovery: found a peer of this swarm");
            }
            Err(e) => {
                tracing::warn!(peer = %a.node_id, error = %e, "local discovery: cannot add a peer");
            }
        }
    }

    /// Drops discovered peers not heard for a while and not connected.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let gone_after = self.interval * GONE_AFTER_INTERVALS;
        for peer in self.replication.status() {
            if peer.origin != PeerOrigin::Discovered || peer.connected {
                continue;
            }
            // One found before a restart counts as heard now: it has its full time to show.
            let (heard, _) = *self.heard.last.entry(peer.node_id).or_insert((now, 0));
            if now.duration_since(heard) < gone_after {
                continue;
            }
            match self.replication.remove_peer(&peer.node_id) {
                Ok(_) => {
                    self.heard.last.remove(&peer.node_id);
                    tracing::info!(peer = %peer.node_id, "local discovery: dropped a peer that stayed gone");
                }
                Err(e) => {
                    tracing::warn!(peer = %peer.node_id, error = %e, "local discovery: cannot drop a peer");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement() -> Announcement {
        Announcement {
            node_id: NodeId([7; 32]),
            time_ms: 1_700_000_000_000,
            port: 7700,
        }
    }

    #[test]
    fn only_the_same_swarm_opens_an_announcement_and_it_hides_the_node() {
        let key = SwarmKey::new("the swarm of the test, 32 chars");
        let packet = key.seal(&announcement(), [1; NONCE_LEN]);
        assert_eq!(packet.len(), PACKET_LEN);
        assert_eq!(key.open(&packet), Some(announcement()));
        assert_eq!(
            SwarmKey::new("another swarm of the test").open(&packet),
            None
        );
        let node = announcement().node_id;
        assert!(
            !packet.windows(8).any(|w| w == &node.as_bytes()[..8]),
            "the node id is not in the clear"
        );
        for i in 0..packet.len() {
            let mut tampered = packet.clone();
            tampered[i] ^= 1;
            assert_eq!(key.open(&tampered), None, "byte {i} changed");
        }
        assert_eq!(key.open(&packet[..PACKET_LEN - 1]), None);
        assert_ne!(
            key.seal(&announcement(), [2; NONCE_LEN])[HEADER_LEN..],
            packet[HEADER_LEN..],
            "another nonce, other bytes"
        );
    }

    #[test]
    fn a_replayed_or_stale_announcement_is_refused() {
        let mut heard = Heard::default();
        let a = announcement();
        let now = Instant::now();
        assert!(heard.take(&a, now, a.time_ms + 10));
        assert!(!heard.take(&a, now, a.time_ms + 20), "a replay");
        let later = Announcement {
            time_ms: a.time_ms + 2_000,
            ..a
        };
        assert!(heard.take(&later, now, a.time_ms + 2_010));
        let stale = Announcement {
            node_id: NodeId([8; 32]),
            ..a
        };
        assert!(!heard.take(&stale, now, a.time_ms + 301_000), "too old");
    }
}
