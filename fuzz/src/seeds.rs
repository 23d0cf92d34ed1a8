//! Valid inputs for each target, built from one fixed key, so the fuzzer starts from the shapes
//! a decoder accepts. `fuzz/seeds/TARGET/` holds these bytes; a test keeps them in step.

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::record::encode_record;
use kappakv_protocol::{
    Entry, EntryId, ErrorCode, IndexQuery, IndexValue, KeyRange, Keypair, NodeId, Op, Request,
    Response, SignedEntry, Ticket, Timestamp, WriteOp,
};

/// The key that signs the seed entries. Public on purpose: the fuzzer cannot use it.
fn keypair() -> Keypair {
    Keypair::from_secret([0x5e; 32])
}

/// The author of the seed entries.
pub fn author() -> NodeId {
    keypair().node_id()
}

/// A four-entry chain by [`author`]: seq 1 signed, seq 2 unsigned, seq 3 (a batch with a
/// delete and supersedes) signed, seq 4 (an empty key and value) signed.
pub fn chain() -> Vec<SignedEntry> {
    let kp = keypair();
    let bodies: [(bool, Vec<Op>); 4] = [
        (
            true,
            vec![Op::Put {
                key: b"user/1".to_vec(),
                value: b"{\"name\":\"ada\"}".to_vec(),
                supersedes: vec![],
            }],
        ),
        (
            false,
            vec![Op::Put {
                key: b"user/2".to_vec(),
                value: vec![0xc0; 40],
                supersedes: vec![],
            }],
        ),
        (
            true,
            vec![
                Op::Delete {
                    key: b"user/1".to_vec(),
                    supersedes: vec![EntryId([1; 32]), EntryId([2; 32])],
                },
                Op::Put {
                    key: b"user/3".to_vec(),
                    value: (0..=255).collect(),
                    supersedes: vec![EntryId([3; 32])],
                },
            ],
        ),
        (
            true,
            vec![Op::Put {
                key: vec![],
                value: vec![],
                supersedes: vec![],
            }],
        ),
    ];
    let mut prev = None;
    let mut out = Vec::new();
    for (i, (signed, ops)) in bodies.into_iter().enumerate() {
        let entry = Entry {
            author: kp.node_id(),
            seq: i as u64 + 1,
            prev,
            timestamp: Timestamp((1_700_000_000_000 + i as u64) << 16),
            ops,
        };
        let id = entry.id();
        prev = Some(id);
        out.push(SignedEntry {
            entry,
            id,
            signature: signed.then(|| kp.sign(&id)),
        });
    }
    out
}

/// Named seed inputs of one target.
pub fn for_target(target: &str) -> Vec<(String, Vec<u8>)> {
    let chain = chain();
    let payloads: Vec<Vec<u8>> = chain.iter().map(SignedEntry::encode_payload).collect();
    let mut out = Vec::new();
    match target {
        "entry" => {
            for (i, p) in payloads.iter().enumerate() {
                out.push((format!("payload-{}", i + 1), p.clone()));
            }
            out.push(("entry-bytes".into(), chain[2].entry.to_canonical_bytes()));
        }
        "record" => {
            let mut log = Vec::new();
            for p in &payloads {
                encode_record(p, &mut log);
            }
            let mut one = Vec::new();
            encode_record(&payloads[0], &mut one);
            out.push(("one".into(), one));
            out.push(("torn".into(), log[..log.len() - 5].to_vec()));
            out.push(("log".into(), log));
        }
        "frame" => {
            let frames = [
                (
                    "hello",
                    encode_frame(&Request::Hello {
                        token: "rw_0123456789abcdef".into(),
                    }),
                ),
                (
                    "write",
                    encode_frame(&Request::Write {
                        ops: vec![
                            WriteOp {
                                key: b"k".to_vec(),
                                value: Some(b"v".to_vec()),
                                supersedes: None,
                            },
                            WriteOp {
                                key: b"gone".to_vec(),
                                value: None,
                                supersedes: Some(vec![EntryId([9; 32])]),
                            },
                        ],
                        request_id: None,
                    }),
                ),
                (
                    "scan",
                    encode_frame(&Request::Scan {
                        range: KeyRange {
                            prefix: Some(b"user/".to_vec()),
                            ..KeyRange::default()
                        },
                        limit: 100,
                        min_lsn: 7,
                    }),
                ),
                (
                    "query",
                    encode_frame(&Request::Query {
                        index: "by_name".into(),
                        query: IndexQuery::range(Some(IndexValue::from(1.5)), None),
                        limit: 10,
                        start_after: None,
                        min_lsn: 0,
                        wait_ms: 100,
                    }),
                ),
                (
                    "error",
                    encode_frame(&Response::Error {
                        code: ErrorCode::Busy,
                        message: "busy".into(),
                    }),
                ),
                (
                    "peer-hello",
                    encode_frame(&PeerMessage::Hello {
                        version_vector: vec![(author(), 3)],
                    }),
                ),
                (
                    "peer-entries",
                    encode_frame(&PeerMessage::Entries {
                        payloads: payloads.iter().cloned().map(Into::into).collect(),
                    }),
                ),
            ];
            let mut stream = Vec::new();
            for (name, f) in frames {
                stream.extend_from_slice(&f);
                out.push((name.to_string(), f));
            }
            out.push(("stream".into(), stream));
        }
        "ticket" => {
            let node_id = author();
            let ticket = Ticket {
                node_id,
                addrs: vec![
                    "127.0.0.1:7700".parse().expect("an address"),
                    "[::1]:7701".parse().expect("an address"),
                    "[fe80::1%2]:7702".parse().expect("an address"),
                ],
                token: "rw_AbC-09_z".into(),
            };
            out.push(("ticket".into(), ticket.to_string().into_bytes()));
            out.push(("node-id".into(), node_id.to_string().into_bytes()));
            let context = format!("{}.{}", EntryId([2; 32]), EntryId([1; 32]));
            out.push(("context".into(), context.into_bytes()));
        }
        other => panic!("no target named {other}"),
    }
    out
}
