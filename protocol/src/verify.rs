//! Pure chain checks: does an entry extend its author's chain from a known head, and the
//! per-author bookkeeping that `kappakv verify`, import and replication share.

use std::collections::HashMap;

use crate::entry::{Entry, SignedEntry};
use crate::error::VerifyError;
use crate::ids::{EntryId, NodeId};
use crate::sign::verify_signature;

/// The last entry known of an author.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// Its seq.
    pub seq: u64,
    /// Its id.
    pub id: EntryId,
}

/// Checks that `entry` is the next link after `head` (`None`: nothing known of the author).
pub fn check_link(head: Option<&ChainHead>, entry: &Entry) -> Result<(), VerifyError> {
    let expected = head.map_or(1, |h| h.seq + 1);
    if entry.seq != expected {
        return Err(VerifyError::SeqGap {
            author: entry.author,
            expected,
            got: entry.seq,
        });
    }
    let expected_prev = head.map(|h| h.id);
    if entry.prev != expected_prev {
        return Err(VerifyError::PrevMismatch {
            author: entry.author,
            seq: entry.seq,
            expected: expected_prev,
            got: entry.prev,
        });
    }
    Ok(())
}

/// Walks a sequence of entries in log order, checking every link and every signature present,
/// and at the end that each author's chain ends at a signed entry.
#[derive(Debug, Default)]
pub struct ChainChecker {
    authors: HashMap<NodeId, AuthorState>,
}

#[derive(Debug, Clone, Copy)]
struct AuthorState {
    head: ChainHead,
    signed_seq: u64,
}

impl ChainChecker {
    /// Checks the next entry in log order.
    pub fn push(&mut self, e: &SignedEntry) -> Result<(), VerifyError> {
        let state = self.authors.get(&e.entry.author);
        check_link(state.map(|s| &s.head), &e.entry)?;
        let mut signed_seq = state.map_or(0, |s| s.signed_seq);
        if let Some(sig) = &e.signature {
            verify_signature(&e.entry.author, e.entry.seq, &e.id, sig)?;
            signed_seq = e.entry.seq;
        }
        self.authors.insert(
            e.entry.author,
            AuthorState {
                head: ChainHead {
                    seq: e.entry.seq,
                    id: e.id,
                },
                signed_seq,
            },
        );
        Ok(())
    }

    /// Checks that every chain ends at a signed entry.
    pub fn finish(&self) -> Result<(), VerifyError> {
        let mut authors: Vec<_> = self.authors.iter().collect();
        authors.sort_unstable_by_key(|(a, _)| **a);
        for (author, s) in authors {
            if s.signed_seq != s.head.seq {
                return Err(VerifyError::Unsigned {
                    author: *author,
                    signed_seq: s.signed_seq,
                    last_seq: s.head.seq,
                });
            }
        }
        Ok(())
    }

    /// Number of authors seen.
    pub fn authors(&self) -> usize {
        self.authors.len()
    }

    /// The head of each author's chain: the version vector of what was pushed.
    pub fn heads(&self) -> impl Iterator<Item = (&NodeId, &ChainHead)> {
        self.authors.iter().map(|(a, s)| (a, &s.head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Op, Timestamp};
    use crate::sign::Keypair;

    fn chain(kp: &Keypair, n: u64, sign_every: u64) -> Vec<SignedEntry> {
        let mut out = Vec::new();
        let mut prev = None;
        for seq in 1..=n {
            let entry = Entry {
                author: kp.node_id(),
                seq,
                prev,
                timestamp: Timestamp(seq),
                ops: vec![Op::Put {
                    key: b"k".to_vec(),
                    value: vec![seq as u8],
                    supersedes: vec![],
                }],
            };
            let id = entry.id();
            let signature = (seq % sign_every == 0).then(|| kp.sign(&id));
            prev = Some(id);
            out.push(SignedEntry {
                entry,
                id,
                signature,
            });
        }
        out
    }

    #[test]
    fn good_chain_passes_and_unsigned_tail_is_reported() {
        let kp = Keypair::from_secret([1; 32]);
        let mut c = ChainChecker::default();
        for e in chain(&kp, 6, 3) {
            c.push(&e).unwrap();
        }
        c.finish().unwrap();
        let mut c = ChainChecker::default();
        for e in chain(&kp, 7, 3) {
            c.push(&e).unwrap();
        }
        assert!(matches!(
            c.finish(),
            Err(VerifyError::Unsigned {
                signed_seq: 6,
                last_seq: 7,
                ..
            })
        ));
    }

    #[test]
    fn gaps_bad_links_and_bad_signatures_are_refused() {
        let kp = Keypair::from_secret([1; 32]);
        let entries = chain(&kp, 3, 1);
        let mut c = ChainChecker::default();
        c.push(&entries[0]).unwrap();
        assert!(matches!(
            c.push(&entries[2]),
            Err(VerifyError::SeqGap {
                expected: 2,
                got: 3,
                ..
            })
        ));
        let mut bad = entries[1].clone();
        bad.entry.prev = Some(EntryId([0; 32]));
        assert!(matches!(
            c.push(&bad),
            Err(VerifyError::PrevMismatch { seq: 2, .. })
        ));
        let mut forged = entries[1].clone();
        forged.signature = Some(kp.sign(&EntryId([5; 32])));
        assert!(matches!(
            c.push(&forged),
            Err(VerifyError::BadSignature { seq: 2, .. })
        ));
    }
}
