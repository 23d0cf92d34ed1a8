//! A deterministic, seeded simulation of replication.
//!
//! Three or four nodes, each with an in-memory log, per-author chain heads, a writer queue and
//! real views (`Indexes` on redb's in-memory backend), are connected along a random topology by
//! simulated streams. Each direction of a connection is ordered and reliable while it is up, as
//! a QUIC stream is; the simulator, driven by a seeded PRNG, cuts connections (dropping what is
//! in flight), reconnects them (new sessions, hello exchange, resend from the first entry the
//! peer lacks, found in the node's log lookup view by `resume_after`), partitions the
//! nodes, restarts nodes (their writer queue and sessions are lost, their log kept, sometimes
//! their views rebuilt from it), interleaves work across connections, sends log chunks split at
//! any point (so unsigned prefixes of a run arrive before its signed end), and has nodes write
//! concurrently to a few shared keys: plain puts and deletes that supersede what the node sees,
//! and merges with a context read earlier.
//!
//! The nodes run the production code that does no I/O: the receive side takes entries one by
//! one through `SyncSession::receive`, classifies each released run with `session::plan` (as
//! `driver.rs` `ingest` does) and hands an append to the writer, waiting for its reply
//! (classifying again after a link error) before it reads on; the send side starts where
//! `resume_after` says and walks the log through `should_send`; the writer builds each batch
//! with `Chains`, as the writer thread does (local entries get seq, prev, an HLC timestamp on
//! the simulated clock and supersede what the model says is current; remote runs must extend
//! the chains and end signed; the signing rules), and the simulation appends it to an
//! in-memory log. What is simulated is only the I/O: streams, the log's storage, time.

//! After a random number of steps everything heals and runs to quiescence. Then every node
//! must hold the same entries (per author the same chain, no duplicates, every chain verifying
//! in the node's local order with `ChainChecker`), the same kv state (every key: same values
//! and context, equal to a model computed from the log), every acknowledged write, and no
//! superseded version may be current; along the way no honest peer's entry may be refused.
//!
//! `SYNC_SIM_SEEDS=N` runs seeds `0..N` (default 200); `SYNC_SIM_SEED=S` runs seed `S` alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use kappakv_indexes::{Indexes, default_views};
use kappakv_protocol::verify::ChainChecker;
use kappakv_protocol::{
    Entry, EntryId, KeyVersions, Keypair, NodeId, Op, SignedEntry, Timestamp, WriteOp,
};
use kappakv_server::node::chains::{BatchCommand, Built, Chains};
use kappakv_server::node::replication::session::{Classified, SyncSession, plan, resume_after};
use kappakv_server::node::writer::SupersedeResolver;

/// Seeds run by default.
const DEFAULT_SEEDS: u64 = 200;
/// Distinct keys written: few, so that concurrent writes conflict.
const KEYS: u64 = 4;
/// Bytes of unsigned entries a session buffers, over all authors.
const PENDING_MAX: usize = 2 * kappakv_protocol::limits::MAX_UNSIGNED_RUN_BYTES;
/// Appends of one run tried before the receive side gives up on it. `driver.rs` `ingest` tries
/// until classification settles, which every refusal brings closer; this bound only keeps a bug
/// from hanging the simulation.
const INGEST_ATTEMPTS: u32 = 1_000;
/// Most entries one send step reads from the log.
const SEND_CHUNK_MAX: u64 = 6;
/// Bound on the rounds of the final run to quiescence.
const QUIESCE_ROUNDS_MAX: usize = 10_000;

/// splitmix64: small, seedable and good enough to drive a simulation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; `n > 0`.
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next() % n
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

fn key(k: u64) -> Vec<u8> {
    format!("k{k}").into_bytes()
}

/// A local write as a client asks for it.
#[derive(Clone, Debug)]
enum LocalOp {
    /// A plain put: supersedes every version current when the writer orders it.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// A plain delete.
    Delete { key: Vec<u8> },
    /// A put superseding exactly a context read earlier (a merge of siblings).
    Merge {
        key: Vec<u8>,
        value: Vec<u8>,
        context: Vec<EntryId>,
    },
}

impl LocalOp {
    /// The write as the writer takes it.
    fn into_write(self) -> WriteOp {
        match self {
            LocalOp::Put { key, value } => WriteOp {
                key,
                value: Some(value),
                supersedes: None,
            },
            LocalOp::Delete { key } => WriteOp {
                key,
                value: None,
                supersedes: None,
            },
            LocalOp::Merge {
                key,
                value,
                context,
            } => WriteOp {
                key,
                value: Some(value),
                supersedes: Some(context),
            },
        }
    }
}

/// Who waits for a remote append: a receive side of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    link: usize,
    side: usize,
    conn: u64,
}

enum Command {
    Local(Vec<LocalOp>),
    Remote { entries: Vec<SignedEntry>, tag: Tag },
}

/// The multi-value register, as a model: current ids per key (tombstones included) and every
/// (key, id) a known entry supersedes.
#[derive(Default, Clone, PartialEq, Eq, Debug)]
struct Mvr {
    current: BTreeMap<Vec<u8>, BTreeSet<EntryId>>,
    superseded: BTreeSet<(Vec<u8>, EntryId)>,
}

/// The writer resolves plain writes from the model, which follows every entry it places.
impl SupersedeResolver for Mvr {
    fn current(&mut self, key: &[u8]) -> Result<Vec<EntryId>, String> {
        Ok(Mvr::current(self, key))
    }

    fn appended(&mut self, _lsn: u64, e: &SignedEntry, _local: bool) {
        self.apply(e);
    }

    fn discarded(&mut self, _after: u64) {
        unreachable!("the simulated log never refuses a batch");
    }
}

impl Mvr {
    fn apply(&mut self, e: &SignedEntry) {
        for op in &e.entry.ops {
            let key = op.key().to_vec();
            let current = self.current.entry(key.clone()).or_default();
            for s in op.supersedes() {
                current.remove(s);
                self.superseded.insert((key.clone(), *s));
            }
            if !self.superseded.contains(&(key, e.id)) {
                current.insert(e.id);
            }
        }
    }

    fn current(&self, key: &[u8]) -> Vec<EntryId> {
        self.current
            .get(key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

struct Node {
    keypair: Keypair,
    id: NodeId,
    /// The log, in local order; every entry here is durable.
    log: Vec<SignedEntry>,
    ids: BTreeSet<EntryId>,
    /// The writer's chains (each author's head in the log) and its batch building: the
    /// production code, without the thread and the files.
    chains: Chains,
    /// The kv state as a model, which also resolves the writer's plain writes.
    model: Mvr,
    indexes: Indexes,
    /// The writer's queue; lost on restart.
    queue: VecDeque<Command>,
    /// The context of the last get of each key, for merges.
    read_contexts: BTreeMap<Vec<u8>, Vec<EntryId>>,
    writes: u64,
}

impl Node {
    fn new(secret: [u8; 32]) -> Self {
        let keypair = Keypair::from_secret(secret);
        let (indexes, _) = Indexes::open_in_memory(default_views()).expect("open views");
        Self {
            id: keypair.node_id(),
            chains: Chains::new(HashMap::new(), keypair.clone(), Timestamp(0), 0),
            keypair,
            log: Vec::new(),
            ids: BTreeSet::new(),
            model: Mvr::default(),
            indexes,
            queue: VecDeque::new(),
            read_contexts: BTreeMap::new(),
            writes: 0,
        }
    }

    fn version_vector(&self) -> Vec<(NodeId, u64)> {
        let mut vv: Vec<(NodeId, u64)> = self
            .chains
            .heads()
            .iter()
            .map(|(a, h)| (*a, h.seq))
            .collect();
        vv.sort_unstable();
        vv
    }

    fn get(&self, key: &[u8]) -> KeyVersions {
        self.indexes
            .snapshot()
            .expect("snapshot")
            .get(key)
            .expect("get")
    }

    /// A crash and restart: the writer queue is lost, the log kept; the clock restarts from the
    /// log's latest timestamp, and the views, when `rebuild`, are rebuilt from the log.
    fn restart(&mut self, rebuild: bool, now_ms: u64) {
        self.queue.clear();
        let max = self
            .log
            .iter()
            .map(|e| e.entry.timestamp)
            .max()
            .unwrap_or_default();
        self.chains = Chains::new(
            self.chains.heads().clone(),
            self.keypair.clone(),
            max,
            now_ms,
        );
        if rebuild {
            let (indexes, _) = Indexes::open_in_memory(default_views()).expect("open views");
            let batch: Vec<(u64, &SignedEntry)> = self
                .log
                .iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e))
                .collect();
            indexes.apply(&batch, false).expect("rebuild views");
            self.indexes = indexes;
            let mut model = Mvr::default();
            for e in &self.log {
                model.apply(e);
            }
            assert_eq!(
                model, self.model,
                "the model rebuilt from the log is the same"
            );
        }
    }

    /// Where a send loop to a peer holding `theirs` starts in the log, asked of the views as
    /// `driver.rs` asks them (they are always caught up here).
    fn resume_at(&self, theirs: &std::collections::HashMap<NodeId, u64>) -> usize {
        let snapshot = self.indexes.snapshot().expect("snapshot");
        let end = snapshot.log_lookup_applied_lsn().expect("applied lsn");
        assert_eq!(end, self.log.len() as u64, "the views have applied the log");
        let ours = snapshot.version_vector().expect("version vector");
        let after = resume_after(end, &ours, theirs, |author, seq| {
            snapshot.author_seq_lsn(author, seq)
        })
        .expect("lookups");
        usize::try_from(after).expect("an LSN of an in-memory log fits usize")
    }

    /// One group commit of the first `n` queued commands, built by the production `Chains`.
    /// Returns the acknowledged local entry ids and the replies owed to receive sides.
    fn batch(&mut self, n: usize, now_ms: u64) -> (Vec<EntryId>, Vec<(Tag, bool)>) {
        let base = self.log.len() as u64;
        let commands: Vec<BatchCommand<(), Tag>> = self
            .queue
            .drain(..n)
            .map(|cmd| match cmd {
                Command::Local(ops) => BatchCommand::Local {
                    ops: ops.into_iter().map(LocalOp::into_write).collect(),
                    conditional: false,
                    reply: (),
                },
                Command::Remote { entries, tag } => BatchCommand::Remote {
                    entries,
                    reply: tag,
                },
            })
            .collect();
        let mut acked = Vec::new();
        let mut replies = Vec::new();
        for built in self.chains.build(base, commands, &mut self.model, now_ms) {
            match built {
                Built::Local { id, .. } => acked.push(id),
                Built::Remote { reply, .. } => replies.push((reply, true)),
                Built::RemoteRefused { reply, .. } => replies.push((reply, false)),
                Built::LocalRefused { error, .. } => {
                    panic!(
                        "node {}: a local write was refused: {error}",
                        self.id.short()
                    )
                }
            }
        }
        let mut touched = BTreeSet::new();
        for e in self.chains.entries() {
            assert!(self.ids.insert(e.id), "entry {} appended twice", e.id);
            touched.extend(e.entry.ops.iter().map(|op| op.key().to_vec()));
            self.log.push(e.clone());
        }
        let batch: Vec<(u64, &SignedEntry)> = self.log[base as usize..]
            .iter()
            .enumerate()
            .map(|(i, e)| (base + i as u64 + 1, e))
            .collect();
        self.indexes.apply(&batch, false).expect("apply to views");
        for key in &touched {
            self.check_key(key);
        }
        (acked, replies)
    }

    /// The views agree with the model on `key`, and no version the node knows superseded is
    /// current.
    fn check_key(&self, key: &[u8]) {
        let got = self.get(key);
        assert_eq!(
            got.context,
            self.model.current(key),
            "node {}: views and model disagree on {:?}",
            self.id.short(),
            String::from_utf8_lossy(key)
        );
        for id in &got.context {
            assert!(
                !self.model.superseded.contains(&(key.to_vec(), *id)),
                "node {}: superseded version {id} of {:?} is current",
                self.id.short(),
                String::from_utf8_lossy(key)
            );
        }
    }
}

enum Frame {
    Hello(Vec<(NodeId, u64)>),
    Entries(Vec<Vec<u8>>),
}

enum Ingest {
    /// Handed to the writer; the receive side waits for the reply.
    Queued { run: Vec<SignedEntry>, attempt: u32 },
    /// The writer refused it (another session appended first): classify again.
    Failed { run: Vec<SignedEntry>, attempt: u32 },
}

/// One end of a connection: its session, what it has sent that the other end has not read,
/// its send loop's position in the log, and its receive loop's state.
struct Side {
    session: SyncSession,
    outbox: VecDeque<Frame>,
    send_at: usize,
    hello_seen: bool,
    /// Received entries not yet taken in, with their payload lengths.
    reading: VecDeque<(SignedEntry, usize)>,
    ingest: Option<Ingest>,
}

impl Side {
    fn new(peer: NodeId, hello: Vec<(NodeId, u64)>) -> Self {
        Self {
            session: SyncSession::new(peer, PENDING_MAX, None),
            outbox: VecDeque::from([Frame::Hello(hello)]),
            send_at: 0,
            hello_seen: false,
            reading: VecDeque::new(),
            ingest: None,
        }
    }
}

struct Conn {
    id: u64,
    /// `sides[0]` is node `a`'s end, `sides[1]` node `b`'s.
    sides: [Side; 2],
}

struct Link {
    a: usize,
    b: usize,
    conn: Option<Conn>,
}

impl Link {
    fn node(&self, side: usize) -> usize {
        if side == 0 { self.a } else { self.b }
    }
}

#[derive(Default, Debug)]
struct Stats {
    refused: Vec<String>,
    equivocations: u64,
    gaps: u64,
    abandoned: u64,
    /// Entries taken in before a signature covered them.
    unsigned_waits: u64,
    duplicates: u64,
    /// Appends the writer refused because another session appended first.
    link_retries: u64,
    cuts: u64,
    restarts: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.equivocations += o.equivocations;
        self.gaps += o.gaps;
        self.abandoned += o.abandoned;
        self.unsigned_waits += o.unsigned_waits;
        self.duplicates += o.duplicates;
        self.link_retries += o.link_retries;
        self.cuts += o.cuts;
        self.restarts += o.restarts;
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    nodes: Vec<Node>,
    links: Vec<Link>,
    /// Side of the partition each node is on; links across it are down and stay down.
    partition: Vec<bool>,
    now_ms: u64,
    conns: u64,
    acked: BTreeSet<EntryId>,
    stats: Stats,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed ^ 0x5eed_5eed_5eed_5eed);
        let n = 3 + rng.index(2);
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let mut secret = [0u8; 32];
                secret[..8].copy_from_slice(&seed.to_le_bytes());
                secret[8] = i as u8 + 1;
                Node::new(secret)
            })
            .collect();
        // Topology: a full mesh, a line, a ring or a star, so that relays matter.
        let mut pairs = BTreeSet::new();
        match rng.below(4) {
            0 => {
                for a in 0..n {
                    for b in a + 1..n {
                        pairs.insert((a, b));
                    }
                }
            }
            1 => (0..n - 1).for_each(|a| {
                pairs.insert((a, a + 1));
            }),
            2 => (0..n).for_each(|a| {
                let b = (a + 1) % n;
                pairs.insert((a.min(b), a.max(b)));
            }),
            _ => (1..n).for_each(|b| {
                pairs.insert((0, b));
            }),
        }
        let links = pairs
            .into_iter()
            .map(|(a, b)| Link { a, b, conn: None })
            .collect();
        Self {
            seed,
            rng,
            nodes,
            links,
            partition: vec![false; n],
            now_ms: 1_700_000_000_000,
            conns: 0,
            acked: BTreeSet::new(),
            stats: Stats::default(),
            trace: Vec::new(),
        }
    }

    fn note(&mut self, s: String) {
        self.trace.push(s);
    }

    fn blocked(&self, l: usize) -> bool {
        let link = &self.links[l];
        self.partition[link.a] != self.partition[link.b]
    }

    fn connect(&mut self, l: usize) {
        if self.links[l].conn.is_some() || self.blocked(l) {
            return;
        }
        self.conns += 1;
        let (a, b) = (self.links[l].a, self.links[l].b);
        let conn = Conn {
            id: self.conns,
            sides: [
                Side::new(self.nodes[b].id, self.nodes[a].version_vector()),
                Side::new(self.nodes[a].id, self.nodes[b].version_vector()),
            ],
        };
        self.links[l].conn = Some(conn);
        self.note(format!("connect {a}-{b}"));
    }

    fn cut(&mut self, l: usize) {
        if self.links[l].conn.take().is_some() {
            self.stats.cuts += 1;
            let (a, b) = (self.links[l].a, self.links[l].b);
            self.note(format!("cut {a}-{b}"));
        }
    }

    fn restart(&mut self, n: usize) {
        for l in 0..self.links.len() {
            if self.links[l].a == n || self.links[l].b == n {
                self.cut(l);
            }
        }
        self.stats.restarts += 1;
        let rebuild = self.rng.chance(1, 2);
        self.nodes[n].restart(rebuild, self.now_ms);
        self.note(format!("restart {n} rebuild={rebuild}"));
    }

    fn partition(&mut self) {
        let n = self.nodes.len();
        let cut = 1 + self.rng.index(n - 1);
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.rng.index(i + 1));
        }
        self.partition = vec![false; n];
        for &i in &order[..cut] {
            self.partition[i] = true;
        }
        for l in 0..self.links.len() {
            if self.blocked(l) {
                self.cut(l);
            }
        }
        let p = self.partition.clone();
        self.note(format!("partition {p:?}"));
    }

    fn heal(&mut self) {
        self.partition = vec![false; self.nodes.len()];
        self.note("heal".into());
    }

    /// A client of node `n` queues a write of one or two ops.
    fn write(&mut self, n: usize) {
        let ops_len = 1 + self.rng.below(2);
        let first = self.rng.below(KEYS);
        let mut ops = Vec::new();
        for i in 0..ops_len {
            let k = key((first + i) % KEYS);
            let node = &mut self.nodes[n];
            node.writes += 1;
            let value = format!("n{n}-w{}", node.writes).into_bytes();
            let op = match self.rng.below(10) {
                0..=4 => LocalOp::Put { key: k, value },
                5..=6 => LocalOp::Delete { key: k },
                _ => {
                    let context = node.read_contexts.get(&k).cloned().unwrap_or_default();
                    LocalOp::Merge {
                        key: k,
                        value,
                        context,
                    }
                }
            };
            ops.push(op);
        }
        self.note(format!("write {n} {ops:?}"));
        self.nodes[n].queue.push_back(Command::Local(ops));
    }

    /// A client of node `n` reads a key, keeping its context for a later merge.
    fn read(&mut self, n: usize) {
        let k = key(self.rng.below(KEYS));
        let node = &mut self.nodes[n];
        let got = node.get(&k);
        node.read_contexts.insert(k, got.context);
    }

    /// The writer of node `n` commits up to `max` queued commands. Returns whether it did any.
    fn batch(&mut self, n: usize, max: usize) -> bool {
        let len = self.nodes[n].queue.len().min(max);
        if len == 0 {
            return false;
        }
        let (acked, replies) = self.nodes[n].batch(len, self.now_ms);
        self.note(format!(
            "batch {n}: {len} commands, log {}",
            self.nodes[n].log.len()
        ));
        self.acked.extend(acked);
        for (tag, ok) in replies {
            let Some(conn) = self.links[tag.link].conn.as_mut() else {
                continue;
            };
            if conn.id != tag.conn {
                continue;
            }
            let side = &mut conn.sides[tag.side];
            match side.ingest.take() {
                Some(Ingest::Queued { run, attempt }) if !ok => {
                    self.stats.link_retries += 1;
                    side.ingest = Some(Ingest::Failed { run, attempt });
                }
                Some(Ingest::Queued { .. }) => {}
                other => panic!("a writer reply for a side not waiting: {}", other.is_some()),
            }
        }
        true
    }

    /// The send loop of one side reads up to `chunk` entries of its node's log and sends what
    /// the peer lacks. Returns whether it moved.
    fn send(&mut self, l: usize, s: usize, chunk: usize) -> bool {
        let node = &self.nodes[self.links[l].node(s)];
        let Some(conn) = self.links[l].conn.as_mut() else {
            return false;
        };
        let side = &mut conn.sides[s];
        if !side.hello_seen || side.send_at >= node.log.len() {
            return false;
        }
        let end = node.log.len().min(side.send_at.saturating_add(chunk));
        let payloads: Vec<Vec<u8>> = node.log[side.send_at..end]
            .iter()
            .filter(|e| side.session.should_send(e))
            .map(SignedEntry::encode_payload)
            .collect();
        side.send_at = end;
        if !payloads.is_empty() {
            side.outbox.push_back(Frame::Entries(payloads));
        }
        true
    }

    /// The receive loop of one side takes one step: a frame off the stream, one entry into the
    /// session, or a retry of a refused append. Returns whether it moved.
    fn receive(&mut self, l: usize, s: usize) -> bool {
        let n = self.links[l].node(s);
        let Some(conn) = self.links[l].conn.as_mut() else {
            return false;
        };
        let conn_id = conn.id;
        let tag = Tag {
            link: l,
            side: s,
            conn: conn_id,
        };
        match conn.sides[s].ingest.take() {
            Some(Ingest::Failed { run, attempt }) => {
                let next = attempt + 1;
                if next >= INGEST_ATTEMPTS {
                    self.stats.abandoned += 1;
                    self.note(format!("node {n}: run abandoned after {next} attempts"));
                } else {
                    let ingest = Self::ingest(&mut self.nodes[n], &mut self.stats, run, next, tag);
                    conn.sides[s].ingest = ingest;
                }
                return true;
            }
            Some(queued @ Ingest::Queued { .. }) => {
                conn.sides[s].ingest = Some(queued);
                return false;
            }
            None => {}
        }
        let Some((e, len)) = conn.sides[s].reading.pop_front() else {
            let [s0, s1] = &mut conn.sides;
            let (me, other) = if s == 0 { (s0, s1) } else { (s1, s0) };
            let Some(frame) = other.outbox.pop_front() else {
                return false;
            };
            match frame {
                Frame::Hello(vv) => {
                    me.session.on_hello(&vv);
                    me.hello_seen = true;
                    me.send_at = self.nodes[n].resume_at(me.session.their_version_vector());
                }
                Frame::Entries(payloads) => {
                    me.reading.extend(payloads.iter().map(|p| {
                        (
                            SignedEntry::decode_payload(p).expect("decode a payload"),
                            p.len(),
                        )
                    }));
                }
            }
            return true;
        };
        let (seq, author) = (e.entry.seq, e.entry.author.short());
        let have = self.nodes[n]
            .chains
            .heads()
            .get(&e.entry.author)
            .map_or(0, |h| h.seq);
        match conn.sides[s].session.receive(e, len) {
            Ok(None) => self.stats.unsigned_waits += 1,
            Ok(Some(run)) => {
                let ingest = Self::ingest(&mut self.nodes[n], &mut self.stats, run, 0, tag);
                conn.sides[s].ingest = ingest;
            }
            Err(refusal) => {
                let msg = format!(
                    "node {n} (has {have} of {author}) link {l} conn {conn_id}: {author}#{seq}: {refusal}"
                );
                self.stats.refused.push(msg.clone());
                self.trace.push(msg);
            }
        }
        true
    }

    /// Classifies a released run against the node's log with the production planner
    /// (`session::plan`, which `driver.rs` `ingest` calls) and queues an append. Returns what
    /// the receive side then waits for.
    fn ingest(
        node: &mut Node,
        stats: &mut Stats,
        run: Vec<SignedEntry>,
        attempt: u32,
        tag: Tag,
    ) -> Option<Ingest> {
        let plan = plan(
            std::slice::from_ref(&run),
            |author| node.chains.heads().get(author).copied(),
            |_, _, id| Ok::<_, std::convert::Infallible>(node.ids.contains(id)),
        )
        .unwrap_or_else(|never| match never {});
        for (_, refused) in &plan.refused {
            match refused {
                Classified::Equivocation { .. } => stats.equivocations += 1,
                Classified::Gap { .. } => stats.gaps += 1,
                Classified::Append(_) | Classified::Duplicate => {}
            }
        }
        if plan.append.is_empty() {
            if plan.refused.is_empty() {
                stats.duplicates += 1;
            }
            return None;
        }
        node.queue.push_back(Command::Remote {
            entries: plan.append,
            tag,
        });
        Some(Ingest::Queued { run, attempt })
    }

    fn up_sides(&self) -> Vec<(usize, usize)> {
        (0..self.links.len())
            .filter(|&l| self.links[l].conn.is_some())
            .flat_map(|l| [(l, 0), (l, 1)])
            .collect()
    }

    /// One random step.
    fn step(&mut self) {
        self.now_ms += self.rng.below(5);
        let n = self.rng.index(self.nodes.len());
        match self.rng.below(100) {
            0..=14 => self.write(n),
            15..=19 => self.read(n),
            20..=34 => {
                let max = 1 + self.rng.index(4);
                self.batch(n, max);
            }
            35..=59 => {
                let sides = self.up_sides();
                if !sides.is_empty() {
                    let (l, s) = sides[self.rng.index(sides.len())];
                    let chunk = 1 + self.rng.below(SEND_CHUNK_MAX) as usize;
                    self.send(l, s, chunk);
                }
            }
            60..=89 => {
                let sides = self.up_sides();
                if !sides.is_empty() {
                    let (l, s) = sides[self.rng.index(sides.len())];
                    for _ in 0..=self.rng.below(4) {
                        self.receive(l, s);
                    }
                }
            }
            90..=92 => {
                let l = self.rng.index(self.links.len());
                self.cut(l);
            }
            93..=97 => {
                let l = self.rng.index(self.links.len());
                self.connect(l);
            }
            98 => {
                if self.rng.chance(1, 2) {
                    self.partition();
                } else {
                    self.heal();
                }
            }
            _ => {
                if self.rng.chance(1, 3) {
                    self.restart(n);
                }
            }
        }
    }

    /// Heals everything and runs every queue, send loop and receive loop until nothing moves.
    fn quiesce(&mut self) {
        self.heal();
        for l in 0..self.links.len() {
            self.connect(l);
        }
        for _ in 0..QUIESCE_ROUNDS_MAX {
            let mut moved = false;
            for n in 0..self.nodes.len() {
                moved |= self.batch(n, usize::MAX);
            }
            for (l, s) in self.up_sides() {
                while self.send(l, s, usize::MAX) {
                    moved = true;
                }
                while self.receive(l, s) {
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("no quiescence after {QUIESCE_ROUNDS_MAX} rounds");
    }

    fn check(&self) {
        let chains = |node: &Node| -> BTreeMap<NodeId, Vec<EntryId>> {
            let mut out: BTreeMap<NodeId, Vec<EntryId>> = BTreeMap::new();
            for e in &node.log {
                out.entry(e.entry.author).or_default().push(e.id);
            }
            out
        };
        let reference = chains(&self.nodes[0]);
        let mut global = Mvr::default();
        for e in &self.nodes[0].log {
            global.apply(e);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let mut checker = ChainChecker::default();
            for e in &node.log {
                checker
                    .push(e)
                    .unwrap_or_else(|err| panic!("node {i}: chain check: {err}"));
            }
            checker
                .finish()
                .unwrap_or_else(|err| panic!("node {i}: chain end: {err}"));
            assert_eq!(
                node.ids.len(),
                node.log.len(),
                "node {i}: duplicate entries"
            );
            assert_eq!(
                chains(node),
                reference,
                "node {i}: chains differ from node 0"
            );
            assert_eq!(
                node.version_vector(),
                self.nodes[0].version_vector(),
                "node {i}: version vector"
            );
            for id in &self.acked {
                assert!(
                    node.ids.contains(id),
                    "node {i}: acknowledged write {id} missing"
                );
            }
            assert_eq!(node.model.current, global.current, "node {i}: kv model");
            for k in 0..KEYS {
                let k = key(k);
                node.check_key(&k);
                assert_eq!(node.get(&k), self.nodes[0].get(&k), "node {i}: get {k:?}");
                for id in &node.get(&k).context {
                    assert!(
                        !global.superseded.contains(&(k.clone(), *id)),
                        "node {i}: superseded version {id} is current"
                    );
                }
            }
        }
        let s = &self.stats;
        assert!(
            s.refused.is_empty(),
            "entries of honest peers were refused: {:#?}",
            s.refused
        );
        assert_eq!(s.equivocations, 0, "equivocations among honest nodes");
        assert_eq!(s.gaps, 0, "runs classified as gaps");
    }
}

/// Runs one seed; returns its entry count and counters, for the summary.
fn run(seed: u64) -> (usize, Stats) {
    let mut sim = Sim::new(seed);
    let steps = 150 + sim.rng.index(350);
    for _ in 0..steps {
        sim.step();
    }
    sim.quiesce();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.check()));
    if let Err(panic) = result {
        let tail = sim.trace.len().saturating_sub(60);
        eprintln!(
            "seed {}: last steps:\n{}",
            sim.seed,
            sim.trace[tail..].join("\n")
        );
        std::panic::resume_unwind(panic);
    }
    (sim.nodes[0].log.len(), sim.stats)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

#[test]
fn replication_converges_under_faults() {
    let seeds: Vec<u64> = match env_u64("SYNC_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("SYNC_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
    };
    let mut entries = 0;
    let mut total = Stats::default();
    for &seed in &seeds {
        match std::panic::catch_unwind(|| run(seed)) {
            Ok((n, stats)) => {
                entries += n;
                total.add(&stats);
            }
            Err(panic) => {
                eprintln!("sync_sim: seed {seed} failed; rerun with SYNC_SIM_SEED={seed}");
                std::panic::resume_unwind(panic);
            }
        }
    }
    println!("{} seeds, {entries} entries: {total:?}", seeds.len());
    assert!(entries > 0, "the simulation wrote nothing");
    assert!(
        total.unsigned_waits > 0 && total.link_retries > 0 && total.cuts > 0,
        "the simulation no longer reaches the cases it is for: {total:?}"
    );
}

/// The case the simulation found: a peer's stream of an author jumps forward when, mid-session,
/// it learns that this node has entries it had not sent yet (this node sent them to it). The
/// session starts a new run there instead of refusing the rest of the author's entries.
#[test]
fn a_stream_that_skips_what_the_receiver_sent_is_accepted() {
    let author = Keypair::from_secret([9; 32]);
    let mut chain: Vec<SignedEntry> = Vec::new();
    for seq in 1..=4 {
        let entry = Entry {
            author: author.node_id(),
            seq,
            prev: chain.last().map(|e| e.id),
            timestamp: kappakv_protocol::Timestamp(seq << 16),
            ops: vec![Op::Put {
                key: b"k".to_vec(),
                value: vec![seq as u8],
                supersedes: vec![],
            }],
        };
        let id = entry.id();
        chain.push(SignedEntry {
            signature: (seq != 1).then(|| author.sign(&id)),
            entry,
            id,
        });
    }
    let peer = Keypair::from_secret([8; 32]).node_id();

    // #1 waits unsigned; the peer then skips #2 and sends #3.
    let mut session = SyncSession::new(peer, PENDING_MAX, None);
    assert_eq!(
        session.receive(chain[0].clone(), chain[0].encode_payload().len()),
        Ok(None)
    );
    assert_eq!(
        session.receive(chain[2].clone(), chain[2].encode_payload().len()),
        Ok(Some(vec![chain[2].clone()]))
    );
    assert_eq!(session.pending_len(), 0);
    // The run goes on linking from #3.
    assert_eq!(
        session.receive(chain[3].clone(), chain[3].encode_payload().len()),
        Ok(Some(vec![chain[3].clone()]))
    );

    // #2 released; the peer skips #3 and sends #4.
    let mut session = SyncSession::new(peer, PENDING_MAX, None);
    assert_eq!(
        session.receive(chain[0].clone(), chain[0].encode_payload().len()),
        Ok(None)
    );
    assert_eq!(
        session.receive(chain[1].clone(), chain[1].encode_payload().len()),
        Ok(Some(chain[..2].to_vec()))
    );
    assert_eq!(
        session.receive(chain[3].clone(), chain[3].encode_payload().len()),
        Ok(Some(vec![chain[3].clone()]))
    );
}
