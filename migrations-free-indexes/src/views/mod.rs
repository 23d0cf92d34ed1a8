//! The built-in views. Each is a unit struct; its name, version and tables are constants in
//! [`crate::tables`].

pub mod history;
pub mod kv;
pub mod log_lookup;

pub use history::HistoryView;
pub use kv::KvView;
pub use log_lookup::LogLookupView;

use crate::view::View;

/// The names of the views every node runs. Reads wait for these to apply the log; any other
/// view is built in the background.
pub const SERVING_VIEWS: &[&str] = &[
    crate::tables::LOG_LOOKUP_VIEW,
    crate::tables::KV_VIEW,
    crate::tables::HISTORY_VIEW,
];

/// The views every node runs: log lookup, key/value, history.
pub fn default_views() -> Vec<Box<dyn View>> {
    vec![
        Box::new(LogLookupView),
        Box::new(KvView),
        Box::new(HistoryView),
    ]
}
