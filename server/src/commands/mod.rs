//! Offline commands: plain synchronous code, no async runtime. `export` and `backup` may run
//! next to a serving node; [`live`] asks that node how far its log is durable (on a thread and
//! runtime of its own) so that they take nothing it has not acknowledged.

pub mod backup;
pub mod export;
pub mod import;
pub mod join;
pub mod live;
pub mod progress;
pub mod rebuild_indexes;
pub mod restore;
pub mod verify;
