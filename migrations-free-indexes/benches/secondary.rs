//! Declared secondary indexes over 1,000,000 JSON documents (one put per entry, distinct keys
//! `posts/%07d`, ~150 bytes: a title, two or three tags of 8, a score of 1000, and a point,
//! `lat` and `lon` uniform over -90..90 and -180..180 except an empty square, 10..12 N,
//! 100..102 E).
//!
//! - `rebuild`: the index dropped and built again from the log while the key/value view is
//!   already built, as after a definition change: entries in transactions of 20,000 (the
//!   node's default `index_batch_entries_max`), non-durable, then one durable commit.
//! - `first_page`: the first 32 documents of a query, with their current values, from a fresh
//!   snapshot: an exact tag (a quarter of the documents have it), and a range of scores.
//! - `geo_box`: every key of a box query of the `geo` index, with their current values: a box
//!   in the empty square (0 keys), one of 2.55° × 2.55° at the equator (about 100), and one
//!   of 25.5° × 25.5° (about 10,000). `geo_near`: the 10 keys nearest to a point.
//!
//! `cargo bench -p kappakv-indexes --bench secondary`. Set `KAPPAKV_BENCH_DIR` to put the index
//! file somewhere other than the system temp dir.

use std::sync::LazyLock;

use divan::Bencher;
use divan::counter::ItemsCount;
use kappakv_indexes::{IndexDef, IndexKind, Indexes, SecondaryIndexView, View, configured_views};
use kappakv_protocol::{Entry, IndexQuery, IndexValue, Lsn, NodeId, Op, SignedEntry, Timestamp};

const DOCS: usize = 1_000_000;
const BATCH: usize = 20_000;
const TAGS: [&str; 8] = [
    "cats", "dogs", "fish", "birds", "frogs", "mice", "owls", "bees",
];

fn main() {
    LazyLock::force(&BUILT);
    divan::main();
}

fn defs() -> Vec<IndexDef> {
    vec![
        IndexDef {
            name: "by_tag".into(),
            prefix: "posts/".into(),
            fields: vec!["tags".into()],
            kind: IndexKind::Multi,
        },
        IndexDef {
            name: "by_score".into(),
            prefix: "posts/".into(),
            fields: vec!["meta.score".into()],
            kind: IndexKind::Range { descending: true },
        },
        IndexDef {
            name: "by_place".into(),
            prefix: "posts/".into(),
            fields: vec!["lat".into(), "lon".into()],
            kind: IndexKind::Geo,
        },
    ]
}

/// A uniform number in `0..1` from the next step of `x`.
fn unit(x: &mut u64) -> f64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x >> 11) as f64 / (1u64 << 53) as f64
}

static LOG: LazyLock<Vec<SignedEntry>> = LazyLock::new(|| {
    let author = NodeId([7; 32]);
    let mut prev = None;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..DOCS as u64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut tags = vec![TAGS[(x % 4) as usize], TAGS[4 + (x >> 8) as usize % 4]];
            if x.is_multiple_of(3) {
                tags.push(TAGS[(x >> 16) as usize % 8]);
            }
            let mut y = x | 1;
            let (lat, lon) = loop {
                let (lat, lon) = (unit(&mut y) * 180.0 - 90.0, unit(&mut y) * 360.0 - 180.0);
                if !((10.0..12.0).contains(&lat) && (100.0..102.0).contains(&lon)) {
                    break (lat, lon);
                }
            };
            let doc = serde_json::json!({
                "title": format!("post number {i}"),
                "tags": tags,
                "meta": {"score": (x >> 24) % 1000},
                "lat": lat,
                "lon": lon,
            });
            let entry = Entry {
                author,
                seq: i + 1,
                prev,
                timestamp: Timestamp(i << 16),
                ops: vec![Op::Put {
                    key: format!("posts/{i:07}").into_bytes(),
                    value: serde_json::to_vec(&doc).expect("json"),
                    supersedes: vec![],
                }],
            };
            let id = entry.id();
            prev = Some(id);
            SignedEntry {
                entry,
                id,
                signature: None,
            }
        })
        .collect()
});

/// An index file with every view built, and the views of the declared indexes.
struct Built {
    _dir: tempfile::TempDir,
    indexes: Indexes,
    views: Vec<SecondaryIndexView>,
}

static BUILT: LazyLock<Built> = LazyLock::new(|| {
    let base = std::env::var_os("KAPPAKV_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let (indexes, _) = Indexes::open(
        dir.path().join("indexes.redb"),
        configured_views(&defs()).expect("views"),
    )
    .expect("open");
    for chunk in batches().chunks(BATCH) {
        indexes.apply(chunk, false).expect("apply");
    }
    indexes.persist().expect("persist");
    let views = defs()
        .into_iter()
        .map(|d| SecondaryIndexView::new(d).expect("view"))
        .collect();
    Built {
        _dir: dir,
        indexes,
        views,
    }
});

fn batches() -> Vec<(Lsn, &'static SignedEntry)> {
    LOG.iter()
        .enumerate()
        .map(|(i, e)| (i as Lsn + 1, e))
        .collect()
}

/// Drops one index and builds it again from the whole log, the key/value view already built.
#[divan::bench(args = ["by_tag", "by_score", "by_place"], sample_count = 3, sample_size = 1)]
fn rebuild(bencher: Bencher, index: &str) {
    let built = &*BUILT;
    let view = format!("idx.{index}");
    let log = batches();
    bencher
        .counter(ItemsCount::new(DOCS))
        .with_inputs(|| {
            built.indexes.rebuild(Some(&view)).expect("reset");
        })
        .bench_values(|()| {
            let only = |n: &str| n == view;
            for chunk in log.chunks(BATCH) {
                built.indexes.apply_to(chunk, false, &only).expect("apply");
            }
            built.indexes.persist().expect("persist");
        });
}

/// The first page of 32 of a query, from a fresh snapshot.
#[divan::bench(args = ["tag = cats", "score in 500..=510"])]
fn first_page(bencher: Bencher, query: &str) {
    let built = &*BUILT;
    let (view, q) = if query.starts_with("tag") {
        (&built.views[0], IndexQuery::exact("cats"))
    } else {
        (
            &built.views[1],
            IndexQuery::Range {
                start: Some(vec![IndexValue::from(500i64)]),
                end: Some(vec![IndexValue::from(510i64)]),
                end_inclusive: true,
            },
        )
    };
    assert_eq!(
        built
            .indexes
            .snapshot()
            .expect("snapshot")
            .applied_lsn(view.name())
            .expect("lsn"),
        DOCS as Lsn
    );
    bencher.bench(|| {
        let page = built
            .indexes
            .snapshot()
            .expect("snapshot")
            .query(view, &q, 32, None)
            .expect("query");
        assert_eq!(page.items.len(), 32);
        page
    });
}

/// Every key of a box query of the geo index, from a fresh snapshot.
#[divan::bench(args = ["0 keys", "~100 keys", "~10,000 keys"])]
fn geo_box(bencher: Bencher, size: &str) {
    let built = &*BUILT;
    let (q, expect) = match size {
        "0 keys" => (IndexQuery::bbox(10.5, 11.5, 100.5, 101.5), 0..=0),
        "~100 keys" => (IndexQuery::bbox(0.0, 2.55, 0.0, 2.55), 50..=150),
        _ => (IndexQuery::bbox(0.0, 25.5, 0.0, 25.5), 9_000..=11_000),
    };
    bencher.bench(|| {
        let page = built
            .indexes
            .snapshot()
            .expect("snapshot")
            .query(&built.views[2], &q, 100_000, None)
            .expect("query");
        assert!(expect.contains(&page.items.len()), "{}", page.items.len());
        page
    });
}

/// The 10 keys nearest to a point, from a fresh snapshot.
#[divan::bench]
fn geo_near(bencher: Bencher) {
    let built = &*BUILT;
    let q = IndexQuery::near(48.85, 2.35);
    bencher.bench(|| {
        let page = built
            .indexes
            .snapshot()
            .expect("snapshot")
            .query(&built.views[2], &q, 10, None)
            .expect("query");
        assert_eq!(page.items.len(), 10);
        page
    });
}
