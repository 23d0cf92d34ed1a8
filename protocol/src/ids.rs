//! Node ids, entry ids and signatures, and their one human-readable form: lowercase hex.

use std::fmt;
use std::str::FromStr;

use data_encoding::HEXLOWER_PERMISSIVE;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::ParseIdError;

/// Parses `len` bytes written as hex, naming `what` in any error.
fn parse_hex<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], ParseIdError> {
    let s = s.trim();
    if s.len() != N * 2 {
        return Err(ParseIdError::Length {
            what,
            expected: N * 2,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    HEXLOWER_PERMISSIVE
        .decode_mut(s.as_bytes(), &mut out)
        .map_err(|e| ParseIdError::Character {
            what,
            position: e.error.position,
        })?;
    Ok(out)
}

macro_rules! fixed_bytes {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the raw form, in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                data_encoding::HEXLOWER.encode(&self.0)
            }

            /// The first eight hex digits, for logs.
            pub fn short(&self) -> String {
                data_encoding::HEXLOWER.encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<$len>($what, s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} bytes or {} hex digits", $len, $len * 2)
                    }
                    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        <[u8; $len]>::try_from(v)
                            .map($name)
                            .map_err(|_| E::invalid_length(v.len(), &self))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                if d.is_human_readable() {
                    d.deserialize_str(V)
                } else {
                    d.deserialize_bytes(V)
                }
            }
        }
    };
}

fixed_bytes!(
    /// A node: its ed25519 public key. The same key signs its log entries and is its TLS identity.
    NodeId,
    32,
    "node id"
);
fixed_bytes!(
    /// An entry: the BLAKE3 hash of its canonical bytes.
    EntryId,
    32,
    "entry id"
);
fixed_bytes!(
    /// The root of a key/value state digest: equal on two nodes whose key/value views hold the
    /// same current versions.
    StateRoot,
    32,
    "state root"
);
fixed_bytes!(
    /// A write request, chosen at random by the client: a node that has already written a
    /// request with this id answers a repeat of it with the first one's result instead of
    /// writing again.
    RequestId,
    16,
    "request id"
);
fixed_bytes!(
    /// The secret of an invite: whoever shows it (once, before it expires) joins the node that
    /// made it as a peer.
    InviteSecret,
    32,
    "invite secret"
);
fixed_bytes!(
    /// An ed25519 signature of an [`EntryId`], vouching for the author's chain up to that entry.
    Signature,
    64,
    "signature"
);

impl EntryId {
    /// The id of an entry whose canonical encoding is `bytes`.
    pub fn of_canonical_bytes(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

/// A context: the ids of the versions a read returned, which a write may supersede.
///
/// Its text form is the ids in hex joined by `.`; the empty context is the empty string.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context(pub Vec<EntryId>);

impl Context {
    /// Sorted and deduplicated, as an op's `supersedes` must be.
    pub fn normalized(mut self) -> Self {
        self.0.sort_unstable();
        self.0.dedup();
        self
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

impl FromStr for Context {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::default());
        }
        s.split('.')
            .map(str::parse)
            .collect::<Result<Vec<EntryId>, _>>()
            .map(|ids| Self(ids).normalized())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = EntryId([7; 32]);
        assert_eq!(id.to_hex().parse::<EntryId>().unwrap(), id);
        let err = "abc".parse::<NodeId>().unwrap_err().to_string();
        assert!(err.contains("64 hex digits") && err.contains('3'), "{err}");
        let bad = format!("{}zz", "0".repeat(62));
        let err = bad.parse::<NodeId>().unwrap_err().to_string();
        assert!(err.contains("position 62"), "{err}");
    }

    #[test]
    fn context_text_form() {
        let ctx = Context(vec![EntryId([2; 32]), EntryId([1; 32])]).normalized();
        let text = ctx.to_string();
        assert_eq!(text.parse::<Context>().unwrap(), ctx);
        assert_eq!("".parse::<Context>().unwrap(), Context::default());
    }
}
