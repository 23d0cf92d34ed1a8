//! Offline commands: plain synchronous code, no async runtime.

pub mod verify;
