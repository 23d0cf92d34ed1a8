//! The log entry: one write, with its author's hash-chain link, and its canonical bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, InvalidEntry};
use crate::ids::{EntryId, NodeId, Signature};
use crate::limits::{
    MAX_ENTRY_BYTES, MAX_KEY_BYTES, MAX_OPS_PER_ENTRY, MAX_SUPERSEDES, MAX_VALUE_BYTES,
};

/// A hybrid logical clock reading: milliseconds since the Unix epoch in the high 48 bits, a
/// counter in the low 16. Used for display and deterministic tie-breaks only, never for
/// deciding which write wins.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }

    /// The logical counter within one millisecond.
    pub fn counter(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.millis(), self.counter())
    }
}

/// A hybrid logical clock. The wall clock is passed in, so this stays free of the OS.
#[derive(Debug, Default, Clone)]
pub struct HlcClock {
    last: Timestamp,
}

impl HlcClock {
    /// A reading later than every reading and observation so far.
    pub fn now(&mut self, wall_millis: u64) -> Timestamp {
        let wall = Timestamp(wall_millis << 16);
        self.last = if wall > self.last {
            wall
        } else {
            Timestamp(self.last.0 + 1)
        };
        self.last
    }

    /// Takes in a timestamp seen on a received entry, so later readings order after it.
    pub fn observe(&mut self, seen: Timestamp) {
        self.last = self.last.max(seen);
    }
}

/// One change to one key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`, replacing the versions in `supersedes`.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Ids of the versions of this key that this write replaces, strictly ascending.
        supersedes: Vec<EntryId>,
    },
    /// Remove the versions in `supersedes`; the delete itself is a tombstone version.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Ids of the versions of this key that this delete replaces, strictly ascending.
        supersedes: Vec<EntryId>,
    },
}

impl Op {
    /// The key this op writes.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }

    /// The versions this op replaces.
    pub fn supersedes(&self) -> &[EntryId] {
        match self {
            Op::Put { supersedes, .. } | Op::Delete { supersedes, .. } => supersedes,
        }
    }

    /// The value, or `None` for a delete.
    pub fn value(&self) -> Option<&[u8]> {
        match self {
            Op::Put { value, .. } => Some(value),
            Op::Delete { .. } => None,
        }
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lengths, never payloads: values may be large or private.
        match self {
            Op::Put {
                key,
                value,
                supersedes,
            } => write!(
                f,
                "Put(key {} bytes, value {} bytes, supersedes {})",
                key.len(),
                value.len(),
                supersedes.len()
            ),
            Op::Delete { key, supersedes } => {
                write!(
                    f,
                    "Delete(key {} bytes, supersedes {})",
                    key.len(),
                    supersedes.len()
                )
            }
        }
    }
}

/// One write in an author's log: a link in the author's hash chain carrying one or more ops,
/// applied atomically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The node that wrote it.
    pub author: NodeId,
    /// 1, 2, 3… per author, without gaps.
    pub seq: u64,
    /// The id of the author's previous entry; `None` exactly when `seq` is 1.
    pub prev: Option<EntryId>,
    /// When it was written, by the author's hybrid logical clock.
    pub timestamp: Timestamp,
    /// The changes, at most one per key.
    pub ops: Vec<Op>,
}

impl Entry {
    /// Checks every rule of the format that does not need other entries.
    pub fn validate(&self) -> Result<(), InvalidEntry> {
        if self.seq == 0 {
            return Err(InvalidEntry::ZeroSeq);
        }
        if self.prev.is_some() == (self.seq == 1) {
            return Err(InvalidEntry::PrevPresence { seq: self.seq });
        }
        if self.ops.is_empty() {
            return Err(InvalidEntry::NoOps);
        }
        if self.ops.len() > MAX_OPS_PER_ENTRY {
            return Err(InvalidEntry::TooManyOps {
                count: self.ops.len(),
                max: MAX_OPS_PER_ENTRY,
            });
        }
        for (index, op) in self.ops.iter().enumerate() {
            let key = op.key();
            if key.len() > MAX_KEY_BYTES {
                return Err(InvalidEntry::KeyTooLarge {
                    len: key.len(),
                    max: MAX_KEY_BYTES,
                });
            }
            if let Some(value) = op.value()
                && value.len() > MAX_VALUE_BYTES
            {
                return Err(InvalidEntry::ValueTooLarge {
                    len: value.len(),
                    max: MAX_VALUE_BYTES,
                });
            }
            let sup = op.supersedes();
            if sup.len() > MAX_SUPERSEDES || sup.windows(2).any(|w| w[0] >= w[1]) {
                return Err(InvalidEntry::Supersedes {
                    index,
                    max: MAX_SUPERSEDES,
                });
            }
        }
        if self.ops.len() > 1 {
            let mut keys: Vec<(&[u8], usize)> = self
                .ops
                .iter()
                .enumerate()
                .map(|(i, op)| (op.key(), i))
                .collect();
            keys.sort_unstable();
            if let Some(w) = keys.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(InvalidEntry::DuplicateKey {
                    index: w[0].1.max(w[1].1),
                });
            }
        }
        Ok(())
    }

    /// The one canonical byte form of this entry. Does not validate.
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.write_canonical(&mut out);
        out
    }

    fn write_canonical(&self, out: &mut Vec<u8>) {
        rmp_serde::encode::write(out, self).expect("encoding an entry into a Vec cannot fail");
    }

    fn encoded_len_hint(&self) -> usize {
        96 + self
            .ops
            .iter()
            .map(|op| {
                16 + op.key().len() + op.value().map_or(0, <[u8]>::len) + 33 * op.supersedes().len()
            })
            .sum::<usize>()
    }

    /// The id of this entry: BLAKE3 of its canonical bytes.
    pub fn id(&self) -> EntryId {
        EntryId::of_canonical_bytes(&self.to_canonical_bytes())
    }

    /// Decodes an entry, checking that `bytes` is its canonical form and that it is valid.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<(Self, EntryId), DecodeError> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(InvalidEntry::TooLarge {
                len: bytes.len(),
                max: MAX_ENTRY_BYTES,
            }
            .into());
        }
        let entry: Entry =
            rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        entry.validate()?;
        let mut again = Vec::with_capacity(bytes.len());
        entry.write_canonical(&mut again);
        if again != bytes {
            return Err(DecodeError::NotCanonical);
        }
        Ok((entry, EntryId::of_canonical_bytes(bytes)))
    }
}

/// MessagePack marker of a two-element array.
const FIXARRAY_2: u8 = 0x92;
/// MessagePack nil.
const NIL: u8 = 0xc0;
/// MessagePack `bin 8` marker followed by the length of a signature.
const BIN8_SIG: [u8; 2] = [0xc4, Signature::LEN as u8];

/// An entry as it stands in a log record or travels between peers: its canonical bytes, its id,
/// and the signature when one covers the chain up to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedEntry {
    /// The decoded entry.
    pub entry: Entry,
    /// BLAKE3 of its canonical bytes.
    pub id: EntryId,
    /// Signature of `id` by the author, if this entry carries one.
    pub signature: Option<Signature>,
}

impl SignedEntry {
    /// The record payload: the MessagePack array `[entry, signature or nil]`.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entry.encoded_len_hint() + 67);
        out.push(FIXARRAY_2);
        self.entry.write_canonical(&mut out);
        match &self.signature {
            None => out.push(NIL),
            Some(sig) => {
                out.extend_from_slice(&BIN8_SIG);
                out.extend_from_slice(sig.as_bytes());
            }
        }
        out
    }

    /// Decodes a record payload, checking the entry's canonical form; the id is the hash of the
    /// entry bytes as they stand in the payload.
    pub fn decode_payload(payload: &[u8]) -> Result<Self, DecodeError> {
        let malformed = |what: &str| DecodeError::Malformed(format!("record payload: {what}"));
        let (&head, rest) = payload.split_first().ok_or_else(|| malformed("empty"))?;
        if head != FIXARRAY_2 {
            return Err(malformed("not a two-element array"));
        }
        let (entry_bytes, signature) = if rest.last() == Some(&NIL) {
            (&rest[..rest.len() - 1], None)
        } else {
            let sig_at = rest
                .len()
                .checked_sub(BIN8_SIG.len() + Signature::LEN)
                .ok_or_else(|| malformed("too short for a signature"))?;
            let (entry_bytes, sig) = rest.split_at(sig_at);
            if sig[..2] != BIN8_SIG {
                return Err(malformed("signature is neither nil nor 64 bytes"));
            }
            let mut raw = [0u8; Signature::LEN];
            raw.copy_from_slice(&sig[2..]);
            (entry_bytes, Some(Signature(raw)))
        };
        let (entry, id) = Entry::from_canonical_bytes(entry_bytes)?;
        Ok(Self {
            entry,
            id,
            signature,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_entry() -> impl Strategy<Value = Entry> {
        let op = (
            prop::collection::vec(any::<u8>(), 0..8),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
            prop::collection::btree_set(any::<[u8; 32]>(), 0..3),
        )
            .prop_map(|(key, value, sup)| {
                let supersedes = sup.into_iter().map(EntryId).collect();
                match value {
                    Some(value) => Op::Put {
                        key,
                        value,
                        supersedes,
                    },
                    None => Op::Delete { key, supersedes },
                }
            });
        (
            any::<[u8; 32]>(),
            1u64..1000,
            any::<[u8; 32]>(),
            any::<u64>(),
            prop::collection::vec(op, 1..4),
        )
            .prop_map(|(author, seq, prev, ts, mut ops)| {
                let mut seen = std::collections::HashSet::new();
                ops.retain(|op| seen.insert(op.key().to_vec()));
                Entry {
                    author: NodeId(author),
                    seq,
                    prev: (seq > 1).then_some(EntryId(prev)),
                    timestamp: Timestamp(ts),
                    ops,
                }
            })
    }

    proptest! {
        #[test]
        fn payload_round_trips(entry in arb_entry(), sig in prop::option::of(any::<[u8; 32]>())) {
            let signature = sig.map(|s| { let mut b = [0u8; 64]; b[..32].copy_from_slice(&s); Signature(b) });
            let se = SignedEntry { id: entry.id(), entry, signature };
            let back = SignedEntry::decode_payload(&se.encode_payload()).unwrap();
            prop_assert_eq!(back, se);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = SignedEntry::decode_payload(&bytes);
            let _ = Entry::from_canonical_bytes(&bytes);
        }

        #[test]
        fn mutated_payloads_never_panic(entry in arb_entry(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let se = SignedEntry { id: entry.id(), entry, signature: None };
            let mut payload = se.encode_payload();
            let i = at.index(payload.len());
            payload[i] = byte;
            if let Ok(back) = SignedEntry::decode_payload(&payload) {
                // Whatever decodes is canonical: its id is the hash of its own encoding.
                prop_assert_eq!(back.id, back.entry.id());
            }
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let base = Entry {
            author: NodeId([1; 32]),
            seq: 1,
            prev: None,
            timestamp: Timestamp(0),
            ops: vec![Op::Delete {
                key: b"k".to_vec(),
                supersedes: vec![],
            }],
        };
        assert!(base.validate().is_ok());
        let mut e = base.clone();
        e.seq = 2;
        assert_eq!(e.validate(), Err(InvalidEntry::PrevPresence { seq: 2 }));
        let mut e = base.clone();
        e.ops.push(e.ops[0].clone());
        assert_eq!(e.validate(), Err(InvalidEntry::DuplicateKey { index: 1 }));
        let mut e = base.clone();
        e.ops = vec![Op::Delete {
            key: b"k".to_vec(),
            supersedes: vec![EntryId([2; 32]), EntryId([1; 32])],
        }];
        assert!(matches!(e.validate(), Err(InvalidEntry::Supersedes { .. })));
        let mut e = base;
        e.ops.clear();
        assert_eq!(e.validate(), Err(InvalidEntry::NoOps));
    }

    #[test]
    fn hlc_is_monotonic() {
        let mut c = HlcClock::default();
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(50);
        assert!(a < b && b < d);
        c.observe(Timestamp(200 << 16));
        assert!(c.now(150) > Timestamp(200 << 16));
    }
}
