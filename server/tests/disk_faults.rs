//! Disk faults at every position of a workload. A clean run of the workload (two authors,
//! batches across several segments, a reopen half-way) records every call the log store makes
//! to its directory; then each call in turn is failed with EIO and with ENOSPC, after a torn
//! write or a lost writeback where those apply, and a full disk is also made to fail the cut
//! that follows it. After every case the log is reopened on the real file system: every
//! acknowledged entry is there in order, nothing else is but a prefix of the batch whose
//! failure stopped the store, and `verify` passes.

mod common;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use common::{ChainBuilder, payloads, read_all_checked};
use kappakv_protocol::verify::ChainHead;
use kappakv_protocol::{Keypair, SignedEntry};
use kappakv_server::commands::verify;
use kappakv_server::log::fault::{Fault, FaultEffect, FaultError, FaultOp, FaultyLogDir};
use kappakv_server::log::{AppendError, FsLogDir, LogConfig, LogDir, LogStore};

/// Batches in the workload; the log is closed and reopened after `REOPEN_AFTER` of them.
const BATCHES: usize = 14;
const REOPEN_AFTER: usize = 8;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 700,
        ..LogConfig::default()
    }
}

/// Batch `i` of the workload, built on the durable `heads` of the two authors: one to three
/// entries of author 1, after one of author 2 in every third batch, each author's last one
/// signed. A retry (`attempt` > 0) carries other values, so its bytes differ from the try that
/// failed.
fn batch(
    i: usize,
    heads: [Option<ChainHead>; 2],
    attempt: usize,
) -> (Vec<SignedEntry>, [Option<ChainHead>; 2]) {
    let mut a = ChainBuilder {
        keypair: Keypair::from_secret([1; 32]),
        head: heads[0],
    };
    let mut b = ChainBuilder {
        keypair: Keypair::from_secret([2; 32]),
        head: heads[1],
    };
    let len = 24 + 7 * attempt;
    let mut entries = Vec::new();
    if i % 3 == 1 {
        entries.extend(b.batch(1, len));
    }
    entries.extend(a.batch(1 + i % 3, len));
    (entries, [a.head, b.head])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every batch was acknowledged (after retries of those refused for a full disk).
    Completed,
    /// An append failed and the store stopped.
    Stopped,
    /// Opening the log failed (the node would not start).
    OpenFailed,
}

struct Run {
    outcome: Outcome,
    acked: Vec<SignedEntry>,
    /// The batch whose failure stopped the store.
    failed: Vec<SignedEntry>,
    /// The error that stopped the store or its opening.
    error: String,
    disk_full: usize,
    trace: Vec<FaultOp>,
    /// Positions in the trace of the calls made while opening the log.
    opens: Vec<Range<usize>>,
    /// Positions in the trace of the calls made while closing it (cutting the zeros written
    /// ahead of its records).
    closes: Vec<Range<usize>>,
    fired: Vec<Fault>,
}

/// Runs the workload on a fresh log in `data`, failing the calls `plan` names.
fn run(data: &Path, plan: &[Fault]) -> Run {
    let path = data.join("log");
    std::fs::create_dir_all(&path).unwrap();
    let faulty = FaultyLogDir::new(Arc::new(FsLogDir::new(&path)));
    let faults = faulty.faults();
    faults.start_trace();
    for f in plan {
        faults.inject(*f);
    }
    let dir: Arc<dyn LogDir> = Arc::new(faulty);
    let mut r = Run {
        outcome: Outcome::Completed,
        acked: Vec::new(),
        failed: Vec::new(),
        error: String::new(),
        disk_full: 0,
        trace: Vec::new(),
        opens: Vec::new(),
        closes: Vec::new(),
        fired: Vec::new(),
    };
    let mut heads = [None, None];
    let mut i = 0;
    'phases: for end in [REOPEN_AFTER, BATCHES] {
        let from = faults.trace().len();
        let opened = LogStore::open_in(dir.clone(), &config());
        r.opens.push(from..faults.trace().len());
        let mut store = match opened {
            Ok((store, recovery)) => {
                assert_eq!(recovery.last_lsn, r.acked.len() as u64);
                assert!(recovery.truncated.is_none());
                store
            }
            Err(e) => {
                r.outcome = Outcome::OpenFailed;
                r.error = e.to_string();
                break 'phases;
            }
        };
        while i < end {
            for attempt in 0.. {
                let (entries, next) = batch(i, heads, attempt);
                match store.append(&payloads(&entries)) {
                    Ok(lsn) => {
                        r.acked.extend(entries);
                        assert_eq!(lsn, r.acked.len() as u64);
                        heads = next;
                        break;
                    }
                    Err(AppendError::DiskFull {
                        segment, offset, ..
                    }) => {
                        // Nothing of the batch is left: the segment is back at its durable
                        // length, or was never created.
                        let len = std::fs::metadata(&segment).map_or(0, |m| m.len());
                        assert_eq!(len, offset, "{}", segment.display());
                        r.disk_full += 1;
                        assert!(attempt < 2, "a one-shot fault failed the batch twice");
                    }
                    Err(e) => {
                        r.outcome = Outcome::Stopped;
                        r.error = e.to_string();
                        r.failed = entries;
                        // Nothing is taken after a failure that stops the store.
                        let (more, _) = batch(i, heads, attempt + 1);
                        assert!(matches!(
                            store.append(&payloads(&more)),
                            Err(AppendError::Stopped)
                        ));
                        break 'phases;
                    }
                }
            }
            i += 1;
        }
        let from = faults.trace().len();
        drop(store);
        r.closes.push(from..faults.trace().len());
    }
    r.trace = faults.trace();
    r.fired = faults.fired();
    r
}

/// Reopens the log of `data` on the real file system and checks it against the run.
fn check(data: &Path, r: &Run, case: &str) {
    let path = data.join("log");
    let (store, recovery) = LogStore::open(&path, &config())
        .unwrap_or_else(|e| panic!("{case}: the log does not open after the fault: {e}"));
    drop(store);
    let n = recovery.last_lsn as usize;
    assert!(
        n >= r.acked.len(),
        "{case}: {} acknowledged, {n} in the log",
        r.acked.len()
    );
    let all = read_all_checked(&path, n as u64);
    let ids = |es: &[SignedEntry]| es.iter().map(|e| e.id).collect::<Vec<_>>();
    let found: Vec<SignedEntry> = all.into_iter().map(|(_, e)| e).collect();
    assert_eq!(
        ids(&found[..r.acked.len()]),
        ids(&r.acked),
        "{case}: acknowledged entries"
    );
    let extra = &found[r.acked.len()..];
    assert!(
        extra.len() <= r.failed.len() && ids(extra) == ids(&r.failed[..extra.len()]),
        "{case}: {} entries after the acknowledged ones are not from the failed batch",
        extra.len()
    );
    if r.outcome == Outcome::Completed {
        assert!(extra.is_empty() && recovery.truncated.is_none(), "{case}");
    }
    verify::run(data).unwrap_or_else(|e| panic!("{case}: verify: {e}"));
}

fn effects(op: FaultOp) -> &'static [FaultEffect] {
    match op {
        FaultOp::Write => &[FaultEffect::Nothing, FaultEffect::TornWrite],
        FaultOp::SyncData | FaultOp::SyncAll => &[FaultEffect::Nothing, FaultEffect::LoseUnsynced],
        _ => &[FaultEffect::Nothing],
    }
}

#[test]
fn every_write_sync_create_and_open_failed_in_turn_loses_nothing_acknowledged() {
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = run(clean_dir.path(), &[]);
    assert_eq!(
        (clean.outcome, clean.disk_full),
        (Outcome::Completed, 0),
        "{}",
        clean.error
    );
    check(clean_dir.path(), &clean, "clean run");
    let segments = std::fs::read_dir(clean_dir.path().join("log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert!(
        segments >= 4,
        "the workload rolls over: {segments} segments"
    );

    // Every call of the clean run, failed in turn, alone or (for writes) with the cut after a
    // full disk failing too.
    let trace = &clean.trace;
    let nth = |p: usize, op: FaultOp| trace[..p].iter().filter(|o| **o == op).count() as u64 + 1;
    let mut cases: Vec<(usize, Vec<Fault>)> = Vec::new();
    for (p, &op) in trace.iter().enumerate() {
        for error in [FaultError::Eio, FaultError::Enospc] {
            for &effect in effects(op) {
                let nth = nth(p, op);
                cases.push((
                    p,
                    vec![Fault {
                        op,
                        nth,
                        error,
                        effect,
                    }],
                ));
            }
        }
        if op == FaultOp::Write {
            for then in [FaultOp::SetLen, FaultOp::SyncAll] {
                cases.push((
                    p,
                    vec![
                        Fault {
                            op,
                            nth: nth(p, op),
                            error: FaultError::Enospc,
                            effect: FaultEffect::TornWrite,
                        },
                        Fault {
                            op: then,
                            nth: nth(p, then),
                            error: FaultError::Eio,
                            effect: FaultEffect::Nothing,
                        },
                    ],
                ));
            }
        }
    }

    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    for (p, plan) in &cases {
        let case = format!("call {p} ({:?}) failed with {plan:?}", trace[*p]);
        let data = tempfile::tempdir().unwrap();
        let r = run(data.path(), plan);
        assert_eq!(r.fired, *plan, "{case}: every planned fault fired");
        check(data.path(), &r, &case);

        // What each fault must lead to.
        let f = plan[0];
        let in_open = clean.opens.iter().any(|o| o.contains(p));
        let in_close = clean.closes.iter().any(|c| c.contains(p));
        let expected = match (f.op, f.error) {
            // A store that cannot cut its zeros when closed leaves them for the next open,
            // which takes them for the end of the log.
            _ if in_close => Outcome::Completed,
            _ if plan.len() > 1 => Outcome::Stopped,
            _ if in_open => Outcome::OpenFailed,
            (FaultOp::Open, _) => Outcome::OpenFailed,
            (FaultOp::Write | FaultOp::Create, FaultError::Enospc) => Outcome::Completed,
            _ => Outcome::Stopped,
        };
        assert_eq!(r.outcome, expected, "{case}: {}", r.error);
        if expected == Outcome::Completed {
            assert_eq!(r.disk_full, usize::from(!in_close), "{case}");
            assert_eq!(r.acked.len(), clean.acked.len(), "{case}");
        }
        if plan.len() > 1 {
            assert!(
                r.error.contains("disk is full") && r.error.contains("cutting"),
                "{case}: {}",
                r.error
            );
        }
        *tally
            .entry(match r.outcome {
                Outcome::Completed if in_close => "cut at close failed, completed",
                Outcome::Completed => "disk full, retried, completed",
                Outcome::Stopped => "store stopped",
                Outcome::OpenFailed => "open refused",
            })
            .or_default() += 1;
    }
    let count = |op| trace.iter().filter(|o| **o == op).count();
    eprintln!(
        "disk faults: {} calls in the workload ({} writes, {} fdatasync, {} fsync, {} directory syncs, {} creates, {} opens), {} cases: {tally:?}",
        trace.len(),
        count(FaultOp::Write),
        count(FaultOp::SyncData),
        count(FaultOp::SyncAll),
        count(FaultOp::DirSync),
        count(FaultOp::Create),
        count(FaultOp::Open),
        cases.len(),
    );
}

#[test]
fn the_reserve_refuses_a_batch_that_would_leave_less_free_and_nothing_else() {
    const RESERVE: u64 = 10_000;
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("log");
    std::fs::create_dir_all(&log).unwrap();
    let dir = FaultyLogDir::new(Arc::new(FsLogDir::new(&log)));
    let faults = dir.faults();
    let (mut store, _) = LogStore::open_in(Arc::new(dir), &config()).unwrap();
    let mut chain = ChainBuilder::new(1);
    let mut acked = Vec::new();

    // Without a reserve nothing is asked: even no free space at all lets the batch through.
    faults.set_available_space(Some(0));
    let entries = chain.batch(2, 40);
    assert_eq!(store.append(&payloads(&entries)).unwrap(), 2);
    acked.extend(entries);

    store.set_disk_reserve(RESERVE);
    let entries = chain.batch(3, 40);
    let records = payloads(&entries);
    let len: u64 = records.iter().map(|p| 8 + p.len() as u64).sum();
    let writes = faults.count(FaultOp::Write);
    for available in [0, RESERVE, RESERVE + len - 1] {
        faults.set_available_space(Some(available));
        let err = store.append(&records).unwrap_err();
        assert!(err.is_disk_full(), "{err}");
        match &err {
            AppendError::BelowReserve {
                available: a,
                reserve,
                len: l,
                ..
            } => assert_eq!((*a, *reserve, *l as u64), (available, RESERVE, len)),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("kept free"), "{err}");
        assert_eq!(store.last_lsn(), 2);
    }
    assert_eq!(faults.count(FaultOp::Write), writes, "nothing was written");

    // Exactly the batch above the reserve is enough; the store took no harm from the refusals.
    faults.set_available_space(Some(RESERVE + len));
    assert_eq!(store.append(&records).unwrap(), 5);
    acked.extend(entries);
    // The real file system's free space, once no longer overridden, is far above 10 kB here.
    faults.set_available_space(None);
    let entries = chain.batch(1, 40);
    assert_eq!(store.append(&payloads(&entries)).unwrap(), 6);
    acked.extend(entries);
    drop(store);

    let all = read_all_checked(&log, 6);
    let ids: Vec<_> = all.iter().map(|(_, e)| e.id).collect();
    assert_eq!(ids, acked.iter().map(|e| e.id).collect::<Vec<_>>());
    verify::run(data.path()).unwrap();
}
