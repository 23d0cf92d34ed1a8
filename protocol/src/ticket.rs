//! Tickets: one copy-pasteable string that tells a client where a node is, how to pin its key,
//! and which token to present: `kappakv://NODEID@ADDR[,ADDR…]/TOKEN`.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::error::ParseIdError;
use crate::ids::NodeId;

const SCHEME: &str = "kappakv://";

/// Where a node is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The node's id; its TLS certificate must carry this key.
    pub node_id: NodeId,
    /// Addresses to dial, in order of preference.
    pub addrs: Vec<SocketAddr>,
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
    #[error("ticket address `{addr}` is not IP:PORT")]
    Address {
        /// The text that failed.
        addr: String,
    },
    /// The token part is empty or has characters outside `[A-Za-z0-9_-]`.
    #[error("ticket token must be non-empty letters, digits, `-` or `_`")]
    Token,
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.trim().strip_prefix(SCHEME).ok_or(TicketError::Scheme)?;
        let (node, rest) = rest.split_once('@').ok_or(TicketError::Shape)?;
        let (addrs, token) = rest.rsplit_once('/').ok_or(TicketError::Shape)?;
        let node_id = node.parse()?;
        let addrs = addrs
            .split(',')
            .map(|a| {
                a.parse().map_err(|_| TicketError::Address {
                    addr: a.to_string(),
                })
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
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
        for (i, a) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        write!(f, "/{}", self.token)
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
            ],
            token: "rw_abc-123".into(),
        };
        assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
        assert_eq!("http://x".parse::<Ticket>(), Err(TicketError::Scheme));
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
}
