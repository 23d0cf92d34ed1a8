//! The replication session, free of I/O: what one side of a peer connection knows and decides.
//! The tokio half ([`super::driver`]) feeds it received entries and asks it what to send.
//!
//! Receiving: entries arrive in the sender's log order. Per author, the session checks that
//! each entry links to the one before it in this session (`seq` + 1, `prev` = its id), buffers
//! unsigned entries (bounded) until a signed one arrives, verifies that one signature, and then
//! releases the whole run: through the hash links, the signature vouches for every entry in it.
//! Where a released run meets this node's log is decided by [`classify`] against the log's
//! chain head, because other sessions append too.
//!
//! Sending: the session tracks what the peer has (its version vector, advanced by everything
//! sent to it and received from it) so that nothing the peer has is ever sent again. It starts
//! reading the log at the first entry the peer lacks ([`resume_after`]), so resuming a peer that
//! shares a long history costs lookups, not a reread of that history.

use std::collections::{HashMap, HashSet};

use kappakv_protocol::limits::MAX_UNSIGNED_RUN_BYTES;
use kappakv_protocol::peer::{PeerMessage, entries_messages};
use kappakv_protocol::verify::ChainHead;
use kappakv_protocol::{EntryId, Lsn, NodeId, SignedEntry, VerifyError, sign::verify_signature};
use serde_bytes::ByteBuf;

/// Why a received entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The author is not on the `writers` allow-list.
    #[error("author {author} is not an allowed writer")]
    NotAllowed {
        /// The author.
        author: NodeId,
    },
    /// The entry does not link to the one before it, or its signature is bad.
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    /// The payload is not a canonical entry record: what is wrong with it.
    #[error("malformed entry: {0}")]
    Malformed(String),
    /// Too many bytes of unsigned entries waiting for a signature: more than the protocol lets
    /// one author's run hold ([`MAX_UNSIGNED_RUN_BYTES`]), or than the session buffers over all
    /// authors.
    #[error("author {author}: more than {max} bytes of unsigned entries waiting for a signature")]
    BufferFull {
        /// The author.
        author: NodeId,
        /// The bound.
        max: usize,
    },
}

impl Refusal {
    /// A short reason, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::Invalid(
                VerifyError::BadSignature { .. } | VerifyError::BadAuthorKey { .. },
            ) => "bad_signature",
            Refusal::Invalid(VerifyError::SeqGap { .. }) => "seq_gap",
            Refusal::Invalid(VerifyError::PrevMismatch { .. }) => "bad_prev",
            Refusal::Invalid(_) => "invalid",
            Refusal::BufferFull { .. } => "buffer_full",
            Refusal::Malformed(_) => "malformed",
        }
    }
}

/// The receiving and sending state of one session with one peer.
#[derive(Debug)]
pub struct SyncSession {
    peer: NodeId,
    /// What the peer has: author → highest seq, from its hello and everything exchanged since.
    theirs: HashMap<NodeId, u64>,
    /// Per author, the last entry released in this session.
    released: HashMap<NodeId, ChainHead>,
    /// Per author, unsigned entries waiting for a signature, in chain order, and their record
    /// payload bytes.
    pending: HashMap<NodeId, (Vec<SignedEntry>, usize)>,
    /// Bytes of entries in `pending`, over all authors, and their bound.
    pending_bytes: usize,
    pending_bytes_max: usize,
    writers: Option<HashSet<NodeId>>,
}

impl SyncSession {
    /// A session with `peer`. `pending_bytes_max` bounds the unsigned entries buffered, over all
    /// authors (at least [`MAX_UNSIGNED_RUN_BYTES`]: an honest peer's log has at most one
    /// author's run open at a time, of at most that many bytes); `writers`, when given, is the
    /// allow-list of authors accepted.
    pub fn new(peer: NodeId, pending_bytes_max: usize, writers: Option<HashSet<NodeId>>) -> Self {
        assert!(pending_bytes_max >= MAX_UNSIGNED_RUN_BYTES);
        Self {
            peer,
            theirs: HashMap::new(),
            released: HashMap::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            pending_bytes_max,
            writers,
        }
    }

    /// The peer.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Takes in the peer's version vector from its hello.
    pub fn on_hello(&mut self, version_vector: &[(NodeId, u64)]) {
        for (author, seq) in version_vector {
            let have = self.theirs.entry(*author).or_insert(0);
            *have = (*have).max(*seq);
        }
    }

    /// What the peer is known to have of `author`.
    pub fn theirs(&self, author: &NodeId) -> u64 {
        self.theirs.get(author).copied().unwrap_or(0)
    }

    /// The peer's known version vector.
    pub fn their_version_vector(&self) -> &HashMap<NodeId, u64> {
        &self.theirs
    }

    /// Whether to send `e`, an entry of this node's log, to the peer; records it as sent.
    pub fn should_send(&mut self, e: &SignedEntry) -> bool {
        let have = self.theirs.entry(e.entry.author).or_insert(0);
        if e.entry.seq <= *have {
            return false;
        }
        *have = e.entry.seq;
        true
    }

    /// Takes in one received entry, decoded from a record payload of `payload_len` bytes.
    /// Returns a run ready for [`classify`] once a verified signature covers it, `Ok(None)`
    /// while it waits for one. Nothing is learnt from an entry, not even that the peer has it,
    /// until a verified signature covers it.
    pub fn receive(
        &mut self,
        e: SignedEntry,
        payload_len: usize,
    ) -> Result<Option<Vec<SignedEntry>>, Refusal> {
        let author = e.entry.author;
        if let Some(w) = &self.writers
            && !w.contains(&author)
        {
            return Err(Refusal::NotAllowed { author });
        }
        let tail = self
            .pending
            .get(&author)
            .and_then(|(p, _)| p.last())
            .map(|p| ChainHead {
                seq: p.entry.seq,
                id: p.id,
            })
            .or_else(|| self.released.get(&author).copied());
        match tail {
            // An entry at or before what this session already has of the author: an honest peer
            // never sends one (it sends each entry once, in log order). It is a repeat or a
            // second entry for an (author, seq), an equivocation, which only the log can tell:
            // the author's run starts over from it (dropping what waited unsigned, which was
            // never appended) and [`classify`] decides once a signature covers it.
            Some(tail) if e.entry.seq <= tail.seq => {
                self.take_pending(&author);
                self.released.remove(&author);
            }
            // An entry past the next one: the peer skipped entries it learned, mid-session,
            // that this node has (this node sent them to it), so its stream of an author may
            // jump forward. A new run starts here. What waited unsigned is older than what was
            // skipped, so the log already holds it; [`classify`] checks where the new run meets
            // the log.
            Some(tail) if e.entry.seq > tail.seq + 1 => {
                self.take_pending(&author);
            }
            Some(tail) => kappakv_protocol::verify::check_link(Some(&tail), &e.entry)?,
            None => {}
        }
        let Some(sig) = &e.signature else {
            let run_bytes = self.pending.get(&author).map_or(0, |(_, b)| *b);
            let max = if run_bytes + payload_len > MAX_UNSIGNED_RUN_BYTES {
                MAX_UNSIGNED_RUN_BYTES
            } else if self.pending_bytes + payload_len > self.pending_bytes_max {
                self.pending_bytes_max
            } else {
                let (run, bytes) = self.pending.entry(author).or_default();
                run.push(e);
                *bytes += payload_len;
                self.pending_bytes += payload_len;
                return Ok(None);
            };
            self.take_pending(&author);
            return Err(Refusal::BufferFull { author, max });
        };
        if let Err(err) = verify_signature(&author, e.entry.seq, &e.id, sig) {
            // The run cannot be trusted; later entries of it will not link either.
            self.take_pending(&author);
            return Err(err.into());
        }
        let mut run = self.take_pending(&author);
        self.released.insert(
            author,
            ChainHead {
                seq: e.entry.seq,
                id: e.id,
            },
        );
        // The peer has what it sends: never send it back.
        let have = self.theirs.entry(author).or_insert(0);
        *have = (*have).max(e.entry.seq);
        run.push(e);
        Ok(Some(run))
    }

    /// Removes and returns `author`'s unsigned entries.
    fn take_pending(&mut self, author: &NodeId) -> Vec<SignedEntry> {
        let (run, bytes) = self.pending.remove(author).unwrap_or_default();
        self.pending_bytes -= bytes;
        run
    }

    /// Takes in one received frame of entries (record payloads, in the sender's log order).
    /// Returns the runs verified signatures released, in the order released ([`Runs`]), and
    /// what was refused.
    pub fn on_entries(&mut self, payloads: &[ByteBuf]) -> Incoming {
        let mut incoming = Incoming::default();
        let mut runs = Runs::default();
        for payload in payloads {
            let entry = match SignedEntry::decode_payload(payload) {
                Ok(e) => e,
                Err(e) => {
                    incoming.refused.push(Refusal::Malformed(e.to_string()));
                    continue;
                }
            };
            incoming.authors.insert(entry.entry.author);
            match self.receive(entry, payload.len()) {
                Ok(None) => {}
                Ok(Some(run)) => runs.push(run),
                Err(refusal) => incoming.refused.push(refusal),
            }
        }
        incoming.runs = runs.take();
        incoming
    }

    /// The messages that carry the entries of `entries` (this node's log, in order) that the
    /// peer lacks, each fitting a frame ([`entries_messages`]); records them as sent.
    pub fn outgoing(&mut self, entries: &[SignedEntry]) -> Outgoing {
        let mut out = Outgoing::default();
        let mut payloads = Vec::new();
        for e in entries {
            if self.should_send(e) {
                out.entries += 1;
                out.authors.insert(e.entry.author);
                payloads.push(e.encode_payload());
            }
        }
        out.frames = entries_messages(payloads);
        out
    }

    /// Unsigned entries buffered, over all authors.
    pub fn pending_len(&self) -> usize {
        self.pending.values().map(|(run, _)| run.len()).sum()
    }
}

/// Where a session starts reading this node's log for a peer: the LSN after which it reads, so
/// that the first entry read is the first one the peer lacks.
///
/// `ours` is this node's version vector and `lsn_of(author, seq)` the LSN of an entry, both
/// describing the log up to `end`; `theirs` is what the peer has. The entries at or below `end`
/// that the peer lacks are `(a, s)` with `theirs[a] < s <= ours[a]`, and the log holds an
/// author's entries in seq order (an entry is appended only after its `prev`), so the first of
/// them is at the lowest `lsn_of(a, theirs[a] + 1)`. With none, the session starts at `end`
/// and sends only what comes after. Lookups are asked once per author the peer lags on. When
/// one finds nothing, or an LSN past `end`, the lookups do not describe the log: the session
/// starts at 0, which costs a reread but skips nothing (the sender still filters every entry
/// against what the peer has).
pub fn resume_after<E, S: std::hash::BuildHasher>(
    end: Lsn,
    ours: &[(NodeId, u64)],
    theirs: &HashMap<NodeId, u64, S>,
    mut lsn_of: impl FnMut(&NodeId, u64) -> Result<Option<Lsn>, E>,
) -> Result<Lsn, E> {
    let mut after = end;
    for (author, ours_seq) in ours {
        let theirs_seq = theirs.get(author).copied().unwrap_or(0);
        if *ours_seq <= theirs_seq {
            continue;
        }
        match lsn_of(author, theirs_seq + 1)? {
            Some(lsn) if (1..=end).contains(&lsn) => after = after.min(lsn - 1),
            _ => return Ok(0),
        }
    }
    Ok(after)
}

/// What a received frame of entries brought ([`SyncSession::on_entries`]).
#[derive(Debug, Default)]
pub struct Incoming {
    /// Runs a verified signature covers, ready for [`plan`], in the order released.
    pub runs: Vec<Vec<SignedEntry>>,
    /// Entries refused, with why.
    pub refused: Vec<Refusal>,
    /// Authors of the entries that decoded.
    pub authors: HashSet<NodeId>,
}

/// What to send for a chunk of the log ([`SyncSession::outgoing`]).
#[derive(Debug, Default)]
pub struct Outgoing {
    /// `Entries` messages, in order.
    pub frames: Vec<PeerMessage>,
    /// Entries in them.
    pub entries: u64,
    /// Their authors.
    pub authors: HashSet<NodeId>,
}

/// What to do with the released runs of one received frame ([`plan`]).
#[derive(Debug, Default)]
pub struct Plan {
    /// The entries that extend the log, in order: one append.
    pub append: Vec<SignedEntry>,
    /// The runs refused (equivocations and gaps), with why.
    pub refused: Vec<(Vec<SignedEntry>, Classified)>,
    /// Entries of the runs the log already has.
    pub present: u64,
}

/// Classifies `runs`, in order, each against the chain heads the runs before it leave, starting
/// from `head_of` (the log's durable heads). `contains(author, seq, id)` says whether the log
/// holds entry `id` at (`author`, `seq`); it is asked only about a run that ends below its
/// author's head, so a caller may answer from a view that has caught up with the durable log,
/// and may answer an error (such as "not looked up yet") to be asked again later.
pub fn plan<E>(
    runs: &[Vec<SignedEntry>],
    mut head_of: impl FnMut(&NodeId) -> Option<ChainHead>,
    mut contains: impl FnMut(&NodeId, u64, &EntryId) -> Result<bool, E>,
) -> Result<Plan, E> {
    let mut plan = Plan::default();
    // Heads as the planned appends leave them, and the ids planned.
    let mut heads: HashMap<NodeId, Option<ChainHead>> = HashMap::new();
    let mut planned: HashSet<EntryId> = HashSet::new();
    for run in runs {
        let Some(last) = run.last() else {
            continue;
        };
        let author = last.entry.author;
        let head = *heads.entry(author).or_insert_with(|| head_of(&author));
        let known = last.entry.seq < head.map_or(0, |h| h.seq)
            && (planned.contains(&last.id) || contains(&author, last.entry.seq, &last.id)?);
        match classify(run.clone(), head, |_| known) {
            Classified::Append(entries) => {
                plan.present += (run.len() - entries.len()) as u64;
                let tail = entries.last().expect("an append is not empty");
                heads.insert(
                    author,
                    Some(ChainHead {
                        seq: tail.entry.seq,
                        id: tail.id,
                    }),
                );
                planned.extend(entries.iter().map(|e| e.id));
                plan.append.extend(entries);
            }
            Classified::Duplicate => plan.present += run.len() as u64,
            refused => plan.refused.push((run.clone(), refused)),
        }
    }
    Ok(plan)
}

/// Released runs gathered for appending together, in the order they were released: the order
/// of the peer's log, so this node's log stays causal (an entry that supersedes another is
/// never appended before it). A run that continues the run released just before it (same
/// author, the next seq, linked by `prev`) is joined to it. Every group commit of a lightly
/// loaded node is a signed run of one entry, so a catch-up appends all the runs of a received
/// frame together rather than one append, and one fsync, per run.
#[derive(Debug, Default)]
pub struct Runs {
    runs: Vec<Vec<SignedEntry>>,
}

impl Runs {
    /// Adds a run released by [`SyncSession::receive`].
    pub fn push(&mut self, run: Vec<SignedEntry>) {
        let Some(first) = run.first() else {
            return;
        };
        if let Some(last) = self.runs.last_mut()
            && let Some(tail) = last.last()
            && tail.entry.author == first.entry.author
            && first.entry.seq == tail.entry.seq + 1
            && first.entry.prev == Some(tail.id)
        {
            last.extend(run);
            return;
        }
        self.runs.push(run);
    }

    /// The gathered runs, each one author's linked chain ending at a signed entry, in the order
    /// they were released.
    pub fn take(&mut self) -> Vec<Vec<SignedEntry>> {
        std::mem::take(&mut self.runs)
    }
}

/// Where a verified run meets this node's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// These entries (a suffix of the run) extend the log.
    Append(Vec<SignedEntry>),
    /// The log already has the whole run.
    Duplicate,
    /// The run contradicts the log: two different entries for one (author, seq).
    Equivocation {
        /// The author.
        author: NodeId,
        /// The seq.
        seq: u64,
        /// The entry the log has, where known.
        existing: Option<EntryId>,
        /// The entry received.
        other: EntryId,
    },
    /// The run starts after a gap in what the log has of its author.
    Gap {
        /// The author.
        author: NodeId,
        /// The next seq the log expects.
        expected: u64,
        /// The run's first seq.
        got: u64,
    },
}

/// Classifies a verified, internally linked run of one author against the log's head for that
/// author. `contains(id)` says whether the log holds an entry; it is asked only about an entry
/// older than the head, so a caller may answer from an index that has caught up with the log.
pub fn classify(
    run: Vec<SignedEntry>,
    head: Option<ChainHead>,
    contains: impl FnOnce(&EntryId) -> bool,
) -> Classified {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Classified::Duplicate;
    };
    let author = first.entry.author;
    let head_seq = head.map_or(0, |h| h.seq);
    if first.entry.seq > head_seq + 1 {
        return Classified::Gap {
            author,
            expected: head_seq + 1,
            got: first.entry.seq,
        };
    }
    if last.entry.seq < head_seq {
        // Through the hash links, holding the last entry means holding the whole run.
        return if contains(&last.id) {
            Classified::Duplicate
        } else {
            Classified::Equivocation {
                author,
                seq: last.entry.seq,
                existing: None,
                other: last.id,
            }
        };
    }
    // The run reaches the head or beyond: it must agree with the head where they overlap.
    let head_id = head.map(|h| h.id);
    let skip = usize::try_from(head_seq + 1 - first.entry.seq).expect("run length fits usize");
    if skip > 0 {
        let at_head = &run[skip - 1];
        if Some(at_head.id) != head_id {
            return Classified::Equivocation {
                author,
                seq: head_seq,
                existing: head_id,
                other: at_head.id,
            };
        }
    } else if first.entry.prev != head_id {
        return Classified::Equivocation {
            author,
            seq: head_seq,
            existing: head_id,
            other: first.entry.prev.unwrap_or(first.id),
        };
    }
    let rest: Vec<SignedEntry> = run.into_iter().skip(skip).collect();
    if rest.is_empty() {
        Classified::Duplicate
    } else {
        Classified::Append(rest)
    }
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::{Entry, Keypair, Op, Timestamp};

    use super::*;

    fn signed(kp: &Keypair, seq: u64, prev: Option<EntryId>, value: &[u8]) -> SignedEntry {
        let entry = Entry {
            author: kp.node_id(),
            seq,
            prev,
            timestamp: Timestamp(seq),
            ops: vec![Op::Put {
                key: b"k".to_vec(),
                value: value.to_vec(),
                supersedes: vec![],
            }],
        };
        let id = entry.id();
        SignedEntry {
            id,
            entry,
            signature: Some(kp.sign(&id)),
        }
    }

    /// A log of interleaved authors: `(lsn, author, seq)` for LSNs `1..=len`.
    fn interleaved(len: u64, authors: u8, seed: u64) -> Vec<(Lsn, NodeId, u64)> {
        let mut x = seed;
        let mut seqs = vec![0u64; usize::from(authors)];
        (1..=len)
            .map(|lsn| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let a = ((x >> 33) % u64::from(authors)) as usize;
                seqs[a] += 1;
                (lsn, NodeId([a as u8 + 1; 32]), seqs[a])
            })
            .collect()
    }

    fn vv(log: &[(Lsn, NodeId, u64)]) -> Vec<(NodeId, u64)> {
        let mut vv: HashMap<NodeId, u64> = HashMap::new();
        for (_, a, s) in log {
            vv.insert(*a, *s);
        }
        let mut vv: Vec<_> = vv.into_iter().collect();
        vv.sort();
        vv
    }

    fn lookup(
        log: &[(Lsn, NodeId, u64)],
    ) -> impl FnMut(&NodeId, u64) -> Result<Option<Lsn>, ()> + '_ {
        |author, seq| {
            Ok(log
                .iter()
                .find(|(_, a, s)| a == author && *s == seq)
                .map(|(l, _, _)| *l))
        }
    }

    #[test]
    fn a_peer_holding_everything_resumes_at_the_end() {
        let log = interleaved(100, 3, 1);
        let theirs: HashMap<_, _> = vv(&log).into_iter().collect();
        let mut asked = 0;
        let after = resume_after(100, &vv(&log), &theirs, |a, s| {
            asked += 1;
            lookup(&log)(a, s)
        });
        assert_eq!(after, Ok(100));
        assert_eq!(
            asked, 0,
            "nothing to look up when the peer lags on no author"
        );
        // Ahead of this node on every author, or holding authors this node lacks: the same.
        let mut ahead = theirs.clone();
        for s in ahead.values_mut() {
            *s += 5;
        }
        ahead.insert(NodeId([9; 32]), 3);
        assert_eq!(resume_after(100, &vv(&log), &ahead, lookup(&log)), Ok(100));
    }

    #[test]
    fn a_peer_resumes_at_the_first_entry_it_lacks_over_every_author() {
        let a = NodeId([1; 32]);
        let b = NodeId([2; 32]);
        // LSN:   1    2    3    4    5    6    7
        let log = vec![
            (1, a, 1),
            (2, b, 1),
            (3, a, 2),
            (4, b, 2),
            (5, a, 3),
            (6, b, 3),
            (7, a, 4),
        ];
        let ours = vv(&log);
        let theirs = |va, vb| HashMap::from([(a, va), (b, vb)]);
        assert_eq!(resume_after(7, &ours, &theirs(2, 3), lookup(&log)), Ok(4));
        assert_eq!(resume_after(7, &ours, &theirs(4, 1), lookup(&log)), Ok(3));
        assert_eq!(resume_after(7, &ours, &theirs(3, 1), lookup(&log)), Ok(3));
        assert_eq!(resume_after(7, &ours, &theirs(3, 3), lookup(&log)), Ok(6));
        // An author the peer lacks entirely starts at its first entry.
        assert_eq!(
            resume_after(7, &ours, &HashMap::from([(a, 4)]), lookup(&log)),
            Ok(1)
        );
        assert_eq!(resume_after(7, &ours, &HashMap::new(), lookup(&log)), Ok(0));
    }

    #[test]
    fn lookups_that_do_not_describe_the_log_start_from_the_beginning() {
        let log = interleaved(50, 2, 7);
        let ours = vv(&log);
        let theirs = HashMap::from([(NodeId([1; 32]), 3)]);
        let missing = |_: &NodeId, _| Ok::<_, ()>(None);
        assert_eq!(resume_after(50, &ours, &theirs, missing), Ok(0));
        let past_end = |_: &NodeId, _| Ok::<_, ()>(Some(51));
        assert_eq!(resume_after(50, &ours, &theirs, past_end), Ok(0));
        let zero = |_: &NodeId, _| Ok::<_, ()>(Some(0));
        assert_eq!(resume_after(50, &ours, &theirs, zero), Ok(0));
        let failing = |_: &NodeId, _| Err::<Option<Lsn>, _>("view unreadable");
        assert_eq!(
            resume_after(50, &ours, &theirs, failing),
            Err("view unreadable")
        );
    }

    #[test]
    fn the_start_is_just_before_the_first_entry_the_peer_lacks_for_any_peer() {
        for seed in 0..200 {
            let log = interleaved(200, 4, seed);
            // A peer holding a prefix of each author's chain, cut at random.
            let mut x = seed.wrapping_add(12345);
            let theirs: HashMap<NodeId, u64> = vv(&log)
                .into_iter()
                .filter_map(|(a, s)| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let cut = (x >> 33) % (s + 2);
                    (cut > 0).then_some((a, cut.min(s)))
                })
                .collect();
            let first_lacked = log
                .iter()
                .find(|(_, a, s)| *s > theirs.get(a).copied().unwrap_or(0))
                .map_or(200, |(l, _, _)| l - 1);
            assert_eq!(
                resume_after(200, &vv(&log), &theirs, lookup(&log)),
                Ok(first_lacked),
                "seed {seed}"
            );
        }
    }

    fn receive(
        session: &mut SyncSession,
        e: &SignedEntry,
    ) -> Result<Option<Vec<SignedEntry>>, Refusal> {
        session.receive(e.clone(), e.encode_payload().len())
    }

    #[test]
    fn a_second_entry_for_a_seq_already_released_is_classified_as_an_equivocation() {
        let kp = Keypair::from_secret([5; 32]);
        let peer = Keypair::from_secret([6; 32]).node_id();
        let mut session = SyncSession::new(peer, MAX_UNSIGNED_RUN_BYTES, None);
        let e1 = signed(&kp, 1, None, b"1");
        let e2 = signed(&kp, 2, Some(e1.id), b"2");
        let e3 = signed(&kp, 3, Some(e2.id), b"3");
        for e in [&e1, &e2, &e3] {
            assert_eq!(receive(&mut session, e), Ok(Some(vec![e.clone()])));
        }
        let head = Some(ChainHead { seq: 3, id: e3.id });

        // Below the session's tail: a run of its own, which the log tells apart.
        let fork2 = signed(&kp, 2, Some(e1.id), b"forked");
        let run = receive(&mut session, &fork2)
            .expect("verifies")
            .expect("signed");
        assert_eq!(
            classify(run, head, |_| false),
            Classified::Equivocation {
                author: kp.node_id(),
                seq: 2,
                existing: None,
                other: fork2.id,
            }
        );
        // A repeat of what the log has is a duplicate.
        let run = receive(&mut session, &e2)
            .expect("verifies")
            .expect("signed");
        assert_eq!(classify(run, head, |_| true), Classified::Duplicate);
    }

    #[test]
    fn runs_are_kept_in_release_order_and_joined_only_to_the_run_just_before() {
        let (a, b) = (Keypair::from_secret([5; 32]), Keypair::from_secret([7; 32]));
        let a1 = signed(&a, 1, None, b"1");
        let a2 = signed(&a, 2, Some(a1.id), b"2");
        let a3 = signed(&a, 3, Some(a2.id), b"3");
        let b1 = signed(&b, 1, None, b"1");
        let b2 = signed(&b, 2, Some(b1.id), b"2");
        let fork4 = signed(&a, 4, Some(a1.id), b"not linked to a3");
        let mut runs = Runs::default();
        for run in [
            vec![a1.clone()],
            vec![a2.clone()],
            vec![b1.clone()],
            // Continues a2, but b1 came in between: joining it to a1..a2 would place it before
            // b1, which it may supersede.
            vec![a3.clone()],
            vec![b2.clone()],
            vec![fork4.clone()],
            // Starts over below the tail: kept apart, for classify to judge.
            vec![a2.clone()],
        ] {
            runs.push(run);
        }
        assert_eq!(
            runs.take(),
            vec![
                vec![a1, a2.clone()],
                vec![b1],
                vec![a3],
                vec![b2],
                vec![fork4],
                vec![a2]
            ]
        );
        assert!(runs.take().is_empty());
    }

    #[test]
    fn an_unsigned_run_may_hold_the_protocol_limit_whatever_the_session_settings() {
        let kp = Keypair::from_secret([5; 32]);
        let peer = Keypair::from_secret([6; 32]).node_id();
        let mut session = SyncSession::new(peer, 2 * MAX_UNSIGNED_RUN_BYTES, None);
        // Entries of 1 MiB values up to the limit wait; the signed one releases them all.
        let mut prev = None;
        let mut bytes = 0;
        let mut seq = 0;
        loop {
            seq += 1;
            let mut e = signed(&kp, seq, prev, &vec![7u8; 1 << 20]);
            e.signature = None;
            let len = e.encode_payload().len();
            if bytes + len > MAX_UNSIGNED_RUN_BYTES {
                break;
            }
            bytes += len;
            prev = Some(e.id);
            assert_eq!(receive(&mut session, &e), Ok(None));
        }
        let last = signed(&kp, seq, prev, b"signed");
        let run = receive(&mut session, &last)
            .expect("verifies")
            .expect("signed");
        assert_eq!(run.len() as u64, seq);
        assert_eq!(session.pending_len(), 0);

        // One more unsigned byte than the limit is refused, and what waited is dropped.
        let mut prev = Some(last.id);
        let mut refused = None;
        for seq in seq + 1..seq + 40 {
            let mut e = signed(&kp, seq, prev, &vec![7u8; 1 << 20]);
            e.signature = None;
            prev = Some(e.id);
            if let Err(r) = receive(&mut session, &e) {
                refused = Some(r);
                break;
            }
        }
        assert_eq!(
            refused,
            Some(Refusal::BufferFull {
                author: kp.node_id(),
                max: MAX_UNSIGNED_RUN_BYTES
            })
        );
        assert_eq!(session.pending_len(), 0);
    }

    #[test]
    fn entries_no_signature_covers_teach_the_session_nothing() {
        let peer = Keypair::from_secret([6; 32]).node_id();
        let mut session = SyncSession::new(peer, MAX_UNSIGNED_RUN_BYTES, None);
        for author in 0..200u8 {
            let kp = Keypair::from_secret([author; 32]);
            // Signed by someone else: refused.
            let mut forged = signed(&kp, 1, None, b"x");
            forged.signature = Some(Keypair::from_secret([255; 32]).sign(&forged.id));
            assert!(receive(&mut session, &forged).is_err());
            // Never signed: waits, counted only in the bounded buffer.
            let mut unsigned = signed(&kp, 7, None, b"y");
            unsigned.signature = None;
            assert_eq!(receive(&mut session, &unsigned), Ok(None));
        }
        assert!(session.their_version_vector().is_empty());
        assert!(session.released.is_empty());
        assert_eq!(session.pending_len(), 200);
        // A frame of them is taken in the same way.
        let kp = Keypair::from_secret([9; 32]);
        let mut e = signed(&kp, 1, None, b"z");
        e.signature = Some(Keypair::from_secret([255; 32]).sign(&e.id));
        let incoming =
            session.on_entries(&[ByteBuf::from(e.encode_payload()), ByteBuf::from(vec![1, 2])]);
        assert!(incoming.runs.is_empty());
        assert_eq!(
            incoming
                .refused
                .iter()
                .map(Refusal::reason)
                .collect::<Vec<_>>(),
            ["bad_signature", "malformed"]
        );
        assert!(session.their_version_vector().is_empty());
    }
}
