//! The built-in views. Each is a unit struct; its name, version and tables are constants in
//! [`crate::tables`].

pub mod history;
pub mod kv;
pub mod log_lookup;

pub use history::HistoryView;
pub use kv::KvView;
pub use log_lookup::LogLookupView;

use crate::view::View;

/// The views every node runs: log lookup, key/value, history.
pub fn default_views() -> Vec<Box<dyn View>> {
    vec![
        Box::new(LogLookupView),
        Box::new(KvView),
        Box::new(HistoryView),
    ]
}
