//! Tickets: one copy-pasteable string that tells a client where a node is, how to pin its key,
//! and which token to present: `kappakv://NODEID@ADDR[,ADDR…]/TOKEN`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::error::ParseIdError;
use crate::ids::{EntryId, InviteSecret, NodeId};

const SCHEME: &str = "kappakv://";

/// Where to dial a node: an IP address and port, or a DNS name and port, which the dialler
/// resolves at each dial (so a node whose address changes is found again).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeAddr {
    /// An IP address (v4, or v6 in brackets in text) and port.
    Ip(SocketAddr),
    /// A DNS name and port.
    Name {
        /// The name, such as `db1.example.com` or `localhost`.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

impl NodeAddr {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            NodeAddr::Ip(a) => a.port(),
            NodeAddr::Name { port, .. } => *port,
        }
    }

    /// The IP address and port, if this is not a name.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            NodeAddr::Ip(a) => Some(*a),
            NodeAddr::Name { .. } => None,
        }
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(a: SocketAddr) -> Self {
        NodeAddr::Ip(a)
    }
}

/// Text that is not `IP:PORT` or `NAME:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not IP:PORT or NAME:PORT (IPv6 in brackets: [::1]:7700)")]
pub struct NodeAddrError(pub String);

impl FromStr for NodeAddr {
    type Err = NodeAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(NodeAddr::Ip(a));
        }
        let bad = || NodeAddrError(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        // A DNS name: labels of letters, digits and `-`, separated by dots.
        let name_like = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !name_like {
            return Err(bad());
        }
        Ok(NodeAddr::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeAddr::Ip(a) => write!(f, "{a}"),
            NodeAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Where a node is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The node's id; its TLS certificate must carry this key.
    pub node_id: NodeId,
    /// Addresses to dial: a client tries them all and keeps the first that answers with the
    /// node's key.
    pub addrs: Vec<NodeAddr>,
    /// The client token.
    pub token: String,
}

/// A ticket that does not parse; says which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// The text does not start with `kappakv://`.
    #[error("ticket must start with `{SCHEME}`")]
    Scheme,
    /// No `@` between node id and addresses, or no `/` before the token.
    #[error("ticket must look like {SCHEME}NODEID@HOST:PORT/TOKEN")]
    Shape,
    /// The node id part.
    #[error("ticket node id: {0}")]
    NodeId(#[from] ParseIdError),
    /// An address part.
    #[error("ticket address `{addr}` is not IP:PORT or NAME:PORT")]
    Address {
        /// The text that failed.
        addr: String,
    },
    /// The token part is empty or has characters outside `[A-Za-z0-9_-]`.
    #[error("ticket token must be non-empty letters, digits, `-` or `_`")]
    Token,
    /// An invite's secret is not 64 hex digits.
    #[error("the invite's secret is not 64 hex digits: copy the whole invite again")]
    Secret,
}

/// `SCHEME` `NODEID@ADDR[,ADDR…]/REST`: the node id, its addresses and the rest.
fn split<'a>(
    s: &'a str,
    scheme: &'static str,
) -> Result<(NodeId, Vec<NodeAddr>, &'a str), TicketError> {
    let rest = s.trim().strip_prefix(scheme).ok_or(TicketError::Scheme)?;
    let (node, rest) = rest.split_once('@').ok_or(TicketError::Shape)?;
    let (addrs, tail) = rest.rsplit_once('/').ok_or(TicketError::Shape)?;
    let node_id = node.parse()?;
    let addrs = addrs
        .split(',')
        .map(|a| {
            a.parse().map_err(|_| TicketError::Address {
                addr: a.to_string(),
            })
        })
        .collect::<Result<Vec<NodeAddr>, _>>()?;
    Ok((node_id, addrs, tail))
}

fn write_addrs(f: &mut fmt::Formatter<'_>, addrs: &[NodeAddr]) -> fmt::Result {
    for (i, a) in addrs.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{a}")?;
    }
    Ok(())
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node_id, addrs, token) = split(s, SCHEME)?;
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TicketError::Token);
        }
        Ok(Ticket {
            node_id,
            addrs,
            token: token.to_string(),
        })
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@", self.node_id)?;
        write_addrs(f, &self.addrs)?;
        write!(f, "/{}", self.token)
    }
}

const INVITE_SCHEME: &str = "kappakv-invite://";

/// An invite: a node, where it is, and a secret that makes the holder its peer once, before
/// the secret expires: `kappakv-invite://NODEID@ADDR[,ADDR…]/SECRET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The inviting node; its certificate must carry this key.
    pub node_id: NodeId,
    /// Its addresses.
    pub addrs: Vec<NodeAddr>,
    /// The secret, 64 hex digits.
    pub secret: InviteSecret,
}

impl Invite {
    /// What a joining node signs with its key to show the inviting node it holds that key:
    /// the inviter, the joiner and the secret, hashed with a context of their own (no entry's
    /// canonical bytes hash to it).
    pub fn proof(inviter: &NodeId, joiner: &NodeId, secret: &InviteSecret) -> EntryId {
        let mut hasher = blake3::Hasher::new_derive_key("kappakv 2026 join proof v1");
        hasher.update(inviter.as_bytes());
        hasher.update(joiner.as_bytes());
        hasher.update(secret.as_bytes());
        EntryId(*hasher.finalize().as_bytes())
    }
}

impl FromStr for Invite {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node_id, addrs, secret) = split(s, INVITE_SCHEME)?;
        let secret = secret.parse().map_err(|_| TicketError::Secret)?;
        Ok(Invite {
            node_id,
            addrs,
            secret,
        })
    }
}

impl fmt::Display for Invite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{INVITE_SCHEME}{}@", self.node_id)?;
        write_addrs(f, &self.addrs)?;
        write!(f, "/{}", self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = Ticket {
            node_id: NodeId([0xab; 32]),
            addrs: vec![
                "127.0.0.1:7700".parse().unwrap(),
                "[::1]:7700".parse().unwrap(),
                "db-1.example.com:7710".parse().unwrap(),
            ],
            token: "rw_abc-123".into(),
        };
        assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
        assert_eq!("http://x".parse::<Ticket>(), Err(TicketError::Scheme));
        let named = format!("kappakv://{}@LocalHost:7700/tok", NodeId([1; 32]));
        assert_eq!(
            named.parse::<Ticket>().unwrap().addrs,
            [NodeAddr::Name {
                host: "localhost".into(),
                port: 7700
            }]
        );
        for bad in [
            "localhost",
            "under_score:1",
            "a..b:1",
            ":7700",
            "x:99999",
            "[::1:7700",
        ] {
            assert!(bad.parse::<NodeAddr>().is_err(), "{bad}");
        }
        let bad_addr = format!("kappakv://{}@localhost/tok", NodeId([1; 32]));
        assert!(matches!(
            bad_addr.parse::<Ticket>(),
            Err(TicketError::Address { .. })
        ));
        let bad_id = "kappakv://abcd@127.0.0.1:1/tok";
        assert!(matches!(
            bad_id.parse::<Ticket>(),
            Err(TicketError::NodeId(_))
        ));
        let bad_tok = format!("kappakv://{}@127.0.0.1:1/", NodeId([1; 32]));
        assert_eq!(bad_tok.parse::<Ticket>(), Err(TicketError::Token));
    }

    #[test]
    fn invites_round_trip_and_a_cut_secret_is_refused() {
        let invite = Invite {
            node_id: NodeId([3; 32]),
            addrs: vec!["db1.example.com:7700".parse().unwrap()],
            secret: InviteSecret([9; 32]),
        };
        let text = invite.to_string();
        assert!(text.starts_with("kappakv-invite://"));
        assert_eq!(text.parse::<Invite>().unwrap(), invite);
        assert_eq!(
            text[..text.len() - 1].parse::<Invite>(),
            Err(TicketError::Secret)
        );
        assert_eq!(
            text.replace("kappakv-invite", "kappakv").parse::<Invite>(),
            Err(TicketError::Scheme)
        );
        let proof = Invite::proof(&NodeId([1; 32]), &NodeId([2; 32]), &invite.secret);
        assert_ne!(
            proof,
            Invite::proof(&NodeId([2; 32]), &NodeId([1; 32]), &invite.secret)
        );
    }
}
