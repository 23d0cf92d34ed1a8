//! Secondary index queries on the wire: the values an index holds ([`IndexValue`]), what a query
//! asks for ([`IndexQuery`]), and how an index reports its state ([`IndexStatus`]).

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::request::Lsn;

/// One value a secondary index holds: the JSON scalars. Numbers are `f64`, as in JSON; integers
/// beyond 2^53 lose precision.
///
/// Values order as null < false < true < numbers (numerically) < strings (by UTF-8 bytes), the
/// order in which an index stores and a range query returns them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IndexValue {
    /// JSON `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number. NaN is never indexed and matches nothing.
    Number(f64),
    /// A string.
    String(String),
}

impl IndexValue {
    /// The value's rank among the kinds, for ordering.
    fn rank(&self) -> u8 {
        match self {
            IndexValue::Null => 0,
            IndexValue::Bool(false) => 1,
            IndexValue::Bool(true) => 2,
            IndexValue::Number(_) => 3,
            IndexValue::String(_) => 4,
        }
    }
}

impl Ord for IndexValue {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            // `-0 == 0`, as in JSON; NaN (never indexed) still gets a place.
            (IndexValue::Number(a), IndexValue::Number(b)) => {
                a.partial_cmp(b).unwrap_or_else(|| a.total_cmp(b))
            }
            (IndexValue::String(a), IndexValue::String(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for IndexValue {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for IndexValue {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for IndexValue {}

impl From<&str> for IndexValue {
    fn from(s: &str) -> Self {
        IndexValue::String(s.to_owned())
    }
}

impl From<String> for IndexValue {
    fn from(s: String) -> Self {
        IndexValue::String(s)
    }
}

impl From<f64> for IndexValue {
    fn from(n: f64) -> Self {
        IndexValue::Number(n)
    }
}

impl From<i64> for IndexValue {
    fn from(n: i64) -> Self {
        IndexValue::Number(n as f64)
    }
}

impl From<bool> for IndexValue {
    fn from(b: bool) -> Self {
        IndexValue::Bool(b)
    }
}

impl fmt::Display for IndexValue {
    /// JSON syntax: `null`, `true`, `12.5`, `"cats"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexValue::Null => f.write_str("null"),
            IndexValue::Bool(b) => write!(f, "{b}"),
            IndexValue::Number(n) => write!(f, "{n}"),
            IndexValue::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// A point on the globe, in degrees: latitude in ±90, longitude in ±180. Two points are equal
/// when their coordinates are the same numbers, bit for bit.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct GeoPoint {
    /// Latitude, degrees north.
    pub lat: f64,
    /// Longitude, degrees east.
    pub lon: f64,
}

impl GeoPoint {
    /// Whether both coordinates are numbers in range.
    pub fn is_valid(&self) -> bool {
        (-90.0..=90.0).contains(&self.lat) && (-180.0..=180.0).contains(&self.lon)
    }
}

impl PartialEq for GeoPoint {
    fn eq(&self, other: &Self) -> bool {
        self.lat.to_bits() == other.lat.to_bits() && self.lon.to_bits() == other.lon.to_bits()
    }
}

impl Eq for GeoPoint {}

/// Which entries of an index a query reads. A value is a list of components, one per field
/// of the index in declaration order; a shorter list matches every entry that starts with it
/// (an index of one field takes one component).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexQuery {
    /// Entries equal to this value.
    Exact(Vec<IndexValue>),
    /// Entries from `start` (inclusive) to `end` (exclusive, or inclusive with
    /// `end_inclusive`), in the index's order; a missing bound is open.
    Range {
        /// The lower bound, in value order.
        start: Option<Vec<IndexValue>>,
        /// The upper bound, in value order.
        end: Option<Vec<IndexValue>>,
        /// Whether entries equal to `end` are included.
        end_inclusive: bool,
    },
    /// Of a `geo` index: the keys with a current point inside the box, edges included, in the
    /// index's order. A box whose `min.lon` is greater than its `max.lon` crosses the
    /// antimeridian.
    BBox {
        /// The south-west corner (lowest latitude, western longitude).
        min: GeoPoint,
        /// The north-east corner.
        max: GeoPoint,
    },
    /// Of a `geo` index: the keys nearest to the point by great-circle distance, nearest
    /// first, each answered with its distance (`Response::Nearby`).
    Near(GeoPoint),
}

impl IndexQuery {
    /// Entries equal to one value.
    pub fn exact(value: impl Into<IndexValue>) -> Self {
        IndexQuery::Exact(vec![value.into()])
    }

    /// Keys with a point in the box `min_lat..=max_lat`, `min_lon..=max_lon` (the order of
    /// `kappactl query --bbox`).
    pub fn bbox(min_lat: f64, max_lat: f64, min_lon: f64, max_lon: f64) -> Self {
        IndexQuery::BBox {
            min: GeoPoint {
                lat: min_lat,
                lon: min_lon,
            },
            max: GeoPoint {
                lat: max_lat,
                lon: max_lon,
            },
        }
    }

    /// Keys nearest to (`lat`, `lon`), nearest first.
    pub fn near(lat: f64, lon: f64) -> Self {
        IndexQuery::Near(GeoPoint { lat, lon })
    }

    /// Entries in `start..end` (end exclusive); `None` leaves a side open.
    pub fn range(start: Option<IndexValue>, end: Option<IndexValue>) -> Self {
        IndexQuery::Range {
            start: start.map(|v| vec![v]),
            end: end.map(|v| vec![v]),
            end_inclusive: false,
        }
    }
}

/// The state of one declared secondary index, in [`crate::Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexStatus {
    /// The index's declared name.
    pub name: String,
    /// Its kind: `exact`, `range`, `range desc`, `multi` or `geo`.
    pub kind: String,
    /// The LSN it has applied.
    pub applied_lsn: Lsn,
    /// Whether it is still being built: queries answer `IndexBuilding` until it is not.
    pub building: bool,
    /// Keys with at least one entry in the index.
    pub documents: u64,
    /// Entries (value, key) in the index.
    pub postings: u64,
    /// Keys under the index's prefix with a current value that is not a document, or whose
    /// field is missing or of a type the index does not take.
    pub skipped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_order_by_kind_then_value() {
        let mut values = [
            IndexValue::from("b"),
            IndexValue::from(2.5),
            IndexValue::Null,
            IndexValue::from(true),
            IndexValue::from(-1i64),
            IndexValue::from("a"),
            IndexValue::from(false),
        ];
        values.sort();
        let shown: Vec<String> = values.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["null", "false", "true", "-1", "2.5", "\"a\"", "\"b\""]
        );
        assert_eq!(IndexValue::from(3i64), IndexValue::from(3.0));
    }

    #[test]
    fn queries_round_trip_through_messagepack() {
        let q = IndexQuery::Range {
            start: Some(vec![IndexValue::from(1.5), IndexValue::Null]),
            end: None,
            end_inclusive: true,
        };
        let bytes = rmp_serde::to_vec(&q).unwrap();
        assert_eq!(rmp_serde::from_slice::<IndexQuery>(&bytes).unwrap(), q);
        for q in [
            IndexQuery::bbox(61.0, 65.0, -148.0, -144.0),
            IndexQuery::near(64.5, -147.6),
        ] {
            let bytes = rmp_serde::to_vec(&q).unwrap();
            assert_eq!(rmp_serde::from_slice::<IndexQuery>(&bytes).unwrap(), q);
        }
    }
}
