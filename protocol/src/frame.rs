//! Frames on QUIC streams: `u32 length (LE) | MessagePack body`. QUIC already protects the bytes,
//! so frames carry no checksum; the length is checked against the limit before allocation.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, FramingError};

/// Bytes before a frame's body.
pub const FRAME_HEADER_LEN: usize = 4;

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameDecode<'a> {
    /// The buffer ends inside the frame.
    NeedMore {
        /// Bytes missing to complete at least the header, or the frame.
        needed: usize,
    },
    /// A whole frame.
    Frame {
        /// The MessagePack body.
        body: &'a [u8],
        /// Bytes the frame occupies, header included.
        used: usize,
    },
}

/// Reads the length prefix of a frame, refusing one over `max_len`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max_len: usize) -> Result<usize, FramingError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max_len {
        return Err(FramingError::TooLarge { len, max: max_len });
    }
    Ok(len)
}

/// Cuts one frame off the front of `buf`.
pub fn decode_frame(buf: &[u8], max_len: usize) -> Result<FrameDecode<'_>, FramingError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(FrameDecode::NeedMore {
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    };
    let len = frame_len(*header, max_len)?;
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Ok(FrameDecode::NeedMore {
            needed: total - buf.len(),
        });
    }
    Ok(FrameDecode::Frame {
        body: &buf[FRAME_HEADER_LEN..total],
        used: total,
    })
}

/// Encodes `msg` as one frame: length prefix and MessagePack body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    rmp_serde::encode::write(&mut out, msg).expect("encoding a message into a Vec cannot fail");
    let len = u32::try_from(out.len() - FRAME_HEADER_LEN).expect("frame fits in u32");
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    out
}

/// Appends `msg` to `out` as one frame of a pipeline: its body is the MessagePack 2-array
/// `[id, msg]`, so that the answer, tagged with the same id, finds its request.
pub fn encode_tagged_frame<T: Serialize>(id: u64, msg: &T, out: &mut Vec<u8>) {
    const FIXARRAY_2: u8 = 0x92;
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.push(FIXARRAY_2);
    rmp_serde::encode::write(out, &id).expect("encoding into a Vec cannot fail");
    rmp_serde::encode::write(out, msg).expect("encoding into a Vec cannot fail");
    let len = u32::try_from(out.len() - start - FRAME_HEADER_LEN).expect("frame fits in u32");
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// Splits the body of a pipeline frame, `[id, message]`, into the id and the message's bytes
/// (to decode with [`decode_message`] or [`decode_body`]).
pub fn split_tagged(body: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    const FIXARRAY_2: u8 = 0x92;
    let malformed = || DecodeError::Malformed("a pipeline frame is [id, message]".into());
    let (&FIXARRAY_2, rest) = body.split_first().ok_or_else(malformed)? else {
        return Err(malformed());
    };
    let (&marker, rest) = rest.split_first().ok_or_else(malformed)?;
    let width = match marker {
        0x00..=0x7f => return Ok((u64::from(marker), rest)),
        0xcc => 1,
        0xcd => 2,
        0xce => 4,
        0xcf => 8,
        _ => return Err(malformed()),
    };
    let (bytes, message) = rest.split_at_checked(width).ok_or_else(malformed)?;
    let mut be = [0u8; 8];
    be[8 - width..].copy_from_slice(bytes);
    Ok((u64::from_be_bytes(be), message))
}

/// Decodes a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// What a message body held: a message of a kind this version knows, or only the name of a
/// kind it does not (sent by a newer version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A message this version knows.
    Message(T),
    /// A well-formed message of a kind this version does not know: its name.
    UnknownKind(String),
}

/// A message enum that names its kinds, so that a message of a kind this version does not know
/// is told apart from a malformed one without reading the decoder's error text.
pub trait MessageKinds {
    /// The names of every kind (enum variant), as they are encoded.
    const KINDS: &'static [&'static str];
}

/// Decodes a message body, telling a message of an unknown kind from a malformed one.
///
/// Messages are externally tagged enums: a one-entry map from the kind's name to its fields, or
/// the bare name of a kind without fields.
pub fn decode_message<T: DeserializeOwned + MessageKinds>(
    body: &[u8],
) -> Result<Decoded<T>, DecodeError> {
    match rmp_serde::from_slice(body) {
        Ok(message) => Ok(Decoded::Message(message)),
        Err(e) => match message_kind(body) {
            Some(kind) if !T::KINDS.contains(&kind) => Ok(Decoded::UnknownKind(kind.to_owned())),
            _ => Err(DecodeError::Malformed(e.to_string())),
        },
    }
}

/// The name of an externally tagged message's kind: the key of a one-entry map, or a bare
/// string. `None` when the body starts otherwise.
pub fn message_kind(body: &[u8]) -> Option<&str> {
    const FIXMAP_1: u8 = 0x81;
    const STR8: u8 = 0xd9;
    const STR16: u8 = 0xda;
    let rest = match body.split_first()? {
        (&FIXMAP_1, rest) => rest,
        _ => body,
    };
    let (len, at) = match *rest.first()? {
        b @ 0xa0..=0xbf => (usize::from(b & 0x1f), 1),
        STR8 => (usize::from(*rest.get(1)?), 2),
        STR16 => (
            usize::from(u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?])),
            3,
        ),
        _ => return None,
    };
    std::str::from_utf8(rest.get(at..at + len)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tagged_frames_carry_their_id() {
        for id in [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let mut out = b"before".to_vec();
            encode_tagged_frame(id, &("hello", 42u32), &mut out);
            let Ok(FrameDecode::Frame { body, used }) = decode_frame(&out[6..], 1024) else {
                panic!("one whole frame");
            };
            assert_eq!(used, out.len() - 6);
            let (got, message) = split_tagged(body).expect("a tagged body");
            assert_eq!(got, id);
            assert_eq!(
                decode_body::<(String, u32)>(message).unwrap(),
                ("hello".into(), 42)
            );
            // The same bytes as serde's own encoding of the pair.
            assert_eq!(body, rmp_serde::to_vec(&(id, ("hello", 42u32))).unwrap());
            // Cut inside the array header or the id: refused.
            for cut in 0..body.len() - message.len() {
                assert!(split_tagged(&body[..cut]).is_err());
            }
        }
        assert!(split_tagged(&rmp_serde::to_vec(&("x", 1u8)).unwrap()).is_err());
        assert!(split_tagged(&rmp_serde::to_vec(&(-1i64, 1u8)).unwrap()).is_err());
    }

    #[test]
    fn frame_round_trip_and_limit() {
        let buf = encode_frame(&("hello", 42u32));
        for cut in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..cut], 1024),
                Ok(FrameDecode::NeedMore { .. })
            ));
        }
        let FrameDecode::Frame { body, used } = decode_frame(&buf, 1024).unwrap() else {
            panic!("whole frame reported incomplete")
        };
        assert_eq!(used, buf.len());
        assert_eq!(
            decode_body::<(String, u32)>(body).unwrap(),
            ("hello".to_string(), 42)
        );
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            decode_frame(&huge, 1024),
            Err(FramingError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(FrameDecode::Frame { body, .. }) = decode_frame(&bytes, 128) {
                let _ = decode_body::<crate::request::Request>(body);
            }
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Old {
        A { x: u32 },
        B,
    }

    impl MessageKinds for Old {
        const KINDS: &'static [&'static str] = &["A", "B"];
    }

    #[derive(serde::Serialize)]
    enum New {
        A { x: u32 },
        B,
        Gossip { about: String },
        Ping,
    }

    #[test]
    fn a_message_of_an_unknown_kind_is_told_from_a_malformed_one() {
        let body = |m: &New| encode_frame(m)[FRAME_HEADER_LEN..].to_vec();
        assert_eq!(
            decode_message::<Old>(&body(&New::A { x: 7 })).ok(),
            Some(Decoded::Message(Old::A { x: 7 }))
        );
        assert_eq!(
            decode_message::<Old>(&body(&New::B)).ok(),
            Some(Decoded::Message(Old::B))
        );
        let gossip = body(&New::Gossip {
            about: "x".repeat(40),
        });
        assert_eq!(
            decode_message::<Old>(&gossip).ok(),
            Some(Decoded::UnknownKind("Gossip".into()))
        );
        assert_eq!(
            decode_message::<Old>(&body(&New::Ping)).ok(),
            Some(Decoded::UnknownKind("Ping".into()))
        );
        // A known kind with bad fields, and bytes that are no message, are malformed.
        let mut bad = body(&New::A { x: 7 });
        bad.truncate(bad.len() - 1);
        assert!(matches!(
            decode_message::<Old>(&bad),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_message::<Old>(&[0xc1]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
