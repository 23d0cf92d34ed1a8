//! Offline commands: plain synchronous code, no async runtime.

pub mod backup;
pub mod export;
pub mod import;
pub mod rebuild_indexes;
pub mod restore;
pub mod verify;
