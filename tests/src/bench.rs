//! Pieces the benchmark binaries (`catchup-bench`, `resume-bench`) share.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use kappakv_protocol::{NodeId, Status};

/// splitmix64: small, seedable, and good enough to fill a log.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

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
