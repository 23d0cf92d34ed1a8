//! The geometry of `geo` indexes: points read from documents, their place on a space-filling
//! curve, the curve ranges that cover a box, and great-circle distances.
//!
//! A point's posting value is `cell u64 BE | latitude f64 bits BE | longitude f64 bits BE`:
//! `cell` interleaves the bits of the quantized longitude (even bits) and latitude (odd bits),
//! a Z-order curve, so the postings of nearby points lie close together in the B-tree and a
//! box is read as a few ranges of cells ([`cover`]). The exact coordinates come after the cell,
//! so a query checks each posting against the box without reading the document.

use kappakv_protocol::GeoPoint;
use serde_json::Value;

use crate::document::lookup;

/// Bytes of a posting value.
pub const POSTING_LEN: usize = 24;
/// Most cell ranges one box is read as: more ranges fit the box more closely (fewer postings
/// read outside it) but cost a B-tree descent each.
pub const MAX_COVER_RANGES: usize = 48;
/// The mean radius of the Earth, metres (IUGG).
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Why a document has no point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPoint {
    /// A field is not there.
    Missing,
    /// A field is there but is not a valid point.
    Invalid,
}

/// The point of `doc`: two fields (latitude, longitude) or one GeoJSON `Point`
/// (`{"type": "Point", "coordinates": [lon, lat]}`).
pub fn point_of(doc: &Value, paths: &[Vec<String>]) -> Result<GeoPoint, NoPoint> {
    let number = |v: &Value| v.as_f64().ok_or(NoPoint::Invalid);
    let point = match paths {
        [lat, lon] => GeoPoint {
            lat: number(lookup(doc, lat).ok_or(NoPoint::Missing)?)?,
            lon: number(lookup(doc, lon).ok_or(NoPoint::Missing)?)?,
        },
        [geometry] => {
            let g = lookup(doc, geometry).ok_or(NoPoint::Missing)?;
            if g.get("type").and_then(Value::as_str) != Some("Point") {
                return Err(NoPoint::Invalid);
            }
            match g
                .get("coordinates")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            {
                Some([lon, lat, ..]) => GeoPoint {
                    lat: number(lat)?,
                    lon: number(lon)?,
                },
                _ => return Err(NoPoint::Invalid),
            }
        }
        _ => return Err(NoPoint::Invalid),
    };
    if !point.is_valid() {
        return Err(NoPoint::Invalid);
    }
    // -0.0 and 0.0 are one coordinate; so are the meridians 180 and -180.
    Ok(GeoPoint {
        lat: point.lat + 0.0,
        lon: if point.lon >= 180.0 {
            -180.0
        } else {
            point.lon + 0.0
        },
    })
}

/// A coordinate in `min..=max` as a 32-bit fraction of the range: monotone, so a point inside
/// a box quantizes inside the quantized box.
fn quantize(v: f64, min: f64, span: f64) -> u32 {
    let scaled = ((v - min) / span * 4_294_967_296.0).floor();
    scaled.clamp(0.0, f64::from(u32::MAX)) as u32
}

fn qx(lon: f64) -> u32 {
    quantize(lon, -180.0, 360.0)
}

fn qy(lat: f64) -> u32 {
    quantize(lat, -90.0, 180.0)
}

/// The bits of `v` spread to the even bits of a u64.
fn spread(v: u32) -> u64 {
    let mut x = u64::from(v);
    x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
    x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
    x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | (x << 2)) & 0x3333_3333_3333_3333;
    x = (x | (x << 1)) & 0x5555_5555_5555_5555;
    x
}

fn cell(x: u32, y: u32) -> u64 {
    spread(x) | (spread(y) << 1)
}

/// The posting value of `p`.
pub fn encode(p: GeoPoint) -> [u8; POSTING_LEN] {
    let mut out = [0u8; POSTING_LEN];
    out[..8].copy_from_slice(&cell(qx(p.lon), qy(p.lat)).to_be_bytes());
    out[8..16].copy_from_slice(&p.lat.to_bits().to_be_bytes());
    out[16..].copy_from_slice(&p.lon.to_bits().to_be_bytes());
    out
}

/// The point of a posting value.
pub fn decode(value: &[u8]) -> Option<GeoPoint> {
    let value: &[u8; POSTING_LEN] = value.try_into().ok()?;
    let f = |b: &[u8]| f64::from_bits(u64::from_be_bytes(b.try_into().expect("8 bytes")));
    Some(GeoPoint {
        lat: f(&value[8..16]),
        lon: f(&value[16..]),
    })
}

/// A box, edges included; `min.lon > max.lon` crosses the antimeridian.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoBox {
    /// South-west corner.
    pub min: GeoPoint,
    /// North-east corner.
    pub max: GeoPoint,
}

impl GeoBox {
    /// The whole globe.
    pub const WORLD: GeoBox = GeoBox {
        min: GeoPoint {
            lat: -90.0,
            lon: -180.0,
        },
        max: GeoPoint {
            lat: 90.0,
            lon: 180.0,
        },
    };

    /// Whether `p` is inside, edges included; the meridians 180 and -180 are one.
    pub fn contains(&self, p: GeoPoint) -> bool {
        let lat = self.min.lat <= p.lat && p.lat <= self.max.lat;
        let lon_in = |lon: f64| {
            if self.min.lon <= self.max.lon {
                self.min.lon <= lon && lon <= self.max.lon
            } else {
                lon >= self.min.lon || lon <= self.max.lon
            }
        };
        let lon = lon_in(p.lon)
            || (p.lon <= -180.0 && lon_in(180.0))
            || (p.lon >= 180.0 && lon_in(-180.0));
        lat && lon
    }

    /// The box of the points within `radius_m` of `center`, or more.
    pub fn around(center: GeoPoint, radius_m: f64) -> GeoBox {
        // A little more than the circle, so rounding never leaves a point of it out.
        let angle = radius_m / EARTH_RADIUS_M + 1e-9;
        if angle >= std::f64::consts::PI {
            return GeoBox::WORLD;
        }
        let dlat = angle.to_degrees();
        let (min_lat, max_lat) = (center.lat - dlat, center.lat + dlat);
        if min_lat <= -90.0 || max_lat >= 90.0 {
            // The circle holds a pole: every longitude.
            return GeoBox {
                min: GeoPoint {
                    lat: min_lat.max(-90.0),
                    lon: -180.0,
                },
                max: GeoPoint {
                    lat: max_lat.min(90.0),
                    lon: 180.0,
                },
            };
        }
        let sin = angle.sin() / center.lat.to_radians().cos();
        let dlon = if sin >= 1.0 {
            180.0
        } else {
            sin.asin().to_degrees() + 1e-9
        };
        if dlon >= 180.0 {
            return GeoBox {
                min: GeoPoint {
                    lat: min_lat,
                    lon: -180.0,
                },
                max: GeoPoint {
                    lat: max_lat,
                    lon: 180.0,
                },
            };
        }
        let wrap = |lon: f64| {
            if lon < -180.0 {
                lon + 360.0
            } else if lon > 180.0 {
                lon - 360.0
            } else {
                lon
            }
        };
        GeoBox {
            min: GeoPoint {
                lat: min_lat,
                lon: wrap(center.lon - dlon),
            },
            max: GeoPoint {
                lat: max_lat,
                lon: wrap(center.lon + dlon),
            },
        }
    }

    /// The box as boxes that do not cross the antimeridian; one that reaches the meridian
    /// 180 also takes -180, where points on it are indexed.
    fn parts(&self) -> Vec<GeoBox> {
        let mut parts = self.halves();
        if parts.iter().any(|p| p.max.lon >= 180.0) {
            parts.push(GeoBox {
                min: GeoPoint {
                    lat: self.min.lat,
                    lon: -180.0,
                },
                max: GeoPoint {
                    lat: self.max.lat,
                    lon: -180.0,
                },
            });
        }
        parts
    }

    fn halves(&self) -> Vec<GeoBox> {
        if self.min.lon <= self.max.lon {
            return vec![*self];
        }
        vec![
            GeoBox {
                min: self.min,
                max: GeoPoint {
                    lat: self.max.lat,
                    lon: 180.0,
                },
            },
            GeoBox {
                min: GeoPoint {
                    lat: self.min.lat,
                    lon: -180.0,
                },
                max: self.max,
            },
        ]
    }
}

/// A square of the curve: the cells sharing their first `2 * level` bits.
#[derive(Clone, Copy)]
struct Square {
    level: u32,
    /// The lowest x and y of the square.
    x: u32,
    y: u32,
}

impl Square {
    /// The last x (or y) of the square.
    fn last(&self, first: u32) -> u32 {
        first + u32::MAX.checked_shr(self.level).unwrap_or(0)
    }

    /// The cells of the square.
    fn cells(&self) -> (u64, u64) {
        let low = cell(self.x, self.y);
        (low, low | u64::MAX.checked_shr(2 * self.level).unwrap_or(0))
    }

    fn children(self) -> [Square; 4] {
        let half = 1u32 << (31 - self.level);
        let level = self.level + 1;
        [
            (self.x, self.y),
            (self.x + half, self.y),
            (self.x, self.y + half),
            (self.x + half, self.y + half),
        ]
        .map(|(x, y)| Square { level, x, y })
    }
}

/// The ranges of cells (inclusive, ascending, disjoint) whose points may be inside `b`: every
/// point inside `b` has its cell in one of them, in at most [`MAX_COVER_RANGES`] ranges.
pub fn cover(b: &GeoBox) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let parts = b.parts();
    let budget = MAX_COVER_RANGES / parts.len();
    for part in parts {
        let (x0, x1) = (qx(part.min.lon), qx(part.max.lon));
        let (y0, y1) = (qy(part.min.lat), qy(part.max.lat));
        if x0 > x1 || y0 > y1 {
            continue;
        }
        let mut partial = vec![Square {
            level: 0,
            x: 0,
            y: 0,
        }];
        let mut found = Vec::new();
        while !partial.is_empty() {
            let last_level = partial[0].level == 32;
            if last_level || found.len() + 4 * partial.len() > budget {
                found.extend(partial.iter().map(Square::cells));
                break;
            }
            let mut next = Vec::new();
            for square in partial.into_iter().flat_map(Square::children) {
                let (sx1, sy1) = (square.last(square.x), square.last(square.y));
                if sx1 < x0 || square.x > x1 || sy1 < y0 || square.y > y1 {
                    continue;
                }
                if x0 <= square.x && sx1 <= x1 && y0 <= square.y && sy1 <= y1 {
                    found.push(square.cells());
                } else {
                    next.push(square);
                }
            }
            partial = next;
        }
        ranges.extend(found);
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (low, high) in ranges {
        match merged.last_mut() {
            Some(last) if low <= last.1.saturating_add(1) => last.1 = last.1.max(high),
            _ => merged.push((low, high)),
        }
    }
    merged
}

/// The great-circle distance between two points, metres (haversine).
pub fn distance_m(a: GeoPoint, b: GeoPoint) -> f64 {
    let (la, lb) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lb - la;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la.cos() * lb.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// A distance in whole millimetres, as queries order and answer them.
pub fn to_mm(metres: f64) -> u64 {
    (metres * 1000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(lat: f64, lon: f64) -> GeoPoint {
        GeoPoint { lat, lon }
    }

    #[test]
    fn points_come_from_two_fields_or_a_geojson_point() {
        let paths = |fs: &[&str]| -> Vec<Vec<String>> {
            fs.iter()
                .map(|f| f.split('.').map(str::to_owned).collect())
                .collect()
        };
        let doc = serde_json::json!({"lat": 64.5, "lon": -147.6,
            "geometry": {"type": "Point", "coordinates": [-147.6, 64.5]},
            "bad": {"type": "Point", "coordinates": [200.0, 0.0]}});
        assert_eq!(point_of(&doc, &paths(&["lat", "lon"])), Ok(p(64.5, -147.6)));
        assert_eq!(point_of(&doc, &paths(&["geometry"])), Ok(p(64.5, -147.6)));
        assert_eq!(point_of(&doc, &paths(&["bad"])), Err(NoPoint::Invalid));
        assert_eq!(point_of(&doc, &paths(&["lat", "x"])), Err(NoPoint::Missing));
        assert_eq!(
            point_of(&doc, &paths(&["lon", "lat"])),
            Err(NoPoint::Invalid)
        );
    }

    #[test]
    fn a_posting_holds_its_point_and_sorts_by_cell() {
        let a = p(-90.0, -180.0);
        assert_eq!(decode(&encode(a)), Some(a));
        assert!(encode(p(-90.0, -180.0)) < encode(p(90.0, 180.0)));
        assert_eq!(&encode(p(90.0, 180.0))[..8], &u64::MAX.to_be_bytes());
    }

    #[test]
    fn the_cover_holds_every_cell_of_the_box() {
        let boxes = [
            GeoBox {
                min: p(61.0, -148.0),
                max: p(65.0, -144.0),
            },
            GeoBox {
                min: p(-10.0, 170.0),
                max: p(10.0, -170.0),
            },
            GeoBox::WORLD,
            GeoBox {
                min: p(1.0, 1.0),
                max: p(1.0, 1.0),
            },
        ];
        for b in boxes {
            let ranges = cover(&b);
            assert!(
                !ranges.is_empty() && ranges.len() <= MAX_COVER_RANGES,
                "{b:?}"
            );
            for i in 0..=20 {
                for j in 0..=20 {
                    let t = |lo: f64, hi: f64, k: i32| lo + (hi - lo) * f64::from(k) / 20.0;
                    let lon = if b.min.lon <= b.max.lon {
                        t(b.min.lon, b.max.lon, j)
                    } else {
                        let l = t(b.min.lon, b.max.lon + 360.0, j);
                        if l > 180.0 { l - 360.0 } else { l }
                    };
                    let q = p(t(b.min.lat, b.max.lat, i), lon);
                    let c = u64::from_be_bytes(encode(q)[..8].try_into().unwrap());
                    assert!(
                        ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi),
                        "{q:?} of {b:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_meridians_180_and_minus_180_are_one() {
        let doc = serde_json::json!({"lat": 1.0, "lon": 180.0});
        let paths = vec![vec!["lat".to_string()], vec!["lon".to_string()]];
        let stored = point_of(&doc, &paths).unwrap();
        assert_eq!(stored, p(1.0, -180.0));
        let east = GeoBox {
            min: p(0.0, 170.0),
            max: p(2.0, 180.0),
        };
        assert!(east.contains(stored));
        let c = u64::from_be_bytes(encode(stored)[..8].try_into().unwrap());
        assert!(cover(&east).iter().any(|&(lo, hi)| lo <= c && c <= hi));
    }

    #[test]
    fn distances_and_the_box_around_a_point() {
        let d = distance_m(p(0.0, 0.0), p(0.0, 1.0));
        assert!((d - 111_195.0).abs() < 1.0, "{d}");
        assert!(distance_m(p(89.0, 0.0), p(89.0, 180.0)) < 250_000.0);
        let b = GeoBox::around(p(0.0, 179.9), 50_000.0);
        assert!(b.min.lon > b.max.lon, "crosses the antimeridian: {b:?}");
        assert!(b.contains(p(0.0, -179.9)));
        let polar = GeoBox::around(p(89.9, 0.0), 50_000.0);
        assert!(polar.contains(p(89.9, 180.0)) && polar.contains(p(89.9, -180.0)));
    }
}
