//! Byte layouts of the multi-field values stored in [`crate::tables`]. Fixed-offset fields, the
//! value last, so encoding is one copy and decoding borrows.

use kappakv_protocol::{EntryId, Lsn, NodeId, Timestamp};

use crate::error::CorruptRecord;
use crate::tables::{HISTORY_VERSIONS_NAME, KV_CURRENT_NAME};

const KIND_DELETE: u8 = 0;
const KIND_PUT: u8 = 1;

/// `author [32] | timestamp u64 | lsn u64 | kind u8`.
const CURRENT_HEADER: usize = 32 + 8 + 8 + 1;
/// `id [32] | author [32] | timestamp u64 | kind u8`.
const HISTORY_HEADER: usize = 32 + 32 + 8 + 1;

/// A value of [`crate::tables::KV_CURRENT`], borrowed from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CurrentRecord<'a> {
    pub(crate) author: NodeId,
    pub(crate) timestamp: Timestamp,
    pub(crate) lsn: Lsn,
    /// `None` for a tombstone.
    pub(crate) value: Option<&'a [u8]>,
}

impl<'a> CurrentRecord<'a> {
    /// Appends the encoding to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(CURRENT_HEADER + self.value.map_or(0, <[u8]>::len));
        out.extend_from_slice(self.author.as_bytes());
        out.extend_from_slice(&self.timestamp.0.to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        encode_value(self.value, out);
    }

    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        let corrupt = |reason| CorruptRecord {
            table: KV_CURRENT_NAME,
            reason,
        };
        if bytes.len() < CURRENT_HEADER {
            return Err(corrupt("shorter than its header"));
        }
        let (author, rest) = split_array::<32>(bytes);
        let (timestamp, rest) = split_array::<8>(rest);
        let (lsn, rest) = split_array::<8>(rest);
        let value = decode_value(rest).map_err(corrupt)?;
        Ok(Self {
            author: NodeId(author),
            timestamp: Timestamp(u64::from_le_bytes(timestamp)),
            lsn: u64::from_le_bytes(lsn),
            value,
        })
    }
}

/// A value of [`crate::tables::HISTORY_VERSIONS`], borrowed from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HistoryRecord<'a> {
    pub(crate) id: EntryId,
    pub(crate) author: NodeId,
    pub(crate) timestamp: Timestamp,
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
        encode_value(self.value, out);
    }

    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, CorruptRecord> {
        let corrupt = |reason| CorruptRecord {
            table: HISTORY_VERSIONS_NAME,
            reason,
        };
        if bytes.len() < HISTORY_HEADER {
            return Err(corrupt("shorter than its header"));
        }
        let (id, rest) = split_array::<32>(bytes);
        let (author, rest) = split_array::<32>(rest);
        let (timestamp, rest) = split_array::<8>(rest);
        let value = decode_value(rest).map_err(corrupt)?;
        Ok(Self {
            id: EntryId(id),
            author: NodeId(author),
            timestamp: Timestamp(u64::from_le_bytes(timestamp)),
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
        for value in [None, Some(&b""[..]), Some(&b"hello"[..])] {
            let rec = CurrentRecord {
                author: NodeId([3; 32]),
                timestamp: Timestamp(9),
                lsn: 42,
                value,
            };
            let mut buf = Vec::new();
            rec.encode_into(&mut buf);
            assert_eq!(CurrentRecord::decode(&buf), Ok(rec));
            assert!(CurrentRecord::decode(&buf[..CURRENT_HEADER - 1]).is_err());
        }
        let mut buf = Vec::new();
        CurrentRecord {
            author: NodeId([3; 32]),
            timestamp: Timestamp(9),
            lsn: 1,
            value: None,
        }
        .encode_into(&mut buf);
        buf.push(7);
        assert!(
            CurrentRecord::decode(&buf).is_err(),
            "a tombstone carries no bytes"
        );
        buf.truncate(CURRENT_HEADER - 1);
        buf.push(9);
        assert!(CurrentRecord::decode(&buf).is_err(), "unknown kind");
    }

    #[test]
    fn history_round_trips() {
        for value in [None, Some(&b"v"[..])] {
            let rec = HistoryRecord {
                id: EntryId([1; 32]),
                author: NodeId([2; 32]),
                timestamp: Timestamp(5),
                value,
            };
            let mut buf = Vec::new();
            rec.encode_into(&mut buf);
            assert_eq!(HistoryRecord::decode(&buf), Ok(rec));
            assert!(HistoryRecord::decode(&buf[..10]).is_err());
        }
    }
}
