//! The kappakv server: the log store, the node's writer and indexer threads, the QUIC endpoint
//! and request service, and the offline commands.
//!
//! # Layout
//! - [`log`]: segment files, the record store owned by the writer thread, readers, recovery.
//! - [`node`]: the writer thread (group commit), the indexer thread (log → views), and the
//!   writer's supersede resolution.
//! - [`net`]: the QUIC endpoint, TLS identity, client connections and watches.
//! - [`service`] and [`handlers`]: the request path as a tower service.
//! - [`server`]: start and graceful shutdown of a node with its endpoint.
//! - [`config`], [`identity`], [`auth`]: settings, the node key, client tokens and tickets.
//! - [`commands`]: offline commands run by the `kappakv` binary without a runtime.
//! - [`admin`], [`health`], [`telemetry`]: the admin HTTP listener, liveness and readiness,
//!   and every metric the node emits (through the `metrics` facade; only `main.rs` installs a
//!   recorder).
//! - [`systemd`]: readiness notifications to the service manager.
//!
//! This crate never installs a tracing subscriber: only `main.rs` does.

pub mod admin;
pub mod auth;
pub mod commands;
pub mod config;
pub mod handlers;
pub mod health;
pub mod identity;
pub mod log;
pub mod net;
pub mod node;
pub mod server;
pub mod service;
pub mod systemd;
pub mod telemetry;

pub use config::Config;
pub use server::Server;

/// The wall clock in Unix milliseconds (0 before 1970).
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
