//! Random mutations of valid signed entries are all rejected.
//!
//! A case is one author's chain of one to four entries, unsigned but for the last, whose record
//! payload `P` is mutated into `P' != P` (an edit that leaves `P` as it was is drawn again).
//! `P'` is *accepted* when it decodes ([`SignedEntry::decode_payload`]) and a [`ChainChecker`]
//! that has taken the chain's earlier entries takes it too and finds every chain ending at a
//! verified signature, as `kappakv verify` does. The test asserts that every `P'` is refused,
//! whatever the mutation changes: bytes anywhere, a field of the entry re-encoded canonically so
//! that only the chain checks can catch it, the signature, or the entry or signature swapped for
//! those of another valid entry. Each refusal is counted by reason.
//!
//! The per-commit run does 20,000 mutations; `KAPPAKV_MUTATIONS` sets the count and
//! `KAPPAKV_MUTATION_SEED` the seed:
//!
//! ```text
//! KAPPAKV_MUTATIONS=1000000 cargo test -p kappakv-protocol --release --test mutations -- --nocapture
//! ```

use std::collections::BTreeMap;

use kappakv_protocol::verify::ChainChecker;
use kappakv_protocol::{
    DecodeError, Entry, EntryId, Keypair, Op, Signature, SignedEntry, Timestamp, VerifyError,
};

const DEFAULT_MUTATIONS: u64 = 20_000;
const DEFAULT_SEED: u64 = 0x006b_6170_7061_6b76;

/// SplitMix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn byte(&mut self) -> u8 {
        const MARKERS: [u8; 10] = [0x00, 0x01, 0x7f, 0x80, 0x90, 0xc0, 0xc4, 0xcc, 0xdc, 0xff];
        if self.chance(4) {
            MARKERS[self.below(MARKERS.len())]
        } else {
            self.next_u64() as u8
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }

    fn id(&mut self) -> EntryId {
        let mut id = [0u8; 32];
        for b in &mut id {
            *b = self.next_u64() as u8;
        }
        EntryId(id)
    }
}

/// One chain: its earlier entries (unsigned) and the signed entry whose payload is mutated.
struct Case {
    earlier: Vec<SignedEntry>,
    target: SignedEntry,
    payload: Vec<u8>,
}

fn random_ops(rng: &mut Rng) -> Vec<Op> {
    let count = if rng.chance(8) { 2 + rng.below(20) } else { 1 };
    (0..count)
        .map(|i| {
            let mut key = format!("k{i}/").into_bytes();
            key.extend(rng.bytes(12));
            let mut supersedes: Vec<EntryId> = (0..rng.below(3)).map(|_| rng.id()).collect();
            supersedes.sort_unstable();
            supersedes.dedup();
            if rng.chance(5) {
                Op::Delete { key, supersedes }
            } else {
                let value = if rng.chance(10) {
                    rng.bytes(4096)
                } else {
                    rng.bytes(48)
                };
                Op::Put {
                    key,
                    value,
                    supersedes,
                }
            }
        })
        .collect()
}

/// Chains of random length and content, by a handful of authors.
fn cases(rng: &mut Rng, keys: &[Keypair]) -> Vec<Case> {
    (0..96)
        .map(|_| {
            let kp = &keys[rng.below(keys.len())];
            let len = 1 + rng.below(4);
            let mut chain: Vec<SignedEntry> = Vec::new();
            for seq in 1..=len as u64 {
                let entry = Entry {
                    author: kp.node_id(),
                    seq,
                    prev: chain.last().map(|e| e.id),
                    timestamp: Timestamp(rng.next_u64() >> 1),
                    ops: random_ops(rng),
                };
                let id = entry.id();
                let signature = (seq == len as u64).then(|| kp.sign(&id));
                chain.push(SignedEntry {
                    entry,
                    id,
                    signature,
                });
            }
            let target = chain.pop().expect("a chain has an entry");
            Case {
                payload: target.encode_payload(),
                earlier: chain,
                target,
            }
        })
        .collect()
}

/// Byte edits anywhere in the payload.
fn mutate_bytes(rng: &mut Rng, p: &mut Vec<u8>, donor: &[u8]) {
    for _ in 0..=rng.below(4) {
        let len = p.len();
        match rng.below(9) {
            0 => {
                let i = rng.below(len);
                p[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len);
                p[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                let b = rng.byte();
                p.insert(i, b);
            }
            3 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(8));
                p.drain(i..i + n);
            }
            4 => p.truncate(rng.below(len)),
            5 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let chunk = p[i..i + n].to_vec();
                let at = rng.below(len + 1);
                p.splice(at..at, chunk);
            }
            6 => {
                let (i, j) = (rng.below(len), rng.below(len));
                p.swap(i, j);
            }
            7 => {
                let i = rng.below(donor.len());
                let n = 1 + rng.below((donor.len() - i).min(64));
                let at = rng.below(len + 1);
                let end = (at + n).min(len);
                p.splice(at..end, donor[i..i + n].iter().copied());
            }
            _ => p.extend(rng.bytes(8)),
        }
        if p.is_empty() {
            p.push(rng.byte());
        }
    }
}

/// One field of the entry changed, re-encoded canonically under the original signature, so the
/// payload decodes and only the chain checks can refuse it.
fn mutate_field(rng: &mut Rng, entry: &mut Entry, keys: &[Keypair]) {
    if entry.ops.is_empty() {
        // An earlier edit removed the only op.
        entry.ops.push(Op::Delete {
            key: rng.bytes(4),
            supersedes: vec![],
        });
        return;
    }
    match rng.below(12) {
        0 => entry.author = keys[rng.below(keys.len())].node_id(),
        1 => entry.author.0[rng.below(32)] ^= 1 << rng.below(8),
        2 => entry.seq = entry.seq.wrapping_add(1),
        3 => entry.seq = rng.next_u64(),
        4 => match &mut entry.prev {
            Some(prev) => prev.0[rng.below(32)] ^= 1 << rng.below(8),
            None => entry.prev = Some(rng.id()),
        },
        5 => entry.prev = None,
        6 => entry.timestamp = Timestamp(entry.timestamp.0 ^ (1 << rng.below(64))),
        7 => {
            let i = rng.below(entry.ops.len());
            entry.ops.remove(i);
        }
        8 => {
            let (i, j) = (rng.below(entry.ops.len()), rng.below(entry.ops.len()));
            entry.ops.swap(i, j);
        }
        9 => {
            let i = rng.below(entry.ops.len());
            let op = &mut entry.ops[i];
            let key = op.key().to_vec();
            let supersedes = op.supersedes().to_vec();
            *op = match op {
                Op::Put { .. } => Op::Delete { key, supersedes },
                Op::Delete { .. } => Op::Put {
                    key,
                    value: vec![],
                    supersedes,
                },
            };
        }
        10 => {
            let i = rng.below(entry.ops.len());
            match &mut entry.ops[i] {
                Op::Put { value, .. } if !value.is_empty() => {
                    let j = rng.below(value.len());
                    value[j] ^= 1 << rng.below(8);
                }
                Op::Put { key, .. } | Op::Delete { key, .. } => key.push(rng.byte()),
            }
        }
        _ => {
            let i = rng.below(entry.ops.len());
            let sup = match &mut entry.ops[i] {
                Op::Put { supersedes, .. } | Op::Delete { supersedes, .. } => supersedes,
            };
            if sup.is_empty() || rng.chance(2) {
                sup.push(rng.id());
                sup.sort_unstable();
            } else {
                let j = rng.below(sup.len());
                sup.remove(j);
            }
        }
    }
}

/// The signature changed: a flipped bit, nil, another entry's signature by the same key, or the
/// same id signed by another key.
fn mutate_signature(rng: &mut Rng, se: &mut SignedEntry, donor: &SignedEntry, keys: &[Keypair]) {
    se.signature = match rng.below(4) {
        0 => se.signature.map(|mut s| {
            s.0[rng.below(Signature::LEN)] ^= 1 << rng.below(8);
            s
        }),
        1 => None,
        2 => donor.signature,
        _ => Some(keys[rng.below(keys.len())].sign(&se.id)),
    };
}

/// One mutated payload of `case`, and the kind of mutation.
fn mutation(rng: &mut Rng, case: &Case, donor: &Case, keys: &[Keypair]) -> (&'static str, Vec<u8>) {
    match rng.below(10) {
        0..=4 => {
            let mut p = case.payload.clone();
            mutate_bytes(rng, &mut p, &donor.payload);
            ("bytes", p)
        }
        5..=7 => {
            let mut se = case.target.clone();
            for _ in 0..=rng.below(2) {
                mutate_field(rng, &mut se.entry, keys);
            }
            se.id = se.entry.id();
            ("field", se.encode_payload())
        }
        8 => {
            let mut se = case.target.clone();
            mutate_signature(rng, &mut se, &donor.target, keys);
            ("signature", se.encode_payload())
        }
        _ => {
            // Another valid entry under this signature, or this entry under another's.
            let se = if rng.chance(2) {
                SignedEntry {
                    signature: case.target.signature,
                    ..donor.target.clone()
                }
            } else {
                SignedEntry {
                    signature: donor.target.signature,
                    ..case.target.clone()
                }
            };
            ("splice", se.encode_payload())
        }
    }
}

/// The verdict on one mutated payload: `Ok` when accepted, else why it was refused.
fn judge(case: &Case, payload: &[u8]) -> Result<(), &'static str> {
    let se = SignedEntry::decode_payload(payload).map_err(|e| match e {
        DecodeError::Malformed(_) => "decode: malformed",
        DecodeError::NotCanonical => "decode: not canonical",
        DecodeError::Invalid(_) => "decode: invalid entry",
        _ => "decode: other",
    })?;
    let mut checker = ChainChecker::default();
    for e in &case.earlier {
        checker.push(e).expect("the original chain links");
    }
    checker
        .push(&se)
        .and_then(|()| checker.finish())
        .map_err(|e| match e {
            VerifyError::SeqGap { .. } => "chain: seq gap",
            VerifyError::PrevMismatch { .. } => "chain: prev mismatch",
            VerifyError::BadSignature { .. } => "chain: bad signature",
            VerifyError::BadAuthorKey { .. } => "chain: author is not a key",
            VerifyError::Unsigned { .. } => "chain: ends unsigned",
            _ => "chain: other",
        })
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    })
}

#[test]
fn mutated_signed_entries_are_all_rejected() {
    let count = env_u64("KAPPAKV_MUTATIONS", DEFAULT_MUTATIONS);
    let seed = env_u64("KAPPAKV_MUTATION_SEED", DEFAULT_SEED);
    let mut rng = Rng(seed);
    let keys: Vec<Keypair> = (1..=6u8).map(|i| Keypair::from_secret([i; 32])).collect();
    let cases = cases(&mut rng, &keys);

    // The originals are accepted: the judge is not refusing everything.
    for case in &cases {
        assert_eq!(judge(case, &case.payload), Ok(()), "an original is refused");
    }

    let mut verdicts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut redrawn = 0u64;
    for n in 0..count {
        let i = rng.below(cases.len());
        let case = &cases[i];
        let donor = &cases[(i + 1 + rng.below(cases.len() - 1)) % cases.len()];
        let (kind, payload) = loop {
            let (kind, payload) = mutation(&mut rng, case, donor, &keys);
            if payload != case.payload {
                break (kind, payload);
            }
            // Swapping equal bytes, two ops with themselves...: not a mutation.
            redrawn += 1;
        };
        *by_kind.entry(kind).or_default() += 1;
        let Err(why) = judge(case, &payload) else {
            panic!(
                "mutation {n} ({kind}, seed {seed:#x}) was accepted: {}",
                data_encoding::HEXLOWER.encode(&payload)
            )
        };
        *verdicts.entry(why).or_default() += 1;
    }

    println!("{count} mutations (seed {seed:#x}), all rejected; {redrawn} no-op edits redrawn");
    println!("  by mutation: {by_kind:?}");
    for (verdict, n) in &verdicts {
        println!("  {verdict}: {n}");
    }
    // Every kind of refusal is reached, so the mix exercises each check.
    if count >= DEFAULT_MUTATIONS {
        for why in [
            "decode: malformed",
            "decode: not canonical",
            "decode: invalid entry",
            "chain: seq gap",
            "chain: prev mismatch",
            "chain: bad signature",
            "chain: ends unsigned",
        ] {
            assert!(
                verdicts.contains_key(why),
                "no mutation was refused as {why}"
            );
        }
    }
}
