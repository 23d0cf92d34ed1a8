//! Pieces the benchmark binaries (`catchup-bench`, `resume-bench`) share; their generator is
//! the crash harness's [`Rng`](crate::crash::Rng).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use kappakv_protocol::{NodeId, Status};

/// Milliseconds since the Unix epoch.
pub fn wall_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The median of `v` (which it sorts); the mean of the two middle values for an even count.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// A node's version vector as a map.
pub fn vv(status: &Status) -> BTreeMap<NodeId, u64> {
    status.version_vector.iter().copied().collect()
}
