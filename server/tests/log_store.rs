//! The log store on real files: appends, recovery of torn tails, refusal of mid-log damage,
//! rollover, and reading by LSN.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{ChainBuilder, payloads, read_all_checked};
use kappakv_protocol::SignedEntry;
use kappakv_protocol::record::RECORD_HEADER_LEN;
use kappakv_server::commands::verify::{self, VerifyLogError};
use kappakv_server::log::segment::{RecordDamage, segment_name};
use kappakv_server::log::{LogConfig, LogReader, LogStore, OpenLogError};

fn log_dir(data: &Path) -> PathBuf {
    data.join("log")
}

fn first_segment(data: &Path) -> PathBuf {
    log_dir(data).join(segment_name(0))
}

/// Appends `batches` to a fresh log in `data`; returns the end offset of every record (all in
/// the first segment) and the batch each record belongs to.
fn write_log(data: &Path, batches: &[Vec<SignedEntry>]) -> Vec<u64> {
    let (mut store, recovery) = LogStore::open(&log_dir(data), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 0);
    let mut ends = Vec::new();
    let mut at = 0u64;
    for batch in batches {
        let p = payloads(batch);
        store.append(&p).unwrap();
        for payload in &p {
            at += (RECORD_HEADER_LEN + payload.len()) as u64;
            ends.push(at);
        }
    }
    assert_eq!(store.last_lsn(), ends.len() as u64);
    ends
}

#[test]
fn appends_survive_reopen_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let mut b = ChainBuilder::new(2);
    let mut batches = Vec::new();
    for i in 0..20 {
        batches.push(a.batch(1 + i % 3, 30));
        batches.push(b.batch(1, 10));
    }
    write_log(dir.path(), &batches);
    let (store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    let n = batches.iter().map(Vec::len).sum::<usize>() as u64;
    assert_eq!(recovery.last_lsn, n);
    assert_eq!(store.last_lsn(), n);
    assert!(recovery.truncated.is_none());
    assert_eq!(recovery.heads[&a.keypair.node_id()], a.head.unwrap());
    assert_eq!(recovery.heads[&b.keypair.node_id()], b.head.unwrap());
    let all = read_all_checked(&log_dir(dir.path()), n);
    let expected: Vec<SignedEntry> = batches.into_iter().flatten().collect();
    assert_eq!(
        all.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        expected
    );
    let summary = verify::run(dir.path()).unwrap();
    assert_eq!(
        (summary.entries, summary.authors, summary.segments),
        (n, 2, 1)
    );
    assert!(
        summary.to_string().contains(&format!("{n} entries")),
        "{summary}"
    );
}

#[test]
fn every_cut_in_the_last_records_recovers_to_the_last_signed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let batches: Vec<_> = (0..12).map(|i| a.batch(1 + i % 3, 24)).collect();
    let ends = write_log(dir.path(), &batches);
    let original = fs::read(first_segment(dir.path())).unwrap();
    assert_eq!(original.len() as u64, *ends.last().unwrap());
    // (end offset, LSN) of every batch: the only consistent points with a single author.
    let mut batch_ends = vec![(0u64, 0u64)];
    let mut lsn = 0;
    for batch in &batches {
        lsn += batch.len() as u64;
        batch_ends.push((ends[lsn as usize - 1], lsn));
    }
    let entries: Vec<SignedEntry> = batches.iter().flatten().cloned().collect();

    // Cut inside the last five records (the last two batches and part of the one before).
    let from = ends[ends.len() - 6];
    for cut in from..original.len() as u64 {
        let case = tempfile::tempdir().unwrap();
        fs::create_dir(log_dir(case.path())).unwrap();
        fs::write(first_segment(case.path()), &original[..cut as usize]).unwrap();
        let (keep, keep_lsn) = *batch_ends
            .iter()
            .rev()
            .find(|(end, _)| *end <= cut)
            .unwrap();

        let (mut store, recovery) =
            LogStore::open(&log_dir(case.path()), &LogConfig::default()).unwrap();
        assert_eq!(recovery.last_lsn, keep_lsn, "cut at {cut}");
        assert_eq!(
            fs::metadata(first_segment(case.path())).unwrap().len(),
            keep,
            "cut at {cut}"
        );
        if cut == keep {
            assert!(recovery.truncated.is_none(), "cut at {cut}");
        } else {
            let t = recovery.truncated.as_ref().expect("something was cut");
            assert_eq!((t.old_len, t.new_len), (cut, keep));
            let on_boundary = ends.contains(&cut);
            assert_eq!(t.torn.is_none(), on_boundary, "cut at {cut}: {t:?}");
        }
        let head = recovery.heads[&a.keypair.node_id()];
        assert_eq!(head.seq, keep_lsn);
        assert_eq!(head.id, entries[keep_lsn as usize - 1].id);
        drop(store);

        // Opening again finds nothing to do.
        let (again, recovery2) =
            LogStore::open(&log_dir(case.path()), &LogConfig::default()).unwrap();
        assert!(recovery2.truncated.is_none(), "cut at {cut}");
        assert_eq!(
            (recovery2.last_lsn, recovery2.heads.clone()),
            (keep_lsn, recovery.heads.clone())
        );
        store = again;

        // Appends continue the recovered chain.
        let mut resume = ChainBuilder {
            keypair: a.keypair.clone(),
            head: Some(head),
        };
        let more = resume.batch(2, 5);
        assert_eq!(store.append(&payloads(&more)).unwrap(), keep_lsn + 2);
        drop(store);
        let all = read_all_checked(&log_dir(case.path()), keep_lsn + 2);
        assert_eq!(all[keep_lsn as usize].1, more[0]);
        verify::run(case.path()).unwrap();
    }
}

#[test]
fn recovery_keeps_a_point_where_every_author_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let mut b = ChainBuilder::new(2);
    // One batch: a1 (unsigned), b1 (signed), a2 (signed). Then a torn a3.
    let batch = vec![a.next(10, false), b.next(10, true), a.next(10, true)];
    let torn = vec![a.next(10, true)];
    let ends = write_log(dir.path(), &[batch, torn]);
    let seg = first_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes.truncate(ends[3] as usize - 3);
    fs::write(&seg, &bytes).unwrap();
    let (store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 3);
    assert_eq!(recovery.truncated.unwrap().torn.unwrap().0, ends[2]);
    drop(store);

    // Cut after b1: a's chain would end at unsigned a1, so both a1 and b1 go.
    fs::write(&seg, &bytes[..ends[1] as usize]).unwrap();
    let (_store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 0);
    let t = recovery.truncated.unwrap();
    assert_eq!((t.unsigned_records, t.new_len, t.torn), (2, 0, None));
    assert!(recovery.heads.is_empty());
}

#[test]
fn a_zero_filled_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let ends = write_log(dir.path(), &[a.batch(2, 10), a.batch(1, 10)]);
    let seg = first_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0; 4096]);
    fs::write(&seg, &bytes).unwrap();
    let (_store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 3);
    let t = recovery.truncated.unwrap();
    assert_eq!(t.new_len, ends[2]);
    assert!(matches!(t.torn, Some((at, RecordDamage::Framing(_))) if at == ends[2]));
}

#[test]
fn a_flipped_byte_before_the_tail_is_an_error_naming_segment_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let batches: Vec<_> = (0..10).map(|_| a.batch(2, 40)).collect();
    let ends = write_log(dir.path(), &batches);
    let seg = first_segment(dir.path());
    let original = fs::read(&seg).unwrap();

    // A payload byte of record 7 (LSN 7), in the middle of the segment.
    let start = ends[5];
    let mut bytes = original.clone();
    bytes[start as usize + RECORD_HEADER_LEN + 20] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();

    let err = verify::run(dir.path()).unwrap_err();
    match &err {
        VerifyLogError::Corrupt {
            segment,
            offset,
            lsn,
            ..
        } => {
            assert_eq!((segment, *offset, *lsn), (&seg, start, 7));
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("00000000000000000000.log") && msg.contains(&format!("offset {start}")),
        "{msg}"
    );

    let err = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap_err();
    match &err {
        OpenLogError::Corrupt {
            segment,
            offset,
            lsn,
            next_good,
            ..
        } => {
            assert_eq!(
                (segment, *offset, *lsn, *next_good),
                (&seg, start, 7, Some(ends[6]))
            );
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        err.to_string().contains(&format!("offset {start}")),
        "{err}"
    );
    // Nothing was truncated.
    assert_eq!(fs::read(&seg).unwrap(), bytes);

    // A length field grown past the end of the file is damage too, not a torn tail.
    let mut bytes = original.clone();
    bytes[start as usize + 3] = 0x01;
    fs::write(&seg, &bytes).unwrap();
    assert!(matches!(
        LogStore::open(&log_dir(dir.path()), &LogConfig::default()),
        Err(OpenLogError::Corrupt { offset, .. }) if offset == start
    ));
    assert!(
        matches!(verify::run(dir.path()), Err(VerifyLogError::Corrupt { offset, .. }) if offset == start)
    );

    // The same flip in the last record is a torn tail: verify reports it, open truncates it.
    let last = ends[ends.len() - 2];
    let mut bytes = original.clone();
    bytes[last as usize + RECORD_HEADER_LEN + 20] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();
    assert!(
        matches!(verify::run(dir.path()), Err(VerifyLogError::TornTail { offset, .. }) if offset == last)
    );
    let (_store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 18);
    assert_eq!(fs::metadata(&seg).unwrap().len(), ends[17]);
    verify::run(dir.path()).unwrap();
}

/// Every byte of the last three records flipped in turn: a flip in the last record is a torn
/// tail, cut back to the last signed batch; a flip in any record before it is refused with its
/// segment, offset and LSN, and the file is left as it was.
#[test]
fn every_flipped_byte_in_the_last_records_is_truncated_in_the_tail_and_refused_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let batches: Vec<_> = (0..8).map(|_| a.batch(2, 30)).collect();
    let ends = write_log(dir.path(), &batches);
    let original = fs::read(first_segment(dir.path())).unwrap();
    let n = ends.len();
    let start_of = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
    let (mut truncated, mut refused) = (0, 0);
    for at in start_of(n - 3)..ends[n - 1] {
        let record = ends.iter().position(|&end| at < end).unwrap();
        let case = tempfile::tempdir().unwrap();
        fs::create_dir(log_dir(case.path())).unwrap();
        let seg = first_segment(case.path());
        let mut bytes = original.clone();
        bytes[at as usize] ^= 0x5a;
        fs::write(&seg, &bytes).unwrap();
        let opened = LogStore::open(&log_dir(case.path()), &LogConfig::default());
        if record == n - 1 {
            // The last record is damaged; the one before it is the unsigned half of its batch.
            let (_store, recovery) = opened.unwrap_or_else(|e| panic!("flip at {at}: {e}"));
            assert_eq!(recovery.last_lsn, n as u64 - 2, "flip at {at}");
            let t = recovery.truncated.expect("the tail was cut");
            assert_eq!(t.torn.map(|(offset, _)| offset), Some(start_of(n - 1)));
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                ends[n - 3],
                "flip at {at}"
            );
            verify::run(case.path()).unwrap();
            truncated += 1;
        } else {
            match opened {
                Err(OpenLogError::Corrupt {
                    segment,
                    offset,
                    lsn,
                    next_good,
                    ..
                }) => assert_eq!(
                    (segment, offset, lsn, next_good),
                    (
                        seg.clone(),
                        start_of(record),
                        record as u64 + 1,
                        Some(ends[record])
                    ),
                    "flip at {at}"
                ),
                Err(other) => panic!("flip at {at}: {other}"),
                Ok(_) => panic!("flip at {at} before the tail was accepted"),
            }
            assert!(
                matches!(verify::run(case.path()), Err(VerifyLogError::Corrupt { offset, .. }) if offset == start_of(record)),
                "flip at {at}"
            );
            assert_eq!(
                fs::read(&seg).unwrap(),
                bytes,
                "flip at {at}: the file changed"
            );
            refused += 1;
        }
    }
    assert_eq!(truncated, ends[n - 1] - start_of(n - 1));
    assert_eq!(refused, ends[n - 2] - start_of(n - 3));
}

#[test]
fn damage_at_the_end_of_a_segment_that_is_not_the_last_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 200,
    };
    let (mut store, _) = LogStore::open(&log_dir(dir.path()), &cfg).unwrap();
    let mut a = ChainBuilder::new(1);
    for _ in 0..10 {
        store.append(&payloads(&a.batch(1, 100))).unwrap();
    }
    drop(store);
    let seg = first_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 1);
    fs::write(&seg, &bytes).unwrap();
    let err = LogStore::open(&log_dir(dir.path()), &cfg).unwrap_err();
    assert!(
        matches!(&err, OpenLogError::Corrupt { segment, damage: RecordDamage::Incomplete, .. } if *segment == seg),
        "{err}"
    );
    assert!(matches!(
        verify::run(dir.path()),
        Err(VerifyLogError::Corrupt { .. })
    ));
}

#[test]
fn rollover_makes_many_segments_readable_from_any_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 600,
    };
    let (mut store, _) = LogStore::open(&log_dir(dir.path()), &cfg).unwrap();
    let mut a = ChainBuilder::new(1);
    let mut b = ChainBuilder::new(2);
    let mut all = Vec::new();
    let mut batch_ends = vec![0];
    for i in 0..60 {
        let batch = if i % 4 == 0 {
            b.batch(1, 20)
        } else {
            a.batch(1 + i % 5, 20)
        };
        store.append(&payloads(&batch)).unwrap();
        all.extend(batch);
        batch_ends.push(all.len() as u64);
    }
    let n = all.len() as u64;
    assert_eq!(store.last_lsn(), n);
    drop(store);

    let names: Vec<String> = {
        let mut v: Vec<String> = fs::read_dir(log_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name != kappakv_server::log::LOCK_FILE_NAME)
            .collect();
        v.sort();
        v
    };
    assert!(names.len() > 10, "{names:?}");
    let reader = LogReader::open(&log_dir(dir.path())).unwrap();
    assert_eq!(reader.last_lsn().unwrap(), n);

    for after in 0..n {
        for upto in [after + 1, (after + 7).min(n), n] {
            let got: Vec<_> = reader
                .iter(after, upto)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let want: Vec<_> = (after + 1..=upto)
                .zip(all[after as usize..upto as usize].iter().cloned())
                .collect();
            assert_eq!(got, want, "({after}, {upto}]");
        }
    }
    // A fresh reader, starting in the middle.
    let fresh = LogReader::open(&log_dir(dir.path())).unwrap();
    let got: Vec<_> = fresh
        .iter(n / 2, n)
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(got, (n / 2 + 1..=n).collect::<Vec<_>>());
    assert_eq!(fresh.iter(n, n).unwrap().count(), 0);
    // Asking past the end of the log is an error, not a short read.
    assert!(fresh.iter(0, n + 1).unwrap().any(|r| r.is_err()));

    let (mut store, recovery) = LogStore::open(&log_dir(dir.path()), &cfg).unwrap();
    assert_eq!(recovery.segments, names.len());
    assert_eq!(recovery.last_lsn, n);
    let more = a.batch(3, 20);
    store.append(&payloads(&more)).unwrap();
    drop(store);
    let summary = verify::run(dir.path()).unwrap();
    assert_eq!(summary.entries, n + 3);
    read_all_checked(&log_dir(dir.path()), n + 3);

    // Each segment is named for the records before it, and no batch spans two segments.
    let mut count = 0;
    for name in &names {
        assert_eq!(name, &segment_name(count), "segments: {names:?}");
        assert!(
            batch_ends.contains(&count),
            "segment {name} starts inside a batch"
        );
        let bytes = fs::read(log_dir(dir.path()).join(name)).unwrap();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            at += RECORD_HEADER_LEN + len;
            count += 1;
        }
    }
}

#[test]
fn a_missing_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes_max: 100,
    };
    let (mut store, _) = LogStore::open(&log_dir(dir.path()), &cfg).unwrap();
    let mut a = ChainBuilder::new(1);
    for _ in 0..5 {
        store.append(&payloads(&a.batch(1, 100))).unwrap();
    }
    drop(store);
    fs::remove_file(log_dir(dir.path()).join(segment_name(2))).unwrap();
    let err = LogStore::open(&log_dir(dir.path()), &cfg).unwrap_err();
    assert!(
        matches!(err, OpenLogError::SegmentBase { expected: 2, .. }),
        "{err}"
    );
    assert!(matches!(
        verify::run(dir.path()),
        Err(VerifyLogError::SegmentBase { expected: 2, .. })
    ));
}
