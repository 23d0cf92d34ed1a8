//! Offline commands: plain synchronous code, no async runtime.

pub mod rebuild_indexes;
pub mod verify;
