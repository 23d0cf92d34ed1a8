//! Byte layouts of the multi-field values stored in [`crate::tables`]. Fixed-offset fields, the
//! value last, so encoding is one copy and decoding borrows.

use kappakv_protocol::{EntryId, Lsn, NodeId, Timestamp};

use crate::error::CorruptRecord;
use crate::tables::{HISTORY_RECORDS_NAME, KV_CURRENT_NAME};

const KIND_DELETE: u8 = 0;
const KIND_PUT: u8 = 1;

/// `id [32] | author [32] | timestamp u64 | previous LSN u64 | previous op index u32 | kind u8`.
const HISTORY_HEADER: usize = 32 + 32 + 8 + 8 + 4 + 1;

/// One current version, as stored in a [`crate::tables::KV_CURRENT`] row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CurrentVersion<'a> {
    pub(crate) id: EntryId,
    pub(crate) author: NodeId,
    pub(crate) timestamp: Timestamp,
    pub(crate) lsn: Lsn,
    /// `None` for a tombstone.
    pub(crate) value: Option<&'a [u8]>,
}

/// `id [32] | author [32] | timestamp u64 | lsn u64 | kind u8 | value length u32`.
const CURRENT_VERSION_HEADER: usize = 32 + 32 + 8 + 8 + 1 + 4;

/// Encodes the versions of one key, which must be ascending by id.
pub(crate) fn encode_current(versions: &[CurrentVersion<'_>], out: &mut Vec<u8>) {
    debug_assert!(versions.windows(2).all(|w| w[0].id < w[1].id));
    let len = versions
        .iter()
        .map(|v| CURRENT_VERSION_HEADER + v.value.map_or(0, <[u8]>::len));
    out.reserve(4 + len.sum::<usize>());
    out.extend_from_slice(&(versions.len() as u32).to_le_bytes());
    for v in versions {
        out.extend_from_slice(v.id.as_bytes());
        out.extend_from_slice(v.author.as_bytes());
        out.extend_from_slice(&v.timestamp.0.to_le_bytes());
        out.extend_from_slice(&v.lsn.to_le_bytes());
        match v.value {
            None => {
                out.push(KIND_DELETE);
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Some(value) => {
                out.push(KIND_PUT);
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
        }
    }
}

/// Decodes a [`crate::tables::KV_CURRENT`] row, appending its versions to `out`.
pub(crate) fn decode_current<'a>(
    mut bytes: &'a [u8],
    out: &mut Vec<CurrentVersion<'a>>,
) -> Result<(), CorruptRecord> {
    let corrupt = |reason| CorruptRecord {
        table: KV_CURRENT_NAME,
        reason,
    };
    if bytes.len() < 4 {
        return Err(corrupt("shorter than its count"));
    }
    let (count, rest) = split_array::<4>(bytes);
    bytes = rest;
    let count = u32::from_le_bytes(count);
    if count == 0 {
        return Err(corrupt("a row without versions"));
    }
    for _ in 0..count {
        if bytes.len() < CURRENT_VERSION_HEADER {
            return Err(corrupt("a version shorter than its header"));
        }
        let (id, rest) = split_array::<32>(bytes);
        let (author, rest) = split_array::<32>(rest);
        let (timestamp, rest) = split_array::<8>(rest);
        let (lsn, rest) = split_array::<8>(rest);
        let (&kind, rest) = rest.split_first().ok_or_else(|| corrupt("no kind byte"))?;
        let (len, rest) = split_array::<4>(rest);
        let len = u32::from_le_bytes(len) as usize;
        if rest.len() < len {
            return Err(corrupt("a value longer than the row"));
        }
        let (value, rest) = rest.split_at(len);
        let value = match kind {
            KIND_PUT => Some(value),
            KIND_DELETE if len == 0 => None,
            KIND_DELETE => return Err(corrupt("a tombstone with a value")),
            _ => return Err(corrupt("unknown kind")),
        };
        let id = EntryId(id);
        if out.last().is_some_and(|last| last.id >= id) {
            return Err(corrupt("versions not ascending by id"));
        }
        out.push(CurrentVersion {
            id,
            author: NodeId(author),
            timestamp: Timestamp(u64::from_le_bytes(timestamp)),
            lsn: u64::from_le_bytes(lsn),
            value,
        });
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(corrupt("bytes after the last version"));
    }
    Ok(())
}

/// A value of [`crate::tables::HISTORY_RECORDS`], borrowed from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HistoryRecord<'a> {
    pub(crate) id: EntryId,
    pub(crate) author: NodeId,
    pub(crate) timestamp: Timestamp,
    /// The `(LSN, op index)` of the same key's version before this one, if any.
    pub(crate) previous: Option<(Lsn, u32)>,
    /// `None` for a tombstone.
    pub(crate) value: Option<&'a [u8]>,
}

impl<'a> HistoryRecord<'a> {
    /// Appends the encoding to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(HISTORY_HEADER + self.value.map_or(0, <[u8]>::len));
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.author.as_bytes());
        out.extend_from_slice(&self.timestamp.0.to_le_bytes());
        let (lsn, op) = self.previous.unwrap_or((0, 0));
        out.extend_from_slice(&lsn.to_le_bytes());
        out.extend_from_slice(&op.to_le_bytes());
        encode_value(self.value, out);
    }

    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        let corrupt = |reason| CorruptRecord {
            table: HISTORY_RECORDS_NAME,
            reason,
        };
        if bytes.len() < HISTORY_HEADER {
            return Err(corrupt("shorter than its header"));
        }
        let (id, rest) = split_array::<32>(bytes);
        let (author, rest) = split_array::<32>(rest);
        let (timestamp, rest) = split_array::<8>(rest);
        let (previous_lsn, rest) = split_array::<8>(rest);
        let (previous_op, rest) = split_array::<4>(rest);
        let value = decode_value(rest).map_err(corrupt)?;
        let previous = match (
            u64::from_le_bytes(previous_lsn),
            u32::from_le_bytes(previous_op),
        ) {
            (0, 0) => None,
            (0, _) => return Err(corrupt("an op index without an LSN")),
            at => Some(at),
        };
        Ok(Self {
            id: EntryId(id),
            author: NodeId(author),
            timestamp: Timestamp(u64::from_le_bytes(timestamp)),
            previous,
            value,
        })
    }
}

fn encode_value(value: Option<&[u8]>, out: &mut Vec<u8>) {
    match value {
        None => out.push(KIND_DELETE),
        Some(v) => {
            out.push(KIND_PUT);
            out.extend_from_slice(v);
        }
    }
}

/// `kind u8 | value`: `None` for a tombstone, the value for a put.
fn decode_value(bytes: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    match bytes.split_first() {
        Some((&KIND_DELETE, [])) => Ok(None),
        Some((&KIND_DELETE, _)) => Err("a tombstone followed by bytes"),
        Some((&KIND_PUT, value)) => Ok(Some(value)),
        Some(_) => Err("unknown kind"),
        None => Err("no kind byte"),
    }
}

/// Splits a fixed-size prefix off `bytes`, which the caller has checked is long enough.
fn split_array<const N: usize>(bytes: &[u8]) -> ([u8; N], &[u8]) {
    let (head, rest) = bytes.split_at(N);
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    (out, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_round_trips_and_rejects_damage() {
        let v = |n: u8, value| CurrentVersion {
            id: EntryId([n; 32]),
            author: NodeId([3; 32]),
            timestamp: Timestamp(9),
            lsn: u64::from(n),
            value,
        };
        let versions = [v(1, None), v(2, Some(&b""[..])), v(3, Some(&b"hello"[..]))];
        let mut buf = Vec::new();
        encode_current(&versions, &mut buf);
        let mut back = Vec::new();
        decode_current(&buf, &mut back).unwrap();
        assert_eq!(back, versions);
        for cut in [0, 3, 10, buf.len() - 1] {
            assert!(
                decode_current(&buf[..cut], &mut Vec::new()).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(decode_current(&longer, &mut Vec::new()).is_err());
        let mut unordered = Vec::new();
        encode_current(&versions[..1], &mut unordered);
        let mut twice = Vec::new();
        twice.extend_from_slice(&2u32.to_le_bytes());
        twice.extend_from_slice(&unordered[4..]);
        twice.extend_from_slice(&unordered[4..]);
        assert!(
            decode_current(&twice, &mut Vec::new()).is_err(),
            "duplicate ids"
        );
    }

    #[test]
    fn history_round_trips() {
        for (value, previous) in [(None, None), (Some(&b"v"[..]), Some((7, 2)))] {
            let rec = HistoryRecord {
                id: EntryId([1; 32]),
                author: NodeId([2; 32]),
                timestamp: Timestamp(5),
                previous,
                value,
            };
            let mut buf = Vec::new();
            rec.encode_into(&mut buf);
            assert_eq!(HistoryRecord::decode(&buf), Ok(rec));
            assert!(HistoryRecord::decode(&buf[..10]).is_err());
        }
    }
}
