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

/// Decodes a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
