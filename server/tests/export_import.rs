//! Offline sync: `kappakv export` and `kappakv import` over real log directories, through the
//! library and through the binary; and the log's lock.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ChainBuilder, payloads, read_all_checked};
use kappakv_protocol::record::{RECORD_HEADER_LEN, RecordDecode, decode_record, encode_record};
use kappakv_protocol::{EntryId, NodeId, SignedEntry};
use kappakv_server::commands::export::{self, ExportSummary, VersionVector};
use kappakv_server::commands::import::{
    self, ImportSource, ImportSummary, RejectReason, Rejection,
};
use kappakv_server::commands::live::BoundError;
use kappakv_server::commands::verify;
use kappakv_server::log::{LogConfig, LogReader, LogStore, OpenLogError};

fn log_dir(data: &Path) -> PathBuf {
    data.join("log")
}

/// Writes `batches` to a new log in `data`, one append each.
fn write_log(data: &Path, batches: &[Vec<SignedEntry>]) {
    let (mut store, _) = LogStore::open(&log_dir(data), &LogConfig::default()).unwrap();
    for batch in batches {
        store.append(&payloads(batch)).unwrap();
    }
}

/// Three authors, interleaved the way a node's log interleaves its own and its peers' batches.
fn three_author_batches() -> (Vec<ChainBuilder>, Vec<Vec<SignedEntry>>) {
    let mut authors: Vec<ChainBuilder> = (1..=3).map(ChainBuilder::new).collect();
    let mut batches = Vec::new();
    for round in 0..12 {
        let which = round % 3;
        let n = 1 + round % 4;
        batches.push(authors[which].batch(n, 16));
    }
    // One batch holding two authors, each ending signed.
    let mut mixed = authors[0].batch(2, 8);
    mixed.extend(authors[1].batch(3, 8));
    batches.push(mixed);
    (authors, batches)
}

fn export_bytes(data: &Path, since: Option<&VersionVector>) -> (Vec<u8>, ExportSummary) {
    let mut out = Vec::new();
    let summary = export::run(data, since, &mut out, "memory").unwrap();
    assert_eq!(summary.bytes, out.len() as u64);
    (out, summary)
}

fn import_bytes(data: &Path, inputs: &[&[u8]]) -> ImportSummary {
    let sources: Vec<ImportSource> = inputs
        .iter()
        .enumerate()
        .map(|(i, bytes)| ImportSource {
            name: format!("input-{i}"),
            bytes: bytes.to_vec(),
        })
        .collect();
    import::run_sources(data, &sources, None).unwrap()
}

/// Every entry of a log, by id.
fn entry_set(data: &Path) -> BTreeSet<EntryId> {
    let reader = LogReader::open(&log_dir(data)).unwrap();
    let upto = reader.last_lsn().unwrap();
    reader
        .iter(0, upto)
        .unwrap()
        .map(|r| r.unwrap().1.id)
        .collect()
}

/// The records of an export, each as its whole bytes.
fn split_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_record(&bytes[at..], usize::MAX).unwrap() {
            RecordDecode::Record { used, .. } => {
                out.push(bytes[at..at + used].to_vec());
                at += used;
            }
            RecordDecode::NeedMore { .. } => panic!("torn export"),
        }
    }
    out
}

fn decode_all(bytes: &[u8]) -> Vec<SignedEntry> {
    split_records(bytes)
        .iter()
        .map(|r| SignedEntry::decode_payload(&r[RECORD_HEADER_LEN..]).unwrap())
        .collect()
}

/// A small deterministic shuffle (xorshift), so the test needs no extra dependency.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = usize::try_from(seed % (i as u64 + 1)).unwrap();
        items.swap(i, j);
    }
}

#[test]
fn export_then_import_into_a_fresh_dir_copies_the_log_and_is_idempotent() {
    let a = tempfile::tempdir().unwrap();
    let (_, batches) = three_author_batches();
    write_log(a.path(), &batches);
    let total: usize = batches.iter().map(Vec::len).sum();

    let (bytes, summary) = export_bytes(a.path(), None);
    assert_eq!(summary.entries, total as u64);
    assert_eq!(summary.authors, 3);
    assert_eq!(summary.held_back, 0);
    // The export is the log's own records, in log order.
    let exported: Vec<EntryId> = decode_all(&bytes).iter().map(|e| e.id).collect();
    let in_log: Vec<EntryId> = batches.iter().flatten().map(|e| e.id).collect();
    assert_eq!(exported, in_log);

    let b = tempfile::tempdir().unwrap();
    let first = import_bytes(b.path(), &[&bytes]);
    assert_eq!((first.new, first.present), (total as u64, 0));
    assert!(first.rejected.is_empty(), "{:?}", first.rejected);
    assert_eq!(entry_set(b.path()), entry_set(a.path()));
    assert_eq!(verify::run(b.path()).unwrap().entries, total as u64);

    let again = import_bytes(b.path(), &[&bytes]);
    assert_eq!((again.new, again.present), (0, total as u64));
    assert!(again.rejected.is_empty());
    assert_eq!(
        again.to_string(),
        format!("0 new, {total} already present, 0 rejected")
    );
    assert_eq!(verify::run(b.path()).unwrap().entries, total as u64);
}

#[test]
fn import_takes_only_the_allowed_writers_and_keeps_one_run_open_at_a_time() {
    let a = tempfile::tempdir().unwrap();
    let (authors, batches) = three_author_batches();
    write_log(a.path(), &batches);
    let (bytes, _) = export_bytes(a.path(), None);
    let allowed: std::collections::HashSet<NodeId> =
        authors[..2].iter().map(|c| c.keypair.node_id()).collect();
    let outsider = authors[2].keypair.node_id();

    let b = tempfile::tempdir().unwrap();
    let source = ImportSource {
        name: "input".into(),
        bytes,
    };
    let summary = import::run_sources(b.path(), &[source], Some(allowed.clone())).unwrap();
    let of = |author: &NodeId| {
        batches
            .iter()
            .flatten()
            .filter(|e| e.entry.author == *author)
            .count() as u64
    };
    assert_eq!(summary.new, allowed.iter().map(of).sum::<u64>());
    assert_eq!(summary.rejected.len() as u64, of(&outsider));
    for r in &summary.rejected {
        assert!(
            matches!(r, Rejection::Entry { author, reason: RejectReason::NotAllowed, .. } if *author == outsider),
            "{r}"
        );
    }
    // Runs are appended whole, one author's at a time.
    common::assert_one_open_run(&read_all_checked(&log_dir(b.path()), summary.new));
}

#[test]
fn import_refuses_an_unsigned_run_longer_than_any_peer_would_take() {
    let mut chain = ChainBuilder::new(9);
    // 20 unsigned entries of 1 MiB, then one signed: 20 MiB waiting for one signature.
    let mut entries: Vec<SignedEntry> = (0..20).map(|_| chain.next(1 << 20, false)).collect();
    entries.push(chain.next(8, true));
    let mut bytes = Vec::new();
    for p in payloads(&entries) {
        encode_record(&p, &mut bytes);
    }
    let b = tempfile::tempdir().unwrap();
    let summary = import_bytes(b.path(), &[&bytes]);
    assert_eq!(summary.new, 0);
    assert_eq!(summary.rejected.len(), entries.len());
    assert!(summary.rejected.iter().any(|r| matches!(
        r,
        Rejection::Entry {
            reason: RejectReason::RunTooLong { .. },
            ..
        }
    )));
}

#[test]
fn concatenated_and_shuffled_exports_import_as_one() {
    let a = tempfile::tempdir().unwrap();
    let (mut authors, batches) = three_author_batches();
    write_log(a.path(), &batches);
    let (first, _) = export_bytes(a.path(), None);
    // More writes on A, exported since what the receiver has.
    let more = vec![authors[2].batch(3, 4), authors[0].batch(1, 4)];
    let (mut store, recovery) = LogStore::open(&log_dir(a.path()), &LogConfig::default()).unwrap();
    for batch in &more {
        store.append(&payloads(batch)).unwrap();
    }
    drop(store);
    let vv: VersionVector = recovery.heads.iter().map(|(a, h)| (*a, h.seq)).collect();
    let (second, summary) = export_bytes(a.path(), Some(&vv));
    assert_eq!(summary.entries, 4, "only what the version vector lacks");

    // Concatenated: one input holding both files, the second one first.
    let b = tempfile::tempdir().unwrap();
    let both = [second.clone(), first.clone()].concat();
    let imported = import_bytes(b.path(), &[&both]);
    assert!(imported.rejected.is_empty(), "{:?}", imported.rejected);
    assert_eq!(entry_set(b.path()), entry_set(a.path()));
    read_all_checked(&log_dir(b.path()), imported.last_lsn);

    // Shuffled: every record of both files, with duplicates, in a random order.
    let c = tempfile::tempdir().unwrap();
    let mut records = split_records(&both);
    records.extend(split_records(&first));
    shuffle(&mut records, 0x9e37_79b9_7f4a_7c15);
    let imported = import_bytes(c.path(), &[&records.concat()]);
    assert!(imported.rejected.is_empty(), "{:?}", imported.rejected);
    assert_eq!(imported.new, entry_set(a.path()).len() as u64);
    assert_eq!(entry_set(c.path()), entry_set(a.path()));
    read_all_checked(&log_dir(c.path()), imported.last_lsn);
}

/// Flips the first byte of the `len`-byte value in a record payload of [`ChainBuilder`]: the
/// MessagePack `bin 8` marker and length, followed by `len` equal bytes.
fn flip_value_byte(payload: &mut [u8], len: u8) {
    let n = usize::from(len);
    let at = (0..payload.len() - n - 2)
        .find(|&i| {
            payload[i] == 0xc4
                && payload[i + 1] == len
                && payload[i + 2..i + 2 + n]
                    .iter()
                    .all(|b| *b == payload[i + 2])
        })
        .expect("a value of that length")
        + 2;
    payload[at] ^= 0x55;
}

#[test]
fn a_forged_record_rejects_exactly_the_run_it_breaks() {
    let src = tempfile::tempdir().unwrap();
    let mut x = ChainBuilder::new(1);
    let mut y = ChainBuilder::new(2);
    // x: 1..=3 signed at 3, 4..=6 signed at 6, 7..=8 signed at 8; y: interleaved, all fine.
    let batches = vec![
        x.batch(3, 8),
        y.batch(2, 8),
        x.batch(3, 8),
        y.batch(2, 8),
        x.batch(2, 8),
    ];
    write_log(src.path(), &batches);
    let (bytes, _) = export_bytes(src.path(), None);
    let mut records = split_records(&bytes);
    let x_id = x.keypair.node_id();

    // Forge x's seq 5 (unsigned, inside the run 4..=6): flip a value byte, fix the CRC.
    let at = decode_all(&bytes)
        .iter()
        .position(|e| e.entry.author == x_id && e.entry.seq == 5)
        .unwrap();
    let mut payload = records[at][RECORD_HEADER_LEN..].to_vec();
    flip_value_byte(&mut payload, 8);
    let forged = SignedEntry::decode_payload(&payload).expect("still a canonical entry");
    let mut record = Vec::new();
    encode_record(&payload, &mut record);
    records[at] = record;

    let dst = tempfile::tempdir().unwrap();
    let summary = import_bytes(dst.path(), &[&records.concat()]);
    // x keeps 1..=3; 4..=8 are rejected; y is whole.
    assert_eq!(summary.new, 3 + 4);
    let rejected: Vec<(NodeId, u64, RejectReason)> = summary
        .rejected
        .iter()
        .map(|r| match r {
            Rejection::Entry {
                author,
                seq,
                reason,
                ..
            } => (*author, *seq, reason.clone()),
            other => panic!("unexpected {other}"),
        })
        .collect();
    let seqs: Vec<u64> = rejected.iter().map(|r| r.1).collect();
    assert_eq!(seqs, vec![4, 5, 6, 7, 8]);
    assert!(rejected.iter().all(|r| r.0 == x_id));
    assert_eq!(rejected[0].2, RejectReason::Unsigned { broken_at: Some(6) });
    assert_eq!(rejected[1].2, RejectReason::Unsigned { broken_at: Some(6) });
    assert!(matches!(rejected[2].2, RejectReason::BadLink { .. }));
    assert_eq!(rejected[3].2, RejectReason::AfterRejected { seq: 6 });
    assert!(
        summary.rejected[1]
            .to_string()
            .contains(&forged.id.to_string()),
        "{}",
        summary.rejected[1]
    );
    let heads = LogStore::open(&log_dir(dst.path()), &LogConfig::default())
        .unwrap()
        .1
        .heads;
    assert_eq!(heads[&x_id].seq, 3);
    assert_eq!(heads[&y.keypair.node_id()].seq, 4);
    verify::run(dst.path()).unwrap();

    // A forged signed entry: its own signature no longer covers it.
    let at = decode_all(&bytes)
        .iter()
        .position(|e| e.entry.author == x_id && e.entry.seq == 8)
        .unwrap();
    let mut records = split_records(&bytes);
    let mut payload = records[at][RECORD_HEADER_LEN..].to_vec();
    flip_value_byte(&mut payload, 8);
    let mut record = Vec::new();
    encode_record(&payload, &mut record);
    records[at] = record;
    let dst2 = tempfile::tempdir().unwrap();
    let summary = import_bytes(dst2.path(), &[&records.concat()]);
    assert_eq!(summary.new, 6 + 4);
    let reasons: Vec<String> = summary.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(summary.rejected.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("seq 7") && reasons[0].contains("not covered by a signature"));
    assert!(reasons[1].contains("seq 8") && reasons[1].ends_with("bad signature"));
}

#[test]
fn equivocations_gaps_and_damaged_inputs_are_reported() {
    let a = tempfile::tempdir().unwrap();
    let mut x = ChainBuilder::new(1);
    write_log(a.path(), &[x.batch(2, 8)]);
    // A different x seq 2, signed by x: an equivocation against the log.
    let mut other = ChainBuilder::new(1);
    let one = other.next(8, false);
    let mut two = other.next(9, true);
    assert_eq!(one.entry.seq, 1);
    assert_eq!(two.entry.seq, 2);
    let mut bytes = Vec::new();
    encode_record(&two.encode_payload(), &mut bytes);
    // A chain that starts after a gap.
    let mut z = ChainBuilder::new(3);
    let _ = z.batch(2, 4);
    let gapped = z.batch(2, 4);
    for e in &gapped {
        encode_record(&e.encode_payload(), &mut bytes);
    }
    // A record whose payload is not an entry, then a torn one.
    encode_record(b"\x92\xc0\xc0", &mut bytes);
    let mut torn = Vec::new();
    two.entry.seq = 3;
    encode_record(&two.encode_payload(), &mut torn);
    bytes.extend_from_slice(&torn[..torn.len() - 5]);

    let summary = import_bytes(a.path(), &[&bytes]);
    assert_eq!((summary.new, summary.present), (0, 0));
    let lines: Vec<String> = summary.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(lines[0].starts_with("input-0 at offset ") && lines[0].contains("malformed"));
    assert!(lines[1].contains("torn record at the end of the file"));
    let equivocation = summary
        .rejected
        .iter()
        .find(|r| {
            matches!(
                r,
                Rejection::Entry {
                    reason: RejectReason::Equivocation { .. },
                    ..
                }
            )
        })
        .unwrap();
    assert!(equivocation.to_string().contains("seq 2"), "{equivocation}");
    let gaps = summary
        .rejected
        .iter()
        .filter(|r| {
            matches!(
                r,
                Rejection::Entry {
                    reason: RejectReason::Gap { missing: 1 },
                    ..
                }
            )
        })
        .count();
    assert_eq!(gaps, 2);
    assert_eq!(verify::run(a.path()).unwrap().entries, 2);
}

#[test]
fn export_ends_every_chain_at_a_signed_entry() {
    let a = tempfile::tempdir().unwrap();
    let mut x = ChainBuilder::new(1);
    let mut y = ChainBuilder::new(2);
    // The tail as a writer that stopped mid-batch leaves it: y's run is not signed yet.
    let signed = vec![x.batch(2, 8), y.batch(1, 8)];
    let tail = vec![y.next(8, false), x.next(8, true), y.next(8, false)];
    let mut batches = signed.clone();
    batches.push(tail);
    write_log(a.path(), &batches);
    let (bytes, summary) = export_bytes(a.path(), None);
    assert_eq!(
        (summary.entries, summary.held_back, summary.through_lsn),
        (3, 3, 3)
    );
    assert!(summary.to_string().contains("left out 3 later entries"));
    let ids: Vec<EntryId> = decode_all(&bytes).iter().map(|e| e.id).collect();
    let want: Vec<EntryId> = signed.iter().flatten().map(|e| e.id).collect();
    assert_eq!(ids, want);
    // The export changed nothing: once y's run ends signed, all of it goes.
    let segment = log_dir(a.path()).join("00000000000000000000.log");
    let mut record = Vec::new();
    encode_record(&y.next(8, true).encode_payload(), &mut record);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(segment)
        .unwrap();
    std::io::Write::write_all(&mut file, &record).unwrap();
    let (_, summary) = export_bytes(a.path(), None);
    assert_eq!((summary.entries, summary.held_back), (7, 0));
}

#[test]
fn export_since_a_version_vector_and_a_status_json() {
    let a = tempfile::tempdir().unwrap();
    let mut x = ChainBuilder::new(1);
    let mut y = ChainBuilder::new(2);
    write_log(a.path(), &[x.batch(3, 8), y.batch(2, 8), x.batch(2, 8)]);
    let x_id = x.keypair.node_id();
    let y_id = y.keypair.node_id();
    let status = format!(
        r#"{{"node_id": "{y_id}", "log_lsn": 4, "version_vector": {{"{x_id}": 2, "{y_id}": 2}}, "peers": []}}"#
    );
    let vv = export::parse_version_vector(&status).unwrap();
    assert_eq!(vv, HashMap::from([(x_id, 2), (y_id, 2)]));
    let (bytes, summary) = export_bytes(a.path(), Some(&vv));
    let got: Vec<(NodeId, u64)> = decode_all(&bytes)
        .iter()
        .map(|e| (e.entry.author, e.entry.seq))
        .collect();
    assert_eq!(got, vec![(x_id, 3), (x_id, 4), (x_id, 5)]);
    assert_eq!(summary.authors, 1);

    let plain = export::parse_version_vector(&format!(r#"{{"{x_id}": 4}}"#)).unwrap();
    let (bytes, _) = export_bytes(a.path(), Some(&plain));
    assert_eq!(decode_all(&bytes).len(), 1 + 2);

    assert!(
        export::parse_version_vector(r#"{"zz": 1}"#)
            .unwrap_err()
            .contains("not a node id")
    );
    assert!(export::parse_version_vector(&format!(r#"{{"{x_id}": -1}}"#)).is_err());
    assert!(export::parse_version_vector("[1]").is_err());
}

#[test]
fn a_second_store_cannot_open_a_locked_log() {
    let a = tempfile::tempdir().unwrap();
    let (store, _) = LogStore::open(&log_dir(a.path()), &LogConfig::default()).unwrap();
    let err = LogStore::open(&log_dir(a.path()), &LogConfig::default()).unwrap_err();
    assert!(matches!(err, OpenLogError::Locked { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&a.path().display().to_string())
            && text.contains("is kappakv serve running?"),
        "{text}"
    );
    // Import needs the lock. Export reads next to an appender only up to what a running node
    // reports durable; with no node to ask, it refuses instead of guessing.
    let err = import::run_sources(a.path(), &[], None).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    let err = export::run(a.path(), None, &mut Vec::new(), "memory").unwrap_err();
    assert!(
        matches!(err, export::ExportError::Bound(BoundError::NoTicket { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("in use by another process")
            && err.to_string().contains("client.ticket"),
        "{err}"
    );
    drop(store);
    export_bytes(a.path(), None);
    LogStore::open(&log_dir(a.path()), &LogConfig::default()).unwrap();
}

fn kappakv(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kappakv"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KAPPAKV_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).output().unwrap()
}

#[test]
fn cli_export_and_import() {
    let a = tempfile::tempdir().unwrap();
    let (_, batches) = three_author_batches();
    write_log(a.path(), &batches);
    let total: usize = batches.iter().map(Vec::len).sum();
    let a_dir = a.path().to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("a.kv");
    let file = file.to_str().unwrap();

    let out = kappakv(&["export", "--data-dir", a_dir, "--out", file]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("exported {total} entries from 3 authors")),
        "{stderr}"
    );
    // To standard output, the same bytes.
    let out = kappakv(&["export", "--data-dir", a_dir]);
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(file).unwrap());

    let b = tempfile::tempdir().unwrap();
    let b_dir = b.path().to_str().unwrap();
    let out = kappakv(&["import", "--data-dir", b_dir, file, file]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{total} new, 0 already present, 0 rejected\n")
    );

    // A damaged input: exit 1, one line per rejection, the rest imported.
    let mut bytes = std::fs::read(file).unwrap();
    bytes.truncate(bytes.len() - 3);
    let torn = work.path().join("torn.kv");
    std::fs::write(&torn, &bytes).unwrap();
    let c = tempfile::tempdir().unwrap();
    let out = kappakv(&[
        "import",
        "--data-dir",
        c.path().to_str().unwrap(),
        torn.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("rejected: ") && stdout.contains("torn record"),
        "{stdout}"
    );

    // While the log is locked: exit 2 and a one-line reason.
    let (store, _) = LogStore::open(&log_dir(b.path()), &LogConfig::default()).unwrap();
    let out = kappakv(&["import", "--data-dir", b_dir, file]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is kappakv serve running?"), "{stderr}");
    drop(store);

    let help = kappakv(&["import", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status"));
}
