//! Declared secondary indexes: for the keys under a prefix whose values are documents (JSON
//! objects or MessagePack maps), the keys by the value of one or more fields.
//!
//! An [`IndexDef`] is data (from the server's configuration); [`SecondaryIndexView`] is the
//! view it declares. The view's version is a hash of the definition, so changing what an index
//! derives is one edit: the next open finds a different version, drops the index and rebuilds
//! it from the log. There is nothing to migrate.
//!
//! # How postings follow the key/value view
//!
//! An index does not interpret supersedes itself. For every key a batch touches, it reads the
//! key's current versions from the key/value view's table in the same write transaction and
//! recomputes the key's postings from them: the union of the values of every current,
//! non-tombstone version (so siblings post under each of their values), with the key's old
//! postings (kept in `by_key`) removed. A deleted key, or one whose new value no longer
//! matches, leaves the postings it had.
//!
//! This is exact even while the index is built in the background and the key/value view is
//! already far ahead: the index then sees the key/value state at some LSN `A` (at least the
//! batch's end) instead of at the batch's end. When the index has applied up to `A` itself, the
//! last entry touching a key `k` before `A` was processed at a time when the key/value view
//! stood at some `A' ≤ A` past that entry, and no entry between it and `A` touches `k`, so
//! `k`'s current versions at `A'` and at `A` are the same, and so are its postings. Every later
//! change to `k` is a later entry, which the index processes later. The only requirement is
//! that the key/value view is never *behind* an index: registered first, it applies each batch
//! before the indexes in the same transaction, and the server builds an index in the
//! background only up to what the key/value view has applied.

use std::collections::{BTreeSet, BinaryHeap};
use std::fmt;
use std::ops::Bound;

use kappakv_protocol::{GeoPoint, IndexQuery, IndexValue, KeyVersions};
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::document::{
    decode_document, encode_tuple, encode_value, lookup, prefix_successor, scalar,
};
use crate::error::{ApplyError, CorruptRecord, QueryError, ReadError};
use crate::record::{CurrentVersion, decode_current};
use crate::snapshot::{Snapshot, key_versions};
use crate::tables::{
    KV_CURRENT, secondary_by_key, secondary_postings, secondary_stats, secondary_view_name,
};
use crate::view::{Batch, View};
use crate::views::geo::{self, GeoBox};

/// Most fields one index may combine.
pub const MAX_INDEX_FIELDS: usize = 8;
/// Most postings one version of a document may have (the product of its array sizes in a
/// multi-valued index); a document with more is skipped.
pub const MAX_POSTINGS_PER_VERSION: usize = 1024;
/// Longest index name.
pub const MAX_INDEX_NAME_BYTES: usize = 64;

/// Bumped when what a definition derives changes for the same definition (the encoding of
/// values, the rules for skipping): every secondary index is then rebuilt.
const DERIVATION_FORMAT: u32 = 1;

/// What an index stores per document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexKind {
    /// One entry per document: its field's value, any JSON scalar (null, bool, number,
    /// string).
    Exact,
    /// One entry per document: its field's value, a number or a string; a query returns
    /// entries in ascending order, or descending.
    Range {
        /// Whether queries return the highest values first.
        descending: bool,
    },
    /// One entry per distinct element of the field, an array of scalars (tags).
    Multi,
    /// One entry per document: its point on the globe, from two fields (latitude, longitude;
    /// `lat` and `lon` unless `fields` says otherwise) or one GeoJSON `Point` field; queried
    /// by box or by distance ([`super::geo`]).
    Geo,
}

impl IndexKind {
    /// The kind as configured: `exact`, `range`, `range desc` or `multi`.
    pub fn label(self) -> &'static str {
        match self {
            IndexKind::Exact => "exact",
            IndexKind::Range { descending: false } => "range",
            IndexKind::Range { descending: true } => "range desc",
            IndexKind::Multi => "multi",
            IndexKind::Geo => "geo",
        }
    }

    fn descending(self) -> bool {
        matches!(self, IndexKind::Range { descending: true })
    }
}

/// A declared secondary index.
///
/// In TOML (one `[[index]]` table each):
///
/// ```toml
/// [[index]]
/// name = "posts_by_tag"
/// prefix = "posts/"
/// field = "tags"            # or fields = ["author.name", "year"]
/// kind = "multi"            # or "exact", "range", "geo"
/// # descending = true       # range only
/// ```
///
/// A `geo` index takes its point from `lat` and `lon` by default, from two other fields with
/// `fields = ["position.lat", "position.lon"]`, or from a GeoJSON `Point` with
/// `field = "geometry"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawIndexDef", into = "RawIndexDef")]
pub struct IndexDef {
    /// Unique among the indexes: letters, digits, `_` and `-`.
    pub name: String,
    /// Only keys starting with this are indexed (`""`: every key).
    pub prefix: String,
    /// Field paths, `.` between nested object keys (`author.name`). Several fields make a
    /// compound index, queried by a prefix of its fields.
    pub fields: Vec<String>,
    /// What is stored per document.
    pub kind: IndexKind,
}

/// A definition that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexDefError {
    /// The name is empty, too long or has other characters than letters, digits, `_`, `-`.
    #[error(
        "index name {name:?} is invalid: use 1 to {MAX_INDEX_NAME_BYTES} letters, digits, `_` or `-`"
    )]
    Name {
        /// The name.
        name: String,
    },
    /// No field, or more than [`MAX_INDEX_FIELDS`].
    #[error(
        "index {name:?} needs 1 to {MAX_INDEX_FIELDS} fields (`field = \"tags\"` or `fields = [..]`), it has {count}"
    )]
    FieldCount {
        /// The index.
        name: String,
        /// How many it has.
        count: usize,
    },
    /// A field path with an empty segment.
    #[error("index {name:?}: field {field:?} is not a path like `author.name`")]
    Field {
        /// The index.
        name: String,
        /// The path.
        field: String,
    },
    /// `field` and `fields` both given.
    #[error("index {name:?}: give `field` or `fields`, not both")]
    FieldAndFields {
        /// The index.
        name: String,
    },
    /// `descending` on an index that is not a range.
    #[error("index {name:?}: `descending` applies to kind = \"range\" only")]
    DescendingNotRange {
        /// The index.
        name: String,
    },
    /// A `geo` index with other than one field (a GeoJSON point) or two (latitude, longitude).
    #[error(
        "index {name:?}: a geo index takes `fields = [\"lat\", \"lon\"]` (the default) or one GeoJSON Point `field`, not {count} fields"
    )]
    GeoFields {
        /// The index.
        name: String,
        /// How many fields it has.
        count: usize,
    },
}

impl IndexDef {
    /// Checks the name and fields.
    pub fn validate(&self) -> Result<(), IndexDefError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_INDEX_NAME_BYTES
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(IndexDefError::Name {
                name: self.name.clone(),
            });
        }
        if self.fields.is_empty() || self.fields.len() > MAX_INDEX_FIELDS {
            return Err(IndexDefError::FieldCount {
                name: self.name.clone(),
                count: self.fields.len(),
            });
        }
        if self.kind == IndexKind::Geo && self.fields.len() > 2 {
            return Err(IndexDefError::GeoFields {
                name: self.name.clone(),
                count: self.fields.len(),
            });
        }
        for field in &self.fields {
            if field.split('.').any(str::is_empty) {
                return Err(IndexDefError::Field {
                    name: self.name.clone(),
                    field: field.clone(),
                });
            }
        }
        Ok(())
    }

    /// The definition version: the first 8 bytes of the BLAKE3 hash of a canonical encoding of
    /// everything that decides what the index derives.
    pub fn version(&self) -> u64 {
        let mut h = blake3::Hasher::new();
        h.update(b"kappakv secondary index\0");
        h.update(&DERIVATION_FORMAT.to_le_bytes());
        let mut part = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(self.name.as_bytes());
        part(self.prefix.as_bytes());
        part(&(self.fields.len() as u64).to_le_bytes());
        for field in &self.fields {
            part(field.as_bytes());
        }
        part(self.kind.label().as_bytes());
        let hash = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// The TOML/serde form of [`IndexDef`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIndexDef {
    name: String,
    prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fields: Option<Vec<String>>,
    kind: RawKind,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    descending: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Exact,
    Range,
    Multi,
    Geo,
}

impl TryFrom<RawIndexDef> for IndexDef {
    type Error = IndexDefError;

    fn try_from(raw: RawIndexDef) -> Result<Self, Self::Error> {
        let fields = match (raw.field, raw.fields) {
            (Some(_), Some(_)) => return Err(IndexDefError::FieldAndFields { name: raw.name }),
            (Some(f), None) => vec![f],
            (None, Some(fs)) => fs,
            (None, None) if matches!(raw.kind, RawKind::Geo) => vec!["lat".into(), "lon".into()],
            (None, None) => Vec::new(),
        };
        let kind = match (raw.kind, raw.descending) {
            (RawKind::Range, descending) => IndexKind::Range { descending },
            (_, true) => return Err(IndexDefError::DescendingNotRange { name: raw.name }),
            (RawKind::Exact, false) => IndexKind::Exact,
            (RawKind::Multi, false) => IndexKind::Multi,
            (RawKind::Geo, false) => IndexKind::Geo,
        };
        let def = IndexDef {
            name: raw.name,
            prefix: raw.prefix,
            fields,
            kind,
        };
        def.validate()?;
        Ok(def)
    }
}

impl From<IndexDef> for RawIndexDef {
    fn from(def: IndexDef) -> Self {
        let (field, fields) = match <[String; 1]>::try_from(def.fields) {
            Ok([one]) => (Some(one), None),
            Err(many) => (None, Some(many)),
        };
        let (kind, descending) = match def.kind {
            IndexKind::Exact => (RawKind::Exact, false),
            IndexKind::Range { descending } => (RawKind::Range, descending),
            IndexKind::Multi => (RawKind::Multi, false),
            IndexKind::Geo => (RawKind::Geo, false),
        };
        RawIndexDef {
            name: def.name,
            prefix: def.prefix,
            field,
            fields,
            kind,
            descending,
        }
    }
}

/// Why a version of a document has no postings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    NotDocument,
    MissingField,
    WrongType,
    TooManyPostings,
}

/// The view of one [`IndexDef`], named `idx.NAME`, with tables `idx.NAME.postings`,
/// `idx.NAME.by_key` and `idx.NAME.stats` (layouts in [`crate::tables`]).
#[derive(Clone)]
pub struct SecondaryIndexView {
    def: IndexDef,
    paths: Vec<Vec<String>>,
    version: u64,
    view: String,
    postings: String,
    by_key: String,
    stats: String,
}

impl fmt::Debug for SecondaryIndexView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecondaryIndexView")
            .field("def", &self.def)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Counters of a secondary index as of a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Keys with at least one posting.
    pub documents: u64,
    /// Postings (value, key).
    pub postings: u64,
    /// Keys with a current value that was skipped: not a document, field missing, of a type
    /// the index does not take, or too many postings.
    pub skipped: u64,
}

const STAT_DOCUMENTS: &str = "documents";
const STAT_POSTINGS: &str = "postings";
const STAT_SKIPPED: &str = "skipped";

const FLAG_SKIPPED: u8 = 1;

impl SecondaryIndexView {
    /// The view of `def`, once it is checked.
    pub fn new(def: IndexDef) -> Result<Self, IndexDefError> {
        def.validate()?;
        let view = secondary_view_name(&def.name);
        Ok(Self {
            paths: def
                .fields
                .iter()
                .map(|f| f.split('.').map(str::to_owned).collect())
                .collect(),
            version: def.version(),
            postings: format!("{view}.postings"),
            by_key: format!("{view}.by_key"),
            stats: format!("{view}.stats"),
            view,
            def,
        })
    }

    /// The definition.
    pub fn def(&self) -> &IndexDef {
        &self.def
    }

    /// The encoded postings of one stored value, or why it has none.
    fn extract(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, Skip> {
        let doc = decode_document(bytes).ok_or(Skip::NotDocument)?;
        if self.def.kind == IndexKind::Geo {
            return match geo::point_of(&doc, &self.paths) {
                Ok(point) => Ok(vec![geo::encode(point).to_vec()]),
                Err(geo::NoPoint::Missing) => Err(Skip::MissingField),
                Err(geo::NoPoint::Invalid) => Err(Skip::WrongType),
            };
        }
        let mut tuples: Vec<Vec<u8>> = vec![Vec::new()];
        for path in &self.paths {
            let field = lookup(&doc, path).ok_or(Skip::MissingField)?;
            let parts = self.field_values(field)?;
            if parts.is_empty() {
                return Ok(Vec::new());
            }
            if tuples.len() * parts.len() > MAX_POSTINGS_PER_VERSION {
                return Err(Skip::TooManyPostings);
            }
            tuples = tuples
                .iter()
                .flat_map(|t| {
                    parts.iter().map(move |p| {
                        let mut t = t.clone();
                        t.extend_from_slice(p);
                        t
                    })
                })
                .collect();
        }
        Ok(tuples)
    }

    /// The encoded values one field contributes, ascending and distinct.
    fn field_values(&self, field: &Value) -> Result<Vec<Vec<u8>>, Skip> {
        let one = |v: IndexValue| {
            let mut out = Vec::new();
            encode_value(&v, &mut out);
            out
        };
        match self.def.kind {
            IndexKind::Exact => Ok(vec![one(scalar(field).ok_or(Skip::WrongType)?)]),
            IndexKind::Range { .. } => match scalar(field) {
                Some(v @ (IndexValue::Number(_) | IndexValue::String(_))) => Ok(vec![one(v)]),
                _ => Err(Skip::WrongType),
            },
            // Points are read whole by `extract`.
            IndexKind::Geo => Err(Skip::WrongType),
            IndexKind::Multi => {
                let items = field.as_array().ok_or(Skip::WrongType)?;
                let set = items
                    .iter()
                    .map(|item| scalar(item).map(one).ok_or(Skip::WrongType))
                    .collect::<Result<BTreeSet<_>, _>>()?;
                Ok(set.into_iter().collect())
            }
        }
    }

    /// The postings of a key with these current versions, and whether a value was skipped.
    fn postings_of(&self, current: &[CurrentVersion<'_>]) -> (BTreeSet<Vec<u8>>, bool) {
        let mut postings = BTreeSet::new();
        let mut skipped = false;
        for value in current.iter().filter_map(|v| v.value) {
            match self.extract(value) {
                Ok(tuples) => postings.extend(tuples),
                Err(_) => skipped = true,
            }
        }
        (postings, skipped)
    }

    fn corrupt(reason: &'static str) -> CorruptRecord {
        CorruptRecord {
            // Table names of declared indexes are not static; the view prefix says which kind.
            table: "idx.*.by_key",
            reason,
        }
    }

    fn encode_by_key(postings: &BTreeSet<Vec<u8>>, skipped: bool, out: &mut Vec<u8>) {
        out.clear();
        out.push(if skipped { FLAG_SKIPPED } else { 0 });
        for p in postings {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
    }

    fn decode_by_key(mut bytes: &[u8]) -> Result<(BTreeSet<Vec<u8>>, bool), CorruptRecord> {
        let (&flags, rest) = bytes
            .split_first()
            .ok_or_else(|| Self::corrupt("an empty row"))?;
        bytes = rest;
        let mut postings = BTreeSet::new();
        while !bytes.is_empty() {
            let (len, rest) = bytes
                .split_first_chunk::<4>()
                .ok_or_else(|| Self::corrupt("a truncated length"))?;
            let len = u32::from_le_bytes(*len) as usize;
            if rest.len() < len {
                return Err(Self::corrupt("a value longer than the row"));
            }
            let (value, rest) = rest.split_at(len);
            postings.insert(value.to_vec());
            bytes = rest;
        }
        Ok((postings, flags & FLAG_SKIPPED != 0))
    }
}

impl View for SecondaryIndexView {
    fn name(&self) -> &str {
        &self.view
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn tables(&self) -> Vec<&str> {
        vec![&self.postings, &self.by_key, &self.stats]
    }

    fn apply(&self, txn: &WriteTransaction, batch: &Batch<'_>) -> Result<(), ApplyError> {
        let prefix = self.def.prefix.as_bytes();
        let keys: BTreeSet<&[u8]> = batch
            .iter()
            .flat_map(|(_, se)| se.entry.ops.iter().map(kappakv_protocol::Op::key))
            .filter(|k| k.starts_with(prefix))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        // Read, not written: the key/value view has applied this batch (or more) already.
        let current = txn.open_table(KV_CURRENT)?;
        let mut postings = txn.open_table(secondary_postings(&self.postings))?;
        let mut by_key = txn.open_table(secondary_by_key(&self.by_key))?;
        // (added, removed) per counter.
        let mut counts = [(0u64, 0u64); 3];
        let mut buf = Vec::new();
        // (encoded value, key) of the postings that go and come.
        let mut removed: Vec<(Vec<u8>, &[u8])> = Vec::new();
        let mut added: Vec<(Vec<u8>, &[u8])> = Vec::new();
        for key in keys {
            let mut set = Vec::new();
            let row = current.get(key)?;
            if let Some(row) = &row {
                decode_current(row.value(), &mut set)?;
            }
            let (new, new_skipped) = self.postings_of(&set);
            let (old, old_skipped) = match by_key.get(key)? {
                Some(old) => Self::decode_by_key(old.value())?,
                None => (BTreeSet::new(), false),
            };
            if new == old && new_skipped == old_skipped {
                continue;
            }
            removed.extend(old.difference(&new).map(|p| (p.clone(), key)));
            added.extend(new.difference(&old).map(|p| (p.clone(), key)));
            for (count, (new, old)) in counts.iter_mut().zip([
                (u64::from(!new.is_empty()), u64::from(!old.is_empty())),
                (new.len() as u64, old.len() as u64),
                (u64::from(new_skipped), u64::from(old_skipped)),
            ]) {
                count.0 += new;
                count.1 += old;
            }
            if new.is_empty() && !new_skipped {
                by_key.remove(key)?;
            } else {
                Self::encode_by_key(&new, new_skipped, &mut buf);
                by_key.insert(key, buf.as_slice())?;
            }
        }
        // In index order, so that consecutive changes share their path down the tree: the
        // postings of a geo index, for one, fall anywhere in it.
        removed.sort_unstable();
        added.sort_unstable();
        for (value, key) in &removed {
            postings.remove((value.as_slice(), *key))?;
        }
        for (value, key) in &added {
            postings.insert((value.as_slice(), *key), ())?;
        }
        let mut stats = txn.open_table(secondary_stats(&self.stats))?;
        for (name, (added, removed)) in [STAT_DOCUMENTS, STAT_POSTINGS, STAT_SKIPPED]
            .into_iter()
            .zip(counts)
        {
            if added == removed {
                continue;
            }
            let before = stats.get(name)?.map_or(0, |g| g.value());
            stats.insert(name, (before + added).saturating_sub(removed))?;
        }
        Ok(())
    }
}

/// The current versions of a key's kv row, unless it has none or only tombstones.
fn live_versions<'a>(
    row: Option<&'a redb::AccessGuard<'_, &'static [u8]>>,
) -> Result<Option<Vec<CurrentVersion<'a>>>, CorruptRecord> {
    let Some(row) = row else {
        return Ok(None);
    };
    let mut set = Vec::new();
    decode_current(row.value(), &mut set)?;
    Ok((live_values(&set) > 0).then_some(set))
}

/// How many of `set` are values, not tombstones.
fn live_values(set: &[CurrentVersion<'_>]) -> usize {
    set.iter().filter(|v| v.value.is_some()).count()
}

/// One page of a query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryPage {
    /// The matching keys with their current versions, in index order (a key of a multi-valued
    /// index appears once per matching element).
    pub items: Vec<KeyVersions>,
    /// Where the next page starts, when the limit cut this one short.
    pub resume_after: Option<Vec<u8>>,
    /// Of a `Near` query: each item's distance from the query's point, in millimetres (the
    /// distance of the key's nearest point). Empty for other queries.
    pub distances_mm: Vec<u64>,
}

/// A position in an index: the posting `(encoded value, key)` last returned. Encoded as
/// `value length u32 BE | value | key`.
fn encode_cursor(value: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + value.len() + key.len());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(key);
    out
}

fn decode_cursor(cursor: &[u8]) -> Result<(&[u8], &[u8]), QueryError> {
    let bad = || QueryError::Invalid {
        reason: "the resume cursor is not one this node returned".into(),
    };
    let (len, rest) = cursor.split_first_chunk::<4>().ok_or_else(bad)?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(bad());
    }
    Ok(rest.split_at(len))
}

impl SecondaryIndexView {
    /// The encoded bounds of `query`: `[low, high)`, `high` `None` when open.
    fn bounds(&self, query: &IndexQuery) -> Result<(Vec<u8>, Option<Vec<u8>>), QueryError> {
        let fields = self.def.fields.len();
        let check = |what: &str, values: &[IndexValue]| {
            if values.is_empty() || values.len() > fields {
                return Err(QueryError::Invalid {
                    reason: format!(
                        "index {} has {fields} field(s); the {what} has {} value(s)",
                        self.def.name,
                        values.len()
                    ),
                });
            }
            Ok(encode_tuple(values))
        };
        match query {
            IndexQuery::Exact(values) => {
                let low = check("value", values)?;
                let high = prefix_successor(&low);
                Ok((low, high))
            }
            IndexQuery::Range {
                start,
                end,
                end_inclusive,
            } => {
                let low = start
                    .as_deref()
                    .map(|s| check("range start", s))
                    .transpose()?
                    .unwrap_or_default();
                let high = match end.as_deref() {
                    None => None,
                    Some(e) => {
                        let e = check("range end", e)?;
                        if *end_inclusive {
                            prefix_successor(&e)
                        } else {
                            Some(e)
                        }
                    }
                };
                Ok((low, high))
            }
            IndexQuery::BBox { .. } | IndexQuery::Near(_) => Err(QueryError::Invalid {
                reason: format!(
                    "index {} is a {} index; a box or a point queries a geo index",
                    self.def.name,
                    self.def.kind.label()
                ),
            }),
        }
    }
}

impl Snapshot {
    /// Up to `limit` entries of `index` that `query` selects, in the index's order, each with
    /// the key's current versions, resuming after `start_after` (the `resume_after` of an
    /// earlier page). Postings and values come from this one snapshot, so a page is consistent
    /// whatever is written meanwhile, and pages resume at a position in the index, so a key
    /// is never returned twice for the same value.
    ///
    /// The caller checks that the index has applied what the read must see
    /// ([`Snapshot::applied_lsn`] of [`View::name`]).
    pub fn query(
        &self,
        index: &SecondaryIndexView,
        query: &IndexQuery,
        limit: usize,
        start_after: Option<&[u8]>,
    ) -> Result<QueryPage, QueryError> {
        if index.def.kind == IndexKind::Geo {
            return self.query_geo(index, query, limit, start_after);
        }
        let (low, high) = index.bounds(query)?;
        let cursor = start_after.map(decode_cursor).transpose()?;
        let mut page = QueryPage::default();
        if limit == 0 {
            return Ok(page);
        }
        let (Some(postings), Some(current)) = (
            self.table(secondary_postings(&index.postings))?,
            self.table(KV_CURRENT)?,
        ) else {
            return Ok(page);
        };
        let descending = index.def.kind.descending();
        let mut lower: Bound<(&[u8], &[u8])> = Bound::Included((low.as_slice(), &[][..]));
        let mut upper: Bound<(&[u8], &[u8])> = high
            .as_deref()
            .map_or(Bound::Unbounded, |h| Bound::Excluded((h, &[][..])));
        if let Some(at) = cursor {
            if descending {
                if high.as_deref().is_none_or(|h| at.0 < h) {
                    upper = Bound::Excluded(at);
                }
            } else if at >= (low.as_slice(), &[][..]) {
                lower = Bound::Excluded(at);
            }
        }
        // redb, like a BTreeMap, does not take an inverted range.
        let lower_key = match lower {
            Bound::Included(k) | Bound::Excluded(k) => k,
            Bound::Unbounded => (&[][..], &[][..]),
        };
        if let Bound::Included(u) | Bound::Excluded(u) = upper
            && u <= lower_key
        {
            return Ok(page);
        }
        let range = postings.range::<(&[u8], &[u8])>((lower, upper))?;
        let rows: Box<dyn Iterator<Item = _>> = if descending {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
        for row in rows {
            let (posting, _) = row?;
            let (value, key) = posting.value();
            // Postings follow the key/value view; a missing key means the index is not exact
            // at this snapshot (it is still being built).
            let row = current.get(key)?;
            let Some(set) = live_versions(row.as_ref())? else {
                continue;
            };
            if page.items.len() == limit {
                page.resume_after = last.map(|(v, k)| encode_cursor(&v, &k));
                return Ok(page);
            }
            page.items.push(key_versions(key, &set));
            last = Some((value.to_vec(), key.to_vec()));
        }
        Ok(page)
    }

    /// The counters of `index`; zeros while it has applied nothing.
    pub fn index_stats(&self, index: &SecondaryIndexView) -> Result<IndexStats, ReadError> {
        let Some(stats) = self.table(secondary_stats(&index.stats))? else {
            return Ok(IndexStats::default());
        };
        let get =
            |name| -> Result<u64, ReadError> { Ok(stats.get(name)?.map_or(0, |g| g.value())) };
        Ok(IndexStats {
            documents: get(STAT_DOCUMENTS)?,
            postings: get(STAT_POSTINGS)?,
            skipped: get(STAT_SKIPPED)?,
        })
    }
}

/// The key ranges of the postings table that hold the cells `low..=high`.
type PostingBounds<'a> = (Bound<(&'a [u8], &'a [u8])>, Bound<(&'a [u8], &'a [u8])>);

/// A `Near` query's position: the distance (mm, BE) and key of the last item returned.
fn encode_near_cursor(distance_mm: u64, key: &[u8]) -> Vec<u8> {
    let mut out = distance_mm.to_be_bytes().to_vec();
    out.extend_from_slice(key);
    out
}

fn decode_near_cursor(cursor: &[u8]) -> Result<(u64, &[u8]), QueryError> {
    let (d, key) = cursor
        .split_first_chunk::<8>()
        .ok_or_else(|| QueryError::Invalid {
            reason: "the resume cursor is not one this node returned".into(),
        })?;
    Ok((u64::from_be_bytes(*d), key))
}

fn check_point(p: &GeoPoint, what: &str) -> Result<(), QueryError> {
    if p.is_valid() {
        return Ok(());
    }
    Err(QueryError::Invalid {
        reason: format!(
            "{what} ({}, {}) is not a point: latitude is in -90..=90, longitude in -180..=180",
            p.lat, p.lon
        ),
    })
}

/// Where a `Near` query starts looking: a circle this wide, growing fourfold until it holds
/// enough keys.
const NEAR_FIRST_RADIUS_M: f64 = 1_000.0;

impl Snapshot {
    /// A query of a `geo` index.
    fn query_geo(
        &self,
        index: &SecondaryIndexView,
        query: &IndexQuery,
        limit: usize,
        start_after: Option<&[u8]>,
    ) -> Result<QueryPage, QueryError> {
        match query {
            IndexQuery::BBox { min, max } => {
                check_point(min, "the box's minimum")?;
                check_point(max, "the box's maximum")?;
                if min.lat > max.lat {
                    return Err(QueryError::Invalid {
                        reason: format!(
                            "the box's minimum latitude {} is above its maximum {}",
                            min.lat, max.lat
                        ),
                    });
                }
                let cursor = start_after.map(decode_cursor).transpose()?;
                self.query_box(
                    index,
                    &GeoBox {
                        min: *min,
                        max: *max,
                    },
                    limit,
                    cursor,
                )
            }
            IndexQuery::Near(center) => {
                check_point(center, "the point")?;
                let cursor = start_after.map(decode_near_cursor).transpose()?;
                self.query_near(index, *center, limit, cursor)
            }
            IndexQuery::Exact(_) | IndexQuery::Range { .. } => Err(QueryError::Invalid {
                reason: format!(
                    "index {} is a geo index: query it with a box (--bbox) or a point (--near)",
                    index.def.name
                ),
            }),
        }
    }

    /// Calls `each(posting value, key, current versions)` for every posting of `index` in the
    /// cells that cover `b` whose point is inside `b`, past `after`, in index order, until it
    /// returns false. Keys with no current value are left out.
    fn scan_box(
        &self,
        index: &SecondaryIndexView,
        b: &GeoBox,
        after: Option<(&[u8], &[u8])>,
        mut each: impl FnMut(&[u8], &[u8], &[CurrentVersion<'_>]) -> Result<bool, QueryError>,
    ) -> Result<(), QueryError> {
        let (Some(postings), Some(current)) = (
            self.table(secondary_postings(&index.postings))?,
            self.table(KV_CURRENT)?,
        ) else {
            return Ok(());
        };
        for (low, high) in geo::cover(b) {
            let (low, next) = (low.to_be_bytes(), high.checked_add(1).map(u64::to_be_bytes));
            let mut bounds: PostingBounds<'_> = (
                Bound::Included((&low[..], &[][..])),
                next.as_ref()
                    .map_or(Bound::Unbounded, |n| Bound::Excluded((&n[..], &[][..]))),
            );
            if let Some(at) = after {
                if let Bound::Excluded(end) = bounds.1
                    && at >= end
                {
                    continue;
                }
                if at >= (&low[..], &[][..]) {
                    bounds.0 = Bound::Excluded(at);
                }
            }
            for row in postings.range::<(&[u8], &[u8])>(bounds)? {
                let (posting, _) = row?;
                let (value, key) = posting.value();
                let point = geo::decode(value).ok_or_else(|| {
                    QueryError::from(SecondaryIndexView::corrupt("a geo posting of a bad size"))
                })?;
                if !b.contains(point) {
                    continue;
                }
                let row = current.get(key)?;
                let Some(set) = live_versions(row.as_ref())? else {
                    continue;
                };
                if !each(value, key, &set)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The keys with a point inside `b`, each once: at its first posting inside `b`.
    fn query_box(
        &self,
        index: &SecondaryIndexView,
        b: &GeoBox,
        limit: usize,
        after: Option<(&[u8], &[u8])>,
    ) -> Result<QueryPage, QueryError> {
        let mut page = QueryPage::default();
        if limit == 0 {
            return Ok(page);
        }
        let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
        self.scan_box(index, b, after, |value, key, set| {
            // Siblings may have another point in the box: the key goes at the first. A key of
            // one value has one posting, this one, and its document need not be read.
            if live_values(set) > 1 {
                let (points, _) = index.postings_of(set);
                let earlier_inside = points
                    .iter()
                    .take_while(|p| p.as_slice() < value)
                    .any(|p| geo::decode(p).is_some_and(|p| b.contains(p)));
                if earlier_inside {
                    return Ok(true);
                }
            }
            if page.items.len() == limit {
                page.resume_after = last.take().map(|(v, k)| encode_cursor(&v, &k));
                return Ok(false);
            }
            page.items.push(key_versions(key, set));
            last = Some((value.to_vec(), key.to_vec()));
            Ok(true)
        })?;
        Ok(page)
    }

    /// The `limit` keys nearest to `center` past `after` (distance, key), nearest first, a
    /// key's distance being that of its nearest point. Looks in a growing circle: once the
    /// circle of radius r holds more than `limit` keys nearer than r, no key outside it can
    /// be among them.
    fn query_near(
        &self,
        index: &SecondaryIndexView,
        center: GeoPoint,
        limit: usize,
        after: Option<(u64, &[u8])>,
    ) -> Result<QueryPage, QueryError> {
        let mut page = QueryPage::default();
        if limit == 0 {
            return Ok(page);
        }
        let after_m = after.map_or(0.0, |(d, _)| d as f64 / 1000.0);
        let mut radius = NEAR_FIRST_RADIUS_M.max(2.0 * after_m);
        let world = std::f64::consts::PI * geo::EARTH_RADIUS_M;
        loop {
            let whole = radius >= world;
            let within_mm = if whole {
                u64::MAX
            } else {
                (radius * 1000.0).floor() as u64
            };
            let mut seen = BTreeSet::new();
            // The `limit + 1` nearest found (a max-heap), and how many are nearer than the
            // radius: memory stays within the page whatever the circle holds.
            let mut nearest: BinaryHeap<(u64, Vec<u8>)> = BinaryHeap::new();
            let mut within = 0usize;
            let b = if whole {
                GeoBox::WORLD
            } else {
                GeoBox::around(center, radius)
            };
            self.scan_box(index, &b, None, |value, key, set| {
                let distance =
                    |p: &[u8]| geo::decode(p).map(|p| geo::to_mm(geo::distance_m(center, p)));
                let d = if live_values(set) > 1 {
                    // The nearest point of its siblings', once per key.
                    if !seen.insert(key.to_vec()) {
                        return Ok(true);
                    }
                    index
                        .postings_of(set)
                        .0
                        .iter()
                        .filter_map(|p| distance(p))
                        .min()
                } else {
                    distance(value)
                };
                let Some(d) = d else {
                    return Ok(true);
                };
                if d < within_mm && after.is_none_or(|(ad, ak)| (d, key) > (ad, ak)) {
                    within += 1;
                    if nearest.len() <= limit {
                        nearest.push((d, key.to_vec()));
                    } else if nearest
                        .peek()
                        .is_some_and(|top| (d, key) < (top.0, &top.1[..]))
                    {
                        nearest.pop();
                        nearest.push((d, key.to_vec()));
                    }
                }
                Ok(true)
            })?;
            if within > limit || whole {
                let mut found = nearest.into_sorted_vec();
                if found.len() > limit {
                    found.truncate(limit);
                    page.resume_after = found.last().map(|(d, k)| encode_near_cursor(*d, k));
                }
                for (d, key) in found {
                    page.distances_mm.push(d);
                    page.items.push(self.get(&key)?);
                }
                return Ok(page);
            }
            radius *= 4.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use kappakv_protocol::{Entry, EntryId, Lsn, NodeId, Op, SignedEntry, Timestamp};
    use serde_json::json;

    use super::*;
    use crate::runner::{Indexes, ResetReason};
    use crate::views::configured_views;

    fn def(name: &str, prefix: &str, fields: &[&str], kind: IndexKind) -> IndexDef {
        IndexDef {
            name: name.into(),
            prefix: prefix.into(),
            fields: fields.iter().map(|f| (*f).to_string()).collect(),
            kind,
        }
    }

    /// A log of one author; plain writes supersede every current version of their key.
    #[derive(Default)]
    struct Log {
        entries: Vec<SignedEntry>,
        current: HashMap<Vec<u8>, Vec<EntryId>>,
        applied: usize,
    }

    impl Log {
        fn push(&mut self, op: Op) -> EntryId {
            let seq = self.entries.len() as u64 + 1;
            let entry = Entry {
                author: NodeId([1; 32]),
                seq,
                prev: None,
                timestamp: Timestamp(seq),
                ops: vec![op],
            };
            let id = entry.id();
            self.entries.push(SignedEntry {
                entry,
                id,
                signature: None,
            });
            id
        }

        fn put(&mut self, key: &str, value: &serde_json::Value) -> EntryId {
            self.put_bytes(key, serde_json::to_vec(value).unwrap())
        }

        fn put_bytes(&mut self, key: &str, value: Vec<u8>) -> EntryId {
            let supersedes = self.current.remove(key.as_bytes()).unwrap_or_default();
            let id = self.push(Op::Put {
                key: key.into(),
                value,
                supersedes,
            });
            self.current.insert(key.into(), vec![id]);
            id
        }

        /// A put concurrent with the key's current versions: a sibling.
        fn sibling(&mut self, key: &str, value: &serde_json::Value) {
            let id = self.push(Op::Put {
                key: key.into(),
                value: serde_json::to_vec(value).unwrap(),
                supersedes: vec![],
            });
            self.current.entry(key.into()).or_default().push(id);
        }

        fn delete(&mut self, key: &str) {
            let supersedes = self.current.remove(key.as_bytes()).unwrap_or_default();
            self.push(Op::Delete {
                key: key.into(),
                supersedes,
            });
        }

        fn batch(&self, from: usize, to: usize) -> Vec<(Lsn, &SignedEntry)> {
            (from..to)
                .map(|i| (i as Lsn + 1, &self.entries[i]))
                .collect()
        }

        /// Applies what is new to every view.
        fn sync(&mut self, indexes: &Indexes) {
            let batch = self.batch(self.applied, self.entries.len());
            if !batch.is_empty() {
                indexes.apply(&batch, false).unwrap();
            }
            self.applied = self.entries.len();
        }
    }

    fn open(defs: &[IndexDef]) -> (Indexes, Vec<SecondaryIndexView>) {
        let (indexes, _) = Indexes::open_in_memory(configured_views(defs).unwrap()).unwrap();
        let views = defs
            .iter()
            .map(|d| SecondaryIndexView::new(d.clone()).unwrap())
            .collect();
        (indexes, views)
    }

    fn keys(page: &QueryPage) -> Vec<String> {
        page.items
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    }

    fn query(indexes: &Indexes, view: &SecondaryIndexView, q: &IndexQuery) -> Vec<String> {
        keys(
            &indexes
                .snapshot()
                .unwrap()
                .query(view, q, 1000, None)
                .unwrap(),
        )
    }

    fn exact(v: impl Into<IndexValue>) -> IndexQuery {
        IndexQuery::exact(v)
    }

    fn stats(indexes: &Indexes, view: &SecondaryIndexView) -> IndexStats {
        indexes.snapshot().unwrap().index_stats(view).unwrap()
    }

    #[test]
    fn exact_on_a_nested_field_follows_updates_and_deletes() {
        let (indexes, views) = open(&[def(
            "by_author",
            "posts/",
            &["author.name"],
            IndexKind::Exact,
        )]);
        let by_author = &views[0];
        let mut log = Log::default();
        log.put("posts/1", &json!({"author": {"name": "ada"}}));
        log.put("posts/2", &json!({"author": {"name": "bob"}}));
        log.put("posts/3", &json!({"author": {"name": "ada"}}));
        log.put("other/1", &json!({"author": {"name": "ada"}}));
        log.sync(&indexes);
        assert_eq!(
            query(&indexes, by_author, &exact("ada")),
            ["posts/1", "posts/3"]
        );

        // An update leaves the old value's postings; a delete leaves every posting.
        log.put("posts/1", &json!({"author": {"name": "bob"}}));
        log.delete("posts/3");
        log.sync(&indexes);
        assert!(query(&indexes, by_author, &exact("ada")).is_empty());
        assert_eq!(
            query(&indexes, by_author, &exact("bob")),
            ["posts/1", "posts/2"]
        );
        let page = indexes
            .snapshot()
            .unwrap()
            .query(by_author, &exact("bob"), 10, None)
            .unwrap();
        assert_eq!(
            page.items[0].values.len(),
            1,
            "with the key's current versions"
        );
        assert_eq!(
            stats(&indexes, by_author),
            IndexStats {
                documents: 2,
                postings: 2,
                skipped: 0
            }
        );
        // Re-created after the delete.
        log.put("posts/3", &json!({"author": {"name": "ada"}}));
        log.sync(&indexes);
        assert_eq!(query(&indexes, by_author, &exact("ada")), ["posts/3"]);
    }

    #[test]
    fn range_ascending_descending_and_paginated() {
        let defs = [
            def(
                "by_score",
                "s/",
                &["score"],
                IndexKind::Range { descending: false },
            ),
            def(
                "by_score_desc",
                "s/",
                &["score"],
                IndexKind::Range { descending: true },
            ),
        ];
        let (indexes, views) = open(&defs);
        let mut log = Log::default();
        for (i, score) in [5.0, -2.5, 10.0, 20.0, 15.0, 10.0, 19.99, 1e9]
            .iter()
            .enumerate()
        {
            log.put(&format!("s/{i}"), &json!({ "score": score }));
        }
        log.put("s/str", &json!({"score": "high"}));
        log.sync(&indexes);
        let range = |a: Option<f64>, b: Option<f64>, inclusive| IndexQuery::Range {
            start: a.map(|a| vec![IndexValue::from(a)]),
            end: b.map(|b| vec![IndexValue::from(b)]),
            end_inclusive: inclusive,
        };
        let asc = &views[0];
        let desc = &views[1];
        assert_eq!(
            query(&indexes, asc, &range(Some(10.0), Some(20.0), false)),
            ["s/2", "s/5", "s/4", "s/6"]
        );
        assert_eq!(
            query(&indexes, asc, &range(Some(10.0), Some(20.0), true)),
            ["s/2", "s/5", "s/4", "s/6", "s/3"]
        );
        assert_eq!(
            query(&indexes, asc, &range(None, Some(5.0), true)),
            ["s/1", "s/0"]
        );
        // Numbers sort before strings: an open end reaches the string.
        assert_eq!(
            query(&indexes, asc, &range(Some(1e6), None, false)),
            ["s/7", "s/str"]
        );
        assert_eq!(
            query(&indexes, desc, &range(Some(10.0), Some(20.0), true)),
            ["s/3", "s/6", "s/4", "s/5", "s/2"]
        );

        // Pages of 2 in either direction give the whole answer, each entry once.
        for view in [asc, desc] {
            let all = query(&indexes, view, &range(None, None, false));
            assert_eq!(all.len(), 9);
            let mut paged = Vec::new();
            let mut cursor: Option<Vec<u8>> = None;
            loop {
                let page = indexes
                    .snapshot()
                    .unwrap()
                    .query(view, &range(None, None, false), 2, cursor.as_deref())
                    .unwrap();
                paged.extend(keys(&page));
                match page.resume_after {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(paged, all);
        }
        // Strings are a wrong type for no index here: range takes numbers and strings.
        assert_eq!(stats(&indexes, asc).skipped, 0);
    }

    #[test]
    fn multi_posts_each_distinct_element_and_follows_siblings() {
        let (indexes, views) = open(&[def("by_tag", "posts/", &["tags"], IndexKind::Multi)]);
        let tags = &views[0];
        let mut log = Log::default();
        log.put("posts/1", &json!({"tags": ["cats", "dogs", "cats"]}));
        log.put("posts/2", &json!({"tags": ["dogs"]}));
        log.put("posts/3", &json!({"tags": []}));
        log.sync(&indexes);
        assert_eq!(query(&indexes, tags, &exact("cats")), ["posts/1"]);
        assert_eq!(
            query(&indexes, tags, &exact("dogs")),
            ["posts/1", "posts/2"]
        );
        assert_eq!(stats(&indexes, tags).postings, 3);

        // Siblings: the key appears under the values of each current version.
        log.sibling("posts/2", &json!({"tags": ["birds"]}));
        log.sync(&indexes);
        assert_eq!(
            query(&indexes, tags, &exact("dogs")),
            ["posts/1", "posts/2"]
        );
        assert_eq!(query(&indexes, tags, &exact("birds")), ["posts/2"]);
        let page = indexes
            .snapshot()
            .unwrap()
            .query(tags, &exact("birds"), 10, None)
            .unwrap();
        assert_eq!(page.items[0].values.len(), 2);
        // Merging the siblings leaves the postings of the value merged away.
        log.put("posts/2", &json!({"tags": ["birds"]}));
        log.sync(&indexes);
        assert_eq!(query(&indexes, tags, &exact("dogs")), ["posts/1"]);
        assert_eq!(query(&indexes, tags, &exact("birds")), ["posts/2"]);
        // A range over a multi-valued index returns a key once per matching element.
        let all = IndexQuery::Range {
            start: None,
            end: None,
            end_inclusive: false,
        };
        assert_eq!(
            query(&indexes, tags, &all),
            ["posts/2", "posts/1", "posts/1"]
        );
    }

    #[test]
    fn wrong_types_and_missing_fields_are_skipped_and_counted() {
        let defs = [
            def("tags", "d/", &["tags"], IndexKind::Multi),
            def(
                "score",
                "d/",
                &["score"],
                IndexKind::Range { descending: false },
            ),
            def("kind", "d/", &["kind"], IndexKind::Exact),
        ];
        let (indexes, views) = open(&defs);
        let mut log = Log::default();
        log.put("d/ok", &json!({"tags": ["a"], "score": 1, "kind": null}));
        log.put(
            "d/string-tags",
            &json!({"tags": "a", "score": true, "kind": [1]}),
        );
        log.put("d/nested", &json!({"tags": [["a"]], "kind": {"x": 1}}));
        log.put_bytes("d/plain", b"not a document".to_vec());
        log.put_bytes("d/array", b"[1, 2]".to_vec());
        log.sync(&indexes);
        let skipped: Vec<u64> = views.iter().map(|v| stats(&indexes, v).skipped).collect();
        assert_eq!(skipped, [4, 4, 4]);
        assert_eq!(
            query(&indexes, &views[2], &exact(IndexValue::Null)),
            ["d/ok"]
        );

        // Fixing a document, or deleting it, takes it off the count.
        log.put("d/string-tags", &json!({"tags": ["a"]}));
        log.delete("d/plain");
        log.sync(&indexes);
        let skipped: Vec<u64> = views.iter().map(|v| stats(&indexes, v).skipped).collect();
        assert_eq!(skipped, [2, 3, 3]);
        assert_eq!(
            query(&indexes, &views[0], &exact("a")),
            ["d/ok", "d/string-tags"]
        );
    }

    #[test]
    fn compound_fields_query_by_a_prefix_of_them() {
        let (indexes, views) = open(&[def(
            "by_author_year",
            "",
            &["author", "year"],
            IndexKind::Range { descending: false },
        )]);
        let v = &views[0];
        let mut log = Log::default();
        log.put("a", &json!({"author": "ada", "year": 2021}));
        log.put("b", &json!({"author": "ada", "year": 2019}));
        log.put("c", &json!({"author": "bob", "year": 2020}));
        // MessagePack documents are read like JSON ones.
        log.put_bytes(
            "d",
            rmp_serde::to_vec_named(&json!({"author": "ada", "year": 2020})).unwrap(),
        );
        log.sync(&indexes);
        assert_eq!(query(&indexes, v, &exact("ada")), ["b", "d", "a"]);
        assert_eq!(
            query(
                &indexes,
                v,
                &IndexQuery::Exact(vec!["ada".into(), IndexValue::from(2020i64)])
            ),
            ["d"]
        );
        let err = indexes
            .snapshot()
            .unwrap()
            .query(v, &IndexQuery::Exact(vec![1i64.into(); 3]), 10, None)
            .unwrap_err();
        assert!(matches!(err, QueryError::Invalid { .. }), "{err}");
    }

    /// Every posting and counter, for comparing two ways of building an index.
    type Postings = Vec<(Vec<u8>, Vec<u8>)>;

    fn dump(indexes: &Indexes, view: &SecondaryIndexView) -> (Postings, IndexStats) {
        let snap = indexes.snapshot().unwrap();
        let postings = snap
            .table(secondary_postings(&view.postings))
            .unwrap()
            .map(|t| {
                t.iter()
                    .unwrap()
                    .map(|r| {
                        let (k, _) = r.unwrap();
                        let (v, key) = k.value();
                        (v.to_vec(), key.to_vec())
                    })
                    .collect()
            })
            .unwrap_or_default();
        (postings, snap.index_stats(view).unwrap())
    }

    #[test]
    fn built_in_the_background_behind_the_kv_view_ends_exact() {
        let d = def("by_tag", "p/", &["tags"], IndexKind::Multi);
        let mut log = Log::default();
        let tags = ["a", "b", "c", "d"];
        for i in 0..300u32 {
            let key = format!("p/{}", i % 37);
            match i % 7 {
                0 => log.delete(&key),
                1 => log.sibling(&key, &json!({"tags": [tags[(i % 4) as usize]]})),
                2 => {
                    log.put(&key, &json!({"tags": "wrong"}));
                }
                _ => {
                    log.put(
                        &key,
                        &json!({"tags": [tags[(i % 4) as usize], tags[(i % 3) as usize]]}),
                    );
                }
            }
        }
        // Live: every view applies every batch together.
        let (live, views) = open(std::slice::from_ref(&d));
        for chunk in (0..log.entries.len()).step_by(13) {
            let end = (chunk + 13).min(log.entries.len());
            live.apply(&log.batch(chunk, end), false).unwrap();
        }
        // Background: the kv view applies everything first, the index follows in steps.
        let (background, _) = open(std::slice::from_ref(&d));
        let kv_only = |n: &str| !n.starts_with("idx.");
        background
            .apply_to(&log.batch(0, log.entries.len()), false, &kv_only)
            .unwrap();
        let index_only = |n: &str| n.starts_with("idx.");
        for chunk in (0..log.entries.len()).step_by(29) {
            let end = (chunk + 29).min(log.entries.len());
            background
                .apply_to(&log.batch(chunk, end), false, &index_only)
                .unwrap();
        }
        let expected = dump(&live, &views[0]);
        assert!(!expected.0.is_empty());
        assert_eq!(dump(&background, &views[0]), expected);
    }

    #[test]
    fn changing_a_definition_rebuilds_and_removing_it_drops_its_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexes.redb");
        let d1 = def("by_tag", "p/", &["tags"], IndexKind::Multi);
        let mut log = Log::default();
        log.put("p/1", &json!({"tags": ["x"], "kind": "k"}));
        {
            let (indexes, _) =
                Indexes::open(&path, configured_views(std::slice::from_ref(&d1)).unwrap()).unwrap();
            log.sync(&indexes);
            indexes.persist().unwrap();
        }
        // Same definition: kept.
        let (indexes, report) =
            Indexes::open(&path, configured_views(std::slice::from_ref(&d1)).unwrap()).unwrap();
        assert_eq!(report.needs_rebuild().count(), 0);
        drop(indexes);
        // Another field: dropped and rebuilt.
        let d2 = IndexDef {
            fields: vec!["kind".into()],
            kind: IndexKind::Exact,
            ..d1.clone()
        };
        assert_ne!(d1.version(), d2.version());
        let (indexes, report) =
            Indexes::open(&path, configured_views(std::slice::from_ref(&d2)).unwrap()).unwrap();
        assert_eq!(
            report.views[3].reset,
            Some(ResetReason::VersionChanged {
                stored: d1.version()
            })
        );
        log.applied = 0;
        log.sync(&indexes);
        let v2 = SecondaryIndexView::new(d2).unwrap();
        assert_eq!(query(&indexes, &v2, &exact("k")), ["p/1"]);
        drop(indexes);
        // Removed: its tables go.
        let (_, report) = Indexes::open(&path, configured_views(&[]).unwrap()).unwrap();
        assert_eq!(report.removed_views, ["idx.by_tag"]);
        assert_eq!(
            report.dropped_tables,
            [
                "idx.by_tag.by_key",
                "idx.by_tag.postings",
                "idx.by_tag.stats"
            ]
        );
    }

    #[test]
    fn definitions_parse_validate_and_version_by_content() {
        let parsed: IndexDef = serde_json::from_value(json!({
            "name": "posts_by_tag", "prefix": "posts/", "field": "tags", "kind": "multi"
        }))
        .unwrap();
        assert_eq!(
            parsed,
            def("posts_by_tag", "posts/", &["tags"], IndexKind::Multi)
        );
        let back = serde_json::to_value(&parsed).unwrap();
        assert_eq!(
            back,
            json!({"name": "posts_by_tag", "prefix": "posts/", "field": "tags", "kind": "multi"})
        );
        let desc: IndexDef = serde_json::from_value(json!({
            "name": "n", "prefix": "", "fields": ["a.b", "c"], "kind": "range", "descending": true
        }))
        .unwrap();
        assert_eq!(desc.kind, IndexKind::Range { descending: true });
        assert_eq!(desc.version(), desc.clone().version());
        for bad in [
            json!({"name": "bad name", "prefix": "", "field": "a", "kind": "exact"}),
            json!({"name": "n", "prefix": "", "kind": "exact"}),
            json!({"name": "n", "prefix": "", "field": "a..b", "kind": "exact"}),
            json!({"name": "n", "prefix": "", "field": "a", "kind": "multi", "descending": true}),
            json!({"name": "n", "prefix": "", "field": "a", "kind": "fuzzy"}),
            json!({"name": "n", "prefix": "", "field": "a", "fields": ["b"], "kind": "exact"}),
        ] {
            assert!(
                serde_json::from_value::<IndexDef>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let a = def("n", "p/", &["a"], IndexKind::Exact);
        let versions: BTreeSet<u64> = [
            a.clone(),
            IndexDef {
                prefix: "q/".into(),
                ..a.clone()
            },
            IndexDef {
                fields: vec!["b".into()],
                ..a.clone()
            },
            IndexDef {
                kind: IndexKind::Multi,
                ..a.clone()
            },
            IndexDef {
                kind: IndexKind::Range { descending: true },
                ..a.clone()
            },
        ]
        .iter()
        .map(IndexDef::version)
        .collect();
        assert_eq!(versions.len(), 5);
    }

    /// Every page of `q`: the keys, and the distances of a near query.
    fn all_pages(
        indexes: &Indexes,
        view: &SecondaryIndexView,
        q: &IndexQuery,
        limit: usize,
    ) -> (Vec<String>, Vec<u64>) {
        let snapshot = indexes.snapshot().unwrap();
        let (mut keys_seen, mut distances, mut after) = (Vec::new(), Vec::new(), None);
        loop {
            let page = snapshot.query(view, q, limit, after.as_deref()).unwrap();
            keys_seen.extend(keys(&page));
            distances.extend(page.distances_mm);
            match page.resume_after {
                Some(next) => after = Some(next),
                None => return (keys_seen, distances),
            }
        }
    }

    #[test]
    fn the_seeds_map_demo_finds_the_points_in_its_box() {
        let geo = def("map", "", &["lat", "lon"], IndexKind::Geo);
        let (indexes, views) = open(std::slice::from_ref(&geo));
        let mut log = Log::default();
        log.put("A", &json!({"id": "A", "lat": 64.5, "lon": -147.6}));
        log.put("B", &json!({"id": "B", "lat": 63.9, "lon": -147.6}));
        log.put("C", &json!({"id": "C", "lat": 64.2, "lon": -146.5}));
        log.put("far", &json!({"lat": -33.9, "lon": 151.2}));
        log.put("nowhere", &json!({"lat": 91.0, "lon": 0.0}));
        log.put("not-a-point", &json!({"lat": "north", "lon": 0.0}));
        log.sync(&indexes);
        let in_box = IndexQuery::bbox(61.0, 65.0, -148.0, -144.0);
        let mut found = query(&indexes, &views[0], &in_box);
        found.sort();
        assert_eq!(found, ["A", "B", "C"]);
        let (near, distances) = all_pages(&indexes, &views[0], &IndexQuery::near(64.5, -147.6), 2);
        assert_eq!(near, ["A", "C", "B", "far"]);
        assert_eq!(distances[0], 0);
        assert!(distances.windows(2).all(|w| w[0] <= w[1]), "{distances:?}");
        assert_eq!(stats(&indexes, &views[0]).skipped, 2);
        // A point moved leaves its box; a deleted key leaves the index.
        log.put("A", &json!({"lat": 10.0, "lon": 10.0}));
        log.delete("B");
        log.sync(&indexes);
        assert_eq!(query(&indexes, &views[0], &in_box), ["C"]);
        // The wrong kind of query is refused.
        let err = indexes
            .snapshot()
            .unwrap()
            .query(&views[0], &exact(1i64), 10, None)
            .unwrap_err();
        assert!(err.to_string().contains("geo index"), "{err}");
        let bad = IndexQuery::bbox(65.0, 61.0, 0.0, 1.0);
        assert!(
            indexes
                .snapshot()
                .unwrap()
                .query(&views[0], &bad, 10, None)
                .is_err()
        );
    }

    #[test]
    fn geo_definitions_default_to_lat_and_lon_and_take_a_geojson_field() {
        let parsed: IndexDef = serde_json::from_value(json!({
            "name": "map", "prefix": "", "kind": "geo"
        }))
        .unwrap();
        assert_eq!(parsed.fields, ["lat", "lon"]);
        let geojson: IndexDef = serde_json::from_value(json!({
            "name": "map", "prefix": "", "field": "geometry", "kind": "geo"
        }))
        .unwrap();
        let (indexes, views) = open(std::slice::from_ref(&geojson));
        let mut log = Log::default();
        log.put(
            "p",
            &json!({"geometry": {"type": "Point", "coordinates": [-147.6, 64.5]}}),
        );
        log.sync(&indexes);
        assert_eq!(
            query(
                &indexes,
                &views[0],
                &IndexQuery::bbox(64.0, 65.0, -148.0, -147.0)
            ),
            ["p"]
        );
        assert!(
            serde_json::from_value::<IndexDef>(json!({
                "name": "map", "prefix": "", "fields": ["a", "b", "c"], "kind": "geo"
            }))
            .is_err()
        );
    }

    mod geo_against_brute_force {
        use proptest::prelude::*;

        use super::*;
        use crate::views::geo::{GeoBox, distance_m, to_mm};

        fn lat() -> impl Strategy<Value = f64> {
            prop_oneof![
                6 => -90.0..=90.0f64,
                1 => Just(90.0),
                1 => Just(-90.0),
                1 => 89.0..=90.0f64,
            ]
        }

        fn lon() -> impl Strategy<Value = f64> {
            prop_oneof![
                6 => -180.0..=180.0f64,
                1 => Just(180.0),
                1 => Just(-180.0),
                1 => 179.0..=180.0f64,
                1 => -180.0..=-179.0f64,
            ]
        }

        #[derive(Debug, Clone)]
        enum Step {
            Put(usize, f64, f64),
            Sibling(usize, f64, f64),
            Delete(usize),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => (0..24usize, lat(), lon()).prop_map(|(k, a, o)| Step::Put(k, a, o)),
                2 => (0..24usize, lat(), lon()).prop_map(|(k, a, o)| Step::Sibling(k, a, o)),
                1 => (0..24usize).prop_map(Step::Delete),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn boxes_and_nearest_equal_a_scan(
                steps in prop::collection::vec(step(), 1..60),
                boxes in prop::collection::vec((lat(), lat(), lon(), lon()), 4),
                centers in prop::collection::vec((lat(), lon(), 1..8usize), 3),
                page in 1..6usize,
            ) {
                let geo = def("map", "", &["lat", "lon"], IndexKind::Geo);
                let (indexes, views) = open(std::slice::from_ref(&geo));
                let mut log = Log::default();
                let mut model: HashMap<String, Vec<GeoPoint>> = HashMap::new();
                for s in &steps {
                    match *s {
                        Step::Put(k, lat, lon) => {
                            let key = format!("k{k}");
                            log.put(&key, &json!({"lat": lat, "lon": lon}));
                            model.insert(key, vec![GeoPoint { lat, lon }]);
                        }
                        Step::Sibling(k, lat, lon) => {
                            let key = format!("k{k}");
                            log.sibling(&key, &json!({"lat": lat, "lon": lon}));
                            model.entry(key).or_default().push(GeoPoint { lat, lon });
                        }
                        Step::Delete(k) => {
                            let key = format!("k{k}");
                            log.delete(&key);
                            model.remove(&key);
                        }
                    }
                }
                log.sync(&indexes);
                for &(a, b, min_lon, max_lon) in &boxes {
                    let (min_lat, max_lat) = (a.min(b), a.max(b));
                    let q = IndexQuery::bbox(min_lat, max_lat, min_lon, max_lon);
                    let gb = GeoBox {
                        min: GeoPoint { lat: min_lat, lon: min_lon },
                        max: GeoPoint { lat: max_lat, lon: max_lon },
                    };
                    let (mut got, _) = all_pages(&indexes, &views[0], &q, page);
                    let before = got.len();
                    got.sort();
                    got.dedup();
                    prop_assert_eq!(before, got.len(), "a key twice");
                    let mut want: Vec<String> = model
                        .iter()
                        .filter(|(_, ps)| ps.iter().any(|p| gb.contains(*p)))
                        .map(|(k, _)| k.clone())
                        .collect();
                    want.sort();
                    prop_assert_eq!(got, want, "box {:?}", gb);
                }
                for &(lat, lon, n) in &centers {
                    let center = GeoPoint { lat, lon };
                    let mut want: Vec<(u64, String)> = model
                        .iter()
                        .map(|(k, ps)| {
                            let d = ps.iter().map(|p| to_mm(distance_m(center, *p))).min().unwrap();
                            (d, k.clone())
                        })
                        .collect();
                    want.sort();
                    want.truncate(n);
                    let snapshot = indexes.snapshot().unwrap();
                    let got = snapshot.query(&views[0], &IndexQuery::Near(center), n, None).unwrap();
                    let got: Vec<(u64, String)> =
                        got.distances_mm.iter().copied().zip(keys(&got)).collect();
                    prop_assert_eq!(&got, &want, "nearest {} to {:?}", n, center);
                    // Paged, the same order.
                    let (keys_paged, d_paged) =
                        all_pages(&indexes, &views[0], &IndexQuery::Near(center), page);
                    let all: Vec<(u64, String)> = d_paged.into_iter().zip(keys_paged).collect();
                    prop_assert_eq!(&all[..want.len()], &want[..]);
                    prop_assert_eq!(all.len(), model.len());
                }
            }
        }
    }
}
