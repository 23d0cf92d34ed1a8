//! The kappakv protocol: what every other crate agrees on.
//!
//! - [`entry`]: the log entry ([`Entry`], [`Op`]), hybrid logical clock timestamps, the one
//!   canonical MessagePack form, and [`SignedEntry`], an entry as it stands in a log record.
//! - [`ids`]: [`NodeId`], [`EntryId`] (BLAKE3 of the canonical bytes), [`Signature`], and
//!   [`Context`]; their human form is lowercase hex everywhere.
//! - [`sign`] and [`verify`]: ed25519 signatures over entry ids that vouch for an author's whole
//!   chain, and the pure chain checks (`seq` without gaps, `prev` links).
//! - [`record`] and [`frame`]: `u32 len | u32 crc32c | bytes` log records and `u32 len | body`
//!   stream frames, decoded as "need more", a whole item, or a typed error.
//! - [`request`], [`response`], [`peer`]: the messages on client and peer streams.
//! - [`index`]: secondary index values, queries and status.
//! - [`ticket`]: the copy-pasteable string a client connects with.
//! - [`limits`]: every size limit, checked before allocation.
//! - `tls` (feature `tls`): TLS verifiers that pin node ids instead of trusting a CA.
//!
//! This crate does no I/O: no files, no sockets, no clock, no threads, no logging.

#![warn(missing_docs, unreachable_pub)]

pub mod entry;
pub mod error;
pub mod frame;
pub mod ids;
pub mod index;
pub mod limits;
pub mod peer;
pub mod record;
pub mod request;
pub mod response;
pub mod sign;
pub mod ticket;
#[cfg(feature = "tls")]
pub mod tls;
pub mod verify;

pub use entry::{Entry, HlcClock, Op, SignedEntry, Timestamp};
pub use error::{DecodeError, FramingError, InvalidEntry, ParseIdError, VerifyError};
pub use ids::{Context, EntryId, InviteSecret, NodeId, RequestId, Signature, StateRoot};
pub use index::{GeoPoint, IndexQuery, IndexStatus, IndexValue};
pub use request::{KeyRange, Lsn, Request, WriteOp};
pub use response::{
    BootstrapStatus, Change, ErrorCode, KeyVersions, PeerOrigin, PeerStatus, Response, Status,
    Version,
};
pub use sign::Keypair;
pub use ticket::{Invite, NodeAddr, NodeAddrError, Ticket, TicketError};

/// ALPN protocol name of client connections.
pub const ALPN_CLIENT: &[u8] = b"kappakv-client/1";
/// ALPN protocol name of peer connections.
pub const ALPN_PEER: &[u8] = b"kappakv-peer/1";
/// Default QUIC port.
pub const DEFAULT_PORT: u16 = 7700;
