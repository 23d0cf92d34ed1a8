//! The views. Each built-in view is a unit struct; its name, version and tables are constants
//! in [`crate::tables`]. Declared secondary indexes ([`secondary`]) are configured at run time.

pub mod geo;
pub mod history;
pub mod kv;
pub mod log_lookup;
pub mod secondary;

pub use history::HistoryView;
pub use kv::KvView;
pub use log_lookup::LogLookupView;
pub use secondary::{IndexDef, IndexDefError, IndexKind, SecondaryIndexView};

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

/// The views of a node with these declared secondary indexes: [`default_views`], then one
/// [`SecondaryIndexView`] per definition (after the key/value view, which they read).
pub fn configured_views(indexes: &[IndexDef]) -> Result<Vec<Box<dyn View>>, IndexDefError> {
    let mut views = default_views();
    for def in indexes {
        views.push(Box::new(SecondaryIndexView::new(def.clone())?));
    }
    Ok(views)
}
