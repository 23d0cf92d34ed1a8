//! The log store on real files: appends, recovery of torn tails, refusal of mid-log damage,
//! rollover, and reading by LSN.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{ChainBuilder, payloads, read_all_checked};
use kappakv_protocol::record::RECORD_HEADER_LEN;
use kappakv_protocol::{FramingError, SignedEntry};
use kappakv_server::commands::verify::{self, VerifyLogError};
use kappakv_server::log::recovery::{TORN_WRITE_BLOCK_BYTES, TORN_WRITE_BYTES_MAX, TornWrite};
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
fn zeros_after_the_last_record_end_the_log_and_are_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let ends = write_log(dir.path(), &[a.batch(2, 10), a.batch(1, 10)]);
    let seg = first_segment(dir.path());
    // A store closed cleanly cuts the zeros it wrote ahead of its records.
    assert_eq!(fs::metadata(&seg).unwrap().len(), ends[2]);
    // Zeros after the last record, as a store that was killed leaves them.
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0; 4096]);
    fs::write(&seg, &bytes).unwrap();
    let (mut store, recovery) =
        LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 3);
    assert!(recovery.truncated.is_none(), "{:?}", recovery.truncated);
    assert_eq!(recovery.bytes, ends[2]);
    assert_eq!(verify::run(dir.path()).unwrap().entries, 3);
    // The next batch goes where the records end, over the zeros.
    store.append(&payloads(&a.batch(1, 10))).unwrap();
    drop(store);
    let (_store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 4);
    assert!(recovery.truncated.is_none());
    assert_eq!(fs::metadata(&seg).unwrap().len(), recovery.bytes);
}

#[test]
fn unsigned_records_before_zeros_are_cut_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let ends = write_log(dir.path(), &[a.batch(2, 10), a.batch(2, 10)]);
    let seg = first_segment(dir.path());
    // The last record (the signed end of the second batch) lost, zeros after the unsigned one.
    let mut bytes = fs::read(&seg).unwrap();
    bytes.truncate(ends[2] as usize);
    bytes.extend_from_slice(&[0; 4096]);
    fs::write(&seg, &bytes).unwrap();
    let (_store, recovery) = LogStore::open(&log_dir(dir.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 2);
    let t = recovery.truncated.unwrap();
    assert_eq!((t.new_len, t.unsigned_records, t.torn), (ends[1], 1, None));
    assert_eq!(fs::metadata(&seg).unwrap().len(), ends[1]);
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
        ..LogConfig::default()
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
        ..LogConfig::default()
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
        ..LogConfig::default()
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

/// Offset of the first aligned block that starts at or after `at`.
fn block_at_or_after(at: u64) -> u64 {
    at.div_ceil(TORN_WRITE_BLOCK_BYTES) * TORN_WRITE_BLOCK_BYTES
}

/// Writes `bytes` as the first segment of a fresh data dir.
fn data_dir_with_segment(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(log_dir(dir.path())).unwrap();
    fs::write(first_segment(dir.path()), bytes).unwrap();
    dir
}

/// What a crash can leave of the last batch when the file system persisted later blocks of its
/// write but not an earlier one: a block of zeros with whole records of the batch after it.
/// Every such block of the last batch in turn: the log opens at the end of the batches before it
/// (all acknowledged), and the truncation says where the hole was and what was cut.
#[test]
fn a_hole_in_the_last_batch_before_whole_records_of_it_is_cut_back_to_the_batches_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let mut batches: Vec<_> = (0..6).map(|_| a.batch(2, 300)).collect();
    batches.push(a.batch(60, 300));
    let ends = write_log(dir.path(), &batches);
    let original = fs::read(first_segment(dir.path())).unwrap();
    let acknowledged = 12;
    let batch_start = ends[acknowledged - 1];
    let start_of = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
    let entries: Vec<SignedEntry> = batches.iter().flatten().cloned().collect();

    let mut cases = 0;
    let mut hole = block_at_or_after(batch_start);
    // Blocks with a whole record of the batch after them.
    while hole + TORN_WRITE_BLOCK_BYTES <= start_of(ends.len() - 1) {
        let mut bytes = original.clone();
        bytes[hole as usize..(hole + TORN_WRITE_BLOCK_BYTES) as usize].fill(0);
        let case = data_dir_with_segment(&bytes);
        let seg = first_segment(case.path());
        // The damaged record is the one the hole begins in; the first good one starts after it.
        let damaged = ends.iter().position(|&end| end > hole).unwrap();
        let next = (damaged..ends.len())
            .find(|&i| start_of(i) >= hole + TORN_WRITE_BLOCK_BYTES)
            .unwrap();

        let (mut store, recovery) = LogStore::open(&log_dir(case.path()), &LogConfig::default())
            .unwrap_or_else(|e| panic!("hole at {hole}: {e}"));
        assert_eq!(recovery.last_lsn, acknowledged as u64, "hole at {hole}");
        let t = recovery.truncated.expect("the torn write was cut");
        assert_eq!(
            (t.segment.clone(), t.old_len, t.new_len),
            (seg.clone(), original.len() as u64, batch_start),
            "hole at {hole}"
        );
        assert_eq!(
            t.torn.as_ref().map(|(offset, _)| *offset),
            Some(start_of(damaged))
        );
        assert_eq!(
            t.torn_write,
            Some(TornWrite {
                hole,
                next_good: start_of(next),
                records_after: (ends.len() - next) as u64,
            }),
            "hole at {hole}"
        );
        assert_eq!(t.unsigned_records, (damaged - acknowledged) as u64);
        assert_eq!(fs::metadata(&seg).unwrap().len(), batch_start);
        let head = recovery.heads[&a.keypair.node_id()];
        assert_eq!(head.id, entries[acknowledged - 1].id);

        // The log goes on from the acknowledged batches.
        let mut resume = ChainBuilder {
            keypair: a.keypair.clone(),
            head: Some(head),
        };
        let more = resume.batch(2, 10);
        assert_eq!(
            store.append(&payloads(&more)).unwrap(),
            acknowledged as u64 + 2
        );
        drop(store);
        let all = read_all_checked(&log_dir(case.path()), acknowledged as u64 + 2);
        assert_eq!(
            all[..acknowledged],
            read_all_checked(&log_dir(dir.path()), 72)[..acknowledged]
        );
        verify::run(case.path()).unwrap();
        cases += 1;
        hole += TORN_WRITE_BLOCK_BYTES;
    }
    assert!(cases >= 4, "{cases} holes tried");
}

/// A hole that begins exactly where a record of the last batch begins: the damaged record's
/// length reads zero.
#[test]
fn a_hole_at_a_record_boundary_of_the_last_batch_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let first = a.batch(3, 200);
    // The last batch: a record sized so that the next one starts on a block boundary, then
    // whole records filling two more blocks.
    let start = payloads(&first)
        .iter()
        .map(|p| (RECORD_HEADER_LEN + p.len()) as u64)
        .sum::<u64>();
    let probe_len = {
        let mut probe = ChainBuilder {
            keypair: a.keypair.clone(),
            head: a.head,
        };
        (RECORD_HEADER_LEN + probe.next(1000, false).encode_payload().len()) as u64
    };
    let boundary = block_at_or_after(start + probe_len);
    let value_len = 1000 + (boundary - start - probe_len) as usize;
    let mut last = vec![a.next(value_len, false)];
    last.extend(a.batch(30, 300));
    let ends = write_log(dir.path(), &[first, last]);
    assert_eq!(ends[3], boundary);

    let mut bytes = fs::read(first_segment(dir.path())).unwrap();
    bytes[boundary as usize..(boundary + TORN_WRITE_BLOCK_BYTES) as usize].fill(0);
    let case = data_dir_with_segment(&bytes);
    let (_store, recovery) = LogStore::open(&log_dir(case.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, 3);
    let t = recovery.truncated.unwrap();
    assert_eq!(
        t.torn,
        Some((boundary, RecordDamage::Framing(FramingError::Empty)))
    );
    assert_eq!(t.torn_write.unwrap().hole, boundary);
    assert_eq!((t.new_len, t.unsigned_records), (ends[2], 1));
    verify::run(case.path()).unwrap();
}

/// Damage a crash cannot leave is refused with its segment and offset, while the same block of
/// zeros in the last batch is cut: non-zero bytes in place of the zeros, a block of zeros in an
/// acknowledged batch further from the end than one write spans, and a block of zeros in a
/// segment that is not the last.
#[test]
fn damage_a_crash_cannot_leave_is_refused_while_a_hole_in_the_last_batch_is_cut() {
    fn refused_at(data: &Path, seg: &Path, offset: u64, next_good: Option<u64>) {
        let before = fs::read(seg).unwrap();
        match LogStore::open(&log_dir(data), &LogConfig::default()) {
            Err(OpenLogError::Corrupt {
                segment,
                offset: at,
                next_good: good,
                ..
            }) => assert_eq!(
                (&segment, at, good),
                (&seg.to_path_buf(), offset, next_good)
            ),
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => panic!("damage at {offset} of {} was accepted", seg.display()),
        }
        assert_eq!(fs::read(seg).unwrap(), before, "the segment changed");
    }

    // One small acknowledged batch, acknowledged batches of about 1 MB each filling more than
    // one write's span, and a last batch of small records.
    let dir = tempfile::tempdir().unwrap();
    let mut a = ChainBuilder::new(1);
    let mut batches = vec![a.batch(30, 300)];
    let big = (TORN_WRITE_BYTES_MAX / 1_000_000 + 2) as usize;
    batches.extend((0..big).map(|_| a.batch(1, 1_000_000)));
    batches.push(a.batch(60, 300));
    let ends = write_log(dir.path(), &batches);
    let original = fs::read(first_segment(dir.path())).unwrap();
    let start_of = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
    let record_at = |offset: u64| ends.iter().position(|&end| end > offset).unwrap();
    let next_after = |offset: u64| {
        let i = (0..ends.len()).find(|&i| start_of(i) >= offset).unwrap();
        start_of(i)
    };
    let acknowledged = 30 + big;
    let last_start = ends[acknowledged - 1];

    // Zeros in the last batch: cut back to the batches before it.
    let hole = block_at_or_after(last_start);
    let mut bytes = original.clone();
    bytes[hole as usize..(hole + TORN_WRITE_BLOCK_BYTES) as usize].fill(0);
    let case = data_dir_with_segment(&bytes);
    let (_store, recovery) = LogStore::open(&log_dir(case.path()), &LogConfig::default()).unwrap();
    assert_eq!(recovery.last_lsn, acknowledged as u64);
    let t = recovery.truncated.unwrap();
    assert_eq!(t.new_len, last_start);
    assert_eq!(t.torn_write.unwrap().hole, hole);
    drop(case);

    // Non-zero bytes in the same block: refused.
    let mut bytes = original.clone();
    bytes[hole as usize..(hole + TORN_WRITE_BLOCK_BYTES) as usize].fill(0x5a);
    let case = data_dir_with_segment(&bytes);
    refused_at(
        case.path(),
        &first_segment(case.path()),
        start_of(record_at(hole)),
        Some(next_after(hole + TORN_WRITE_BLOCK_BYTES)),
    );
    drop(case);

    // Zeros in the first batch, more than one write's span from the end: refused.
    let early = TORN_WRITE_BLOCK_BYTES;
    assert!(early + TORN_WRITE_BLOCK_BYTES < ends[29]);
    assert!(original.len() as u64 - start_of(record_at(early)) > TORN_WRITE_BYTES_MAX);
    let mut bytes = original.clone();
    bytes[early as usize..(early + TORN_WRITE_BLOCK_BYTES) as usize].fill(0);
    let case = data_dir_with_segment(&bytes);
    refused_at(
        case.path(),
        &first_segment(case.path()),
        start_of(record_at(early)),
        Some(next_after(early + TORN_WRITE_BLOCK_BYTES)),
    );
    drop(case);

    // Zeros in a segment that is not the last, with good records after them in it: refused,
    // though the same zeros in the last segment's last batch are cut.
    let cfg = LogConfig {
        segment_bytes_max: 64 * 1024,
        ..LogConfig::default()
    };
    let multi = tempfile::tempdir().unwrap();
    let (mut store, _) = LogStore::open(&log_dir(multi.path()), &cfg).unwrap();
    let mut b = ChainBuilder::new(2);
    for _ in 0..12 {
        store.append(&payloads(&b.batch(30, 300))).unwrap();
    }
    drop(store);
    let mut names: Vec<String> = fs::read_dir(log_dir(multi.path()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != kappakv_server::log::LOCK_FILE_NAME)
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    let last_name = names.last().unwrap().clone();
    for (name, accepted) in [(names[0].clone(), false), (last_name, true)] {
        let case = tempfile::tempdir().unwrap();
        fs::create_dir(log_dir(case.path())).unwrap();
        for n in &names {
            fs::copy(log_dir(multi.path()).join(n), log_dir(case.path()).join(n)).unwrap();
        }
        let seg = log_dir(case.path()).join(&name);
        // Record boundaries of this segment, the end included.
        let mut bytes = fs::read(&seg).unwrap();
        let mut starts = vec![0u64];
        let mut at = 0usize;
        while at < bytes.len() {
            let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            at += RECORD_HEADER_LEN + n;
            starts.push(at as u64);
        }
        // A block in the segment's last batch of 30 records.
        let hole = block_at_or_after(starts[starts.len() - 31]);
        bytes[hole as usize..(hole + TORN_WRITE_BLOCK_BYTES) as usize].fill(0);
        fs::write(&seg, &bytes).unwrap();
        let damaged = *starts.iter().filter(|&&s| s <= hole).max().unwrap();
        let next_good = *starts
            .iter()
            .find(|&&s| s >= hole + TORN_WRITE_BLOCK_BYTES)
            .unwrap();
        if accepted {
            let (_store, recovery) = LogStore::open(&log_dir(case.path()), &cfg).unwrap();
            let t = recovery.truncated.unwrap();
            let w = t.torn_write.unwrap();
            assert_eq!(
                (t.segment, t.torn.unwrap().0, w.hole, w.next_good),
                (seg, damaged, hole, next_good)
            );
        } else {
            // Only the last segment is searched for good records after damage.
            refused_at(case.path(), &seg, damaged, None);
        }
    }
}

#[test]
fn verify_reports_its_progress_in_bytes_up_to_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut chain = ChainBuilder::new(4);
    let batches: Vec<Vec<SignedEntry>> = (0..40).map(|_| chain.batch(8, 64 * 1024)).collect();
    write_log(dir.path(), &batches);
    let mut calls = Vec::new();
    let summary =
        verify::run_observed(dir.path(), &mut |done, total| calls.push((done, total))).unwrap();
    assert_eq!(summary.entries, 320);
    let &(done, total) = calls.last().expect("progress was reported");
    assert_eq!((done, total), (summary.bytes, summary.bytes));
    // 20 MiB: reported along the way, never going backwards.
    assert!(calls.len() > 2, "{calls:?}");
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
}
