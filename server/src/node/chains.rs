//! Building a batch, free of I/O: turning the commands of one group commit into the entries to
//! append. The writer thread ([`super::writer`]) appends what this builds and answers each
//! command once it is durable; the replication simulation (`server/tests/sync_sim.rs`) drives
//! it without a thread or files.
//!
//! Local writes become entries of this node's chain (seq, `prev`, an HLC timestamp, and the
//! versions a plain write supersedes, from the resolver); remote runs must extend their
//! authors' chains and end signed. Signatures: a local entry is signed before the next would
//! take its unsigned run past [`MAX_UNSIGNED_RUN_BYTES`], an open local run is signed before a
//! remote run joins the batch, and the batch's last local entry is signed, so at any point of
//! the log at most one author's run is open and every chain ends signed after every batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kappakv_protocol::limits::{
    MAX_ENTRY_BYTES, MAX_OPS_PER_ENTRY, MAX_UNSIGNED_RUN_BYTES, UNSIGNED_PAYLOAD_OVERHEAD,
};
use kappakv_protocol::verify::{ChainHead, check_link};
use kappakv_protocol::{
    Entry, EntryId, HlcClock, InvalidEntry, Keypair, Lsn, NodeId, Op, SignedEntry, Timestamp,
    WriteOp,
};

use super::writer::{SupersedeResolver, WriteError};

/// How far ahead of this node's wall clock a received timestamp may be and still move its
/// clock forward.
const CLOCK_SKEW_MAX_MS: u64 = 10 * 60 * 1000;

/// One command of a batch, with what its caller needs to be answered (`L` for a local write,
/// `R` for a remote append).
#[derive(Debug)]
pub enum BatchCommand<L, R> {
    /// A local write of `ops`, as one entry.
    Local {
        /// The ops.
        ops: Vec<WriteOp>,
        /// Only if each op's `supersedes` is its key's current versions.
        conditional: bool,
        /// Who to answer.
        reply: L,
    },
    /// Entries of other authors, already verified, in order.
    Remote {
        /// The entries.
        entries: Vec<SignedEntry>,
        /// Who to answer.
        reply: R,
    },
}

/// What became of a command while its batch was built.
#[derive(Debug)]
pub enum Built<L, R> {
    /// A local write placed in the batch: answer it once the batch is durable.
    Local {
        /// Who to answer.
        reply: L,
        /// The LSN of its record.
        lsn: Lsn,
        /// The id of its entry.
        id: EntryId,
    },
    /// A remote append placed in the batch: answer it once the batch is durable.
    Remote {
        /// Who to answer.
        reply: R,
        /// The LSN of its last record.
        lsn: Lsn,
    },
    /// A local write refused: nothing of it is in the batch.
    LocalRefused {
        /// Who to answer.
        reply: L,
        /// Why.
        error: WriteError,
    },
    /// A remote append refused: nothing of it is in the batch.
    RemoteRefused {
        /// Who to answer.
        reply: R,
        /// Why.
        error: WriteError,
    },
}

/// How far this node's own chain must reach before it writes under its own id: nothing (0),
/// a seq a peer holds, or [`OwnChain::UNKNOWN`] until a peer says.
#[derive(Debug, Default)]
pub(crate) struct OwnChain {
    pub(crate) required: AtomicU64,
}

impl OwnChain {
    pub(crate) const UNKNOWN: u64 = u64::MAX;

    /// The seq the chain must reach, `None` until a peer has said.
    pub(crate) fn required(&self) -> Option<u64> {
        Some(self.required.load(Ordering::Acquire)).filter(|&s| s != Self::UNKNOWN)
    }
}

/// Every author's chain head, and the batch being built on them.
pub struct Chains {
    /// Each author's chain head, including entries of the batch being built.
    heads: HashMap<NodeId, ChainHead>,
    keypair: Keypair,
    node_id: NodeId,
    clock: HlcClock,
    own_chain: Arc<OwnChain>,
    /// The batch being built.
    entries: Vec<SignedEntry>,
    /// Each author's head before each entry of the batch changed it, to undo the batch.
    undo: Vec<(NodeId, Option<ChainHead>)>,
}

impl std::fmt::Debug for Chains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chains")
            .field("node_id", &self.node_id)
            .field("authors", &self.heads.len())
            .field("batch", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Chains {
    /// Chains whose heads are `heads` (the log's version vector), for the node whose key is
    /// `keypair`; its clock starts past `seen`, the latest timestamp in the log, unless that is
    /// further ahead of `wall_ms` than any honest clock could be.
    pub fn new(
        heads: HashMap<NodeId, ChainHead>,
        keypair: Keypair,
        seen: Timestamp,
        wall_ms: u64,
    ) -> Self {
        let mut clock = HlcClock::default();
        observe_bounded(&mut clock, seen, wall_ms);
        Self {
            heads,
            node_id: keypair.node_id(),
            keypair,
            clock,
            own_chain: Arc::new(OwnChain::default()),
            entries: Vec::new(),
            undo: Vec::new(),
        }
    }

    /// The gate on local writes, shared with the writer's handle.
    pub(crate) fn own_chain(&self) -> Arc<OwnChain> {
        self.own_chain.clone()
    }

    /// Each author's chain head, the batch being built included.
    pub fn heads(&self) -> &HashMap<NodeId, ChainHead> {
        &self.heads
    }

    /// The batch built by the last [`build`](Self::build), in order.
    pub fn entries(&self) -> &[SignedEntry] {
        &self.entries
    }

    /// Builds the batch of `commands` on `base`, the LSN of the last record before it. Plain
    /// writes are resolved with `resolver`, which is told of every entry placed (so a later
    /// write of the batch sees an earlier one); local entries are stamped with the clock at
    /// `wall_ms`. Returns what became of each command, in order; the entries are
    /// [`entries`](Self::entries). Either the batch reaches the log, or [`discard`](Self::discard)
    /// forgets it.
    pub fn build<L, R>(
        &mut self,
        base: Lsn,
        commands: impl IntoIterator<Item = BatchCommand<L, R>>,
        resolver: &mut dyn SupersedeResolver,
        wall_ms: u64,
    ) -> Vec<Built<L, R>> {
        self.entries.clear();
        self.undo.clear();
        let mut built = Vec::new();
        // The local run not yet signed: the index of its last entry, and its payload bytes.
        let mut open_local: Option<(usize, usize)> = None;
        for cmd in commands {
            match cmd {
                BatchCommand::Local {
                    ops,
                    conditional,
                    reply,
                } => match self.build_local(ops, conditional, resolver, wall_ms) {
                    Ok((entry, canonical_len)) => {
                        let bytes = canonical_len + UNSIGNED_PAYLOAD_OVERHEAD;
                        let mut run_bytes = bytes;
                        if let Some((i, open)) = open_local {
                            if open + bytes > MAX_UNSIGNED_RUN_BYTES {
                                self.sign(i);
                            } else {
                                run_bytes += open;
                            }
                        }
                        let lsn = self.push(base, entry, resolver, true);
                        let i = self.entries.len() - 1;
                        open_local = Some((i, run_bytes));
                        built.push(Built::Local {
                            reply,
                            lsn,
                            id: self.entries[i].id,
                        });
                    }
                    Err(error) => built.push(Built::LocalRefused { reply, error }),
                },
                BatchCommand::Remote { entries, reply } => match self.check_remote(&entries) {
                    Ok(()) => {
                        // Only one author's run is ever open at a point of the log: a receiver
                        // then waits for at most one run's signature at a time.
                        if let Some((i, _)) = open_local.take() {
                            self.sign(i);
                        }
                        for entry in entries {
                            observe_bounded(&mut self.clock, entry.entry.timestamp, wall_ms);
                            self.push(base, entry, resolver, false);
                        }
                        built.push(Built::Remote {
                            reply,
                            lsn: base + self.entries.len() as u64,
                        });
                    }
                    Err(error) => built.push(Built::RemoteRefused { reply, error }),
                },
            }
        }
        if let Some((i, _)) = open_local {
            self.sign(i);
        }
        built
    }

    /// Forgets the last batch built, which did not reach the log: each author's head goes back
    /// to where the log has it. The resolver is the caller's to tell.
    pub fn discard(&mut self) {
        for (author, head) in self.undo.drain(..).rev() {
            match head {
                Some(h) => self.heads.insert(author, h),
                None => self.heads.remove(&author),
            };
        }
        self.entries.clear();
    }

    /// Places `entry` in the batch: assigns its LSN, advances its author's head and tells the
    /// resolver whether it is `local`.
    fn push(
        &mut self,
        base: Lsn,
        entry: SignedEntry,
        resolver: &mut dyn SupersedeResolver,
        local: bool,
    ) -> Lsn {
        let lsn = base + self.entries.len() as u64 + 1;
        let before = self.heads.insert(
            entry.entry.author,
            ChainHead {
                seq: entry.entry.seq,
                id: entry.id,
            },
        );
        self.undo.push((entry.entry.author, before));
        resolver.appended(lsn, &entry, local);
        self.entries.push(entry);
        lsn
    }

    /// Signs the local entry at `i` of the batch, closing its run.
    fn sign(&mut self, i: usize) {
        let e = &mut self.entries[i];
        debug_assert!(e.signature.is_none() && e.entry.author == self.node_id);
        e.signature = Some(self.keypair.sign(&e.id));
    }

    /// The next local entry, carrying `writes`, and the length of its canonical encoding.
    fn build_local(
        &mut self,
        writes: Vec<WriteOp>,
        conditional: bool,
        resolver: &mut dyn SupersedeResolver,
        wall_ms: u64,
    ) -> Result<(SignedEntry, usize), WriteError> {
        if writes.is_empty() {
            return Err(InvalidEntry::NoOps.into());
        }
        let have = self.heads.get(&self.node_id).map_or(0, |h| h.seq);
        let peer_holds = self.own_chain.required();
        if peer_holds.is_none_or(|seq| have < seq) {
            return Err(WriteError::OwnChainBehind { have, peer_holds });
        }
        if writes.len() > MAX_OPS_PER_ENTRY {
            return Err(InvalidEntry::TooManyOps {
                count: writes.len(),
                max: MAX_OPS_PER_ENTRY,
            }
            .into());
        }
        let mut ops = Vec::with_capacity(writes.len());
        for w in writes {
            let mut supersedes = match w.supersedes {
                Some(ids) if conditional => condition_holds(resolver, &w.key, ids)?,
                Some(ids) => ids,
                None if conditional => return Err(WriteError::NoContext { key: w.key }),
                None => resolver.current(&w.key).map_err(WriteError::Unresolved)?,
            };
            supersedes.sort_unstable();
            supersedes.dedup();
            ops.push(match w.value {
                Some(value) => Op::Put {
                    key: w.key,
                    value,
                    supersedes,
                },
                None => Op::Delete {
                    key: w.key,
                    supersedes,
                },
            });
        }
        let head = self.heads.get(&self.node_id);
        let entry = Entry {
            author: self.node_id,
            seq: head.map_or(1, |h| h.seq + 1),
            prev: head.map(|h| h.id),
            timestamp: self.clock.now(wall_ms),
            ops,
        };
        entry.validate()?;
        let bytes = entry.to_canonical_bytes();
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(InvalidEntry::TooLarge {
                len: bytes.len(),
                max: MAX_ENTRY_BYTES,
            }
            .into());
        }
        Ok((
            SignedEntry {
                id: EntryId::of_canonical_bytes(&bytes),
                entry,
                signature: None,
            },
            bytes.len(),
        ))
    }

    /// Checks that `entries` extend the chains as they stand (batch included), and that each
    /// author's last entry among them is signed.
    fn check_remote(&self, entries: &[SignedEntry]) -> Result<(), WriteError> {
        let mut heads: HashMap<NodeId, ChainHead> = HashMap::new();
        for (index, e) in entries.iter().enumerate() {
            debug_assert_eq!(
                e.id,
                e.entry.id(),
                "a remote entry's id is the hash of its entry"
            );
            let author = e.entry.author;
            let head = heads.get(&author).or_else(|| self.heads.get(&author));
            check_link(head, &e.entry).map_err(|source| WriteError::Link { index, source })?;
            heads.insert(
                author,
                ChainHead {
                    seq: e.entry.seq,
                    id: e.id,
                },
            );
        }
        let mut seen = HashSet::new();
        for e in entries.iter().rev() {
            if seen.insert(e.entry.author) && e.signature.is_none() {
                return Err(WriteError::Unsigned {
                    author: e.entry.author,
                    seq: e.entry.seq,
                });
            }
        }
        Ok(())
    }
}

/// Takes in a timestamp seen in the log or on a received entry, unless it is further in the
/// future than any honest clock could be: a peer cannot push this node's clock to the end of
/// its range. The entry itself is still accepted; timestamps only order siblings for display.
fn observe_bounded(clock: &mut HlcClock, seen: Timestamp, wall_ms: u64) {
    if seen.millis() <= wall_ms.saturating_add(CLOCK_SKEW_MAX_MS) {
        clock.observe(seen);
    }
}

/// The versions a conditional op on `key` supersedes, if `expected` names exactly the key's
/// current versions (tombstones included), or is empty and the key has no value: then exactly
/// those current versions. Otherwise [`WriteError::Conflict`].
fn condition_holds(
    resolver: &mut dyn SupersedeResolver,
    key: &[u8],
    mut expected: Vec<EntryId>,
) -> Result<Vec<EntryId>, WriteError> {
    let current = resolver
        .current_versions(key)
        .map_err(WriteError::Unresolved)?;
    expected.sort_unstable();
    expected.dedup();
    let ids: Vec<EntryId> = current.iter().map(|(id, _)| *id).collect();
    let no_value = current.iter().all(|(_, value)| !value);
    if ids == expected || (expected.is_empty() && no_value) {
        Ok(ids)
    } else {
        Err(WriteError::Conflict {
            key: key.to_vec(),
            current: ids,
        })
    }
}
