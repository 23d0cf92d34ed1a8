//! Helpers shared by the log and writer tests: signed chains, and reading a whole log back.
#![allow(dead_code)]

use std::path::Path;

use kappakv_protocol::verify::{ChainChecker, ChainHead};
use kappakv_protocol::{Entry, Keypair, Lsn, Op, SignedEntry, Timestamp};
use kappakv_server::log::LogReader;

/// Builds the entries of one author's chain, continuing from `head`.
pub struct ChainBuilder {
    pub keypair: Keypair,
    pub head: Option<ChainHead>,
}

impl ChainBuilder {
    pub fn new(secret: u8) -> Self {
        Self {
            keypair: Keypair::from_secret([secret; 32]),
            head: None,
        }
    }

    /// The next entry, with a value of `value_len` bytes, signed if `signed`.
    pub fn next(&mut self, value_len: usize, signed: bool) -> SignedEntry {
        let seq = self.head.map_or(1, |h| h.seq + 1);
        let entry = Entry {
            author: self.keypair.node_id(),
            seq,
            prev: self.head.map(|h| h.id),
            timestamp: Timestamp(seq << 16),
            ops: vec![Op::Put {
                key: format!("key-{}", seq % 7).into_bytes(),
                value: vec![(seq % 251) as u8; value_len],
                supersedes: vec![],
            }],
        };
        let id = entry.id();
        self.head = Some(ChainHead { seq, id });
        let signature = signed.then(|| self.keypair.sign(&id));
        SignedEntry {
            entry,
            id,
            signature,
        }
    }

    /// A batch as the writer makes it: `n` entries, the last one signed.
    pub fn batch(&mut self, n: usize, value_len: usize) -> Vec<SignedEntry> {
        (0..n).map(|i| self.next(value_len, i + 1 == n)).collect()
    }
}

pub fn payloads(entries: &[SignedEntry]) -> Vec<Vec<u8>> {
    entries.iter().map(SignedEntry::encode_payload).collect()
}

/// Reads `(0, upto]` back and checks every link and signature, and that chains end signed.
pub fn read_all_checked(log_dir: &Path, upto: Lsn) -> Vec<(Lsn, SignedEntry)> {
    let reader = LogReader::open(log_dir).unwrap();
    let all: Vec<_> = reader
        .iter(0, upto)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len() as u64, upto);
    let mut checker = ChainChecker::default();
    for (i, (lsn, e)) in all.iter().enumerate() {
        assert_eq!(*lsn, i as u64 + 1);
        checker.push(e).unwrap();
    }
    checker.finish().unwrap();
    all
}

/// Asserts that at no point of `entries` (a log, in order) more than one author's run of
/// unsigned entries is open.
pub fn assert_one_open_run(entries: &[(Lsn, SignedEntry)]) {
    let mut open = std::collections::HashSet::new();
    for (lsn, e) in entries {
        if e.signature.is_some() {
            open.remove(&e.entry.author);
        } else {
            open.insert(e.entry.author);
        }
        assert!(open.len() <= 1, "two authors' runs are open at LSN {lsn}");
    }
}
