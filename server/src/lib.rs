//! The kappakv server: the log store, the node's writer and indexer threads, the QUIC endpoint
//! and request service, and the offline commands.
//!
//! # Layout
//! - [`log`]: segment files, the record store owned by the writer thread, readers, recovery.
//! - [`node`]: the writer thread (group commit) and the indexer thread (log → views).
//! - [`identity`]: the node key in the data dir.
//! - [`commands`]: offline commands run by the `kappakv` binary without a runtime.
//!
//! This crate never installs a tracing subscriber: only `main.rs` does.

pub mod commands;
pub mod identity;
pub mod log;
pub mod node;
