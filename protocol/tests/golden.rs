//! The committed golden log must decode, with the same ids and signatures, forever. If this
//! test fails, the log format changed: that is a breaking change for every node's data.

use kappakv_protocol::record::{RecordDecode, decode_record, encode_record};
use kappakv_protocol::verify::ChainChecker;
use kappakv_protocol::{Entry, EntryId, Keypair, NodeId, Op, SignedEntry, Timestamp};

const GOLDEN: &[u8] = include_bytes!("data/golden-v1.log");

/// The entries the golden log holds: two entries of one author, the second signed.
fn expected() -> Vec<SignedEntry> {
    let kp = Keypair::from_secret([7; 32]);
    let first = Entry {
        author: kp.node_id(),
        seq: 1,
        prev: None,
        timestamp: Timestamp(0x0102),
        ops: vec![Op::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            supersedes: vec![],
        }],
    };
    let first_id = first.id();
    let second = Entry {
        author: kp.node_id(),
        seq: 2,
        prev: Some(first_id),
        timestamp: Timestamp(0x0103),
        ops: vec![
            Op::Put {
                key: b"k".to_vec(),
                value: vec![0, 255],
                supersedes: vec![first_id],
            },
            Op::Delete {
                key: b"d".to_vec(),
                supersedes: vec![EntryId([0x33; 32])],
            },
        ],
    };
    let second_id = second.id();
    vec![
        SignedEntry {
            entry: first,
            id: first_id,
            signature: None,
        },
        SignedEntry {
            entry: second,
            id: second_id,
            signature: Some(kp.sign(&second_id)),
        },
    ]
}

fn decode_all(mut buf: &[u8]) -> Vec<SignedEntry> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        match decode_record(buf, 1 << 20).expect("golden records decode") {
            RecordDecode::Record { payload, used } => {
                out.push(SignedEntry::decode_payload(payload).expect("golden payloads decode"));
                buf = &buf[used..];
            }
            RecordDecode::NeedMore { .. } => panic!("golden log ends inside a record"),
        }
    }
    out
}

#[test]
fn golden_log_decodes_forever() {
    let entries = decode_all(GOLDEN);
    assert_eq!(entries, expected());
    // Pinned ids: a change in the canonical encoding or the hash would change them.
    assert_eq!(
        entries[0].entry.author,
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
            .parse::<NodeId>()
            .unwrap()
    );
    assert_eq!(entries[1].id.to_hex(), GOLDEN_SECOND_ID);
    let mut checker = ChainChecker::default();
    for e in &entries {
        checker.push(e).expect("golden chain verifies");
    }
    checker.finish().expect("golden chain ends signed");
    // Encoding the same entries gives the same bytes.
    let mut again = Vec::new();
    for e in &entries {
        encode_record(&e.encode_payload(), &mut again);
    }
    assert_eq!(again, GOLDEN);
}

const GOLDEN_SECOND_ID: &str = "db757466a9dd40550165ecb1d1ab9a6a3324d337c58795d6d3249662bc8dcc62";
