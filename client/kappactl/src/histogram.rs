//! A fixed-size latency histogram: exact below 128 µs, then 64 buckets per power of two
//! (under 1.6 % relative error), so memory stays constant however many samples a bench records.

/// Sub-buckets per power of two above the linear range.
const SUB: u64 = 64;
/// Values below this are counted exactly.
const LINEAR: u64 = 2 * SUB;
/// Enough buckets for every `u64`.
const BUCKETS: usize = (LINEAR + (64 - 7) * SUB) as usize;

#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    // `v >> shift` lies in [SUB, 2 * SUB).
    let shift = u64::from(v.ilog2()) - 6;
    (LINEAR + (shift - 1) * SUB + ((v >> shift) - SUB)) as usize
}

/// The largest value that falls in bucket `i`.
fn highest(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let shift = (i - LINEAR) / SUB + 1;
    let m = (i - LINEAR) % SUB + SUB;
    ((m + 1) << shift).wrapping_sub(1)
}

impl Histogram {
    pub(crate) fn record(&mut self, micros: u64) {
        self.counts[index(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
        self.sum += u128::from(micros);
    }

    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    pub(crate) fn mean(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / u128::from(self.total)) as u64
        }
    }

    /// The value at or below which `p` percent of samples fall (bucket upper edge, capped at the
    /// exact maximum); `0` when empty.
    pub(crate) fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut prev = 0;
        for v in (0..5000).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(i >= prev, "{v}");
            assert!(highest(i) >= v, "{v}: bucket {i} tops at {}", highest(i));
            if i > 0 {
                assert!(highest(i - 1) < v, "{v}");
            }
            prev = i;
        }
    }

    #[test]
    fn percentiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=10_000 {
            h.record(v);
        }
        for (p, want) in [(50.0, 5000), (90.0, 9000), (99.0, 9900)] {
            let got = h.percentile(p);
            assert!(
                got >= want && got as f64 <= want as f64 * 1.016,
                "p{p}: {got}"
            );
        }
        assert_eq!(h.percentile(100.0), 10_000);
        assert_eq!(h.max(), 10_000);
        assert_eq!(h.mean(), 5000);

        let mut small = Histogram::default();
        for v in [3, 3, 3, 100] {
            small.record(v);
        }
        assert_eq!(small.percentile(50.0), 3);
        assert_eq!(small.percentile(99.0), 100);
        let mut merged = Histogram::default();
        merged.merge(&h);
        merged.merge(&small);
        assert_eq!(merged.count(), 10_004);
        assert_eq!(Histogram::default().percentile(50.0), 0);
    }
}
