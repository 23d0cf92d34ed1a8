//! The bodies of the fuzz targets, shared by the cargo-fuzz binaries in `fuzz_targets/` and by
//! the smoke test below, which runs them on stable over the committed seeds and a few thousand
//! seeded random and mutated inputs.
//!
//! Each body panics when a property of the decoder fails, not only when the decoder panics:
//!
//! - [`record`]: a record decoder never claims more bytes than it was given, reports exactly
//!   what it needs to complete a record, checks the length before anything else, and a record it
//!   hands out re-encodes to the bytes it was cut from.
//! - [`frame`]: the same for frames; a message body that decodes re-encodes to bytes that decode
//!   to the same message, and re-encode to themselves.
//! - [`entry`]: a payload that decodes is canonical (it re-encodes to the same bytes), its id is
//!   the hash of its entry bytes, and a signature that verifies under the seed author belongs
//!   to a seed payload, byte for byte: mutating a signed entry never yields another one.
//! - [`ticket`]: a ticket, node id or context that parses displays as text that parses to the
//!   same value and displays the same again.

use std::collections::HashMap;
use std::sync::OnceLock;

use kappakv_protocol::frame::{
    FRAME_HEADER_LEN, FrameDecode, decode_body, decode_frame, encode_frame, frame_len,
};
use kappakv_protocol::limits::{MAX_FRAME_BYTES, MAX_RECORD_BYTES};
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::record::{RECORD_HEADER_LEN, RecordDecode, decode_record, encode_record};
use kappakv_protocol::sign::verify_signature;
use kappakv_protocol::verify::ChainChecker;
use kappakv_protocol::{
    Context, Entry, EntryId, FramingError, NodeId, Request, Response, SignedEntry, Ticket,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod seeds;

/// A target's body: panics when a property fails.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and seed folder.
pub const TARGETS: [(&str, Target); 4] = [
    ("record", record),
    ("frame", frame),
    ("entry", entry),
    ("ticket", ticket),
];

// ---- records ---------------------------------------------------------------------------------

/// Record limits tried on every input: tiny, small, and the log's own.
const RECORD_LIMITS: [usize; 3] = [16, 4096, MAX_RECORD_BYTES];

/// Log records: cut one record at several limits, then walk the buffer as the log reader does
/// and decode every payload as an entry.
pub fn record(data: &[u8]) {
    for max in RECORD_LIMITS {
        check_record(data, max);
    }
    let mut at = 0;
    while let Ok(RecordDecode::Record { payload, used }) =
        decode_record(&data[at..], MAX_RECORD_BYTES)
    {
        at += used;
        assert!(at <= data.len(), "records claim more bytes than given");
        entry(payload);
    }
}

fn le32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn check_record(data: &[u8], max: usize) {
    let declared = (data.len() >= 4).then(|| le32(data) as usize);
    match decode_record(data, max) {
        Ok(RecordDecode::NeedMore { needed }) => {
            assert!(needed > 0, "needs nothing but is not whole");
            if data.len() < RECORD_HEADER_LEN {
                assert_eq!(needed, RECORD_HEADER_LEN - data.len());
            } else {
                let len = declared.expect("header present");
                assert!(
                    len > 0 && len <= max,
                    "incomplete record of a refused length"
                );
                assert_eq!(data.len() + needed, RECORD_HEADER_LEN + len);
            }
        }
        Ok(RecordDecode::Record { payload, used }) => {
            assert!(used <= data.len(), "record claims more bytes than given");
            assert_eq!(used, RECORD_HEADER_LEN + payload.len());
            assert_eq!(Some(payload.len()), declared);
            assert!(!payload.is_empty() && payload.len() <= max);
            assert_eq!(payload, &data[RECORD_HEADER_LEN..used]);
            let mut again = Vec::with_capacity(used);
            encode_record(payload, &mut again);
            assert_eq!(
                again,
                &data[..used],
                "record does not re-encode to its bytes"
            );
            // Bytes after the record do not matter; one byte less is not a record.
            assert_eq!(
                decode_record(&data[..used], max),
                Ok(RecordDecode::Record { payload, used })
            );
            assert_eq!(
                decode_record(&data[..used - 1], max),
                Ok(RecordDecode::NeedMore { needed: 1 })
            );
        }
        Err(FramingError::TooLarge { len, max: limit }) => {
            assert_eq!((Some(len), limit), (declared, max));
            assert!(len > max);
        }
        Err(FramingError::Empty) => assert_eq!(declared, Some(0)),
        Err(FramingError::Checksum { stored, computed }) => {
            let len = declared.expect("header present");
            assert_ne!(stored, computed);
            assert_eq!(stored, le32(&data[4..]));
            let payload = &data[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
            assert_eq!(computed, record_crc(payload));
        }
        Err(e) => panic!("unexpected record error: {e}"),
    }
}

/// The checksum the record format stores for `payload`, taken from the encoder.
fn record_crc(payload: &[u8]) -> u32 {
    let mut framed = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    encode_record(payload, &mut framed);
    le32(&framed[4..])
}

// ---- frames ----------------------------------------------------------------------------------

/// Frame limits tried on every input: none at all, tiny, and the stream's own.
const FRAME_LIMITS: [usize; 3] = [0, 16, MAX_FRAME_BYTES];

/// Stream frames: cut one frame at several limits, then walk the buffer and decode every body
/// as each message type, and every peer payload as an entry.
pub fn frame(data: &[u8]) {
    for max in FRAME_LIMITS {
        check_frame(data, max);
    }
    let mut at = 0;
    while let Ok(FrameDecode::Frame { body, used }) = decode_frame(&data[at..], MAX_FRAME_BYTES) {
        at += used;
        assert!(at <= data.len(), "frames claim more bytes than given");
        check_message::<Request>(body);
        check_message::<Response>(body);
        if let Some(PeerMessage::Entries { payloads }) = check_message::<PeerMessage>(body) {
            for p in &payloads {
                entry(p);
            }
        }
    }
}

fn check_frame(data: &[u8], max: usize) {
    let header = data.first_chunk::<FRAME_HEADER_LEN>().copied();
    let declared = header.map(|h| u32::from_le_bytes(h) as usize);
    let result = decode_frame(data, max);
    if let Some(h) = header {
        assert_eq!(
            frame_len(h, max).is_err(),
            result.is_err(),
            "frame_len and decode_frame disagree"
        );
    }
    match result {
        Ok(FrameDecode::NeedMore { needed }) => {
            assert!(needed > 0, "needs nothing but is not whole");
            match declared {
                None => assert_eq!(needed, FRAME_HEADER_LEN - data.len()),
                Some(len) => {
                    assert!(len <= max, "incomplete frame of a refused length");
                    assert_eq!(data.len() + needed, FRAME_HEADER_LEN + len);
                }
            }
        }
        Ok(FrameDecode::Frame { body, used }) => {
            assert!(used <= data.len(), "frame claims more bytes than given");
            assert_eq!(used, FRAME_HEADER_LEN + body.len());
            assert_eq!(Some(body.len()), declared);
            assert!(body.len() <= max);
            assert_eq!(body, &data[FRAME_HEADER_LEN..used]);
            if used > FRAME_HEADER_LEN {
                assert_eq!(
                    decode_frame(&data[..used - 1], max),
                    Ok(FrameDecode::NeedMore { needed: 1 })
                );
            }
        }
        Err(FramingError::TooLarge { len, max: limit }) => {
            assert_eq!((Some(len), limit), (declared, max));
            assert!(len > max);
        }
        Err(e) => panic!("unexpected frame error: {e}"),
    }
}

/// Decodes `body` as a `T`; what decodes re-encodes as one frame that decodes to an equal
/// message, whose encoding is stable from then on.
fn check_message<T>(body: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let msg: T = decode_body(body).ok()?;
    let framed = encode_frame(&msg);
    let Ok(FrameDecode::Frame { body: again, used }) = decode_frame(&framed, usize::MAX) else {
        panic!("an encoded frame does not decode as one frame")
    };
    assert_eq!(used, framed.len());
    let back: T = decode_body(again).expect("a re-encoded message decodes");
    assert_eq!(back, msg, "a message changes through a re-encoding");
    assert_eq!(encode_frame(&back), framed, "re-encoding is not stable");
    Some(msg)
}

// ---- entries ---------------------------------------------------------------------------------

/// Record payloads: decode as a [`SignedEntry`], check the canonical form and the id, run the
/// chain checks, and check that nothing new verifies under the seed author. Also decodes the
/// input as bare canonical entry bytes.
pub fn entry(data: &[u8]) {
    if let Ok(se) = SignedEntry::decode_payload(data) {
        check_signed_entry(data, &se);
    }
    if let Ok((e, id)) = Entry::from_canonical_bytes(data) {
        assert_eq!(
            e.to_canonical_bytes(),
            data,
            "decoded entry is not canonical"
        );
        assert_eq!(id, EntryId::of_canonical_bytes(data));
        let se = SignedEntry {
            entry: e,
            id,
            signature: None,
        };
        let payload = se.encode_payload();
        assert_eq!(
            SignedEntry::decode_payload(&payload).expect("a canonical entry makes a payload"),
            se
        );
    }
}

fn check_signed_entry(data: &[u8], se: &SignedEntry) {
    assert_eq!(
        se.encode_payload(),
        data,
        "decoded payload is not canonical"
    );
    let canonical = se.entry.to_canonical_bytes();
    assert_eq!(
        &data[1..=canonical.len()],
        canonical,
        "entry bytes are not canonical"
    );
    assert_eq!(se.id, EntryId::of_canonical_bytes(&canonical));
    assert_eq!(se.entry.validate(), Ok(()));

    let verified = se
        .signature
        .as_ref()
        .is_some_and(|sig| verify_signature(&se.entry.author, se.entry.seq, &se.id, sig).is_ok());
    // A lone entry is accepted as a chain exactly when it starts one and is signed.
    let mut chain = ChainChecker::default();
    let accepted = chain.push(se).and_then(|()| chain.finish()).is_ok();
    assert_eq!(accepted, se.entry.seq == 1 && verified);

    if verified {
        let sig = se.signature.expect("verified means signed");
        let mut other = se.id;
        other.0[0] ^= 1;
        assert!(
            verify_signature(&se.entry.author, se.entry.seq, &other, &sig).is_err(),
            "a signature verifies for two ids"
        );
        if se.entry.author == seeds::author() {
            assert_eq!(
                seed_payloads().get(&se.id).map(Vec::as_slice),
                Some(data),
                "an entry that is not a seed verifies under the seed author"
            );
        }
    }
}

/// Every signed payload of the seeds, by entry id.
fn seed_payloads() -> &'static HashMap<EntryId, Vec<u8>> {
    static SEEDS: OnceLock<HashMap<EntryId, Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        seeds::chain()
            .into_iter()
            .filter(|se| se.signature.is_some())
            .map(|se| (se.id, se.encode_payload()))
            .collect()
    })
}

// ---- tickets ---------------------------------------------------------------------------------

/// Tickets, node ids and contexts in text: what parses displays as text that parses to the same
/// value, and that text is a fixed point.
pub fn ticket(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Ticket>() {
        Ok(t) => {
            assert!(!t.addrs.is_empty(), "a ticket without addresses");
            assert!(
                !t.token.is_empty()
                    && t.token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "a ticket with a bad token"
            );
            round_trip(&t);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Ok(id) = text.parse::<NodeId>() {
        let shown = round_trip(&id);
        assert_eq!(shown, text.trim().to_ascii_lowercase());
    }
    if let Ok(ctx) = text.parse::<Context>() {
        round_trip(&ctx);
        assert!(
            ctx.0.windows(2).all(|w| w[0] < w[1]),
            "context not normalized"
        );
    }
}

/// Displays `value`, parses the text back to an equal value, and checks the text is stable.
fn round_trip<T>(value: &T) -> String
where
    T: std::fmt::Display + std::str::FromStr + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Debug,
{
    let shown = value.to_string();
    let back: T = shown.parse().expect("displayed text parses");
    assert_eq!(&back, value, "display and parse disagree: {shown}");
    assert_eq!(back.to_string(), shown, "display is not stable");
    shown
}

// ---- inputs for the smoke test ---------------------------------------------------------------

/// A small deterministic generator (SplitMix64), so runs are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A random byte, biased towards the ones decoders care about.
    pub fn byte(&mut self) -> u8 {
        const INTERESTING: [u8; 10] = [0x00, 0x01, 0x7f, 0x80, 0xc0, 0xc4, 0xcc, 0xdc, 0xff, 0x92];
        if self.below(4) == 0 {
            INTERESTING[self.below(INTERESTING.len())]
        } else {
            self.next_u64() as u8
        }
    }
}

/// Applies one to four random edits to `data`: flips, overwrites, inserts, removals,
/// truncation, duplicated or swapped ranges, rewritten length prefixes, splices from `other`.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                let b = rng.byte();
                data.insert(i, b);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(8));
                data.drain(i..i + n);
            }
            4 => data.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            7 if len >= 4 => {
                // A length prefix, where record and frame decoders read one.
                let values = [0, 1, len as u32, u32::MAX, rng.next_u64() as u32];
                let v = values[rng.below(values.len())];
                data[..4].copy_from_slice(&v.to_le_bytes());
            }
            8 if !other.is_empty() => {
                let i = rng.below(other.len());
                let n = 1 + rng.below((other.len() - i).min(64));
                let at = rng.below(len + 1);
                let end = (at + rng.below(n + 1)).min(len);
                data.splice(at..end, other[i..i + n].iter().copied());
            }
            _ => data.push(rng.byte()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs per target beyond the seeds: half random bytes, half mutated seeds.
    const GENERATED_PER_TARGET: usize = 25_000;

    fn committed_seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|f| f.expect("a directory entry").path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| std::fs::read(f).expect("a seed file"))
            .collect()
    }

    #[test]
    fn committed_seeds_are_the_generated_ones() {
        for (target, _) in TARGETS {
            let mut expected: Vec<Vec<u8>> = seeds::for_target(target)
                .into_iter()
                .map(|(_, b)| b)
                .collect();
            let mut found = committed_seeds(target);
            expected.sort();
            found.sort();
            assert_eq!(
                found, expected,
                "fuzz/seeds/{target} is stale: run the ignored test write_seed_corpus"
            );
        }
    }

    #[test]
    fn targets_hold_on_seeds_random_and_mutated_inputs() {
        for (n, (target, body)) in TARGETS.into_iter().enumerate() {
            let seeds = committed_seeds(target);
            assert!(seeds.len() >= 3, "{target}: too few seeds");
            for s in &seeds {
                body(s);
            }
            let mut rng = Rng::new(0x006b_6170_7061 + n as u64);
            for i in 0..GENERATED_PER_TARGET {
                let mut input = if i % 2 == 0 {
                    let len = rng.below(96);
                    (0..len).map(|_| rng.byte()).collect()
                } else {
                    seeds[rng.below(seeds.len())].clone()
                };
                let other = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, &mut input, other);
                body(&input);
            }
        }
    }

    /// Signed seed entries are accepted, and a flipped byte in any of them is not.
    #[test]
    fn seed_chain_verifies_and_single_flips_do_not() {
        let chain = seeds::chain();
        let mut checker = ChainChecker::default();
        for se in &chain {
            checker.push(se).expect("the seed chain links and verifies");
        }
        checker.finish().expect("the seed chain ends signed");
        let last = chain.last().expect("a chain").encode_payload();
        for i in 0..last.len() {
            let mut p = last.clone();
            p[i] ^= 0x20;
            entry(&p);
        }
    }

    /// Writes `fuzz/seeds/TARGET/NAME` from [`seeds::for_target`].
    #[test]
    #[ignore = "writes the committed seed corpus"]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (target, _) in TARGETS {
            let dir = root.join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the seed folder");
            for (name, bytes) in seeds::for_target(target) {
                std::fs::write(dir.join(name), bytes).expect("write a seed");
            }
        }
    }
}
