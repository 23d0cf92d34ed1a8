//! The async Rust client of kappakv, a peer-to-peer key/value database whose source of truth is
//! a signed, append-only log.
//!
//! A [`Client`] holds one QUIC connection to one node, pinned to the node id in a
//! [`Ticket`] and authenticated with the ticket's token. Every read returns *all* current values
//! of a key (concurrent writes on different nodes become siblings) and a [`Context`]; writing
//! with that context supersedes exactly what was read, which is how siblings are merged.
//!
//! ```no_run
//! use kappakv_client::{Client, Ticket};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let ticket: Ticket = std::fs::read_to_string("kappakv.data/client.ticket")?.parse()?;
//! let client = Client::connect(&ticket).await?;
//!
//! client.put("greeting", "hello").await?;
//! let got = client.get("greeting").await?; // sees the put: reads wait for this client's writes
//! for version in &got.values {
//!     println!("{} = {:?}", version.id, version.value);
//! }
//! // Replace whatever was there, siblings included.
//! client.put_with("greeting", "hello, world", &got.context).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`client`]: [`Client`], the requests, [`Batch`] and [`Written`]; read-your-writes (the
//!   highest LSN written is sent as `min_lsn` with every read) and reconnects.
//! - [`config`]: [`ClientBuilder`] and the timeouts.
//! - [`query`]: [`QueryOptions`] and [`QueryPage`], for [`Client::query`] on a node's declared
//!   secondary indexes.
//! - `connection`: dialling with the node id pinned, the hello, frames on streams.
//! - [`scan`] and [`watch`]: the [`Scan`] and [`Watch`] streams.
//! - [`value`]: [`GetResult`] and typed JSON / MessagePack values.
//! - [`error`]: [`ConnectError`], [`RequestError`] and friends, each with `is_retryable`.
//!
//! # What it does not do
//!
//! - It talks to one node. It does not fail over to another node, balance load, or merge
//!   siblings for you: it hands back every sibling and the context to supersede them.
//! - It retries on its own only what is safe: a read whose connection broke (once), a write
//!   the node certainly never received, and a write whose connection broke after it was sent
//!   (once, on a new connection, with the same request id: a node that made the write answers
//!   with it instead of writing again). A write that still gets no answer may or may not have
//!   happened: [`RequestError::OutcomeUnknown`] ([`RequestError::is_maybe_committed`]), which is
//!   not [`is_retryable`](RequestError::is_retryable). Errors such as `Busy` are returned, not
//!   retried.
//! - It installs no tracing subscriber; it only emits events (lengths, never values).

#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod config;
mod connection;
pub mod error;
mod pipeline;
pub mod query;
pub mod scan;
pub mod sync;
pub mod value;
pub mod watch;

pub use client::{Batch, Client, Written};
pub use config::ClientBuilder;
pub use error::{
    ConnectError, InvalidRequest, ProtocolError, RequestError, Result, TransportError, ValueError,
};
/// The size limits the node enforces (keys, values, ops per batch, frames), checked here too.
pub use kappakv_protocol::limits;
pub use kappakv_protocol::{
    BootstrapStatus, Change, Context, EntryId, ErrorCode, IndexQuery, IndexStatus, IndexValue,
    KeyRange, KeyVersions, Lsn, NodeAddr, NodeId, PeerOrigin, PeerStatus, StateRoot, Status,
    Ticket, Timestamp, Version, WriteOp,
};
pub use query::{QueryCursor, QueryOptions, QueryPage};
pub use scan::{Scan, ScanOptions};
pub use sync::{SyncOptions, SyncStream};
pub use value::{GetResult, Typed, TypedVersion};
pub use watch::Watch;
