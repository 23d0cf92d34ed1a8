//! The kv view against a plain model of the multi-value register rules, apply-order
//! independence, rebuild equivalence, and the writer's overlay.

use std::collections::{BTreeMap, BTreeSet};

use kappakv_indexes::digest::DigestVersion;
use kappakv_indexes::{Indexes, KvOverlay, Snapshot, StateDigest, default_views};
use kappakv_protocol::{
    Entry, EntryId, KeyRange, KeyVersions, Lsn, NodeId, Op, SignedEntry, Timestamp, Version,
};
use proptest::prelude::*;

const AUTHORS: u8 = 3;
const KEYS: &[&[u8]] = &[b"a", b"ab", b"b", b"c"];

/// One op as generated: which key, put or delete, which earlier versions of that key it
/// supersedes (bit `i` of the mask = the `i`-th version written to the key so far, by anyone),
/// and whether it also names an id that never arrives.
#[derive(Debug, Clone)]
struct OpSpec {
    key: usize,
    delete: bool,
    mask: u32,
    phantom: bool,
}

/// Entries in generation order, plus a delivery order that keeps each author's seq order.
#[derive(Debug, Clone)]
struct Script {
    entries: Vec<SignedEntry>,
    /// A permutation of `0..entries.len()`.
    order: Vec<usize>,
    /// Batch sizes to apply with (cycled).
    chunks: Vec<usize>,
}

fn build(specs: Vec<(u8, Vec<OpSpec>)>, picks: Vec<u8>, chunks: Vec<usize>) -> Script {
    let mut heads: BTreeMap<u8, (u64, Option<EntryId>)> = BTreeMap::new();
    let mut versions: Vec<Vec<EntryId>> = vec![Vec::new(); KEYS.len()];
    let mut entries = Vec::new();
    for (author, ops) in specs {
        let (seq, prev) = heads.get(&author).map_or((1, None), |(s, id)| (s + 1, *id));
        let mut seen = BTreeSet::new();
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| seen.insert(op.key))
            .map(|op| {
                let known = &versions[op.key];
                let mut supersedes: Vec<EntryId> = known
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i < 32 && op.mask & (1 << i) != 0)
                    .map(|(_, id)| *id)
                    .collect();
                if op.phantom {
                    supersedes.push(EntryId([op.key as u8; 32]));
                }
                supersedes.sort_unstable();
                supersedes.dedup();
                let key = KEYS[op.key].to_vec();
                if op.delete {
                    Op::Delete { key, supersedes }
                } else {
                    Op::Put {
                        key,
                        value: vec![author, seq as u8],
                        supersedes,
                    }
                }
            })
            .collect();
        let entry = Entry {
            author: NodeId([author + 1; 32]),
            seq,
            prev,
            // Per-author clocks: equal timestamps across authors exercise the id tie-break.
            timestamp: Timestamp(seq),
            ops,
        };
        entry.validate().expect("generated entries are valid");
        let id = entry.id();
        for op in &entry.ops {
            let k = KEYS
                .iter()
                .position(|k| *k == op.key())
                .expect("key from KEYS");
            versions[k].push(id);
        }
        heads.insert(author, (seq, Some(id)));
        entries.push(SignedEntry {
            entry,
            id,
            signature: None,
        });
    }

    // Interleave the authors' queues as `picks` says.
    let mut queues: BTreeMap<NodeId, std::collections::VecDeque<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        queues.entry(e.entry.author).or_default().push_back(i);
    }
    let mut order = Vec::with_capacity(entries.len());
    let mut picks = picks.into_iter().cycle();
    while order.len() < entries.len() {
        let live: Vec<NodeId> = queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(a, _)| *a)
            .collect();
        let pick = live[usize::from(picks.next().unwrap_or(0)) % live.len()];
        order.extend(
            queues
                .get_mut(&pick)
                .and_then(std::collections::VecDeque::pop_front),
        );
    }
    Script {
        entries,
        order,
        chunks,
    }
}

fn arb_script() -> impl Strategy<Value = Script> {
    let op = (
        0..KEYS.len(),
        prop::bool::weighted(0.2),
        any::<u32>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(key, delete, mask, phantom)| OpSpec {
            key,
            delete,
            mask,
            phantom,
        });
    let entry = (0..AUTHORS, prop::collection::vec(op, 1..3));
    (
        prop::collection::vec(entry, 1..40),
        prop::collection::vec(any::<u8>(), 1..64),
        prop::collection::vec(1usize..8, 1..8),
    )
        .prop_map(|(specs, picks, chunks)| build(specs, picks, chunks))
}

/// Applies `entries` in the given order, LSNs from 1, in batches of `chunks` sizes.
fn apply_in_chunks(indexes: &Indexes, entries: &[&SignedEntry], chunks: &[usize]) {
    let all: Vec<(Lsn, &SignedEntry)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (i as Lsn + 1, *e))
        .collect();
    let mut at = 0;
    for size in chunks.iter().cycle() {
        if at >= all.len() {
            break;
        }
        let end = (at + size).min(all.len());
        indexes.apply(&all[at..end], false).expect("apply");
        at = end;
    }
}

fn fresh() -> Indexes {
    Indexes::open_in_memory(default_views()).expect("open").0
}

/// The MVR rules, written out plainly: current = versions of the key minus every id any op on
/// the key superseded.
fn model(entries: &[SignedEntry]) -> BTreeMap<Vec<u8>, KeyVersions> {
    let mut versions: BTreeMap<&[u8], Vec<(EntryId, Version)>> = BTreeMap::new();
    let mut superseded: BTreeSet<(&[u8], EntryId)> = BTreeSet::new();
    for se in entries {
        for op in &se.entry.ops {
            let version = Version {
                id: se.id,
                author: se.entry.author,
                timestamp: se.entry.timestamp,
                value: op.value().map(<[u8]>::to_vec),
            };
            versions.entry(op.key()).or_default().push((se.id, version));
            superseded.extend(op.supersedes().iter().map(|id| (op.key(), *id)));
        }
    }
    versions
        .into_iter()
        .map(|(key, all)| {
            let current: Vec<Version> = all
                .into_iter()
                .filter(|(id, _)| !superseded.contains(&(key, *id)))
                .map(|(_, v)| v)
                .collect();
            let mut context: Vec<EntryId> = current.iter().map(|v| v.id).collect();
            context.sort_unstable();
            let mut values: Vec<Version> =
                current.into_iter().filter(|v| v.value.is_some()).collect();
            values.sort_by_key(|v| (v.timestamp, v.id));
            (
                key.to_vec(),
                KeyVersions {
                    key: key.to_vec(),
                    values,
                    context,
                },
            )
        })
        .collect()
}

/// The state digest of the current versions [`model`] gives, tombstones included.
fn expected_digest(entries: &[SignedEntry]) -> StateDigest {
    let mut digest = StateDigest::new();
    for (key, versions) in model(entries) {
        // The context is every current id, ascending.
        let current: Vec<DigestVersion<'_>> = versions
            .context
            .iter()
            .map(|id| {
                let se = entries
                    .iter()
                    .find(|se| se.id == *id)
                    .expect("a written id");
                let op = se
                    .entry
                    .ops
                    .iter()
                    .find(|op| op.key() == key)
                    .expect("an op on the key");
                DigestVersion {
                    id: *id,
                    author: se.entry.author,
                    timestamp: se.entry.timestamp,
                    value: op.value(),
                }
            })
            .collect();
        if !current.is_empty() {
            digest.add(&key, &current);
        }
    }
    digest
}

fn empty(key: &[u8]) -> KeyVersions {
    KeyVersions {
        key: key.to_vec(),
        values: vec![],
        context: vec![],
    }
}

/// Every kv answer that must not depend on apply order.
#[derive(Debug, PartialEq)]
struct KvState {
    gets: Vec<KeyVersions>,
    scan: Vec<KeyVersions>,
    paged: Vec<KeyVersions>,
    prefixed: Vec<KeyVersions>,
}

fn kv_state(snap: &Snapshot) -> KvState {
    let gets = KEYS.iter().map(|k| snap.get(k).expect("get")).collect();
    let (scan, resume) = snap.scan(&KeyRange::default(), 100).expect("scan");
    assert_eq!(resume, None);
    let mut paged = Vec::new();
    let mut range = KeyRange::default();
    loop {
        let (page, resume) = snap.scan(&range, 1).expect("scan page");
        paged.extend(page);
        match resume {
            Some(after) => range.start_after = Some(after),
            None => break,
        }
    }
    let prefix = KeyRange {
        prefix: Some(b"a".to_vec()),
        ..KeyRange::default()
    };
    let (prefixed, _) = snap.scan(&prefix, 100).expect("prefix scan");
    KvState {
        gets,
        scan,
        paged,
        prefixed,
    }
}

fn expected_state(entries: &[SignedEntry]) -> KvState {
    let model = model(entries);
    let gets = KEYS
        .iter()
        .map(|k| model.get(*k).cloned().unwrap_or_else(|| empty(k)))
        .collect();
    let scan: Vec<KeyVersions> = model
        .values()
        .filter(|kv| !kv.values.is_empty())
        .cloned()
        .collect();
    let prefixed = scan
        .iter()
        .filter(|kv| kv.key.starts_with(b"a"))
        .cloned()
        .collect();
    KvState {
        gets,
        paged: scan.clone(),
        scan,
        prefixed,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn kv_matches_model_in_any_causal_order(script in arb_script()) {
        let in_order: Vec<&SignedEntry> = script.entries.iter().collect();
        let shuffled: Vec<&SignedEntry> = script.order.iter().map(|&i| &script.entries[i]).collect();

        let a = fresh();
        apply_in_chunks(&a, &in_order, &[usize::MAX]);
        let b = fresh();
        apply_in_chunks(&b, &shuffled, &script.chunks);

        let expected = expected_state(&script.entries);
        let state_a = kv_state(&a.snapshot().unwrap());
        let state_b = kv_state(&b.snapshot().unwrap());
        prop_assert_eq!(&state_a, &expected);
        prop_assert_eq!(&state_b, &expected);

        // The state digest depends on the set of entries alone, and is the digest of the
        // current versions the rules above give.
        let digest_a = a.snapshot().unwrap().state_digest().unwrap();
        let digest_b = b.snapshot().unwrap().state_digest().unwrap();
        prop_assert_eq!(&digest_a, &expected_digest(&script.entries));
        prop_assert_eq!(&digest_b, &digest_a);

        // History holds every version of each key, newest (highest LSN) first.
        let snap = b.snapshot().unwrap();
        for key in KEYS {
            let history = snap.history(key, 1000).unwrap();
            let written: Vec<EntryId> = shuffled
                .iter()
                .rev()
                .filter(|se| se.entry.ops.iter().any(|op| op.key() == *key))
                .map(|se| se.id)
                .collect();
            prop_assert_eq!(history.iter().map(|v| v.id).collect::<Vec<_>>(), written);
        }
        // The version vector is each author's highest seq.
        let mut heads: BTreeMap<NodeId, u64> = BTreeMap::new();
        for se in &script.entries {
            heads.insert(se.entry.author, se.entry.seq);
        }
        prop_assert_eq!(snap.version_vector().unwrap(), heads.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn overlay_over_a_stale_snapshot_sees_what_a_full_one_sees(
        script in arb_script(),
        applied_pick in any::<prop::sample::Index>(),
    ) {
        let local: Vec<&SignedEntry> = script.order.iter().map(|&i| &script.entries[i]).collect();
        let applied = applied_pick.index(local.len() + 1);

        let full = fresh();
        apply_in_chunks(&full, &local, &[usize::MAX]);
        let stale = fresh();
        apply_in_chunks(&stale, &local[..applied], &[usize::MAX]);

        // Recorded from the start and pruned, as the writer does.
        let mut pruned = KvOverlay::new();
        // Recorded only past what the indexer applied.
        let mut tail = KvOverlay::new();
        for (i, se) in local.iter().enumerate() {
            let lsn = i as Lsn + 1;
            pruned.record(lsn, se);
            if i >= applied {
                tail.record(lsn, se);
            }
        }
        pruned.prune(applied as Lsn);
        prop_assert_eq!(pruned.len(), tail.len());

        let full_snap = full.snapshot().unwrap();
        let stale_snap = stale.snapshot().unwrap();
        for key in KEYS {
            let want = full_snap.current_ids(key).unwrap();
            prop_assert_eq!(&pruned.current(key, &stale_snap).unwrap(), &want);
            prop_assert_eq!(&tail.current(key, &stale_snap).unwrap(), &want);
            // An up-to-date snapshot plus the overlay is just the snapshot.
            prop_assert_eq!(&tail.current(key, &full_snap).unwrap(), &want);
        }
        pruned.prune(local.len() as Lsn);
        prop_assert!(pruned.is_empty());
    }

    #[test]
    fn interrupted_rebuild_resumes_to_the_same_state(
        script in arb_script(),
        cut_pick in any::<prop::sample::Index>(),
        durable_until_pick in any::<prop::sample::Index>(),
    ) {
        let local: Vec<&SignedEntry> = script.order.iter().map(|&i| &script.entries[i]).collect();
        let all: Vec<(Lsn, &SignedEntry)> =
            local.iter().enumerate().map(|(i, e)| (i as Lsn + 1, *e)).collect();
        let cut = cut_pick.index(all.len() + 1);
        let durable_until = durable_until_pick.index(cut + 1);

        let one_shot = fresh();
        one_shot.apply(&all, false).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexes.redb");
        {
            let (indexes, _) = Indexes::open(&path, default_views()).unwrap();
            // Entry by entry: durable up to `durable_until`, non-durable after, then "crash".
            for (i, item) in all[..cut].iter().enumerate() {
                indexes.apply(std::slice::from_ref(item), i < durable_until).unwrap();
            }
        }
        let (indexes, report) = Indexes::open(&path, default_views()).unwrap();
        prop_assert!(report.needs_rebuild().next().is_none());
        let from = indexes.min_applied_lsn().unwrap();
        prop_assert!(from as usize >= durable_until && from as usize <= cut);
        indexes.apply(&all[from as usize..], false).unwrap();

        let (a, b) = (indexes.snapshot().unwrap(), one_shot.snapshot().unwrap());
        prop_assert_eq!(kv_state(&a), kv_state(&b));
        for key in KEYS {
            prop_assert_eq!(a.history(key, 1000).unwrap(), b.history(key, 1000).unwrap());
        }
        prop_assert_eq!(a.version_vector().unwrap(), b.version_vector().unwrap());
        for (lsn, se) in &all {
            prop_assert_eq!(
                a.entry_at(&se.entry.author, se.entry.seq).unwrap(),
                Some((*lsn, se.id))
            );
        }
    }
}

/// A stored row: key and value as redb encodes them.
type Row = (Vec<u8>, Vec<u8>);

/// Every row of the built-in views' tables in the file at `path`, as raw bytes: what a view
/// stores, beyond what its queries answer.
fn table_rows(path: &std::path::Path) -> BTreeMap<&'static str, Vec<Row>> {
    use kappakv_indexes::tables::{
        HISTORY_LATEST, HISTORY_RECORDS, KV_CURRENT, KV_SUPERSEDED, LOG_AUTHOR_HEAD,
        LOG_AUTHOR_SEQ_LSN,
    };
    use redb::{ReadableDatabase as _, ReadableTable as _};

    fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        def: redb::TableDefinition<'_, K, V>,
    ) -> Vec<Row> {
        let Ok(table) = txn.open_table(def) else {
            return Vec::new();
        };
        table
            .iter()
            .unwrap()
            .map(|row| {
                let (k, v) = row.unwrap();
                (
                    K::as_bytes(&k.value()).as_ref().to_vec(),
                    V::as_bytes(&v.value()).as_ref().to_vec(),
                )
            })
            .collect()
    }

    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    BTreeMap::from([
        ("kv.current", rows(&txn, KV_CURRENT)),
        ("kv.superseded", rows(&txn, KV_SUPERSEDED)),
        ("history.latest", rows(&txn, HISTORY_LATEST)),
        ("history.records", rows(&txn, HISTORY_RECORDS)),
        ("log_lookup.author_head", rows(&txn, LOG_AUTHOR_HEAD)),
        ("log_lookup.author_seq_lsn", rows(&txn, LOG_AUTHOR_SEQ_LSN)),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The views are a function of the log alone: the same log applied entry by entry (as a
    /// node following writes does), in batches of any sizes (a catch-up after a crash), or in
    /// one batch (a rebuild) stores the same rows, not just the same answers.
    #[test]
    fn stored_rows_do_not_depend_on_batch_boundaries(script in arb_script()) {
        let local: Vec<&SignedEntry> = script.order.iter().map(|&i| &script.entries[i]).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut stored = Vec::new();
        for (name, chunks) in [
            ("entry by entry", &[1][..]),
            ("in batches", &script.chunks[..]),
            ("in one batch", &[usize::MAX][..]),
        ] {
            let path = dir.path().join(name);
            {
                let (indexes, _) = Indexes::open(&path, default_views()).unwrap();
                apply_in_chunks(&indexes, &local, chunks);
                indexes.persist().unwrap();
            }
            stored.push((name, table_rows(&path)));
        }
        for (name, rows) in &stored[1..] {
            for (table, want) in &stored[0].1 {
                prop_assert_eq!(&rows[table], want, "{} applied {}", table, name);
            }
        }
    }
}

#[test]
fn stale_snapshot_behind_the_overlay_is_refused() {
    let indexes = fresh();
    let entry = Entry {
        author: NodeId([1; 32]),
        seq: 1,
        prev: None,
        timestamp: Timestamp(1),
        ops: vec![Op::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            supersedes: vec![],
        }],
    };
    let se = SignedEntry {
        id: entry.id(),
        entry,
        signature: None,
    };
    let snap = indexes.snapshot().unwrap();
    let mut overlay = KvOverlay::new();
    overlay.record(1, &se);
    assert_eq!(overlay.current(b"k", &snap).unwrap(), [se.id]);
    overlay.prune(1);
    assert!(
        overlay.current(b"k", &snap).is_err(),
        "snapshot at 0 is older than the pruned ops"
    );
    indexes.apply(&[(1, &se)], false).unwrap();
    assert_eq!(
        overlay.current(b"k", &indexes.snapshot().unwrap()).unwrap(),
        [se.id]
    );
    overlay.discard_after(0);
    assert!(overlay.is_empty());
}
