//! Errors of the protocol crate, one enum per operation.

use crate::ids::{EntryId, NodeId};

/// A hex id, signature or context that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// Wrong number of characters.
    #[error("{what}: expected {expected} hex digits, got {got} characters")]
    Length {
        /// What was being parsed.
        what: &'static str,
        /// Hex digits expected.
        expected: usize,
        /// Characters found.
        got: usize,
    },
    /// A character that is not a hex digit.
    #[error("{what}: character at position {position} is not a hex digit")]
    Character {
        /// What was being parsed.
        what: &'static str,
        /// Zero-based position of the bad character.
        position: usize,
    },
}

/// An entry that is well-formed MessagePack but breaks a rule of the entry format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEntry {
    /// `seq` starts at 1.
    #[error("seq must be at least 1")]
    ZeroSeq,
    /// The first entry of an author has no `prev`; every later one has.
    #[error("seq {seq} {}", if *seq == 1 { "must not have a prev link" } else { "must have a prev link" })]
    PrevPresence {
        /// The entry's seq.
        seq: u64,
    },
    /// An entry carries at least one op.
    #[error("entry has no ops")]
    NoOps,
    /// Too many ops.
    #[error("entry has {count} ops, the most is {max}")]
    TooManyOps {
        /// Ops found.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Two ops on one key.
    #[error("entry has more than one op on one key (op {index})")]
    DuplicateKey {
        /// Index of the second op on that key.
        index: usize,
    },
    /// A key over the limit.
    #[error("key of {len} bytes is over the limit of {max}")]
    KeyTooLarge {
        /// Key length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value over the limit.
    #[error("value of {len} bytes is over the limit of {max}")]
    ValueTooLarge {
        /// Value length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `supersedes` must be strictly ascending (sorted, no duplicates) and bounded.
    #[error("op {index}: supersedes must be sorted, without duplicates, and at most {max} ids")]
    Supersedes {
        /// Index of the op.
        index: usize,
        /// The limit on its length.
        max: usize,
    },
    /// The canonical encoding is over the limit.
    #[error("entry of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Bytes that do not decode to a valid entry or log record payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not the MessagePack shape expected.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Decodes, but its bytes are not the one canonical form of what they decode to.
    #[error("entry bytes are not in canonical form")]
    NotCanonical,
    /// Decodes, but breaks a rule of the format.
    #[error("invalid entry: {0}")]
    Invalid(#[from] InvalidEntry),
}

/// A log record or frame that cannot be cut out of a byte buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The length prefix is over the limit; nothing was allocated for it.
    #[error("length {len} is over the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record of length zero, which the writer never produces.
    #[error("zero-length record")]
    Empty,
    /// The checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
}

/// An entry that does not extend its author's chain, or whose signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// `seq` is not the next one for the author.
    #[error("author {author}: expected seq {expected}, got {got}")]
    SeqGap {
        /// The author.
        author: NodeId,
        /// The next seq after the known head.
        expected: u64,
        /// The entry's seq.
        got: u64,
    },
    /// `prev` is not the id of the author's previous entry.
    #[error("author {author} seq {seq}: prev link does not match the previous entry")]
    PrevMismatch {
        /// The author.
        author: NodeId,
        /// The entry's seq.
        seq: u64,
        /// The id of the stored previous entry.
        expected: Option<EntryId>,
        /// The entry's `prev`.
        got: Option<EntryId>,
    },
    /// The signature does not verify against the author's key.
    #[error("author {author} seq {seq}: bad signature")]
    BadSignature {
        /// The author.
        author: NodeId,
        /// The entry's seq.
        seq: u64,
    },
    /// The author id is not a valid ed25519 public key.
    #[error("author {author} is not a valid ed25519 public key")]
    BadAuthorKey {
        /// The author.
        author: NodeId,
    },
    /// A second, different entry for an (author, seq) that already has one.
    #[error(
        "author {author} seq {seq}: equivocation, two different entries ({existing} and {other})"
    )]
    Equivocation {
        /// The author.
        author: NodeId,
        /// The seq both entries claim.
        seq: u64,
        /// The entry already known.
        existing: EntryId,
        /// The conflicting entry.
        other: EntryId,
    },
    /// A chain that ends without a signature covering its last entries.
    #[error(
        "author {author}: entries after seq {signed_seq} up to {last_seq} are not covered by a signature"
    )]
    Unsigned {
        /// The author.
        author: NodeId,
        /// The last signed seq (0 for none).
        signed_seq: u64,
        /// The last seq.
        last_seq: u64,
    },
}
