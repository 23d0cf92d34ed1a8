//! Peer-to-peer replication over QUIC (`kappakv-peer/1`).
//!
//! - [`session`]: the sans-IO core: per-run verification, what the peer has, classification of
//!   received runs against the log.
//! - [`driver`]: the tokio half: dialling with backoff, accepting, the send and receive loops.
//! - [`peers`]: the peer list (flags, config, and `DATA_DIR/peers` for run-time additions).
//!
//! Each connection carries one sync: each side opens a unidirectional stream, sends `Hello`
//! with its version vector, then streams, in its own log order, every entry the other lacks,
//! and keeps streaming new ones live. Received runs are appended through the writer thread.

pub mod driver;
pub mod peers;
pub mod session;

pub use driver::Replication;
