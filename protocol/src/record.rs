//! Length- and checksum-framed byte strings: log records, and (with another limit) the frames
//! on QUIC streams. Layout: `u32 length (LE) | u32 crc32c (LE) of the bytes | bytes`.

use crate::error::FramingError;

/// Bytes before a record's payload.
pub const RECORD_HEADER_LEN: usize = 8;

/// What [`decode_record`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordDecode<'a> {
    /// The buffer ends inside the record; `needed` more bytes would complete what is known of it.
    NeedMore {
        /// Bytes missing to complete at least the header, or the record.
        needed: usize,
    },
    /// A whole record with a good checksum.
    Record {
        /// The payload.
        payload: &'a [u8],
        /// Bytes the record occupies, header included.
        used: usize,
    },
}

/// Appends one record holding `payload` to `out`.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty(), "a record payload is never empty");
    let len = u32::try_from(payload.len()).expect("record payload fits in u32");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Cuts one record off the front of `buf`. The length is checked against `max_len` before
/// anything else, and the checksum before the payload is handed out.
pub fn decode_record(buf: &[u8], max_len: usize) -> Result<RecordDecode<'_>, FramingError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Ok(RecordDecode::NeedMore {
            needed: RECORD_HEADER_LEN - buf.len(),
        });
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FramingError::Empty);
    }
    if len > max_len {
        return Err(FramingError::TooLarge { len, max: max_len });
    }
    let total = RECORD_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(RecordDecode::NeedMore {
            needed: total - buf.len(),
        });
    }
    let stored = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let payload = &buf[RECORD_HEADER_LEN..total];
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(FramingError::Checksum { stored, computed });
    }
    Ok(RecordDecode::Record {
        payload,
        used: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_cut_of_a_record_needs_more() {
        let mut buf = Vec::new();
        encode_record(b"hello world", &mut buf);
        for cut in 0..buf.len() {
            assert!(matches!(
                decode_record(&buf[..cut], 1024),
                Ok(RecordDecode::NeedMore { .. })
            ));
        }
        assert_eq!(
            decode_record(&buf, 1024),
            Ok(RecordDecode::Record {
                payload: b"hello world",
                used: buf.len()
            })
        );
        assert_eq!(
            decode_record(&buf, 4),
            Err(FramingError::TooLarge { len: 11, max: 4 })
        );
        buf[10] ^= 1;
        assert!(matches!(
            decode_record(&buf, 1024),
            Err(FramingError::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_record(&bytes, 128);
        }

        #[test]
        fn round_trip(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 1..8)) {
            let mut buf = Vec::new();
            for p in &payloads { encode_record(p, &mut buf); }
            let mut at = 0;
            for p in &payloads {
                match decode_record(&buf[at..], 64).unwrap() {
                    RecordDecode::Record { payload, used } => { prop_assert_eq!(payload, &p[..]); at += used; }
                    RecordDecode::NeedMore { .. } => prop_assert!(false, "whole record reported incomplete"),
                }
            }
            prop_assert_eq!(at, buf.len());
        }
    }
}
