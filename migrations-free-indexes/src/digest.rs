//! The state digest: a fingerprint of the key/value view that two nodes holding the same set
//! of entries share, whatever order the entries arrived in.
//!
//! It is a homomorphic set hash (a lattice hash, "LtHash") over keys: every key with its
//! current versions is hashed to a vector of [`LANES`] 16-bit lanes, and the digest is their
//! sum lane by lane, wrapping. A key that changes is one subtraction (its versions before) and
//! one addition (after), whatever the size of the view, so the kv view keeps the digest up to
//! date as batches apply: once per key a batch changes, not per entry, since a batch already
//! reads and writes each key it touches once (about a microsecond per key changed; a catch-up
//! of a million entries over ten thousand keys in batches of a hundred thousand hashes two
//! hundred thousand times). The sum does not depend on the order of the changes, so a state
//! reached by different paths has the same digest.
//!
//! What a version contributes is everything a read of it returns, bar the node-local LSN: the
//! entry id, the author, the timestamp, put or delete, and the value. So a peer's snapshot
//! with the right ids but another value, author or time does not match.
//!
//! With 1024 lanes of 16 bits, finding two different sets with one digest is as hard as a
//! short-vector lattice problem of that dimension, far out of reach; a plain sum of 256-bit
//! hashes would fall to a generalized-birthday search by a peer free to choose its rows.
//!
//! The digest is shown as its *root*: the BLAKE3 hash of the lanes, 32 bytes.

use kappakv_protocol::{EntryId, NodeId, StateRoot, Timestamp};

/// The version of the digest's definition: two digests of different versions cannot be
/// compared. It changes with [`crate::tables::KV_VERSION`] whenever what is hashed changes.
pub const DIGEST_VERSION: u32 = 2;

/// Lanes of the digest.
pub const LANES: usize = 1024;
/// Bytes of a digest's lanes ([`StateDigest::to_bytes`]).
pub const DIGEST_BYTES: usize = LANES * 2;

/// Domain separation of the element hash: a digest of this layout never equals another's.
const CONTEXT: &str = "kappakv 2026 state digest v1: keys and their current versions";

/// One current version of a key, as the digest sees it.
#[derive(Debug, Clone, Copy)]
pub struct DigestVersion<'a> {
    /// The entry that wrote it.
    pub id: EntryId,
    /// Who wrote it.
    pub author: NodeId,
    /// When, by the author's clock.
    pub timestamp: Timestamp,
    /// The value, `None` for a tombstone.
    pub value: Option<&'a [u8]>,
}

impl<'a> DigestVersion<'a> {
    /// What the digest hashes of a version as reads return it.
    pub fn of(version: &'a kappakv_protocol::Version) -> Self {
        Self {
            id: version.id,
            author: version.author,
            timestamp: version.timestamp,
            value: version.value.as_deref(),
        }
    }
}

/// The sum of the hashes of every current version of every key.
#[derive(Clone, PartialEq, Eq)]
pub struct StateDigest {
    lanes: Box<[u16; LANES]>,
}

impl Default for StateDigest {
    fn default() -> Self {
        Self {
            lanes: Box::new([0; LANES]),
        }
    }
}

impl std::fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateDigest({})", self.root())
    }
}

impl StateDigest {
    /// The digest of the empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` with its current `versions` (ascending by id).
    pub fn add(&mut self, key: &[u8], versions: &[DigestVersion<'_>]) {
        let element = element(key, versions);
        for (lane, e) in self.lanes.iter_mut().zip(element.chunks_exact(2)) {
            *lane = lane.wrapping_add(u16::from_le_bytes([e[0], e[1]]));
        }
    }

    /// Removes `key` with the `versions` it was added with.
    pub fn remove(&mut self, key: &[u8], versions: &[DigestVersion<'_>]) {
        let element = element(key, versions);
        for (lane, e) in self.lanes.iter_mut().zip(element.chunks_exact(2)) {
            *lane = lane.wrapping_sub(u16::from_le_bytes([e[0], e[1]]));
        }
    }

    /// Adds every version of `other`'s set to this one (the union of disjoint sets).
    pub fn combine(&mut self, other: &StateDigest) {
        for (lane, o) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *lane = lane.wrapping_add(*o);
        }
    }

    /// The 32-byte root shown to users: the BLAKE3 hash of the lanes.
    pub fn root(&self) -> StateRoot {
        StateRoot(*blake3::hash(&self.to_bytes()).as_bytes())
    }

    /// The lanes, little-endian, [`DIGEST_BYTES`] bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lanes.iter().flat_map(|l| l.to_le_bytes()).collect()
    }

    /// A digest from [`StateDigest::to_bytes`]; `None` when `bytes` is not [`DIGEST_BYTES`]
    /// long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != DIGEST_BYTES {
            return None;
        }
        let mut digest = Self::default();
        for (lane, b) in digest.lanes.iter_mut().zip(bytes.chunks_exact(2)) {
            *lane = u16::from_le_bytes([b[0], b[1]]);
        }
        Some(digest)
    }
}

/// The hash of one key and its versions: BLAKE3 in key-derivation mode, extended to
/// [`DIGEST_BYTES`].
fn element(key: &[u8], versions: &[DigestVersion<'_>]) -> [u8; DIGEST_BYTES] {
    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(&(versions.len() as u64).to_le_bytes());
    for version in versions {
        hasher.update(&version.id.0);
        hasher.update(&version.author.0);
        hasher.update(&version.timestamp.0.to_le_bytes());
        match version.value {
            None => {
                hasher.update(&[0]);
            }
            Some(value) => {
                hasher.update(&[1]);
                hasher.update(&(value.len() as u64).to_le_bytes());
                hasher.update(value);
            }
        }
    }
    let mut out = [0u8; DIGEST_BYTES];
    hasher.finalize_xof().fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u8, value: Option<&[u8]>) -> DigestVersion<'_> {
        DigestVersion {
            id: EntryId([n; 32]),
            author: NodeId([n.wrapping_add(1); 32]),
            timestamp: Timestamp(u64::from(n)),
            value,
        }
    }

    #[test]
    fn order_does_not_matter_and_remove_undoes_add() {
        let (a, b, c) = (
            version(1, Some(b"x")),
            version(2, None),
            version(3, Some(b"")),
        );
        let mut one = StateDigest::new();
        one.add(b"k", &[a, b]);
        one.add(b"j", &[c]);
        let mut two = StateDigest::new();
        two.add(b"j", &[c]);
        two.add(b"k", &[a]);
        // `k` changes: its versions before go, after come.
        two.remove(b"k", &[a]);
        two.add(b"k", &[a, b]);
        assert_eq!(one, two);
        two.remove(b"k", &[a, b]);
        assert_ne!(one, two);
        two.remove(b"j", &[c]);
        assert_eq!(two, StateDigest::new());
    }

    #[test]
    fn every_field_counts() {
        let base = version(1, Some(b"v"));
        let digest = |key: &[u8], v: &DigestVersion<'_>| {
            let mut d = StateDigest::new();
            d.add(key, &[*v]);
            d.root()
        };
        let reference = digest(b"k", &base);
        let variants = [
            digest(b"k2", &base),
            digest(
                b"k",
                &DigestVersion {
                    id: EntryId([9; 32]),
                    ..base
                },
            ),
            digest(
                b"k",
                &DigestVersion {
                    author: NodeId([9; 32]),
                    ..base
                },
            ),
            digest(
                b"k",
                &DigestVersion {
                    timestamp: Timestamp(9),
                    ..base
                },
            ),
            digest(
                b"k",
                &DigestVersion {
                    value: Some(b"w"),
                    ..base
                },
            ),
            digest(
                b"k",
                &DigestVersion {
                    value: None,
                    ..base
                },
            ),
            digest(
                b"k",
                &DigestVersion {
                    value: Some(b""),
                    ..base
                },
            ),
        ];
        for v in variants {
            assert_ne!(v, reference);
        }
        // A key and value split differently hash differently.
        assert_ne!(
            digest(
                b"ab",
                &DigestVersion {
                    value: Some(b"c"),
                    ..base
                }
            ),
            digest(
                b"a",
                &DigestVersion {
                    value: Some(b"bc"),
                    ..base
                }
            ),
        );
    }

    #[test]
    fn bytes_round_trip() {
        let mut d = StateDigest::new();
        d.add(b"k", &[version(4, Some(b"v"))]);
        let back = StateDigest::from_bytes(&d.to_bytes()).expect("right length");
        assert_eq!(back, d);
        assert!(StateDigest::from_bytes(&[0; 3]).is_none());
    }
}
